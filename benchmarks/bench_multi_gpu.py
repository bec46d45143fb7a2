"""Multi-GPU scaling on one node: the data-parallel speed-up of one trial, and a sweep across all GPUs vs one.

(1) Data-parallel speed-up of one trial: a one-trial sweep through ``hvae_ray.run_sweep`` (``num_samples: 1``,
    no search space, ``scheduler: {max_t: E, grace_period: E}``) on ``--jets`` jets for ``--epochs`` epochs,
    with 1 and with ``--workers`` Ray Train workers (default: every GPU), each worker one whole GPU
    (``gpu_fraction: 1.0``), DDP over NCCL. With N workers each rank trains on 1/N of the training split
    (DistributedSampler) and validates on the whole validation split, so rank 0's ``epoch_time_s`` (training
    + validation) is the epoch time. Per-epoch medians from each trial's ``result.json`` (first epoch
    excluded) and their ratio. Goal: >= 1.8x with 2 GPUs at 100000 jets.
(2) A sweep across every GPU of the node vs one GPU: a sweep file (default ``sweeps/kl_caps.yaml``) with
    ``--samples`` trials on GPU shares of ``--gpu-fraction`` (0.25: four trials per card),
    ``max_concurrent_trials`` = samples and a short ASHA (``--max-t``, ``--grace``), run twice: with Ray
    seeing every GPU and with Ray seeing one (``CUDA_VISIBLE_DEVICES`` = the first). Aggregate jets/s = sum
    over trials of (training jets x epochs done) / sweep wall time (the ``run_sweep`` call, trial start-up
    included). Goal: >= 1.9x with 2 GPUs.

Usage (a Linux host with 2+ NVIDIA GPUs, the project and Ray importable; about 35 minutes at the defaults):
    python benchmarks/bench_multi_gpu.py --data JETS.parquet --json multi_gpu.json
Make the data with ``hvae-ray data generate --flavor q --n-jets 100000 --out JETS.parquet``; without
--data a synthetic sample (10-30 particles a jet) is written. ``--help`` lists the sizes; ``--gpus N``
uses the first N visible GPUs.

--cpu-dry-run runs the same plumbing without a GPU (workers on CPUs with ``gpu_fraction: 0`` over gloo;
part 2 becomes Ray seeing every CPU vs one CPU, trials holding ``--cpus-per-worker`` each). Its ratios
check the plumbing only. This one takes about 3 minutes on a 2-core machine:
    python benchmarks/bench_multi_gpu.py --cpu-dry-run --data q2000.parquet --jets 2000 --epochs 3 \\
        --samples 2 --max-t 3 --grace 3 --sweep-jets 1000 --set model.hidden_dim=16 --timeout 300

Each sweep runs in a child process with its own Ray instance (started by ``run_sweep``) and a time limit;
results are read from the experiment directory, so a sweep that hangs still reports what it finished.
Every child gets ``NCCL_NVLS_ENABLE=0`` (no NVLink multicast) and ``RAY_ADDRESS=local`` (its own instance,
never a ``ray start`` cluster on the host). Another Ray instance on the host competes for the same GPUs and
CPUs: run alone. Prints a Markdown table; ``--json FILE`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
# NCCL_NVLS_ENABLE=0: no NVLink multicast (shared hosts). RAY_ADDRESS=local: ray.init() starts the child's own
# instance even where a cluster started with `ray start` runs on the host (it would join that one otherwise).
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
DP_GOAL, SWEEP_GOAL = 1.8, 1.9


# --------------------------------------------------------------------------------------------------
# GPUs


def visible_gpus() -> tuple[list[str], list[str]]:
    """(CUDA_VISIBLE_DEVICES entries, card names) of the GPUs this process sees. The count comes from
    ``torch.cuda.device_count()`` (NVML-based: CUDA is not initialised), else from nvidia-smi's list."""
    try:
        lines = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        cards = [[x.strip() for x in line.split(",")] for line in lines if line.count(",") >= 3]
    except (OSError, subprocess.TimeoutExpired):
        cards = []
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable torch.cuda: trust nvidia-smi
        count = len(cards)
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in env.split(",") if x.strip()] if env is not None else [c[0] for c in cards]
    ids = ids[:count]
    by_id = {k: f"{c[2]} ({c[3]})" for c in cards for k in (c[0], c[1])}
    return ids, [by_id.get(i, f"GPU {i}") for i in ids]


