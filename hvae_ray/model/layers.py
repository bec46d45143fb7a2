"""Message-passing blocks of the encoder: edge convolution with pairwise features, hypergraph convolution."""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import HypergraphConv, MessagePassing


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear → SiLU (→ Dropout) stack; no activation after the last layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


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
    """Residual edge message passing, then residual hypergraph attention over the kNN groups.

    HypergraphConv (Bai et al., arXiv:1901.08150) with attention uses the embedded hyperedge features to
    weight each member's contribution to its group.
    """

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
