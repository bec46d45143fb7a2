"""Generation fidelity against held-out real jets by jetnet's metrics (the 0.2.5 convention).

bound   each --variant NAME:KEY=VALUE,... (over --set) trains in its own process, all at once, for --minutes; from
        its last checkpoint len(HELDOUT) jets sampled from N(0, 1), a fitted GMM-20 and q(z|x) of HELDOUT, each
        evaluated (KPD on one batch). Writes OUT/fidelity_bound.json. HELDOUT's seed must differ from TRAIN's.
priors  one checkpoint sampled from fitted flows and mixtures (KIND[COMPONENTS]:TEMPERATURE), N(0, 1) and q(z|x),
        evaluated in parallel at jetnet's default sizes. Writes OUT/prior_compare.json.
seeds   one recipe trained with several seeds as one population for at most --minutes; each seed's best/
        gets a fitted 100-Gaussian prior. Writes OUT/seedS/{last,best} and OUT/seeds.json.

  python benchmarks/fidelity.py bound --train Q.parquet --heldout H.parquet --minutes 5 --out OUT \
      --variant slot: --variant sinkhorn+jet:particle_loss=sinkhorn,loss_weights.jet_features=1
  python benchmarks/fidelity.py priors --checkpoint DIR --train Q.parquet --heldout H.parquet --priors flow:1,gmm20:1
"""

import json
import os
import shutil
import time
from pathlib import Path

import harness
from harness import METRICS

from hvae_ray import api, load_config
from hvae_ray.data.io import load_jets
from hvae_ray.evaluation.metrics import evaluate_generation

SOURCES = ("standard N(0,1)", "fitted prior (GMM-20)", "q(z|x) of held-out jets")


