"""The local Ray instance a sweep starts: a failure to start or connect is one line, the instance is
private to its user and authenticated, nothing of it outlives a driver killed with SIGKILL, and the
staging folder signing reads is where Ray puts it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hvae_ray.cli import main
from hvae_ray.errors import RayUnavailable
from hvae_ray.sweep import local as local_ray
from hvae_ray.sweep.tune import ray_init


@pytest.fixture
def no_ray(monkeypatch):
    """Ray not initialised in this process for the test (whatever an earlier test left)."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(local_ray.Reaper, "current", None)  # an instance of this session's keeps its reaper
    return ray


def test_a_local_instance_that_fails_to_start_is_one_line(no_ray, monkeypatch, tmp_path, sweep_file, capsys):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))

    def timed_out(**kw):
        raise Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.\n  more detail")

    monkeypatch.setattr(no_ray, "init", timed_out)
    code = main(["sweep", "run", str(sweep_file(tmp_path / "s.yaml")), "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("hvae-ray")] == [
        "hvae-ray: error: the local Ray instance failed to start: The current node timed out during startup. This "
        "could happen because some of the raylet failed to startup or the GCS has become overloaded."], err
    assert local_ray.Reaper.current is None  # the failed instance's reaper was let go


def test_an_unusable_temporary_folder_is_one_line_before_ray_starts(no_ray, monkeypatch, tmp_path):
    monkeypatch.setattr(no_ray, "init", lambda **kw: pytest.fail("Ray started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("RAY_TMPDIR", str(blocker))
    with pytest.raises(RayUnavailable, match="cannot make the local Ray instance.s temporary folder"):
        ray_init(None)
    # a link (or another user's folder) planted where the private folder goes is refused, not used
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / f"hvae-ray-{os.getuid()}").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(RayUnavailable, match="is not a folder of yours"):
        ray_init(None)
    assert blocker.read_text() == "x"


def test_a_local_instance_without_authentication_is_refused(no_ray, monkeypatch, tmp_path):
    monkeypatch.setattr(no_ray, "init", lambda **kw: pytest.fail("Ray started"))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(RayUnavailable, match="RAY_AUTH_MODE='disabled' would start the local Ray instance "
                                             "without token authentication"):
        ray_init(None)


def test_the_token_file_is_made_private(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    local_ray.require_token_auth()
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    assert len(token.read_text()) == 64
    # one that Ray (or anyone) left readable by all is set to 0600, its token kept
    token.chmod(0o644)
    before = token.read_text()
    local_ray.require_token_auth()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == before


def test_a_wrong_cluster_address_is_one_line(no_ray, monkeypatch):
    monkeypatch.setattr(no_ray, "init", lambda **kw: (_ for _ in ()).throw(
        ConnectionError("Could not find any running Ray instance. Please specify the one to connect to")))
    with pytest.raises(RayUnavailable, match=r"^cannot connect to the Ray cluster at '10.0.0.1:6379': Could not "
                                             r"find any running Ray instance"):
        ray_init("10.0.0.1:6379")


@pytest.mark.slow
def test_the_local_instance_is_private_and_authenticated(ray_local):
    import ray

    ctx = ray.get_runtime_context()
    temp = Path(ctx.get_temp_dir())
    root = temp.parent
    assert root.name == f"hvae-ray-{os.getuid()}" and temp.name == "ray"
    st = os.lstat(root)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    session = temp / ctx.get_session_name()
    assert session.is_dir() and (session / "sockets").is_dir()  # Ray's files live under the private folder
    assert os.environ.get("RAY_AUTH_MODE") == "token"  # Ray 2.60 turned token authentication on
    if not os.environ.get("RAY_AUTH_TOKEN"):
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        assert stat.S_IMODE(token.stat().st_mode) & 0o077 == 0


@pytest.mark.slow
def test_connected_elsewhere_an_address_is_refused(ray_local):
    import ray

    connected = ray.get_runtime_context().gcs_address
    assert ray_init(connected) is None  # the cluster this process is connected to
    with pytest.raises(RayUnavailable, match=f"already connected to the Ray cluster at {connected}; it cannot "
                                             "also use the cluster at '127.0.0.1:1'"):
        ray_init("127.0.0.1:1")


@pytest.mark.slow
def test_signing_finds_ray_s_staging_folder(ray_local):
    """Signing reads Tune's staging folder from Ray's public runtime context; Ray's own (private) function
    for it must agree, or a Ray upgrade moved it and staged state would go unsigned."""
    from ray.train import constants

    from hvae_ray.sweep.signing import session_artifacts_dir

    assert session_artifacts_dir() == Path(constants._get_ray_train_session_dir())


def _instance_marker(proc: psutil.Process) -> bytes | None:
    """The marker of the Ray instance ``proc`` started, read from its GCS server's environment."""
    for child in proc.children(recursive=True):
        try:
            if "gcs_server" in child.name():
                for entry in Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0"):
                    if entry.startswith(local_ray.MARKER.encode() + b"="):
                        return entry + b"\0"
        except (psutil.Error, OSError):
            continue
    return None


def _alive(pids: dict[int, float], marker: bytes) -> list[str]:
    """Processes of the instance still running (not zombies): the ones recorded and the marked ones."""
    out = []
    for proc in psutil.process_iter(["pid", "name", "status", "create_time"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            ours = pids.get(proc.pid) == proc.info["create_time"]
            if not ours and proc.uids().real == os.getuid():
                ours = marker in Path(f"/proc/{proc.pid}/environ").read_bytes()
            if ours:
                out.append(f"{proc.pid} {proc.info['name']}")
        except (psutil.Error, OSError):
            continue
    return out


@pytest.mark.slow
def test_no_ray_process_outlives_a_killed_driver(tmp_path, sweep_file, child_env):
    """`sweep run` killed with SIGKILL while its trials train: within 20 s nothing of its Ray instance
    runs (GCS, raylet, dashboard and its modules, agents, workers)."""
    path = sweep_file(tmp_path / "s.yaml", num_samples=2, config={"epochs": 2000},
                      scheduler={"max_t": 2000, "grace_period": 1000},
                      search_space={"learning_rate": {"loguniform": [1e-4, 1e-3]}})
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "hvae_ray.cli", "sweep", "run", str(path), "--storage",
                                   str(tmp_path / "runs"), "--name", "killed"], env=child_env,
                                  stdout=subprocess.DEVNULL, stderr=out)
    proc = psutil.Process(driver.pid)
    try:
        deadline, marker, tree = time.monotonic() + 400, None, {}
        while time.monotonic() < deadline and driver.poll() is None:
            marker = marker or _instance_marker(proc)
            tree.update({p.pid: p.create_time() for p in proc.children(recursive=True) if p.is_running()})
            names = {p.name() for p in proc.children(recursive=True) if p.is_running()}
            trials = {n for n in names if n.startswith("ray::")} - {"ray::DashboardAgent", "ray::RuntimeEnvAgent",
                                                                    "ray::IDLE"}
            if marker and "ray::DashboardAgent" in names and trials:  # the trials train
                break
            time.sleep(1)
        else:
            pytest.fail(f"the sweep's trials did not start: {log.read_text()[-3000:]}")
        time.sleep(2)
        tree.update({p.pid: p.create_time() for p in proc.children(recursive=True) if p.is_running()})
        assert len(_alive(tree, marker)) > 5
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    gone_by = time.monotonic() + 20
    while (left := _alive(tree, marker)) and time.monotonic() < gone_by:
        time.sleep(0.5)
    assert not left, f"still running 20 s after the driver was killed: {left}"


class _Marker:
    """Unpickling it creates a file: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def signed_experiment(tmp_path, sweep_file, monkeypatch) -> Path:
    """An experiment with its sweep state and a signed (harmless) ``tuner.pkl``, signed with a key of this
    test's own."""
    import json
    import pickle

    from hvae_ray.sweep.layout import SWEEP_FILE
    from hvae_ray.sweep.signing import Signer
    from hvae_ray.sweep.spec import load_sweep
    from hvae_ray.sweep.tune import _prepare

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    spec = load_sweep(sweep_file(tmp_path / "s.yaml"))
    exp = tmp_path / "runs" / "s"
    exp.mkdir(parents=True)
    (exp / SWEEP_FILE).write_text(json.dumps(_prepare(spec, "s", str(exp.parent)).to_dict(), default=str))
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"harmless": True}))
    Signer(exp).sign()
    return exp


