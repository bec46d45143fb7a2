"""Jets → hypergraphs: nodes, fully connected edges with pairwise features, kNN hyperedges.

Nodes are the particles (slot i = i-th hardest). Edges join every ordered pair of particles and carry
the pairwise features of the Particle Transformer (Qu & Gouskos, arXiv:2202.03772):
ln Δ, ln kT, ln z, ln m². Hyperedges are higher-order groups: for each particle, the group made of it
and its ``k`` nearest neighbours in η–φ (a local "cluster" of the shower). A group carries
ln m²_group (its invariant mass squared), ln Σ_{a<b} z_a z_b Δ_ab (a two-point energy-weighted
correlator restricted to the group, cf. energy-weighted message passing on jets, arXiv:2309.17351)
and ln Σ_a z_a (the group's share of the jet pT). kNN groups cost O(n·k) rather than the O(n³) of all
triplets and follow the collinear structure that the shower produces.

All momenta are in units of the jet pT (pT_rel), so kT is in units of pT_jet and m² of pT_jet².
``hyperedge_index`` follows PyG's HypergraphConv convention: row 0 holds node indices, row 1 the
hyperedge each belongs to; hyperedge m of a jet is the group centred on particle m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch_geometric.data import Data

from hvae_ray.data.jets import JetSample

EDGE_FEATURES = ("ln_delta", "ln_kt", "ln_z", "ln_m2")
HYPEREDGE_FEATURES = ("ln_m2", "ln_eec", "ln_zsum")
LOG_EPS = 1e-8


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.clamp(min=0) + LOG_EPS)


def delta_phi(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """φ_a − φ_b wrapped into (−π, π]."""
    d = torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi
    return torch.where(d == -math.pi, torch.full_like(d, math.pi), d)


def pairwise_features(particles: torch.Tensor) -> torch.Tensor:
    """ln Δ, ln kT, ln z, ln m² for every ordered pair of (massless) particles.

    particles: (..., P, 3) = (η, φ, pT); returns (..., P, P, 4). For massless particles
    m² = 2 pT_a pT_b (cosh Δη − cos Δφ), equal to (E_a+E_b)² − |p_a+p_b|² without its cancellation.
    Logs are guarded by ε = 1e-8 (padding and the diagonal give ln ε).
    """
    eta, phi, pt = particles[..., 0], particles[..., 1], particles[..., 2]
    deta = eta[..., :, None] - eta[..., None, :]  # (..., P, P)
    dphi = delta_phi(phi[..., :, None], phi[..., None, :])
    delta = torch.sqrt(deta**2 + dphi**2)
    pt_a, pt_b = pt[..., :, None], pt[..., None, :]
    pt_min = torch.minimum(pt_a, pt_b)
    kt = pt_min * delta
    z = pt_min / (pt_a + pt_b).clamp(min=LOG_EPS)
    m2 = 2 * pt_a * pt_b * (torch.cosh(deta) - torch.cos(dphi))
    return torch.stack([_log(delta), _log(kt), _log(z), _log(m2)], dim=-1)


def knn_groups(particles: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each particle's group: itself then its k nearest real neighbours in η–φ.

    particles: (B, P, 3), mask: (B, P) → (B, P, k+1) long. Jets with fewer than k+1 particles repeat
    the particle itself in the missing places (so a group never includes padding).
    """
    deta = particles[..., :, None, 0] - particles[..., None, :, 0]
    dphi = delta_phi(particles[..., :, None, 1], particles[..., None, :, 1])
    dist = deta**2 + dphi**2  # (B, P, P)
    p = particles.shape[1]
    eye = torch.eye(p, dtype=torch.bool, device=particles.device)
    dist = dist.masked_fill(eye, -1.0)  # self first
    dist = dist.masked_fill(~mask[:, None, :], math.inf)
    kk = min(k + 1, p)
    d, idx = torch.topk(dist, kk, dim=-1, largest=False)  # (B, P, k+1)
    self_idx = torch.arange(p, device=particles.device).view(1, p, 1).expand_as(idx)
    return torch.where(torch.isinf(d), self_idx, idx)


