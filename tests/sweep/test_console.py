"""The sweep's console: one line when a trial starts and one when it ends (table ids and statuses, the
ranking metric, val_kl, progress and the time left), ASHA rungs on a status line rewritten in place,
Ray's own output hidden unless asked for, and no Ray resume hint before the sweep's own on Ctrl+C."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hvae_ray.sweep import ray_internals, trials
from hvae_ray.sweep.console import (
    TUNE_OUTPUT_ENV,
    VERBOSE_ENV,
    SweepConsole,
    console_callbacks,
    expected_epochs,
    rungs,
    tune_verbosity,
)
from hvae_ray.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[2]
RAY_OUTPUT = ("Trial status", "Current best trial", "╭", "│", "_trial_driver", "Tuner.restore", "TERMINATED",
              "Trial ", "Logical resource usage")


class Screen(io.StringIO):
    """A stdout that says whether it is a terminal."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def rendered(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: a carriage return and erase-line rewrite the line."""
    lines = []
    for raw in text.split("\n"):
        lines.append(raw.replace("\x1b[K", "").split("\r")[-1])
    return [ln for ln in lines if ln]


def trial(tid: str, **config) -> SimpleNamespace:
    return SimpleNamespace(trial_id=tid, config=config, last_result={}, status="RUNNING")


def test_rungs_and_the_epochs_a_trial_trains_under_asha():
    assert rungs(2, 2, 6) == [2, 4]  # quickstart
    assert rungs(1, 2, 3) == [1, 2] and rungs(1, 3, 100) == [1, 3, 9, 27, 81] and rungs(5, 2, 5) == []
    # all trials train to 2, half of them to 4, a quarter to 6
    assert expected_epochs(2, 2, 6) == pytest.approx(2 + 2 / 2 + 2 / 4)
    assert expected_epochs(5, 2, 5) == 5


def feed(console: SweepConsole, monkeypatch, tty: bool) -> Screen:
    """Four trials through Tune's callbacks: one completes (passing both rungs), one is stopped at the
    second rung, one diverges, one raises."""
    screen = Screen(tty)
    monkeypatch.setattr(sys, "stdout", screen)
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    t = {k: trial(f"ab12c_0000{k}", kl_max_weight=1.2e-6 * (k + 1), **{"loss_weights.topology": 0.5})
         for k in range(4)}
    everyone = list(t.values())
    console.setup(total_num_samples=4)
    for k in range(4):
        console.on_trial_start(0, everyone, t[k])

    def report(k, epoch, objective, kl, **extra):
        result = {"epochs_done": epoch, "val_objective": objective, "val_kl": kl, "diverged": 0.0, **extra}
        t[k].last_result = result
        console.on_trial_result(0, everyone, t[k], result)

    for epoch, (a, b) in enumerate([(3.0, 3.2), (2.5, 3.1), (2.6, 3.3), (2.4, 3.0)], start=1):
        report(0, epoch, a, 1.5 * epoch)
        if epoch <= 2:
            report(1, epoch, b, 1.0)
    t[1].status = "TERMINATED"
    console.on_trial_complete(0, everyone, t[1])
    t[2].last_result = {"diverged": 1.0, "val_objective": float("inf"), "error": "epoch 0: KL runaway"}
    console.on_trial_complete(0, everyone, t[2])
    report(3, 1, 3.5, 0.9)
    console.on_trial_error(0, everyone, t[3])
    t[0].status = "TERMINATED"
    console.on_trial_complete(0, everyone, t[0])
    console.on_experiment_end(everyone)
    return screen


@pytest.fixture
def spec():
    return load_sweep(REPO / "sweeps" / "quickstart.yaml",
                      {"num_samples": 4, "scheduler.max_t": 4, "scheduler.grace_period": 1})


