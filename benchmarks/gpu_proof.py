"""GPU proof: what one trial takes on a card, how trials pack onto it, the 250-jet seed case and a real
sweep, with the costs around them. Writes ``gpu_proof.json`` (every number) and ``gpu_proof.md`` (the
tables) to ``--out`` and prints the tables.

Steps (``--skip`` any of them):
  memory    the bare engine (``engine.fit`` in a fresh process, save_dir + TensorBoard dir as a trial
            has them) on ``--memory-jets`` jets at the default config (batch 8, accumulation 4) for
            ``--memory-epochs`` epochs, its allocator capped to one trial's share of a
            ``--card-gb`` card as the sweep runner caps it. Peak memory two ways: torch's allocator
            (allocated, reserved) and the whole process as the driver sees it (nvidia-smi, i.e.
            NVML, polled every 0.2 s); the CUDA context is the difference. Also what the runner
            measures for sizing (``measure_trial_memory``) and the share it gives.
  packing   k = ``--pack-ks`` identical training processes at once on the card, each capped to a
            ``--card-gb`` card's 1/4 share; aggregate jets/s of each k over k = 1's. The processes
            start once and train in phases (k of them active per phase), so imports are paid once.
  sweeps    one Ray instance (a child process) runs, in order:
            overhead  the ``memory`` step's data, config and epochs as a one-trial sweep: Ray's per-epoch
                      overhead over the bare engine;
            seed      ``sweeps/seed_250_jets.yaml`` on the first 250 jets of ``--data``, GPU shares from
                      ``gpu_memory_gb: --card-gb`` (the runner picks the fraction);
            real      ``sweeps/kl_caps.yaml`` on ``--real-jets`` jets of ``--data``;
            then ``--gen-jets`` jets sampled from the real sweep's best trial and ``hvae-ray evaluate``
            against ``--heldout`` (real jets no trial saw).
            For each sweep: wall time, GPU-busy fraction of the wall time (utilisation > 0 in
            nvidia-smi samples every 0.2 s), per-trial start-up and the per-epoch report gap.

Per-trial start-up is given two ways: Tune's (trial start → first report, less that epoch; a standby
trial's wait for a free share included) and the critical path (the training worker's launch → first
report, less that epoch): what a freed share waits for before it trains again.

Usage: benchmarks/gpu_proof.sh --data JETS --heldout REAL_JETS [--out DIR] [sizes, see --help]
Needs the project importable, Ray, a CUDA GPU and nvidia-smi; the data files are Parquet/npz/h5 jets
(``hvae-ray data generate``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_core import load_sample, nvidia_smi_apps  # noqa: E402 - the benchmarks directory is on sys.path just above
from bench_sweep import run_logged  # noqa: E402

MiB = 2**20
GiB = 2**30


# --------------------------------------------------------------------------------------------------
# helpers


def gpu_facts() -> dict:
    q = "name,memory.total,driver_version"
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        name, total, driver = (x.strip() for x in line.split(","))
        return {"gpu": name, "gpu_memory_mib": float(total), "driver": driver}
    except Exception:  # noqa: BLE001 - no nvidia-smi: no facts
        return {"gpu": None}


def median(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def window(samples: list[tuple[float, float, float]], t0: float, t1: float) -> dict:
    """GPU utilisation samples (time, util %, used MiB) within [t0, t1]."""
    s = [x for x in samples if t0 <= x[0] <= t1]
    if not s:
        return {"samples": 0}
    return {"samples": len(s), "busy_fraction": sum(u > 0 for _, u, _ in s) / len(s),
            "util_mean_pct": statistics.fmean(u for _, u, _ in s), "used_peak_mib": max(m for *_, m in s)}


def run_py(args: list[str], env: dict | None = None, timeout: float = 600) -> dict:
    """A child Python process printing ``RESULT <json>``; {'error': ...} when it does not."""
    proc = subprocess.run([sys.executable, "-u", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1], "stderr_tail": proc.stderr[-3000:]}


def cap_allocator(card_gb: float, share: float) -> float:
    """Cap this process's allocator to ``share`` of a ``card_gb`` card, as a sweep trial is capped."""
    import torch

    from hvae_ray.sweep.resources import allocator_fraction

    total = torch.cuda.get_device_properties(0).total_memory
    frac = allocator_fraction(share, card_gb * GiB, total)
    torch.cuda.set_per_process_memory_fraction(frac, 0)
    return frac


# --------------------------------------------------------------------------------------------------
# 1. memory (and the bare engine's epoch times for the overhead comparison)


