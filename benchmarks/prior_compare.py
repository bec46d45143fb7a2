"""Which prior to sample a trained model from: fitted flows and Gaussian mixtures (at a few sampling
temperatures), N(0, 1) and the model's own reconstructions, each evaluated against held-out jets.

    python benchmarks/prior_compare.py --checkpoint DIR --train TRAIN.parquet --heldout HELDOUT.parquet \
        [--priors flow:1,flow:0.8,gmm20:1,gmm100:1] [--out OUT]

Each prior is fitted with `prior fit` in its own copy of the checkpoint folder (the training split
recomputed from TRAIN, the file the model was trained on), as many jets as HELDOUT holds are drawn
with `sample` (seed 1), and all sets are evaluated in parallel processes with `evaluate`'s metrics at
jetnet's default sizes. Prints a table; writes OUT/prior_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KEYS = ("w1m", "w1p_mean", "w1efp_mean", "fpd", "kpd")


def _evaluate(job: tuple[str, str, str]) -> tuple[str, dict]:
    from hvae_ray.api import evaluate

    name, real, gen = job
    return name, evaluate(real, gen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--priors", default="flow:1,flow:0.9,flow:0.8,gmm20:1,gmm20:0.9,gmm100:1",
                    help="KIND[COMPONENTS]:TEMPERATURE,... (kinds flow, gmm)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="prior_compare")
    a = ap.parse_args()

    from hvae_ray.api import fit_prior, sample
    from hvae_ray.data.io import load_jets

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n = len(load_jets(a.heldout))
    t0 = time.time()
    gens = {"standard N(0,1)": sample(a.checkpoint, n, out / "standard.npz", seed=1, device=a.device, overwrite=True),
            "q(z|x) of held-out jets": sample(a.checkpoint, n, out / "posterior.npz", seed=1, device=a.device,
                                              posterior_of=a.heldout, overwrite=True)}
    fitted: dict[str, Path] = {}
    for spec in a.priors.split(","):
        kind, temp = spec.split(":")
        if kind not in fitted:
            folder = out / f"prior_{kind}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            shutil.copy(Path(a.checkpoint) / "checkpoint.pt", folder)
            t = time.time()
            comps = int(kind[3:]) if kind.startswith("gmm") and kind[3:] else 20
            fit_prior(folder, a.train, kind="flow" if kind == "flow" else "gmm", components=comps, device=a.device)
            print(f"fitted {kind} in {time.time() - t:.0f} s", flush=True)
            fitted[kind] = folder
        gens[f"{kind} T={temp}"] = sample(fitted[kind], n, out / f"{kind}_{temp}.npz", seed=1, device=a.device,
                                          prior="fitted", temperature=float(temp), overwrite=True)
    print(f"sampled {len(gens)} sets of {n} jets at {time.time() - t0:.0f} s", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=min(len(gens), os.cpu_count() or 1)) as pool:
        metrics = dict(pool.map(_evaluate, [(k, a.heldout, str(v)) for k, v in gens.items()]))
    (out / "prior_compare.json").write_text(json.dumps({"checkpoint": a.checkpoint, "n_heldout": n,
                                                        "total_s": time.time() - t0, "metrics": metrics},
                                                       indent=1, default=str))
    floor = next(iter(metrics.values()))
    print(f"evaluated at {time.time() - t0:.0f} s")
    print("| codes decoded | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS))
    print("| real vs real (floor) | " + " | ".join(f"{floor[k + '_floor']:.3g}" for k in KEYS) + " |")
    for name, m in metrics.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:.3g}" for k in KEYS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
