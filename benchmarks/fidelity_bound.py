"""What bounds generation quality, model by model: each model's jets from N(0, 1), from the fitted prior,
and decoded from q(z|x) of held-out jets (its reconstructions), against held-out real jets, by
jetnet's metrics.

    python benchmarks/fidelity_bound.py --train q_train.parquet --heldout q_heldout.parquet \
        --batch-size 512 --minutes 5 --out OUT \
        --variant slot: \
        --variant sinkhorn+jet:particle_loss=sinkhorn,loss_weights.jet_features=1

Each ``--variant NAME:KEY=VALUE,...`` (config overrides over the shared ``--set`` ones) trains in its
own process at the same time as the others (one GPU shared), for ``--epochs`` epochs or ``--minutes``
of training, whichever ends first, with `hvae-ray train`'s API. Then per variant: the prior is fitted
(`prior fit`), as many jets as the held-out set holds are sampled three ways (`sample`, `sample
--prior fitted`, `sample --posterior HELDOUT`) from the last epoch's checkpoint, and each set is
evaluated against the held-out jets (jetnet-0.2.5 convention; KPD on one batch of 5,000 to keep it
cheap). The held-out jets' seed must differ from the training jets'. Writes OUT/fidelity_bound.json
and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KEYS = ("w1m", "w1p_mean", "w1efp_mean", "fpd", "kpd")
SOURCES = ("standard N(0,1)", "fitted prior (GMM-20)", "q(z|x) of held-out jets")


class _Deadline:
    """An engine callback that stops training once ``seconds`` have passed."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def __call__(self, report) -> bool:
        return time.monotonic() > self.end


def _run_variant(job: dict) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    import torch

    torch.set_num_threads(job["threads"])
    from hvae_ray.api import fit_prior, sample, train
    from hvae_ray.data.io import load_jets
    from hvae_ray.physics import evaluate_generation

    out = Path(job["out"])
    t0 = time.time()
    result = train(None, job["train"], save_dir=out / "run", overrides=job["overrides"], progress=False,
                   callbacks=[_Deadline(job["seconds"])])
    t_train = time.time() - t0
    print(f"[{job['name']}] {result['epochs_run']} epochs in {t_train:.0f} s "
          f"({result['epoch_time_s']:.2f} s/epoch last): val_recon {result['val_recon']:.4g}, "
          f"val_kl {result['val_kl']:.4g}, val_w1m {result['val_w1m']:.3g}, val_fpd {result['val_fpd']:.3g}",
          flush=True)
    last = out / "run" / "last"
    real = load_jets(job["heldout"])
    n = len(real)
    fit_prior(last, job["train"], components=20)
    files = [sample(last, n, out / "standard.npz", seed=1), sample(last, n, out / "fitted.npz", seed=1, prior="fitted"),
             sample(last, n, out / "posterior.npz", seed=1, posterior_of=job["heldout"])]
    metrics = {}
    for name, path in zip(SOURCES, files):
        gen = load_jets(path)
        m = evaluate_generation(real.particles, real.mask, gen.particles, gen.mask, kpd_num_batches=1)
        metrics[name] = {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
        print(f"[{job['name']}] {name}: " + ", ".join(f"{k} {m[k]:.3g}" for k in KEYS), flush=True)
    print(f"[{job['name']}] evaluated at {time.time() - t0:.0f} s", flush=True)
    return {"name": job["name"], "overrides": job["overrides"], "train_s": t_train,
            "train_result": {k: v for k, v in result.items() if isinstance(v, (int, float, str))},
            "metrics": metrics}


def _variant(text: str) -> tuple[str, dict]:
    from hvae_ray.config import parse_override

    name, _, sets = text.partition(":")
    return name, dict(parse_override(s) for s in sets.split(",") if s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time per variant")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="a model to train (repeatable; default: one with the shared settings)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per variant")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    from hvae_ray.config import load_config, parse_override

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shared = {"epochs": a.epochs, "batch_size": a.batch_size, "gradient_accumulation_steps": 1,
              **dict(parse_override(s) for s in a.set)}
    variants = [_variant(v) for v in a.variant] or [("default", {})]
    jobs = []
    for name, extra in variants:
        overrides = {**shared, **extra}
        load_config(None, overrides)  # a bad override fails here, before anything trains
        jobs.append({"name": name, "overrides": overrides, "train": a.train, "heldout": a.heldout,
                     "out": str(out / name.replace("/", "_")), "seconds": 60 * a.minutes, "threads": a.threads})
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=mp.get_context("spawn")) as pool:
        runs = list(pool.map(_run_variant, jobs))
    report = {"shared": shared, "minutes": a.minutes, "total_s": time.time() - t0, "runs": runs}
    (out / "fidelity_bound.json").write_text(json.dumps(report, indent=1, default=str))
    floor = runs[0]["metrics"][SOURCES[0]]
    print(f"\nall variants in {time.time() - t0:.0f} s")
    print("| model | codes decoded | epochs | " + " | ".join(KEYS) + " |\n|---|---|---|" + "---|" * len(KEYS))
    print("| – | real vs real (floor) | – | " + " | ".join(f"{floor[k + '_floor']:.3g}" for k in KEYS) + " |")
    for run in runs:
        for source, m in run["metrics"].items():
            print(f"| {run['name']} | {source} | {run['train_result']['epochs_run']} | "
                  + " | ".join(f"{m[k]:.3g}" for k in KEYS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
