"""What `hvae-ray train` says on the console: one plain line with the run's estimate after its first epoch
(the engine's step mode only in the log), a warning for a KL warm-up longer than the run, and on Ctrl+C
the exact command that continues the run."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from hvae_ray.cli import main
from hvae_ray.config import load_config, warmup_warning
from hvae_ray.data.io import save_parquet
from hvae_ray.data.jets import MAX_PARTICLES, from_padded
from hvae_ray.engine import CHECKPOINT_FILE, load_checkpoint
from hvae_ray.engine.trainer import duration, run_estimate

TINY = ["batch_size=16", "gradient_accumulation_steps=1", "model.hidden_dim=8", "model.latent_dim=4",
        "model.num_layers=1", "device=cpu"]
ESTIMATE = re.compile(r"^training (\d+) jets, (\d+) epochs on cpu: about \d+ (s|min|h) in all "
                      r"\(first epoch \d+\.\d s\)$")


def sets(*pairs: str) -> list[str]:
    return [arg for p in pairs for arg in ("--set", p)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    particles = np.zeros((40, MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((40, MAX_PARTICLES), dtype=bool)
    for i in range(40):
        k = int(rng.integers(5, MAX_PARTICLES + 1))
        particles[i, :k, :2] = rng.normal(0, 0.1, (k, 2))
        particles[i, :k, 2] = np.sort(rng.dirichlet(np.ones(k)))[::-1]
        mask[i, :k] = True
    path = tmp_path_factory.mktemp("data") / "jets.parquet"
    save_parquet(from_padded(particles, mask, source="<test>"), path)
    return path


def test_train_says_what_it_trains_and_how_long_in_one_plain_line(data_file, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="hvae_ray.engine.trainer")
    rc = main(["train", "--data-path", str(data_file), "--save-dir", str(tmp_path / "r"),
               *sets(*TINY, "epochs=2", "kl_warmup_epochs=1")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    said = [ln for ln in re.split(r"[\r\n]", captured.err) if ESTIMATE.match(ln.strip())]
    assert len(said) == 1, captured.err
    jets, epochs, _ = ESTIMATE.match(said[0].strip()).groups()
    assert int(epochs) == 2 and 0 < int(jets) < 40  # the training split of the 40 jets
    for jargon in ("training step", "CUDA graph", "eager"):
        assert jargon not in captured.err + captured.out
    assert any(r.getMessage().startswith("training step: ") for r in caplog.records)  # still in the log
    assert "warning: kl_warmup_epochs" not in captured.err  # the warm-up ends within the run


def test_run_estimate_scales_the_first_epoch_to_the_run():
    cfg = load_config(None, {"epochs": 300, "patience": 0})
    line = run_estimate(cfg, 800, torch.device("cpu"), 0, 8.4)
    assert line == "training 800 jets, 300 epochs on cpu: about 42 min in all (first epoch 8.4 s)"
    resumed = run_estimate(cfg, 800, torch.device("cpu"), 250, 8.4)  # 50 epochs left
    assert resumed.startswith("training 800 jets, epochs 251-300 on cpu: about 7 min in all")
    patient = run_estimate(load_config(None, {"patience": 20}), 800, torch.device("cpu"), 0, 60.0)
    assert "about 5.0 h in all" in patient and "less if 20 epochs without a better val_objective stop it" in patient
    assert [duration(s) for s in (42, 600, 7200)] == ["42 s", "10 min", "2.0 h"]


def test_a_warmup_longer_than_the_run_is_warned_about_at_start(data_file, tmp_path, capsys):
    assert warmup_warning(load_config(None, {"epochs": 10, "kl_warmup_epochs": 9})) is None
    assert warmup_warning(load_config(None, {"epochs": 10, "kl_warmup_epochs": 10, "kl_schedule": "cyclical"})) is None
    rc = main(["train", "--data-path", str(data_file), "--save-dir", str(tmp_path / "r"),
               *sets(*TINY, "epochs=1", "kl_warmup_epochs=5", "kl_max_weight=1e-3")])
    err = capsys.readouterr().err
    assert rc == 0, err
    warned = [ln for ln in err.splitlines() if "kl_warmup_epochs" in ln]  # once, not also from the log
    assert warned == ["warning: kl_warmup_epochs=5 >= epochs=1: the KL weight never reaches kl_max_weight=0.001 "
                      "(the last epoch's is 1e-05); set kl_warmup_epochs below 1"], err


def test_ctrl_c_prints_the_command_that_resumes_the_run_and_it_does(data_file, tmp_path, child_env):
    """`hvae-ray train` in its own process, interrupted (SIGINT) once an epoch is saved: exit 130, and the
    last line of its output is the command that continues it, which then runs the remaining epochs."""
    epochs = 8
    save_dir = tmp_path / "run"
    args = ["train", "--data-path", str(data_file), "--save-dir", str(save_dir), *sets(*TINY, f"epochs={epochs}")]
    proc = subprocess.Popen([sys.executable, "-m", "hvae_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**child_env, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (save_dir / "last" / CHECKPOINT_FILE).is_file():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no epoch saved"
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last_epoch = int(load_checkpoint(save_dir / "last")["epoch"])
    assert last_epoch < epochs - 1, "the run ended before the interrupt"
    lines = err.rstrip("\n").split("\n")
    expected = shlex.join(["hvae-ray", *args, "--resume"])
    assert lines[-1] == expected, err[-2000:]  # on its own line, nothing before it on that line
    assert lines[-2].startswith("hvae-ray: interrupted; the last finished epoch is saved in"), err[-2000:]

    command = shlex.split(lines[-1])
    assert command[:2] == ["hvae-ray", "train"]
    assert main([*command[1:], "--quiet"]) == 0
    assert int(load_checkpoint(save_dir / "last")["epoch"]) == epochs - 1


def test_ctrl_c_before_any_epoch_says_there_is_nothing_to_resume(tmp_path, capsys, monkeypatch):
    from hvae_ray import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "train", interrupted)
    assert main(["train", "--save-dir", str(tmp_path / "none"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["hvae-ray: interrupted before the first epoch ended; nothing was saved to resume from"]
    assert not os.path.exists(tmp_path / "none")
