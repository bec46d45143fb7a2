"""HyperVAE forward pass: output shapes, symmetric edges, dense targets aligned with the graphs, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch

from hvae_ray.config import COMPONENTS, Config, ModelConfig
from hvae_ray.data.graphs import FeatureNormaliser, build_graphs, raw_features
from hvae_ray.data.jets import MAX_PARTICLES, from_padded
from hvae_ray.model.hypervae import Decoded, HyperVAE, dense_targets
from hvae_ray.model.losses import kl_divergence, reconstruction_terms, total_loss

COUNTS = [3, 30, 1, 7]  # particles per jet: short, full, single, medium
B = len(COUNTS)
Z = 4


@pytest.fixture(scope="module")
def fitted():
    """The raw features of the test jets and the normaliser fitted on them."""
    rng = np.random.default_rng(0)
    particles = np.zeros((B, MAX_PARTICLES, 3), dtype=np.float32)
    for i, n in enumerate(COUNTS):
        particles[i, :n, :2] = rng.normal(0, 0.2, (n, 2))
        particles[i, :n, 2] = np.sort(rng.dirichlet(np.ones(n)))[::-1]
    raw = raw_features(from_padded(particles, source="<test>"), knn=3)
    return raw, FeatureNormaliser.fit(raw)


@pytest.fixture(scope="module")
def graphs(fitted):
    raw, normaliser = fitted
    return build_graphs(raw, normaliser)


@pytest.fixture(scope="module")
def node_stats(fitted):
    """(mean, std) of the node normaliser, as the trainer passes them to the reconstruction terms."""
    return tuple(torch.tensor(fitted[1].stats["nodes"][k], dtype=torch.float32) for k in ("mean", "std"))


@pytest.fixture()
def batch(graphs):
    return Batch.from_data_list(graphs)


def make_model(dropout: float = 0.0, seed: int = 0) -> HyperVAE:
    torch.manual_seed(seed)
    return HyperVAE(ModelConfig(hidden_dim=16, latent_dim=Z, num_layers=2, decoder_layers=1, dropout=dropout))


def test_forward_shapes(batch):
    out = make_model()(batch)
    dec = out.decoded
    assert dec.particles.shape == (B, 30, 3)
    assert dec.exist_logits.shape == (B, 30)
    assert dec.edges.shape == (B, 30, 30, 4)
    assert dec.hyperedges.shape == (B, 30, 3)
    assert out.mu.shape == (B, Z) and out.logvar.shape == (B, Z)
    for t in (dec.particles, dec.exist_logits, dec.edges, dec.hyperedges, out.mu, out.logvar):
        assert torch.isfinite(t).all()


def test_decode_from_the_prior_shapes():
    model = make_model().eval()
    dec = model.decode(torch.randn(5, Z))
    assert dec.particles.shape == (5, 30, 3) and dec.edges.shape == (5, 30, 30, 4)


def test_decoded_edges_are_symmetric(batch):
    edges = make_model()(batch).decoded.edges
    assert torch.allclose(edges, edges.transpose(1, 2), atol=1e-6)


def test_logvar_is_clamped(batch):
    model = make_model()
    with torch.no_grad():
        model.encoder.head[-1].bias[Z:] = 100.0   # push logvar far out
    out = model(batch)
    assert out.logvar.max().item() <= 8.0
    assert torch.isfinite(out.decoded.particles).all()


def test_dense_targets_align_with_graph_contents(graphs, batch):
    tgt = dense_targets(batch)
    assert tgt.particles.shape == (B, 30, 3)
    assert tgt.mask.sum(dim=1).tolist() == COUNTS
    for b, g in enumerate(graphs):
        n = g.num_nodes
        # Slot i of jet b holds node i of graph b; the rest is padding.
        assert torch.equal(tgt.particles[b, :n], g.x)
        assert tgt.mask[b, :n].all() and not tgt.mask[b, n:].any()
        assert (tgt.particles[b, n:] == 0).all()
        # Edge slots (jet, i, j) point to the pair the edge joins, with that pair's features.
        sel = tgt.edge_slots[0] == b
        assert torch.equal(tgt.edge_slots[1:, sel], g.edge_index)
        assert torch.equal(tgt.edges[sel], g.edge_attr)
        # Hyperedge slots (jet, centre) point to the group's centre particle.
        hsel = tgt.hyper_slots[0] == b
        assert tgt.hyper_slots[1, hsel].tolist() == list(range(n))
        assert torch.equal(tgt.hyperedges[hsel], g.hyperedge_attr)


def test_dense_targets_pair_the_decoder_outputs_with_the_right_slots(graphs, batch, node_stats):
    # Gathering a dense tensor built from the targets at the edge slots gives back the targets.
    tgt = dense_targets(batch)
    dense = torch.zeros(B, 30, 30, 4)
    b, i, j = tgt.edge_slots
    dense[b, i, j] = tgt.edges
    g = graphs[1]  # the full jet
    src, dst = g.edge_index[:, 17]
    assert torch.equal(dense[1, src, dst], g.edge_attr[17])
    # A perfect decoder has zero particle/edge/hyperedge error.
    hb, hc = tgt.hyper_slots
    hyper = torch.zeros(B, 30, 3)
    hyper[hb, hc] = tgt.hyperedges
    logits = torch.where(tgt.mask, 20.0, -20.0)
    perfect = Decoded(particles=tgt.particles, exist_logits=logits, edges=dense, hyperedges=hyper)
    terms = reconstruction_terms(perfect, tgt, node_stats)
    assert set(terms) == set(COMPONENTS)
    for c in ("particle_features", "edge_features", "hyperedge_features", "jet_features", "particle_marginals"):
        assert terms[c].item() == 0.0
    assert terms["topology"].item() < 1e-6
    # The set losses of a perfect decoder vanish too (Sinkhorn up to its entropic blur, ε = 0.02).
    assert reconstruction_terms(perfect, tgt, node_stats, "chamfer")["particle_features"].item() == 0.0
    assert reconstruction_terms(perfect, tgt, node_stats, "sinkhorn")["particle_features"].item() < 1e-3


def test_gradients_reach_encoder_and_decoder(batch, node_stats):
    model = make_model()
    out = model(batch)
    terms = reconstruction_terms(out.decoded, dense_targets(batch), node_stats)
    loss = total_loss(terms, kl_divergence(out.mu, out.logvar), 1e-4, Config())
    loss.backward()
    for part in (model.encoder, model.decoder):
        grads = [(name, p.grad) for name, p in part.named_parameters()]
        missing = [name for name, g in grads if g is None]
        assert not missing, missing
        assert all(torch.isfinite(g).all() for _, g in grads)
        nonzero = sum(bool(g.abs().sum() > 0) for _, g in grads)
        assert nonzero >= 0.9 * len(grads)
    # The first encoder layer and the decoder's slot embeddings both learn.
    assert model.encoder.node_in[0].weight.grad.abs().sum() > 0
    assert model.encoder.edge_in[0].weight.grad.abs().sum() > 0
    assert model.encoder.hyper_in[0].weight.grad.abs().sum() > 0
    assert model.decoder.slots.grad.abs().sum() > 0


def test_eval_mode_is_deterministic_and_uses_the_posterior_mean(batch):
    model = make_model(dropout=0.1).eval()
    with torch.no_grad():
        a, b = model(batch), model(batch)
        assert torch.equal(a.decoded.particles, b.decoded.particles)
        assert torch.equal(a.decoded.edges, b.decoded.edges)
        assert torch.equal(a.mu, b.mu)
        assert torch.equal(a.decoded.particles, model.decode(a.mu).particles)


def test_training_mode_samples_the_latent(batch):
    model = make_model(dropout=0.0).train()
    with torch.no_grad():
        a, b = model(batch), model(batch)
    assert torch.equal(a.mu, b.mu)                              # same posterior ...
    assert not torch.equal(a.decoded.particles, b.decoded.particles)   # ... different samples z


def test_same_seed_same_model():
    a, b = make_model(seed=3), make_model(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
