"""The old Trainer.generation_metrics taken apart: each of its steps timed alone (synchronised), fidelity config.

python parts.py DATA JETS DEVICE [GENERATION_JETS], run in a tree with hvae_ray/ and benchmarks/harness.py.
Prints the median over the last 3 of 4 repetitions of each step, after one warm-up epoch.
"""

import json
import sys
import time

import numpy as np
import torch
from scipy.stats import wasserstein_distance

sys.path.insert(0, "benchmarks")
import harness  # noqa: E402

from hvae_ray import engine  # noqa: E402
from hvae_ray.engine import validation_batch_size  # noqa: E402
from hvae_ray.evaluation.efp import efps, jet_mass  # noqa: E402
from hvae_ray.evaluation.metrics import fpd  # noqa: E402
from hvae_ray.latent import GaussianMixture, decode, encode  # noqa: E402

SETS = ["model.hidden_dim=128", "model.latent_dim=16", "model.decoder_layers=2", "model.dropout=0",
        "particle_loss=sinkhorn", "loss_weights.jet_features=3", "loss_weights.particle_marginals=10",
        "batch_size=512", "gradient_accumulation_steps=1"]
TIMES: dict[str, list[float]] = {}


def timed(name, fn, dev):
    harness.sync(dev)
    t0 = time.perf_counter()
    out = fn()
    harness.sync(dev)
    TIMES.setdefault(name, []).append(time.perf_counter() - t0)
    return out


def steps(tr, cfg, dev) -> None:
    val = tr.splits.sample.subset(tr.splits.val[: cfg.generation_jets])
    n, size = len(val), validation_batch_size(cfg) if dev.type == "cuda" else 1024
    train = tr.splits.sample.subset(tr.splits.train[:n])
    ed = dev if dev.type == "cuda" else None
    mu, _ = timed("encode train", lambda: encode(tr.model, tr.normaliser, cfg, train.particles, train.mask, dev, size),
                  dev)
    gmm = timed("gmm fit", lambda: GaussianMixture.fit(mu, components=20, seed=cfg.seed, iterations=100, tol=1e-4,
                                                       device=dev), dev)
    z = timed("gmm sample", lambda: gmm.sample(n, seed=cfg.seed), dev)
    gen_p, gen_m = timed("decode", lambda: decode(tr.model, tr.normaliser, z, dev, size), dev)
    ve = timed("val efps", lambda: efps(val.particles, val.mask, chunk_size=size, device=ed), dev)
    ge = timed("gen efps", lambda: efps(gen_p, gen_m, chunk_size=size, device=ed), dev)
    timed("val jet_mass", lambda: jet_mass(val.particles, val.mask), dev)
    timed("w1m", lambda: wasserstein_distance(jet_mass(val.particles, val.mask), jet_mass(gen_p, gen_m)), dev)
    timed("w1p", lambda: [wasserstein_distance(val.particles[..., f][val.mask], gen_p[..., f][gen_m])
                          for f in range(3)], dev)
    timed("fpd", lambda: fpd(ve, ge, min_samples=max(2, n // 2), max_samples=n, num_batches=4, num_points=4,
                             seed=cfg.seed), dev)


def main() -> None:
    data, jets, dev = sys.argv[1], int(sys.argv[2]), engine.resolve_device(sys.argv[3])
    gen_jets = int(sys.argv[4]) if len(sys.argv) > 4 else 5000
    if dev.type == "cuda":
        torch.set_num_threads(1)  # as fit does on CUDA
    cfg = harness.config([*SETS, f"generation_jets={gen_jets}"], {"device": dev.type})
    tr = engine.Trainer(cfg, engine.prepare(cfg, harness.load_sample(data, jets), device=dev), dev)
    tr.train_epoch(0)
    for rep in range(4):
        timed("train_epoch", lambda e=1 + rep: tr.train_epoch(e), dev)
        timed("generation_metrics (whole)", tr.generation_metrics, dev)
        steps(tr, cfg, dev)
        print("rep", rep, flush=True)
    out = {k: float(np.median(v[1:])) for k, v in TIMES.items()}
    print(json.dumps({"device": str(dev), "n_train": tr.n_train, "step_mode": tr.step_mode, "median_s": out},
                     indent=1))


if __name__ == "__main__":
    main()
