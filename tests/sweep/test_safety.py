"""What a sweep refuses before Ray starts, and the signed resume: a crafted pickle in an experiment never
runs, a held experiment is not run twice. Ray is not started here."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hvae_ray.cli import main
from hvae_ray.sweep import signing
from hvae_ray.sweep.layout import SWEEP_FILE
from hvae_ray.sweep.spec import load_sweep
from hvae_ray.sweep.tune import _prepare


@pytest.fixture
def config_home(tmp_path, monkeypatch) -> Path:
    """The user's config folder (the resume key's home) for this test only."""
    home = tmp_path / "config-home"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


@pytest.fixture
def experiment(tmp_path, sweep_file) -> Path:
    """An experiment folder as `sweep run` leaves it before Tune writes anything: its sweep state."""
    spec = load_sweep(sweep_file(tmp_path / "s.yaml", search_space={"batch_size": {"choice": [8, 16]}}))
    exp = tmp_path / "runs" / "s"
    exp.mkdir(parents=True)
    (exp / SWEEP_FILE).write_text(json.dumps(_prepare(spec, "s", str(exp.parent)).to_dict(), default=str))
    return exp


class _Marker:
    """Unpickling it creates a file: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvae-ray: error: "), proc.stderr[-3000:]
    return lines[0]


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvae_ray.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, **kw)


def test_resume_refuses_a_crafted_tuner_pickle_and_runs_no_code(experiment, config_home, tmp_path):
    marker = tmp_path / "marker"
    (experiment / "tuner.pkl").write_bytes(pickle.dumps(_Marker(marker)))
    proc = _cli("sweep", "resume", str(experiment))
    line = one_line(proc)
    assert f"{experiment / 'tuner.pkl'}: is not signed with your key" in line, line
    assert not marker.exists()
    # `trials` reads Tune's experiment state too: a crafted one is not loaded either
    (experiment / "experiment_state-2026.json").write_text(json.dumps({"trial_data": [], "runner_data": {
        "x": {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(_Marker(marker)).hex()}}}))
    assert main(["trials", str(experiment)]) == 0
    assert not marker.exists()


def test_signed_state_verifies_and_any_change_is_refused(experiment, config_home):
    (experiment / "tuner.pkl").write_bytes(pickle.dumps({"a": 1}))
    (experiment / "trial_x").mkdir()
    (experiment / "trial_x" / "error.pkl").write_bytes(pickle.dumps("boom"))
    signing.Signer(experiment).sign()
    key = config_home / "hvae-ray" / signing.KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600
    signing.verify(experiment)
    (experiment / "trial_x" / "error.pkl").write_bytes(pickle.dumps("changed"))
    with pytest.raises(signing.ResumeRefused, match="error.pkl: changed since your sweep signed it"):
        signing.verify(experiment)
    # the owner may vouch for the folder as it is now
    assert main(["sweep", "sign", str(experiment)]) == 0
    signing.verify(experiment)
    (experiment / "callback-states-2026.pkl").write_bytes(b"planted")
    with pytest.raises(signing.ResumeRefused, match="callback-states-2026.pkl: is not signed"):
        signing.verify(experiment)
    # another user's key (or a leaked copy of the record) does not verify
    os.environ["XDG_CONFIG_HOME"] = str(config_home / "other")
    (experiment / "callback-states-2026.pkl").unlink()
    with pytest.raises(signing.ResumeRefused, match=r"(tuner|error)\.pkl: changed since"):
        signing.verify(experiment)


