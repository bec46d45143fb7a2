"""Population sweeps end to end on the session's Ray instance (CPUs): 8 trials, ASHA, 4 members per
population.

One undisturbed sweep is the reference. The same sweep again with one trial's Tune actor killed while its
population trains checks that the others are not disturbed (their numbers equal the reference's) and that
the killed trial continues from its checkpoint. The same sweep in a driver of its own, stopped with Ctrl+C
and resumed, checks that nothing is trained twice and that every member continues exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import hvae_ray
from hvae_ray.engine import fit, load_checkpoint
from hvae_ray.sweep.layout import read_jsonl as _rows

pytestmark = pytest.mark.slow

MAX_T = 4
RATES = [1.0e-2, 6.0e-3, 4.0e-3, 3.0e-3, 1.0e-4, 5.0e-5, 2.0e-5, 1.0e-5]
SLOTS = 4
# Once trials end, the executor may move the members left into a population of their own size; the same
# arithmetic batched over fewer slots agrees to float rounding, not to the bit.
RESIZE_ROUNDING = 1e-6


def _sweep(sweep_file, path: Path) -> Path:
    """8 trials in grid order (the last four with tiny learning rates rank below the median at the first
    rung, so ASHA stops some), one population of 4 members, one retry per trial. Dropout is off: with it,
    members draw their dropout masks from one stream, so their numbers would depend on which members
    trained beside them, and the comparisons below would not be exact."""
    return sweep_file(path, search_space={"learning_rate": {"grid": RATES}},
                      config={"epochs": MAX_T, "model.dropout": 0.0},
                      scheduler={"metric": "val_objective", "mode": "min", "max_t": MAX_T, "grace_period": 1,
                                 "reduction_factor": 2},
                      num_samples=1, max_concurrent_trials=4, max_failures=1,
                      resources={"num_workers": 1, "cpus_per_worker": 0.5, "gpu_fraction": 0,
                                 "population": SLOTS})


def _by_rate(exp: Path) -> dict[float, dict]:
    """Each trial's table row, epoch log and folder, by its learning rate."""
    out = {}
    for row in hvae_ray.load_trials(exp).to_pylist():
        d = Path(row["trial_dir"])
        log = [r for r in _rows(d / "engine" / "metrics.jsonl") if "epoch" in r]
        out[row["param.learning_rate"]] = SimpleNamespace(row=row, log=log, dir=d)
    return out


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory, sweep_file):
    root = tmp_path_factory.mktemp("pop8")
    result = hvae_ray.run_sweep(_sweep(sweep_file, root / "pop8.yaml"), storage=str(root / "runs"), name="pop8")
    return SimpleNamespace(exp=result.experiment_dir, result=result, trials=_by_rate(result.experiment_dir))


