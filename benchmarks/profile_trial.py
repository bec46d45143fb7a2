"""Profiles of one trial's process, outside Ray: what the sweep benchmarks' start-up and step totals are made of.

startup  the training function's stages in seconds since the process started (imports, CUDA context, data, split
         and normaliser, Trainer, CUDA-graph capture and first step, first epoch, validation, the first and second
         generation score), all under cProfile (top functions by cumulative time); then the same first step eager.
kernels  torch profiler over one epoch at --batch (no accumulation), eager and in a CUDA graph: epoch time, jets/s,
         the kernels' share of the wall time and the top kernels.

  python benchmarks/profile_trial.py {startup,kernels} [--data FILE] [--jets 20000] [--batch 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import psutil

T0, STAGES = psutil.Process().create_time(), {}


def stage(name: str, fn=lambda: None, sync=lambda: None):
    """Run ``fn``, wait for the device, print the time since the process started."""
    out = fn()
    sync()
    STAGES[name] = time.time() - T0
    print(f"  {name:38s} {STAGES[name]:7.3f} s since process start", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("startup", "kernels"))
    p.add_argument("--data", default="data/q30k.parquet")
    p.add_argument("--jets", type=int, default=20000, help="data.max_jets (split 70/15/15)")
    p.add_argument("--batch", type=int, default=512, help="kernels: batch size")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    stage("python up")
    torch = stage("import torch", lambda: __import__("torch"))
    from hvae_ray import engine
    from hvae_ray.config import Config
    from hvae_ray.data.io import load_jets
    stage("import hvae_ray.engine")
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    stage("cuda context", lambda: torch.zeros(1, device=dev), sync)
    torch.set_num_threads(1)  # as fit does on CUDA
    if a.part == "startup":
        prof = cProfile.Profile()
        prof.enable()
        sample = stage("load_jets", lambda: load_jets(a.data))
        cfg = Config().with_overrides({"data.max_jets": a.jets})
        splits = stage("prepare (split, normaliser)", lambda: engine.prepare(cfg, sample, device=dev), sync)
        tr = stage("Trainer", lambda: engine.Trainer(cfg, splits, dev), sync)
        t = time.time()
        stage("first epoch done", lambda: tr.train_epoch(0), sync)
        print(f"  capture + first step launch {tr.first_step_at - t:.3f} s ({tr.step_mode})")
        stage("evaluate", lambda: tr.evaluate(0), sync)
        stage("generation_metrics (first: val EFPs)", tr.generation_metrics, sync)
        stage("generation_metrics (second)", tr.generation_metrics, sync)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(35)
        print(out.getvalue())
        eager, t = engine.Trainer(cfg, splits, dev, cuda_graphs=False), time.time()
        eager.train_epoch(0)
        print(f"  eager: first step launch {eager.first_step_at - t:.3f} s")
        return
    from torch.profiler import ProfilerActivity, profile

    cfg = Config().with_overrides({"batch_size": a.batch, "gradient_accumulation_steps": 1, "data.max_jets": a.jets})
    splits = engine.prepare(cfg, load_jets(a.data), device=dev)
    for graphs in (False, True):
        tr = engine.Trainer(cfg, splits, dev, cuda_graphs=graphs)
        tr.train_epoch(0)  # warm-up (and capture)
        sync()
        t = time.perf_counter()
        tr.train_epoch(1)
        sync()
        wall = time.perf_counter() - t
        print(f"== batch {a.batch}, {tr.step_mode}: epoch {wall:.3f} s, {tr.n_train / wall:,.0f} jets/s, "
              f"steps {-(-tr.n_train // a.batch)}")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as p:
            tr.train_epoch(2)
            sync()
        averages = p.key_averages()
        busy = sum(e.self_device_time_total for e in averages) / 1e6
        print(f"  kernel time in the epoch {busy:.3f} s of wall {wall:.3f} s ({busy / wall:.0%})")
        print(averages.table(sort_by="self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total",
                             row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
