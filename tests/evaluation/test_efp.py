"""Known-answer tests of the jet mass and the energy flow polynomials of hvae_ray.evaluation.efp."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hvae_ray.evaluation import efp


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


def test_mass_of_two_massless_particles(one_jet):
    eta1, phi1, pt1, eta2, phi2, pt2 = 0.1, -0.2, 0.6, -0.25, 0.15, 0.35
    m = efp.jet_mass(one_jet([(eta1, phi1, pt1), (eta2, phi2, pt2)]))
    expected = np.sqrt(2 * pt1 * pt2 * (np.cosh(eta1 - eta2) - np.cos(phi1 - phi2)))
    assert m.shape == (1,)
    assert m[0] == pytest.approx(expected, rel=1e-12)


def test_mass_single_particle_zero_and_boost_invariant(toy_jets, one_jet):
    assert efp.jet_mass(one_jet([(0.3, 0.2, 1.0)]))[0] == pytest.approx(0.0, abs=1e-7)
    x, mask = toy_jets(50, 0)
    shifted = x.copy()
    shifted[..., 0] = np.where(mask, x[..., 0] + 0.7, 0.0)
    np.testing.assert_allclose(efp.jet_mass(shifted, mask), efp.jet_mass(x, mask), rtol=1e-5, atol=1e-7)


def test_mass_respects_mask(one_jet):
    x = one_jet([(0.1, 0.0, 0.5), (-0.1, 0.1, 0.5), (0.4, 0.4, 0.3)])
    mask = np.array([[True, True, False, False, False]])
    np.testing.assert_allclose(efp.jet_mass(x, mask), efp.jet_mass(x[:, :2]))


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
    graphs = efp.EFP_D4_GRAPHS
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
    ours = {_canonical_connected(g) for g in efp.EFP_D4_GRAPHS if g and len(_components(g)) == 1}
    assert found == ours


def test_prime_n4_d4_graphs():
    assert len(efp.PRIME_EFP_N4_D4) == 5
    prime = {_canonical_connected(g) for g in efp.PRIME_EFP_N4_D4}
    assert len(prime) == 5
    in_set = {_canonical_connected(g) for g in efp.EFP_D4_GRAPHS
              if len(g) == 4 and len(_components(g)) == 1 and len({v for e in g for v in e}) == 4}
    assert prime == in_set


# ------------------------------------------------------------------------------ EFP values


def test_efps_shape_and_single_particle(toy_jets, one_jet):
    x, mask = toy_jets(7, 1)
    assert efp.efps(x, mask).shape == (7, 36)
    single = efp.efps(one_jet([(0.2, -0.1, 0.9)]))[0]
    for g, v in zip(efp.EFP_D4_GRAPHS, single, strict=True):
        assert v == (0.9 if len(g) == 0 else 0.0)  # the one-vertex EFP is Σ pT_rel as given


def test_efps_take_pt_rel_as_given(toy_jets):
    """jetnet's convention: z = pT_rel, so an n-vertex EFP scales as (pT_rel scale)^n."""
    x, mask = toy_jets(25, 8)
    ref = efp.efps(x, mask)
    half = x.copy()
    half[..., 2] *= 0.5
    n_vertices = np.array([1 + max((max(e) for e in g), default=0) for g in efp.EFP_D4_GRAPHS])
    np.testing.assert_allclose(efp.efps(half, mask), ref * 0.5 ** n_vertices, rtol=1e-12)


def test_efp_one_edge_two_particles(one_jet):
    (e1, f1, p1), (e2, f2, p2) = (0.1, 0.2, 0.7), (-0.2, -0.2, 0.2)
    z1, z2 = p1, p2  # pT_rel as given, not renormalised (Σ = 0.9 here)
    theta = np.hypot(e1 - e2, f1 - f2)
    v = efp.efps(one_jet([(e1, f1, p1), (e2, f2, p2)]), graphs=[((0, 1),), ((0, 1), (0, 1))])[0]
    assert v[0] == pytest.approx(2 * z1 * z2 * theta, rel=1e-12)
    assert v[1] == pytest.approx(2 * z1 * z2 * theta**2, rel=1e-12)


def test_efps_match_brute_force_sums(one_jet):
    rows = [(0.1, 0.05, 0.5), (-0.2, 0.1, 0.3), (0.05, -0.3, 0.2)]
    x = one_jet(rows)
    x[0, :3, 2] *= 0.9  # kept particles carry 90 % of the jet pT
    z = x[0, :3, 2]
    d = np.array([[np.hypot(a[0] - b[0], a[1] - b[1]) for b in rows] for a in rows])
    ours = efp.efps(x)[0]
    expected = [brute_force_efp(g, z, d) if g else z.sum() for g in efp.EFP_D4_GRAPHS]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)


def test_composite_efp_is_product_of_components(toy_jets):
    x, mask = toy_jets(20, 2)
    a, b, c = ((0, 1),), ((0, 1), (0, 2)), ((0, 1), (0, 2), (1, 2))
    composite = (a[0], (3, 4), (3, 5), (6, 7), (6, 8), (7, 8))  # a ⊔ b ⊔ c, relabelled
    v = efp.efps(x, mask, graphs=[a, b, c, composite])
    np.testing.assert_allclose(v[:, 3], v[:, 0] * v[:, 1] * v[:, 2], rtol=1e-12)


def test_efps_ignore_padding_and_chunking(toy_jets):
    x, mask = toy_jets(30, 3)
    padded = np.concatenate([x, np.zeros((30, 10, 3), np.float32)], axis=1)
    ref = efp.efps(x, mask)
    np.testing.assert_allclose(efp.efps(padded), ref, rtol=1e-10)
    np.testing.assert_allclose(efp.efps(x, mask, chunk_size=7), ref, rtol=1e-12)


def test_efps_computed_with_torch_equal_numpys_and_the_brute_force_sums(toy_jets, one_jet):
    """The device path (torch, contracted pair by pair along numpy's order) on the CPU: the same values."""
    x, mask = toy_jets(40, 5)
    np.testing.assert_allclose(efp.efps(x, mask, device="cpu", chunk_size=16), efp.efps(x, mask), rtol=1e-12)
    rows = [(0.1, 0.05, 0.5), (-0.2, 3.1, 0.3), (0.05, -3.0, 0.2)]  # two particles across φ = ±π
    jet = one_jet(rows)
    z = jet[0, :3, 2]
    wrapped = lambda a, b: np.pi - abs(abs(a - b) % (2 * np.pi) - np.pi)  # noqa: E731
    d = np.array([[np.hypot(a[0] - b[0], wrapped(a[1], b[1])) for b in rows] for a in rows])
    expected = [brute_force_efp(g, z, d) if g else z.sum() for g in efp.EFP_D4_GRAPHS]
    np.testing.assert_allclose(efp.efps(jet, device="cpu")[0], expected, rtol=1e-12, atol=1e-15)


def test_efps_wrap_phi(one_jet):
    near = efp.efps(one_jet([(0.0, np.pi - 0.05, 0.5), (0.0, -np.pi + 0.05, 0.5)]), graphs=[((0, 1),)])
    assert near[0, 0] == pytest.approx(2 * 0.25 * 0.1, rel=1e-9)

