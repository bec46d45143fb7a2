"""A population of K runs in one process against separate processes, on one device, in one run.

  gpu   each case in a fresh process on GPU 0: one trial alone (Trainer, CUDA graph), P trials as P
        processes at once, and populations of K members (engine.Population, one CUDA graph); training
        jets/s over a timed window after a warm-up epoch, torch's peak allocated bytes and the whole
        process's GPU memory (nvidia-smi, CUDA context included)
  cpu   8 configs of sweeps/quickstart.yaml (K = 8 KL caps): 8 Trainer epochs one after another against one
        population epoch of the 8, in this process, alternating, repeated
  phases  where a population's epoch goes, as a sweep's executor runs it (engine.PopulationRuns, each
        member with its own last/, best/ and TensorBoard run): the step, each member's validation,
        generation score (its decoding, EFPs, FPD) and record (state, checkpoints, TensorBoard, figures, the
        rest), summed over --epochs epochs after
        one warm-up epoch, for each K of --phase-ks at the seed setting (batch 8 x 4) on --jets jets
Synthetic jets (10-30 particles) unless --data. Prints Markdown tables; --out writes results.json/.md.

  python benchmarks/bench_population.py gpu --out benchmarks/results/population-<date>-<gpu>
  python benchmarks/bench_population.py cpu --out benchmarks/results/population-<date>-cpu
  python benchmarks/bench_population.py phases --data JETS --jets 250 --device cuda
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import harness
import torch

from hvae_ray import engine


def cases(a) -> tuple[list, list]:
    """(label, batch per member, accumulation, members K or processes P) of the population and process cases:
    the seed setting (batch 8 × 4) and batch 32 × 1, plus one model at 16 × 8 = 128 jets a step."""
    ks = [int(k) for k in a.seed_ks.split(",")]
    pops = [("seed", 8, 4, k) for k in ks] + [("b32", 32, 1, int(k)) for k in a.b32_ks.split(",")]
    procs = [("seed", 8, 4, int(p)) for p in a.procs.split(",")] + [("one model, batch 128", 128, 4, 1)]
    return pops, procs


def _configs(k: int, batch: int, accum: int, device: str, sets=()) -> list:
    """K configs of one shape that differ in seed, KL cap and learning rate, as a sweep's trials do."""
    return [harness.config(sets, {"batch_size": batch, "gradient_accumulation_steps": accum, "device": device,
                                  "seed": i, "data.split_seed": 0, "kl_max_weight": 10 ** (-5 + 3 * i / max(k, 1)),
                                  "learning_rate": 1e-3 * (1 + (i % 4) / 4), "data.val_fraction": 0.05,
                                  "data.test_fraction": 0.0}) for i in range(k)]


def _timed_epochs(train_epoch, jets_per_epoch: int, seconds: float, dev) -> dict:
    """One warm-up epoch (capture, first-step costs), then epochs until ``seconds`` have passed."""
    _, first = harness.clock(train_epoch, dev=dev)
    epochs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        train_epoch()
        epochs += 1
    harness.sync(dev)
    wall = time.perf_counter() - t0
    return {"first_epoch_s": first, "epochs": epochs, "jets_per_s": jets_per_epoch * epochs / wall}


def trial_child(batch: int, accum: int, jets: int, seconds: float, data: str | None, go: str = "") -> dict:
    """One run alone (a Trainer), as a trial's process trains it; waits for file ``go`` before timing."""
    dev = torch.device("cuda")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    cfg = _configs(1, batch, accum, "cuda")[0]
    tr = engine.Trainer(cfg, engine.prepare(cfg, harness.load_sample(data, jets), device=dev), dev)
    tr.train_epoch(0)
    while go and not os.path.exists(go):
        time.sleep(0.01)
    epoch = iter(range(1, 10**6))
    torch.cuda.reset_peak_memory_stats()
    res = _timed_epochs(lambda: tr.train_epoch(next(epoch)), tr.n_train, seconds, dev)
    return {**res, **harness.torch_peaks(dev), "process_mib": harness.process_mib(os.getpid()),
            "step_mode": tr.step_mode, "n_train": tr.n_train}


def population_child(batch: int, accum: int, k: int, jets: int, seconds: float, data: str | None) -> dict:
    """K members in one process (engine.Population, fp32)."""
    dev = torch.device("cuda")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    cfgs = _configs(k, batch, accum, "cuda")
    pop = engine.Population(cfgs[0], engine.prepare(cfgs[0], harness.load_sample(data, jets), device=dev), k, dev)
    for cfg in cfgs:
        pop.add(cfg)
    torch.cuda.reset_peak_memory_stats()
    res = _timed_epochs(lambda: pop._train(pop.occupied), k * len(pop.splits.train), seconds, dev)
    return {**res, **harness.torch_peaks(dev), "process_mib": harness.process_mib(os.getpid()),
            "n_train": len(pop.splits.train), "graphed": pop.graphed}


