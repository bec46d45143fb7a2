"""Known-answer tests of the generation metrics of hvae_ray.evaluation.metrics (W1, FPD, KPD, all of them
with their floors)."""

from __future__ import annotations

import numpy as np
import pytest

from hvae_ray.evaluation import metrics
from hvae_ray.evaluation.efp import PRIME_EFP_N4_D4, efps, jet_mass

# ------------------------------------------------------------------------------ W1


def _repeat(jet: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(jet, n, axis=0)


def test_w1p_of_a_shift_is_the_shift(one_jet):
    jet = one_jet([(0.1, 0.05, 0.5), (-0.2, 0.1, 0.3), (0.05, -0.3, 0.2)])
    shifted = jet.copy()
    shifted[0, :3, 0] += 0.25
    means, stds = metrics.w1p(_repeat(jet, 40), _repeat(shifted, 40), num_batches=3)
    np.testing.assert_allclose(means, [0.25, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(stds, 0.0, atol=1e-12)


def test_wasserstein_1d_is_scipys_with_ties_unequal_sizes_and_float32():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(7)
    cases = [(np.array([0.0]), np.array([2.5])),  # two points: their distance
             (np.round(rng.normal(size=1000), 1), np.round(rng.normal(0.3, 1.2, size=700), 1)),  # many ties
             (rng.normal(size=50_000).astype(np.float32), rng.exponential(size=40_000).astype(np.float32))]
    for u, v in cases:
        assert metrics.wasserstein_1d(u, v) == pytest.approx(wasserstein_distance(u, v), rel=1e-13)
    assert metrics.wasserstein_1d(np.array([0.0]), np.array([2.5])) == 2.5
    with pytest.raises(ValueError, match="at least one value"):
        metrics.wasserstein_1d(np.array([]), np.array([1.0]))


def test_w1m_of_scaled_mass(toy_jets, one_jet):
    jet = one_jet([(0.1, 0.05, 0.5), (-0.2, 0.1, 0.3), (0.05, -0.3, 0.2)])
    scaled = jet.copy()
    scaled[0, :3, 2] *= 1.5  # mass scales with the pT's
    mean, std = metrics.w1m(_repeat(jet, 40), _repeat(scaled, 40))
    assert mean == pytest.approx(0.5 * jet_mass(jet)[0], rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)
    # the mass is boost invariant: an η shift changes nothing, batch by batch
    x, mask = toy_jets(200, 4)
    boosted = x.copy()
    boosted[..., 0] = np.where(mask, x[..., 0] + 0.5, 0)
    assert metrics.w1m(x, boosted, seed=3)[0] == pytest.approx(metrics.w1m(x, x, seed=3)[0], rel=1e-4, abs=1e-7)


def test_w1p_ignores_padding(toy_jets, one_jet):
    x, mask = toy_jets(100, 5)
    more_padding = np.concatenate([x, np.zeros((100, 12, 3), np.float32)], axis=1)
    # same seed, same jets drawn: only the padding differs, so the values must be identical
    ref, _ = metrics.w1p(x, x, num_eval_samples=100, seed=1, real_mask=mask, gen_mask=mask)
    assert np.all(ref > 0)  # independent draws of real and generated jets
    means, _ = metrics.w1p(x, more_padding, num_eval_samples=100, seed=1, real_mask=mask)
    np.testing.assert_allclose(means, ref, rtol=1e-12)
    garbage = x.copy()
    garbage[~mask] = 5.0  # masked-out slots with junk values must not count
    means, _ = metrics.w1p(x, garbage, num_eval_samples=100, seed=1, real_mask=mask, gen_mask=mask)
    np.testing.assert_allclose(means, ref, rtol=1e-12)
    # identical single-jet samples: W1 is exactly 0 despite different padding
    jet = one_jet([(0.1, 0.05, 0.5), (-0.2, 0.1, 0.3)], num_particles=5)
    means, _ = metrics.w1p(_repeat(jet, 20), _repeat(one_jet(jet[0, :2], num_particles=9), 20))
    np.testing.assert_allclose(means, 0.0, atol=1e-15)


def test_w1_draws_with_replacement_beyond_the_set_size_and_is_seeded(toy_jets):
    x, mask = toy_jets(60, 6)
    y, ymask = toy_jets(80, 7)
    a = metrics.w1efp(x, y, num_eval_samples=10_000, seed=2, real_mask=mask, gen_mask=ymask)
    b = metrics.w1efp(x, y, num_eval_samples=10_000, seed=2, real_mask=mask, gen_mask=ymask)
    assert a[0].shape == (5,) and a[1].shape == (5,)
    np.testing.assert_array_equal(a[0], b[0])
    # 10,000 draws from 60 and 80 jets (jetnet's batching): W1 of the two empirical sets, up to noise
    er, eg = efps(x, mask, PRIME_EFP_N4_D4), efps(y, ymask, PRIME_EFP_N4_D4)
    from scipy.stats import wasserstein_distance
    exact = [wasserstein_distance(er[:, f], eg[:, f]) for f in range(5)]
    np.testing.assert_allclose(a[0], exact, rtol=0.15)


# ------------------------------------------------------------------------------ Fréchet / FPD


def test_frechet_distance_analytic():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    eye = np.eye(3)
    assert metrics.frechet_distance(mu1, eye, mu2, eye) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-10)
    # 1-D: (m1 − m2)² + (s1 − s2)²
    assert metrics.frechet_distance(0.5, 4.0, -0.5, 1.0) == pytest.approx(1.0 + 1.0, rel=1e-10)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 36))
    a[:, 0] = 1.0  # a constant feature gives a singular covariance
    mu, cov = a.mean(axis=0), np.cov(a, rowvar=False)
    assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-6


