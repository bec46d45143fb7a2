"""Our generation metrics against jetnet 0.2.5's own numbers on the same jets.

The fixture under tests/fixtures/jetnet_parity/ was made by its ``make_fixture.py``: the
inputs by hvae-ray's generator (q jets of two seeds, g jets, and q jets with pT_rel smeared), the
reference by the real jetnet 0.2.5 / energyflow 1.4 in a side environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hvae_ray.evaluation import metrics
from hvae_ray.evaluation.efp import PRIME_EFP_N4_D4, efps

FIXTURE = Path(__file__).parents[1] / "fixtures" / "jetnet_parity"
PAIRS = ("q_a/g", "q_a/q_b", "q_a/q_smear")


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((FIXTURE / "reference.json").read_text())


@pytest.fixture(scope="module")
def jets() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "inputs.npz", allow_pickle=False) as f:
        return {k: f[k].astype(np.float64) for k in f.files}


@pytest.fixture(scope="module")
def features(jets) -> dict[str, np.ndarray]:
    return {k: efps(x) for k, x in jets.items()}


def _pair(name: str) -> tuple[str, str]:
    real, gen = name.split("/")
    return real, gen


def test_fixture_is_jetnet_0_2_5(ref):
    assert ref["versions"]["jetnet"] == "0.2.5"
    assert set(ref["pairs"]) == set(PAIRS)


@pytest.mark.parametrize("sample", ["q_a", "q_b", "g", "q_smear"])
def test_efps_equal_energyflow_column_by_column(ref, jets, sample):
    x = jets[sample][: ref["n_efp_jets"]]
    d4 = np.array(ref["efps_d4"][sample])
    prime = np.array(ref["efps_prime"][sample])
    assert d4.shape == (ref["n_efp_jets"], 36) and prime.shape == (ref["n_efp_jets"], 5)
    np.testing.assert_allclose(efps(x), d4, rtol=1e-9, atol=0)
    np.testing.assert_allclose(efps(x, graphs=PRIME_EFP_N4_D4), prime, rtol=1e-9, atol=0)
    # z is pT_rel as given: the one-vertex EFP is the kept particles' Σ pT_rel, not 1
    np.testing.assert_allclose(d4[:, 0], x[..., 2].sum(axis=1), rtol=1e-12)
    assert np.any(np.abs(d4[:, 0] - 1.0) > 0.01)


@pytest.mark.parametrize("pair", PAIRS)
def test_w1_metrics_equal_jetnet(ref, jets, pair):
    """Same seed, same draws: equal to rounding; independent draws: within the stated errors."""
    real, gen = (jets[k] for k in _pair(pair))
    seed = ref["seed"]
    ours = {"w1m": metrics.w1m(real, gen, seed=seed), "w1p": metrics.w1p(real, gen, seed=seed),
            "w1efp": metrics.w1efp(real, gen, seed=seed)}
    for key, (mean, std) in ours.items():
        same = ref["pairs"][pair]["seeded"][key]
        other = ref["pairs"][pair]["other_seed"][key]
        if key == "w1m":
            same_mean, same_std = same
            other_mean, other_std = other
        else:
            same_mean, same_std = same["means"], same["stds"]
            other_mean, other_std = other["means"], other["stds"]
        np.testing.assert_allclose(mean, same_mean, rtol=1e-9, err_msg=key)
        np.testing.assert_allclose(std, same_std, rtol=1e-6, atol=1e-15, err_msg=key)
        # 5 batches each: the spread of a mean is std/√5 per side; allow 4 combined σ
        bound = 4 * np.sqrt((np.square(std) + np.square(other_std)) / 5)
        assert np.all(np.abs(np.asarray(mean) - np.asarray(other_mean)) <= bound + 1e-12), key


@pytest.mark.parametrize("pair", PAIRS)
def test_fpd_and_kpd_equal_jetnet(ref, features, pair):
    real, gen = _pair(pair)
    value, err = metrics.fpd(features[real], features[gen], seed=ref["seed"])
    j_value, j_err = ref["pairs"][pair]["fpd"]
    assert value == pytest.approx(j_value, rel=1e-6, abs=1e-12)
    assert err == pytest.approx(j_err, rel=1e-3, abs=1e-12)
    assert abs(value - j_value) <= j_err + 1e-12
    value, err = metrics.kpd(features[real], features[gen], seed=ref["seed"])
    j_value, j_err = ref["pairs"][pair]["kpd"]
    assert value == pytest.approx(j_value, rel=1e-6, abs=1e-12)
    assert err == pytest.approx(j_err, rel=1e-6, abs=1e-12)


def test_evaluate_generation_reports_jetnets_values(ref, jets):
    """The values `hvae-ray evaluate` reports are jetnet's numbers for the same arrays."""
    out = metrics.evaluate_generation(jets["q_a"], None, jets["g"], None, seed=ref["seed"])
    entry = ref["pairs"]["q_a/g"]
    assert out["convention"] == "jetnet-0.2.5"
    assert out["n_real"] == out["n_gen"] == 3000 and out["n_floor"] == 1500
    assert out["w1_eval_samples"] == 50_000 and out["small_sample"] == 1
    assert out["w1m"] == pytest.approx(entry["seeded"]["w1m"][0], rel=1e-9)
    assert out["w1p_mean"] == pytest.approx(np.mean(entry["seeded"]["w1p"]["means"]), rel=1e-9)
    assert out["w1efp_mean"] == pytest.approx(np.mean(entry["seeded"]["w1efp"]["means"]), rel=1e-9)
    assert out["fpd"] == pytest.approx(entry["fpd"][0], rel=1e-6)
    assert out["kpd"] == pytest.approx(entry["kpd"][0], rel=1e-6)
    # q against g is above the real-vs-real floor, far above it in mass, particles and FPD
    for key in ("w1m", "w1p_mean", "w1efp_mean", "fpd", "kpd"):
        assert out[key] > out[f"{key}_floor"], key
    for key in ("w1m", "w1p_mean", "fpd"):
        assert out[key] > 3 * out[f"{key}_floor"], key