class _Listing(list):
    """What ``os.scandir`` returns, already read: a list usable as a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_files_and_folders_removed_while_signing_are_skipped(experiment, config_home, monkeypatch):
    """Tune replaces its state files and Ray Train deletes old checkpoints while the driver signs: a file
    or folder listed and then gone is left out; verifying still refuses what is unsigned or changed."""
    import shutil

    (experiment / "tuner.pkl").write_bytes(pickle.dumps({}))
    rotated = experiment / "experiment_state-2026-01-01.json"
    rotated.write_text("{}")
    trial = experiment / "trial_x"
    old = trial / "checkpoint_000000"
    old.mkdir(parents=True)
    (old / "extra.pkl").write_bytes(b"old")
    (trial / "params.pkl").write_bytes(pickle.dumps({"batch_size": 8}))
    real_scandir = os.scandir

    def scandir(path):
        if isinstance(path, int):  # rmtree's own listing, by descriptor
            return real_scandir(path)
        if Path(path) == old and old.exists():
            shutil.rmtree(old)  # listed in its folder, then removed before it is listed in turn
        listing = _Listing(real_scandir(path))
        if Path(path) == experiment and rotated.exists():
            rotated.unlink()  # listed, then removed before it is read
        return listing

    monkeypatch.setattr(os, "scandir", scandir)
    signing.Signer(experiment).sign()
    monkeypatch.setattr(os, "scandir", real_scandir)
    record = json.loads((experiment / signing.SIGNATURES).read_text())["files"]
    assert sorted(record) == ["trial_x/params.pkl", "tuner.pkl"]
    signing.verify(experiment)
    rotated.write_text('{"trial_data": []}')  # back, never signed
    with pytest.raises(signing.ResumeRefused, match="experiment_state-2026-01-01.json: is not signed"):
        signing.verify(experiment)
    rotated.unlink()
    (trial / "params.pkl").write_bytes(pickle.dumps({"batch_size": 16}))
    with pytest.raises(signing.ResumeRefused, match="params.pkl: changed since"):
        signing.verify(experiment)


def test_a_pipe_or_link_where_ray_would_unpickle_is_refused_without_waiting(experiment, config_home, tmp_path):
    (experiment / "tuner.pkl").write_bytes(pickle.dumps({}))
    signing.Signer(experiment).sign()
    os.mkfifo(experiment / "callback-states-2026.pkl")  # reading it would wait for a writer
    with pytest.raises(signing.ResumeRefused, match="callback-states-2026.pkl: is not a regular file"):
        signing.verify(experiment)
    (experiment / "callback-states-2026.pkl").unlink()
    target = tmp_path / "elsewhere.pkl"
    target.write_bytes(pickle.dumps({}))
    (experiment / "searcher-state-2026.pkl").symlink_to(target)
    signing.Signer(experiment).sign()  # links are not signed
    with pytest.raises(signing.ResumeRefused, match="searcher-state-2026.pkl: is not a regular file"):
        signing.verify(experiment)


def test_a_readable_key_is_refused(experiment, config_home):
    (experiment / "tuner.pkl").write_bytes(b"x")
    signing.Signer(experiment).sign()
    (config_home / "hvae-ray" / signing.KEY_FILE).chmod(0o644)
    with pytest.raises(signing.ResumeRefused, match="readable by others"):
        signing.verify(experiment)


def test_resume_of_an_experiment_in_use_names_its_holder(experiment, config_home):
    (experiment / "tuner.pkl").write_bytes(pickle.dumps({}))
    signing.Signer(experiment).sign()
    code = ("import time; from hvae_ray.io_safe import acquire; "
            f"acquire({str(experiment)!r}, 'experiment'); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_line(_cli("sweep", "resume", str(experiment)))
        assert f"{experiment}: this experiment is in use by pid {holder.pid}" in line, line
    finally:
        holder.kill()
        holder.wait()


def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines)


def _memory_cap(limit: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def test_a_yaml_alias_bomb_in_a_sweep_is_refused_under_a_memory_cap(tmp_path, sweep_file):
    path = sweep_file(tmp_path / "bomb.yaml")
    raw = yaml.safe_dump(yaml.safe_load(path.read_text()), sort_keys=False).replace("name: bomb\n", "")
    path.write_text(_bomb() + "\nname: *a8\n" + raw)
    proc = _cli("sweep", "run", str(path), "--storage", str(tmp_path / "runs"), preexec_fn=_memory_cap(3 << 30))
    line = one_line(proc)
    assert "aliases expand it to over 1000000 values" in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["--set", "num_samples=1000000000"], "asks for 1000000000 trials"),
    (["--name", "../../escape"], "--name must be a plain folder name"),
    (["--name", ".hidden"], "must be a plain folder name"),
])
def test_sweep_inputs_refused_before_anything_is_written(overrides, expected, tmp_path, sweep_file, capsys):
    path = sweep_file(tmp_path / "a" / "b" / "s.yaml")
    storage = tmp_path / "a" / "b" / "runs"
    rc = main(["sweep", "run", str(path), "--storage", str(storage), *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not storage.exists() and not (tmp_path / "escape").exists()


def test_storage_that_is_a_file_is_refused_before_ray_starts(tmp_path, sweep_file):
    path = sweep_file(tmp_path / "s.yaml")
    blocker = tmp_path / "storage-file"
    blocker.write_text("a file")
    line = one_line(_cli("sweep", "run", str(path), "--storage", str(blocker)))
    assert f"storage '{blocker}': is a file; storage must be a folder" in line, line
    assert blocker.read_text() == "a file"