def test_fpd_same_distribution_is_zero_within_error():
    rng = np.random.default_rng(1)
    cov = np.array([[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 0.5]])
    x = rng.multivariate_normal(np.zeros(3), cov, size=6000)
    y = rng.multivariate_normal(np.zeros(3), cov, size=6000)
    res = metrics.fpd(x, y, min_samples=1000, max_samples=3000, num_batches=5, seed=0)
    value, err = res
    assert res.batch_sizes.min() == 1000 and res.batch_sizes.max() == 3000
    assert value <= 3 * err + 1e-4


def test_fpd_of_shifted_sample_matches_analytic():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6000, 3))
    y = rng.normal(size=(6000, 3))
    y[:, 0] += 1.0
    scale = np.abs(x).max(axis=0)  # features are normalised by the real set's max |value|
    expected = (1.0 / scale[0]) ** 2
    value, err = metrics.fpd(x, y, min_samples=1000, max_samples=3000, num_batches=5, seed=0)
    assert value == pytest.approx(expected, rel=0.1, abs=3 * err)


def test_fpd_sizes_are_jetnets_whatever_the_set_sizes():
    rng = np.random.default_rng(3)
    res = metrics.fpd(rng.normal(size=(300, 2)), rng.normal(size=(400, 2)), num_batches=2)
    expected = (1 / np.linspace(1 / 20_000, 1 / 50_000, 10)).astype(np.int32)
    np.testing.assert_array_equal(res.batch_sizes, expected)
    assert res.batch_sizes[0] == 20_000 and res.batch_sizes[-1] == 49_999  # jetnet truncates 1/(1/N)
    assert np.isfinite(res.value) and np.isfinite(res.error)


# ------------------------------------------------------------------------------ KPD


def test_kpd_identical_zero_and_different_positive():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    same, same_err = metrics.kpd(x, y, batch_size=500, seed=0)
    assert abs(same) <= 3 * same_err + 1e-4
    z = rng.normal(size=(2000, 4))
    z[:, 1] = 2.0 * z[:, 1] + 1.0
    diff, diff_err = metrics.kpd(x, z, batch_size=500, seed=0)
    assert diff > 0 and diff > 5 * diff_err and diff > 20 * abs(same)


def test_mmd_poly_matches_direct_formula():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 0.2
    k = lambda a, b: (a @ b.T / 3 + 1) ** 4  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    direct = ((kxx.sum() - np.trace(kxx)) / (40 * 39) + (kyy.sum() - np.trace(kyy)) / (30 * 29)
              - 2 * kxy.mean())
    assert metrics.mmd_poly_unbiased(x, y) == pytest.approx(direct, rel=1e-10)


# ------------------------------------------------------------------------------ all metrics


METRICS = ("w1m", "w1p_mean", "w1p_etarel", "w1efp_mean", "fpd", "kpd")


SMALL = dict(num_eval_samples=2000, fpd_min_samples=1000, fpd_max_samples=3000, fpd_num_batches=5,
             kpd_batch_size=500)


