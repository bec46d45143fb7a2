"""Break down Trainer.generation_metrics into its parts (s per part, synced), for the fidelity config."""
import sys, time, json, os
import numpy as np, torch
sys.path.insert(0, "benchmarks")
import harness
from hvae_ray import engine
from hvae_ray.engine import validation_batch_size
from scipy.stats import wasserstein_distance
from hvae_ray.evaluation.efp import efps, jet_mass
from hvae_ray.evaluation.metrics import fpd
from hvae_ray.latent import GaussianMixture, decode, encode

data, jets, dev = sys.argv[1], int(sys.argv[2]), engine.resolve_device(sys.argv[3])
gj = int(sys.argv[4]) if len(sys.argv) > 4 else 5000
sets = ["model.hidden_dim=128", "model.latent_dim=16", "model.decoder_layers=2", "model.dropout=0",
        "particle_loss=sinkhorn", "loss_weights.jet_features=3", "loss_weights.particle_marginals=10",
        "batch_size=512", "gradient_accumulation_steps=1", f"generation_jets={gj}"]
if dev.type == "cuda":
    torch.set_num_threads(1)
cfg = harness.config(sets, {"device": dev.type})
tr = engine.Trainer(cfg, engine.prepare(cfg, harness.load_sample(data, jets), device=dev), dev)
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
T = {}
def t(name, fn):
    sync(); t0 = time.perf_counter(); r = fn(); sync(); T.setdefault(name, []).append(time.perf_counter() - t0); return r
t("train_epoch", lambda: tr.train_epoch(0)); T.clear()
for rep in range(4):
    t("train_epoch", lambda: tr.train_epoch(1 + rep))
    t("generation_metrics (whole)", tr.generation_metrics)
    val = tr.splits.sample.subset(tr.splits.val[: cfg.generation_jets])
    n, size = len(val), validation_batch_size(cfg) if dev.type == "cuda" else 1024
    train = tr.splits.sample.subset(tr.splits.train[:n])
    mu, _ = t("encode train", lambda: encode(tr.model, tr.normaliser, cfg, train.particles, train.mask, dev, size))
    gmm = t("gmm fit", lambda: GaussianMixture.fit(mu, components=20, seed=cfg.seed, iterations=100, tol=1e-4, device=dev))
    z = t("gmm sample", lambda: gmm.sample(n, seed=cfg.seed))
    gen_p, gen_m = t("decode", lambda: decode(tr.model, tr.normaliser, z, dev, size))
    ed = dev if dev.type == "cuda" else None
    ve = t("val efps", lambda: efps(val.particles, val.mask, chunk_size=size, device=ed))
    ge = t("gen efps", lambda: efps(gen_p, gen_m, chunk_size=size, device=ed))
    t("val jet_mass", lambda: jet_mass(val.particles, val.mask))
    t("w1m", lambda: wasserstein_distance(jet_mass(val.particles, val.mask), jet_mass(gen_p, gen_m)))
    t("w1p", lambda: [wasserstein_distance(val.particles[..., f][val.mask], gen_p[..., f][gen_m]) for f in range(3)])
    t("fpd", lambda: fpd(ve, ge, min_samples=max(2, n // 2), max_samples=n, num_batches=4, num_points=4, seed=cfg.seed))
    print("rep", rep, flush=True)
out = {k: float(np.median(v[1:] if len(v) > 1 else v)) for k, v in T.items()}
print(json.dumps({"device": str(dev), "n_train": tr.n_train, "step_mode": tr.step_mode, "median_s": out}, indent=1))
