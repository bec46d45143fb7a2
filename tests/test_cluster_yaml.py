"""Checks of the cluster launcher configs at the repository root: cluster.yaml (AWS) and
cluster-local.yaml (Ray's local provider, machines reached over SSH).

Runs Ray's own config preparation and schema validation, the steps `ray up` takes before it talks to
AWS or to the machines, so these tests need neither cloud credentials nor network access (they fail
if anything tries). tests/test_cluster_local.py brings cluster-local.yaml up for real.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import click
import jsonschema
import pytest
import yaml

from hvae_ray.sweep.ray_internals import cluster_config_checks

prepare_config, validate_config = cluster_config_checks()

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
CLUSTER_LOCAL_YAML = REPO_ROOT / "cluster-local.yaml"

# EC2 families whose instances carry NVIDIA GPUs.
GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p4d", "p4de", "p5", "p5e", "p5en")
# The shared filesystem (EFS over NFS) that every node mounts at the same path.
SHARED_MOUNT = "/mnt/hvae-shared"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster.yaml checks must stay offline, got a connection to {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def raw_config() -> dict:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


@pytest.fixture
def config(raw_config) -> dict:
    return copy.deepcopy(raw_config)


@pytest.fixture
def prepared(config) -> dict:
    """The config as `ray up` sees it: defaults filled in, setup commands merged per node kind."""
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def _instance_family(instance_type: str) -> str:
    return instance_type.split(".", 1)[0]


def _worker_types(prepared: dict) -> dict:
    head = prepared["head_node_type"]
    return {name: t for name, t in prepared["available_node_types"].items() if name != head}


def _exported(commands: list[str], var: str) -> str:
    found = [m for cmd in commands for m in re.findall(rf"export {var}=(\S+?)'?(?:\s|$)", cmd)]
    assert len(found) == 1, f"expected exactly one {var} export, found {found}"
    return found[0]


def _storage_uri(commands: list[str]) -> str:
    return _exported(commands, "HVAE_RAY_STORAGE")


def _node_commands(prepared: dict) -> dict[str, list[str]]:
    """Per node type, the commands `ray up` (head) or the autoscaler (workers) runs before Ray starts:
    initialization_commands (a node type's own list replaces the global one), then setup commands."""
    head = prepared["head_node_type"]
    out = {head: [*prepared["initialization_commands"], *prepared["head_setup_commands"]]}
    for name, t in _worker_types(prepared).items():
        init = t.get("initialization_commands", prepared["initialization_commands"])
        setup = t.get("worker_setup_commands", prepared["worker_setup_commands"])
        out[name] = [*init, *setup]
    return out


def _mount_index(commands: list[str]) -> int:
    """Index of the command that mounts the shared filesystem (NFS v4.1) at SHARED_MOUNT."""
    pattern = re.compile(r"sudo mount -t nfs4 -o (\S+)\s+\S+:/\s+" + re.escape(SHARED_MOUNT) + r"(?:[\s;]|$)")
    hits = [(i, m) for i, c in enumerate(commands) for m in [pattern.search(c)] if m]
    assert len(hits) == 1, f"expected one NFS mount of {SHARED_MOUNT}, found {len(hits)}"
    i, m = hits[0]
    assert "nfsvers=4.1" in m.group(1).split(","), m.group(1)
    # Idempotent: a second `ray up` skips the mount when it is already there.
    assert re.search(rf"mountpoint -q {re.escape(SHARED_MOUNT)}\s*\|\|", commands[i]), commands[i]
    return i


def test_ray_validator_accepts_cluster_yaml(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"


def test_head_is_cpu_only_and_runs_the_dashboard(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert _instance_family(head["node_config"]["InstanceType"]) not in GPU_FAMILIES
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0
    start = " ".join(prepared["head_start_ray_commands"])
    assert "ray start --head" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    # Ray Train V2 needs the dashboard.
    assert "--include-dashboard=false" not in start
    assert "--include-dashboard=true" in start


def test_gpu_workers_autoscale_from_zero(prepared):
    workers = _worker_types(prepared)
    assert workers, "no worker node type"
    gpu_workers = {
        name: t
        for name, t in workers.items()
        if t["resources"].get("GPU", 0) >= 1
        or (not t["resources"] and _instance_family(t["node_config"]["InstanceType"]) in GPU_FAMILIES)
    }
    assert gpu_workers, f"no worker type declares or auto-detects GPUs: {workers}"
    for t in gpu_workers.values():
        assert t["min_workers"] == 0
        assert 1 <= t["max_workers"] <= prepared["max_workers"]


def test_setup_installs_torch_then_this_project_on_every_node(prepared):
    for kind in ("head_setup_commands", "worker_setup_commands"):
        cmds = prepared[kind]
        project = [i for i, c in enumerate(cmds) if re.search(r"pip install (-e )?~/hvae-ray\b", c)]
        torch = [i for i, c in enumerate(cmds) if "pip install" in c and "torch==" in c]
        assert project, f"{kind} never installs the project"
        assert torch, f"{kind} never installs torch"
        # torch first, so installing the project does not pull a different torch build.
        assert max(torch) < min(project), kind


def test_file_mounts_carry_sources_and_sweeps(prepared):
    mounts = {remote.rstrip("/"): local for remote, local in prepared["file_mounts"].items()}
    # `ray up` runs from the repository root and stops on a mount whose source is missing.
    for local in mounts.values():
        assert (REPO_ROOT / local).exists(), f"file_mounts source {local} does not exist"
    # The project source, for `pip install -e ~/hvae-ray`.
    assert (REPO_ROOT / mounts["~/hvae-ray"]).resolve() == REPO_ROOT
    # The sweep files, where `hvae-ray sweep run sweeps/<name>.yaml` looks from ~/hvae-ray.
    assert "~/hvae-ray/sweeps" in mounts, "sweeps/ is not mounted to ~/hvae-ray/sweeps"
    assert (REPO_ROOT / mounts["~/hvae-ray/sweeps"]).resolve() == REPO_ROOT / "sweeps"
    # Local results and data stay on the local machine.
    assert ".gitignore" in prepared["rsync_filter"]


def test_storage_is_shared_and_exported_on_all_nodes(prepared):
    # hvae-ray writes hvae_sweep.json and the trials' TensorBoard events with plain file writes, and
    # `trials`/`sweep resume`/TensorBoard read a filesystem path: storage is a path on a filesystem
    # that every node mounts at the same place, not a URI.
    uri = _storage_uri(prepared["setup_commands"])
    assert "://" not in uri, uri
    assert Path(uri).is_absolute() and Path(uri).is_relative_to(SHARED_MOUNT) and uri != SHARED_MOUNT, uri
    # The export lives in the common setup commands, so both head and workers get it.
    assert _storage_uri(prepared["head_setup_commands"]) == uri
    assert _storage_uri(prepared["worker_setup_commands"]) == uri


def test_every_node_mounts_the_shared_filesystem_before_using_it(prepared):
    for name, cmds in _node_commands(prepared).items():
        mount = _mount_index(cmds)
        # Mounted before anything writes the environment that points into it.
        export = next(i for i, c in enumerate(cmds) if "export HVAE_RAY_STORAGE=" in c)
        assert mount < export, name
        # The login user (who runs Ray) owns the mount point.
        chown = re.compile(rf"sudo chown .+ {re.escape(SHARED_MOUNT)}\s*$")
        assert any(chown.search(c) for c in cmds[mount + 1:]), name


@pytest.mark.parametrize("where", ["global", "worker_override"])
def test_mount_check_catches_a_node_without_the_mount(config, where):
    if where == "global":
        init = config["initialization_commands"]
        config["initialization_commands"] = [c for c in init if "mount -t" not in c]
    else:  # a worker type's own initialization_commands replace the global ones
        config["available_node_types"]["worker.gpu"]["initialization_commands"] = ["true"]
    prepared = prepare_config(config)
    validate_config(prepared)
    with pytest.raises(AssertionError, match="NFS mount"):
        test_every_node_mounts_the_shared_filesystem_before_using_it(prepared)


def test_generated_data_cache_is_on_the_shared_filesystem(prepared):
    # The head generates the default jet sample and trials on the workers read that same path.
    cache = _exported(prepared["setup_commands"], "HVAE_RAY_CACHE")
    assert Path(cache).is_relative_to(SHARED_MOUNT), cache


def test_ray_processes_get_the_cluster_environment(prepared):
    setup = " ".join(prepared["setup_commands"])
    env_file = "~/.hvae-ray.env"
    assert "export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.05" in setup
    assert f"> {env_file}" in setup
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in prepared[kind] if "ray start" in c)
        assert start.index(f"source {env_file}") < start.index("ray start"), kind


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("max_worker",), 4),  # misspelt top-level key
        (("idle_timeout_minute",), 10),  # misspelt top-level key
        (("max_workers",), "4"),  # wrong type
        (("available_node_types", "worker.gpu", "min_worker"), 0),  # misspelt node type key
        (("available_node_types", "worker.gpu", "resources"), {"GPU": "1"}),  # wrong type
    ],
)
def test_validator_rejects_broken_copies(config, path, value):
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_validator_rejects_unknown_head_node_type(config):
    config["head_node_type"] = "head.missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(config))