def test_every_trial_has_its_row_tensorboard_run_and_checkpoint(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trials = reference.trials
    assert sorted(trials) == sorted(RATES)
    assert not reference.result.results.errors
    statuses = {t.row["status"] for t in trials.values()}
    assert statuses == {"completed", "early_stopped"}, statuses
    for rate, t in trials.items():
        assert t.row["population"] == SLOTS
        assert [r["epoch"] for r in t.log] == list(range(t.row["epochs"]))
        assert all(r["population"] == SLOTS and 1 <= r["population_members"] <= SLOTS for r in t.log)
        acc = EventAccumulator(str(t.dir))
        acc.Reload()
        steps = [e.step for e in acc.Scalars("Loss/val_objective")]
        assert steps == list(range(t.row["epochs"])), (rate, steps)
        logged = {e.step: e.value for e in acc.Scalars("Loss/val_objective")}
        for r in t.log:
            assert logged[r["epoch"]] == pytest.approx(r["val_objective"], rel=1e-6)
        ckpt = load_checkpoint(t.row["best_checkpoint"])
        assert ckpt["config"]["learning_rate"] == pytest.approx(rate)
        assert int(ckpt["epoch"]) == t.row["best_epoch"]


def test_trials_asha_stopped_trained_no_epoch_past_their_stop(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stopped = [t for t in reference.trials.values() if t.row["status"] == "early_stopped"]
    assert stopped
    for t in stopped:
        assert t.row["epochs"] < MAX_T
        # the member's own last checkpoint (written by the executor at every epoch it trains) and its
        # TensorBoard run end at the last epoch Tune received
        assert int(load_checkpoint(t.dir / "engine" / "last")["epoch"]) == t.row["epochs"] - 1
        acc = EventAccumulator(str(t.dir))
        acc.Reload()
        assert max(e.step for e in acc.Scalars("Loss/val_total")) == t.row["epochs"] - 1


def test_members_equal_their_runs_alone(reference, tmp_path):
    """A member's epochs equal the same config trained alone by ``fit`` (fp32 on CPU: to 1e-5)."""
    from hvae_ray.config import from_dict
    from hvae_ray.data.io import load_jets
    from hvae_ray.sweep.layout import read_sweep_state

    state = read_sweep_state(reference.exp)
    t = reference.trials[RATES[0]]
    cfg = from_dict(load_checkpoint(t.dir / "engine" / "last")["config"], "member")
    alone = []
    fit(cfg, load_jets(state.data_path), callbacks=[lambda rep: alone.append(rep.metrics["val_objective"])],
        progress=False)
    assert alone[:len(t.log)] == pytest.approx([r["val_objective"] for r in t.log], rel=1e-5)


def test_a_killed_trial_continues_and_leaves_the_others_undisturbed(reference, ray_local, tmp_path, sweep_file):
    import psutil

    exp = tmp_path / "runs" / "killed"
    killed: list[int] = []

    def kill_one_member():
        """Kill the Tune actor (the process whose working folder is the trial's) of a trial that passed ASHA's
        last rung (epochs 1 and 2) and is between epochs 3 and 4, where no rung can stop it."""
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for d in exp.glob("trial_*"):
                if len(_rows(d / "engine" / "metrics.jsonl")) != MAX_T - 1:
                    continue
                for proc in psutil.Process().children(recursive=True):  # this session's Ray instance
                    try:
                        if " ".join(proc.cmdline()).startswith("ray::ImplicitFunc") and Path(proc.cwd()).name == d.name:
                            os.kill(proc.pid, signal.SIGKILL)
                            killed.append(d.name)
                            break
                    except psutil.Error:
                        continue
                if killed:
                    break
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_member, daemon=True)
    killer.start()
    result = hvae_ray.run_sweep(_sweep(sweep_file, tmp_path / "killed.yaml"), storage=str(tmp_path / "runs"),
                                name="killed")
    killer.join(timeout=10)
    assert len(killed) == 1, "no member's trial was found alive mid-run"
    trials = _by_rate(result.experiment_dir)
    assert all(t.row["status"] in ("completed", "early_stopped") for t in trials.values()), \
        {r: t.row["status"] for r, t in trials.items()}
    from ray.tune import ExperimentAnalysis

    failures = {t.trial_id: t.run_metadata.num_failures for t in ExperimentAnalysis(str(exp)).trials}
    retried = [t for t in trials.values() if failures[t.row["trial_id"]] == 1]
    assert [t.dir.name for t in retried] == killed, ("Tune did not retry the killed trial alone", failures)
    assert retried[0].row["status"] == "completed" and retried[0].row["epochs"] == MAX_T
    epochs = [r["epoch"] for r in retried[0].log]
    # it continued from its checkpoint, training no epoch twice: after the restart (a second loop) or, when
    # the executor had already trained its last epoch at the kill, by reporting the logged epochs
    assert epochs == list(range(MAX_T)), "the retried trial did not continue from its checkpoint"
    # every member's numbers, the retried one's included, are those of the undisturbed sweep, epoch by epoch
    for rate, t in trials.items():
        ref = {r["epoch"]: r["val_objective"] for r in reference.trials[rate].log}
        common = [r for r in t.log if r["epoch"] in ref]
        assert common, rate
        assert [r["val_objective"] for r in common] == pytest.approx([ref[r["epoch"]] for r in common],
                                                                     rel=RESIZE_ROUNDING), rate


def test_ctrl_c_then_resume_trains_nothing_twice(reference, ray_local, tmp_path, sweep_file):
    path = _sweep(sweep_file, tmp_path / "resume.yaml")
    exp = tmp_path / "runs" / "resume"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "hvae_ray.cli", "sweep", "run", str(path), "--storage",
                             str(tmp_path / "runs"), "--name", "resume"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while sum(len(_rows(p)) for p in exp.glob("trial_*/engine/metrics.jsonl")) < 3:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no epochs reported"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out[-3000:]
    assert f"hvae-ray sweep resume {exp.resolve()}" in out, out[-3000:]
    before = {rate: [r["epoch"] for r in t.log] for rate, t in _by_rate(exp).items()}
    resumed = hvae_ray.resume_sweep(exp)
    assert not resumed.results.errors and not resumed.interrupted
    trials = _by_rate(exp)
    assert sorted(trials) == sorted(RATES)
    for rate, t in trials.items():
        epochs = [r["epoch"] for r in t.log]
        assert epochs == list(range(len(epochs))), (rate, epochs)  # no epoch twice, none skipped
        assert epochs[:len(before.get(rate, []))] == before.get(rate, [])
        ref = {r["epoch"]: r["val_objective"] for r in reference.trials[rate].log}
        assert [r["val_objective"] for r in t.log if r["epoch"] in ref] == \
            pytest.approx([ref[r["epoch"]] for r in t.log if r["epoch"] in ref], rel=RESIZE_ROUNDING), rate


def test_an_interrupted_sweep_from_python_says_how_to_resume(reference, capsys):
    """``run_sweep``/``resume_sweep`` called from Python end an interrupted sweep with one line on how to go on
    (here: a sweep whose last trial was never created)."""
    from hvae_ray.sweep.tune import SweepResult, _said

    res = SweepResult(reference.exp, None, expected_trials=len(RATES) + 1)
    assert res.interrupted and not SweepResult(reference.exp, None, expected_trials=len(RATES)).interrupted
    assert _said(res, hint=True) is res
    err = capsys.readouterr().err
    assert f"resume_sweep({str(reference.exp)!r})" in err and f"hvae-ray sweep resume {reference.exp}" in err
    _said(res, hint=False)
    assert capsys.readouterr().err == ""
