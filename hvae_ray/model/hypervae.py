"""HyperVAE: a variational autoencoder over jet hypergraphs.

Encoder: node, edge and hyperedge embeddings → ``num_layers`` × (edge message passing with the
pairwise features, hypergraph attention over kNN groups) → masked mean+max pooling → a graph-level
Gaussian q(z | jet) of ``latent_dim`` dimensions.

Decoder: z → ``P = 30`` particle slots (a learned embedding per slot plus a projection of z) →
self-attention over slots → per slot the particle features, an existence logit, the hyperedge
features of the group centred on that slot, and for each slot pair the edge features.

The encoder is masked dense tensor algebra over padded jets (:mod:`hvae_ray.model.layers`); a PyG batch
of hypergraphs is converted to the same dense form. :class:`hvae_ray.model.pyg.PygHyperVAE` is the
same model with PyG's sparse message passing, the reference the dense one is tested against; both
have the same parameter names, so a checkpoint of either loads in the other.

Particle order: slots are matched to particles by pT rank (slot i ↔ the i-th hardest particle, the
order JetNet and our files store). The edge, hyperedge and existence (topology) terms are direct
slot-wise comparisons: O(P) per jet, deterministic and cheap on a laptop CPU, where Hungarian set
matching costs O(P³) per jet on the CPU each step. The particle term is slot-wise too with
``particle_loss: slot``; ``chamfer`` and ``sinkhorn`` match the decoded particles to the true ones as
sets; the jet term compares each jet's mass and pT sum, and the marginal term the sorted particle
features of a whole batch, neither by slot (:mod:`hvae_ray.model.losses`). pT order is a physical,
nearly stable order for the leading particles; its price is ambiguity among soft particles of similar
pT, where slot-wise errors are small anyway.
Edges and hyperedges inherit the order: edge (i, j) ↔ slot pair (i, j), hyperedge m ↔ slot m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hvae_ray.config import ModelConfig
from hvae_ray.data.dense import EDGE_FEATURES, HYPEREDGE_FEATURES, DenseBatch
from hvae_ray.data.jets import MAX_PARTICLES, PARTICLE_FEATURES
from hvae_ray.model.layers import EncoderBlock, mlp


@dataclass
class Decoded:
    """Decoder output for B jets (normalised feature units).

    particles: (B, P, 3); exist_logits: (B, P); edges: (B, P, P, 4) or None when decoded without
    edges (sampling); hyperedges: (B, P, 3).
    """

    particles: torch.Tensor
    exist_logits: torch.Tensor
    edges: torch.Tensor | None
    hyperedges: torch.Tensor


@dataclass
class VAEOutput:
    decoded: Decoded
    mu: torch.Tensor  # (B, Z)
    logvar: torch.Tensor  # (B, Z)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_dim
        self.node_in = mlp([len(PARTICLE_FEATURES), h, h])
        self.edge_in = mlp([len(EDGE_FEATURES), h, h])
        self.hyper_in = mlp([len(HYPEREDGE_FEATURES), h, h])
        self.blocks = nn.ModuleList(EncoderBlock(h, cfg.dropout) for _ in range(cfg.num_layers))
        self.head = mlp([2 * h, h, 2 * cfg.latent_dim])

    def forward(self, batch: DenseBatch) -> tuple[torch.Tensor, torch.Tensor]:
        m = batch.mask[..., None]  # (B, P, 1)
        h = self.node_in(batch.x)  # (B, P, H)
        he = self.hyper_in(batch.hyperedges)  # (B, P, H)
        # The edge embedding ends in a linear layer and each block's first use of it is linear, so the two
        # are applied as one product, W_e·(W₂u + b₂) = (W_e W₂)u + W_e b₂: the (B, P, P, H) embedding itself
        # is never built, only its hidden layer u.
        lin2 = self.edge_in[-1]
        u = self.edge_in[:-1](batch.edges)  # (B, P, P, H)
        for block in self.blocks:
            w_e = block.pair.edge_weight()  # (H, H)
            e = F.linear(u, w_e @ lin2.weight, w_e @ lin2.bias)  # (B, P, P, H) = W_e · edge_in(edges)
            h = block(h, e, batch.pair_mask, he, batch.incidence, projected=True)
        count = m.sum(dim=1)  # (B, 1)
        mean = (h * m).sum(dim=1) / count.clamp(min=1)
        peak = h.masked_fill(~m, torch.finfo(h.dtype).min).amax(dim=1) * (count > 0)  # an empty jet pools to 0
        mu, logvar = self.head(torch.cat([mean, peak], dim=-1)).chunk(2, dim=-1)  # (B, Z) each
        return mu, logvar.clamp(-12.0, 8.0)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int = MAX_PARTICLES):
        super().__init__()
        h = cfg.hidden_dim
        self.z_in = mlp([cfg.latent_dim, h, h])
        self.slots = nn.Parameter(torch.randn(num_slots, h) * 0.1)
        layer = nn.TransformerEncoderLayer(h, nhead=4, dim_feedforward=2 * h, dropout=cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.mixer = nn.TransformerEncoder(layer, cfg.decoder_layers, enable_nested_tensor=False) \
            if cfg.decoder_layers > 0 else nn.Identity()
        self.particle_out = mlp([h, h, len(PARTICLE_FEATURES) + 1])
        self.hyper_out = mlp([h, h, len(HYPEREDGE_FEATURES)])
        self.edge_out = mlp([2 * h, h, len(EDGE_FEATURES)])

    def forward(self, z: torch.Tensor, with_edges: bool = True) -> Decoded:
        s = self.z_in(z)[:, None, :] + self.slots[None]  # (B, P, H)
        s = self.mixer(s)
        p = self.particle_out(s)  # (B, P, 4)
        edges = None
        if with_edges:  # the (B, P, P, H) pair activations are the largest; sampling jets does not need them
            edges = self._edges(s)  # (B, P, P, 4)
        return Decoded(particles=p[..., :3], exist_logits=p[..., 3], edges=edges, hyperedges=self.hyper_out(s))

    def _edges(self, s: torch.Tensor) -> torch.Tensor:
        """``edge_out`` of the symmetric pair representation [s_i + s_j, s_i ⊙ s_j] (edge features of (i, j)
        and (j, i) are equal), evaluated once per unordered pair i ≤ j and gathered into (B, P, P, 4).
        Its first layer is applied by parts, W·[s_i + s_j, s_i ⊙ s_j] = W_a s_i + W_a s_j + W_b (s_i ⊙ s_j),
        so the (B, P, P, 2H) concatenation is never built."""
        p = s.shape[1]
        rows, cols, index = _pair_triangle(p, s.device)
        first = self.edge_out[0]
        w_a, w_b = first.weight.split(s.shape[-1], dim=1)  # (H, H) each
        a = F.linear(s, w_a)  # (B, P, H)
        hidden = F.linear(s[:, rows] * s[:, cols], w_b, first.bias) + a[:, rows] + a[:, cols]  # (B, T, H)
        out = self.edge_out[1:](hidden)  # (B, T, 4), T = P(P+1)/2
        return out[:, index]  # (B, P, P, 4)


_TRIANGLES: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _pair_triangle(p: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols) of the P(P+1)/2 pairs i ≤ j, and (P, P) the position of pair (min, max) in them."""
    key = (p, str(device))
    if key not in _TRIANGLES:
        rows, cols = torch.triu_indices(p, p)
        index = torch.empty(p, p, dtype=torch.long)
        pos = torch.arange(rows.numel())
        index[rows, cols] = pos
        index[cols, rows] = pos
        _TRIANGLES[key] = (rows.to(device), cols.to(device), index.to(device))
    return _TRIANGLES[key]