def memory_child(a) -> dict:
    t_start = time.perf_counter()
    import torch

    from hvae_ray.config import Config
    from hvae_ray.engine import fit
    from hvae_ray.sweep.resources import gpu_fraction, measure_trial_memory, trial_footprint
    from hvae_ray.sweep.spec import ResourceSpec

    frac = cap_allocator(a.card_gb, 0.25)
    cfg = Config().with_overrides({"epochs": a.memory_epochs})
    sample = load_sample(a.data, a.memory_jets)
    stamps: list[tuple[float, float]] = []
    threads: list[int] = []

    def cb(rep):
        stamps.append((rep.metrics["epoch_time_s"], time.perf_counter()))
        threads.append(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        fit(cfg, sample, save_dir=Path(tmp) / "run", log_dir=Path(tmp) / "tb", progress=False, device="cuda",
            callbacks=[cb])
    torch.cuda.synchronize()
    res = {"pid": os.getpid(), "allocator_fraction": frac, "jets": len(sample), "epochs": a.memory_epochs,
           "batch_size": cfg.batch_size, "accumulation": cfg.gradient_accumulation_steps,
           "peak_allocated_mib": torch.cuda.max_memory_allocated() / MiB,
           "peak_reserved_mib": torch.cuda.max_memory_reserved() / MiB,
           "epoch_time_s": [s[0] for s in stamps], "threads_in_training": threads[-1] if threads else None,
           "interval_s": [stamps[0][1] - t_start] + [b[1] - x[1] for x, b in zip(stamps, stamps[1:])]}
    res["process_mib_now"] = (nvidia_smi_apps() or {}).get(os.getpid())
    measured = measure_trial_memory(cfg=cfg, use_cache=False)  # what the runner sizes shares with
    res["runner_measured"] = {k: v / MiB for k, v in measured.items() if isinstance(v, float)} if measured else None
    if measured:
        trial, context = trial_footprint(measured)
        res["runner_share"] = gpu_fraction(a.card_gb * GiB, trial, ResourceSpec().headroom, context)
    return res


def step_memory(a, out: dict, gpu) -> None:
    import threading

    peaks: dict[int, float] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for pid, mib in (nvidia_smi_apps() or {}).items():
                peaks[pid] = max(peaks.get(pid, 0.0), mib)
            stop.wait(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    r = run_py([__file__, "--child", "memory", *a.child_args])
    stop.set()
    th.join()
    if "error" in r:
        out["memory"] = r
        return
    from hvae_ray.sweep.resources import CUDA_CONTEXT

    r["process_peak_mib"] = peaks.get(r["pid"])  # the fit's peak; the runner's burst runs in its own process
    r["context_mib"] = (r["process_peak_mib"] - r["peak_reserved_mib"]) if r["process_peak_mib"] else None
    share_mib = a.card_gb * 1024 / 4
    r["share_mib"] = share_mib
    r["fits_quarter_share"] = bool(r["process_peak_mib"] and r["process_peak_mib"] <= share_mib)
    r["assumed_context_mib"] = CUDA_CONTEXT / MiB
    out["memory"] = r


# --------------------------------------------------------------------------------------------------
# 2. packing


def pack_child(a) -> dict:
    import torch

    from hvae_ray import engine
    from hvae_ray.config import Config

    torch.cuda.set_device(0)
    frac = cap_allocator(a.card_gb, 0.25)
    cfg = Config()
    dev = torch.device("cuda")
    sample = load_sample(a.data, a.pack_jets)
    splits = engine.prepare(cfg, sample, device=dev)
    warm = engine.Trainer(cfg, engine.prepare(cfg, sample.subset(splits.train[:80]), splits.normaliser, dev), dev)
    warm.train_epoch(0)  # warm-up: CUDA context, kernels, allocator
    del warm
    run = engine.Trainer(cfg, splits, dev)
    n_train = len(splits.train)
    torch.cuda.synchronize()
    bar = Path(a.barrier)
    (bar / f"ready.{a.index}").touch()
    for k in a.pack_k_list:
        go = bar / f"go.{k}"
        while not go.exists():
            time.sleep(0.01)
        res: dict = {"index": a.index, "k": k, "active": a.index < k, "pid": os.getpid(), "allocator_fraction": frac}
        if a.index < k:
            torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            for e in range(a.pack_epochs):
                run.train_epoch(e)
            torch.cuda.synchronize()
            res.update(t0=t0, t1=time.time(), jets=n_train * a.pack_epochs,
                       peak_reserved_mib=torch.cuda.max_memory_reserved() / MiB)
        (bar / f"done.{k}.{a.index}").write_text(json.dumps(res))
    return {"ok": True}


def step_packing(a, out: dict, gpu) -> None:
    ks = a.pack_k_list
    n = max(ks)
    with tempfile.TemporaryDirectory() as bar:
        args = [__file__, "--child", "pack", "--barrier", bar, *a.child_args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as a trial with cpus_per_worker 1 gets it from Ray
        procs = [subprocess.Popen([sys.executable, "-u", *args, "--index", str(i)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(n)]
        t_start = time.time()
        while len(list(Path(bar).glob("ready.*"))) < n:
            if any(p.poll() is not None for p in procs) or time.time() - t_start > 300:
                errs = [p.communicate()[1][-1500:] for p in procs if p.poll() is not None]
                for p in procs:
                    p.kill()
                out["packing"] = {"error": "a packing worker failed to start", "stderr_tail": errs[:1]}
                return
            time.sleep(0.1)
        phases = []
        for k in ks:
            mem: dict[int, float] = {}
            Path(bar, f"go.{k}").touch()
            tk = time.time()
            while len(list(Path(bar).glob(f"done.{k}.*"))) < n:
                for pid, mib in (nvidia_smi_apps() or {}).items():
                    mem[pid] = max(mem.get(pid, 0.0), mib)
                time.sleep(0.2)
                if time.time() - tk > 600:
                    break
            rows = [json.loads(f.read_text()) for f in sorted(Path(bar).glob(f"done.{k}.*"))]
            act = [r for r in rows if r.get("active")]
            span = max(r["t1"] for r in act) - min(r["t0"] for r in act)
            ph = {"k": k, "jets_per_s": sum(r["jets"] for r in act) / span, "span_s": span,
                  "per_process_jets_per_s": [r["jets"] / (r["t1"] - r["t0"]) for r in act],
                  "process_mib": [mem.get(r["pid"]) for r in act],
                  "peak_reserved_mib": [r["peak_reserved_mib"] for r in act],
                  "gpu": window(gpu.util, min(r["t0"] for r in act), max(r["t1"] for r in act))}
            phases.append(ph)
        for p in procs:
            p.wait(timeout=60)
    base = phases[0]["jets_per_s"] if phases and phases[0]["k"] == 1 else None
    for ph in phases:
        ph["speedup"] = ph["jets_per_s"] / base if base else None
    out["packing"] = {"jets": a.pack_jets, "epochs": a.pack_epochs, "share_of_card_gb": a.card_gb,
                      "phases": phases}


# --------------------------------------------------------------------------------------------------
# 3. sweeps (one Ray instance for all of them)


def sweeps_child(a) -> dict:
    import yaml

    from hvae_ray.sweep.tune import run_sweep

    storage = Path(a.storage)
    storage.mkdir(parents=True, exist_ok=True)
    data = str(Path(a.data).resolve())
    card = {"resources.gpu_fraction": None, "resources.gpu_memory_gb": a.card_gb,
            "resources.trial_memory_mb": "auto"}
    if a.cpu_dry_run:
        card = {"resources.gpu_fraction": 0, "resources.gpu_memory_gb": None}
    plan = []
    if "overhead" not in a.skip:
        f = storage / "overhead.yaml"
        f.write_text(yaml.safe_dump({
            "name": "overhead", "config": {"epochs": a.memory_epochs, "data.max_jets": a.memory_jets},
            "scheduler": {"max_t": a.memory_epochs, "grace_period": a.memory_epochs}, "num_samples": 1,
            "resources": {"num_workers": 1, "cpus_per_worker": 1.0, **({"gpu_fraction": 0} if a.cpu_dry_run else
                                                                      {"gpu_memory_gb": a.card_gb})},
            "data": {"path": data}}, sort_keys=False))
        plan.append(("overhead", str(f), {}))
    if "seed" not in a.skip:
        ov = {**card, "data.path": data, "config.data.max_jets": 250, "num_samples": a.seed_samples,
              "scheduler.max_t": a.seed_max_t, "scheduler.grace_period": a.seed_grace, "config.epochs": a.seed_max_t}
        if a.standby is not None:
            ov["standby_trials"] = a.standby
        plan.append(("seed", str(REPO / "sweeps" / "seed_250_jets.yaml"), ov))
    if "real" not in a.skip:
        ov = {**card, "data.path": data, "config.data.max_jets": a.real_jets, "num_samples": a.real_samples,
              "scheduler.max_t": a.real_max_t, "scheduler.grace_period": a.real_grace, "config.epochs": a.real_max_t}
        for s in a.real_set or []:
            k, _, v = s.partition("=")
            ov[f"config.{k}"] = yaml.safe_load(v)
        if a.standby is not None:
            ov["standby_trials"] = a.standby
        plan.append(("real", str(REPO / "sweeps" / "kl_caps.yaml"), ov))
    done = {}
    for name, path, ov in plan:
        t0 = time.time()
        res = run_sweep(path, ov, name=f"{name}-{int(t0)}", storage=str(storage))
        done[name] = {"experiment_dir": str(res.experiment_dir), "t0": t0, "t1": time.time(),
                      "overrides": {k: v for k, v in ov.items() if k != "data.path"}}
        Path(a.storage, "sweeps_done.json").write_text(json.dumps(done))
    return done


def trial_timing(exp: Path) -> dict:
    """Start-up (Tune's and the critical path) and per-epoch report gaps from each trial's result rows."""
    from hvae_ray.trials import read_jsonl

    tune_startup, path_startup, gaps, epoch_times, intervals = [], [], [], [], []
    for d in sorted(p for p in exp.iterdir() if p.is_dir() and p.name.startswith("trial_")):
        rows = [r for r in read_jsonl(d / "result.json") if "epoch_time_s" in r]
        if not rows:
            continue
        first = rows[0]
        tune_startup.append(first["time_this_iter_s"] - first["epoch_time_s"])
        if "worker_started_at" in first and "reported_at" in first:
            path_startup.append(first["reported_at"] - first["worker_started_at"] - first["epoch_time_s"])
        # between two reports, what the worker spent outside the engine's epoch (validation, checkpoint,
        # the report itself): from the worker's own clock, so Tune's queueing does not blur it
        gaps += [b["reported_at"] - x["reported_at"] - b["epoch_time_s"] for x, b in zip(rows, rows[1:])
                 if "reported_at" in x and "reported_at" in b]
        epoch_times += [r["epoch_time_s"] for r in rows[1:]]
        intervals += [r["time_this_iter_s"] for r in rows[1:]]  # report to report, as Tune saw it
    return {"tune_startup_s": tune_startup, "tune_startup_median_s": median(tune_startup),
            "critical_startup_s": path_startup, "critical_startup_median_s": median(path_startup),
            "report_gap_median_s": median(gaps), "epoch_time_median_s": median(epoch_times),
            "interval_median_s": median(intervals)}


def kl_slope(kl: list[float]) -> float | None:
    """Least-squares slope of the validation KL (nats per epoch); near 0 = levelled off."""
    import numpy as np

    kl = [k for k in kl if k is not None and math.isfinite(k)]
    if len(kl) < 3:
        return None
    return float(np.polyfit(np.arange(len(kl)), kl, 1)[0])


def summarise_sweep(name: str, info: dict, gpu) -> dict:
    from hvae_ray.trials import load_trials, read_jsonl

    exp = Path(info["experiment_dir"])
    state = json.loads((exp / "hvae_sweep.json").read_text())
    table = load_trials(exp).to_pylist()
    params = [c for c in (table[0] if table else {}) if c.startswith("param.")]
    keep = ["trial_id", "status", *params, "best_val_objective", "last_val_kl", "epochs", "wall_time_s",
            "error", "best_checkpoint", "trial_dir"]
    rows = [{k: t.get(k) for k in keep} for t in table]
    import yaml

    for row in rows:
        log = [r for r in read_jsonl(Path(row["trial_dir"]) / "engine" / "metrics.jsonl") if "val_kl" in r]
        row["kl_slope_last10"] = kl_slope([r["val_kl"] for r in log][-10:])
        cfg_file = Path(row["trial_dir"]) / "engine" / "config.yaml"
        if cfg_file.is_file():  # the trial's effective KL cap and loss weights, searched or not
            cfg = yaml.safe_load(cfg_file.read_text()) or {}
            row["kl_max_weight"] = cfg.get("kl_max_weight")
            row["loss_weights"] = cfg.get("loss_weights")
    counts: dict[str, int] = {}
    for t in table:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    wall = info["t1"] - info["t0"]
    s = {"wall_s": wall, "trials": len(table), "statuses": counts, "trials_per_hour": len(table) / wall * 3600,
         "gpu_share": state.get("gpu_share"), "trial_memory_mib": (state.get("trial_bytes") or 0) / MiB or None,
         "overrides": info["overrides"], "gpu": window(gpu.util, info["t0"], info["t1"]), "table": rows,
         **trial_timing(exp)}
    scored = [t for t in table if t.get("best_val_objective") is not None]
    if scored:
        best = min(scored, key=lambda t: t["best_val_objective"])
        log = [r for r in read_jsonl(Path(best["trial_dir"]) / "engine" / "metrics.jsonl") if "epoch" in r]
        s["best"] = {"trial_id": best["trial_id"], "params": {p: best[p] for p in params},
                     "best_val_objective": best["best_val_objective"], "best_checkpoint": best["best_checkpoint"],
                     "epochs": [int(r["epoch"]) for r in log], "val_kl": [r.get("val_kl") for r in log],
                     "train_total": [r.get("train_total") for r in log],
                     "val_objective": [r.get("val_objective") for r in log]}
    return s


def step_sweeps(a, out: dict, gpu) -> None:
    storage = Path(a.storage)
    storage.mkdir(parents=True, exist_ok=True)
    log = storage / "sweeps.log"
    returncode, timed_out, _ = run_logged([sys.executable, "-u", __file__, "--child", "sweeps", *a.child_args], log,
                                          a.sweep_timeout)
    if timed_out:
        out["sweeps_error"] = f"sweeps stopped after {a.sweep_timeout:.0f} s"
    done_file = storage / "sweeps_done.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    text = [ln for ln in log.read_text(errors="replace").splitlines() if not ln.startswith(("│", "╭", "╰", "├"))]
    out["sweeps_log_tail"] = "\n".join(text[-60:])
    if returncode not in (0, None) and not out.get("sweeps_error"):
        out["sweeps_error"] = "sweep child failed: " + "\n".join(text[-15:])
    for name, info in done.items():
        try:
            out[f"sweep_{name}"] = summarise_sweep(name, info, gpu)
        except Exception as e:  # noqa: BLE001 - a summary that fails must not hide the others
            out[f"sweep_{name}"] = {"error": repr(e)}
    o, m = out.get("sweep_overhead"), out.get("memory")
    if o and m and "error" not in m and o.get("epoch_time_median_s"):
        bare_ep = median(m["epoch_time_s"][1:])
        bare_iv = median(m["interval_s"][1:])
        ray_iv = o["interval_median_s"]
        o["vs_bare"] = {"bare_epoch_s": bare_ep, "ray_epoch_s": o["epoch_time_median_s"], "bare_interval_s": bare_iv,
                        "ray_interval_s": ray_iv,
                        "epoch_ratio": o["epoch_time_median_s"] / bare_ep if bare_ep else None,
                        "interval_ratio": ray_iv / bare_iv if ray_iv and bare_iv else None}


def step_evaluate(a, out: dict) -> None:
    best = (out.get("sweep_real") or {}).get("best")
    if not best or not best.get("best_checkpoint"):
        out["evaluate"] = {"error": "the real sweep has no best checkpoint"}
        return
    gen = Path(a.storage) / "generated.npz"
    t0 = time.perf_counter()
    cmd_s = [sys.executable, "-m", "hvae_ray", "sample", "--checkpoint", best["best_checkpoint"], "--n-jets",
             str(a.gen_jets), "--out", str(gen), "--device", "cpu" if a.cpu_dry_run else "cuda"]
    p = subprocess.run(cmd_s, capture_output=True, text=True)
    t1 = time.perf_counter()
    cmd_e = [sys.executable, "-m", "hvae_ray", "evaluate", "--real", a.heldout, "--generated", str(gen), "--json"]
    q = subprocess.run(cmd_e, capture_output=True, text=True) if p.returncode == 0 else p
    t2 = time.perf_counter()
    if q.returncode != 0:
        out["evaluate"] = {"error": (q.stderr.strip().splitlines() or ["failed"])[-1]}
        return
    out["evaluate"] = {"metrics": json.loads(q.stdout), "sample_s": t1 - t0, "evaluate_s": t2 - t1,
                       "commands": [shlex.join(["hvae-ray", *cmd_s[3:]]), shlex.join(["hvae-ray", *cmd_e[3:]])]}


# --------------------------------------------------------------------------------------------------
# report


def f(x, d=1, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{d}f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def g(x, d=3):
    return "n/a" if x is None else f"{x:.{d}g}"


def markdown(res: dict) -> str:
    L = [f"# GPU proof: {res['env'].get('gpu')}, {res['env']['date']}", "",
         f"Command: `{res['env']['command']}`  ", f"Host: {res['env']['cpus']} CPU cores, driver "
         f"{res['env'].get('driver')}, torch {res['env']['torch']}, Ray {res['env']['ray']}, Python "
         f"{res['env']['python']}. Total wall time {f(res.get('total_s'), 0)} s.", ""]
    m = res.get("memory")
    if m and "error" not in m:
        L += ["## 1. Memory of one trial (default config: batch 8, accumulation 4)", "",
              "| what | MiB |", "|---|---|",
              f"| torch peak allocated | {f(m['peak_allocated_mib'])} |",
              f"| torch peak reserved | {f(m['peak_reserved_mib'])} |",
              f"| whole process, peak (nvidia-smi / NVML) | {f(m['process_peak_mib'])} |",
              f"| of which CUDA context and libraries (process − reserved) | {f(m['context_mib'])} |",
              f"| the runner's sizing burst: whole process | {f((m.get('runner_measured') or {}).get('process'))} |",
              f"| one trial's share: 1/4 of a {res['args']['card_gb']:g} GB card | {f(m['share_mib'])} |", "",
              f"{m['jets']} jets, {m['epochs']} epochs through `engine.fit` (validation and W1m included), allocator "
              f"capped to {f(m['allocator_fraction'], 4)} of the device (the share less the assumed "
              f"{f(m['assumed_context_mib'], 0)} MiB context), {m.get('threads_in_training')} CPU thread(s) while "
              f"training. Fits the 1/4 share: **{m['fits_quarter_share']}**; the runner's share at "
              f"`gpu_memory_gb: {res['args']['card_gb']:g}` (headroom 1.15 on the allocator's part): "
              f"{g(m.get('runner_share'))}.", ""]
    elif m:
        L += [f"## 1. Memory: FAILED: {m['error']}", ""]
    p = res.get("packing")
    if p and "error" not in p:
        L += ["## 2. Packing identical trials on one card (each capped to a 4 GB card's 1/4 share)", "",
              "| k | aggregate jets/s | × k=1 | per process jets/s | per process MiB (nvidia-smi) | GPU busy "
              "| card used MiB |",
              "|---|---|---|---|---|---|---|"]
        for ph in p["phases"]:
            L.append(f"| {ph['k']} | {f(ph['jets_per_s'])} | {g(ph['speedup'])} | "
                     f"{', '.join(f(x, 0) for x in ph['per_process_jets_per_s'])} | "
                     f"{', '.join(f(x, 0) for x in ph['process_mib'])} | {g(ph['gpu'].get('busy_fraction'))} | "
                     f"{f(ph['gpu'].get('used_peak_mib'), 0)} |")
        L += ["", f"{p['jets']} jets (70 % train), {p['epochs']} epoch(s) per process per phase, one CPU thread "
              "each; aggregate = all jets trained / (last finish − first start).", ""]
    elif p:
        L += [f"## 2. Packing: FAILED: {p['error']}", ""]
    for key, title in (("sweep_seed", "3. The seed's case: sweeps/seed_250_jets.yaml"),
                       ("sweep_real", "4. A real sweep: sweeps/kl_caps.yaml")):
        s = res.get(key)
        if not s:
            continue
        if "error" in s:
            L += [f"## {title}: FAILED: {s['error']}", ""]
            continue
        L += [f"## {title}", "", f"Overrides: `{json.dumps(s['overrides'])}`; GPU share per trial "
              f"{g(s['gpu_share'])} (trial memory {f(s['trial_memory_mib'], 0)} MiB). Statuses: {s['statuses']}.", ""]
        weights = {json.dumps(t.get("loss_weights"), sort_keys=True) for t in s["table"] if t.get("loss_weights")}
        if len(weights) == 1:
            L += [f"Loss weights (the same in every trial): `{weights.pop()}`.", ""]
        params = [c for c in (s["table"][0] if s["table"] else {}) if c.startswith("param.")]
        if len(weights) > 1:  # loss weights differ between trials: one column each
            for t in s["table"]:
                for k, v in (t.get("loss_weights") or {}).items():
                    t.setdefault(f"param.loss_weights.{k}", v)
            params += sorted({c for t in s["table"] for c in t if c.startswith("param.loss_weights.")} - set(params))
        L += ["| trial | status | " + " | ".join(c[6:] for c in params)
              + " | best val_objective | last val KL | KL slope, last 10 epochs | epochs |",
              "|---|---|" + "---|" * len(params) + "---|---|---|---|"]
        for t in sorted(s["table"], key=lambda t: (t["best_val_objective"] is None, t["best_val_objective"] or 0)):
            L.append(f"| {t['trial_id']} | {t['status']} | " + " | ".join(g(t[c]) for c in params) +
                     f" | {g(t['best_val_objective'], 4)} | {g(t['last_val_kl'])} | {g(t.get('kl_slope_last10'), 2)} "
                     f"| {t['epochs']} |")
        b = s.get("best")
        if b:
            tail = list(zip(b["epochs"], b["val_kl"], b["train_total"]))[-8:]
            L += ["", f"Best trial {b['trial_id']}: val KL over its last epochs (epoch: KL / train loss): " +
                  ", ".join(f"{e}: {g(k)} / {g(t)}" for e, k, t in tail)]
        L.append("")
    e = res.get("evaluate")
    if e and "error" not in e:
        mt = e["metrics"]
        L += [f"## 4b. Best trial of the real sweep: {int(mt['n_gen'])} generated vs {int(mt['n_real'])} held-out "
              "real jets", "", "| metric | generated | real-vs-real floor |", "|---|---|---|"]
        for k in ("w1m", "w1p_mean", "w1efp_mean", "fpd", "kpd"):
            if k in mt:
                L.append(f"| {k} | {g(mt[k])} ± {g(mt.get(k + '_err'), 2)} | {g(mt.get(k + '_floor'))} ± "
                         f"{g(mt.get(k + '_floor_err'), 2)} |")
        L += ["", "Commands: " + "; ".join(f"`{c}`" for c in e["commands"]), ""]
    elif e:
        L += [f"## 4b. Evaluate: FAILED: {e['error']}", ""]
    rows = [(n, res.get(f"sweep_{n}")) for n in ("overhead", "seed", "real")]
    rows = [(n, s) for n, s in rows if s and "error" not in s]
    if rows:
        L += ["## 5. Efficiency", "",
              "| sweep | wall s | trials | GPU busy | mean util % | start-up, Tune (median s) | start-up, critical "
              "path (median s) | report gap (median s) |", "|---|---|---|---|---|---|---|---|"]
        for n, s in rows:
            L.append(f"| {n} | {f(s['wall_s'], 0)} | {s['trials']} | {g(s['gpu'].get('busy_fraction'))} | "
                     f"{f(s['gpu'].get('util_mean_pct'))} | {f(s['tune_startup_median_s'])} | "
                     f"{f(s['critical_startup_median_s'])} | {f(s['report_gap_median_s'], 3)} |")
        vb = (res.get("sweep_overhead") or {}).get("vs_bare")
        if vb:
            L += ["", f"Ray overhead per epoch (one trial alone, {res['args']['memory_jets']} jets, epochs after the "
                  f"first): engine epoch bare {f(vb['bare_epoch_s'], 2)} s vs in Ray {f(vb['ray_epoch_s'], 2)} s "
                  f"(×{g(vb['epoch_ratio'])}); report to report bare {f(vb['bare_interval_s'], 2)} s vs Ray "
                  f"{f(vb['ray_interval_s'], 2)} s (×{g(vb['interval_ratio'])})."]
        L += ["", "Start-up, Tune: trial start → first report less that epoch (a standby trial's wait for a free "
              "share included). Critical path: the training worker's launch → first report less that epoch."]
    for k in ("sweeps_error",):
        if res.get(k):
            L += ["", f"**{k}**: {res[k][:500]}"]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------------------------------


class _NoGpu:
    util: list = []

    def stop(self) -> dict:
        return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="jets for training (at least --real-jets of them)")
    p.add_argument("--heldout", required=True, help="real jets no trial trains on, for evaluate")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/gpu-proof-DATE)")
    p.add_argument("--storage", default=None, help="sweep storage (default: a temporary directory)")
    p.add_argument("--card-gb", type=float, default=4.0, help="the card trials are sized for")
    p.add_argument("--memory-jets", type=int, default=2000)
    p.add_argument("--memory-epochs", type=int, default=3)
    p.add_argument("--pack-ks", default="1,2,4,6")
    p.add_argument("--pack-jets", type=int, default=3000)
    p.add_argument("--pack-epochs", type=int, default=1)
    p.add_argument("--seed-samples", type=int, default=8)
    p.add_argument("--seed-max-t", type=int, default=45)
    p.add_argument("--seed-grace", type=int, default=15)
    p.add_argument("--real-jets", type=int, default=20000)
    p.add_argument("--real-samples", type=int, default=4)
    p.add_argument("--real-max-t", type=int, default=3)
    p.add_argument("--real-grace", type=int, default=1)
    p.add_argument("--real-set", action="append", metavar="KEY=VALUE",
                   help="config override for the real sweep (default: batch_size=32, "
                        "gradient_accumulation_steps=1: the same 32 jets per optimiser step as 8 x 4)")
    p.add_argument("--standby", type=int, default=None, help="standby_trials for the seed and real sweeps "
                                                             "(default: the sweep file's, auto)")
    p.add_argument("--gen-jets", type=int, default=10000)
    p.add_argument("--skip", default="", help="comma list of: memory,packing,overhead,seed,real,evaluate")
    p.add_argument("--sweep-timeout", type=float, default=480)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="check the plumbing on a host without CUDA: sweeps and evaluate on CPUs, no GPU figures")
    # internal
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.pack_k_list = [int(k) for k in a.pack_ks.split(",") if k.strip()]
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if a.real_set is None:
        a.real_set = ["batch_size=32", "gradient_accumulation_steps=1"]
    if a.child:
        fn = {"memory": memory_child, "pack": pack_child, "sweeps": sweeps_child}[a.child]
        print("RESULT " + json.dumps(fn(a)), flush=True)
        return

    t_start = time.time()
    out_dir = Path(a.out or REPO / "benchmarks" / "results" / f"gpu-proof-{time.strftime('%Y-%m-%d')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="gpu-proof-")
    a.storage = str(Path(a.storage or tmp.name).resolve())
    a.data, a.heldout = str(Path(a.data).resolve()), str(Path(a.heldout).resolve())
    skip_arg = ",".join(sorted(a.skip)) or "none"
    a.child_args = ["--data", a.data, "--heldout", a.heldout, "--storage", a.storage, "--card-gb", str(a.card_gb),
                    "--memory-jets", str(a.memory_jets), "--memory-epochs", str(a.memory_epochs),
                    "--pack-ks", a.pack_ks, "--pack-jets", str(a.pack_jets), "--pack-epochs", str(a.pack_epochs),
                    "--seed-samples", str(a.seed_samples), "--seed-max-t", str(a.seed_max_t),
                    "--seed-grace", str(a.seed_grace), "--real-jets", str(a.real_jets),
                    "--real-samples", str(a.real_samples), "--real-max-t", str(a.real_max_t),
                    "--real-grace", str(a.real_grace), "--skip", skip_arg,
                    *(["--cpu-dry-run"] if a.cpu_dry_run else []),
                    *[x for s in a.real_set for x in ("--real-set", s)],
                    *(["--standby", str(a.standby)] if a.standby is not None else [])]
    import ray
    import torch
    from bench_sweep import GpuSampler

    res: dict = {"env": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": shlex.join(sys.argv),
                         "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                         "ray": ray.__version__, **gpu_facts()},
                 "args": {k: v for k, v in vars(a).items() if k not in ("child_args",)}}
    res["args"]["skip"] = sorted(a.skip)
    if a.cpu_dry_run:
        a.skip |= {"memory", "packing"}
        gpu = _NoGpu()
    elif not res["env"].get("gpu") or not torch.cuda.is_available():
        sys.exit("gpu_proof: needs a CUDA GPU and nvidia-smi (or --cpu-dry-run)")
    else:
        gpu = GpuSampler().start()

    def save():
        res["total_s"] = time.time() - t_start
        (out_dir / "gpu_proof.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / "gpu_proof.md").write_text(markdown(res))

    steps = [("memory", step_memory), ("packing", step_packing)]
    for name, fn in steps:
        if name in a.skip:
            continue
        t = time.time()
        fn(a, res, gpu)
        print(f"[{time.time() - t_start:6.0f} s] {name} done in {time.time() - t:.0f} s", flush=True)
        save()
    if not {"overhead", "seed", "real"} <= a.skip:
        t = time.time()
        step_sweeps(a, res, gpu)
        print(f"[{time.time() - t_start:6.0f} s] sweeps done in {time.time() - t:.0f} s", flush=True)
        save()
    if "evaluate" not in a.skip and "real" not in a.skip:
        t = time.time()
        step_evaluate(a, res)
        print(f"[{time.time() - t_start:6.0f} s] evaluate done in {time.time() - t:.0f} s", flush=True)
    res["gpu_samples"] = len(gpu.util)
    gpu.stop()
    save()
    print((out_dir / "gpu_proof.md").read_text())
    tmp.cleanup()


if __name__ == "__main__":
    main()
