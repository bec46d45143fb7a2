"""Training throughput and memory of the engines, each run in a fresh process; Ray is not imported.

batches  per --batches setting (batch x accumulation) and engine: jets/s, ms per step, memory, start-up after a
         warm-up epoch; --check: the CUDA-graph step against eager; --compiled: the dense engine compiled too.
--cpu    instead: the default-config fit epoch per engine, --repeats runs alternating (wall and CPU time).
--pack   K,...: K processes training at once, each capped to 1/4 of a --pack-card-gb card: aggregate and per
         process jets/s against K = 1, memory, GPU busy fraction (default 1,4 with CUDA).
profile  {startup,kernels} (the first argument; profile -h): one trial's process outside Ray, in this process, on
         --data (data/q30k.parquet): what the sweep benchmarks' start-up and step totals are made of.
  startup  the training function's stages in seconds since the process started (imports, CUDA context, data, split
           and normaliser, Trainer, CUDA-graph capture and first step, first epoch, validation, the first and second
           generation score), all under cProfile (top functions by cumulative time); then the same first step eager.
  kernels  torch profiler over one epoch at --batch (no accumulation), eager and in a CUDA graph: epoch time, jets/s,
           the kernels' share of the wall time and the top kernels.
"""

import argparse
import cProfile
import json
import math
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import psutil

if __name__ != "__main__" or sys.argv[1:2] != ["profile"]:  # profile times these imports itself
    import harness
    import torch
    from harness import say, sync

    from hvae_ray import engine as eng


def batch_run(engine: str, batch: int, accum: int, steps: int, epochs: int, device: str, data: str | None,
              compile: bool, check: bool) -> dict:
    t_start = harness.started()
    res: dict = {"import_s": time.perf_counter() - t_start, "threads": torch.get_num_threads(), "epoch_s": []}
    dev, used0 = torch.device(device), harness.nvml_used(0) if device == "cuda" else None
    cfg = harness.config((), {"engine": engine, "batch_size": batch, "gradient_accumulation_steps": accum,
                              "device": device, "data.val_fraction": 0.05, "data.test_fraction": 0.0,
                              "epochs": epochs + 1})
    if device == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # as fit() does on CUDA
    sample = harness.load_sample(data, math.ceil(steps * batch * accum / 0.95) + 2, True)
    splits, res["prepare_s"] = harness.clock(eng.prepare, cfg, sample, device=dev, dev=dev)
    tr, res["trainer_s"] = harness.clock(eng.Trainer, cfg, splits, dev, compile_model=compile)
    amp = str(tr.precision.dtype)[6:] if tr.precision.enabled else "float32"
    res.update(step_mode=tr.step_mode, n_train=tr.n_train, amp=amp)
    for epoch in range(epochs + 1):
        out, s = harness.clock(tr.train_epoch, epoch, dev=dev)
        res.update(train_total=out["train_total"], epoch_s=[*res["epoch_s"], s])
        res.setdefault("start_to_first_epoch_end_s", time.perf_counter() - t_start)
    per_epoch, n_batches = sum(res["epoch_s"][1:]) / epochs, math.ceil(tr.n_train / batch)
    res.update(first_epoch_s=res["epoch_s"][0], jets_per_s=tr.n_train / per_epoch, batches_per_s=n_batches / per_epoch,
               ms_per_step=1000 * per_epoch / math.ceil(n_batches / accum))
    if device == "cuda":
        res.update(**harness.torch_peaks(dev), process_mib=None if used0 is None else harness.nvml_used(0) - used0)
    if check and tr.step_mode == "cuda-graph":
        res["graph_check"] = graph_check(cfg, splits, dev)
    return res


def graph_check(cfg, splits, dev) -> dict:
    """Captured against eager step from one start, no dropout, fp32: losses, largest weight difference."""
    cfg = cfg.with_overrides({"model.dropout": 0.0, "mixed_precision": False})
    one = cfg.batch_size * cfg.gradient_accumulation_steps
    first = eng.Splits(splits.train[:one], splits.val[:8], splits.test, splits.normaliser, splits.sample, splits.knn)
    out: dict = {"dropout": 0.0, "mixed_precision": False}
    for label, sp, epochs in (("one_step", first, 1), ("two_epochs", splits, 2)):
        tr = {g: eng.Trainer(cfg, sp, dev, cuda_graphs=g) for g in (True, False)}
        loss = {g: [t.train_epoch(e)["train_total"] for e in range(epochs)][-1] for g, t in tr.items()}
        pg = dict(tr[True].model.named_parameters())
        out[label] = {"graph_train_total": loss[True], "eager_train_total": loss[False],
                      "step_modes": [t.step_mode for t in tr.values()],
                      "max_abs_weight_diff": max((p.detach() - pg[k].detach()).abs().max().item()
                                                 for k, p in tr[False].model.named_parameters())}
    out["max_abs_weight"] = max(p.detach().abs().max().item() for p in tr[False].model.parameters())
    return out


