"""Message-passing blocks of the encoder as masked dense tensor ops over padded jets.

A jet of at most P = 30 particles is fully connected (P(P−1) ordered pairs) and has one kNN group per
particle, so a batch is a few (B, P, P) matrices: message passing over them is batched matrix algebra
with static shapes instead of gather/scatter over a sparse batch, which on a GPU is bound by kernel
launches and collation. Each layer computes exactly what its PyG counterpart in
:mod:`hvae_ray.model.pyg` computes on the same jets, with the same parameter names (the tests hold
them equal), so a checkpoint loads in either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def _glorot(t: torch.Tensor) -> None:
    """Glorot-uniform on the last two dimensions (the initialisation of PyG's HypergraphConv)."""
    a = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
    with torch.no_grad():
        t.uniform_(-a, a)


class PairConv(nn.Module):
    """h_i' = mean_{j ≠ i, real} MLP([h_i, h_j, e_ji]): messages conditioned on the pairwise features.

    The first linear layer is applied by parts, W·[h_i, h_j, e] = W_i h_i + W_j h_j + W_e e, so the
    (B, P, P, 3H) concatenation is never built; and since the last layer is affine, it is applied to
    the mean of the hidden messages, (B, P, H), rather than to every message, (B, P, P, H).
    """

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.msg = mlp([3 * hidden, hidden, hidden], dropout)

    def edge_weight(self) -> torch.Tensor:
        """W_e (H, H): the part of the first layer that multiplies the edge features."""
        h = self.msg[0].weight.shape[0]
        return self.msg[0].weight[:, 2 * h :]

    def forward(self, h: torch.Tensor, e: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """h (B, P, H), e (B, P, P, H) with edge j→i at [j, i], pair_mask (B, P, P) → (B, P, H)."""
        return self.forward_projected(h, F.linear(e, self.edge_weight()), pair_mask)

    def forward_projected(self, h: torch.Tensor, e_proj: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """As :meth:`forward` with W_e·e already applied: e_proj (B, P, P, H), edge j→i at [j, i]."""
        first, last = self.msg[0], self.msg[-1]
        w_i, w_j, _ = first.weight.split(h.shape[-1], dim=1)  # (H, H) each
        target = F.linear(h, w_i, first.bias)  # (B, P, H), node i receives
        source = F.linear(h, w_j)  # (B, P, H), node j sends
        hidden = target[:, :, None] + source[:, None, :] + e_proj.transpose(1, 2)  # (B, i, j, H)
        for layer in self.msg[1:-1]:  # SiLU (and dropout)
            hidden = layer(hidden)
        m = pair_mask.transpose(1, 2).to(hidden.dtype)  # (B, i, j): j → i is an edge
        count = m.sum(dim=2, keepdim=True)  # (B, P, 1)
        mean = torch.einsum("bijh,bij->bih", hidden, m) / count.clamp(min=1)  # (B, P, H)
        return F.linear(mean, last.weight) + last.bias * (count > 0).to(mean.dtype)  # no message → 0


class HypergraphConv(nn.Module):
    """Hypergraph convolution with attention (Bai et al., arXiv:1901.08150) over dense incidences.

    With Θ = ``lin``, α_nm = softmax over the members n of group m of LeakyReLU(a·[Θh_n, Θhe_m]),
    h_n' = D_n⁻¹ Σ_m α_nm B_m⁻¹ Σ_k α_km Θh_k + bias, where D_n counts the groups of n and B_m the
    members of m: PyG's ``HypergraphConv(use_attention=True, heads=1, attention_mode='node')``.
    The score a·[x, y] = a_x·x + a_y·y separates, so the attention logits of all (n, m) are one
    (B, P, P) sum of a node and a group score; both propagations are batched matrix products.
    """

    def __init__(self, hidden: int, dropout: float = 0.0, negative_slope: float = 0.2):
        super().__init__()
        self.dropout = dropout
        self.negative_slope = negative_slope
        self.lin = nn.Linear(hidden, hidden, bias=False)
        self.att = nn.Parameter(torch.empty(1, 1, 2 * hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        _glorot(self.lin.weight)
        _glorot(self.att)

    def forward(self, h: torch.Tensor, he: torch.Tensor, incidence: torch.Tensor) -> torch.Tensor:
        """h (B, P, H) nodes, he (B, P, H) groups, incidence (B, P, P) bool [node n, group m] → (B, P, H)."""
        x = self.lin(h)  # (B, N, H)
        xe = self.lin(he)  # (B, M, H)
        a_x, a_e = self.att.view(2, -1)
        logits = (x @ a_x.to(x.dtype))[:, :, None] + (xe @ a_e.to(xe.dtype))[:, None, :]  # (B, N, M)
        logits = F.leaky_relu(logits.float(), self.negative_slope)
        logits = logits.masked_fill(~incidence, torch.finfo(logits.dtype).min)
        alpha = torch.softmax(logits, dim=1) * incidence  # over the members of each group; 0 off it
        alpha = F.dropout(alpha, p=self.dropout, training=self.training)
        inc = incidence.to(alpha.dtype)
        deg_node, deg_group = inc.sum(dim=2), inc.sum(dim=1)  # (B, N), (B, M)
        inv_node = torch.where(deg_node > 0, 1.0 / deg_node.clamp(min=1), 0.0)
        inv_group = torch.where(deg_group > 0, 1.0 / deg_group.clamp(min=1), 0.0)
        alpha = alpha.to(x.dtype)
        groups = inv_group[..., None].to(x.dtype) * (alpha.transpose(1, 2) @ x)  # (B, M, H)
        return inv_node[..., None].to(x.dtype) * (alpha @ groups) + self.bias  # (B, N, H)


class EncoderBlock(nn.Module):
    """Residual edge message passing, then residual hypergraph attention over the kNN groups.

    HypergraphConv with attention uses the embedded hyperedge features to weight each member's
    contribution to its group.
    """

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.pair = PairConv(hidden, dropout)
        self.hyper = HypergraphConv(hidden, dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, h: torch.Tensor, e: torch.Tensor, pair_mask: torch.Tensor, he: torch.Tensor,
                incidence: torch.Tensor, projected: bool = False) -> torch.Tensor:
        """h (B, P, H), e (B, P, P, H) (already multiplied by ``pair.edge_weight()`` when ``projected``),
        pair_mask (B, P, P), he (B, P, H), incidence (B, P, P) → (B, P, H)."""
        pair = self.pair.forward_projected(h, e, pair_mask) if projected else self.pair(h, e, pair_mask)
        h = self.norm1(h + pair)  # (B, P, H)
        return self.norm2(h + self.hyper(h, he, incidence))
