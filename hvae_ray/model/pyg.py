"""The HyperVAE encoder with PyG's sparse message passing: the reference of the dense layers.

Same parameters (names and shapes) as :mod:`hvae_ray.model.layers`, so a state dict moves between
:class:`PygHyperVAE` and :class:`~hvae_ray.model.hypervae.HyperVAE`. The tests hold the dense layers to
these on the same jets; the ``engine: pyg`` setting trains this model on PyG batches of hypergraphs.
Importing this module imports ``torch_geometric``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import HypergraphConv, MessagePassing
from torch_geometric.utils import scatter

from hvae_ray.config import ModelConfig
from hvae_ray.data.jets import MAX_PARTICLES
from hvae_ray.model.hypervae import Encoder, HyperVAE
from hvae_ray.model.layers import mlp


class PairConv(MessagePassing):
    """h_i' = mean_j MLP([h_i, h_j, e_ij]): messages conditioned on the pairwise features e_ij."""

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__(aggr="mean")
        self.msg = mlp([3 * hidden, hidden, hidden], dropout)

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.propagate(edge_index, h=h, e=e)  # (N, H)

    def message(self, h_i: torch.Tensor, h_j: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.msg(torch.cat([h_i, h_j, e], dim=-1))  # (E, H)


class EncoderBlock(nn.Module):
    """Residual edge message passing, then residual hypergraph attention over the kNN groups
    (HypergraphConv of Bai et al., arXiv:1901.08150, with the embedded hyperedge features)."""

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.pair = PairConv(hidden, dropout)
        self.hyper = HypergraphConv(hidden, hidden, use_attention=True, heads=1, dropout=dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, h, edge_index, e, hyperedge_index, he) -> torch.Tensor:
        h = self.norm1(h + self.pair(h, edge_index, e))  # (N, H)
        h = self.norm2(h + self.hyper(h, hyperedge_index, hyperedge_attr=he, num_edges=he.size(0)))
        return h


class PygEncoder(Encoder):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(EncoderBlock(cfg.hidden_dim, cfg.dropout) for _ in range(cfg.num_layers))

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.node_in(batch.x)  # (N, H)
        e = self.edge_in(batch.edge_attr)  # (E, H)
        he = self.hyper_in(batch.hyperedge_attr)  # (M, H)
        for block in self.blocks:
            h = block(h, batch.edge_index, e, batch.hyperedge_index, he)
        pooled = torch.cat([scatter(h, batch.batch, dim=0, reduce="mean"),
                            scatter(h, batch.batch, dim=0, reduce="max")], dim=-1)  # (B, 2H)
        mu, logvar = self.head(pooled).chunk(2, dim=-1)  # (B, Z) each
        return mu, logvar.clamp(-12.0, 8.0)


class PygHyperVAE(HyperVAE):
    """:class:`HyperVAE` whose encoder runs PyG message passing on a PyG batch of hypergraphs."""

    def __init__(self, cfg: ModelConfig, num_slots: int = MAX_PARTICLES):
        super().__init__(cfg, num_slots)
        self.encoder = PygEncoder(cfg)

    def encode(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(batch)
