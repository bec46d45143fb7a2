"""Core throughput and GPU memory: graph building, training at the default config, processes per GPU.

Measures, each in a fresh process so that memory figures are clean:
  * graph building (raw_features + FeatureNormaliser.fit + build_graphs) in jets/s;
  * training throughput at the default config (batch 8, accumulation 4, hidden 64, latent 16; mixed
    precision on CUDA) through the engine's own epoch loop, first epoch excluded, in jets/s, batches/s
    and optimiser steps/s; plus the time of the per-epoch validation and W1m evaluation and the full
    ``engine.fit`` epoch time (first epoch excluded);
  * with CUDA: the peak GPU memory of one training process (torch allocated/reserved peaks, and the
    whole process as nvidia-smi and NVML see it) per phase (training, validation, W1m generation),
    what ``measure_trial_memory()`` returns for comparison, and several training processes sharing
    the one GPU (aggregate throughput vs one process, each process's memory).

Usage: python benchmarks/bench_core.py [--data FILE] [--jets 500] [--cpu-jets N] [--epochs 3]
           [--devices cpu,cuda] [--procs 4] [--pack-epochs 2] [--no-fit] [--set KEY=VALUE ...] [--json FILE]
Without --data, synthetic jets (10-30 particles) are used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 1024**2


# --------------------------------------------------------------------------------------------------
# Helpers shared by the driver and the workers


def load_sample(data: str | None, jets: int, seed: int = 0):
    """The first ``jets`` jets of ``data``, or synthetic jets (10-30 particles each) when data is None."""
    import numpy as np

    from hvae_ray.data.jets import from_padded

    if data:
        from hvae_ray.data.io import load_jets

        sample = load_jets(data)
        return sample.subset(np.arange(min(jets, len(sample)))) if jets else sample
    rng = np.random.default_rng(seed)
    p = np.zeros((jets, 30, 3), np.float32)
    mult = rng.integers(10, 31, jets)
    p[..., :2] = rng.normal(0, 0.15, (jets, 30, 2))
    pt = rng.exponential(1, (jets, 30)) * (np.arange(30)[None] < mult[:, None])
    p[..., 2] = pt / pt.sum(1, keepdims=True)
    return from_padded(p)


def make_config(overrides: list[str], device: str, epochs: int):
    from hvae_ray.config import Config, parse_override

    cfg = Config()
    ov = dict(parse_override(o) for o in overrides)
    ov.update({"device": "cpu" if device == "cpu" else "cuda", "epochs": max(epochs, 1)})
    return cfg.with_overrides(ov)


def nvidia_smi_apps() -> dict[int, float] | None:
    """pid → used MiB of every compute process on the GPU, or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    apps = {}
    for line in out.stdout.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                apps[int(parts[0])] = float(parts[1])
            except ValueError:
                pass
    return apps


