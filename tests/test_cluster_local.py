"""`ray up` of cluster-local.yaml for real, on this machine over SSH to 127.0.0.1.

Ray's own CLI does everything: `ray up -y` on a copy of cluster-local.yaml (Ray's `local` node
provider) logs in over SSH, copies the project, runs the file's setup (the virtualenv, Ray, PyTorch,
the project, the shared-directory environment) and starts the head with its autoscaler; `ray exec`
runs `hvae-ray sweep run --address auto` on the head; the trial table is read back here from the
shared directory; `ray down -y` stops the cluster. Afterwards no process of the cluster's login is
left.

The copy differs from the file only where this machine needs it: the head is 127.0.0.1 with no
workers, the login and key are the ones `.ci/run` made (``.ci/sshd-localhost``), the shared
directory is a fresh temporary one, and the head's ports are fixed ones outside the ranges that the
other tests' Ray instances use (6379, 8265, 10001, worker ports 10002-19999, and the kernel's
ephemeral range for the ports Ray picks at random). The cluster runs as its own login, not as root,
because `ray up`/`ray down` run `ray stop` on the head, which stops every Ray process that its user
may signal; Ray's temporary directory is that login's own (RAY_TMPDIR), so `--address auto` finds
this cluster and no other.

Skipped, with the reason, where no SSH server on 127.0.0.1 accepts that login and key.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_LOCAL = REPO_ROOT / "cluster-local.yaml"
SHARED_PLACEHOLDER = "/shared/hvae-ray"
HEAD_PORTS = ("--port=26379 --dashboard-host=127.0.0.1 --dashboard-port=28265 --node-ip-address=127.0.0.1"
              " --ray-client-server-port=20001 --object-manager-port=20076 --node-manager-port=20077"
              " --metrics-export-port=20078 --dashboard-agent-listen-port=20079"
              " --dashboard-agent-grpc-port=20080 --runtime-env-agent-port=20081"
              " --min-worker-port=20100 --max-worker-port=20299")
NODES_SCRIPT = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
                "print('NODES ' + json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress']} "
                "for n in ray.nodes() if n['Alive']]))")
# Added to the env file: Ray's and the other programs' temporary files in the login's home (so
# `--address auto` finds this cluster's address file and nothing goes to /tmp), and Ray's addresses
# on the loopback interface (Ray replaces 127.0.0.1 by the machine's outward address unless told this
# is a one-machine cluster).
CLUSTER_ENV = {"RAY_TMPDIR": "$HOME/.ray-tmp", "TMPDIR": "$HOME/.ray-tmp", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
SSH_OPTS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]


@pytest.fixture(scope="module")
def ssh_login() -> tuple[str, str]:
    user, key = os.environ.get("HVAE_RAY_TEST_SSH_USER"), os.environ.get("HVAE_RAY_TEST_SSH_KEY")
    if not user or not key:
        pytest.skip("no SSH server on 127.0.0.1 for a local-provider cluster: .ci/run starts one "
                    "(.ci/sshd-localhost) and sets HVAE_RAY_TEST_SSH_USER and HVAE_RAY_TEST_SSH_KEY")
    if shutil.which("ssh") is None or shutil.which("rsync") is None:
        pytest.skip("ssh or rsync is not installed, so `ray up` cannot reach 127.0.0.1")
    probe = subprocess.run(["ssh", "-i", key, *SSH_OPTS, f"{user}@127.0.0.1", "true"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"sshd on 127.0.0.1 does not let {user} in with {key}: {probe.stderr.strip()}")
    return user, key


def _local_copy(dest: Path, *, user: str, key: str, shared: Path, name: str) -> Path:
    """cluster-local.yaml pointed at this machine (see the module docstring), written to ``dest``."""
    text = CLUSTER_LOCAL.read_text()
    assert text.count(SHARED_PLACEHOLDER) == 1, "the shared directory is set in one place"
    config = yaml.safe_load(text.replace(SHARED_PLACEHOLDER, str(shared)))
    config["cluster_name"] = name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": user, "ssh_private_key": key}
    env_file = [i for i, c in enumerate(config["setup_commands"]) if c.endswith("> ~/.hvae-ray.env")]
    assert len(env_file) == 1
    i = env_file[0]
    config["setup_commands"][i] = config["setup_commands"][i].replace(
        "> ~/.hvae-ray.env", " ".join(f"'export {k}={v}'" for k, v in CLUSTER_ENV.items()) + " > ~/.hvae-ray.env")
    start = [i for i, c in enumerate(config["head_start_ray_commands"]) if "ray start --head" in c]
    assert len(start) == 1
    i = start[0]
    cmd = config["head_start_ray_commands"][i].replace("--port=6379", "").replace("--dashboard-host=0.0.0.0", "")
    config["head_start_ray_commands"][i] = f"{cmd} {HEAD_PORTS}"
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def _ray(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    ray = Path(sys.executable).with_name("ray")  # Ray's CLI of this environment, activated or not
    return subprocess.run([str(ray) if ray.exists() else "ray", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _exec(config: Path, command: str, *, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray exec`: ``command`` in a login shell on the head, over SSH."""
    return _ray("exec", "--no-config-cache", str(config), command, env=env, timeout=timeout)


def _user_processes(user: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["username"]):
        if p.info["username"] == user:
            out.append(p)
    return out


