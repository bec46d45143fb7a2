"""Training throughput and memory: the PyG engine against the dense engine, side by side in one run.

Each measurement runs in a fresh process (clean memory figures): the engine's own :class:`Trainer` on
the default model at a given batch size × gradient accumulation, one warm-up epoch (the PyG engine
builds its hypergraphs there, the dense one captures its CUDA graph), then timed epochs; training
steps only, validation excluded. Reported: jets/s, ms per optimiser step, peak memory allocated and
reserved by torch and, on CUDA, the whole process (NVML); the start-up steps (import, prepare, trainer,
first step); for the dense engine a check that the captured step trains as the eager one does; and
four dense processes at the seed setting packed on the one GPU against one alone.

``--cpu``: the default-config epoch (batch 8 × 4; training, validation and W1m, as ``fit`` runs it)
on the CPU, PyG engine against dense engine.

Usage:
  python benchmarks/bench_engine.py [--data FILE] [--batches 8x4,32,128,512,8192] [--pyg-max-batch 512]
         [--steps 100] [--pyg-steps 30] [--epochs 2] [--pack 4] [--out DIR]
  python benchmarks/bench_engine.py --cpu [--data FILE] [--cpu-jets 1000] [--epochs 3] [--out DIR]
Without --data, synthetic jets (10-30 particles) are used. Ray is not imported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MiB = 1024**2
T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def parse_batch(spec: str) -> tuple[int, int]:
    b, _, a = spec.partition("x")
    return int(b), int(a or 1)


# --------------------------------------------------------------------------------------------------
# Worker: one engine at one batch setting, in its own process


def tiled(sample, n: int):
    """The first ``n`` jets of ``sample`` repeated as often as needed."""
    import numpy as np

    reps = math.ceil(n / len(sample))
    return sample.subset(np.tile(np.arange(len(sample)), reps)[:n])


def worker(a: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    import torch
    from bench_core import load_sample, nvml_used

    from hvae_ray import engine
    from hvae_ray.config import Config

    t_import = time.perf_counter() - t_start
    cuda = a.device == "cuda"
    used0 = nvml_used(0) if cuda else None
    res: dict = {"engine": a.engine, "batch_size": a.batch, "accum": a.accum, "device": a.device,
                 "pid": os.getpid(), "import_s": t_import, "threads": torch.get_num_threads()}
    if cuda:
        res["gpu"] = torch.cuda.get_device_name(0)
    steps = a.steps
    n_train = steps * a.batch * a.accum
    cfg = Config().with_overrides({"engine": a.engine, "batch_size": a.batch, "gradient_accumulation_steps": a.accum,
                                   "device": a.device, "data.val_fraction": 0.05, "data.test_fraction": 0.0,
                                   "epochs": a.epochs + 1})
    sample = tiled(load_sample(a.data, 0 if a.data else 4096), math.ceil(n_train / 0.95) + 2)
    dev = torch.device(a.device)
    if cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # as fit() does on CUDA
    t = time.perf_counter()
    splits = engine.prepare(cfg, sample, device=dev)
    if cuda:
        torch.cuda.synchronize()
    res["prepare_s"] = time.perf_counter() - t
    t = time.perf_counter()
    trainer = engine.Trainer(cfg, splits, dev, cuda_graphs=not a.no_graphs, compile_model=a.compile)
    res["compiled"] = a.compile
    res["trainer_s"] = time.perf_counter() - t
    res["step_mode"] = trainer.step_mode
    res["n_train"] = trainer.n_train
    res["amp"] = str(trainer.amp_dtype).replace("torch.", "") if trainer.use_amp else "float32"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times = []
    for epoch in range(a.epochs + 1):
        sync()
        t = time.perf_counter()
        m = trainer.train_epoch(epoch)
        sync()
        times.append(time.perf_counter() - t)
        if epoch == 0:
            res["first_epoch_s"] = times[0]
            res["start_to_first_epoch_end_s"] = time.perf_counter() - t_start
    timed = times[1:]
    per_epoch = sum(timed) / len(timed)
    opt_steps = math.ceil(math.ceil(trainer.n_train / a.batch) / a.accum)
    res.update(epoch_s=times, jets_per_s=trainer.n_train / per_epoch, ms_per_step=1000 * per_epoch / opt_steps,
               train_total=m["train_total"])
    if cuda:
        res["peak_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / MiB
        res["peak_reserved_mib"] = torch.cuda.max_memory_reserved(dev) / MiB
        used1 = nvml_used(0)
        res["process_mib"] = (used1 - used0) / MiB if used0 is not None and used1 is not None else None
    if a.graph_check and trainer.dense and trainer.graphed:
        res["graph_check"] = graph_check(cfg, splits, dev)
    return res


def graph_check(cfg, splits, dev) -> dict:
    """The captured step against the eager one from the same start (dropout off, fp32): the losses of the
    first optimiser step (before any update) and the weights after it, then after two epochs."""
    import torch

    from hvae_ray import engine

    cfg = cfg.with_overrides({"model.dropout": 0.0, "mixed_precision": False})  # leave out dropout and bf16
    out: dict = {"dropout": 0.0, "mixed_precision": False}
    one = cfg.batch_size * cfg.gradient_accumulation_steps
    first = engine.Splits(splits.train[:one], splits.val[:8], splits.test, splits.normaliser, splits.sample,
                          splits.knn)
    for label, sp, epochs in (("one_step", first, 1), ("two_epochs", splits, 2)):
        trainers, totals = {}, {}
        for name, graphs in (("graph", True), ("eager", False)):
            t = engine.Trainer(cfg, sp, dev, cuda_graphs=graphs)
            for e in range(epochs):
                totals[name] = t.train_epoch(e)["train_total"]
            trainers[name] = t
        pa = dict(trainers["graph"].model.named_parameters())
        diff = max((p.detach() - pa[k].detach()).abs().max().item()
                   for k, p in trainers["eager"].model.named_parameters())
        out[label] = {"graph_train_total": totals["graph"], "eager_train_total": totals["eager"],
                      "max_abs_weight_diff": diff, "step_modes": [trainers[n].step_mode for n in trainers]}
    out["max_abs_weight"] = max(p.detach().abs().max().item() for p in trainers["eager"].model.parameters())
    torch.cuda.synchronize()
    return out


def cpu_worker(a: argparse.Namespace) -> dict:
    """The default-config epoch on the CPU through fit() (training + validation + W1m)."""
    import numpy as np
    import torch
    from bench_core import load_sample

    from hvae_ray import engine
    from hvae_ray.config import Config

    cfg = Config().with_overrides({"engine": a.engine, "device": "cpu", "epochs": a.epochs})
    sample = load_sample(a.data, a.cpu_jets)
    epochs: list[float] = []
    cpu_s: list[float] = []  # this process's CPU time per epoch: less sensitive than wall time to other jobs
    last = [time.process_time()]

    def record(report) -> None:
        epochs.append(report.metrics["epoch_time_s"])
        now = time.process_time()
        cpu_s.append(now - last[0])
        last[0] = now

    t = time.perf_counter()
    engine.fit(cfg, sample, progress=False, callbacks=[record])
    total = time.perf_counter() - t
    steady = epochs[1:] or epochs
    steady_cpu = cpu_s[1:] or cpu_s
    n_train = len(engine.split_indices(len(sample), cfg)[0])
    return {"engine": a.engine, "threads": torch.get_num_threads(), "jets": len(sample), "n_train": n_train,
            "epoch_time_s": epochs, "fit_total_s": total, "epoch_s": float(np.median(steady)),
            "epoch_min_s": float(np.min(steady)), "train_jets_per_s_incl_val": n_train / float(np.min(steady)),
            "epoch_cpu_s": cpu_s, "epoch_cpu_min_s": float(np.min(steady_cpu))}


# --------------------------------------------------------------------------------------------------
# Driver


def launch(args, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-u", os.path.abspath(__file__), "--worker", *extra]
    if args.data:
        cmd += ["--data", args.data]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen, label: str, timeout: float) -> dict:
    done = threading.Event()

    def beat():
        while not done.wait(30):
            say(f"  ... {label} still running")

    threading.Thread(target=beat, daemon=True).start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        done.set()
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": err[-1500:]}
    done.set()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (err.strip().splitlines() or ["no output"])[-1], "stderr_tail": err[-3000:]}


def gpu_runs(args) -> dict:
    results: dict = {"runs": []}
    for spec in args.batches.split(","):
        b, acc = parse_batch(spec)
        variants = args.engines.split(",") + (["dense+compile"] if spec in args.compiled.split(",") else [])
        for eng in variants:
            if eng == "pyg" and b * acc > args.pyg_max_batch:
                continue
            steps = args.pyg_steps if eng == "pyg" else args.steps
            if eng != "pyg" and b >= 2048:
                steps = max(10, args.steps // 4)
            label = f"{eng} {b}x{acc}"
            say(f"start {label} ({steps} steps per epoch)")
            extra = ["--engine", eng.split("+")[0], "--batch", str(b), "--accum", str(acc), "--steps", str(steps),
                     "--epochs", str(args.epochs), "--device", "cuda"] + (["--compile"] if "+compile" in eng else [])
            if eng == "dense" and spec in args.check.split(","):
                extra.append("--graph-check")
            r = collect(launch(args, extra), label, args.worker_timeout)
            r["engine"] = eng
            r.setdefault("batch_size", b)
            r.setdefault("accum", acc)
            results["runs"].append(r)
            if args.out:  # what is done so far survives a run stopped at its limit
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "results.partial.json").write_text(json.dumps(results, indent=2))
            if "error" in r:
                say(f"done  {label}: FAILED: {r['error']}")
            else:
                say(f"done  {label}: {r['jets_per_s']:.0f} jets/s, {r['ms_per_step']:.2f} ms/step, peak reserved "
                    f"{fmt(r.get('peak_reserved_mib'))} MiB, process {fmt(r.get('process_mib'))} MiB "
                    f"[{r['step_mode']}]")
            if "error" in r:
                print(r.get("stderr_tail", ""), flush=True)
            if "graph_check" in r:
                say(f"      graph vs eager: {r['graph_check']}")
    if args.pack > 0:
        results["packing"] = packing(args)
    return results


def packing(args) -> dict:
    """``args.pack`` dense processes at the seed setting, started together, against one alone."""
    k = args.pack
    extra = ["--engine", "dense", "--batch", "8", "--accum", "4", "--steps", str(args.steps), "--epochs",
             str(args.epochs), "--device", "cuda"]
    say(f"start packing: {k} dense 8x4 processes at once")
    procs = [launch(args, extra) for _ in range(k)]
    t = time.perf_counter()
    res = [collect(p, f"packed worker {i}", args.worker_timeout) for i, p in enumerate(procs)]
    wall = time.perf_counter() - t
    ok = [r for r in res if "error" not in r]
    out = {"procs": k, "ok": len(ok), "wall_s": wall, "workers": res,
           "sum_jets_per_s": sum(r["jets_per_s"] for r in ok),
           "process_mib": [r.get("process_mib") for r in ok]}
    say(f"done  packing: sum of rates {out['sum_jets_per_s']:.0f} jets/s over {len(ok)} processes; "
        f"process MiB {[fmt(x) for x in out['process_mib']]}")
    return out


def fmt(x, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def gpu_table(results: dict) -> str:
    rows = {}
    for r in results["runs"]:
        rows.setdefault((r["batch_size"], r["accum"]), {})[r["engine"]] = r
    lines = ["| batch × accum | PyG jets/s | dense jets/s | speed-up | PyG peak reserved | dense peak reserved "
             "| dense process (NVML) | dense ms/step | dense + torch.compile jets/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (b, acc), e in rows.items():
        p, d = e.get("pyg", {}), e.get("dense", {})
        ok_p, ok_d = "jets_per_s" in p, "jets_per_s" in d
        speed = f"{d['jets_per_s'] / p['jets_per_s']:.1f}×" if ok_p and ok_d else "n/a"
        lines.append(f"| {b} × {acc} | {fmt(p.get('jets_per_s'))} | {fmt(d.get('jets_per_s'))} | {speed} | "
                     f"{fmt(p.get('peak_reserved_mib'))} MiB | {fmt(d.get('peak_reserved_mib'))} MiB | "
                     f"{fmt(d.get('process_mib'))} MiB | {fmt(d.get('ms_per_step'), 2)} | "
                     f"{fmt(e.get('dense+compile', {}).get('jets_per_s'))} |")
    pk = results.get("packing")
    if pk:
        single = rows.get((8, 4), {}).get("dense", {}).get("jets_per_s")
        ratio = f"{pk['sum_jets_per_s'] / single:.2f}×" if single else "n/a"
        lines.append("")
        lines.append(f"{pk['procs']} dense processes at 8 × 4 on the one GPU: {pk['sum_jets_per_s']:.0f} jets/s in all "
                     f"({ratio} one process alone); whole-process memory each: "
                     f"{', '.join(fmt(x) for x in pk['process_mib'])} MiB.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="jets file (default: synthetic jets)")
    p.add_argument("--batches", default="8x4,32,128,512,8192", help="batch x accumulation settings")
    p.add_argument("--engines", default="pyg,dense")
    p.add_argument("--pyg-max-batch", type=int, default=512, help="largest batch the PyG engine runs at")
    p.add_argument("--steps", type=int, default=100, help="dense optimiser steps per epoch")
    p.add_argument("--pyg-steps", type=int, default=30, help="PyG optimiser steps per epoch")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch")
    p.add_argument("--check", default="8x4,128", help="settings where the captured step is checked against eager")
    p.add_argument("--compiled", default="512", help="settings also run with torch.compile (dense engine)")
    p.add_argument("--pack", type=int, default=4, help="dense processes packed on the GPU (0: skip)")
    p.add_argument("--worker-timeout", type=float, default=240)
    p.add_argument("--cpu", action="store_true", help="the CPU comparison instead")
    p.add_argument("--cpu-jets", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2, help="CPU mode: runs of each engine, alternating")
    p.add_argument("--out", default=None, help="folder for results.json and table.md")
    # internal: one worker
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="dense", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--no-graphs", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--graph-check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpu-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        fn = cpu_worker if args.cpu_worker else worker
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return

    import torch

    info = {"argv": sys.argv[1:], "torch": torch.__version__, "cpu_cores": os.cpu_count(),
            "data": args.data or "synthetic", "started_unix": time.time()}
    say(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, CUDA {torch.cuda.is_available()}, data {info['data']}")
    if args.cpu:
        runs = []
        # Alternating engines, so that a shared machine's load falls on both alike.
        for eng in args.engines.split(",") * args.repeats:
            say(f"start CPU fit, engine {eng}")
            extra = ["--cpu-worker", "--engine", eng, "--cpu-jets", str(args.cpu_jets), "--epochs", str(args.epochs)]
            r = collect(launch(args, extra), f"cpu {eng}", args.worker_timeout * 10)
            runs.append(r)
            say(f"done  CPU {eng}: " + (f"{r['epoch_min_s']:.2f} s fastest epoch after the first, median "
                                        f"{r['epoch_s']:.2f} s, CPU time {r['epoch_cpu_min_s']:.2f} s "
                                        f"({r['n_train']} train jets, "
                                        f"{r['threads']} threads; epochs {[round(x, 2) for x in r['epoch_time_s']]})"
                                        if "error" not in r else f"FAILED: {r['error']}\n{r.get('stderr_tail', '')}"))
        results = {**info, "cpu": runs}
        for key, what in (("epoch_min_s", "wall time"), ("epoch_cpu_min_s", "process CPU time")):
            best: dict[str, float] = {}
            for r in runs:
                if "error" not in r:
                    best[r["engine"]] = min(best.get(r["engine"], math.inf), r[key])
            results[f"cpu_best_{key}"] = best
            if {"pyg", "dense"} <= set(best):
                say(f"CPU default-config epoch, {what} (fastest steady epoch of each): PyG {best['pyg']:.2f} s, "
                    f"dense {best['dense']:.2f} s: {best['pyg'] / best['dense']:.2f}× faster")
        table = None
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA: use --cpu")
        results = {**info, **gpu_runs(args)}
        table = gpu_table(results)
        print(table, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / ("results-cpu.json" if args.cpu else "results.json")).write_text(json.dumps(results, indent=2))
        if table:
            (out / "table.md").write_text(table + "\n")
    say("finished")


if __name__ == "__main__":
    main()