def nvidia_smi_gpu() -> tuple[float, float] | None:
    """(memory.used MiB, utilization.gpu %) of GPU 0, or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
        used, util = (float(x) for x in out.stdout.strip().splitlines()[0].split(","))
        return used, util
    except Exception:  # noqa: BLE001 - no nvidia-smi: no figure
        return None


def nvml_used(index: int = 0) -> float | None:
    """Used memory of GPU ``index`` in bytes via NVML; an int index does not initialise CUDA."""
    try:
        import torch

        return float(torch.cuda.device_memory_used(index))
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------------
# Worker: one training process (run as a subprocess with --worker)


def worker(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from hvae_ray import engine

    if a.threads:
        torch.set_num_threads(a.threads)
    res: dict = {"pid": os.getpid(), "device": a.device, "threads": torch.get_num_threads()}
    cuda = a.device == "cuda"
    used0 = nvml_used(0) if cuda else None  # before any CUDA initialisation: the idle card
    if cuda:
        # Does measure_trial_memory()'s baseline read (device_memory_used(torch.device('cuda')))
        # itself initialise CUDA and create this process's context? If so its 'process' figure
        # leaves the context out.
        before = torch.cuda.is_initialized()
        torch.cuda.device_memory_used(torch.device("cuda"))
        after_used = nvml_used(0)
        res["probe_device_memory_used_inits_cuda"] = (not before) and torch.cuda.is_initialized()
        created = (after_used - used0) / MiB if used0 is not None and after_used is not None else None
        res["probe_context_mib_created_by_that_call"] = created
        res["gpu_name"] = torch.cuda.get_device_name(0)
    cfg = make_config(a.set or [], a.device, a.epochs)
    sample = load_sample(a.data, a.jets)
    t = time.perf_counter()
    splits = engine.prepare(cfg, sample, device=a.device)
    res["prepare_s"] = time.perf_counter() - t
    n_train, n_val = len(splits.train), len(splits.val)
    res.update(n_jets=len(sample), n_train=n_train, n_val=n_val, batch_size=cfg.batch_size,
               accum=cfg.gradient_accumulation_steps, hidden_dim=cfg.model.hidden_dim,
               latent_dim=cfg.model.latent_dim, mixed_precision=cfg.mixed_precision and cuda)
    dev = torch.device(a.device)
    run = engine.Trainer(cfg, splits, dev)
    res["amp_dtype"] = str(run.amp_dtype).replace("torch.", "") if run.use_amp else "float32"
    res["step_mode"] = run.step_mode
    if a.barrier:  # packing check: start training together
        Path(a.barrier, f"ready.{os.getpid()}").touch()
        while not Path(a.barrier, "go").exists():
            time.sleep(0.02)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    batches = math.ceil(n_train / cfg.batch_size)
    opt_steps = math.ceil(batches / cfg.gradient_accumulation_steps)
    times, starts = [], []
    for epoch in range(a.epochs):
        sync()
        starts.append(time.time())
        t = time.perf_counter()
        run.train_epoch(epoch)
        sync()
        times.append(time.perf_counter() - t)
    timed = times[1:] or times
    per_epoch = sum(timed) / len(timed)
    res.update(train_epoch_s=times, timed_start_unix=starts[1] if len(starts) > 1 else starts[0],
               timed_end_unix=time.time(), train_jets_per_s=n_train / per_epoch,
               train_batches_per_s=batches / per_epoch, train_opt_steps_per_s=opt_steps / per_epoch,
               timed_jets=n_train * len(timed))
    if cuda:
        res["train_peak_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / MiB
        res["train_peak_reserved_mib"] = torch.cuda.max_memory_reserved(dev) / MiB
        res["train_nvml_process_mib"] = ((nvml_used(0) - used0) / MiB) if used0 is not None else None
        apps = nvidia_smi_apps()
        res["train_nvidia_smi_mib"] = apps.get(os.getpid()) if apps is not None else None
        torch.cuda.reset_peak_memory_stats(dev)
    if a.barrier:
        res["barrier"] = True
        return res

    # Per-epoch validation and W1m (the rest of an engine epoch), second call timed.
    for phase, fn in (("evaluate", lambda: run.evaluate(a.epochs)), ("val_w1m", run.generation_metrics)):
        fn()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        res[f"{phase}_s"] = time.perf_counter() - t
        if cuda:
            res[f"{phase}_peak_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / MiB
            torch.cuda.reset_peak_memory_stats(dev)
    if cuda:
        res["all_peak_reserved_mib"] = torch.cuda.max_memory_reserved(dev) / MiB
        res["all_reserved_now_mib"] = torch.cuda.memory_reserved(dev) / MiB
        res["all_nvml_process_mib"] = ((nvml_used(0) - used0) / MiB) if used0 is not None else None
        apps = nvidia_smi_apps()
        res["all_nvidia_smi_mib"] = apps.get(os.getpid()) if apps is not None else None
        res["nvidia_smi_apps"] = apps

    if a.worker_fit:
        from hvae_ray.engine import fit

        stamps: list[tuple[float, float]] = []

        def cb(rep):
            stamps.append((rep.metrics["epoch_time_s"], time.perf_counter()))

        del run
        t = time.perf_counter()
        fit(cfg, sample, progress=False, device=dev, callbacks=[cb])
        res["fit_total_s"] = time.perf_counter() - t
        res["fit_epoch_time_s"] = [s[0] for s in stamps]
        steady = [s[0] for s in stamps[1:]] or [s[0] for s in stamps]
        res["fit_epoch_s"] = float(np.mean(steady))
        res["fit_train_jets_per_s"] = n_train / res["fit_epoch_s"]
        res["fit_first_epoch_s"] = stamps[0][0] if stamps else None
    return res


def run_worker(args: argparse.Namespace, device: str, *, epochs: int, fit: bool, barrier: str | None = None,
               threads: int = 0, background: bool = False):
    jets = args.cpu_jets if device == "cpu" and args.cpu_jets else args.jets
    cmd = [sys.executable, "-u", os.path.abspath(__file__), "--worker", "--device", device,
           "--jets", str(jets), "--epochs", str(epochs), "--threads", str(threads)]
    if args.data:
        cmd += ["--data", args.data]
    for s in args.set or []:
        cmd += ["--set", s]
    if fit:
        cmd.append("--worker-fit")
    if barrier:
        cmd += ["--barrier", barrier]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc if background else collect(proc)


def collect(proc) -> dict:
    out, err = proc.communicate()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (err.strip().splitlines() or ["no output"])[-1], "stderr_tail": err[-2000:]}


# --------------------------------------------------------------------------------------------------
# Driver


def bench_graphs(args) -> dict:
    import torch

    from hvae_ray.config import Config
    from hvae_ray.data.graphs import FeatureNormaliser, build_graphs, raw_features

    n = args.graph_jets or args.jets
    sample = load_sample(args.data, n)
    knn = Config().data.knn
    small = sample.subset(list(range(min(64, len(sample)))))
    raw = raw_features(small, knn)
    build_graphs(raw, FeatureNormaliser.fit(raw))  # warm-up (first calls of the ops)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        raw = raw_features(sample, knn)
        t1 = time.perf_counter()
        norm = FeatureNormaliser.fit(raw)
        t2 = time.perf_counter()
        graphs = build_graphs(raw, norm)
        t3 = time.perf_counter()
        runs.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    best = min(runs, key=lambda r: r[3])
    return {"jets": len(sample), "threads": torch.get_num_threads(), "raw_features_s": best[0],
            "normaliser_fit_s": best[1], "build_graphs_s": best[2], "total_s": best[3],
            "jets_per_s": len(graphs) / best[3], "build_graphs_jets_per_s": len(graphs) / best[2],
            "total_s_each_run": [r[3] for r in runs]}


def packing(args, single: dict) -> dict:
    """``args.procs`` training processes on the one GPU at once vs one alone."""
    k = args.procs
    cores = os.cpu_count() or 1
    threads = max(1, cores // k)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            s = nvidia_smi_gpu()
            if s:
                samples.append(s)
            stop.wait(0.25)

    idle = nvidia_smi_gpu()
    with tempfile.TemporaryDirectory() as barrier:
        procs = [run_worker(args, args.pack_device, epochs=args.pack_epochs, fit=False, barrier=barrier,
                            threads=threads, background=True) for _ in range(k)]
        deadline = time.time() + 600
        while len(list(Path(barrier).glob("ready.*"))) < k and time.time() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.1)
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        Path(barrier, "go").touch()
        results = [collect(p) for p in procs]
        stop.set()
        th.join()
    ok = [r for r in results if "error" not in r]
    out: dict = {"procs": k, "threads_per_proc": threads, "workers": results}
    if ok:
        start = min(r["timed_start_unix"] for r in ok)
        end = max(r["timed_end_unix"] for r in ok)
        out["aggregate_jets_per_s_window"] = sum(r["timed_jets"] for r in ok) / (end - start)
        out["aggregate_jets_per_s_sum"] = sum(r["train_jets_per_s"] for r in ok)
        out["single_jets_per_s"] = single.get("train_jets_per_s")
        if single.get("train_jets_per_s"):
            out["speedup_vs_single"] = out["aggregate_jets_per_s_window"] / single["train_jets_per_s"]
        out["per_proc_nvidia_smi_mib"] = [r.get("train_nvidia_smi_mib") for r in ok]
        out["per_proc_peak_reserved_mib"] = [r.get("train_peak_reserved_mib") for r in ok]
    if samples:
        base = idle[0] if idle else min(s[0] for s in samples)
        out["card_used_peak_mib"] = max(s[0] for s in samples)
        out["card_used_peak_minus_idle_mib"] = out["card_used_peak_mib"] - base
        out["util_mean_pct"] = sum(s[1] for s in samples) / len(samples)
    return out


def fmt(x, unit="", digits=1):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="jets file (default: synthetic jets)")
    p.add_argument("--jets", type=int, default=500, help="jets for training (split 70/15/15)")
    p.add_argument("--cpu-jets", type=int, default=0, help="jets for the CPU training run (default --jets)")
    p.add_argument("--graph-jets", type=int, default=0, help="jets for graph building (default --jets)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement (first excluded)")
    p.add_argument("--devices", default="cpu,cuda", help="comma list; cuda skipped without CUDA")
    p.add_argument("--procs", type=int, default=4, help="training processes sharing the GPU (0: skip)")
    p.add_argument("--pack-epochs", type=int, default=2, help="epochs per packed process (first excluded)")
    p.add_argument("--no-fit", dest="fit", action="store_false", help="skip the engine.fit epochs")
    p.add_argument("--memory-steps", type=int, default=20, help="steps for measure_trial_memory()")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (default config)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write all results as JSON")
    # internal: one worker process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-fit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pack-device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    import torch

    cuda = torch.cuda.is_available()  # does not initialise CUDA in this process
    results: dict = {"argv": sys.argv[1:], "torch": torch.__version__, "cpu_cores": os.cpu_count(),
                     "cuda": cuda, "data": args.data or "synthetic"}
    g = results["graphs"] = bench_graphs(args)
    print(f"graph building: {g['jets_per_s']:.0f} jets/s ({g['jets']} jets in {g['total_s']:.2f} s: "
          f"raw_features {g['raw_features_s']:.2f} s, normaliser fit {g['normaliser_fit_s']:.2f} s, "
          f"build_graphs {g['build_graphs_s']:.2f} s, {g['threads']} threads; best of 2)")

    for dev in [d.strip() for d in args.devices.split(",") if d.strip()]:
        if dev == "cuda" and not cuda:
            print("training cuda: n/a (no CUDA)")
            continue
        r = results[f"train_{dev}"] = run_worker(args, dev, epochs=args.epochs, fit=args.fit)
        if "error" in r:
            print(f"training {dev}: FAILED: {r['error']}")
            continue
        tag = f"training {dev} ({r['amp_dtype']}, batch {r['batch_size']} x accum {r['accum']}, " \
              f"hidden {r['hidden_dim']}, {r['n_train']} train jets)"
        print(f"{tag}: {r['train_jets_per_s']:.1f} jets/s, {r['train_batches_per_s']:.1f} batches/s, "
              f"{r['train_opt_steps_per_s']:.2f} optimiser steps/s (epochs "
              f"{', '.join(f'{x:.2f}' for x in r['train_epoch_s'])} s)")
        print(f"  validation {dev}: evaluate {r['evaluate_s']:.3f} s, W1m {r['val_w1m_s']:.3f} s "
              f"({r['n_val']} val jets) per epoch")
        if args.fit and "fit_epoch_s" in r:
            print(f"  engine.fit {dev}: {r['fit_epoch_s']:.3f} s/epoch after the first "
                  f"({r['fit_train_jets_per_s']:.1f} train jets/s incl. validation; first epoch "
                  f"{r['fit_first_epoch_s']:.2f} s)")
        if dev == "cuda":
            print(f"  GPU memory ({r.get('gpu_name')}), training: peak allocated "
                  f"{fmt(r['train_peak_allocated_mib'], ' MiB')}, peak reserved "
                  f"{fmt(r['train_peak_reserved_mib'], ' MiB')}, "
                  f"process (nvidia-smi) {fmt(r['train_nvidia_smi_mib'], ' MiB')}, process (NVML delta) "
                  f"{fmt(r['train_nvml_process_mib'], ' MiB')}")
            print(f"  GPU memory, + validation/W1m: peak allocated evaluate "
                  f"{fmt(r['evaluate_peak_allocated_mib'], ' MiB')}, W1m "
                  f"{fmt(r['val_w1m_peak_allocated_mib'], ' MiB')}, "
                  f"peak reserved {fmt(r['all_peak_reserved_mib'], ' MiB')}, process (nvidia-smi) "
                  f"{fmt(r['all_nvidia_smi_mib'], ' MiB')}, process (NVML delta) "
                  f"{fmt(r['all_nvml_process_mib'], ' MiB')}")
            print(f"  device_memory_used(torch.device('cuda')) initialises CUDA: "
                  f"{r['probe_device_memory_used_inits_cuda']} (context created by it: "
                  f"{fmt(r['probe_context_mib_created_by_that_call'], ' MiB')})")

    if cuda:
        from hvae_ray.sweep.resources import measure_trial_memory

        t = time.perf_counter()
        m = measure_trial_memory(args.memory_steps)
        results["measure_trial_memory"] = m
        results["measure_trial_memory_s"] = time.perf_counter() - t
        if m:
            print(f"measure_trial_memory(): allocated_peak {m['allocated_peak'] / MiB:.1f} MiB, "
                  f"reserved_peak "
                  f"{m['reserved_peak'] / MiB:.1f} MiB, process {m['process'] / MiB:.1f} MiB "
                  f"({results['measure_trial_memory_s']:.1f} s); nvidia-smi for a training process: "
                  f"{fmt(results.get('train_cuda', {}).get('train_nvidia_smi_mib'), ' MiB')}")
        else:
            print("measure_trial_memory(): None")
        if args.procs > 0 and "train_cuda" in results and "error" not in results["train_cuda"]:
            pk = results["packing"] = packing(args, results["train_cuda"])
            ok = [w for w in pk["workers"] if "error" not in w]
            print(f"packing: {pk['procs']} processes on one GPU ({pk['threads_per_proc']} threads each), "
                  f"{len(ok)} ok: aggregate {fmt(pk.get('aggregate_jets_per_s_window'), ' jets/s')} "
                  f"(sum of rates {fmt(pk.get('aggregate_jets_per_s_sum'), ' jets/s')}) vs 1 process "
                  f"{fmt(pk.get('single_jets_per_s'), ' jets/s')}: "
                  f"x{fmt(pk.get('speedup_vs_single'), '', 2)}")
            print(f"  per process nvidia-smi MiB: {pk.get('per_proc_nvidia_smi_mib')}; peak reserved MiB: "
                  f"{[fmt(x) for x in pk.get('per_proc_peak_reserved_mib') or []]}; card used peak minus "
                  f"idle "
                  f"{fmt(pk.get('card_used_peak_minus_idle_mib'), ' MiB')}, mean utilisation "
                  f"{fmt(pk.get('util_mean_pct'), ' %')}")
            for w in pk["workers"]:
                if "error" in w:
                    print(f"  worker FAILED: {w['error']}")
    else:
        print("GPU memory: n/a (no CUDA)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
