"""Known-answer tests of the jet observables and generation metrics in hvae_ray.physics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hvae_ray import physics as ph


def toy_jets(n: int, seed: int, eta_scale: float = 1.0, num_particles: int = 30):
    """Jet-like toy sample: pT-ordered Dirichlet pT fractions, softer particles wider in (η, φ)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, num_particles, 3), dtype=np.float32)
    mask = np.zeros((n, num_particles), dtype=bool)
    mult = rng.integers(5, num_particles + 1, size=n)
    for j, k in enumerate(mult):
        pt = np.sort(rng.dirichlet(np.full(k, 0.8)))[::-1]
        width = 0.03 / np.sqrt(pt + 0.01)
        x[j, :k, 0] = rng.normal(0.0, 1.0, k) * width * eta_scale
        x[j, :k, 1] = rng.normal(0.0, 1.0, k) * width
        x[j, :k, 2] = pt
        mask[j, :k] = True
    return x, mask


def one_jet(rows, num_particles: int = 5) -> np.ndarray:
    """A single padded jet (1, P, 3) from a list of (η_rel, φ_rel, pT_rel)."""
    x = np.zeros((1, num_particles, 3))
    x[0, : len(rows)] = rows
    return x


def brute_force_efp(graph, z, theta) -> float:
    """EFP by explicit sums over all vertex-to-particle assignments."""
    verts = sorted({v for e in graph for v in e})
    total = 0.0
    for assign in itertools.product(range(len(z)), repeat=len(verts)):
        idx = dict(zip(verts, assign, strict=True))
        term = np.prod([z[idx[v]] for v in verts])
        for a, b in graph:
            term *= theta[idx[a], idx[b]]
        total += term
    return total


# ------------------------------------------------------------------------------ jet mass


def test_mass_of_two_massless_particles():
    eta1, phi1, pt1, eta2, phi2, pt2 = 0.1, -0.2, 0.6, -0.25, 0.15, 0.35
    m = ph.jet_mass(one_jet([(eta1, phi1, pt1), (eta2, phi2, pt2)]))
    expected = np.sqrt(2 * pt1 * pt2 * (np.cosh(eta1 - eta2) - np.cos(phi1 - phi2)))
    assert m.shape == (1,)
    assert m[0] == pytest.approx(expected, rel=1e-12)


def test_mass_single_particle_zero_and_boost_invariant():
    assert ph.jet_mass(one_jet([(0.3, 0.2, 1.0)]))[0] == pytest.approx(0.0, abs=1e-7)
    x, mask = toy_jets(50, 0)
    shifted = x.copy()
    shifted[..., 0] = np.where(mask, x[..., 0] + 0.7, 0.0)
    np.testing.assert_allclose(ph.jet_mass(shifted, mask), ph.jet_mass(x, mask), rtol=1e-5, atol=1e-7)


def test_mass_respects_mask():
    x = one_jet([(0.1, 0.0, 0.5), (-0.1, 0.1, 0.5), (0.4, 0.4, 0.3)])
    mask = np.array([[True, True, False, False, False]])
    np.testing.assert_allclose(ph.jet_mass(x, mask), ph.jet_mass(x[:, :2]))


# ------------------------------------------------------------------------------ EFP graphs


def _canonical_connected(graph):
    n = 1 + max((max(e) for e in graph), default=0)
    return min(tuple(sorted(tuple(sorted((p[a], p[b]))) for a, b in graph))
               for p in itertools.permutations(range(n)))


def _components(graph):
    comps = []
    for a, b in graph:
        hit = [c for c in comps if a in c[0] or b in c[0]]
        verts, edges = {a, b}, [(a, b)]
        for c in hit:
            comps.remove(c)
            verts |= c[0]
            edges += c[1]
        comps.append((verts, edges))
    out = []
    for verts, edges in comps:
        lab = {v: i for i, v in enumerate(sorted(verts))}
        out.append(_canonical_connected([(lab[a], lab[b]) for a, b in edges]))
    return tuple(sorted(out))


def test_efp_d4_set_is_energyflows_36():
    graphs = ph.EFP_D4_GRAPHS
    assert len(graphs) == 36
    assert [sum(len(g) == d for g in graphs) for d in range(5)] == [1, 1, 3, 8, 23]
    # pairwise non-isomorphic: the multiset of canonical components identifies a multigraph
    keys = {_components(g) for g in graphs}
    assert len(keys) == 36
    connected = [g for g in graphs if len(_components(g)) <= 1]
    assert [sum(len(g) == d for g in connected) for d in range(5)] == [1, 1, 2, 5, 12]