def pack_worker(index: int, ks: list[int], barrier: str, data: str | None, jets: int, epochs: int, sets: list,
                card_gb: float) -> dict:
    """One packed process: prepares and warms up once, then trains in each phase k with index < k."""
    cuda, bar = torch.cuda.is_available(), Path(barrier)
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda and card_gb:
        harness.cap_allocator(0.25, card_gb)
    cfg, sample = harness.config(sets, {"device": dev.type}), harness.load_sample(data, jets)
    splits = eng.prepare(cfg, sample, device=dev)
    eng.Trainer(cfg, eng.prepare(cfg, sample.subset(splits.train[:80]), splits.normaliser, dev), dev).train_epoch(0)
    tr = eng.Trainer(cfg, splits, dev)
    sync(dev)
    (bar / f"ready.{index}").touch()
    for k in (k for k in ks if index < k):
        while not (bar / f"go.{k}").exists():
            time.sleep(0.01)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        for e in range(epochs):
            tr.train_epoch(e)
        sync(dev)
        res = {"pid": os.getpid(), "t0": t0, "t1": time.time(), "jets": len(splits.train) * epochs,
               "peak_reserved_mib": torch.cuda.max_memory_reserved() / harness.MiB if cuda else None}
        (bar / f"tmp.{index}").write_text(json.dumps(res))
        (bar / f"tmp.{index}").rename(bar / f"done.{k}.{index}")  # whole, for the parent to read
    return {"ok": True}


def pack(a, ks: list[int]) -> dict:
    out: dict = {"jets": a.pack_jets, "epochs": a.pack_epochs, "card_gb": a.pack_card_gb, "threads": a.pack_threads,
                 "idle_used_mib": harness.smi("--query-gpu=memory.used")[:1], "phases": []}
    with tempfile.TemporaryDirectory() as bar, harness.GpuSampler() as gpu:
        kw = dict(ks=ks, barrier=bar, data=a.data, jets=a.pack_jets, epochs=a.pack_epochs, sets=a.set,
                  card_gb=a.pack_card_gb)
        procs = [harness.Child(pack_worker, {**kw, "index": i}, timeout=a.worker_timeout * (len(ks) + 1),
                               env={"OMP_NUM_THREADS": str(a.pack_threads)}) for i in range(max(ks))]
        while len(list(Path(bar).glob("ready.*"))) < len(procs) and not out.get("error"):
            if any(p.poll() is not None for p in procs):
                out["error"] = "a packed process failed to start"
            time.sleep(0.1)
        for k in [] if out.get("error") else ks:
            say(f"packing: {k} process(es) at once")
            Path(bar, f"go.{k}").touch()
            t = time.time()
            while len(done := list(Path(bar).glob(f"done.{k}.*"))) < k and time.time() - t < a.worker_timeout:
                time.sleep(0.2)
            if len(act := [json.loads(f.read_text()) for f in done]) < k:
                out["error"] = f"phase k={k}: {len(act)} of {k} processes finished"
                break
            t0, t1, peaks = min(r["t0"] for r in act), max(r["t1"] for r in act), gpu.peaks()
            out["phases"].append({"k": k, "jets_per_s": sum(r["jets"] for r in act) / (t1 - t0), "span_s": t1 - t0,
                                  "per_process_jets_per_s": [r["jets"] / (r["t1"] - r["t0"]) for r in act],
                                  "process_mib": [peaks.get(r["pid"]) for r in act],
                                  "peak_reserved_mib": [r["peak_reserved_mib"] for r in act], **gpu.window(t0, t1)})
        for p in procs if out.get("error") else []:
            p.stop()
        out["failed"] = [r for r in (p.result() for p in procs) if "error" in r]
    for ph in out["phases"]:
        ph["x_k1"] = harness.ratio(ph["jets_per_s"], out["phases"][0]["jets_per_s"] if ks[0] == 1 else None)
    return out


def stage(name: str, fn=lambda: None, sync=lambda: None):
    """profile: run ``fn``, wait for the device, print the time since the process started."""
    out = fn()
    sync()
    print(f"  {name:38s} {time.time() - psutil.Process().create_time():7.3f} s since process start", flush=True)
    return out


