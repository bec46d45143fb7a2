"""Core costs, the trial parts each in a fresh process (clean memory figures); Ray is not imported.

generation  Pythia 8 + FastJet jets/s (1 worker, every core); io: Parquet write + read; graphs: raw_features,
            FeatureNormaliser.fit, build_graphs.
phases      a default-config (+ --set) Trainer: s per call of training, validation and each prior's generation
            score (its share of an epoch); on CUDA torch's and the process's memory per phase.
fit         engine.fit as a trial runs it, capped to --share of a --card-gb card: epoch times, memory, CUDA context,
            the runner's sizing and share.
"""

import math
import os
import tempfile
from pathlib import Path

import harness
import numpy as np
import torch

from hvae_ray import engine
from hvae_ray.config import Config
from hvae_ray.data.generate import generate_jets
from hvae_ray.data.graphs import FeatureNormaliser, build_graphs, raw_features
from hvae_ray.data.io import load_jets, save_parquet
from hvae_ray.sweep.resources import CUDA_CONTEXT


def data_parts(a) -> list[dict]:
    rows, sample = [], None
    for w in dict.fromkeys([1, os.cpu_count() or 1]) if "generation" not in a.skip else []:
        sample, s = harness.clock(generate_jets, a.flavor, a.gen_jets, a.seed, workers=w, progress=False)
        rows.append({"part": f"generation, {a.flavor} jets, {w} worker(s)", "jets": a.gen_jets, "s": s})
    sample = sample or harness.load_sample(a.data, a.jets)
    if "io" not in a.skip:
        with tempfile.TemporaryDirectory() as tmp:
            path, reps, n = Path(tmp) / "bench.parquet", max(1, 200_000 // len(sample)), len(sample)
            for part, fn in (("parquet write", lambda: save_parquet(sample, path, overwrite=True)),
                             ("parquet read", lambda: load_jets(path))):
                rows.append({"part": part, "jets": reps * n, "s": sum(harness.clock(fn)[1] for _ in range(reps)),
                             "bytes_per_jet": path.stat().st_size / n})
            rows.append({"part": "parquet write + read", "jets": rows[-1]["jets"], "s": rows[-1]["s"] + rows[-2]["s"]})
    if "graphs" not in a.skip:
        knn, runs = Config().data.knn, []
        sample = sample.subset(np.resize(np.arange(len(sample)), a.graph_jets or len(sample)))
        raw = raw_features(sample.subset(np.arange(min(64, len(sample)))), knn)
        build_graphs(raw, FeatureNormaliser.fit(raw))  # warm-up: the first calls of the ops
        for _ in range(2):
            raw, t1 = harness.clock(raw_features, sample, knn)
            norm, t2 = harness.clock(FeatureNormaliser.fit, raw)
            t3 = harness.clock(build_graphs, raw, norm)[1]
            runs.append((t1 + t2 + t3, t1, t2, t3))
        rows += [{"part": f"graph building{k}", "jets": len(sample), "s": s, "threads": torch.get_num_threads()}
                 for k, s in zip(("", ": raw_features", ": normaliser fit", ": build_graphs"), min(runs))]
    return [{**r, "jets_per_s": r["jets"] / r["s"]} for r in rows]


def phases(data: str | None, jets: int, device: str, sets: list, calls: int) -> dict:
    dev = engine.resolve_device(device)
    cuda, res = dev.type == "cuda", {"device": str(dev)}
    if cuda:
        used0, before = harness.nvml_used(0), torch.cuda.is_initialized()
        torch.cuda.device_memory_used(torch.device("cuda"))
        res.update(baseline_read_inits_cuda=not before and torch.cuda.is_initialized(),
                   context_mib_of_that_read=harness.nvml_used(0) - used0, gpu=torch.cuda.get_device_name(0))
        torch.set_num_threads(1)  # as fit does on CUDA
    cfg = harness.config(sets, {"device": dev.type})
    tr = engine.Trainer(cfg, engine.prepare(cfg, harness.load_sample(data, jets), device=dev), dev)

    def timed(name: str, fn) -> None:
        fn()  # warm-up: CUDA graph capture, the validation EFPs
        harness.sync(dev)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res[f"{name}_s"] = harness.clock(lambda: [fn() for _ in range(calls)], dev=dev)[1] / calls
        if cuda:
            res[f"{name}_mib"] = [*harness.torch_peaks().values(), harness.nvml_used(0) - used0,
                                  harness.process_mib(os.getpid())]

    timed("train", lambda: tr.train_epoch(20))
    timed("evaluate", lambda: tr.evaluate(20))
    for prior in ("fitted", "standard"):
        tr.cfg = cfg.with_overrides({"generation_prior": prior})
        timed(f"generation_{prior}", tr.generation_metrics)
        res[f"generation_{prior}_share"] = [res[f"generation_{prior}_s"] / res["train_s"],
                                            res[f"generation_{prior}_s"] / res["train_s"] / cfg.generation_every]
    batches, t = math.ceil(tr.n_train / cfg.batch_size), res["train_s"]
    return {**res, "n_train": tr.n_train, "n_val": len(tr.splits.val), "batch_size": cfg.batch_size,
            "accum": cfg.gradient_accumulation_steps, "generation_jets": cfg.generation_jets,
            "generation_every": cfg.generation_every, "step_mode": tr.step_mode, "jets_per_s": tr.n_train / t,
            "batches_per_s": batches / t, "steps_per_s": math.ceil(batches / cfg.gradient_accumulation_steps) / t}


def main() -> None:
    a = harness.parser(
        __doc__, "data", "set", "out", "skip", flavor="q", seed=0, device="auto", fit_epochs=3,
        jets=(2000, "jets of phases and fit (split 70/15/15)"), gen_jets=(400, "generation: jets generated"),
        graph_jets=(0, "graphs: jets (default: as many as there are)"),
        calls=(3, "phases: timed calls of each, after one warm-up"),
        card_gb=(4.0, "fit: the card trials are sized for"), share=(0.25, "fit: one trial's share of that card"),
        memory_steps=(20, "fit: steps of the runner's sizing burst (0: none)")).parse_args()
    res, md = {"host": harness.host()}, []
    if not {"generation", "io", "graphs"} <= a.skip:
        res["data"] = data_parts(a)
        md.append(harness.table(res["data"], "part jets s jets_per_s bytes_per_jet threads"))
    if "phases" not in a.skip:
        kw = dict(data=a.data, jets=a.jets, device=a.device, sets=a.set, calls=a.calls)
        r = res["phases"] = harness.Child(phases, kw).result()
        md += [harness.table([r], "device n_train n_val batch_size accum step_mode jets_per_s batches_per_s "
                             "steps_per_s generation_jets generation_every baseline_read_inits_cuda "
                             "context_mib_of_that_read error", "Phases"),
               harness.table([{"phase": k, "s": r.get(f"{k}_s"), "share": r.get(f"{k}_share"), "mib": r.get(f"{k}_mib")}
                              for k in ("train", "evaluate", "generation_fitted", "generation_standard")],
                             "phase s share mib", "s per call; epoch share at generation_every 1 and at the config's; "
                             "MiB: peak allocated, peak reserved, process (NVML delta), process (nvidia-smi)")]
    if "fit" not in a.skip:
        kw = dict(data=a.data, jets=a.jets, epochs=a.fit_epochs, sets=a.set, device=a.device, share=a.share,
                  card_gb=a.card_gb, memory_steps=a.memory_steps)
        with harness.GpuSampler() as gpu:
            r = res["fit"] = (c := harness.Child(harness.fit_child, kw)).result()
        peak, share = gpu.peaks().get(c.pid), a.card_gb * 1024 * a.share
        r.update(process_peak_mib=peak, share_mib=share, fits_share=bool(peak and peak <= share),
                 context_mib=peak - r["peak_reserved_mib"] if peak and "peak_reserved_mib" in r else None,
                 assumed_context_mib=CUDA_CONTEXT / harness.MiB)
        md.append(harness.table([r], "device jets epochs threads_in_training epoch_time_s startup_s allocator_fraction "
                                "peak_allocated_mib peak_reserved_mib process_peak_mib context_mib assumed_context_mib "
                                "share_mib fits_share runner_measured_mib runner_share error",
                                f"engine.fit, validation and W1m included, {a.share:g} of a {a.card_gb:g} GB card"))
    harness.save(a, res, *md)


if __name__ == "__main__":
    main()