def test_connected_graphs_are_complete():
    """Every connected loopless multigraph with 1 ≤ d ≤ 4 edges is in the set (brute force on 5 vertices)."""
    pairs = list(itertools.combinations(range(5), 2))
    found = set()
    for d in range(1, 5):
        for edges in itertools.combinations_with_replacement(pairs, d):
            verts = {v for e in edges for v in e}
            if verts != set(range(len(verts))) or len(_components(edges)) != 1:
                continue
            found.add(_canonical_connected(edges))
    ours = {_canonical_connected(g) for g in ph.EFP_D4_GRAPHS if g and len(_components(g)) == 1}
    assert found == ours


def test_prime_n4_d4_graphs():
    assert len(ph.PRIME_EFP_N4_D4) == 5
    prime = {_canonical_connected(g) for g in ph.PRIME_EFP_N4_D4}
    assert len(prime) == 5
    in_set = {_canonical_connected(g) for g in ph.EFP_D4_GRAPHS
              if len(g) == 4 and len(_components(g)) == 1 and len({v for e in g for v in e}) == 4}
    assert prime == in_set


# ------------------------------------------------------------------------------ EFP values


def test_efps_shape_and_single_particle():
    x, mask = toy_jets(7, 1)
    assert ph.efps(x, mask).shape == (7, 36)
    single = ph.efps(one_jet([(0.2, -0.1, 0.9)]))[0]
    for g, v in zip(ph.EFP_D4_GRAPHS, single, strict=True):
        assert v == (0.9 if len(g) == 0 else 0.0)  # the one-vertex EFP is Σ pT_rel as given


def test_efps_take_pt_rel_as_given():
    """jetnet's convention: z = pT_rel, so an n-vertex EFP scales as (pT_rel scale)^n."""
    x, mask = toy_jets(25, 8)
    ref = ph.efps(x, mask)
    half = x.copy()
    half[..., 2] *= 0.5
    n_vertices = np.array([1 + max((max(e) for e in g), default=0) for g in ph.EFP_D4_GRAPHS])
    np.testing.assert_allclose(ph.efps(half, mask), ref * 0.5 ** n_vertices, rtol=1e-12)


def test_efp_one_edge_two_particles():
    (e1, f1, p1), (e2, f2, p2) = (0.1, 0.2, 0.7), (-0.2, -0.2, 0.2)
    z1, z2 = p1, p2  # pT_rel as given, not renormalised (Σ = 0.9 here)
    theta = np.hypot(e1 - e2, f1 - f2)
    v = ph.efps(one_jet([(e1, f1, p1), (e2, f2, p2)]), graphs=[((0, 1),), ((0, 1), (0, 1))])[0]
    assert v[0] == pytest.approx(2 * z1 * z2 * theta, rel=1e-12)
    assert v[1] == pytest.approx(2 * z1 * z2 * theta**2, rel=1e-12)


def test_efps_match_brute_force_sums():
    rows = [(0.1, 0.05, 0.5), (-0.2, 0.1, 0.3), (0.05, -0.3, 0.2)]
    x = one_jet(rows)
    x[0, :3, 2] *= 0.9  # kept particles carry 90 % of the jet pT
    z = x[0, :3, 2]
    d = np.array([[np.hypot(a[0] - b[0], a[1] - b[1]) for b in rows] for a in rows])
    ours = ph.efps(x)[0]
    expected = [brute_force_efp(g, z, d) if g else z.sum() for g in ph.EFP_D4_GRAPHS]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)


def test_composite_efp_is_product_of_components():
    x, mask = toy_jets(20, 2)
    a, b, c = ((0, 1),), ((0, 1), (0, 2)), ((0, 1), (0, 2), (1, 2))
    composite = (a[0], (3, 4), (3, 5), (6, 7), (6, 8), (7, 8))  # a ⊔ b ⊔ c, relabelled
    v = ph.efps(x, mask, graphs=[a, b, c, composite])
    np.testing.assert_allclose(v[:, 3], v[:, 0] * v[:, 1] * v[:, 2], rtol=1e-12)


