"""Dense device batches: the same features, kNN groups and normalisation as the per-jet PyG hypergraphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from hvae_ray.data.dense import DenseFeaturizer, FeatureNormaliser, device_jets, group_members, raw_features
from hvae_ray.data.graphs import build_graphs, dense_from_pyg
from hvae_ray.data.jets import MAX_PARTICLES, from_padded

KNN = 3
COUNTS = [1, 2, 3, 4, 7, 19, 30, 30]  # single particle, groups shorter than k+1, full jets


def sample_with_counts(counts, seed: int = 0, eta_scale: float = 0.2):
    rng = np.random.default_rng(seed)
    particles = np.zeros((len(counts), MAX_PARTICLES, 3), dtype=np.float32)
    mask = np.zeros((len(counts), MAX_PARTICLES), dtype=bool)
    for i, n in enumerate(counts):
        particles[i, :n, 0] = rng.normal(0, eta_scale, n)
        particles[i, :n, 1] = rng.normal(0, 0.2, n)
        particles[i, :n, 1][: n // 3] += np.pi - 0.05  # some particles across the φ = ±π seam
        particles[i, :n, 2] = np.sort(rng.dirichlet(np.ones(n)))[::-1]
        mask[i, :n] = True
    return from_padded(particles, mask, source="<test>")


@pytest.fixture(scope="module")
def jets():
    sample = sample_with_counts(COUNTS)
    raw = raw_features(sample, KNN)
    normaliser = FeatureNormaliser.fit(raw)
    graphs = build_graphs(raw, normaliser)
    parts, mask = device_jets(sample, None, "cpu")
    dense = DenseFeaturizer(normaliser, KNN, "cpu")(parts, mask)
    return sample, normaliser, graphs, dense


def test_dense_batch_equals_each_jets_hypergraph(jets):
    _, _, graphs, d = jets
    for i, g in enumerate(graphs):
        n = COUNTS[i]
        assert d.mask[i].sum() == n and d.mask[i, :n].all()
        torch.testing.assert_close(d.x[i, :n], g.x, rtol=1e-5, atol=1e-5)
        src, dst = g.edge_index
        torch.testing.assert_close(d.edges[i, src, dst], g.edge_attr, rtol=1e-5, atol=1e-5)
        pairs = torch.zeros(MAX_PARTICLES, MAX_PARTICLES, dtype=torch.bool)
        pairs[src, dst] = True
        assert torch.equal(d.pair_mask[i], pairs)  # exactly the graph's edges, no self-loops, no padding
        torch.testing.assert_close(d.hyperedges[i, :n], g.hyperedge_attr, rtol=1e-5, atol=1e-5)
        members = torch.zeros(MAX_PARTICLES, MAX_PARTICLES, dtype=torch.bool)
        members[g.hyperedge_index[0], g.hyperedge_index[1]] = True
        assert torch.equal(d.incidence[i], members)  # each member once, no group for padding
        assert int(d.incidence[i].sum()) == g.hyperedge_index.shape[1]


def test_groups_of_short_jets(jets):
    d = jets[3]
    assert d.incidence[0].sum() == 1 and d.incidence[0, 0, 0]  # one particle: its own group
    assert d.incidence[1].sum() == 4  # two particles: each group holds both
    assert (d.incidence[6].sum(dim=0) == KNN + 1).all()  # 30 particles: full groups


def test_group_members_marks_first_occurrences():
    groups = torch.tensor([[[0, 1, 2, 3], [1, 0, 1, 1], [2, 2, 2, 2]]])
    expected = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]]], dtype=torch.bool)
    assert torch.equal(group_members(groups), expected)


def test_padding_jets_have_no_particles_and_no_weight(jets):
    sample, normaliser, _, full = jets
    parts, mask = device_jets(sample, None, "cpu")
    weight = torch.tensor([1.0, 0.0] * (len(COUNTS) // 2))
    d = DenseFeaturizer(normaliser, KNN, "cpu")(parts, mask, weight)
    off = weight == 0
    assert not d.mask[off].any() and not d.pair_mask[off].any() and not d.incidence[off].any()
    assert torch.equal(d.weight, weight)
    torch.testing.assert_close(d.x[~off], full.x[~off])
    torch.testing.assert_close(d.edges[~off], full.edges[~off])


def test_dense_from_pyg_matches_the_featurizer_on_real_entries(jets):
    _, _, graphs, d = jets
    p = dense_from_pyg(Batch.from_data_list(graphs))
    for name in ("mask", "pair_mask", "incidence"):
        assert torch.equal(getattr(p, name), getattr(d, name)), name
    torch.testing.assert_close(p.x[d.mask], d.x[d.mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.edges[d.pair_mask], d.edges[d.pair_mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.hyperedges[d.mask], d.hyperedges[d.mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 4096])
def test_streamed_normaliser_equals_the_fit_on_raw_features(chunk):
    sample = sample_with_counts(list(range(1, 31)) * 2, seed=4, eta_scale=1.0)
    reference = FeatureNormaliser.fit(raw_features(sample, KNN))
    parts, mask = device_jets(sample, None, "cpu")
    streamed = FeatureNormaliser.fit_jets(parts, mask, KNN, chunk=chunk)
    for kind in FeatureNormaliser.KINDS:
        for stat in ("mean", "std"):
            np.testing.assert_allclose(streamed.stats[kind][stat], reference.stats[kind][stat], rtol=1e-6, atol=1e-9)


def test_streamed_normaliser_of_single_particle_jets_is_the_identity_for_edges():
    sample = sample_with_counts([1, 1, 1])
    parts, mask = device_jets(sample, None, "cpu")
    norm = FeatureNormaliser.fit_jets(parts, mask, KNN)
    assert norm.stats["edges"] == {"mean": [0.0] * 4, "std": [1.0] * 4}
    reference = FeatureNormaliser.fit(raw_features(sample, KNN))
    assert reference.stats["edges"] == norm.stats["edges"]
    np.testing.assert_allclose(norm.stats["nodes"]["std"], reference.stats["nodes"]["std"], rtol=1e-9)


def test_device_jets_selects_the_index(jets):
    sample = jets[0]
    parts, mask = device_jets(sample, np.array([2, 0]), "cpu")
    assert parts.dtype == torch.float32 and mask.dtype == torch.bool
    np.testing.assert_array_equal(parts.numpy(), sample.particles[[2, 0]])
    np.testing.assert_array_equal(mask.numpy(), sample.mask[[2, 0]])
