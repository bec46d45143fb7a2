"""What bounds generation quality: one model's jets from N(0, 1), from the fitted prior, and decoded from
q(z|x) of held-out jets (its reconstructions), each against held-out real jets, by jetnet's metrics.

    python benchmarks/fidelity_bound.py --train q_train.parquet --heldout q_heldout.parquet \
        --epochs 120 --batch-size 256 --out OUT

Trains one model with `hvae-ray train`'s API, fits the prior (`prior fit`), samples as many jets as
the held-out set holds three ways (`sample`, `sample --prior fitted`, `sample --posterior HELDOUT`)
and evaluates each against the held-out jets (`evaluate`, jetnet-0.2.5 convention) in parallel
processes. The held-out jets' seed must differ from the training jets'. Writes OUT/fidelity_bound.json
and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KEYS = ("w1m", "w1p_mean", "w1efp_mean", "fpd", "kpd")


def _evaluate(args: tuple[str, str, str]) -> tuple[str, dict]:
    from hvae_ray.api import evaluate

    name, real, gen = args
    return name, evaluate(real, gen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    from hvae_ray.api import fit_prior, sample, train
    from hvae_ray.config import parse_override
    from hvae_ray.data.io import load_jets

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(load_jets(a.heldout))
    overrides = {"epochs": a.epochs, "batch_size": a.batch_size, "gradient_accumulation_steps": 1,
                 "kl_warmup_epochs": max(1, a.epochs // 3), **dict(parse_override(s) for s in a.set)}
    t0 = time.time()
    result = train(None, a.train, save_dir=out / "run", overrides=overrides, progress=False)
    t_train = time.time() - t0
    print(f"trained {result['epochs_run']} epochs in {t_train:.0f} s: val_objective {result['val_objective']:.4g}, "
          f"val_kl {result['val_kl']:.4g}", flush=True)
    best = out / "run" / "best"
    fit_prior(best, a.train, components=20)
    gens = {"standard N(0,1)": sample(best, n, out / "standard.npz", seed=1),
            "fitted prior (GMM-20)": sample(best, n, out / "fitted.npz", seed=1, prior="fitted"),
            "q(z|x) of held-out jets": sample(best, n, out / "posterior.npz", seed=1, posterior_of=a.heldout)}
    print(f"sampled 3 × {n} jets at {time.time() - t0:.0f} s", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    with ProcessPoolExecutor(max_workers=3) as pool:
        metrics = dict(pool.map(_evaluate, [(k, a.heldout, str(v)) for k, v in gens.items()]))
    report = {"overrides": overrides, "train_result": {k: v for k, v in result.items()
                                                      if isinstance(v, (int, float, str))},
              "train_s": t_train, "total_s": time.time() - t0, "n_heldout": n, "metrics": metrics}
    (out / "fidelity_bound.json").write_text(json.dumps(report, indent=1, default=str))
    floor = next(iter(metrics.values()))
    print("| codes decoded | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS))
    print("| real vs real (floor) | " + " | ".join(f"{floor[k + '_floor']:.3g}" for k in KEYS) + " |")
    for name, m in metrics.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.3g}" for k in KEYS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