def _clean_launcher_files(user: str, cluster_name: str) -> None:
    """Ray's SSH connections share master connections that linger 10 s after use (ControlPersist):
    close this cluster's now and remove their directory; remove the config cache that `ray down`
    writes."""
    def h(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    control = Path("/tmp") / f"ray_ssh_{h(getpass.getuser())}" / h(cluster_name)
    for sock in control.glob("*"):
        subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={sock}", f"{user}@127.0.0.1"],
                       capture_output=True, timeout=30)
    shutil.rmtree(control, ignore_errors=True)
    try:
        control.parent.rmdir()  # only when no other cluster's connections are in it
    except OSError:
        pass
    for cache in Path(tempfile.gettempdir()).glob("ray-config-*"):
        try:
            if f'"cluster_name": "{cluster_name}"' in cache.read_text():
                cache.unlink()
        except OSError:
            pass


def test_ray_up_sweep_and_down_on_a_local_provider_cluster(ssh_login, tmp_path, child_env, sweep_file):
    user, key = ssh_login
    started = time.monotonic()
    name = f"hvae-ray-ci-{uuid.uuid4().hex[:8]}"
    # The shared directory: a fresh one that the cluster's login owns and this test reads.
    shared = Path(tempfile.mkdtemp(prefix="hvae-ray-shared-", dir="/tmp"))
    sweep = sweep_file(shared / "sweeps" / "on_cluster.yaml",
                       search_space={"learning_rate": {"grid": [1.0e-3, 2.0e-3]}},
                       scheduler={"max_t": 2, "grace_period": 2}, max_concurrent_trials=2,
                       resources={"num_workers": 1, "cpus_per_worker": 0.5, "gpu_fraction": 0})
    for path in [shared, *shared.rglob("*")]:
        shutil.chown(path, user, user)
    config = _local_copy(tmp_path / "cluster-local.yaml", user=user, key=key, shared=shared, name=name)
    # `ray up`'s own cluster state and lock files go under this test's directory.
    env = {**child_env, "RAY_TMPDIR": str(tmp_path / "ray-launcher"), "RAY_USAGE_STATS_ENABLED": "0"}
    timings = {}
    try:
        up = _ray("up", "-y", "--no-config-cache", str(config), env=env, timeout=900)
        timings["ray_up_s"] = round(time.monotonic() - started, 1)
        assert up.returncode == 0, (up.stdout[-6000:], up.stderr[-6000:])

        command = (f"cd ~/hvae-ray && hvae-ray sweep run {shlex.quote(str(sweep))} --name on_cluster"
                   ' --storage "$HVAE_RAY_STORAGE" --address auto')
        t0 = time.monotonic()
        run = _exec(config, command, env=env, timeout=900)
        timings["sweep_s"] = round(time.monotonic() - t0, 1)
        assert run.returncode == 0, (run.stdout[-6000:], run.stderr[-6000:])
        found = re.findall(r"^experiment: (\S+)$", run.stdout, flags=re.M)
        assert found, run.stdout[-4000:]
        experiment = Path(found[-1])
        # The sweep wrote into the shared directory, as the env file of cluster-local.yaml says.
        assert experiment == shared / "experiments" / "on_cluster"

        # Ray's autoscaler runs on the head with the local provider's node type, and the cluster is
        # the one node on 127.0.0.1 that `ray up` started.
        status = _exec(config, "ray status --address auto", env=env)
        assert status.returncode == 0 and "local.cluster.node" in status.stdout, (status.stdout[-4000:],
                                                                                   status.stderr[-4000:])
        nodes = _exec(config, f"python -c {shlex.quote(NODES_SCRIPT)}", env=env)
        found = re.findall(r"^NODES (.+)$", nodes.stdout, flags=re.M)
        assert nodes.returncode == 0 and found, (nodes.stdout[-4000:], nodes.stderr[-4000:])
        cluster_nodes = json.loads(found[-1])
        assert [n["ip"] for n in cluster_nodes] == ["127.0.0.1"], cluster_nodes

        from hvae_ray import load_trials

        table = load_trials(experiment)
        rows = table.select(["trial_id", "status", "epochs", "node_id", "trial_dir"]).to_pylist()
        assert len(rows) == 2, rows
        assert all(r["status"] == "completed" and r["epochs"] == 2 for r in rows), rows
        assert all(Path(r["trial_dir"]).is_relative_to(experiment) for r in rows), rows
        # Both trials trained on the cluster's node: the sweep joined it rather than starting Ray itself.
        assert {r["node_id"] for r in rows} == {cluster_nodes[0]["id"]}, (rows, cluster_nodes)
        # The jets were generated once into the shared cache, where trials read them.
        assert list((shared / "cache").rglob("*.parquet")), sorted(shared.rglob("*"))
    finally:
        t0 = time.monotonic()
        try:
            down = _ray("down", "-y", str(config), env=env, timeout=600)
        except subprocess.TimeoutExpired as exc:
            down = subprocess.CompletedProcess(exc.cmd, 124, str(exc.stdout), str(exc.stderr))
        timings["ray_down_s"] = round(time.monotonic() - t0, 1)
        _clean_launcher_files(user, name)
        deadline = time.monotonic() + 60
        while _user_processes(user) and time.monotonic() < deadline:
            time.sleep(1)
        left = _user_processes(user)
        left_desc = []
        for p in left:
            try:
                left_desc.append((p.pid, " ".join(p.cmdline()[:4])))
            except psutil.Error:
                pass
        for p in left:  # never leave the cluster running, even when `ray down` failed
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(shared, ignore_errors=True)
        timings["total_s"] = round(time.monotonic() - started, 1)
        print("cluster-local timings: " + json.dumps(timings))
    assert down.returncode == 0, (down.stdout[-4000:], down.stderr[-4000:])
    assert not left_desc, f"processes of {user} left after `ray down`: {left_desc}"