def _yaml_lines(path: Path) -> str:
    """The file without its comments."""
    return "\n".join(line.split(" #", 1)[0] for line in path.read_text().splitlines()
                     if not line.lstrip().startswith("#"))


def test_aws_needs_only_the_region_and_the_file_system_id(prepared):
    text = _yaml_lines(CLUSTER_YAML)
    # The EFS id is the only placeholder left in the settings ...
    assert re.findall(r"\S*CHANGE-ME\S*", text) == ["fs-CHANGE-ME.efs.$region.amazonaws.com:/"]
    # ... and the region is written once: the EFS name takes the node's own region, and the image is
    # found in whichever region the nodes launch.
    regions = re.findall(r"\b(?:us|eu|ap|sa|ca|me|af|il|mx)-[a-z]+-\d[a-z]?\b", text)
    assert regions == ["us-west-2"], regions
    assert "availability_zone" not in prepared["provider"]
    images = {t["node_config"]["ImageId"] for t in prepared["available_node_types"].values()}
    assert len(images) == 1 and next(iter(images)).startswith("resolve:ssm:/aws/service/"), images


@pytest.fixture
def prepared_local() -> dict:
    with CLUSTER_LOCAL_YAML.open() as f:
        prepared = prepare_config(yaml.safe_load(f))
    validate_config(prepared)
    return prepared


