"""End to end: real sweeps on the session's local Ray instance (4 logical CPUs, 1 logical GPU).

One 8-trial ASHA sweep at a quarter GPU per trial is shared by the checks of scheduling, TensorBoard
output, the trial table, its exports and the CLI; a two-trial sweep checks diverged trials; one sweep,
its driver a separate process stopped in each way in turn (killed, Ctrl+C, Ctrl+C twice, SIGTERM) and
resumed after each, checks stopping and resume.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

import hvae_ray
from hvae_ray.cli import main as cli_main
from hvae_ray.config import COMPONENTS, from_dict
from hvae_ray.sweep import trials
from hvae_ray.sweep.layout import SWEEP_FILE

pytestmark = pytest.mark.slow

MAX_T = 3
SEARCHED = ("learning_rate", "kl_max_weight")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


class ListenerWatch:
    """Polls the listening sockets of this process and all its descendants (the local instance's GCS,
    raylet, agents and workers) every ``interval`` seconds while a sweep runs. Servers listen for their
    process's lifetime (tens of seconds for a trial's workers), so a second between polls sees them all.
    A poll reads the host's TCP socket table once and keeps the listeners owned by the process tree
    (about 0.04 s of CPU); asking each of the some thirty processes for its own connections parses the
    whole table once per process (about 0.5 s of CPU a poll, on the driver, whose GIL Tune's loop
    shares), which slowed the 8-trial sweep on a 2-core machine by minutes."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.seen = interval, {}  # (process name, ip, port) -> count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            tree = {proc.pid: proc for proc in [me, *me.children(recursive=True)]}
            for pid, ip, port in self._listeners(tree):
                try:
                    name = tree[pid].name()  # gcs_server, raylet, ray::<actor or task>, python3 (driver, agents)
                except psutil.Error:
                    continue  # a worker that ended between the listing and the look
                key = (name, ip, port)
                self.seen[key] = self.seen.get(key, 0) + 1
            self._stop.wait(self.interval)

    @staticmethod
    def _listeners(tree: dict[int, psutil.Process]):
        """(pid, ip, port) of every TCP socket in LISTEN that a process of ``tree`` holds (only TCP
        sockets listen; UDP ones have no state)."""
        try:
            conns = [(c.pid, c) for c in psutil.net_connections(kind="tcp") if c.pid in tree]
        except psutil.AccessDenied:  # where the host's table needs root (macOS): each process's own
            conns = []
            for pid, proc in tree.items():
                try:
                    conns += [(pid, c) for c in proc.net_connections(kind="tcp")]
                except psutil.Error:
                    pass
        return [(pid, c.laddr.ip, c.laddr.port) for pid, c in conns if c.status == psutil.CONN_LISTEN]

    @staticmethod
    def is_loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback


@pytest.fixture(scope="module", params=["off", "auto"], ids=["processes", "population"])
def asha8(request, ray_local, tmp_path_factory, sweep_file):
    """8 trials, 4 at a time, each worker holding 0.25 GPU and 0.5 CPU, or (``population: auto``) as
    members of one population; ASHA with rungs at 1 and 2 epochs (max_t 3), so trials below the running
    median at a rung stop early. Every test of it runs in both modes.

    The learning-rate grid makes that certain: trials start in grid order, and the second four (tiny
    learning rates, val_objective ~4.44 after one epoch against ~4.25) start only once a slot frees,
    i.e. after first-wave trials have passed the first rung; they rank below the median there."""
    root = tmp_path_factory.mktemp("asha8")
    path = sweep_file(
        root / "asha8.yaml",
        search_space={"learning_rate": {"grid": [1.0e-2, 6.0e-3, 4.0e-3, 3.0e-3,
                                                 1.0e-4, 5.0e-5, 2.0e-5, 1.0e-5]},
                      "kl_max_weight": {"loguniform": [1.0e-4, 1.0e-2]}},
        scheduler={"metric": "val_objective", "mode": "min", "max_t": MAX_T, "grace_period": 1,
                   "reduction_factor": 2},
        num_samples=1, max_concurrent_trials=4,
        resources={"num_workers": 1, "cpus_per_worker": 0.5, "gpu_fraction": 0.25, "population": request.param},
    )
    t0 = time.perf_counter()
    with ListenerWatch() as listeners:
        result = hvae_ray.run_sweep(path, storage=str(root / "runs"), name="asha8")
    wall = time.perf_counter() - t0
    exp = result.experiment_dir
    return SimpleNamespace(root=root, exp=exp, result=result, table=hvae_ray.load_trials(exp), wall=wall,
                           listeners=listeners.seen, population=request.param != "off")