class GpuUtil:
    """nvidia-smi utilisation and memory of every card, sampled every ``interval_ms``."""

    def __init__(self, interval_ms: int = 500):
        self.interval_ms = interval_ms
        self.samples: list[tuple[str, float, float]] = []  # (index, util %, used MiB)
        self._proc = None
        self._thread = None

    def start(self) -> GpuUtil:
        self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                       "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

        def read():
            for line in self._proc.stdout:
                try:
                    i, u, m = (x.strip() for x in line.split(","))
                    self.samples.append((i, float(u), float(m)))
                except ValueError:
                    continue

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._proc.terminate()
        self._proc.wait(timeout=10)
        self._thread.join(timeout=10)
        out = {}
        for i in sorted({s[0] for s in self.samples}):
            s = [x for x in self.samples if x[0] == i]
            out[i] = {"samples": len(s), "busy_fraction": sum(u > 0 for _, u, _ in s) / len(s),
                      "util_mean_pct": statistics.fmean(u for _, u, _ in s), "used_peak_mib": max(m for *_, m in s)}
        return out


# --------------------------------------------------------------------------------------------------
# one sweep in a child process


def sweep_child(a: argparse.Namespace) -> dict:
    """Runs in a fresh process: its own Ray instance (what it sees: CPUs, GPUs), then one run_sweep call."""
    import hvae_ray
    from hvae_ray.sweep.tune import ray_init

    t = time.perf_counter()
    ray_init(None)
    import ray

    res = ray.cluster_resources()
    out: dict = {"ray_init_s": time.perf_counter() - t, "ray_cpus": res.get("CPU", 0.0),
                 "ray_gpus": res.get("GPU", 0.0), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    t = time.perf_counter()
    r = hvae_ray.run_sweep(a.sweep, json.loads(a.overrides) or None, name=a.name, storage=a.storage)
    out["run_sweep_s"] = time.perf_counter() - t
    out["experiment_dir"] = str(r.experiment_dir)
    try:  # what Ray Train set up in each trial: "[rank=0, world_size=N]" from the workers' logs
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        out["process_groups"] = sorted(line.split("for: ", 1)[-1].strip() for f in logs.glob("worker-*.*")
                                       for line in f.read_text(errors="replace").splitlines()
                                       if "Setting up process group" in line)
    except Exception as e:  # noqa: BLE001 - log layout differs: not recorded
        out["process_groups_error"] = repr(e)
    return out


def run_child(a: argparse.Namespace, sweep_file: Path, name: str, storage: Path, overrides: dict,
              env: dict[str, str], sample_gpus: bool) -> dict:
    """A sweep in a child process with a time limit (then its whole process group is killed)."""
    cmd = [sys.executable, "-u", __file__, "--child", "--sweep", str(sweep_file), "--name", name,
           "--storage", str(storage), "--overrides", json.dumps(overrides)]
    log = storage / f"{name}.log"
    from bench_sweep import run_logged

    sampler = GpuUtil().start() if sample_gpus else None
    t0 = time.perf_counter()
    returncode, timed_out, text = run_logged(cmd, log, a.timeout, env={**os.environ, **CHILD_ENV, **env})
    child = next((json.loads(x[7:]) for x in text.splitlines() if x.startswith("RESULT ")), {})
    out = {"name": name, "env": env, "process_wall_s": time.perf_counter() - t0, "timed_out": timed_out,
           "returncode": returncode, "log": str(log), "experiment_dir": str(storage / name), **child}
    if sampler is not None:
        out["gpu_util"] = sampler.stop()
    if not child:
        out["log_tail"] = text[-3000:]
    return out


def failure(r: dict) -> str | None:
    if r.get("timed_out"):
        return f"timed out after {r['process_wall_s']:.0f} s"
    if "run_sweep_s" not in r:
        tail = [x for x in (r.get("log_tail") or "").splitlines() if x.strip()]
        return f"child failed (rc {r.get('returncode')}): " + " | ".join(tail[-6:])
    return None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(x, y):
    return x / y if x and y else None


# --------------------------------------------------------------------------------------------------
# (1) data-parallel speed-up of one trial


def data_parallel(a: argparse.Namespace, data: str, n_file: int, storage: Path, gpu_ids: list[str]) -> dict:
    from bench_sweep import trial_rows

    from hvae_ray.config import Config
    from hvae_ray.engine import split_indices

    jets = min(a.jets, n_file)
    cfg = Config().with_overrides({"epochs": a.epochs, "data.max_jets": jets, **a.config_set})
    n_train = len(split_indices(jets, cfg)[0])
    env = {} if a.cpu_dry_run else {"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)}
    out: dict = {"jets": jets, "train_jets": n_train, "epochs": a.epochs, "cpus_per_worker": a.cpus_per_worker,
                 "runs": []}
    for w in (1, a.workers):
        backend = "auto" if w == 1 else ("gloo" if a.cpu_dry_run else "nccl")
        sweep = {"name": f"dp_{w}w", "config": {"epochs": a.epochs, "data.max_jets": jets, **a.config_set},
                 "scheduler": {"max_t": a.epochs, "grace_period": a.epochs}, "num_samples": 1,
                 "resources": {"num_workers": w, "cpus_per_worker": a.cpus_per_worker,
                               "gpu_fraction": 0.0 if a.cpu_dry_run else 1.0, "backend": backend},
                 "data": {"path": data}, "storage": str(storage)}
        f = storage / f"dp_{w}w.yaml"
        f.write_text(yaml.safe_dump(sweep, sort_keys=False))
        print(f"[1] one trial, {w} worker(s), {jets} jets x {a.epochs} epochs ...", flush=True)
        r = run_child(a, f, f"dp_{w}w_{int(time.time())}", storage, {}, env, not a.cpu_dry_run)
        exp = Path(r["experiment_dir"])
        rows = next(iter(trial_rows(exp).values()), []) if exp.is_dir() else []
        ep = [x["epoch_time_s"] for x in rows if "epoch_time_s" in x]
        it = [x["time_this_iter_s"] for x in rows if "epoch_time_s" in x and "time_this_iter_s" in x]
        run = {"workers": w, "backend": backend, "sweep_file": sweep, "epoch_time_s": ep, "report_interval_s": it,
               "epoch_time_median_s": median(ep[1:]), "report_interval_median_s": median(it[1:]),
               **{k: v for k, v in r.items() if k != "log_tail"}}
        run["train_jets_per_s"] = n_train / run["epoch_time_median_s"] if run["epoch_time_median_s"] else None
        err = failure(r) or (None if len(ep) >= 2 else f"{len(ep)} epoch(s) reported, need 2+")
        if err:
            run["error"] = err
            if r.get("log_tail"):
                run["log_tail"] = r["log_tail"]
        out["runs"].append(run)
        print(f"    epoch_time_s {', '.join(f'{x:.2f}' for x in ep) or 'none'}"
              + (f"; {run['error']}" if err else ""), flush=True)
    base, scaled = out["runs"][0], out["runs"][-1]
    out["speedup"] = ratio(base["epoch_time_median_s"], scaled["epoch_time_median_s"])
    return out


# --------------------------------------------------------------------------------------------------
# (2) a sweep across the node vs one device


def sweep_overrides(a: argparse.Namespace, data: str, n_file: int) -> dict:
    """The sweep file's overrides for (2): sizes, GPU shares (no card-size sizing), data, --set/--sweep-set."""
    ov: dict = {"num_samples": a.samples, "max_concurrent_trials": a.samples,
                "scheduler.max_t": a.max_t, "scheduler.grace_period": a.grace, "config.epochs": a.max_t,
                "config.data.max_jets": min(a.sweep_jets, n_file), "data.path": data,
                "resources.gpu_memory_gb": None, "resources.gpu_fraction": 0.0 if a.cpu_dry_run else a.gpu_fraction}
    if a.cpu_dry_run or a.cpus_per_worker_given:
        ov["resources.cpus_per_worker"] = a.cpus_per_worker
    ov.update({f"config.{k}": v for k, v in a.config_set.items()})
    ov.update(a.sweep_set)
    return ov


def node_sweep(a: argparse.Namespace, data: str, n_file: int, storage: Path, gpu_ids: list[str]) -> dict:
    from bench_sweep import trial_rows

    from hvae_ray.engine import split_indices
    from hvae_ray.sweep.spec import load_sweep

    jets = min(a.sweep_jets, n_file)
    ov = sweep_overrides(a, data, n_file)
    spec = load_sweep(a.sweep, ov)
    if a.cpu_dry_run:
        modes = [("all", f"Ray sees all {os.cpu_count()} CPUs", {}),
                 ("one", "Ray sees 1 CPU", {"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 1})})]
    else:
        modes = [("all", f"Ray sees {len(gpu_ids)} GPUs", {"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)}),
                 ("one", "Ray sees 1 GPU", {"CUDA_VISIBLE_DEVICES": gpu_ids[0]})]
    out: dict = {"sweep": a.sweep, "overrides": ov, "jets": jets, "runs": {}}
    for key, label, env in modes:
        print(f"[2] {Path(a.sweep).name}, {a.samples} trials, {label} ...", flush=True)
        r = run_child(a, Path(a.sweep), f"sweep_{key}_{int(time.time())}", storage, ov, env, not a.cpu_dry_run)
        run: dict = {"mode": key, "label": label, **{k: v for k, v in r.items() if k != "log_tail"}}
        exp = Path(r["experiment_dir"])
        trials = []
        for tid, rows in (trial_rows(exp).items() if exp.is_dir() else []):
            pf = exp / tid / "params.json"
            params = json.loads(pf.read_text()) if pf.is_file() else {}
            cfg = spec.trial_config(params)
            n = min(cfg.data.max_jets, n_file) if cfg.data.max_jets else n_file
            good = [x for x in rows if "epoch_time_s" in x]
            trials.append({"trial": tid, "train_jets": len(split_indices(n, cfg)[0]), "epochs_done": len(good),
                           "epoch_time_s": [x["epoch_time_s"] for x in good],
                           "startup_s": (good[0]["time_this_iter_s"] - good[0]["epoch_time_s"])
                           if good and "time_this_iter_s" in good[0] else None})
        wall = r.get("run_sweep_s") or r["process_wall_s"]
        jets_done = sum(t["train_jets"] * t["epochs_done"] for t in trials)
        run.update(trials=trials, trials_with_epochs=sum(t["epochs_done"] > 0 for t in trials),
                   epochs_total=sum(t["epochs_done"] for t in trials), jets_trained=jets_done, wall_s=wall,
                   jets_per_s=jets_done / wall if wall else None,
                   epoch_time_median_s=median([x for t in trials for x in t["epoch_time_s"][1:]]),
                   trial_startup_median_s=median([t["startup_s"] for t in trials]))
        err = failure(r) or (None if jets_done else "no epoch reported")
        if err:
            run["error"] = err
            if r.get("log_tail"):
                run["log_tail"] = r["log_tail"]
        out["runs"][key] = run
        print(f"    {run['epochs_total']} epochs in {len(trials)} trials, {wall:.1f} s"
              + (f"; {err}" if err else ""), flush=True)
    out["speedup"] = ratio(out["runs"]["all"]["jets_per_s"], out["runs"]["one"]["jets_per_s"])
    return out


# --------------------------------------------------------------------------------------------------


def fmt(x, digits=2, unit=""):
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def report(a: argparse.Namespace, res: dict) -> str:
    dry = a.cpu_dry_run
    lines = [f"## Multi-GPU scaling: {res['host']['cards_label']}", "",
             f"Command: `{res['command']}`  ",
             f"Host: {res['host']['node']}, {res['host']['cpu_cores']} CPU cores, torch {res['host']['torch']}, "
             f"Ray {res['host']['ray']}, Python {res['host']['python']}; data {res['data']} "
             f"({res['data_jets']} jets).", ""]
    if dry:
        lines += ["**CPU dry run**: workers on CPUs (gloo); part 2 compares Ray seeing every CPU with Ray seeing "
                  "one. The ratios check the plumbing, not the GPU goals.", ""]
    lines += ["| measure | baseline | scaled | speed-up | goal |", "|---|---|---|---|---|"]
    dp = res.get("data_parallel")
    if dp:
        b, s = dp["runs"][0], dp["runs"][-1]
        unit = "worker" if dry else "GPU"
        lines.append(f"| one trial, {dp['jets']} jets: epoch time, median s (1 {unit} vs {s['workers']} {unit}s) | "
                     f"{fmt(b['epoch_time_median_s'])} | {fmt(s['epoch_time_median_s'])} | "
                     f"{fmt(dp['speedup'], 2, '×')} | ≥ {DP_GOAL}× (2 GPUs) |")
    sw = res.get("sweep")
    if sw:
        o, al = sw["runs"]["one"], sw["runs"]["all"]
        what = "CPUs" if dry else "GPUs"
        lines.append(f"| {Path(sw['sweep']).stem} sweep, {a.samples} trials: aggregate jets/s (1 vs "
                     f"{'all' if dry else len(res['gpu_ids'])} {what}) | {fmt(o['jets_per_s'], 1)} | "
                     f"{fmt(al['jets_per_s'], 1)} | {fmt(sw['speedup'], 2, '×')} | ≥ {SWEEP_GOAL}× (2 GPUs) |")
    lines.append("")
    if dp:
        lines.append(f"One trial: {dp['train_jets']} training jets, {dp['epochs']} epochs (first excluded), "
                     f"{dp['cpus_per_worker']:g} CPUs per worker.")
        for r in dp["runs"]:
            lines.append(f"- {r['workers']} worker(s), backend {r['backend']}: epoch_time_s "
                         f"{', '.join(fmt(x) for x in r['epoch_time_s']) or 'none'}; training jets/s "
                         f"{fmt(r['train_jets_per_s'], 1)}; report interval median "
                         f"{fmt(r['report_interval_median_s'])} s; run_sweep {fmt(r.get('run_sweep_s'), 1)} s "
                         f"(Ray: {fmt(r.get('ray_cpus'), 0)} CPU, {fmt(r.get('ray_gpus'), 0)} GPU; process group "
                         f"{', '.join(r.get('process_groups') or []) or 'n/a'}){gpu_line(r)}"
                         + (f"; **{r['error']}**" if r.get("error") else ""))
    if sw:
        lines.append(f"Sweep: {sw['jets']} jets, overrides `{json.dumps(sw['overrides'])}`.")
        for k in ("one", "all"):
            r = sw["runs"][k]
            lines.append(f"- {r['label']} (Ray: {fmt(r.get('ray_cpus'), 0)} CPU, {fmt(r.get('ray_gpus'), 0)} GPU): "
                         f"{r['trials_with_epochs']}/{len(r['trials'])} trials trained, {r['epochs_total']} epochs, "
                         f"{r['jets_trained']} jets in {fmt(r['wall_s'], 1)} s; epoch time median "
                         f"{fmt(r['epoch_time_median_s'])} s; trial start-up median "
                         f"{fmt(r['trial_startup_median_s'], 1)} s{gpu_line(r)}"
                         + (f"; **{r['error']}**" if r.get("error") else ""))
    return "\n".join(lines)


def gpu_line(r: dict) -> str:
    g = r.get("gpu_util")
    if not g:
        return ""
    return "; GPU busy " + ", ".join(f"{i}: {v['busy_fraction']:.2f} (mean {v['util_mean_pct']:.0f} %)"
                                     for i, v in g.items())


def parse_sets(items: list[str] | None) -> dict:
    from hvae_ray.config import parse_override

    return dict(parse_override(s) for s in items or [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="jets file (default: a synthetic sample of max(--jets, --sweep-jets))")
    p.add_argument("--gpus", type=int, default=None, help="use the first N visible GPUs (default: all)")
    p.add_argument("--jets", type=int, default=100000, help="(1) jets of the one-trial run")
    p.add_argument("--epochs", type=int, default=3, help="(1) epochs per run (the first is excluded)")
    p.add_argument("--workers", type=int, default=None, help="(1) workers of the scaled run (default: --gpus)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per Ray Train worker (default 1; 0.9 in the dry run, so 2 workers fit on 2 cores "
                        "besides the trial driver's 0.01)")
    p.add_argument("--sweep", default=str(REPO / "sweeps" / "kl_caps.yaml"), help="(2) sweep file")
    p.add_argument("--samples", type=int, default=8, help="(2) trials (and max_concurrent_trials)")
    p.add_argument("--sweep-jets", type=int, default=20000, help="(2) config.data.max_jets")
    p.add_argument("--max-t", type=int, default=4, help="(2) scheduler.max_t (and config.epochs)")
    p.add_argument("--grace", type=int, default=4, help="(2) scheduler.grace_period")
    p.add_argument("--gpu-fraction", type=float, default=0.25, help="(2) GPU share per trial")
    p.add_argument("--set", dest="config_set", action="append", metavar="KEY=VALUE",
                   help="a training-config key for both parts, e.g. model.hidden_dim=16")
    p.add_argument("--sweep-set", action="append", metavar="KEY=VALUE", help="(2) a sweep-file key, e.g. seed=1")
    p.add_argument("--no-dp", dest="do_dp", action="store_false", help="skip (1)")
    p.add_argument("--no-sweep", dest="do_sweep", action="store_false", help="skip (2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per sweep (then killed)")
    p.add_argument("--storage", default=None, help="experiment storage, kept (default: a temporary directory)")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--cpu-dry-run", action="store_true", help="no GPU: CPU workers over gloo, Ray CPUs for GPUs")
    # internal
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(sweep_child(a)), flush=True)
        return

    t_start = time.time()
    a.config_set = parse_sets(a.config_set)
    a.sweep_set = parse_sets(a.sweep_set)
    a.sweep = str(Path(a.sweep).resolve())
    a.cpus_per_worker_given = a.cpus_per_worker is not None
    if a.cpus_per_worker is None:
        a.cpus_per_worker = 0.9 if a.cpu_dry_run else 1.0
    if a.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is excluded)")
    if a.cpu_dry_run:
        gpu_ids, names = [], []
        a.workers = a.workers or 2
    else:
        gpu_ids, names = visible_gpus()
        if a.gpus is not None:
            if a.gpus > len(gpu_ids):
                p.error(f"--gpus {a.gpus}: only {len(gpu_ids)} GPU(s) visible")
            gpu_ids, names = gpu_ids[:a.gpus], names[:a.gpus]
        if len(gpu_ids) < 2:
            p.error(f"{len(gpu_ids)} GPU(s) visible: this benchmark needs 2+ (or --cpu-dry-run)")
        a.workers = a.workers or len(gpu_ids)
        if a.workers > len(gpu_ids):
            p.error(f"--workers {a.workers}: only {len(gpu_ids)} GPU(s) in use")
    import ray
    import torch

    tmp = tempfile.TemporaryDirectory()
    storage = Path(a.storage).resolve() if a.storage else Path(tmp.name)
    storage.mkdir(parents=True, exist_ok=True)
    if a.data:
        data = str(Path(a.data).resolve())
    else:
        from bench_sweep import synthetic_file

        n = max(a.jets if a.do_dp else 0, a.sweep_jets if a.do_sweep else 0)
        print(f"writing {n} synthetic jets (pass --data for real jets) ...", flush=True)
        data = synthetic_file(storage / "synthetic.parquet", n)
    from hvae_ray.data.io import load_jets

    n_file = len(load_jets(data))
    from hvae_ray.config import Config
    from hvae_ray.errors import HvaeError
    from hvae_ray.sweep.spec import load_sweep

    try:  # a bad --set/--sweep-set or sweep file fails here, before any sweep runs
        Config().with_overrides({"epochs": a.epochs, "data.max_jets": min(a.jets, n_file), **a.config_set})
        if a.do_sweep:
            load_sweep(a.sweep, sweep_overrides(a, data, n_file))
    except HvaeError as e:
        p.error(str(e))
    cards = ", ".join(f"{i}: {nm}" for i, nm in zip(gpu_ids, names))
    label = "CPU dry run" if a.cpu_dry_run else f"{len(gpu_ids)} × {names[0]}" if len(set(names)) == 1 else cards
    res: dict = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "cpu_dry_run": a.cpu_dry_run,
                 "gpu_ids": gpu_ids, "gpu_names": names, "data": data if a.data else "synthetic", "data_jets": n_file,
                 "host": {"node": platform.node(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
                          "ray": ray.__version__, "python": platform.python_version(), "cards_label": label},
                 "child_env": CHILD_ENV, "config_set": a.config_set, "sweep_set": a.sweep_set}
    print(f"command: {res['command']}")
    print(f"cards: {cards or 'none (CPU dry run)'}", flush=True)
    if a.do_dp:
        res["data_parallel"] = data_parallel(a, data, n_file, storage, gpu_ids)
    if a.do_sweep:
        res["sweep"] = node_sweep(a, data, n_file, storage, gpu_ids)
    res["total_wall_s"] = time.time() - t_start
    res["markdown"] = report(a, res)
    print()
    print(res["markdown"])
    print(f"\nTotal wall time {res['total_wall_s']:.0f} s" + (f"; experiments kept in {storage}" if a.storage else ""))
    for part in ([*res.get("data_parallel", {}).get("runs", [])] + list(res.get("sweep", {}).get("runs", {}).values())):
        if part.get("log_tail"):
            print(f"\n--- log tail of {part['name']} ---\n{part['log_tail'][-1500:]}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    tmp.cleanup()


if __name__ == "__main__":
    main()