def test_ray_reads_the_verified_bytes_not_the_file_again(signed_experiment, tmp_path):
    """The storage file system a resume hands Ray: the verified bytes of a file swapped after the check,
    nothing of an unsigned file that appeared after it, Tune's own writes read back as written, and
    everything else the local file system's."""
    import pickle

    import pyarrow.fs

    from hvae_ray.sweep.signing import VerifiedFiles, verify

    exp = signed_experiment
    verified = verify(exp)
    original = (exp / "tuner.pkl").read_bytes()
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_Marker(tmp_path / "marker")))
    (exp / "experiment_state-2099.json").write_text("{}")  # planted after the check
    fs = VerifiedFiles(exp, verified).filesystem()
    with fs.open_input_file(str(exp / "tuner.pkl")) as f:
        assert f.readall() == original
    with fs.open_input_stream(str(exp / "tuner.pkl")) as f:
        assert f.readall() == original
    listed = {Path(i.path).name for i in fs.get_file_info(pyarrow.fs.FileSelector(str(exp)))}
    assert "tuner.pkl" in listed and "experiment_state-2099.json" not in listed
    assert fs.get_file_info(str(exp / "experiment_state-2099.json")).type == pyarrow.fs.FileType.NotFound
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(str(exp / "experiment_state-2099.json"))
    # what Tune writes during the run: written (atomically) and read back as written, even if swapped after
    with fs.open_output_stream(str(exp / "experiment_state-2100.json")) as out:
        out.write(b'{"ours": 1}')
    assert (exp / "experiment_state-2100.json").read_bytes() == b'{"ours": 1}'
    (exp / "experiment_state-2100.json").write_text("swapped")
    with fs.open_input_stream(str(exp / "experiment_state-2100.json")) as f:
        assert f.readall() == b'{"ours": 1}'
    # other files are the local file system's, both ways
    fs.create_dir(str(exp / "trial_x"))
    with fs.open_output_stream(str(exp / "trial_x" / "result.json")) as out:
        out.write(b"{}")
    assert (exp / "trial_x" / "result.json").read_bytes() == b"{}"
    # sent to a trial's process, it is the plain local file system
    plain = pickle.loads(pickle.dumps(fs))
    with plain.open_input_stream(str(exp / "tuner.pkl")) as f:
        assert f.readall() == (exp / "tuner.pkl").read_bytes()
    assert not (tmp_path / "marker").exists()