def test_ray_validator_accepts_cluster_local_yaml(prepared_local):
    provider = prepared_local["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and provider["worker_ips"]
    assert prepared_local["auth"]["ssh_user"] and prepared_local["auth"]["ssh_private_key"]
    # Ray keeps every listed machine in the cluster (no on-demand start with this provider).
    node_type = prepared_local["available_node_types"][prepared_local["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(provider["worker_ips"])


def test_cluster_local_sets_up_nodes_like_the_aws_file(prepared_local, prepared):
    setup = prepared_local["setup_commands"]
    project = [i for i, c in enumerate(setup) if re.search(r"pip install -e ~/hvae-ray\b", c)]
    torch = [i for i, c in enumerate(setup) if "pip install" in c and "torch==" in c]
    venv = [i for i, c in enumerate(setup) if "-m venv ~/hvae-venv" in c]
    assert venv and torch and project and venv[0] < max(torch) < min(project), setup
    # The same Ray and the same project source as the AWS file.
    ray_pin = [re.search(r"ray\[[^]]*\]==[\d.]+", c).group() for c in setup if "pip install \"ray[" in c]
    aws_pin = [re.search(r"ray\[[^]]*\]==[\d.]+", c).group() for c in prepared["setup_commands"]
               if "pip install \"ray[" in c]
    assert ray_pin and ray_pin == aws_pin
    mounts = {remote.rstrip("/"): local for remote, local in prepared_local["file_mounts"].items()}
    assert (REPO_ROOT / mounts["~/hvae-ray"]).resolve() == REPO_ROOT
    assert (REPO_ROOT / mounts["~/hvae-ray/sweeps"]).resolve() == REPO_ROOT / "sweeps"
    assert ".gitignore" in prepared_local["rsync_filter"]


def test_cluster_local_storage_and_cache_are_on_the_shared_directory(prepared_local):
    setup = prepared_local["setup_commands"]
    shared = _exported(setup, "HVAE_RAY_SHARED")
    assert Path(shared).is_absolute(), shared
    assert _exported(setup, "HVAE_RAY_STORAGE") == "$HVAE_RAY_SHARED/experiments"
    assert _exported(setup, "HVAE_RAY_CACHE") == "$HVAE_RAY_SHARED/cache"
    # A machine without the shared directory stops the setup before anything is written to it.
    check = next(i for i, c in enumerate(setup) if 'test -d "$HVAE_RAY_SHARED"' in c)
    assert "exit 1" in setup[check]
    first_write = next(i for i, c in enumerate(setup) if "mkdir -p \"$HVAE_RAY_STORAGE\"" in c)
    assert check < first_write
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in prepared_local[kind] if "ray start" in c)
        assert start.index("source ~/.hvae-ray.env") < start.index("ray start"), kind
    head = next(c for c in prepared_local["head_start_ray_commands"] if "ray start" in c)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head and "--include-dashboard=true" in head
    # Ray's token authentication, with one token on the share that the head makes before Ray starts.
    assert _exported(setup, "RAY_AUTH_MODE") == "token"
    assert _exported(setup, "RAY_AUTH_TOKEN_PATH").startswith("$HVAE_RAY_SHARED/")
    assert any('> "$RAY_AUTH_TOKEN_PATH"' in c and "umask 077" in c for c in prepared_local["head_setup_commands"])


def _misspell_worker_ips(config: dict) -> None:
    config["provider"]["worker_ip"] = config["provider"].pop("worker_ips")


def _add_head_node(config: dict) -> None:
    config["head_node"] = {"InstanceType": "m5.xlarge"}


@pytest.mark.parametrize(
    ("breaks", "match"),
    [
        (_misspell_worker_ips, "worker_ips"),  # the machines are not named: Ray refuses to start
        (_add_head_node, "not supported for on-premise clusters"),  # a cloud-only field
    ],
)
def test_validator_rejects_broken_local_copies(breaks, match):
    with CLUSTER_LOCAL_YAML.open() as f:
        config = yaml.safe_load(f)
    breaks(config)
    with pytest.raises(click.ClickException, match=match):
        validate_config(prepare_config(config))