class HyperVAE(nn.Module):
    """encode(batch) → (mu, logvar); decode(z) → Decoded; forward(batch) → VAEOutput (reparameterised).

    ``batch`` is a :class:`~hvae_ray.data.dense.DenseBatch`, or a PyG batch of hypergraphs (converted).
    """

    def __init__(self, cfg: ModelConfig, num_slots: int = MAX_PARTICLES):
        super().__init__()
        self.cfg = cfg
        self.num_slots = num_slots
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, num_slots)

    def encode(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, DenseBatch):
            from hvae_ray.data.graphs import dense_from_pyg

            batch = dense_from_pyg(batch, self.num_slots)
        return self.encoder(batch)

    def decode(self, z: torch.Tensor, with_edges: bool = True) -> Decoded:
        return self.decoder(z, with_edges)

    def forward(self, batch, eps: torch.Tensor | None = None) -> VAEOutput:
        """In training mode z = mu + ε·σ with ε (B, Z) given or drawn here; the posterior mean in eval mode."""
        mu, logvar = self.encode(batch)
        if self.training:
            eps = torch.randn_like(mu) if eps is None else eps
            z = mu + eps * torch.exp(0.5 * logvar)
        else:
            z = mu
        return VAEOutput(self.decode(z), mu, logvar)


@dataclass
class Targets:
    """Dense targets of a PyG batch, aligned with :class:`Decoded` (slot = node index within its jet).

    particles: (B, P, 3); mask: (B, P); edge_slots: (3, E) = (jet, i, j); edges: (E, 4);
    hyper_slots: (2, M) = (jet, centre slot); hyperedges: (M, 3).
    """

    particles: torch.Tensor
    mask: torch.Tensor
    edge_slots: torch.Tensor
    edges: torch.Tensor
    hyper_slots: torch.Tensor
    hyperedges: torch.Tensor


def dense_targets(batch, num_slots: int = MAX_PARTICLES) -> Targets:
    """Targets of a PyG batch of hypergraphs (the PyG engine's loss)."""
    from torch_geometric.utils import to_dense_batch

    x, mask = to_dense_batch(batch.x, batch.batch, max_num_nodes=num_slots, batch_size=batch.num_graphs)
    local = torch.arange(batch.num_nodes, device=batch.x.device) - batch.ptr[batch.batch]  # (N,)
    src, dst = batch.edge_index
    edge_slots = torch.stack([batch.batch[src], local[src], local[dst]])
    # Hyperedge m of a jet is centred on node m of that jet; its global id equals the centre's node id.
    centres = torch.arange(batch.hyperedge_attr.size(0), device=batch.x.device)
    hyper_slots = torch.stack([batch.batch[centres], local[centres]])
    return Targets(x, mask, edge_slots, batch.edge_attr, hyper_slots, batch.hyperedge_attr)