@pytest.fixture(scope="module")
def real_jets(toy_jets):
    return toy_jets(1000, 10)


def test_evaluate_generation_real_vs_real(real_jets, toy_jets):
    x, mask = real_jets
    y, ymask = toy_jets(500, 11)
    out = metrics.evaluate_generation(x, mask, y, ymask, seed=0, **SMALL)
    assert out["n_real"] == 1000 and out["n_gen"] == 500 and out["n_floor"] == 500
    assert out["convention"] == "jetnet-0.2.5" and out["small_sample"] == 1
    assert (out["w1_eval_samples"], out["fpd_min_samples"], out["fpd_max_samples"],
            out["kpd_batch_size"]) == (2000, 1000, 3000, 500)
    for key in ("w1p_etarel", "w1p_phirel", "w1p_ptrel", "w1efp_0", "w1efp_4", "fpd_floor_err"):
        assert key in out
    values = [v for k, v in out.items() if k != "convention"]
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)
    for m in METRICS:
        tol = 4 * (out[f"{m}_err"] + out[f"{m}_floor_err"])
        assert out[m] <= max(3 * out[f"{m}_floor"], out[f"{m}_floor"] + tol), m


def test_evaluate_generation_broken_generator(real_jets, toy_jets):
    x, mask = real_jets
    y, ymask = toy_jets(500, 12, eta_scale=3.0)
    out = metrics.evaluate_generation(x, mask, y, ymask, seed=0, **SMALL)
    for m in METRICS:
        assert out[m] > 5 * out[f"{m}_floor"], m
        # KPD's spread is large for heavy-tailed features (quartic kernel): 2 "sigma" is plenty here
        assert out[m] > out[f"{m}_floor"] + 2 * (out[f"{m}_err"] + out[f"{m}_floor_err"]), m



def test_same_n_compares_n_generated_with_n_real_and_floors_at_that_n(real_jets, toy_jets):
    """``per_side`` = N: the value is N generated against N real jets and the floor those N against N
    other real jets (the first and second N of the seed's permutation); ratios are value / floor."""
    x, mask = real_jets
    y, ymask = toy_jets(500, 11)
    n = 300
    out = metrics.evaluate_generation(x, mask, y, ymask, seed=0, per_side=n, **SMALL)
    perm = np.random.default_rng(0).permutation(len(x))
    a, b = perm[:n], perm[n:2 * n]
    value = metrics.evaluate_generation(x[a], mask[a], y[:n], ymask[:n], seed=0, **SMALL)
    floor = metrics.evaluate_generation(x[a], mask[a], x[b], mask[b], seed=0, **SMALL)
    assert (out["n_per_side"], out["n_floor"], out["n_real"], out["n_gen"]) == (n, n, 1000, 500)
    for m in (*METRICS, "w1p_ptrel", "w1efp_3"):
        assert out[m] == pytest.approx(value[m], rel=1e-9), m
        assert out[f"{m}_floor"] == pytest.approx(floor[m], rel=1e-9), m
        assert out[f"{m}_ratio"] == pytest.approx(out[m] / out[f"{m}_floor"]), m
    whole = metrics.evaluate_generation(x, mask, y, ymask, seed=0, **SMALL)
    assert whole["n_per_side"] == 0 and not any(k.endswith("_ratio") for k in whole)


def test_same_n_ratios_near_one_for_real_jets_and_far_for_a_broken_generator(real_jets, toy_jets):
    x, mask = real_jets
    good = metrics.evaluate_generation(x, mask, *toy_jets(500, 11), seed=0, per_side=500, **SMALL)
    bad = metrics.evaluate_generation(x, mask, *toy_jets(500, 12, eta_scale=3.0), seed=0, per_side=500, **SMALL)
    for m in ("w1m", "w1p_mean", "fpd"):
        assert good[f"{m}_ratio"] < 3, (m, good[f"{m}_ratio"])
        assert bad[f"{m}_ratio"] > 5, (m, bad[f"{m}_ratio"])


@pytest.mark.parametrize("per_side", [501, 1])
def test_same_n_needs_twice_n_real_and_n_generated_jets(real_jets, toy_jets, per_side):
    x, mask = real_jets
    with pytest.raises(ValueError, match="jets per side needs at least"):
        metrics.evaluate_generation(x, mask, *toy_jets(600, 11), seed=0, per_side=per_side, **SMALL)