def group_features(particles: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """ln m², ln Σ_{a<b} z_a z_b Δ_ab, ln Σ z_a of each group.

    particles: (B, P, 3) = (η, φ, pT_rel); groups: (B, P, G) indices from :func:`knn_groups`, where a
    repeated index stands for "no particle" and is counted once. Returns (B, P, 3).
    """
    b, p, g = groups.shape
    gathered = torch.gather(particles[:, None].expand(b, p, p, 3), 2, groups[..., None].expand(b, p, g, 3))
    # A repeated index (a short group) is counted once: weight duplicates by zero.
    first = torch.ones_like(groups, dtype=torch.bool)
    for j in range(1, g):
        first[..., j] = (groups[..., j, None] != groups[..., :j]).all(dim=-1)
    eta, phi = gathered[..., 0], gathered[..., 1]
    pt = gathered[..., 2] * first
    # Four-momentum sum of massless particles.
    px, py = (pt * torch.cos(phi)).sum(-1), (pt * torch.sin(phi)).sum(-1)
    pz, e = (pt * torch.sinh(eta)).sum(-1), (pt * torch.cosh(eta)).sum(-1)
    m2 = (e**2 - px**2 - py**2 - pz**2).clamp(min=0)
    deta = eta[..., :, None] - eta[..., None, :]
    dphi = delta_phi(phi[..., :, None], phi[..., None, :])
    delta = torch.sqrt(deta**2 + dphi**2)
    eec = 0.5 * (pt[..., :, None] * pt[..., None, :] * delta).sum(dim=(-1, -2))  # z = pT_rel here
    return torch.stack([_log(m2), _log(eec), _log(pt.sum(-1))], dim=-1)


class JetHypergraph(Data):
    """A jet as a PyG graph; batches hyperedge ids by the number of hyperedges, not nodes."""

    def __inc__(self, key, value, *args, **kwargs):
        if key == "hyperedge_index":
            return torch.tensor([[self.num_nodes], [self.hyperedge_attr.size(0)]])
        return super().__inc__(key, value, *args, **kwargs)


@lru_cache(maxsize=64)
def _complete_edges(n: int) -> torch.Tensor:
    """edge_index (2, n(n−1)) of the complete directed graph without self-loops."""
    src, dst = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = src != dst
    return torch.stack([src[keep], dst[keep]])


@dataclass
class RawFeatures:
    """Unnormalised features of a whole sample, padded.

    nodes: (N, P, 3) = (η_rel, φ_rel, ln pT_rel); edges: (N, P, P, 4); hyperedges: (N, P, 3);
    groups: (N, P, k+1) long; mask: (N, P) bool.
    """

    nodes: torch.Tensor
    edges: torch.Tensor
    hyperedges: torch.Tensor
    groups: torch.Tensor
    mask: torch.Tensor


def node_features(particles: torch.Tensor) -> torch.Tensor:
    """(η_rel, φ_rel, pT_rel) → (η_rel, φ_rel, ln pT_rel): pT_rel spans decades, its log is ~Gaussian."""
    return torch.cat([particles[..., :2], _log(particles[..., 2:3])], dim=-1)


def raw_features(sample: JetSample, knn: int, chunk: int = 2048) -> RawFeatures:
    """Compute all features of ``sample`` in vectorised chunks."""
    parts = torch.from_numpy(sample.particles)
    mask = torch.from_numpy(sample.mask)
    out: dict[str, list[torch.Tensor]] = {"edges": [], "hyperedges": [], "groups": []}
    for s in range(0, len(sample), chunk):
        p, m = parts[s : s + chunk], mask[s : s + chunk]
        groups = knn_groups(p, m, knn)
        out["edges"].append(pairwise_features(p))
        out["hyperedges"].append(group_features(p, groups))
        out["groups"].append(groups)
    return RawFeatures(node_features(parts), torch.cat(out["edges"]), torch.cat(out["hyperedges"]),
                       torch.cat(out["groups"]), mask)


class FeatureNormaliser:
    """Per-feature standardisation of node, edge and hyperedge features, fitted on real entries only.

    Invertible: ``inverse_particles`` maps normalised node features back to (η_rel, φ_rel, pT_rel).
    The state is a dict of plain lists, stored in every checkpoint next to the model.
    """

    KINDS = ("nodes", "edges", "hyperedges")

    def __init__(self, stats: dict[str, dict[str, list[float]]]):
        self.stats = stats
        self._t = {k: (torch.tensor(v["mean"]), torch.tensor(v["std"])) for k, v in stats.items()}

    @classmethod
    def fit(cls, raw: RawFeatures) -> FeatureNormaliser:
        m = raw.mask
        pair = m[:, :, None] & m[:, None, :]
        pair &= ~torch.eye(m.shape[1], dtype=torch.bool)
        real = {"nodes": raw.nodes[m], "edges": raw.edges[pair], "hyperedges": raw.hyperedges[m]}
        stats = {}
        for k, x in real.items():
            x = x.double()
            # A split without any pair (only one-particle jets) leaves identity statistics, not NaN.
            mean = x.mean(dim=0) if len(x) else torch.zeros(x.shape[1], dtype=x.dtype)
            std = x.std(dim=0, unbiased=False) if len(x) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
            stats[k] = {"mean": mean.tolist(), "std": std.clamp(min=1e-6).tolist()}
        return cls(stats)

    def transform(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._t[kind]
        return (x - mean.to(x)) / std.to(x)

    def inverse(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._t[kind]
        return x * std.to(x) + mean.to(x)

    def inverse_particles(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised node features (..., 3) → physical (η_rel, φ_rel wrapped, pT_rel)."""
        raw = self.inverse("nodes", x)
        phi = delta_phi(raw[..., 1], torch.zeros_like(raw[..., 1]))
        return torch.stack([raw[..., 0], phi, torch.exp(raw[..., 2])], dim=-1)

    def state_dict(self) -> dict[str, dict[str, list[float]]]:
        return self.stats

    @classmethod
    def from_state_dict(cls, state: dict[str, dict[str, list[float]]]) -> FeatureNormaliser:
        return cls(state)


def build_graphs(raw: RawFeatures, normaliser: FeatureNormaliser, index: np.ndarray | None = None
                 ) -> list[JetHypergraph]:
    """One normalised :class:`JetHypergraph` per jet (in ``index`` order, all jets when None).

    Per jet with n particles: x (n, 3), edge_index (2, n(n−1)), edge_attr (n(n−1), 4),
    hyperedge_index (2, n·(k+1)) with repeated members dropped, hyperedge_attr (n, 3).
    """
    nodes = normaliser.transform("nodes", raw.nodes)
    edges = normaliser.transform("edges", raw.edges)
    hyper = normaliser.transform("hyperedges", raw.hyperedges)
    counts = raw.mask.sum(dim=1).tolist()
    index = np.arange(len(counts)) if index is None else index
    graphs = []
    for i in index.tolist():
        n = counts[i]
        ei = _complete_edges(n)
        groups = raw.groups[i, :n]  # (n, k+1)
        members, hyperedge = _unique_members(groups)
        graphs.append(JetHypergraph(
            x=nodes[i, :n].clone(),
            edge_index=ei,
            edge_attr=edges[i, ei[0], ei[1]],
            hyperedge_index=torch.stack([members, hyperedge]),
            hyperedge_attr=hyper[i, :n].clone(),
            num_nodes=n,
        ))
    return graphs


def _unique_members(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, G) groups with repeats → flat (members, hyperedge ids) with each member once per group."""
    n, g = groups.shape
    hyperedge = torch.arange(n).repeat_interleave(g)
    members = groups.reshape(-1)
    keys = torch.unique(hyperedge * (n + 1) + members)
    return keys % (n + 1), keys // (n + 1)