def test_a_local_sweep_listens_on_loopback_only(asha8):
    """Every socket the local instance's processes listen on while the 8-trial sweep runs (GCS, raylet,
    dashboard and its agent, runtime-env agent, metrics, the driver, every trial's workers) is bound to
    127.0.0.1: a sweep on a laptop in a café is not open to the network."""
    seen = asha8.listeners
    names = {name for name, _, _ in seen}
    assert len(seen) >= 8 and {"gcs_server", "raylet"} <= names, sorted(seen)
    assert any(name.startswith("ray::") for name in names), sorted(seen)  # trials' workers
    open_ = sorted((name, ip, port) for name, ip, port in seen if not ListenerWatch.is_loopback(ip))
    assert not open_, f"listening beyond loopback: {open_}"


def test_all_trials_finish_and_asha_stops_some(asha8):
    assert asha8.exp == asha8.root / "runs" / "asha8"
    table = asha8.table
    assert table.num_rows == 8
    statuses = table.column("status").to_pylist()
    assert set(statuses) <= {"completed", "early_stopped"}, statuses
    rows = table.to_pylist()
    stopped = [r for r in rows if r["status"] == "early_stopped"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert stopped and all(1 <= r["epochs"] < MAX_T for r in stopped)
    assert completed and all(r["epochs"] == MAX_T for r in completed)
    # Tune agrees: every trial terminated, none errored.
    grid = asha8.result.results
    assert len(grid) == 8 and not grid.errors
    assert asha8.result.summary() == ", ".join(
        f"{n} {s}" for s, n in sorted({s: statuses.count(s) for s in statuses}.items()))


def test_each_trial_worker_held_a_quarter_gpu(asha8, ray_local):
    if asha8.population:
        pytest.skip("a population's trials hold no GPU share of their own (its executor holds the GPU)")
    state = json.loads((asha8.exp / "hvae_sweep.json").read_text())
    assert state["gpu_share"] == 0.25
    from ray.util.state import list_actors

    workers = list_actors(address=f"http://{ray_local.dashboard_url}", detail=True, limit=10_000,
                          filters=[("class_name", "=", "RayTrainWorker")], raise_on_missing_output=False)
    # inside a placement group, a request shows as {'GPU_group_<pg>': 0.25, 'CPU_group_<pg>': 0.5, ...}
    def held(actor, kind):
        return {v for k, v in (actor.required_resources or {}).items() if k.startswith(f"{kind}_group_")}

    ours = [a for a in workers if held(a, "GPU") == {0.25}]
    # one Ray Train worker per trial (more only if Ray restarted one), each with 0.25 GPU and 0.5 CPU
    assert len(ours) >= 8, [a.required_resources for a in workers]
    assert all(held(a, "CPU") == {0.5} for a in ours)


def test_tensorboard_tags_and_hparams(asha8):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hvae_ray.sweep.layout import read_sweep_state

    spec = read_sweep_state(asha8.exp).spec
    event_dirs = {p.parent for p in asha8.exp.rglob("events.out.tfevents.*")}
    assert event_dirs == {Path(r["trial_dir"]) for r in asha8.table.to_pylist()}  # one run each, named trial_<id>
    for row in asha8.table.to_pylist():
        tb_dir = Path(row["trial_dir"])
        assert list(tb_dir.glob("events.out.tfevents.*")), tb_dir
        acc = EventAccumulator(str(tb_dir))
        acc.Reload()
        scalars = set(acc.Tags()["scalars"])
        # the loss curves, KL and its weight, and one curve per loss component, train and val
        required = {"Loss/train_total", "Loss/train_kl", "KL/weight", "Loss/val_total", "Loss/val_kl",
                    *(f"Loss/{s}_{c}" for s in ("train", "val") for c in COMPONENTS)}
        missing = required - scalars
        assert not missing, (row["trial_id"], missing)
        # one scalar per epoch, from epoch 0; a trial that ASHA stopped may have logged the epochs it
        # finished while the stop was on its way, which Tune never received
        steps = [e.step for e in acc.Scalars("Loss/val_total")]
        assert steps == list(range(len(steps)))
        assert row["epochs"] <= len(steps) <= MAX_T
        hparams = acc.PluginTagToContent("hparams")
        assert set(hparams) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

        from hvae_ray.sweep.hparams import shown_hparams, trial_hparams
        from hvae_ray.tracking import SESSION_STATUS

        # the session, written when Tune started the trial: named by the trial id, the trial's values
        start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
        assert start.session_start_info.group_name == row["trial_id"]
        sampled = {key: row[f"param.{key}"] for key in SEARCHED}
        expected = shown_hparams(spec, trial_hparams(spec, sampled))
        logged = start.session_start_info.hparams
        assert set(logged) == set(expected)  # no outcome: the trial table's status column says it
        for key, value in expected.items():
            if isinstance(value, str):
                assert logged[key].string_value == value, key
            else:
                assert logged[key].number_value == pytest.approx(value), key
        # its end, written when Tune ended the trial: the status for the table's outcome
        assert row["status"] in ("completed", "early_stopped")
        end = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_end_info"])
        assert end.session_end_info.status == api_pb2.Status.Value(SESSION_STATUS[row["status"]])
        # one start and one end, each in the driver's file of its own, around the training's files
        names = sorted(p.name for p in tb_dir.glob("*tfevents*"))
        assert names[0].endswith(".hparams_start") and names[-1].endswith(".hparams_end"), names
        assert sum(n.endswith((".hparams_start", ".hparams_end")) for n in names) == 2, names
        # best-so-far metrics beside the last ones
        experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
        assert {"Lowest/val_objective", "Lowest/val_w1m", "Lowest/val_kl_at_best"} <= {m.name.tag for m in
                                                                               experiment.metric_infos}
        best = sorted(acc.Scalars("Lowest/val_objective"), key=lambda e: e.step)
        last = sorted(acc.Scalars("Loss/val_objective"), key=lambda e: e.step)
        assert best[-1].value == pytest.approx(min(e.value for e in last), rel=1e-6)
        assert best[-1].value <= row["best_val_objective"] * (1 + 1e-6)
    statuses = {r["status"] for r in asha8.table.to_pylist()}
    assert statuses == {"completed", "early_stopped"}  # both kinds of session status were checked


def test_trial_table_contents(asha8):
    table = asha8.table
    trial_dirs = sorted(p for p in asha8.exp.iterdir() if p.name.startswith("trial_"))
    assert sorted(table.column("trial_dir").to_pylist()) == [str(p) for p in trial_dirs]
    assert len(set(table.column("trial_id").to_pylist())) == 8
    for key in SEARCHED:
        assert table.schema.field(f"param.{key}").type == "double"
    for row in table.to_pylist():
        params = json.loads((Path(row["trial_dir"]) / "params.json").read_text())
        assert {k: row[f"param.{k}"] for k in SEARCHED} == params
        for m in ("val_objective", "val_recon", "val_kl", "val_w1m", "val_total", "train_total"):
            assert math.isfinite(row[f"best_{m}"]) and math.isfinite(row[f"last_{m}"])
        assert row["best_val_objective"] <= row["last_val_objective"]
        assert 0 <= row["best_epoch"] < row["epochs"] <= MAX_T
        assert row["wall_time_s"] > 0
        ckpt = Path(row["best_checkpoint"])
        # Ray Train's checkpoint of the best epoch Tune saw, or, where Ray Train dropped it (it keeps
        # the two best it received, which can include epochs trained while ASHA stopped the trial),
        # the engine's own best checkpoint of the trial
        assert ckpt.is_dir()
        engine_best = Path(row["trial_dir"]) / "engine" / "best"
        assert ckpt.parent == asha8.exp / "_train" / row["trial_id"] or ckpt == engine_best
        assert (ckpt / "checkpoint.pt").is_file()
        assert row["error"] is None
        assert row["node_id"] == ray_node_id()


def ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def test_table_exports_round_trip(asha8, tmp_path):
    table = asha8.table
    out = trials.export(table, tmp_path / "trials.parquet")
    back = pq.read_table(out)
    assert back.schema.equals(table.schema, check_metadata=True)
    assert back.equals(table, check_metadata=True)
    assert back.schema.metadata[b"format"] == b"hvae-ray trials v1"

    csv = trials.export(table, tmp_path / "trials.csv")
    read = pacsv.read_csv(csv)
    assert read.column_names == table.column_names
    assert read.num_rows == 8
    assert read.column("trial_id").to_pylist() == table.column("trial_id").to_pylist()
    assert read.column("epochs").to_pylist() == table.column("epochs").to_pylist()


def _table_ids(output: str) -> list[str]:
    lines = output.strip().splitlines()
    assert lines[0].split()[:2] == ["trial_id", "status"]
    return [ln.split()[0] for ln in lines[2:]]


def test_cli_best_config_is_the_best_trials(asha8):
    exe = Path(sys.executable).with_name("hvae-ray")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "hvae_ray.cli"]
    out = subprocess.run([*cmd, "trials", str(asha8.exp), "--best"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    best = min(asha8.table.to_pylist(), key=lambda r: r["best_val_objective"])
    assert out.stdout.startswith(f"# best trial {best['trial_id']} ")
    cfg = from_dict(yaml.safe_load(out.stdout), "best config")
    for key in SEARCHED:
        assert cfg.flat()[key] == best[f"param.{key}"]
    assert cfg.model.hidden_dim == 16 and cfg.epochs == MAX_T
    from hvae_ray.data.generate import default_sample

    # the YAML carries the sweep's jets (here its generated sample), which `train --config` then reads
    assert Path(cfg.data.path).samefile(default_sample("q", 60, 0))  # conftest's TINY_DATA


def test_cli_sort_and_top(asha8, capsys):
    rows = asha8.table.to_pylist()
    assert cli_main(["trials", str(asha8.exp)]) == 0
    by_objective = [r["trial_id"] for r in sorted(rows, key=lambda r: r["best_val_objective"])]
    assert _table_ids(capsys.readouterr().out) == by_objective

    assert cli_main(["trials", str(asha8.exp), "--sort", "val_w1m", "--top", "3"]) == 0
    by_w1m = [r["trial_id"] for r in sorted(rows, key=lambda r: r["best_val_w1m"])]
    assert _table_ids(capsys.readouterr().out) == by_w1m[:3]

    assert cli_main(["trials", str(asha8.exp), "--sort", "val_w1m", "--best"]) == 0
    assert capsys.readouterr().out.startswith(f"# best trial {by_w1m[0]} ")

    assert cli_main(["trials", str(asha8.exp), "--sort", "val_w1mm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hvae-ray: error:") and "val_w1mm" in err and len(err.splitlines()) == 1


def test_diverged_trial_is_reported_not_raised(ray_local, tmp_path, sweep_file):
    """A tiny max_kl trips the KL-runaway check at the first validation: that trial ends as diverged
    with the reason, its neighbour trains on, and the sweep returns normally."""
    path = sweep_file(tmp_path / "diverge.yaml",
                      search_space={"max_kl": {"grid": [1.0e-3, 1000.0]}},
                      scheduler={"max_t": 2, "grace_period": 2}, max_concurrent_trials=2)
    result = hvae_ray.run_sweep(path, storage=str(tmp_path / "runs"), name="diverge")
    assert not result.results.errors
    rows = {r["param.max_kl"]: r for r in hvae_ray.load_trials(result.experiment_dir).to_pylist()}
    bad, good = rows[1.0e-3], rows[1000.0]
    assert bad["status"] == "diverged"
    assert "max_kl" in bad["error"] and "KL runaway" in bad["error"]
    assert bad["best_val_objective"] is None
    assert good["status"] == "completed" and good["epochs"] == 2 and good["error"] is None
    assert result.summary() == "1 completed, 1 diverged"


def test_a_generation_sweep_ranks_trials_and_epochs_on_val_generation(ray_local, tmp_path, sweep_file):
    """scheduler.metric val_generation with objective: generation, over the particle loss: every epoch
    reports the generation metrics, the trial table ranks on them, and each trial's best/ checkpoint is
    its epoch of lowest val_generation."""
    from hvae_ray.engine import load_checkpoint

    path = sweep_file(tmp_path / "gen.yaml",
                      config={"objective": "generation", "generation_jets": 100, "loss_weights.jet_features": 1.0},
                      search_space={"particle_loss": {"grid": ["sinkhorn", "slot"]}},
                      scheduler={"metric": "val_generation", "max_t": 3, "grace_period": 3},
                      max_concurrent_trials=2)
    result = hvae_ray.run_sweep(path, storage=str(tmp_path / "runs"), name="gen")
    assert not result.results.errors
    rows = hvae_ray.load_trials(result.experiment_dir).to_pylist()
    assert {r["param.particle_loss"] for r in rows} == {"sinkhorn", "slot"}
    for row in rows:
        assert row["status"] == "completed"
        log = _rows(Path(row["trial_dir"]) / "engine" / "metrics.jsonl")
        gen = {r["epoch"]: r["val_generation"] for r in log}
        assert len(gen) == 3 and all(math.isfinite(v) for v in gen.values())
        assert row["best_val_generation"] == pytest.approx(min(gen.values()))
        best_epoch = min(gen, key=gen.get)
        assert load_checkpoint(Path(row["trial_dir"]) / "engine" / "best" / "checkpoint.pt")["epoch"] == best_epoch
    best = min(rows, key=lambda r: r["best_val_generation"])
    best_result = result.results.get_best_result(metric="val_generation", mode="min", scope="all")
    assert best_result.metrics["trial_id"] == best["trial_id"]


def test_a_gpu_sweep_on_a_machine_without_a_gpu_trains_on_cpus(ray_local, tmp_path, sweep_file, monkeypatch, capsys):
    """The shipped sweeps ask for GPU shares (gpu_memory_gb: 4); on a laptop without a GPU the trials
    would wait for ever for a share that cannot exist. The local instance's GPUs are checked and the
    trials run on CPUs, with one line saying so; the experiment records the share it used."""
    from hvae_ray.sweep import tune

    monkeypatch.setattr(tune, "_local_gpus", lambda: 0.0)
    path = sweep_file(tmp_path / "nogpu.yaml", search_space={"learning_rate": {"grid": [3.0e-3]}},
                      scheduler={"max_t": 1, "grace_period": 1},
                      resources={"num_workers": 1, "cpus_per_worker": 0.5, "gpu_memory_gb": 4,
                                 "trial_memory_mb": 500})
    result = hvae_ray.run_sweep(path, storage=str(tmp_path / "runs"), name="nogpu")
    assert "no GPU on this machine: the trials train on its CPUs" in capsys.readouterr().err
    assert not result.results.errors
    state = json.loads((result.experiment_dir / SWEEP_FILE).read_text())
    assert state["gpu_share"] == 0.0
    (row,) = hvae_ray.load_trials(result.experiment_dir).to_pylist()
    assert row["status"] == "completed"


def test_two_workers_train_data_parallel(ray_local, tmp_path, sweep_file):
    """num_workers 2: one trial trains with DDP over a gloo process group of two Ray Train workers;
    both ranks report every epoch and rank 0's checkpoint carries the whole model."""
    from hvae_ray.engine import load_checkpoint

    path = sweep_file(tmp_path / "ddp.yaml", search_space={"learning_rate": {"grid": [3.0e-3]}},
                      scheduler={"max_t": 2, "grace_period": 2},
                      resources={"num_workers": 2, "cpus_per_worker": 0.5})
    result = hvae_ray.run_sweep(path, storage=str(tmp_path / "runs"), name="ddp")
    assert not result.results.errors
    (row,) = hvae_ray.load_trials(result.experiment_dir).to_pylist()
    assert row["status"] == "completed" and row["epochs"] == 2
    assert math.isfinite(row["last_train_total"]) and math.isfinite(row["last_val_kl"])
    state = load_checkpoint(row["best_checkpoint"])
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped, loads anywhere
    logs = Path(row["trial_dir"]) / "engine" / "metrics.jsonl"
    epochs = [json.loads(line)["epoch"] for line in logs.read_text().splitlines()]
    # rank 0 alone logs (one line per epoch); the config trains 3 epochs, so an epoch may finish while
    # Tune stops the trial at max_t = 2
    assert epochs[:2] == [0, 1] and epochs == sorted(set(epochs)) and len(epochs) <= 3


def test_a_standby_trial_starts_while_the_share_is_busy_and_trains_after(ray_local, tmp_path, sweep_file):
    """One GPU share for one trial at a time, one standby trial: the second trial is launched while the
    first trains (its driver and Train controller start up then), but its worker trains only once the
    first trial has given the share back."""
    import ray

    # Earlier sweeps on this instance must have given every share back (a placement group left behind
    # by a stopped trial would hold part of the GPU for good; this trial needs all of it).
    deadline = time.time() + 60
    while ray.available_resources().get("GPU", 0.0) < 1.0 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("GPU", 0.0) == 1.0, f"shares still held: {ray.available_resources()}"
    path = sweep_file(tmp_path / "standby.yaml", search_space={"learning_rate": {"grid": [3.0e-3, 1.0e-3]}},
                      scheduler={"max_t": 2, "grace_period": 2}, max_concurrent_trials=1, standby_trials=1,
                      resources={"num_workers": 1, "cpus_per_worker": 0.5, "gpu_fraction": 1.0})
    result = hvae_ray.run_sweep(path, storage=str(tmp_path / "runs"), name="standby")
    assert not result.results.errors
    runs = []
    for row in hvae_ray.load_trials(result.experiment_dir).to_pylist():
        assert row["status"] == "completed" and row["epochs"] == 2
        rows = [r for r in _rows(Path(row["trial_dir"]) / "result.json") if "reported_at" in r]
        # Tune's trial start: the first report less the trial's time until then
        runs.append({"launched": rows[0]["reported_at"] - rows[0]["time_total_s"],
                     "loop": rows[0]["loop_started_at"], "last": rows[-1]["reported_at"]})
    first, second = sorted(runs, key=lambda r: r["loop"])
    assert second["launched"] < first["last"], "the second trial was not launched until the first had finished"
    # the worker's loop, not its process: Ray may have started the process ahead, before the share was free
    assert second["loop"] > first["last"], "two trials trained at once on a share that holds one"


def test_a_killed_training_worker_is_retried_from_the_last_checkpoint(ray_local, tmp_path, sweep_file):
    """SIGKILL the trial's Ray Train worker after its second epoch: Tune retries the trial (the sweep's
    max_failures), whose TorchTrainer restores the last checkpoint: training goes on from there, not
    from epoch 0, and the trial completes."""
    import threading

    from ray.util.state import list_actors

    max_t = 8
    path = sweep_file(tmp_path / "kill.yaml", search_space={"learning_rate": {"grid": [3.0e-3]}},
                      scheduler={"max_t": max_t, "grace_period": max_t}, max_failures=1)
    exp = tmp_path / "runs" / "kill"
    killed: list[int] = []

    def kill_after_two_epochs():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            logs = list(exp.glob("trial_*/engine/metrics.jsonl"))
            if logs and len(_rows(logs[0])) >= 2:
                for actor in list_actors(address=f"http://{ray_local.dashboard_url}", detail=True, limit=10_000,
                                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                         raise_on_missing_output=False):
                    os.kill(actor.pid, signal.SIGKILL)
                    killed.append(actor.pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_two_epochs, daemon=True)
    killer.start()
    result = hvae_ray.run_sweep(path, storage=str(tmp_path / "runs"), name="kill")
    killer.join(timeout=10)
    assert len(killed) == 1, "the worker was not found alive after two epochs"
    (row,) = hvae_ray.load_trials(result.experiment_dir).to_pylist()
    assert row["status"] == "completed" and row["epochs"] == max_t
    log = _rows(Path(row["trial_dir"]) / "engine" / "metrics.jsonl")
    epochs = [r["epoch"] for r in log if "epoch" in r]
    workers = sorted({r["loop_started_at"] for r in log})
    assert len(workers) == 2, "no second worker: the trial was not retried"
    resumed = [r["epoch"] for r in log if r["loop_started_at"] == workers[1]]
    first_run = [r["epoch"] for r in log if r["loop_started_at"] == workers[0]]
    assert first_run[:2] == [0, 1]
    # the retry starts right after an epoch the first worker had checkpointed, and runs to the end
    assert 1 <= resumed[0] <= first_run[-1] + 1 and resumed[-1] == max_t - 1
    assert sorted(set(epochs)) == list(range(max_t))


def test_local_instance_tells_its_workers_where_its_api_server_is(ray_local):
    """A sweep's own Ray instance (``ray_local`` is started as a sweep starts one) gives its workers the
    address of its API server, on loopback, and the server answers there: Ray Train's placement-group
    cleaner otherwise auto-detects the cluster, which fails as soon as another Ray instance runs on the
    host, and then trials stopped by ASHA never give back their resources."""
    import urllib.error
    import urllib.parse
    import urllib.request

    import ray

    @ray.remote(num_cpus=0)
    def worker_env():
        return {k: os.environ.get(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_TRAIN_V2_ENABLED", "NCCL_NVLS_ENABLE")}

    env = ray.get(worker_env.remote(), timeout=120)
    assert env["RAY_TRAIN_V2_ENABLED"] == "1" and env["NCCL_NVLS_ENABLE"] == "0"
    address = env["RAY_API_SERVER_ADDRESS"]
    assert address == f"http://{ray_local.dashboard_url}"  # this instance's own API server
    assert ListenerWatch.is_loopback(urllib.parse.urlparse(address).hostname), address
    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=30) as response:
            status = response.status
    except urllib.error.HTTPError as e:  # with Ray's token authentication on: an answer all the same
        status = e.code
    assert status in (200, 401)


# --- interrupted sweep --------------------------------------------------------------------------

RESUME_T = 120  # enough epochs for the slow trial to outlast four stops, each up to ~10 epochs late


def _wait_for(cond, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}:\n"
                                 + proc.stdout.read()[-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of the live processes of session ``sid`` (the driver and the Ray instance it
    started; Ray's worker processes keep the session of the driver that started the instance)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    procs = []
    for line in out.splitlines():
        pid, psid, stat, args = (line.split(None, 3) + [""])[:4]
        if int(psid) == sid and not stat.startswith("Z"):
            procs.append((int(pid), args))
    return procs


def _last_checkpoint_epoch(train_dir: Path) -> int:
    from hvae_ray.engine import load_checkpoint
    from hvae_ray.errors import DataError

    epochs = []
    for d in train_dir.glob("checkpoint_*"):
        try:
            epochs.append(int(load_checkpoint(d)["epoch"]))
        except DataError:
            pass  # cut short by the kill
    return max(epochs)


#: The ways a driver is stopped, in the order one interrupted sweep meets them: the first stops `hvae-ray
#: sweep run`, and each stop is followed by `hvae-ray sweep resume`, in a driver of its own, which the next
#: stop interrupts, or after the last by a resume on this session's Ray.
STOPS = {"killed": (signal.SIGKILL, 1), "ctrl-c": (signal.SIGINT, 1), "ctrl-c-twice": (signal.SIGINT, 2),
         "sigterm": (signal.SIGTERM, 1)}


def _stop_driver(proc: subprocess.Popen, sig: int, times: int) -> str:
    """Send ``sig`` ``times`` times (0.3 s apart: a second Ctrl+C waits for the first's stop), wait for the
    driver to end and for its Ray instance to let go of the experiment; the driver's output."""
    try:
        for i in range(times):
            if i:
                time.sleep(0.3)
            proc.send_signal(sig)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError("driver did not stop after the signal:\n" + out[-3000:]) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # A killed driver's Ray instance notices and shuts down within seconds, its trial possibly a few
    # epochs further (checkpointed, not in the driver's results). Wait until nothing of it can still
    # write into the experiment (its dashboard/runtime-env agents linger a minute; they are ended below).
    deadline = time.monotonic() + 60
    while any(not a.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))
              for _, a in _session_processes(proc.pid)):
        assert time.monotonic() < deadline, _session_processes(proc.pid)
        time.sleep(0.2)
    for pid, _ in _session_processes(proc.pid):
        os.kill(pid, signal.SIGKILL)
    return out


def _runs_of(trial_dir: Path) -> list[list[int]]:
    """The epochs each training run of a trial reported to its engine log, one list per run, in order."""
    runs: dict[float, list[int]] = {}
    for r in _rows(trial_dir / "engine" / "metrics.jsonl"):
        if "loop_started_at" in r and "epoch" in r:
            runs.setdefault(r["loop_started_at"], []).append(int(r["epoch"]))
    return [runs[k] for k in sorted(runs)]


@pytest.fixture(scope="module")
def interrupted(ray_local, tmp_path_factory, sweep_file):
    """One sweep of two trials, one at a time: a fast one (batch 16) and a slow one (batch 1). The driver,
    a separate `hvae-ray sweep run` process with its own Ray instance, is stopped in each way of
    :data:`STOPS` in turn: first once the fast trial finished and the slow one reported an epoch, then,
    after each `hvae-ray sweep resume` (a driver of its own again), once the slow trial reported an epoch
    of that driver. What each stop left is recorded for the tests, before the next driver starts."""
    root = tmp_path_factory.mktemp("resume")
    path = sweep_file(root / "resume.yaml", search_space={"batch_size": {"grid": [16, 1]}},
                      scheduler={"max_t": RESUME_T, "grace_period": RESUME_T}, max_concurrent_trials=1)
    storage = root / "runs"
    exp = storage / "resume"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}

    def trial_of(batch):
        for d in exp.glob("trial_*"):
            p = d / "params.json"
            if p.is_file() and json.loads(p.read_text() or "{}").get("batch_size") == batch:
                return d
        return None

    def fast_done():
        d = trial_of(16)
        return d is not None and any(r.get("epochs_done") == RESUME_T for r in _rows(d / "result.json"))

    stops = {}
    for name, (sig, times) in STOPS.items():
        command = ["run", str(path), "--storage", str(storage), "--name", "resume"] if not stops else \
            ["resume", str(exp)]
        slow = trial_of(1)
        runs_before = len(_runs_of(slow)) if slow is not None else 0
        proc = subprocess.Popen([sys.executable, "-m", "hvae_ray.cli", "sweep", *command],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)

        def slow_reported(runs_before=runs_before):
            d = trial_of(1)
            return d is not None and len(_runs_of(d)) > runs_before and len(_rows(d / "result.json")) >= 1

        try:
            if not stops:
                _wait_for(fast_done, 240, proc, "the fast trial finished")
            _wait_for(slow_reported, 240, proc, "the slow trial reported an epoch")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        out = _stop_driver(proc, sig, times)
        fast, slow = trial_of(16), trial_of(1)
        stops[name] = SimpleNamespace(
            sig=sig, returncode=proc.returncode, out=out, fast_results=(fast / "result.json").read_text(),
            slow_results=_rows(slow / "result.json"), runs=_runs_of(slow),
            last_checkpoint=_last_checkpoint_epoch(exp / "_train" / slow.name.removeprefix("trial_")),
            table={r["trial_id"]: r for r in hvae_ray.load_trials(exp).to_pylist()})
    fast, slow = trial_of(16), trial_of(1)
    return SimpleNamespace(exp=exp, fast=fast, slow=slow, fast_id=fast.name.removeprefix("trial_"),
                           slow_id=slow.name.removeprefix("trial_"), stops=stops)


@pytest.mark.parametrize("how", list(STOPS))
def test_a_stopped_sweep_keeps_its_finished_trial_and_the_others_checkpoints(interrupted, how):
    """Each way of stopping the driver (Ctrl+C, Ctrl+C twice, SIGTERM: exit 130 or 143 with what finished,
    what did not and how to resume; or killed) leaves the finished trial as it was and the unfinished one
    checkpointed, not finished; a driver that resumed the sweep continued the unfinished trial from the
    checkpoint the stop before it left."""
    stop, fast_id, slow_id = interrupted.stops[how], interrupted.fast_id, interrupted.slow_id
    out = stop.out
    if stop.sig != signal.SIGKILL:
        assert stop.returncode == (143 if stop.sig == signal.SIGTERM else 130), out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert f"  finished: 1 ({fast_id})" in out and f"  interrupted: 1 ({slow_id})" in out, out[-3000:]
        assert "  never started: 0" in out, out[-3000:]
        assert f"interrupted; continue with: hvae-ray sweep resume {interrupted.exp.resolve()}" in out, out[-3000:]
    first = next(iter(interrupted.stops.values()))
    assert stop.fast_results == first.fast_results  # the finished trial did not run again
    assert stop.table[fast_id]["status"] == "completed" and stop.table[fast_id]["epochs"] == RESUME_T
    assert stop.table[slow_id]["status"] != "completed"
    assert stop.slow_results and max(r["epochs_done"] for r in stop.slow_results) < RESUME_T, out[-3000:]
    assert stop.slow_results[0]["node_id"] != ray_node_id(), "the driver attached to the session's Ray instance"
    last_before = max(int(r["epoch"]) for r in stop.slow_results)
    assert last_before <= stop.last_checkpoint < RESUME_T - 1
    names = list(interrupted.stops)
    if names.index(how):
        before = interrupted.stops[names[names.index(how) - 1]]
        resumed = stop.runs[-1]
        assert len(stop.runs) == len(before.runs) + 1
        assert max(int(r["epoch"]) for r in before.slow_results) + 1 <= resumed[0] <= before.last_checkpoint + 1
        assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))


def test_an_interrupted_sweep_resumes_without_losing_finished_trials(interrupted):
    """Resuming on this session's Ray, after the last stop, keeps the finished trial as it was and continues
    the unfinished one from its last checkpoint to the end, with its whole history."""
    exp, fast, slow = interrupted.exp, interrupted.fast, interrupted.slow
    fast_id, slow_id = interrupted.fast_id, interrupted.slow_id
    stop = list(interrupted.stops.values())[-1]
    last_before = max(int(r["epoch"]) for r in stop.slow_results)
    result = hvae_ray.resume_sweep(exp)
    assert not result.results.errors and not result.interrupted
    table = {r["trial_id"]: r for r in hvae_ray.load_trials(exp).to_pylist()}
    assert {k: r["status"] for k, r in table.items()} == {fast_id: "completed", slow_id: "completed"}
    # the finished trial was not run again: its results are exactly as before
    assert (fast / "result.json").read_text() == stop.fast_results
    assert table[fast_id]["epochs"] == RESUME_T
    assert Path(table[fast_id]["best_checkpoint"]).is_dir()
    # the unfinished one continued from its last checkpoint (Ray Train restores the run from
    # _train/<trial_id>), on this session's Ray node: the engine's epochs pick up where it was.
    # (Tune restarts the trial's result log, so only the rows after resume may remain there.)
    new = [r for r in _rows(slow / "result.json") if r.get("node_id") == ray_node_id()]
    assert new, "the unfinished trial did not run after resume"
    # It restarts no earlier than right after the last epoch Tune recorded. A stopped driver's instance
    # may write several checkpoints (here up to last_checkpoint) that never reach Ray Train's
    # checkpoint snapshot; the run then restores the newest registered one, not the newest on disk.
    first_new = int(new[0]["epoch"])
    assert last_before + 1 <= first_new <= stop.last_checkpoint + 1
    assert [int(r["epoch"]) for r in new] == list(range(int(new[0]["epoch"]), RESUME_T))
    assert table[slow_id]["epochs"] == RESUME_T
    # ...but the trial table keeps the whole history from the trial's own epoch log: every epoch
    # from 0, including those trained before each interruption, and a best checkpoint on disk.
    from hvae_ray.sweep.layout import TrialPaths

    history = trials.epoch_results(TrialPaths(slow))
    assert sorted(int(r["epoch"]) for r in history) == list(range(RESUME_T))
    assert 0 <= table[slow_id]["best_epoch"] < RESUME_T
    assert Path(table[slow_id]["best_checkpoint"]).is_dir()