def test_a_file_swapped_between_the_check_and_ray_s_read_runs_no_code(signed_experiment, tmp_path, monkeypatch):
    """`resume_sweep`: the signed tuner.pkl verifies, then a crafted one replaces it before Ray reads it.
    Ray gets the verified bytes: the crafted pickle is never loaded."""
    import pickle

    from hvae_ray.sweep import tune

    exp, marker = signed_experiment, tmp_path / "marker"
    checked = tune.verify

    def verify_then_swap(path):
        verified = checked(path)
        (Path(path) / "tuner.pkl").write_bytes(pickle.dumps(_Marker(marker)))
        return verified

    monkeypatch.setattr(tune, "verify", verify_then_swap)
    monkeypatch.setattr(tune, "ray_init", lambda address, **kw: None)
    with pytest.raises(Exception):  # noqa: B017 - the harmless pickle is no Tuner state: Ray refuses it
        tune.resume_sweep(exp)
    assert not marker.exists()


@pytest.mark.slow
def test_a_sweep_resumes_through_the_verified_files(ray_local, tmp_path, sweep_file):
    """A real sweep, then its resume: Tune restores its Tuner, experiment, search and callback states
    through the verified files, keeps its finished trials, and what it saves verifies again."""
    from hvae_ray.sweep.signing import verify
    from hvae_ray.sweep.trials import load_trials
    from hvae_ray.sweep.tune import resume_sweep, run_sweep

    path = sweep_file(tmp_path / "s.yaml", num_samples=2, config={"epochs": 1},
                      search_space={"learning_rate": {"loguniform": [1e-4, 1e-3]}},
                      scheduler={"max_t": 1, "grace_period": 1})
    first = run_sweep(path, storage=str(tmp_path / "runs"), name="again")
    before = {r["trial_id"]: r["status"] for r in load_trials(first.experiment_dir).to_pylist()}
    assert sorted(before.values()) == ["completed", "completed"]
    again = resume_sweep(first.experiment_dir)
    assert not again.results.errors and len(again.results) == 2
    assert {r["trial_id"]: r["status"] for r in load_trials(again.experiment_dir).to_pylist()} == before
    verify(again.experiment_dir)
