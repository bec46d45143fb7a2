"""Jets → hypergraphs: pairwise features, kNN groups, group features, PyG batching and normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch, Data

from hvae_ray.config import Config
from hvae_ray.data.graphs import (
    EDGE_FEATURES,
    HYPEREDGE_FEATURES,
    LOG_EPS,
    FeatureNormaliser,
    JetHypergraph,
    build_graphs,
    delta_phi,
    group_features,
    knn_groups,
    node_features,
    pairwise_features,
    raw_features,
)
from hvae_ray.data.jets import MAX_PARTICLES, from_padded


def ln(x: float) -> float:
    return math.log(x + LOG_EPS)


def four_vector(eta: float, phi: float, pt: float) -> np.ndarray:
    """(E, px, py, pz) of a massless particle."""
    return np.array([pt * math.cosh(eta), pt * math.cos(phi), pt * math.sin(phi), pt * math.sinh(eta)])


def random_sample(n: int, seed: int, min_particles: int = 1, eta_scale: float = 0.2):
    """Random jets (1..30 particles), pT-ordered, zero-padded."""
    rng = np.random.default_rng(seed)
    particles = np.zeros((n, MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((n, MAX_PARTICLES), dtype=bool)
    for i in range(n):
        k = int(rng.integers(min_particles, MAX_PARTICLES + 1))
        particles[i, :k, 0] = rng.normal(0, eta_scale, k)
        particles[i, :k, 1] = rng.normal(0, 0.2, k)
        particles[i, :k, 2] = np.sort(rng.dirichlet(np.ones(k)))[::-1]
        mask[i, :k] = True
    return from_padded(particles, mask, source="<test>")


# ---------------------------------------------------------------------------------------------------------
# Pairwise features


A = (0.1, 0.2, 0.3)
B = (-0.2, 0.5, 0.1)


def test_pairwise_features_by_hand():
    feats = pairwise_features(torch.tensor([A, B], dtype=torch.float64))
    assert feats.shape == (2, 2, len(EDGE_FEATURES))
    delta = math.sqrt(0.3**2 + 0.3**2)
    m2 = 2 * 0.3 * 0.1 * (math.cosh(0.3) - math.cos(0.3))
    expected = [ln(delta), ln(0.1 * delta), ln(0.1 / 0.4), ln(m2)]
    np.testing.assert_allclose(feats[0, 1].numpy(), expected, rtol=0, atol=1e-9)


def test_pair_mass_equals_four_vector_mass():
    pa, pb = four_vector(*A), four_vector(*B)
    s = pa + pb
    m2_4v = s[0] ** 2 - s[1] ** 2 - s[2] ** 2 - s[3] ** 2
    feats = pairwise_features(torch.tensor([A, B], dtype=torch.float64))
    assert feats[0, 1, 3].item() == pytest.approx(ln(m2_4v), abs=1e-6)


def test_pairwise_features_float32_match_float64():
    x = torch.tensor([A, B], dtype=torch.float64)
    np.testing.assert_allclose(pairwise_features(x.float())[0, 1].numpy(), pairwise_features(x)[0, 1].numpy(),
                               atol=1e-4)


def test_delta_phi_wraps_around():
    a, b = torch.tensor(3.1, dtype=torch.float64), torch.tensor(-3.1, dtype=torch.float64)
    assert delta_phi(a, b).item() == pytest.approx(6.2 - 2 * math.pi, abs=1e-12)
    assert delta_phi(b, a).item() == pytest.approx(2 * math.pi - 6.2, abs=1e-12)
    feats = pairwise_features(torch.tensor([[0.0, 3.1, 0.5], [0.0, -3.1, 0.5]], dtype=torch.float64))
    assert math.exp(feats[0, 1, 0].item()) == pytest.approx(2 * math.pi - 6.2, abs=1e-6)  # Δ ≈ 0.083


def test_delta_phi_range():
    x = torch.linspace(-20, 20, 401, dtype=torch.float64)
    d = delta_phi(x, torch.zeros_like(x))
    assert (d > -math.pi).all() and (d <= math.pi).all()
    assert torch.allclose(torch.cos(d), torch.cos(x)) and torch.allclose(torch.sin(d), torch.sin(x))
    assert delta_phi(torch.tensor(math.pi), torch.tensor(0.0)).item() == pytest.approx(math.pi)
    assert delta_phi(torch.tensor(-math.pi), torch.tensor(0.0)).item() == pytest.approx(math.pi)


def test_pairwise_features_are_symmetric():
    x = torch.from_numpy(random_sample(4, 0).particles)
    f = pairwise_features(x)
    assert f.shape == (4, MAX_PARTICLES, MAX_PARTICLES, 4)
    assert torch.allclose(f, f.transpose(1, 2))


def test_padding_and_diagonal_give_log_eps():
    x = torch.tensor([[A, B, (0.0, 0.0, 0.0)]], dtype=torch.float64)
    f = pairwise_features(x)
    floor = math.log(LOG_EPS)
    assert f[0, 0, 0, 0].item() == pytest.approx(floor)  # Δ of a particle with itself
    assert f[0, 0, 2, 3].item() == pytest.approx(floor)  # m² with padding
    assert torch.isfinite(f).all()


# ---------------------------------------------------------------------------------------------------------
# kNN groups and group features


def test_knn_groups_self_first_then_nearest():
    # Five particles on a line in η: nearest neighbours are known.
    eta = [0.0, 0.1, 0.3, 0.7, 1.2]
    parts = torch.zeros(1, 8, 3)
    parts[0, :5, 0] = torch.tensor(eta)
    parts[0, :5, 2] = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :5] = True
    groups = knn_groups(parts, mask, k=2)
    assert groups.shape == (1, 8, 3)
    assert groups[0, :5].tolist() == [[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 2, 4], [4, 3, 2]]


def test_knn_groups_use_wrapped_phi():
    parts = torch.tensor([[[0.0, 3.1, 0.5], [0.0, 0.0, 0.3], [0.0, -3.1, 0.2]]])
    groups = knn_groups(parts, torch.ones(1, 3, dtype=torch.bool), k=1)
    assert groups[0, 0].tolist() == [0, 2]  # φ = 3.1 and −3.1 are 0.083 apart, not 6.2
    assert groups[0, 2].tolist() == [2, 0]


def test_knn_groups_never_contain_padding():
    sample = random_sample(20, 1)
    parts, mask = torch.from_numpy(sample.particles), torch.from_numpy(sample.mask)
    groups = knn_groups(parts, mask, k=3)
    assert groups.shape == (20, MAX_PARTICLES, 4)
    for j in range(20):
        n = int(mask[j].sum())
        g = groups[j, :n]
        assert (g[:, 0] == torch.arange(n)).all()   # self first
        assert (g < n).all()                        # real particles only (they come first)
        for row in g.tolist():                      # a short jet repeats self, never a neighbour twice
            others = [m for m in row[1:] if m != row[0]]
            assert len(others) == len(set(others)) == min(3, n - 1)


def test_knn_group_of_a_two_particle_jet_repeats_self():
    parts = torch.zeros(1, 30, 3)
    parts[0, :2] = torch.tensor([A, B])
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, :2] = True
    groups = knn_groups(parts, mask, k=3)
    assert groups[0, 0].tolist() == [0, 1, 0, 0]
    assert groups[0, 1].tolist() == [1, 0, 1, 1]


def test_group_features_single_particle_group():
    parts = torch.tensor([[A]], dtype=torch.float64)
    feats = group_features(parts, torch.zeros(1, 1, 4, dtype=torch.long))  # the particle repeated 4 times
    assert feats.shape == (1, 1, len(HYPEREDGE_FEATURES))
    floor = math.log(LOG_EPS)
    # massless: m² = 0; no pairs: correlator 0; the repeats are counted once: Σz = 0.3, not 1.2.
    np.testing.assert_allclose(feats[0, 0].numpy(), [floor, floor, ln(0.3)], atol=1e-6)


def test_group_features_of_a_pair_match_the_pair():
    parts = torch.tensor([[A, B]], dtype=torch.float64)
    groups = torch.tensor([[[0, 1, 0], [1, 0, 1]]])
    feats = group_features(parts, groups)
    pair = pairwise_features(parts[0])
    delta = math.sqrt(0.3**2 + 0.3**2)
    for c in (0, 1):
        assert feats[0, c, 0].item() == pytest.approx(pair[0, 1, 3].item(), abs=1e-6)   # ln m²
        assert feats[0, c, 1].item() == pytest.approx(ln(0.3 * 0.1 * delta), abs=1e-6)  # ln z_a z_b Δ
        assert feats[0, c, 2].item() == pytest.approx(ln(0.4), abs=1e-9)                 # ln Σz


def test_group_mass_of_three_particles_matches_four_vectors():
    c = (0.05, -0.1, 0.2)
    parts = torch.tensor([[A, B, c]], dtype=torch.float64)
    feats = group_features(parts, torch.tensor([[[0, 1, 2]] * 3]))
    s = four_vector(*A) + four_vector(*B) + four_vector(*c)
    m2 = s[0] ** 2 - s[1] ** 2 - s[2] ** 2 - s[3] ** 2
    assert feats[0, 0, 0].item() == pytest.approx(ln(m2), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Graphs


@pytest.fixture(scope="module")
def small():
    """Jets with 1, 2, 5 and 12 particles, their raw features and a normaliser fitted on them."""
    rng = np.random.default_rng(3)
    counts = [1, 2, 5, 12]
    particles = np.zeros((len(counts), MAX_PARTICLES, 3), dtype=np.float32)
    for i, n in enumerate(counts):
        particles[i, :n, :2] = rng.normal(0, 0.2, (n, 2))
        particles[i, :n, 2] = np.sort(rng.dirichlet(np.ones(n)))[::-1]
    sample = from_padded(particles, source="<test>")
    raw = raw_features(sample, knn=3)
    return counts, sample, raw, FeatureNormaliser.fit(raw)


def test_raw_feature_shapes(small):
    counts, _, raw, _ = small
    n = len(counts)
    assert raw.nodes.shape == (n, MAX_PARTICLES, 3)
    assert raw.edges.shape == (n, MAX_PARTICLES, MAX_PARTICLES, 4)
    assert raw.hyperedges.shape == (n, MAX_PARTICLES, 3)
    assert raw.groups.shape == (n, MAX_PARTICLES, 4)
    assert raw.mask.sum(dim=1).tolist() == counts


def test_raw_features_in_chunks_equal_one_pass(small):
    _, sample, raw, _ = small
    chunked = raw_features(sample, knn=3, chunk=3)
    for f in ("nodes", "edges", "hyperedges", "groups", "mask"):
        assert torch.equal(getattr(raw, f), getattr(chunked, f)), f


def test_build_graphs_shapes(small):
    counts, sample, raw, norm = small
    graphs = build_graphs(raw, norm)
    assert len(graphs) == len(counts)
    for g, n in zip(graphs, counts):
        assert isinstance(g, JetHypergraph)
        assert g.num_nodes == n
        assert g.x.shape == (n, 3)
        assert g.edge_index.shape == (2, n * (n - 1))
        assert g.edge_attr.shape == (n * (n - 1), 4)
        assert (g.edge_index[0] != g.edge_index[1]).all()            # no self-loops
        assert len({tuple(e) for e in g.edge_index.t().tolist()}) == n * (n - 1)   # every ordered pair once
        assert g.hyperedge_attr.shape == (n, 3)
        hi = g.hyperedge_index
        assert hi.shape == (2, n * min(4, n))                         # k+1 distinct members, fewer if n ≤ k
        assert (hi[0] < n).all() and (hi[1] < n).all()
        for m in range(n):                                            # hyperedge m is centred on particle m
            assert m in hi[0, hi[1] == m].tolist()
        assert torch.isfinite(g.x).all() and torch.isfinite(g.edge_attr).all()


def test_build_graphs_index_order(small):
    _, _, raw, norm = small
    graphs = build_graphs(raw, norm, np.array([3, 0]))
    assert [g.num_nodes for g in graphs] == [12, 1]


def test_graph_contents_are_the_normalised_features(small):
    _, sample, raw, norm = small
    g = build_graphs(raw, norm, np.array([3]))[0]
    n = 12
    back = norm.inverse_particles(g.x)
    np.testing.assert_allclose(back.numpy(), sample.particles[3, :n], atol=1e-5)
    i, j = g.edge_index
    raw_pairs = pairwise_features(torch.from_numpy(sample.particles[3]))
    assert torch.allclose(norm.inverse("edges", g.edge_attr), raw_pairs[i, j], atol=1e-4)


def test_batching_increments_hyperedge_ids_by_hyperedge_count():
    # Hand-made graphs where #hyperedges != #nodes, so a node-count increment would be wrong.
    g1 = JetHypergraph(x=torch.zeros(3, 3), edge_index=torch.tensor([[0, 1], [1, 2]]),
                       edge_attr=torch.zeros(2, 4), hyperedge_index=torch.tensor([[0, 1, 2], [0, 0, 1]]),
                       hyperedge_attr=torch.zeros(2, 3), num_nodes=3)
    g2 = JetHypergraph(x=torch.ones(4, 3), edge_index=torch.tensor([[0, 3], [3, 0]]),
                       edge_attr=torch.ones(2, 4), hyperedge_index=torch.tensor([[0, 3, 1], [0, 0, 1]]),
                       hyperedge_attr=torch.ones(2, 3), num_nodes=4)
    batch = Batch.from_data_list([g1, g2])
    assert batch.hyperedge_index.tolist() == [[0, 1, 2, 3, 6, 4], [0, 0, 1, 2, 2, 3]]
    assert batch.edge_index.tolist() == [[0, 1, 3, 6], [1, 2, 6, 3]]
    assert batch.hyperedge_attr.shape == (4, 3)
    assert batch.batch.tolist() == [0, 0, 0, 1, 1, 1, 1]
    # A plain Data would shift hyperedge ids by the node count: the subclass is what makes this right.
    plain = Batch.from_data_list([Data(**g1.to_dict()), Data(**g2.to_dict())])
    assert plain.hyperedge_index[1].tolist() != batch.hyperedge_index[1].tolist()


def test_batching_built_graphs(small):
    _, _, raw, norm = small
    g = build_graphs(raw, norm, np.array([2, 3]))
    batch = Batch.from_data_list(g)
    n0, m0 = g[0].num_nodes, g[0].hyperedge_attr.size(0)
    hi = batch.hyperedge_index
    k = g[0].hyperedge_index.size(1)
    assert torch.equal(hi[:, :k], g[0].hyperedge_index)
    assert torch.equal(hi[:, k:], g[1].hyperedge_index + torch.tensor([[n0], [m0]]))
    assert int(hi[1].max()) == batch.hyperedge_attr.size(0) - 1
    assert torch.equal(batch.edge_index[:, g[0].edge_index.size(1):], g[1].edge_index + n0)


# ---------------------------------------------------------------------------------------------------------
# Normalisation


def test_normaliser_is_fitted_on_the_training_split_only():
    from hvae_ray.engine import prepare

    # The wide-η jets make the full-sample statistics differ from any one split's.
    narrow, wide = random_sample(30, 4), random_sample(30, 5, eta_scale=2.0)
    parts = np.concatenate([narrow.particles, wide.particles])
    sample = from_padded(parts, np.concatenate([narrow.mask, wide.mask]), source="<test>")
    cfg = Config().with_overrides({"data.val_fraction": 0.3, "data.test_fraction": 0.3})
    splits = prepare(cfg, sample)
    on_train = FeatureNormaliser.fit(raw_features(sample.subset(splits.train), cfg.data.knn))
    on_all = FeatureNormaliser.fit(raw_features(sample, cfg.data.knn))
    for kind in FeatureNormaliser.KINDS:
        for stat in ("mean", "std"):
            np.testing.assert_allclose(splits.normaliser.stats[kind][stat], on_train.stats[kind][stat],
                                       rtol=1e-6, atol=1e-9)
    assert not np.allclose(splits.normaliser.stats["nodes"]["std"], on_all.stats["nodes"]["std"], rtol=1e-3)
    # The normalised training nodes are standardised; validation ones need not be.
    x = torch.cat([g.x for g in splits.train_graphs]).double()
    np.testing.assert_allclose(x.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(0, unbiased=False).numpy(), 1, atol=1e-4)


def test_normaliser_ignores_padding(small):
    _, sample, raw, norm = small
    nodes = node_features(torch.from_numpy(sample.particles))[torch.from_numpy(sample.mask)].double()
    np.testing.assert_allclose(norm.stats["nodes"]["mean"], nodes.mean(0).numpy(), rtol=1e-6)


def test_transform_inverse_round_trip(small):
    _, _, raw, norm = small
    for kind, x in (("nodes", raw.nodes), ("edges", raw.edges), ("hyperedges", raw.hyperedges)):
        assert torch.allclose(norm.inverse(kind, norm.transform(kind, x)), x, atol=1e-4)


def test_inverse_particles_recovers_physical_features():
    sample = random_sample(10, 6)
    parts, mask = torch.from_numpy(sample.particles), torch.from_numpy(sample.mask)
    norm = FeatureNormaliser.fit(raw_features(sample, knn=3))
    back = norm.inverse_particles(norm.transform("nodes", node_features(parts)))
    np.testing.assert_allclose(back[mask].numpy(), parts[mask].numpy(), atol=1e-5)


def test_inverse_particles_wraps_phi():
    norm = FeatureNormaliser({"nodes": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
                              "edges": {"mean": [0.0] * 4, "std": [1.0] * 4},
                              "hyperedges": {"mean": [0.0] * 3, "std": [1.0] * 3}})
    out = norm.inverse_particles(torch.tensor([[0.5, 3.5, math.log(0.2)]]))
    assert out[0, 0].item() == pytest.approx(0.5)
    assert out[0, 1].item() == pytest.approx(3.5 - 2 * math.pi, abs=1e-6)
    assert out[0, 2].item() == pytest.approx(0.2, rel=1e-6)


def test_state_dict_round_trip(small, tmp_path):
    _, _, raw, norm = small
    path = tmp_path / "norm.pt"
    torch.save(norm.state_dict(), path)
    restored = FeatureNormaliser.from_state_dict(torch.load(path, weights_only=True))
    assert restored.stats == norm.stats
    for kind, x in (("nodes", raw.nodes), ("edges", raw.edges), ("hyperedges", raw.hyperedges)):
        assert torch.equal(restored.transform(kind, x), norm.transform(kind, x))


def test_single_particle_sample_has_unit_std():
    parts = np.zeros((1, MAX_PARTICLES, 3), dtype=np.float32)
    parts[0, 0] = A
    norm = FeatureNormaliser.fit(raw_features(from_padded(parts, source="<test>"), knn=3))
    assert norm.stats["nodes"]["std"] == [1.0, 1.0, 1.0]
    assert norm.stats["nodes"]["mean"] == pytest.approx([0.1, 0.2, math.log(0.3)], abs=1e-6)
    assert torch.allclose(norm.inverse_particles(norm.transform("nodes", node_features(torch.tensor([A])))),
                          torch.tensor([A]), atol=1e-6)