def gpu(a) -> dict:
    rows, results = [], {"host": harness.host(), "jets": a.jets, "seconds": a.seconds}
    base = None
    populations, processes = cases(a)
    for label, batch, accum, procs in processes:
        go = f"/tmp/bench-population-go-{os.getpid()}-{procs}-{batch}"
        kids = [harness.Child(trial_child, {"batch": batch, "accum": accum, "jets": a.jets, "seconds": a.seconds,
                                            "data": a.data, "go": go}, timeout=240) for _ in range(procs)]
        time.sleep(min(60.0, 15.0 + 5 * procs))  # all warmed up before the window opens
        open(go, "w").close()
        res = [kid.result() for kid in kids]
        os.unlink(go)
        harness.say(f"processes {label} x{procs}: {res[0].get('jets_per_s', res[0].get('error'))}")
        ok = [r for r in res if "jets_per_s" in r]
        row = {"case": f"{procs} process{'es' if procs > 1 else ''}", "setting": f"{batch} × {accum}",
               "members": procs, "jets_per_s": sum(r["jets_per_s"] for r in ok) if len(ok) == procs else None,
               "peak_allocated_mib": max((r["peak_allocated_mib"] for r in ok), default=None),
               "process_mib": max((r["process_mib"] or 0 for r in ok), default=None)}
        if label == "seed" and procs == 1:
            base = row["jets_per_s"]
        results.setdefault("processes", []).append({"label": label, "procs": procs, "children": res})
        rows.append(row)
    for label, batch, accum, k in populations:
        r = harness.Child(population_child, {"batch": batch, "accum": accum, "k": k, "jets": a.jets,
                                             "seconds": a.seconds, "data": a.data},
                          timeout=300).result()
        harness.say(f"population {label} K={k}: {r.get('jets_per_s', r.get('error'))}")
        results.setdefault("populations", []).append({"label": label, "k": k, **r})
        rows.append({"case": "population", "setting": f"{batch} × {accum}",
                     "members": k,
                     "jets_per_s": r.get("jets_per_s"), "peak_allocated_mib": r.get("peak_allocated_mib"),
                     "process_mib": r.get("process_mib")})
    for row in rows:
        row["x_one_trial"] = harness.ratio(row["jets_per_s"], base) if row["setting"] == "8 × 4" else None
    results["rows"] = rows
    fits = [r for r in rows if r["case"].startswith("population") and r["setting"] == "8 × 4" and r["process_mib"]
            and r["process_mib"] <= 4096]
    results["largest_in_4gb"] = max((r["members"] for r in fits), default=None)
    harness.save(a, results, harness.table(rows, "case setting members jets_per_s x_one_trial peak_allocated_mib "
                                                 "process_mib", f"Population vs processes ({a.seconds:g} s windows)"),
                 f"Largest population at 8 × 4 within 4,096 MiB of process memory: {results['largest_in_4gb']}")
    return results


def cpu(a) -> dict:
    """sweeps/quickstart.yaml's config (batch 32, hidden 32) with 8 KL caps on --jets jets."""
    sets = ["model.hidden_dim=32", "model.dropout=0.0"]
    cfgs = _configs(8, 32, 1, "cpu", sets)
    splits = engine.prepare(cfgs[0], harness.load_sample(a.data, a.jets))
    pop = engine.Population(cfgs[0], splits, 8, "cpu")
    for cfg in cfgs:
        pop.add(cfg)
    trainers = [engine.Trainer(cfg, splits, "cpu") for cfg in cfgs]
    pop._train(pop.occupied)  # warm-up
    times: dict[str, list[float]] = {"separate": [], "population": []}
    for rep in range(a.repeats):
        t = time.perf_counter()
        for tr in trainers:
            tr.train_epoch(rep)
        times["separate"].append(time.perf_counter() - t)
        _, s = harness.clock(pop._train, pop.occupied)
        times["population"].append(s)
        harness.say(f"repeat {rep}: separate {times['separate'][-1]:.2f} s, population {s:.2f} s")
    sep, popm = harness.median(times["separate"]), harness.median(times["population"])
    rows = [{"case": "8 Trainer epochs in sequence", "epoch_s": sep, "x": 1.0},
            {"case": "one population epoch of 8", "epoch_s": popm, "x": harness.ratio(sep, popm)}]
    results = {"host": harness.host(), "times": times, "rows": rows, "n_train": len(splits.train),
               "threads": torch.get_num_threads()}
    harness.save(a, results, harness.table(rows, "case epoch_s x", f"CPU, {len(splits.train)} training jets, "
                                                                   "median of the repeats"))
    return results