def test_efps_ignore_padding_and_chunking():
    x, mask = toy_jets(30, 3)
    padded = np.concatenate([x, np.zeros((30, 10, 3), np.float32)], axis=1)
    ref = ph.efps(x, mask)
    np.testing.assert_allclose(ph.efps(padded), ref, rtol=1e-10)
    np.testing.assert_allclose(ph.efps(x, mask, chunk_size=7), ref, rtol=1e-12)


def test_efps_wrap_phi():
    near = ph.efps(one_jet([(0.0, np.pi - 0.05, 0.5), (0.0, -np.pi + 0.05, 0.5)]), graphs=[((0, 1),)])
    assert near[0, 0] == pytest.approx(2 * 0.25 * 0.1, rel=1e-9)


# ------------------------------------------------------------------------------ W1


def _repeat(jet: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(jet, n, axis=0)


def test_w1p_of_a_shift_is_the_shift():
    jet = one_jet([(0.1, 0.05, 0.5), (-0.2, 0.1, 0.3), (0.05, -0.3, 0.2)])
    shifted = jet.copy()
    shifted[0, :3, 0] += 0.25
    means, stds = ph.w1p(_repeat(jet, 40), _repeat(shifted, 40), num_batches=3)
    np.testing.assert_allclose(means, [0.25, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(stds, 0.0, atol=1e-12)


def test_w1m_of_scaled_mass():
    jet = one_jet([(0.1, 0.05, 0.5), (-0.2, 0.1, 0.3), (0.05, -0.3, 0.2)])
    scaled = jet.copy()
    scaled[0, :3, 2] *= 1.5  # mass scales with the pT's
    mean, std = ph.w1m(_repeat(jet, 40), _repeat(scaled, 40))
    assert mean == pytest.approx(0.5 * ph.jet_mass(jet)[0], rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)
    # the mass is boost invariant: an η shift changes nothing, batch by batch
    x, mask = toy_jets(200, 4)
    boosted = x.copy()
    boosted[..., 0] = np.where(mask, x[..., 0] + 0.5, 0)
    assert ph.w1m(x, boosted, seed=3)[0] == pytest.approx(ph.w1m(x, x, seed=3)[0], rel=1e-4, abs=1e-7)


def test_w1p_ignores_padding():
    x, mask = toy_jets(100, 5)
    more_padding = np.concatenate([x, np.zeros((100, 12, 3), np.float32)], axis=1)
    # same seed, same jets drawn: only the padding differs, so the values must be identical
    ref, _ = ph.w1p(x, x, num_eval_samples=100, seed=1, real_mask=mask, gen_mask=mask)
    assert np.all(ref > 0)  # independent draws of real and generated jets
    means, _ = ph.w1p(x, more_padding, num_eval_samples=100, seed=1, real_mask=mask)
    np.testing.assert_allclose(means, ref, rtol=1e-12)
    garbage = x.copy()
    garbage[~mask] = 5.0  # masked-out slots with junk values must not count
    means, _ = ph.w1p(x, garbage, num_eval_samples=100, seed=1, real_mask=mask, gen_mask=mask)
    np.testing.assert_allclose(means, ref, rtol=1e-12)
    # identical single-jet samples: W1 is exactly 0 despite different padding
    jet = one_jet([(0.1, 0.05, 0.5), (-0.2, 0.1, 0.3)], num_particles=5)
    means, _ = ph.w1p(_repeat(jet, 20), _repeat(one_jet(jet[0, :2], num_particles=9), 20))
    np.testing.assert_allclose(means, 0.0, atol=1e-15)


def test_w1_draws_with_replacement_beyond_the_set_size_and_is_seeded():
    x, mask = toy_jets(60, 6)
    y, ymask = toy_jets(80, 7)
    a = ph.w1efp(x, y, num_eval_samples=10_000, seed=2, real_mask=mask, gen_mask=ymask)
    b = ph.w1efp(x, y, num_eval_samples=10_000, seed=2, real_mask=mask, gen_mask=ymask)
    assert a[0].shape == (5,) and a[1].shape == (5,)
    np.testing.assert_array_equal(a[0], b[0])
    # 10,000 draws from 60 and 80 jets (jetnet's batching): W1 of the two empirical sets, up to noise
    er, eg = ph.efps(x, mask, ph.PRIME_EFP_N4_D4), ph.efps(y, ymask, ph.PRIME_EFP_N4_D4)
    from scipy.stats import wasserstein_distance
    exact = [wasserstein_distance(er[:, f], eg[:, f]) for f in range(5)]
    np.testing.assert_allclose(a[0], exact, rtol=0.15)


# ------------------------------------------------------------------------------ Fréchet / FPD


def test_frechet_distance_analytic():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    eye = np.eye(3)
    assert ph.frechet_distance(mu1, eye, mu2, eye) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-10)
    # 1-D: (m1 − m2)² + (s1 − s2)²
    assert ph.frechet_distance(0.5, 4.0, -0.5, 1.0) == pytest.approx(1.0 + 1.0, rel=1e-10)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 36))
    a[:, 0] = 1.0  # a constant feature gives a singular covariance
    mu, cov = a.mean(axis=0), np.cov(a, rowvar=False)
    assert abs(ph.frechet_distance(mu, cov, mu, cov)) < 1e-6


