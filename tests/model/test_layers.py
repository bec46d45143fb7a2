"""The dense encoder layers and model against their PyG counterparts with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Batch
from torch_geometric.nn import HypergraphConv as PygHypergraphConv
from torch_geometric.utils import to_dense_batch

from hvae_ray.config import COMPONENTS, PARTICLE_LOSSES, Config, ModelConfig
from hvae_ray.data.dense import FeatureNormaliser, raw_features
from hvae_ray.data.graphs import build_graphs, dense_from_pyg
from hvae_ray.data.jets import MAX_PARTICLES, from_padded
from hvae_ray.model.hypervae import HyperVAE, dense_targets
from hvae_ray.model.layers import EncoderBlock, HypergraphConv, PairConv
from hvae_ray.model.losses import (
    dense_reconstruction_terms,
    kl_divergence,
    reconstruction_terms,
    total_loss,
)
from hvae_ray.model.pyg import EncoderBlock as PygEncoderBlock
from hvae_ray.model.pyg import PairConv as PygPairConv
from hvae_ray.model.pyg import PygHyperVAE

H = 16
COUNTS = [1, 2, 5, 30, 13, 4, 30, 9]
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def fitted():
    """The raw features of random padded jets of the multiplicities above and their normaliser."""
    rng = np.random.default_rng(3)
    particles = np.zeros((len(COUNTS), MAX_PARTICLES, 3), dtype=np.float32)
    for i, n in enumerate(COUNTS):
        particles[i, :n, :2] = rng.normal(0, 0.3, (n, 2))
        particles[i, :n, 2] = np.sort(rng.dirichlet(np.ones(n)))[::-1]
    raw = raw_features(from_padded(particles, source="<test>"), knn=3)
    return raw, FeatureNormaliser.fit(raw)


@pytest.fixture(scope="module")
def batch(fitted):
    """A PyG batch of the jets."""
    raw, normaliser = fitted
    return Batch.from_data_list(build_graphs(raw, normaliser))


@pytest.fixture(scope="module")
def node_stats(fitted):
    """(mean, std) of the node normaliser, as the trainer passes them to the reconstruction terms."""
    return tuple(torch.tensor(fitted[1].stats["nodes"][k], dtype=torch.float32) for k in ("mean", "std"))


def dense_edges(batch, values: torch.Tensor) -> torch.Tensor:
    """Per-edge values (E, F) → (B, P, P, F) with edge src→dst at [src, dst] (local slots)."""
    local = torch.arange(batch.num_nodes) - batch.ptr[batch.batch]
    src, dst = batch.edge_index
    out = torch.zeros(batch.num_graphs, MAX_PARTICLES, MAX_PARTICLES, values.shape[-1])
    out[batch.batch[src], local[src], local[dst]] = values
    return out


def dense_nodes(batch, values: torch.Tensor) -> torch.Tensor:
    return to_dense_batch(values, batch.batch, max_num_nodes=MAX_PARTICLES, batch_size=batch.num_graphs)[0]


def test_pair_conv_equals_pyg(batch):
    torch.manual_seed(0)
    ref = PygPairConv(H)
    dense = PairConv(H)
    dense.load_state_dict(ref.state_dict())
    h, e = torch.randn(batch.num_nodes, H), torch.randn(batch.num_edges, H)
    expected = ref(h, batch.edge_index, e)
    d = dense_from_pyg(batch)
    got = dense(dense_nodes(batch, h), dense_edges(batch, e), d.pair_mask)
    torch.testing.assert_close(got[d.mask], expected, **TOL)
    assert expected[batch.ptr[0]].abs().max() == 0  # the one-particle jet receives no message: 0, as in PyG
    assert got[~d.mask].abs().max() == 0  # padding receives nothing either


def test_pair_conv_uses_the_directed_edge_features(batch):
    """With asymmetric e the message j → i must use e of edge (j, i), as PyG's does."""
    torch.manual_seed(1)
    ref, dense = PygPairConv(H), PairConv(H)
    dense.load_state_dict(ref.state_dict())
    h = torch.randn(batch.num_nodes, H)
    e = torch.randn(batch.num_edges, H)  # independent per direction
    d = dense_from_pyg(batch)
    got = dense(dense_nodes(batch, h), dense_edges(batch, e), d.pair_mask)
    torch.testing.assert_close(got[d.mask], ref(h, batch.edge_index, e), **TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_hypergraph_conv_equals_pyg_with_attention_and_hyperedge_attr(batch, seed):
    torch.manual_seed(seed)
    ref = PygHypergraphConv(H, H, use_attention=True, heads=1)
    dense = HypergraphConv(H)
    assert set(dense.state_dict()) == set(ref.state_dict())
    dense.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ref.bias.normal_()  # not zero, to check it is added once
        dense.bias.copy_(ref.bias)
    h, he = torch.randn(batch.num_nodes, H), torch.randn(batch.hyperedge_attr.shape[0], H)
    expected = ref(h, batch.hyperedge_index, hyperedge_attr=he, num_edges=he.shape[0])
    d = dense_from_pyg(batch)
    got = dense(dense_nodes(batch, h), dense_nodes(batch, he), d.incidence)
    torch.testing.assert_close(got[d.mask], expected, **TOL)


def test_encoder_block_equals_pyg_and_has_its_parameter_names(batch):
    torch.manual_seed(2)
    ref, dense = PygEncoderBlock(H), EncoderBlock(H)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in dense.state_dict().items()}
    dense.load_state_dict(ref.state_dict())
    h, e = torch.randn(batch.num_nodes, H), torch.randn(batch.num_edges, H)
    he = torch.randn(batch.hyperedge_attr.shape[0], H)
    expected = ref(h, batch.edge_index, e, batch.hyperedge_index, he)
    d = dense_from_pyg(batch)
    got = dense(dense_nodes(batch, h), dense_edges(batch, e), d.pair_mask, dense_nodes(batch, he), d.incidence)
    torch.testing.assert_close(got[d.mask], expected, **TOL)


