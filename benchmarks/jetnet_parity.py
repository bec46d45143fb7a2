"""Parity of hvae-ray's generation metrics with jetnet 0.2.5, the field's reference implementation.

jetnet needs numpy < 2 and pyarrow < 16: its numbers are made in a side venv (steps 2 and 3 import no hvae-ray
code) and committed as the fixture tests/fixtures/jetnet_parity/ that the tests read without jetnet:

    python benchmarks/jetnet_parity.py inputs     # 1. project venv: fixed samples of our generator
    python3 -m venv /tmp/jetnet-venv && . /tmp/jetnet-venv/bin/activate
    pip install torch==2.13.0 jetnet==0.2.5 "numpy<2" "pyarrow<16"
    python benchmarks/jetnet_parity.py reference  # 2. side venv: jetnet's numbers on them
    python benchmarks/jetnet_parity.py metrics real.parquet gen.npz  # 3. side venv: beside `hvae-ray evaluate`
"""

import argparse
import json
from pathlib import Path

import numpy as np

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "jetnet_parity"
INPUTS, REFERENCE = FIXTURE_DIR / "inputs.npz", FIXTURE_DIR / "reference.json"
SAMPLES = {"q_a": ("q", 3000, 11), "q_b": ("q", 3000, 12), "g": ("g", 3000, 13)}
SMEAR, SMEAR_SEED = 0.2, 14  # σ of ln(pT_rel factor) for the distorted sample, its seed
PAIRS = (("q_a", "g"), ("q_a", "q_b"), ("q_a", "q_smear"))
N_EFP_JETS = 50
SEED, OTHER_SEED = 42, 7


def make_inputs() -> None:
    """Samples from hvae-ray's own generator, as float32 (N, 30, 3) JetNet arrays (zero padding)."""
    from hvae_ray.data.generate import generate_jets

    arrays = {k: generate_jets(f, n, seed, progress=False).particles.astype(np.float32)
              for k, (f, n, seed) in SAMPLES.items()}
    q = arrays["q_smear"] = arrays["q_a"].copy()
    factor = np.exp(np.random.default_rng(SMEAR_SEED).normal(0.0, SMEAR, size=q.shape[:2]))
    q[..., 2] = np.where((q != 0).any(axis=2), q[..., 2] * factor, 0.0)
    INPUTS.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(INPUTS, **arrays)
    print(f"wrote {INPUTS} ({', '.join(f'{k} {v.shape}' for k, v in arrays.items())})")


def _read(path: Path) -> np.ndarray:
    """(N, P, 3) float64 (η_rel, φ_rel, pT_rel) from our Parquet or a JetNet .npz (masked particles zeroed)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path, columns=["etarel", "phirel", "ptrel"]).to_pydict()
        x = np.zeros((len(t["ptrel"]), 30, 3))
        for c, column in enumerate(t.values()):
            for j, v in enumerate(column):
                x[j, :len(v), c] = v
        return x
    with np.load(path, allow_pickle=False) as f:
        feats = f["particle_features"]
    x = feats[..., :3].astype(np.float64)
    return np.where(feats[..., 3:4] > 0, x, 0.0) if feats.shape[-1] > 3 else x  # a 4th column is the mask


def _jetnet_metrics(real: np.ndarray, gen: np.ndarray, w1_seed: int) -> dict:
    """jetnet's W1 metrics at its defaults, its module generator seeded with ``w1_seed`` before each."""
    from jetnet.evaluation import gen_metrics as gm

    out: dict = {}
    for key, fn in (("w1m", gm.w1m), ("w1p", gm.w1p), ("w1efp", lambda r, g: gm.w1efp(r, g, efp_jobs=1))):
        gm.rng = np.random.default_rng(w1_seed)
        v = fn(real, gen)
        out[key] = [float(x) for x in v] if key == "w1m" else {"means": v[0].tolist(), "stds": v[1].tolist()}
    return out


def _fpd_kpd(real_features: np.ndarray, gen_features: np.ndarray) -> dict:
    from jetnet.evaluation import gen_metrics as gm

    return {k: [float(v) for v in fn(real_features, gen_features)] for k, fn in (("fpd", gm.fpd), ("kpd", gm.kpd))}


def make_reference() -> None:
    import energyflow
    import jetnet
    from jetnet.evaluation import gen_metrics as gm
    from jetnet.utils import efps

    with np.load(INPUTS, allow_pickle=False) as f:
        data = {k: f[k].astype(np.float64) for k in f.files}
    features = {k: gm.get_fpd_kpd_jet_features(x, efp_jobs=1) for k, x in data.items()}
    ref: dict = {"versions": {"jetnet": jetnet.__version__, "energyflow": energyflow.__version__,
                              "numpy": np.__version__}, "seed": SEED, "other_seed": OTHER_SEED,
                 "n_efp_jets": N_EFP_JETS, "efps_d4": {k: v[:N_EFP_JETS].tolist() for k, v in features.items()},
                 "efps_prime": {k: efps(x[:N_EFP_JETS], efp_jobs=1).tolist() for k, x in data.items()}, "pairs": {}}
    for a, b in PAIRS:
        print(f"{a} vs {b}", flush=True)
        ref["pairs"][f"{a}/{b}"] = {"seeded": _jetnet_metrics(data[a], data[b], SEED),
                                    "other_seed": _jetnet_metrics(data[a], data[b], OTHER_SEED),
                                    **_fpd_kpd(features[a], features[b])}
    REFERENCE.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {REFERENCE}")


def print_metrics(real_path: Path, gen_path: Path) -> None:
    from jetnet.evaluation import gen_metrics as gm

    real, gen = _read(real_path), _read(gen_path)
    res = _jetnet_metrics(real, gen, SEED)
    res.update(_fpd_kpd(gm.get_fpd_kpd_jet_features(real), gm.get_fpd_kpd_jet_features(gen)), n_real=len(real),
               n_gen=len(gen), w1p_mean=float(np.mean(res["w1p"]["means"])),
               w1efp_mean=float(np.mean(res["w1efp"]["means"])))
    print(json.dumps(res, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inputs", help="make the fixture's input samples (project venv)").set_defaults(run=make_inputs)
    sub.add_parser("reference", help="jetnet's numbers on the inputs (jetnet venv)").set_defaults(run=make_reference)
    m = sub.add_parser("metrics", help="jetnet's metrics on two files (jetnet venv)")
    m.add_argument("real", type=Path)
    m.add_argument("generated", type=Path)
    m.set_defaults(run=lambda: print_metrics(a.real, a.generated))
    a = ap.parse_args(argv)
    a.run()


if __name__ == "__main__":
    main()