def test_fpd_same_distribution_is_zero_within_error():
    rng = np.random.default_rng(1)
    cov = np.array([[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 0.5]])
    x = rng.multivariate_normal(np.zeros(3), cov, size=6000)
    y = rng.multivariate_normal(np.zeros(3), cov, size=6000)
    res = ph.fpd(x, y, min_samples=1000, max_samples=3000, num_batches=5, seed=0)
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
    value, err = ph.fpd(x, y, min_samples=1000, max_samples=3000, num_batches=5, seed=0)
    assert value == pytest.approx(expected, rel=0.1, abs=3 * err)


def test_fpd_sizes_are_jetnets_whatever_the_set_sizes():
    rng = np.random.default_rng(3)
    res = ph.fpd(rng.normal(size=(300, 2)), rng.normal(size=(400, 2)), num_batches=2)
    expected = (1 / np.linspace(1 / 20_000, 1 / 50_000, 10)).astype(np.int32)
    np.testing.assert_array_equal(res.batch_sizes, expected)
    assert res.batch_sizes[0] == 20_000 and res.batch_sizes[-1] == 49_999  # jetnet truncates 1/(1/N)
    assert np.isfinite(res.value) and np.isfinite(res.error)


# ------------------------------------------------------------------------------ KPD


def test_kpd_identical_zero_and_different_positive():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    same, same_err = ph.kpd(x, y, batch_size=500, seed=0)
    assert abs(same) <= 3 * same_err + 1e-4
    z = rng.normal(size=(2000, 4))
    z[:, 1] = 2.0 * z[:, 1] + 1.0
    diff, diff_err = ph.kpd(x, z, batch_size=500, seed=0)
    assert diff > 0 and diff > 5 * diff_err and diff > 20 * abs(same)


def test_mmd_poly_matches_direct_formula():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(30, 3)) + 0.2
    k = lambda a, b: (a @ b.T / 3 + 1) ** 4  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    direct = ((kxx.sum() - np.trace(kxx)) / (40 * 39) + (kyy.sum() - np.trace(kyy)) / (30 * 29)
              - 2 * kxy.mean())
    assert ph.mmd_poly_unbiased(x, y) == pytest.approx(direct, rel=1e-10)


# ------------------------------------------------------------------------------ all metrics


METRICS = ("w1m", "w1p_mean", "w1p_etarel", "w1efp_mean", "fpd", "kpd")
# subsample sizes smaller than jetnet's defaults, to keep these tests quick
SMALL = dict(num_eval_samples=2000, fpd_min_samples=1000, fpd_max_samples=3000, fpd_num_batches=5,
             kpd_batch_size=500)


@pytest.fixture(scope="module")
def real_jets():
    return toy_jets(1000, 10)


def test_evaluate_generation_real_vs_real(real_jets):
    x, mask = real_jets
    y, ymask = toy_jets(500, 11)
    out = ph.evaluate_generation(x, mask, y, ymask, seed=0, **SMALL)
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


def test_evaluate_generation_broken_generator(real_jets):
    x, mask = real_jets
    y, ymask = toy_jets(500, 12, eta_scale=3.0)
    out = ph.evaluate_generation(x, mask, y, ymask, seed=0, **SMALL)
    for m in METRICS:
        assert out[m] > 5 * out[f"{m}_floor"], m
        # KPD's spread is large for heavy-tailed features (quartic kernel): 2 "sigma" is plenty here
        assert out[m] > out[f"{m}_floor"] + 2 * (out[f"{m}_err"] + out[f"{m}_floor_err"]), m
