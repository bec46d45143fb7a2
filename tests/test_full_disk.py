"""A disk that fills mid-write: `train`, `evaluate`, `sample` and `sweep run` end in one line (exit 2), not a
traceback or a signal, leave no temporary file, and keep what was written before (the last good
checkpoint). A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) stands in for the full disk in a child
process; in this process an ``ENOSPC`` is raised where the bytes would reach the disk."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvae_ray.cli import main
from hvae_ray.data.io import save_parquet
from hvae_ray.data.jets import MAX_PARTICLES, from_padded
from hvae_ray.engine import CHECKPOINT_FILE, load_checkpoint

# A model that trains for an epoch in well under a second on one CPU core.
TINY = ["batch_size=16", "gradient_accumulation_steps=1", "model.hidden_dim=8", "model.latent_dim=4",
        "model.num_layers=1", "device=cpu"]


def sets(*pairs: str) -> list[str]:
    return [arg for p in pairs for arg in ("--set", p)]


def random_particles(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    particles = np.zeros((n, MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((n, MAX_PARTICLES), dtype=bool)
    for i in range(n):
        k = int(rng.integers(5, MAX_PARTICLES + 1))
        particles[i, :k, 0] = rng.normal(0, 0.1, k)
        particles[i, :k, 1] = rng.normal(0, 0.1, k)
        particles[i, :k, 2] = np.sort(rng.dirichlet(np.ones(k)))[::-1]
        mask[i, :k] = True
    return particles, mask


def _cli_with_file_limit(limit: int, *args: str) -> subprocess.CompletedProcess:
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # a write past the limit fails with EFBIG
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "from hvae_ray.cli import main\n"
            f"sys.exit(main({list(args)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hvae-ray: error: "), proc.stderr[-3000:]
    return lines[0]


def _temporary_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "jets.parquet"
    save_parquet(from_padded(*random_particles(40), source="<test>"), path)
    return path


@pytest.fixture(scope="module")
def trained(data_file, tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data-path", str(data_file), "--save-dir", str(save_dir), "--quiet",
                 *sets(*TINY, "epochs=2")]) == 0
    return save_dir


def test_train_on_a_full_disk_keeps_the_last_good_checkpoint(data_file, trained, tmp_path):
    save_dir = tmp_path / "run"
    assert main(["train", "--data-path", str(data_file), "--save-dir", str(save_dir), "--quiet",
                 *sets(*TINY, "epochs=1")]) == 0
    size = (save_dir / "last" / CHECKPOINT_FILE).stat().st_size
    proc = _cli_with_file_limit(size // 2, "train", "--data-path", str(data_file), "--save-dir", str(save_dir),
                                "--quiet", "--resume", *sets(*TINY, "epochs=3"))
    line = _one_line(proc)
    assert "could not write it" in line and "training stopped after epoch 1" in line, line
    assert "last good checkpoint" in line, line
    assert load_checkpoint(save_dir / "last")["epoch"] == 0
    assert _temporary_files(save_dir) == []


def test_evaluate_on_a_full_disk_is_one_line(data_file, tmp_path):
    plots = tmp_path / "plots"
    proc = _cli_with_file_limit(4096, "evaluate", "--real", str(data_file), "--generated", str(data_file),
                                "--plots", str(plots), "--w1-samples", "20", "--fpd-min-samples", "10",
                                "--fpd-max-samples", "20", "--kpd-batch-size", "10")
    line = _one_line(proc)
    assert f"{plots}/" in line and ".png: could not write it: File too large" in line, line
    assert _temporary_files(plots) == [] and list(plots.glob("*.png")) == []


def test_sample_on_a_full_disk_is_one_line(trained, tmp_path, monkeypatch, capsys):
    """The disk fills as the archive is flushed to it: one line naming the output, nothing left."""
    import hvae_ray.io_safe as io_safe

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_safe.os, "fsync", full)
    out = tmp_path / "out" / "g.npz"
    out.parent.mkdir()
    rc = main(["sample", "--checkpoint", str(trained / "best"), "--n-jets", "50", "--out", str(out),
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines() == [f"hvae-ray: error: {out}: could not write it: No space left on device "
                                            "(free some space, or write elsewhere); nothing was written there"], err
    assert list(out.parent.iterdir()) == []


def test_a_write_fault_the_command_does_not_catch_is_one_line(tmp_path, monkeypatch, capsys, sweep_file):
    """`sweep run` when its sweep state cannot be written (before any trial): the command line's own net."""
    from hvae_ray.sweep import layout, tune

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(self.experiment_dir) / layout.SWEEP_FILE))

    monkeypatch.setattr(tune, "ray_init", lambda address, **kw: None)
    monkeypatch.setattr(tune, "_local_gpus", lambda: 0.0)
    monkeypatch.setattr(tune, "_plan_populations", lambda spec, state: state, raising=False)
    monkeypatch.setattr(layout.SweepState, "write", full)
    storage = tmp_path / "runs"
    rc = main(["sweep", "run", str(sweep_file(tmp_path / "s.yaml")), "--storage", str(storage), "--name", "full"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hvae-ray")]
    assert rc == 2 and err == [f"hvae-ray: error: {storage / 'full' / layout.SWEEP_FILE}: could not write it: No "
                               "space left on device (free some space, or write elsewhere); nothing was written "
                               "there"], err
