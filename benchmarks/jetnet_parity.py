"""Parity of hvae-ray's generation metrics with jetnet 0.2.5, the field's reference implementation.

jetnet cannot share a virtual environment with hvae-ray (it needs numpy < 2 through energyflow and
wasserstein, then pyarrow < 16), so its numbers are made in a side environment and committed as a
fixture that the tests read without jetnet (steps 2 and 3 import no hvae-ray code):

    python benchmarks/jetnet_parity.py inputs     # 1. project venv: fixed samples of our generator
    python3 -m venv /tmp/jetnet-venv && . /tmp/jetnet-venv/bin/activate
    pip install torch==2.13.0 jetnet==0.2.5 "numpy<2" "pyarrow<16"
    python benchmarks/jetnet_parity.py reference  # 2. side venv: jetnet's numbers on them
    python benchmarks/jetnet_parity.py metrics real.parquet gen.npz  # 3. side venv: beside `hvae-ray evaluate`

Step 1 writes ``tests/fixtures/jetnet_parity/inputs.npz``: q jets (two seeds), g jets, and the first q
sample with pT_rel smeared by a log-normal factor (a deliberately distorted generator). Step 2 writes
``reference.json`` beside it: energyflow's EFPs of the first jets of each sample and jetnet's w1m, w1p,
w1efp, fpd, kpd for three pairs at jetnet's default sizes, the W1 metrics with jetnet's module generator
seeded by ``SEED`` before each metric (the draws hvae-ray makes with that seed) and by ``OTHER_SEED``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "jetnet_parity"
SAMPLES = {"q_a": ("q", 3000, 11), "q_b": ("q", 3000, 12), "g": ("g", 3000, 13)}
SMEAR = 0.2  # σ of ln(pT_rel factor) for the distorted sample
SMEAR_SEED = 14
PAIRS = (("q_a", "g"), ("q_a", "q_b"), ("q_a", "q_smear"))
N_EFP_JETS = 50
SEED = 42
OTHER_SEED = 7


def make_inputs(out: Path) -> None:
    """Samples from hvae-ray's own generator, as float32 (N, 30, 3) JetNet arrays (zero padding)."""
    from hvae_ray.data.generate import generate_jets

    arrays = {k: generate_jets(f, n, seed, progress=False).particles.astype(np.float32)
              for k, (f, n, seed) in SAMPLES.items()}
    q = arrays["q_a"].copy()
    real = (q != 0).any(axis=2)
    factor = np.exp(np.random.default_rng(SMEAR_SEED).normal(0.0, SMEAR, size=real.shape))
    q[..., 2] = np.where(real, q[..., 2] * factor, 0.0)
    arrays["q_smear"] = q
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())})")


def _read(path: Path) -> np.ndarray:
    """(N, P, 3) float64 (η_rel, φ_rel, pT_rel) from our Parquet, a JetNet .npz, or a fixture key."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["etarel", "phirel", "ptrel"]).to_pydict()
        x = np.zeros((len(t["ptrel"]), 30, 3))
        for j, row in enumerate(zip(t["etarel"], t["phirel"], t["ptrel"])):
            k = len(row[2])
            x[j, :k] = np.stack(row, axis=1)
        return x
    with np.load(path, allow_pickle=False) as f:
        feats = f["particle_features"]
        x = feats[..., :3].astype(np.float64)
        if feats.shape[-1] > 3:  # a mask column: masked particles are padding
            x = np.where(feats[..., 3:4] > 0, x, 0.0)
        return x


def _jetnet_metrics(real: np.ndarray, gen: np.ndarray, w1_seed: int | None) -> dict:
    """jetnet's metrics at its defaults; the W1 generator seeded with ``w1_seed`` before each metric."""
    from jetnet.evaluation import gen_metrics as gm

    def seeded():
        if w1_seed is not None:
            gm.rng = np.random.default_rng(w1_seed)

    seeded()
    out = {"w1m": [float(v) for v in gm.w1m(real, gen)]}
    for key, fn in (("w1p", gm.w1p), ("w1efp", lambda r, g: gm.w1efp(r, g, efp_jobs=1))):
        seeded()
        means, stds = fn(real, gen)
        out[key] = {"means": means.tolist(), "stds": stds.tolist()}
    return out


def make_reference(inputs: Path, out: Path) -> None:
    import energyflow
    import jetnet
    from jetnet.evaluation import gen_metrics as gm
    from jetnet.utils import efps

    with np.load(inputs, allow_pickle=False) as f:
        data = {k: f[k].astype(np.float64) for k in f.files}
    ref: dict = {"versions": {"jetnet": jetnet.__version__, "energyflow": energyflow.__version__,
                              "numpy": np.__version__}, "seed": SEED, "other_seed": OTHER_SEED,
                 "n_efp_jets": N_EFP_JETS, "efps_d4": {}, "efps_prime": {}, "pairs": {}}
    features = {}
    for name, x in data.items():
        features[name] = gm.get_fpd_kpd_jet_features(x, efp_jobs=1)
        ref["efps_d4"][name] = features[name][:N_EFP_JETS].tolist()
        ref["efps_prime"][name] = efps(x[:N_EFP_JETS], efp_jobs=1).tolist()
    for real_name, gen_name in PAIRS:
        real, gen = data[real_name], data[gen_name]
        print(f"{real_name} vs {gen_name}", flush=True)
        ref["pairs"][f"{real_name}/{gen_name}"] = {
            "seeded": _jetnet_metrics(real, gen, SEED), "other_seed": _jetnet_metrics(real, gen, OTHER_SEED),
            **{k: [float(v) for v in fn(features[real_name], features[gen_name])] for k, fn in (("fpd", gm.fpd),
                                                                                              ("kpd", gm.kpd))}}
    out.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {out}")


def print_metrics(real_path: Path, gen_path: Path) -> None:
    from jetnet.evaluation import gen_metrics as gm

    real, gen = _read(real_path), _read(gen_path)
    res, fr, fg = _jetnet_metrics(real, gen, SEED), gm.get_fpd_kpd_jet_features(real), gm.get_fpd_kpd_jet_features(gen)
    res.update(fpd=[float(v) for v in gm.fpd(fr, fg)], kpd=[float(v) for v in gm.kpd(fr, fg)], n_real=len(real),
               n_gen=len(gen), w1p_mean=float(np.mean(res["w1p"]["means"])),
               w1efp_mean=float(np.mean(res["w1efp"]["means"])))
    print(json.dumps(res, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inputs", help="make the fixture's input samples (project venv)")
    sub.add_parser("reference", help="compute jetnet's numbers on the inputs (jetnet venv)")
    m = sub.add_parser("metrics", help="jetnet's metrics on two files (jetnet venv)")
    m.add_argument("real", type=Path)
    m.add_argument("generated", type=Path)
    a = ap.parse_args(argv)
    inputs = FIXTURE_DIR / "inputs.npz"
    if a.cmd == "inputs":
        make_inputs(inputs)
    elif a.cmd == "reference":
        make_reference(inputs, FIXTURE_DIR / "reference.json")
    else:
        print_metrics(a.real, a.generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