def variant(name: str, overrides: dict, train: str, heldout: str, out: str, seconds: float) -> dict:
    out, end, t0 = Path(out), time.monotonic() + seconds, time.time()
    result = api.train(None, train, save_dir=out / "run", overrides=overrides, progress=False,
                       callbacks=[lambda report: time.monotonic() > end])  # a callback returning True stops training
    t_train, last, real = time.time() - t0, out / "run" / "last", load_jets(heldout)
    api.fit_prior(last, train, components=20)
    metrics = {}
    for src, f, kw in zip(SOURCES, ("standard", "fitted", "posterior"),
                          ({"prior": "standard"}, {"prior": "fitted"}, {"posterior_of": heldout})):
        gen = load_jets(api.sample(last, len(real), out / f"{f}.npz", seed=1, **kw))
        m = evaluate_generation(real.particles, real.mask, gen.particles, gen.mask, kpd_num_batches=1)
        metrics[src] = {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
    return {"name": name, "overrides": overrides, "train_s": t_train, "evaluated_at_s": time.time() - t0,
            "train_result": {k: v for k, v in result.items() if isinstance(v, (int, float, str))}, "metrics": metrics}


def bound(a, out: Path) -> tuple[dict, list[dict]]:
    shared = {"epochs": a.epochs, "batch_size": a.batch_size, "gradient_accumulation_steps": 1,
              **harness.parse_sets(a.set)}
    jobs = []
    for v in a.variant or ["default:"]:
        name, _, sets = v.partition(":")
        overrides = {**shared, **harness.parse_sets(x for x in sets.split(",") if x)}
        load_config(None, overrides)  # a bad override fails here, before anything trains
        jobs.append({"name": name, "overrides": overrides, "train": a.train, "heldout": a.heldout,
                     "out": str(out / name.replace("/", "_")), "seconds": 60 * a.minutes})
    t0 = time.time()
    procs = [harness.Child(variant, j, timeout=60 * a.minutes + a.eval_timeout, log=j["out"] + ".log",
                           env={"OMP_NUM_THREADS": str(a.threads)}) for j in jobs]
    runs = [p.result() for p in procs]
    return ({"shared": shared, "minutes": a.minutes, "total_s": time.time() - t0, "runs": runs},
            [{"model": r["name"], "codes": src, "epochs": r["train_result"].get("epochs_run"), **m}
             for r in runs for src, m in r.get("metrics", {}).items()])


def priors(a, out: Path) -> tuple[dict, list[dict]]:
    n, t0, kw = len(load_jets(a.heldout)), time.time(), {"seed": 1, "device": a.device, "overwrite": True}
    gens = {SOURCES[0]: api.sample(a.checkpoint, n, out / "standard.npz", prior="standard", **kw),
            SOURCES[2]: api.sample(a.checkpoint, n, out / "posterior.npz", posterior_of=a.heldout, **kw)}
    for spec in a.priors.split(","):
        kind, temp = spec.split(":")
        folder = out / f"prior_{kind}"
        if not any(k.startswith(f"{kind} T=") for k in gens):  # each kind fitted once, in a fresh folder
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            shutil.copy(Path(a.checkpoint) / "checkpoint.pt", folder)
            _, s = harness.clock(api.fit_prior, folder, a.train, kind="flow" if kind == "flow" else "gmm",
                                 device=a.device, components=20 if kind == "flow" else int(kind[3:] or 20))
            harness.say(f"fitted {kind} in {s:.0f} s")
        gens[f"{kind} T={temp}"] = api.sample(folder, n, out / f"{kind}_{temp}.npz", prior="fitted",
                                              temperature=float(temp), **kw)
    harness.say(f"sampled {len(gens)} sets of {n} jets")
    names, width, metrics = list(gens), os.cpu_count() or 1, {}
    for i in range(0, len(names), width):
        procs = {k: harness.Child(api.evaluate, {"real": a.heldout, "generated": str(gens[k])}, timeout=a.eval_timeout,
                                  env={"OMP_NUM_THREADS": "1"}) for k in names[i:i + width]}
        metrics.update({k: p.result() for k, p in procs.items()})
    return ({"checkpoint": a.checkpoint, "n_heldout": n, "total_s": time.time() - t0, "metrics": metrics},
            [{"codes": k, **m} for k, m in metrics.items()])


def seeds(a, out: Path) -> tuple[dict, list[dict]]:
    """--config (over --set) with each seed of --seeds, trained as one population (PopulationRuns: every
    seed its own run folder OUT/seedS with last/ and best/) for at most --minutes on TRAIN; then each
    seed's best/ gets the 100-Gaussian prior (``prior fit``). Sampling and evaluation against held-out jets
    follow with the CLI (the README's fidelity section)."""
    from hvae_ray.engine import PopulationRuns

    sets = harness.parse_sets(a.set)
    sample, t0 = load_jets(a.train), time.time()
    if a.fit_epochs:
        probe_cfg = load_config(a.config, {**sets, "data.split_seed": a.split_seed})
        epochs = _epochs_that_fit(probe_cfg, sample, len(a.seeds.split(",")), a.device, 60 * a.minutes)
        sets["epochs"] = epochs
        harness.say(f"{epochs} epochs fit the remaining time")
    cfgs = [load_config(a.config, {**sets, "seed": int(s), "data.split_seed": a.split_seed})
            for s in a.seeds.split(",")]
    runs = PopulationRuns(cfgs[0], sample, len(cfgs), a.device)
    for cfg in cfgs:
        runs.join(cfg, out / f"seed{cfg.seed}", out / "tb" / f"seed{cfg.seed}")
    going, end, epochs = set(range(len(cfgs))), time.monotonic() + 60 * a.minutes, 0
    while going and time.monotonic() < end:
        for ep in runs.train_epoch(sorted(going)):
            if ep.done:
                going.discard(ep.slot)
        epochs += 1
        if epochs % 10 == 0:
            harness.say(f"epoch {epochs}, {time.time() - t0:.0f} s")
    summaries = [runs.leave(slot) for slot in range(len(cfgs))]
    t_train = time.time() - t0
    for cfg in cfgs:
        api.fit_prior(out / f"seed{cfg.seed}" / "best", a.train, components=100, device=a.device)
        if a.slim:
            _slim(out / f"seed{cfg.seed}" / "best")
    harness.say(f"trained {epochs} epochs in {t_train:.0f} s; priors fitted")
    return ({"config": a.config, "sets": sets, "seeds": a.seeds, "epochs": epochs, "train_s": t_train,
             "total_s": time.time() - t0, "members": summaries},
            [{"seed": c.seed, **{k: v for k, v in m.items() if k != "save_dir"}} for c, m in zip(cfgs, summaries)])


#: What only resuming training needs: the trained (not averaged) weights, AdamW's moments, the loss scaler.
RESUME_ONLY = ("train_model", "optimizer", "scaler")


def _slim(best: Path) -> None:
    """Rewrite ``best/checkpoint.pt`` without :data:`RESUME_ONLY` (a quarter of the size: enough to sample,
    evaluate and fit priors from, not to resume training)."""
    from hvae_ray.engine import load_checkpoint
    from hvae_ray.engine.checkpoint import save_checkpoint

    state = load_checkpoint(best)
    save_checkpoint(best / "checkpoint.pt", {k: v for k, v in state.items() if k not in RESUME_ONLY})


def _epochs_that_fit(cfg, sample, members: int, device, seconds: float, probe: int = 6) -> int:
    """How many epochs of a population of ``members`` copies of ``cfg`` fit what is left of ``seconds``
    after this probe: ``probe`` epochs of a throwaway population (no run folders) are timed, the first,
    which warms up, left out, so the learning-rate schedule is set for the run that fits (5 % kept spare)."""
    from hvae_ray.engine import PopulationRuns

    t0 = time.monotonic()
    runs = PopulationRuns(cfg, sample, members, device)
    for i in range(members):
        runs.join(cfg.with_overrides({"seed": 1000 + i}, "probe"))
    runs.train_epoch()
    t1 = time.monotonic()
    for _ in range(probe - 1):
        runs.train_epoch()
    per_epoch = (time.monotonic() - t1) / (probe - 1)
    del runs
    left = seconds - (time.monotonic() - t0)
    harness.say(f"probe: {per_epoch:.2f} s per epoch of {members} members")
    return max(1, min(cfg.epochs, int(0.95 * left / per_epoch)))


def main() -> None:
    p = harness.parser(__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    shared = dict(train=..., heldout=..., eval_timeout=(7200.0, "seconds allowed for sampling and evaluation"))
    harness.parser(sub.add_parser("bound", help="models trained side by side"), **shared, epochs=1000,
                   minutes=(5.0, "training time per variant"), batch_size=256, set=([], "overrides for every variant"),
                   variant=([], "a model (repeatable)", "NAME:KEY=VALUE,..."), threads=(2, "CPU threads per variant"),
                   out=...).set_defaults(run=bound, report="fidelity_bound.json", cols=["model", "codes", "epochs"])
    harness.parser(sub.add_parser("priors", help="one checkpoint"), **shared, checkpoint=...,
                   priors=("flow:1,flow:0.9,flow:0.8,gmm20:1,gmm20:0.9,gmm100:1",
                           "KIND[COMPONENTS]:TEMPERATURE,... (kinds flow, gmm)"), device="auto",
                   out="prior_compare").set_defaults(run=priors, report="prior_compare.json", cols=["codes"])
    harness.parser(sub.add_parser("seeds", help="one recipe, several seeds as one population"), train=...,
                   config=..., set=([], "overrides (KEY=VALUE)"), seeds="1,2,3", split_seed=0,
                   slim=(False, "keep in each best/ only what sampling needs (no optimiser state)"),
                   fit_epochs=(False, "set epochs (and so the schedule) to what fits --minutes, from a short probe"),
                   minutes=(5.0, "training time at most"), device="auto",
                   out=...).set_defaults(run=seeds, report="seeds.json", cols=["seed", "epochs_run", "best_epoch"])
    a = p.parse_args()
    (out := Path(a.out)).mkdir(parents=True, exist_ok=True)
    report, rows = a.run(a, out)
    (out / a.report).write_text(json.dumps(report, indent=1, default=str))
    floor = next((r for r in rows if "error" not in r), {})
    rows = [{"codes": "real vs real (floor)", **{k: floor.get(k + "_floor") for k in METRICS}}, *rows]
    print(harness.table(rows, [*a.cols, *METRICS, "error"], f"{len(rows) - 1} sets in {report['total_s']:.0f} s"))


if __name__ == "__main__":
    main()