def profile(argv: list[str]) -> None:
    p = argparse.ArgumentParser("bench_engine.py profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("startup", "kernels"))
    p.add_argument("--data", default="data/q30k.parquet")
    p.add_argument("--jets", type=int, default=20000, help="data.max_jets (split 70/15/15)")
    p.add_argument("--batch", type=int, default=512, help="kernels: batch size")
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
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
        with cProfile.Profile() as prof:
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
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
        eager, t = engine.Trainer(cfg, splits, dev, cuda_graphs=False), time.time()
        eager.train_epoch(0)
        print(f"  eager: first step launch {eager.first_step_at - t:.3f} s")
        return
    import harness
    from torch.profiler import ProfilerActivity, profile

    cfg = Config().with_overrides({"batch_size": a.batch, "gradient_accumulation_steps": 1, "data.max_jets": a.jets})
    splits = engine.prepare(cfg, load_jets(a.data), device=dev)
    for graphs in (False, True):
        tr = engine.Trainer(cfg, splits, dev, cuda_graphs=graphs)
        harness.clock(tr.train_epoch, 0, dev=dev)  # warm-up (and capture)
        wall = harness.clock(tr.train_epoch, 1, dev=dev)[1]
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


def main() -> None:
    if sys.argv[1:2] == ["profile"]:
        return profile(sys.argv[2:])
    a = harness.parser(
        __doc__, "data", "set", "out", engines="pyg,dense", check="8x4,128", compiled="512", repeats=2,
        cpu_jets=1000, pack_jets=3000, pack_epochs=1, worker_timeout=240.0,
        batches=("8x4,32,128,512,8192", "batch x accumulation settings ('' for none)"),
        device=("cuda", "device of the batch runs"), pyg_max_batch=(512, "largest batch the PyG engine runs at"),
        steps=(100, "dense optimiser steps per epoch (a quarter from batch 2048)"),
        pyg_steps=(30, "PyG optimiser steps per epoch"),
        epochs=(2, "timed epochs after the warm-up (--cpu: fit epochs)"),
        cpu=(False, "the CPU fit comparison instead of the batch runs"),
        pack=(str, "process counts packed on one device, e.g. 1,2,4,6 ('' or 0: none)"),
        pack_card_gb=(4.0, "cap each to 1/4 of a card this size (0: no cap)"),
        pack_threads=(1, "CPU threads per packed process")).parse_args()
    res: dict = {"host": harness.host(), "runs": []}
    say(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, CUDA {torch.cuda.is_available()}, data {a.data}")
    if a.cpu:
        for engine in a.engines.split(",") * a.repeats:  # alternating, so that other load falls on both alike
            kw = dict(data=a.data, jets=a.cpu_jets, epochs=a.epochs, device="cpu", sets=[f"engine={engine}"])
            r = harness.Child(harness.fit_child, kw, timeout=a.worker_timeout * 10).result()
            res["runs"].append({"engine": engine, **r})
            say(f"CPU {engine}: {r.get('error', r.get('epoch_time_s'))}")
        ok = [r for r in res["runs"] if "error" not in r]
        res["cpu_best"] = [{"engine": e, **{k: min(r[k] for r in ok if r["engine"] == e) for k in
                                            ("epoch_min_s", "epoch_cpu_min_s")}} for e in {r["engine"]: 0 for r in ok}]
    elif a.batches and a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA: use --cpu or --device cpu")
    for spec in a.batches.split(",") if a.batches and not a.cpu else []:
        b, acc = (int(x) for x in (spec + "x1").split("x")[:2])
        for engine in a.engines.split(",") + (["dense+compile"] if spec in a.compiled.split(",") else []):
            if engine == "pyg" and b * acc > a.pyg_max_batch:
                continue
            steps = a.pyg_steps if engine == "pyg" else a.steps if b < 2048 else max(10, a.steps // 4)
            say(f"start {engine} {spec}, {steps} steps per epoch")
            kw = dict(engine=engine.split("+")[0], batch=b, accum=acc, steps=steps, epochs=a.epochs, device=a.device,
                      data=a.data, compile="+compile" in engine, check=engine == "dense" and spec in a.check.split(","))
            r = harness.Child(batch_run, kw, timeout=a.worker_timeout).result()
            pyg = next((x for x in res["runs"] if x["engine"] == "pyg" and x["batch"] == spec), {})
            res["runs"].append(r := {"engine": engine, "batch": spec, **r,
                                     "x_pyg": harness.ratio(r.get("jets_per_s"), pyg.get("jets_per_s"))})
            say(f"done  {engine} {spec}: {r.get('error') or harness.fmt(r['jets_per_s'], 0) + ' jets/s'}"
                + (f"; graph vs eager: {r['graph_check']}" if "graph_check" in r else ""))
            harness.save(a, res)  # what is done so far survives a run stopped at its limit
    spec = a.pack if a.pack is not None else ("" if a.cpu or not torch.cuda.is_available() else "1,4")
    ks = [int(k) for k in spec.split(",") if k.strip() and int(k)]
    pk = res["packing"] = pack(a, ks) if ks else {}
    harness.save(a, res, harness.table([] if a.cpu else res["runs"], "engine batch jets_per_s x_pyg ms_per_step "
                                       "batches_per_s peak_allocated_mib peak_reserved_mib process_mib step_mode amp "
                                       "import_s prepare_s trainer_s first_epoch_s error"),
                 harness.table(res.get("cpu_best", []), "engine epoch_min_s epoch_cpu_min_s", "CPU fit epoch"),
                 harness.table(pk.get("phases", []), "k jets_per_s x_k1 per_process_jets_per_s process_mib "
                               "peak_reserved_mib busy_fraction util_mean_pct used_peak_mib",
                               f"Packing: {pk.get('jets')} jets (70 % train), {pk.get('epochs')} epoch(s) per phase, "
                               f"{pk.get('threads')} thread(s) each, 1/4 of a {pk.get('card_gb')} GB card each"),
                 pk.get("error"))


if __name__ == "__main__":
    main()