@contextlib.contextmanager
def _timing(owner, name: str, into: dict, key: str, dev):
    """Replace ``owner.name`` by a wrapper that adds each call's seconds (device synchronised) to
    ``into[key]``, for the block's duration."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        harness.sync(dev)
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            harness.sync(dev)
            into[key] = into.get(key, 0.0) + time.perf_counter() - t
    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, inner)


def phases_child(k: int, jets: int, epochs: int, data: str | None, device: str) -> dict:
    """A population of K seed-setting members as the executor trains it; seconds per epoch in each part."""
    from hvae_ray.engine import PopulationRuns
    from hvae_ray.engine import population as pop_module
    from hvae_ray.engine import trainer as trainer_module
    from hvae_ray.evaluation import scorer as scorer_module
    from hvae_ray.evaluation.scorer import GenerationScorer
    from hvae_ray.tracking import TensorBoardLogger

    dev = torch.device(device)
    cfgs = [c.with_overrides({"epochs": 300, "patience": 20, "data.val_fraction": 0.15, "data.test_fraction": 0.15})
            for c in _configs(k, 8, 4, device)]  # the seed sweep's split
    runs = PopulationRuns(cfgs[0], harness.load_sample(data, jets), k, dev)
    tmp = tempfile.mkdtemp(prefix="bench-phases-")
    for i, cfg in enumerate(cfgs):
        runs.join(cfg, f"{tmp}/{i}/engine", f"{tmp}/{i}/tensorboard")
    runs.train_epoch()  # warm-up: capture, first-step costs
    parts: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for owner, name, key in ((runs.population, "_train", "step"),
                                 (runs.population.step, "validation_batches", "validation"),
                                 (pop_module, "validation_metrics", "validation"),
                                 (GenerationScorer, "score", "score"),
                                 (GenerationScorer, "generated", "score_decode"),
                                 (GenerationScorer, "_efps", "score_efps"),
                                 (scorer_module, "fpd", "score_fpd"),
                                 (pop_module.Population, "state", "state"),
                                 (TensorBoardLogger, "log_epoch", "tensorboard"),
                                 (trainer_module, "save_epoch", "checkpoints"),
                                 (trainer_module.RunLog, "_figures", "figures"),
                                 (trainer_module.RunLog, "record", "record")):
            stack.enter_context(_timing(owner, name, parts, key, dev))
        harness.sync(dev)
        t0 = time.perf_counter()
        for _ in range(epochs):
            runs.train_epoch()
        harness.sync(dev)
        wall = time.perf_counter() - t0
    out = {f"{key}_s": v / epochs for key, v in parts.items()}
    out["record_s"] = out.get("record_s", 0.0) - sum(out.get(f"{k}_s", 0.0) for k in ("checkpoints", "figures",
                                                                                      "state", "tensorboard"))
    return {"members": k, "epoch_s": wall / epochs, **out, "n_train": len(runs.population.splits.train)}


def phases(a) -> dict:
    rows = []
    for k in (int(x) for x in a.phase_ks.split(",")):
        r = harness.Child(phases_child, {"k": k, "jets": a.jets, "epochs": a.epochs, "data": a.data,
                                         "device": a.device}, timeout=600).result()
        harness.say(f"phases K={k}: {r}")
        rows.append(r)
    results = {"host": harness.host(), "jets": a.jets, "epochs": a.epochs, "rows": rows}
    harness.save(a, results, harness.table(rows, "members epoch_s step_s validation_s score_s score_decode_s "
                                                 "score_efps_s score_fpd_s checkpoints_s state_s tensorboard_s "
                                                 "figures_s record_s",
                                           f"Seconds per population epoch by part ({a.jets} jets, {a.device})"))
    return results


if __name__ == "__main__":
    p = harness.parser(__doc__, "data", "out", jets=4000, seconds=15.0, repeats=3, seed_ks="1,16,24,32,48",
                       b32_ks="1,16,64", procs="1,4", phase_ks="1,16", epochs=6, device="cuda")
    p.add_argument("part", choices=("gpu", "cpu", "phases"))
    args = p.parse_args()
    {"gpu": gpu, "cpu": cpu, "phases": phases}[args.part](args)
