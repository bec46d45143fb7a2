"""Jets → features on the training device: the one definition of the node, edge and hyperedge features.

Per batch of padded jets (particles (B, P, 3) = (η_rel, φ_rel, pT_rel), mask (B, P)) everything is
computed on the batch's device with static shapes: the pairwise features of the Particle Transformer
(Qu & Gouskos, arXiv:2202.03772) for every ordered pair, kNN hyperedges by ``topk`` on the (B, P, P)
ΔR² matrix, the three features of each group, and the normalisation fitted on the training split.
No per-jet objects and no host round trip: a training step can be captured in a CUDA graph.

``hvae_ray.data.graphs`` builds per-jet PyG ``Data`` from the same functions, for users' own PyG
models and as the reference the dense path is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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


def group_members(groups: torch.Tensor) -> torch.Tensor:
    """(B, P, G) group indices → (B, P, G) bool: True at the first occurrence of each index in its group.

    :func:`knn_groups` fills short groups by repeating the centre; each member counts once.
    """
    g = groups.shape[-1]
    earlier = groups[..., :, None] == groups[..., None, :]  # (B, P, G, G): index a equals index b
    earlier = earlier & torch.ones(g, g, dtype=torch.bool, device=groups.device).tril(-1)  # b < a
    return ~earlier.any(dim=-1)


def group_features(particles: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """ln m², ln Σ_{a<b} z_a z_b Δ_ab, ln Σ z_a of each group.

    particles: (B, P, 3) = (η, φ, pT_rel); groups: (B, P, G) indices from :func:`knn_groups`, where a
    repeated index stands for "no particle" and is counted once. Returns (B, P, 3).
    """
    b, p, g = groups.shape
    gathered = torch.gather(particles[:, None].expand(b, p, p, 3), 2, groups[..., None].expand(b, p, g, 3))
    first = group_members(groups)  # a repeated index (a short group) is counted once
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

    @classmethod
    def fit_jets(cls, particles: torch.Tensor, mask: torch.Tensor, knn: int, chunk: int = 4096
                 ) -> FeatureNormaliser:
        """The same statistics as :meth:`fit` from padded jets (particles (N, P, 3), mask (N, P), on
        any device), computed chunk by chunk from running sums in float64: the (N, P, P, 4) edge
        features of the whole split are never held at once."""
        p = particles.shape[1]
        eye = torch.eye(p, dtype=torch.bool, device=particles.device)
        acc: dict[str, list] = {k: [0, 0.0, 0.0] for k in cls.KINDS}
        for s in range(0, particles.shape[0], chunk):
            x, m = particles[s : s + chunk], mask[s : s + chunk]
            real = {"nodes": (node_features(x), m),
                    "edges": (pairwise_features(x), m[:, :, None] & m[:, None, :] & ~eye),
                    "hyperedges": (group_features(x, knn_groups(x, m, knn)), m)}
            for k, (feat, sel) in real.items():
                v = feat[sel].double()
                acc[k][0] += v.shape[0]
                acc[k][1] = acc[k][1] + v.sum(dim=0)
                acc[k][2] = acc[k][2] + v.pow(2).sum(dim=0)
        dims = {"nodes": 3, "edges": len(EDGE_FEATURES), "hyperedges": len(HYPEREDGE_FEATURES)}
        stats = {}
        for k, (n, s1, s2) in acc.items():
            zeros = torch.zeros(dims[k], dtype=torch.float64)
            s1 = torch.as_tensor(s1, dtype=torch.float64).cpu() + zeros
            s2 = torch.as_tensor(s2, dtype=torch.float64).cpu() + zeros
            mean = s1 / n if n else zeros
            std = ((s2 / n - mean**2).clamp(min=0).sqrt() if n > 1 else torch.ones_like(zeros))
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


@dataclass
class DenseBatch:
    """B jets as padded, normalised tensors on one device: the dense model's input and its targets.

    x: (B, P, 3) node features; mask: (B, P) bool, real particles; edges: (B, P, P, 4) pairwise
    features, edge (i, j) at [i, j]; pair_mask: (B, P, P) bool, both real and i ≠ j; hyperedges:
    (B, P, 3), group m centred on particle m; incidence: (B, P, P) bool, [n, m] = particle n is a
    member of group m (each member once; PyG's ``hyperedge_index`` as a dense matrix); weight: (B,)
    1 for a jet and 0 for a padding jet (fixed-size batches at the end of an epoch).
    """

    x: torch.Tensor
    mask: torch.Tensor
    edges: torch.Tensor
    pair_mask: torch.Tensor
    hyperedges: torch.Tensor
    incidence: torch.Tensor
    weight: torch.Tensor

    @property
    def num_graphs(self) -> int:
        return self.x.shape[0]


def incidence_matrix(groups: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, P, G) groups of :func:`knn_groups`, (B, P) mask → (B, P, P) bool [member n, group m]."""
    p = groups.shape[1]
    members = group_members(groups) & mask[:, :, None]  # (B, M, G): padding centres have no group
    onehot = torch.nn.functional.one_hot(groups, p).bool() & members[..., None]  # (B, M, G, N)
    return onehot.any(dim=2).transpose(1, 2)  # (B, N, M)


class DenseFeaturizer:
    """Padded jets → :class:`DenseBatch` on their device, normalised with a fitted :class:`FeatureNormaliser`.

    The normaliser's statistics are moved to ``device`` once, so a call makes no host transfer and
    no host synchronisation (shapes are static: it can run inside a captured CUDA graph).
    """

    def __init__(self, normaliser: FeatureNormaliser, knn: int, device: torch.device | str):
        self.knn = knn
        self.stats = {k: tuple(t.to(device=device, dtype=torch.float32) for t in normaliser._t[k])
                      for k in FeatureNormaliser.KINDS}

    def _norm(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.stats[kind]
        return (x - mean) / std

    def __call__(self, particles: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
                 ) -> DenseBatch:
        """particles (B, P, 3), mask (B, P) bool, weight (B,) (None: all ones) → :class:`DenseBatch`."""
        if weight is None:
            weight = torch.ones(particles.shape[0], device=particles.device)
        weight = weight.to(particles.dtype)
        mask = mask & (weight > 0)[:, None]  # a padding jet has no particle
        particles = particles.masked_fill(~mask[..., None], 0.0)
        p = particles.shape[1]
        groups = knn_groups(particles, mask, self.knn)  # (B, P, k+1)
        eye = torch.eye(p, dtype=torch.bool, device=particles.device)
        return DenseBatch(
            x=self._norm("nodes", node_features(particles)),
            mask=mask,
            edges=self._norm("edges", pairwise_features(particles)),
            pair_mask=mask[:, :, None] & mask[:, None, :] & ~eye,
            hyperedges=self._norm("hyperedges", group_features(particles, groups)),
            incidence=incidence_matrix(groups, mask),
            weight=weight,
        )


def device_jets(sample: JetSample, index: np.ndarray | None, device: torch.device | str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The jets ``index`` of ``sample`` (all when None) as (particles (N, P, 3) float32, mask (N, P)
    bool) on ``device``: a whole split stays on the training device for the whole run."""
    parts, mask = sample.particles, sample.mask
    if index is not None:
        parts, mask = parts[index], mask[index]
    return (torch.as_tensor(np.ascontiguousarray(parts), dtype=torch.float32).to(device),
            torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.bool).to(device))