def models(dropout: float = 0.0):
    cfg = ModelConfig(hidden_dim=H, latent_dim=4, num_layers=2, decoder_layers=1, dropout=dropout)
    torch.manual_seed(5)
    ref = PygHyperVAE(cfg)
    dense = HyperVAE(cfg)
    dense.load_state_dict(ref.state_dict())  # a checkpoint of one loads in the other
    return ref.eval(), dense.eval()


def test_dense_forward_equals_the_pyg_model(batch):
    ref, dense = models()
    with torch.no_grad():
        a, b = ref(batch), dense(dense_from_pyg(batch))
    torch.testing.assert_close(b.mu, a.mu, **TOL)
    torch.testing.assert_close(b.logvar, a.logvar, **TOL)
    for name in ("particles", "exist_logits", "edges", "hyperedges"):
        torch.testing.assert_close(getattr(b.decoded, name), getattr(a.decoded, name), **TOL)


@pytest.mark.parametrize("particle_loss", PARTICLE_LOSSES)
def test_dense_loss_and_gradients_equal_the_pyg_model(batch, node_stats, particle_loss):
    ref, dense = models()
    cfg = Config().with_overrides({"loss_weights.jet_features": 0.5, "particle_loss": particle_loss})
    out_a = ref(batch)
    terms_a = reconstruction_terms(out_a.decoded, dense_targets(batch), node_stats, particle_loss)
    loss_a = total_loss(terms_a, kl_divergence(out_a.mu, out_a.logvar), 1e-3, cfg)
    d = dense_from_pyg(batch)
    out_b = dense(d)
    terms_b = dense_reconstruction_terms(out_b.decoded, d, node_stats, particle_loss)
    loss_b = total_loss(terms_b, kl_divergence(out_b.mu, out_b.logvar, weight=d.weight), 1e-3, cfg)
    assert set(terms_a) == set(terms_b) == set(COMPONENTS)
    for k in terms_a:
        torch.testing.assert_close(terms_b[k], terms_a[k], **TOL)
    loss_a.backward()
    loss_b.backward()
    grads_a = dict(ref.named_parameters())
    for name, p in dense.named_parameters():
        torch.testing.assert_close(p.grad, grads_a[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("particle_loss", PARTICLE_LOSSES)
def test_padding_jets_change_nothing(batch, node_stats, particle_loss):
    """A fixed-size batch padded with empty jets of weight 0 gives the loss of the real jets."""
    _, dense = models()
    d = dense_from_pyg(batch)
    cfg = Config().with_overrides({"loss_weights.jet_features": 0.5, "particle_loss": particle_loss})

    def loss(db):
        out = dense(db)
        return total_loss(dense_reconstruction_terms(out.decoded, db, node_stats, particle_loss),
                          kl_divergence(out.mu, out.logvar, weight=db.weight), 1e-3, cfg)

    pad = 3
    padded = type(d)(*(torch.cat([t, torch.zeros((pad, *t.shape[1:]), dtype=t.dtype)])
                       for t in (d.x, d.mask, d.edges, d.pair_mask, d.hyperedges, d.incidence, d.weight)))
    with torch.no_grad():
        torch.testing.assert_close(loss(padded), loss(d), **TOL)


def test_decoder_pair_head_by_parts_equals_the_concatenated_form():
    _, dense = models()
    z = torch.randn(3, 4)
    with torch.no_grad():
        s = dense.decoder.mixer(dense.decoder.z_in(z)[:, None, :] + dense.decoder.slots[None])
        pair = torch.cat([s[:, :, None] + s[:, None, :], s[:, :, None] * s[:, None, :]], dim=-1)  # (B, P, P, 2H)
        torch.testing.assert_close(dense.decode(z).edges, dense.decoder.edge_out(pair), **TOL)


def test_folded_edge_embedding_equals_embedding_then_block(batch):
    """The encoder applies edge_in's last layer and each block's W_e as one product."""
    _, dense = models()
    d = dense_from_pyg(batch)
    enc = dense.encoder
    with torch.no_grad():
        h, he, e = enc.node_in(d.x), enc.hyper_in(d.hyperedges), enc.edge_in(d.edges)
        for block in enc.blocks:
            h = block(h, e, d.pair_mask, he, d.incidence)
        m = d.mask[..., None]
        pooled = torch.cat([(h * m).sum(1) / m.sum(1).clamp(min=1),
                            h.masked_fill(~m, -torch.inf).amax(1)], dim=-1)
        mu, _ = enc.head(pooled).chunk(2, dim=-1)
        torch.testing.assert_close(enc(d)[0], mu, **TOL)