def test_one_line_per_trial_start_and_end_in_the_tables_words(spec, monkeypatch, tmp_path):
    console = SweepConsole(spec, tmp_path)
    (tmp_path / "trial_ab12c_00003").mkdir()
    (tmp_path / "trial_ab12c_00003" / "error.txt").write_text("Traceback ...\nRuntimeError: out of memory\n")
    lines = feed(console, monkeypatch, tty=False).getvalue().splitlines()
    assert "\r" not in "".join(lines)  # no status line in a log
    assert lines[0] == ("sweep quickstart: 4 trials, 4 at a time; ASHA on val_objective (min), rungs at "
                        "epoch 1, 2, at most 4 epochs")
    assert lines[-1].startswith("sweep finished after ") and lines[-1].endswith(": 4/4 trials finished")
    body = lines[1:-1]
    assert len(body) == 2 * 4
    starts = body[:4]
    assert starts[0] == "ab12c_00000 started  kl_max_weight=1.2e-06 loss_weights.topology=0.5"  # not 0
    ends = {ln.split()[0]: ln for ln in body[4:]}
    stopped, diverged, failed, done = (ends[f"ab12c_0000{k}"] for k in (1, 2, 3, 0))
    assert stopped.startswith("ab12c_00001 early_stopped after 2 epochs: val_objective 3.1, val_kl 1; "
                              "rungs passed: 1; stopped at rung 2 · 1/4 finished, about ")
    assert diverged.startswith("ab12c_00002 diverged after 0 epochs: epoch 0: KL runaway · 2/4 finished")
    assert failed.startswith("ab12c_00003 error after 1 epoch: RuntimeError: out of memory · 3/4 finished")
    assert done == ("ab12c_00000 completed after 4 epochs: val_objective 2.4, val_kl 6; rungs passed: 1, 2 "
                    "· 4/4 finished")
    # the time left: 2 trials left after the first ended, at the rate epochs were trained so far
    left = re.search(r"about (\d+) (s|min)", stopped)
    assert left is not None


def test_a_terminal_gets_rungs_and_progress_on_one_rewritten_line(spec, monkeypatch, tmp_path):
    text = feed(SweepConsole(spec, tmp_path), monkeypatch, tty=True).getvalue()
    assert "ab12c_00000 reached rung 2: val_objective 2.5, val_kl 3 · 0/4 finished" in text
    assert "ab12c_00001 reached rung 1: val_objective 3.2, val_kl 1" in text
    shown = rendered(text)
    assert len(shown) == 1 + 2 * 4 + 1  # the status line is rewritten, never left behind
    assert all("reached rung" not in ln for ln in shown)


def test_the_seconds_left_follow_the_rate_of_epochs(spec, tmp_path):
    console = SweepConsole(spec, tmp_path)
    console.setup()
    a, b = trial("a"), trial("b")
    console.started_at = 0.0
    console.on_trial_result(0, [a, b], a, {"epochs_done": 2})
    console.on_trial_result(0, [a, b], b, {"epochs_done": 2})
    # 4 epochs in 40 s; ASHA's expectation for (1, 2, 4): 1 + 1/2 + 2/4 = 2 epochs a trial, 4 trials:
    # 8 epochs of which the running trials hold 2 + 2 -> 4 epochs left, 40 s
    assert console.per_trial == pytest.approx(2.0)
    assert console.seconds_left([a, b], now=40.0) == pytest.approx(40.0)
    a.last_result = {"epochs_done": 2}
    console.on_trial_complete(0, [a, b], a)
    # one trial ran 2 epochs: 3 trials left of 2 each, b holds 2 -> 4 epochs, 40 s
    assert console.seconds_left([a, b], now=40.0) == pytest.approx(40.0)


def test_the_console_pickles_with_the_run_config_without_its_progress(spec, tmp_path):
    console = SweepConsole(spec, tmp_path)
    console.finished["x"] = 3
    copy = pickle.loads(pickle.dumps(console))
    assert copy.finished == {} and copy.total == console.total and copy.rungs == console.rungs


def test_verbose_brings_ray_back(spec, tmp_path, monkeypatch):
    """Quiet: Tune's verbose 0 with its legacy engine (the default one prints boxes at any verbosity) and
    this console; --verbose: Tune's default output with the user's engine, and no console."""
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.delenv(TUNE_OUTPUT_ENV, raising=False)
    assert tune_verbosity() == 0 and os.environ[TUNE_OUTPUT_ENV] == "0"
    assert [type(c) for c in console_callbacks(spec, tmp_path)] == [SweepConsole]
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert tune_verbosity() == 1 and TUNE_OUTPUT_ENV not in os.environ
    assert console_callbacks(spec, tmp_path) == []


def test_rays_restore_hint_is_dropped(spec, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", Screen(False))
    SweepConsole(spec, tmp_path).setup()
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    log = logging.getLogger("ray.tune.tune")
    log.addHandler(handler)
    try:
        log.warning("Experiment has been interrupted, but the most recent state was saved.\n"
                    "Resume experiment with: Tuner.restore(path=\"/x\", trainable=...)")
        log.error("Trials did not complete: [a, b]")
        log.info("Wrote the latest version of all result files")
        log.warning("something else")
    finally:
        log.removeHandler(handler)
    assert seen.getvalue() == "something else\n"


def test_the_raylets_start_up_notice_is_dropped_and_nothing_else(spec, tmp_path, monkeypatch):
    worker = ray_internals.internal_module("worker")
    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # put back afterwards
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.setattr(sys, "stdout", Screen(False))
    SweepConsole(spec, tmp_path).setup()
    monkeypatch.setattr(sys, "stdout", screen := Screen(False))
    notice = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 127.0.0.1, which "
              "is 4x the maximum expected startup concurrency (2).")
    worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    worker.print_to_stdstream({"lines": ["out of memory on node abc"], "pid": "raylet", "is_err": False},
                              ignore_prefix=False)
    assert "PYTHON worker processes" not in screen.getvalue() and "out of memory on node abc" in screen.getvalue()


