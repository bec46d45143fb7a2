"""A sweep on a two-node Ray cluster places trials on both nodes.

The cluster (head + one worker node, each 2 logical CPUs and 1 logical GPU, all on this machine) is
made with ``ray.cluster_utils.Cluster`` in a child process, so it never meets the session's own Ray
instance. Each trial's worker takes a whole GPU, so one node holds one trial at a time and the four
trials, started together, must spread over both nodes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys

import ray
from ray.cluster_utils import Cluster

import hvae_ray
from hvae_ray.sweep.trainer import env_vars

sweep, storage = sys.argv[1:3]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
cluster.add_node(num_cpus=2, num_gpus=1)
cluster.wait_for_nodes()
try:
    ray.init(address=cluster.address, runtime_env={"env_vars": env_vars()}, log_to_driver=False)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    result = hvae_ray.run_sweep(sweep, storage=storage, name="two_nodes", address=cluster.address)
    table = hvae_ray.load_trials(result.experiment_dir)
    out = {"nodes": nodes, "errors": len(result.results.errors),
           "trials": table.select(["trial_id", "status", "epochs", "node_id"]).to_pylist()}
    print("RESULT " + json.dumps(out), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_trials_run_on_both_nodes(tmp_path, sweep_file, child_env):
    path = sweep_file(tmp_path / "two_nodes.yaml",
                      search_space={"learning_rate": {"grid": [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3]}},
                      scheduler={"max_t": 2, "grace_period": 2}, max_concurrent_trials=4,
                      resources={"num_workers": 1, "cpus_per_worker": 1, "gpu_fraction": 1.0})
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=420, env=child_env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-5000:])
    out = json.loads(lines[-1].removeprefix("RESULT "))

    assert len(out["nodes"]) == 2
    assert out["errors"] == 0
    trials = out["trials"]
    assert len(trials) == 4
    assert all(t["status"] == "completed" and t["epochs"] == 2 for t in trials), trials
    # every trial reports the node it trained on; together they used both nodes
    assert {t["node_id"] for t in trials} == set(out["nodes"])