# ---------------------------------------------------------------------------------------------------------
# The real command


def _sweep(tmp_path, sweep_file, **sections) -> Path:
    return sweep_file(tmp_path / "console.yaml", **sections)


@pytest.mark.slow
def test_sweep_run_console_is_at_most_two_lines_per_trial(tmp_path, sweep_file, child_env):
    """`hvae-ray sweep run` in its own process and Ray instance: 4 trials (two diverge at their first
    validation, two train under ASHA with rungs at epochs 1 and 2). Its whole output is a header, at most
    two lines per trial and a summary; each trial's lines carry the table's id and status; nothing of Ray's."""
    path = _sweep(tmp_path, sweep_file, search_space={"max_kl": {"grid": [1.0e-3, 1000.0]},
                                                      "learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}},
                  num_samples=2, max_concurrent_trials=2,
                  scheduler={"max_t": 3, "grace_period": 1, "reduction_factor": 2})
    proc = subprocess.run([sys.executable, "-m", "hvae_ray.cli", "sweep", "run", str(path), "--storage",
                           str(tmp_path / "runs"), "--name", "console"],
                          capture_output=True, text=True, env=child_env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "runs" / "console"
    table = trials.load_trials(exp).to_pylist()
    assert len(table) == 4
    out = proc.stdout.splitlines()
    header = [f"experiment: {exp.resolve()}", f"watch it:   tensorboard --logdir {exp.resolve()}",
              "sweep console: 4 trials, 2 at a time; ASHA on val_objective (min), rungs at epoch 1, 2, at most "
              "3 epochs"]
    assert out[:3] == header, proc.stdout
    summary = out[-4:]
    assert summary[0].startswith("sweep finished after ") and summary[0].endswith(": 4/4 trials finished")
    assert summary[1:] == [f"experiment: {exp.resolve()}", f"trials: {', '.join(_counts(table))}",
                           f"inspect: hvae-ray trials {exp.resolve()}"]
    body = out[3:-4]
    assert len(body) <= 2 * len(table), proc.stdout
    for row in table:
        mine = [ln for ln in body if ln.startswith(row["trial_id"] + " ")]
        assert len(mine) == 2 and mine[0].startswith(f"{row['trial_id']} started  "), proc.stdout
        assert mine[1].startswith(f"{row['trial_id']} {row['status']} after {row['epochs']} epoch"), proc.stdout
        if row["status"] != "diverged":
            assert "val_objective " in mine[1] and "val_kl " in mine[1]
    assert {r["status"] for r in table} >= {"diverged"}
    assert body[-1].endswith("· 4/4 finished")
    for ray_text in RAY_OUTPUT:
        assert ray_text not in proc.stdout + proc.stderr, ray_text


def _counts(table: list[dict]) -> list[str]:
    counts: dict[str, int] = {}
    for r in table:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return [f"{n} {s}" for s, n in sorted(counts.items())]


@pytest.mark.slow
def test_ctrl_c_shows_our_resume_hint_not_rays(tmp_path, sweep_file, child_env):
    """Ctrl+C once a trial has reported: the sweep's own hint (the command to resume), and nothing of
    Ray's "Resume experiment with: Tuner.restore(...)" before it or anywhere."""
    path = _sweep(tmp_path, sweep_file, search_space={"learning_rate": {"grid": [1.0e-3, 2.0e-3]}},
                  max_concurrent_trials=2, config={"epochs": 50},
                  scheduler={"max_t": 50, "grace_period": 50})
    exp = tmp_path / "runs" / "stop"
    proc = subprocess.Popen([sys.executable, "-m", "hvae_ray.cli", "sweep", "run", str(path), "--storage",
                             str(tmp_path / "runs"), "--name", "stop"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(_reported(d) for d in exp.glob("trial_*")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no trial reported an epoch"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out[-3000:]
    hint = f"interrupted; continue with: hvae-ray sweep resume {exp.resolve()}"
    assert hint in out, out[-3000:]
    assert "Tuner.restore" not in out and "Resume experiment with" not in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def _reported(trial_dir: Path) -> bool:
    path = trial_dir / "result.json"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            if "epochs_done" in json.loads(line):
                return True
        except json.JSONDecodeError:
            pass
    return False
