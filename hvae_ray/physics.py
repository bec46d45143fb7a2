"""Physics observables of jets and the generation metrics of the field, in plain numpy/scipy.

Inputs are padded particle arrays as in JetNet (Kansal et al., arXiv:2106.11535):
``particles`` of shape (N, P, 3) = (η_rel, φ_rel, pT_rel) with η_rel = η − η_jet, φ_rel = φ − φ_jet [rad]
and pT_rel = pT / pT_jet, and an optional boolean ``mask`` of shape (N, P), True for real particles.
When ``mask`` is None a particle is padding iff all three of its features are exactly 0 (the JetNet
convention). All returned observables are dimensionless (relative to the jet pT).

Metrics follow Kansal et al., "Evaluating generative models in high energy physics",
PRD 107, 076017 (2023), arXiv:2211.10295, and are computed exactly as the ``jetnet`` library 0.2.5
computes them (``CONVENTION``), so that our numbers are the numbers papers quote:

- W1m, W1p, W1efp: 1-Wasserstein distances of the jet mass, of the particle features and of five
  energy flow polynomials, averaged over subsamples drawn with replacement at jetnet's sizes.
- FPD: Fréchet distance between Gaussian fits of the 36 EFPs with d ≤ 4, extrapolated to infinite
  sample size through a linear fit in 1/N; seeds and draws as jetnet's.
- KPD: unbiased quadratic-time MMD² with the polynomial kernel k(x, y) = (x·y/dim + 1)⁴.

Energy flow polynomials follow Komiske, Metodiev and Thaler, "Energy flow polynomials: a complete
linear basis for jet substructure", JHEP 04 (2018) 013, arXiv:1712.07124, with jetnet's choices:
hadronic measure, β = 1, and energy fractions z_i = pT_rel,i *as given* (not renormalised over the
kept particles), in energyflow's column order. ``tests/test_jetnet_parity.py`` holds every function
here to jetnet's own numbers on the same jets (``benchmarks/jetnet_parity.py`` makes that fixture).

Every metric is quoted together with a floor: the same metric between two disjoint halves of the real
set (``evaluate_generation``). Values of all metrics grow as the samples shrink, so compare a model's
numbers with the floor, and with published values only at the paper's sample sizes (50k jets).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import linalg
from scipy.optimize import curve_fit
from scipy.stats import wasserstein_distance

__all__ = [
    "EFP_D4_GRAPHS",
    "PRIME_EFP_N4_D4",
    "CONVENTION",
    "PARTICLE_FEATURE_NAMES",
    "FPDResult",
    "fpd_batch_sizes",
    "jet_mass",
    "efps",
    "w1m",
    "w1p",
    "w1efp",
    "frechet_distance",
    "fpd",
    "kpd",
    "mmd_poly_unbiased",
    "evaluate_generation",
]

Edge = tuple[int, int]
Graph = tuple[Edge, ...]

# ----------------------------------------------------------------------------------------------
# EFP graphs
# ----------------------------------------------------------------------------------------------

#: The 36 EFP graphs of energyflow's ``EFPSet('d<=4')`` in energyflow's own column order (the order of
#: ``EFPSet('d<=4').graphs()`` in energyflow 1.4, which jetnet 0.2.5 uses): the feature set of FPD and
#: KPD for jets (Kansal et al., arXiv:2211.10295; ``jetnet.evaluation.get_fpd_kpd_jet_features``).
#: Every loopless multigraph with d ≤ 4 edges up to isomorphism, connected or not; by d = 0..4:
#: 1 + 1 + 3 + 8 + 23 = 36 (connected: 1, 1, 2, 5, 12; disjoint unions: 0, 0, 1, 3, 11). Column k of
#: ``efps(..., graphs=EFP_D4_GRAPHS)`` is column k of jetnet's features. The d = 0 graph (one vertex)
#: is Σ_i z_i, the summed pT_rel of the kept particles (below 1 when particles were dropped).
EFP_D4_GRAPHS: tuple[Graph, ...] = (
    (),
    ((0, 1),),
    ((0, 1), (0, 1)),
    ((0, 1), (0, 1), (0, 1)),
    ((0, 1), (0, 1), (0, 1), (0, 1)),
    ((0, 1), (0, 2)),
    ((0, 1), (0, 2), (0, 2)),
    ((0, 1), (0, 2), (0, 2), (0, 2)),
    ((0, 1), (0, 1), (0, 2), (0, 2)),
    ((0, 1), (0, 2), (1, 2)),
    ((0, 1), (0, 2), (0, 2), (1, 2)),
    ((0, 1), (0, 2), (0, 3)),
    ((0, 1), (0, 2), (0, 2), (0, 3)),
    ((0, 1), (0, 2), (1, 3)),
    ((0, 1), (0, 2), (0, 2), (1, 3)),
    ((0, 1), (0, 1), (0, 2), (1, 3)),
    ((0, 1), (0, 2), (1, 2), (0, 3)),
    ((0, 1), (0, 2), (1, 3), (2, 3)),
    ((0, 1), (0, 2), (0, 3), (0, 4)),
    ((0, 1), (0, 2), (0, 3), (1, 4)),
    ((0, 1), (0, 2), (1, 3), (2, 4)),
    ((0, 1), (2, 3)),
    ((0, 1), (2, 3), (2, 3)),
    ((0, 1), (2, 3), (2, 3), (2, 3)),
    ((0, 1), (0, 1), (2, 3), (2, 3)),
    ((0, 1), (2, 3), (2, 4)),
    ((0, 1), (0, 1), (2, 3), (2, 4)),
    ((0, 1), (2, 3), (2, 4), (2, 4)),
    ((0, 1), (2, 3), (2, 4), (3, 4)),
    ((0, 1), (2, 3), (4, 5)),
    ((0, 1), (2, 3), (2, 4), (2, 5)),
    ((0, 1), (2, 3), (2, 4), (3, 5)),
    ((0, 1), (0, 2), (3, 4), (3, 5)),
    ((0, 1), (2, 3), (4, 5), (4, 5)),
    ((0, 1), (2, 3), (4, 5), (4, 6)),
    ((0, 1), (2, 3), (4, 5), (6, 7)),
)

#: The five prime EFPs with n = 4 vertices and d = 4 edges used for W1efp (energyflow selection
#: ``("n==", 4), ("d==", 4), ("p==", 1)``, the ``jetnet`` default), with the edge lists of the notes.
PRIME_EFP_N4_D4: tuple[Graph, ...] = (
    ((0, 1), (0, 2), (0, 2), (0, 3)),
    ((0, 1), (0, 2), (0, 2), (1, 3)),
    ((0, 1), (0, 1), (0, 2), (1, 3)),
    ((0, 1), (0, 2), (1, 2), (0, 3)),
    ((0, 1), (0, 2), (1, 3), (2, 3)),
)

# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------


def _as_particles(particles: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(N, P, 3) float64 particles with padding zeroed, and the (N, P) bool mask."""
    x = np.asarray(particles)
    if x.ndim != 3 or x.shape[2] < 3:
        raise ValueError(f"particles must have shape (N, P, 3), got {x.shape}")
    x = x[:, :, :3].astype(np.float64)
    if mask is None:
        m = (x != 0).any(axis=2)
    else:
        m = np.asarray(mask).reshape(x.shape[0], x.shape[1]).astype(bool)
    x = np.where(m[..., None], x, 0.0)
    return x, m


def _abs_dphi(dphi: np.ndarray) -> np.ndarray:
    """|Δφ| of an angle difference, wrapped into [0, π] (energyflow's: π − ||Δφ| − π|, mod 2π)."""
    return np.pi - np.abs(np.abs(dphi) % (2 * np.pi) - np.pi)


# ----------------------------------------------------------------------------------------------
# observables
# ----------------------------------------------------------------------------------------------


def jet_mass(particles: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Relative jet mass m / pT_jet, from the sum of massless particle four-vectors.

    Each particle is a massless four-vector built from (pT_rel, η_rel, φ_rel):
    p = pT_rel · (cosh η_rel, cos φ_rel, sin φ_rel, sinh η_rel); the mass of their sum is in units of
    the jet pT (the notes' definition, as jetnet's ``jet_features``). The mass is invariant under a
    common shift of η_rel (a longitudinal boost) and of φ_rel (a rotation).

    particles: (N, P, 3) = (η_rel, φ_rel, pT_rel); mask: (N, P) bool or None.
    Returns (N,) float64, dimensionless, ≥ 0 (a negative m² from rounding is clipped to 0).
    """
    x, _ = _as_particles(particles, mask)
    eta, phi, pt = x[..., 0], x[..., 1], x[..., 2]
    e = (pt * np.cosh(eta)).sum(axis=1)
    px = (pt * np.cos(phi)).sum(axis=1)
    py = (pt * np.sin(phi)).sum(axis=1)
    pz = (pt * np.sinh(eta)).sum(axis=1)
    m2 = e**2 - px**2 - py**2 - pz**2
    return np.sqrt(np.clip(m2, 0.0, None))


def _components(graph: Graph) -> list[Graph]:
    """Connected components of a graph given by its edges, each relabelled to vertices 0..n-1."""
    parent: dict[int, int] = {}

    def find(v: int) -> int:
        while parent.setdefault(v, v) != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for a, b in graph:
        if a == b:
            raise ValueError(f"EFP graphs have no self-loops, got edge {(a, b)}")
        parent[find(a)] = find(b)
    groups: dict[int, list[Edge]] = {}
    for a, b in graph:
        groups.setdefault(find(a), []).append((a, b))
    out = []
    for edges in groups.values():
        verts = sorted({v for e in edges for v in e})
        relabel = {v: i for i, v in enumerate(verts)}
        pairs = ((relabel[a], relabel[b]) for a, b in edges)
        out.append(tuple(sorted((min(p), max(p)) for p in pairs)))
    return out


def _canonical(graph: Graph) -> Graph:
    """A canonical form of a connected graph on vertices 0..n-1 (brute force for n ≤ 6)."""
    n = 1 + max((max(e) for e in graph), default=0)
    if n > 6:
        return tuple(sorted(graph))
    best = None
    for perm in itertools.permutations(range(n)):
        form = tuple(sorted((min(perm[a], perm[b]), max(perm[a], perm[b])) for a, b in graph))
        if best is None or form < best:
            best = form
    return best


def _connected_efp(graph: Graph, z: np.ndarray, theta_pow: dict[int, np.ndarray]) -> np.ndarray:
    """EFP of one connected graph for a chunk of jets, by einsum over the particle indices.

    z: (n_jets, P); theta_pow[w]: (n_jets, P, P) = θ_ij^w. Returns (n_jets,).
    """
    n = 1 + max(max(e) for e in graph)
    letters = "bcdefghijklmnopqrstuvwxyz"
    if n > len(letters):
        raise ValueError(f"EFP graph with {n} vertices is too large")
    mult = _multiplicities(graph)
    operands, subs = [], []
    for v in range(n):
        operands.append(z)
        subs.append("a" + letters[v])
    for (i, j), w in mult.items():
        if w not in theta_pow:
            theta_pow[w] = theta_pow[1] ** w
        operands.append(theta_pow[w])
        subs.append("a" + letters[i] + letters[j])
    return np.einsum(",".join(subs) + "->a", *operands, optimize="greedy")


def efps(
    particles: np.ndarray,
    mask: np.ndarray | None = None,
    graphs: Sequence[Sequence[tuple[int, int]]] = EFP_D4_GRAPHS,
    chunk_size: int = 2048,
) -> np.ndarray:
    """Energy flow polynomials (Komiske, Metodiev, Thaler, arXiv:1712.07124) of each jet, as jetnet.

    For a multigraph G with edges (k, l) on vertices 1..n,
    EFP_G = Σ_{i1..in} z_{i1} ··· z_{in} Π_{(k,l)∈G} θ_{ik il},
    with the hadronic measure at β = 1, θ_ij = sqrt(Δη_ij² + Δφ_ij²) (Δφ wrapped into [−π, π]) and
    the energy fractions **z_i = pT_rel,i as given**, not renormalised to Σ z = 1 over the kept
    particles. This is jetnet 0.2.5's convention (``jetnet.utils.efps``: energyflow's ``EFPSet`` with
    ``measure="hadr", beta=1, normed=None, coords="ptyphim"``): a jet cut to its 30 hardest particles
    keeps Σ z < 1, and each n-vertex EFP carries that factor n times. Padded particles have z = 0.

    Connected graphs are contracted with einsum over the particle indices (vectorised over jets, in
    chunks of ``chunk_size`` jets to bound memory); a disconnected graph is the product of the EFPs of
    its connected components, each computed once per call. The one-vertex graph ``()`` (d = 0) is Σ z.

    particles: (N, P, 3) = (η_rel, φ_rel, pT_rel); mask: (N, P) bool or None.
    graphs: sequence of edge lists, e.g. ``EFP_D4_GRAPHS`` (36, the default, energyflow's column order)
    or ``PRIME_EFP_N4_D4``. Returns (N, len(graphs)) float64, dimensionless; every d ≥ 1 EFP is 0 for a
    one-particle jet.
    """
    x, _ = _as_particles(particles, mask)
    graphs = [tuple((int(a), int(b)) for a, b in g) for g in graphs]
    decomposed = [[_canonical(c) for c in _components(g)] for g in graphs]
    unique = sorted({c for comps in decomposed for c in comps}, key=lambda g: (len(g), g))
    col = {c: i for i, c in enumerate(unique)}
    n_jets = x.shape[0]
    values = np.empty((n_jets, len(unique)))
    max_w = max((max(_multiplicities(c).values(), default=1) for c in unique), default=1)
    for start in range(0, n_jets, chunk_size):
        sl = slice(start, start + chunk_size)
        z = x[sl, :, 2]  # pT_rel as given (jetnet's convention), 0 for padding
        deta = x[sl, :, None, 0] - x[sl, None, :, 0]
        dphi = _abs_dphi(x[sl, :, None, 1] - x[sl, None, :, 1])
        theta = np.sqrt(deta**2 + dphi**2)
        theta_pow = {1: theta}
        for w in range(2, max_w + 1):
            theta_pow[w] = theta_pow[w - 1] * theta
        for c, i in col.items():
            values[sl, i] = _connected_efp(c, z, theta_pow)
    out = np.ones((n_jets, len(graphs)))
    for k, comps in enumerate(decomposed):
        if not comps:  # no edges: the one-vertex graph, Σ_i z_i
            out[:, k] = x[:, :, 2].sum(axis=1)
        for c in comps:
            out[:, k] *= values[:, col[c]]
    return out


def _multiplicities(graph: Graph) -> dict[Edge, int]:
    mult: dict[Edge, int] = {}
    for e in graph:
        mult[e] = mult.get(e, 0) + 1
    return mult


# ----------------------------------------------------------------------------------------------
# W1 metrics
# ----------------------------------------------------------------------------------------------
#
# Batching as jetnet 0.2.5 (``jetnet.evaluation.w1m``/``w1p``/``w1efp``): ``num_batches`` times, draw
# ``num_eval_samples`` jets *with replacement* from each set (not capped at the set sizes; the
# generator's ``choice(n, size)`` draws the same indices as ``integers(0, n, size)``), first the real
# then the generated indices, and take scipy's ``wasserstein_distance``; report mean and std over the
# batches. jetnet draws from an unseeded module-level generator; here it is ``default_rng(seed)``, so
# a jetnet run whose generator is seeded alike draws the very same jets.

#: The convention every metric here follows, stated in ``evaluate_generation``'s output.
CONVENTION = "jetnet-0.2.5"

#: Per-particle features of W1p, in the order of the (N, P, 3) arrays.
PARTICLE_FEATURE_NAMES = ("etarel", "phirel", "ptrel")


def _draws(rng: np.random.Generator, n1: int, n2: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of one batch: ``size`` jets with replacement from each set, real first (as jetnet)."""
    if n1 < 1 or n2 < 1:
        raise ValueError("W1 needs at least one jet in each sample")
    if size < 1:
        raise ValueError(f"num_eval_samples must be ≥ 1, got {size}")
    return rng.integers(0, n1, size=size), rng.integers(0, n2, size=size)


def _w1_feature_batches(
    x1: np.ndarray, x2: np.ndarray, num_eval_samples: int, num_batches: int, rng: np.random.Generator
) -> np.ndarray:
    """W1 per feature column between with-replacement subsamples of two per-jet feature sets.

    x1: (N1, F), x2: (N2, F). Returns (num_batches, F).
    """
    out = np.empty((num_batches, x1.shape[1]))
    for b in range(num_batches):
        i1, i2 = _draws(rng, len(x1), len(x2), num_eval_samples)
        for f in range(x1.shape[1]):
            out[b, f] = wasserstein_distance(x1[i1, f], x2[i2, f])
    return out


def _w1_particle_batches(
    p1: np.ndarray, m1: np.ndarray, p2: np.ndarray, m2: np.ndarray,
    num_eval_samples: int, num_batches: int, rng: np.random.Generator,
) -> np.ndarray:
    """W1 per particle feature between the real particles of jet subsamples. Returns (num_batches, 3)."""
    nf = p1.shape[2]
    out = np.empty((num_batches, nf))
    for b in range(num_batches):
        i1, i2 = _draws(rng, len(p1), len(p2), num_eval_samples)
        a = p1[i1][m1[i1]]
        c = p2[i2][m2[i2]]
        if len(a) == 0 or len(c) == 0:
            out[b] = np.inf
            continue
        for f in range(nf):
            out[b, f] = wasserstein_distance(a[:, f], c[:, f])
    return out


def _valid_particles(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Real particles: inside the mask and not all-zero (jetnet's ``exclude_zeros``)."""
    return m & (x != 0).any(axis=2)


def w1m(
    real: np.ndarray,
    gen: np.ndarray,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    seed: int = 42,
    *,
    real_mask: np.ndarray | None = None,
    gen_mask: np.ndarray | None = None,
) -> tuple[float, float]:
    """W1 between the relative jet-mass distributions (W1m; Kansal et al., arXiv:2106.11535).

    ``num_batches`` times, draw ``num_eval_samples`` jets with replacement from each set (jetnet's
    batching, see above) and take the W1 of their masses; return mean and std over the batches.

    real, gen: (N1, P, 3), (N2, P', 3) = (η_rel, φ_rel, pT_rel); masks (N, P) bool or None.
    Returns (mean, std), in units of the jet pT (dimensionless). Seeded: ``numpy.random.default_rng(seed)``.
    """
    mr = jet_mass(real, real_mask)[:, None]
    mg = jet_mass(gen, gen_mask)[:, None]
    w = _w1_feature_batches(mr, mg, num_eval_samples, num_batches, np.random.default_rng(seed))[:, 0]
    return float(w.mean()), float(w.std())


def w1p(
    real: np.ndarray,
    gen: np.ndarray,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    seed: int = 42,
    *,
    real_mask: np.ndarray | None = None,
    gen_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """W1 per particle feature (η_rel, φ_rel, pT_rel) between all real particles of jet subsamples (W1p).

    ``num_batches`` times, draw ``num_eval_samples`` jets with replacement from each set, pool their
    particles leaving out padding (outside the mask, or all three features exactly 0 as jetnet's
    ``exclude_zeros``), and take W1 per feature (Kansal et al., arXiv:2106.11535).

    real, gen: (N1, P, 3), (N2, P', 3); masks (N, P) bool or None.
    Returns (means (3,), stds (3,)) in the features' units (η: none, φ: rad, pT: fraction of jet pT).
    """
    xr, mr = _as_particles(real, real_mask)
    xg, mg = _as_particles(gen, gen_mask)
    w = _w1_particle_batches(xr, _valid_particles(xr, mr), xg, _valid_particles(xg, mg),
                             num_eval_samples, num_batches, np.random.default_rng(seed))
    return w.mean(axis=0), w.std(axis=0)


def w1efp(
    real: np.ndarray,
    gen: np.ndarray,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    seed: int = 42,
    *,
    real_mask: np.ndarray | None = None,
    gen_mask: np.ndarray | None = None,
    graphs: Sequence[Sequence[tuple[int, int]]] = PRIME_EFP_N4_D4,
) -> tuple[np.ndarray, np.ndarray]:
    """W1 per EFP between with-replacement subsamples of jets (W1efp; Kansal et al., arXiv:2106.11535).

    By default the five prime EFPs with n = 4, d = 4 (``PRIME_EFP_N4_D4``), with ``efps``' jetnet
    convention (hadronic measure, β = 1, z = pT_rel as given).

    real, gen: (N1, P, 3), (N2, P', 3); masks (N, P) bool or None.
    Returns (means (G,), stds (G,)), dimensionless; the field quotes their mean as W1efp.
    """
    er = efps(real, real_mask, graphs)
    eg = efps(gen, gen_mask, graphs)
    w = _w1_feature_batches(er, eg, num_eval_samples, num_batches, np.random.default_rng(seed))
    return w.mean(axis=0), w.std(axis=0)


# ----------------------------------------------------------------------------------------------
# FPD and KPD
# ----------------------------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), with the matrix square root from
    ``scipy.linalg.sqrtm``; if it is not finite (near-singular product) ``eps`` is added to both
    diagonals, and a small imaginary part from rounding is discarded (as jetnet).

    mu: (F,), sigma: (F, F) (scalars are accepted for F = 1). Returns a float in the features' units².
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, float)), np.atleast_1d(np.asarray(mu2, float))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, float)), np.atleast_2d(np.asarray(sigma2, float))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError("mean vectors and covariance matrices do not match in shape")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on (near-)singular products; handled below
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _normalise(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide each feature of both sets by its largest |value| in the real set (1 where that is 0)."""
    scale = np.abs(real).max(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return real / scale, gen / scale


def _as_feature_pair(real_features, gen_features, normalise: bool) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(real_features, dtype=np.float64)
    y = np.asarray(gen_features, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N, F) with equal F, got {x.shape} and {y.shape}")
    if len(x) < 1 or len(y) < 1:
        raise ValueError("need at least one jet in each sample")
    return _normalise(x, y) if normalise else (x, y)


class FPDResult(tuple):
    """``(value, error)`` of FPD, with the batch sizes the Fréchet distance was measured at.

    Unpacks as a 2-tuple; ``batch_sizes`` is the (num_points,) int array of subsample sizes.
    """

    def __new__(cls, value: float, error: float, batch_sizes: np.ndarray = ()):
        obj = super().__new__(cls, (float(value), float(error)))
        obj.batch_sizes = np.asarray(batch_sizes, dtype=np.int64)
        return obj

    def __getnewargs__(self):
        return (self[0], self[1], self.batch_sizes)

    @property
    def value(self) -> float:
        return self[0]

    @property
    def error(self) -> float:
        return self[1]


def fpd_batch_sizes(min_samples: int = 20_000, max_samples: int = 50_000, num_points: int = 10) -> np.ndarray:
    """The FPD subsample sizes: ``num_points`` sizes evenly spaced in 1/N, truncated to int (as jetnet)."""
    if min_samples < 2 or max_samples < min_samples or num_points < 1:
        raise ValueError(f"need 2 ≤ min_samples ≤ max_samples and num_points ≥ 1, "
                         f"got {min_samples}, {max_samples}, {num_points}")
    return (1.0 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype(np.int32)


def _linear(t, intercept, slope):
    return intercept + slope * t


def fpd(
    real_features: np.ndarray,
    gen_features: np.ndarray,
    min_samples: int = 20_000,
    max_samples: int = 50_000,
    num_batches: int = 20,
    num_points: int = 10,
    seed: int = 42,
    normalise: bool = True,
) -> FPDResult:
    """Fréchet physics distance (Kansal et al., arXiv:2211.10295), extrapolated to infinite samples.

    As ``jetnet.evaluation.fpd`` (0.2.5), draw for draw:

    1. Divide each feature of both sets by its largest |value| in the real set.
    2. At the ``num_points`` sizes of ``fpd_batch_sizes`` (evenly spaced in 1/N), draw ``num_batches``
       pairs of subsamples with replacement (from ``default_rng(seed)``, real then generated, sizes
       not capped at the set sizes), take the Fréchet distance of their Gaussian fits and average.
    3. Fit FD(N) = a + b/N with a, b ≥ 0 and return a with its fit uncertainty.

    With sets smaller than ``max_samples`` the value includes the sets' own finite-sample effect;
    jetnet recommends 50,000 jets. real_features, gen_features: (N1, F), (N2, F), e.g.
    ``efps(..., graphs=EFP_D4_GRAPHS)``. Returns ``FPDResult`` = (value, error), dimensionless.
    """
    x, y = _as_feature_pair(real_features, gen_features, normalise)
    sizes = fpd_batch_sizes(min_samples, max_samples, num_points)
    rng = np.random.default_rng(seed)
    vals = np.empty(len(sizes))
    for p, n in enumerate(sizes):
        batch = np.empty(num_batches)
        for b in range(num_batches):
            a = x[rng.integers(0, len(x), size=n)]
            c = y[rng.integers(0, len(y), size=n)]
            batch[b] = frechet_distance(a.mean(axis=0), np.cov(a, rowvar=False),
                                        c.mean(axis=0), np.cov(c, rowvar=False))
        vals[p] = batch.mean()
    inv = 1.0 / sizes
    if np.ptp(inv) == 0:  # a single size: no extrapolation possible
        return FPDResult(vals.mean(), vals.std(), sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, cov = curve_fit(_linear, inv, vals, bounds=([0, 0], [np.inf, np.inf]))
    return FPDResult(params[0], np.sqrt(max(cov[0, 0], 0.0)), sizes)


def _poly_kernel_sum(a: np.ndarray, b: np.ndarray, degree: int, block: int = 1024) -> float:
    """Σ_ij (a_i·b_j / dim + 1)^degree, in row blocks to bound memory."""
    dim = a.shape[1]
    total = 0.0
    for s in range(0, len(a), block):
        k = a[s:s + block] @ b.T
        k /= dim
        k += 1.0
        if degree == 4:  # two squarings: several times faster than a float power
            np.square(k, out=k)
            np.square(k, out=k)
        else:
            np.power(k, degree, out=k)
        total += float(k.sum())
    return total


def mmd_poly_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 4) -> float:
    """Unbiased quadratic-time MMD² with the kernel k(a, b) = (a·b/dim + 1)^degree.

    MMD² = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(n(n−1)) − 2 Σ_ij k(x_i, y_j)/(mn)
    (Gretton et al., JMLR 13 (2012) 723; as KID, Bińkowski et al., arXiv:1801.01401).
    x: (m, F), y: (n, F) with m, n ≥ 2. Returns a float; it can be slightly negative.
    """
    m, n = len(x), len(y)
    dim = x.shape[1]
    kxx_diag = ((np.einsum("ij,ij->i", x, x) / dim + 1.0) ** degree).sum()
    kyy_diag = ((np.einsum("ij,ij->i", y, y) / dim + 1.0) ** degree).sum()
    kxx = _poly_kernel_sum(x, x, degree) - kxx_diag
    kyy = _poly_kernel_sum(y, y, degree) - kyy_diag
    kxy = _poly_kernel_sum(x, y, degree)
    return float(kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2.0 * kxy / (m * n))


def kpd(
    real_features: np.ndarray,
    gen_features: np.ndarray,
    num_batches: int = 10,
    batch_size: int = 5000,
    seed: int = 42,
    normalise: bool = True,
) -> tuple[float, float]:
    """Kernel physics distance (Kansal et al., arXiv:2211.10295), as ``jetnet.evaluation.kpd`` (0.2.5).

    Features of both sets are divided by their largest |value| in the real set. Batch i draws
    ``batch_size`` jets with replacement from each set with ``default_rng(seed + 1000 i)`` (jetnet's
    seeding, real then generated, not capped at the set sizes) and takes the unbiased MMD² with the
    polynomial kernel k(x, y) = (x·y/dim + 1)⁴.

    real_features, gen_features: (N1, F), (N2, F). Returns (median, error), dimensionless, with the
    error half the 16.275–83.725 percentile range of the batch values (jetnet's, ±1σ for a Gaussian).
    """
    x, y = _as_feature_pair(real_features, gen_features, normalise)
    if batch_size < 2:
        raise ValueError(f"KPD needs batch_size ≥ 2, got {batch_size}")
    vals = np.empty(num_batches)
    for i in range(num_batches):
        rng = np.random.default_rng(seed + i * 1000)
        vals[i] = mmd_poly_unbiased(x[rng.integers(0, len(x), size=batch_size)],
                                    y[rng.integers(0, len(y), size=batch_size)])
    lo, hi = np.percentile(vals, [16.275, 83.725])
    return float(np.median(vals)), float((hi - lo) / 2.0)


# ----------------------------------------------------------------------------------------------
# all metrics with their floors
# ----------------------------------------------------------------------------------------------


def _put(out: dict, key: str, batches: np.ndarray, floor: np.ndarray) -> None:
    """Store mean/std of per-batch values (B,) for a metric and its floor."""
    out[key] = float(batches.mean())
    out[f"{key}_err"] = float(batches.std())
    out[f"{key}_floor"] = float(floor.mean())
    out[f"{key}_floor_err"] = float(floor.std())


def _sample_sizes(n_real: int, n_gen: int, num_eval_samples: int, num_batches: int, fpd_min: int,
                  fpd_max: int, fpd_batches: int, fpd_points: int, kpd_batches: int,
                  kpd_size: int) -> dict:
    """The bookkeeping keys of ``evaluate_generation``: set sizes and every subsample size used."""
    fpd_batch_sizes(fpd_min, fpd_max, fpd_points)  # checks the range before any work
    return {
        "convention": CONVENTION,
        "n_real": n_real,
        "n_gen": n_gen,
        "n_floor": n_real // 2,
        "w1_eval_samples": num_eval_samples,
        "w1_num_batches": num_batches,
        "fpd_min_samples": fpd_min,
        "fpd_max_samples": fpd_max,
        "fpd_num_points": fpd_points,
        "fpd_num_batches": fpd_batches,
        "kpd_batch_size": kpd_size,
        "kpd_num_batches": kpd_batches,
        # jetnet recommends ≥ 50k jets: smaller sets add their own finite-sample effect to every value
        "small_sample": int(min(n_gen, n_real // 2) < max(num_eval_samples, fpd_max)),
    }


def evaluate_generation(
    real_particles: np.ndarray,
    real_mask: np.ndarray | None,
    gen_particles: np.ndarray,
    gen_mask: np.ndarray | None,
    seed: int = 42,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    fpd_min_samples: int = 20_000,
    fpd_max_samples: int = 50_000,
    fpd_num_batches: int = 20,
    fpd_num_points: int = 10,
    kpd_num_batches: int = 10,
    kpd_batch_size: int = 5000,
) -> dict:
    """All generation metrics of the field, as jetnet 0.2.5 computes them, each with a floor.

    **Values** are jetnet's: ``w1m``, ``w1p``, ``w1efp`` of the generated set against the whole real
    set, and ``fpd``, ``kpd`` on the 36 d ≤ 4 EFPs, with jetnet's defaults and batching (subsamples
    drawn with replacement at the requested sizes, whatever the set sizes) and jetnet's seeds (W1m,
    W1p, W1efp each from ``default_rng(seed)``, FPD with ``seed``, KPD with ``seed + 1000 i``). With
    the default ``seed = 42`` FPD and KPD equal jetnet's default call on the same arrays; W1 values
    equal jetnet's whenever its module generator is seeded with ``seed`` before each metric. These are
    the numbers to compare with papers that quote jetnet (MPGAN, iGAPT, EPiC), at the paper's sample
    sizes: the values grow as the sets shrink below the recommended 50,000 jets (``small_sample``).

    **Floors**: the same metric with the same subsample sizes and seeds between two disjoint halves
    of the real set (split by ``default_rng(seed).permutation``): what a perfect generator would
    score against a real set of half the size. A value is meaningful only well above its floor.

    real_particles, gen_particles: (N, P, 3) = (η_rel, φ_rel, pT_rel); masks (N, P) bool or None.
    Needs at least 4 real and 2 generated jets.

    Returns a dict. For each metric M: ``M`` (value), ``M_err`` (std over batches for W1, the fit
    uncertainty for FPD, half the 16–84 % range for KPD), ``M_floor`` and ``M_floor_err``; metrics
    ``w1m``; ``w1p_etarel``, ``w1p_phirel``, ``w1p_ptrel`` and their mean ``w1p_mean`` (its error is
    the std of the per-batch mean); ``w1efp_0`` … ``w1efp_4`` (``PRIME_EFP_N4_D4`` in order) and
    ``w1efp_mean``; ``fpd``; ``kpd``. Bookkeeping: ``convention`` (the string ``CONVENTION``),
    ``n_real``, ``n_gen``, ``n_floor`` (jets per half), ``w1_eval_samples``, ``w1_num_batches``,
    ``fpd_min_samples``, ``fpd_max_samples``, ``fpd_num_points``, ``fpd_num_batches``,
    ``kpd_batch_size``, ``kpd_num_batches`` and ``small_sample`` (1 when the generated set or a real
    half is smaller than the largest subsample, else 0).
    """
    xr, mr = _as_particles(real_particles, real_mask)
    xg, mg = _as_particles(gen_particles, gen_mask)
    n_real, n_gen = len(xr), len(xg)
    if n_real < 4 or n_gen < 2:
        raise ValueError(f"need at least 4 real and 2 generated jets, got {n_real} and {n_gen}")
    out: dict = _sample_sizes(n_real, n_gen, num_eval_samples, num_batches, fpd_min_samples,
                              fpd_max_samples, fpd_num_batches, fpd_num_points, kpd_num_batches,
                              kpd_batch_size)
    perm = np.random.default_rng(seed).permutation(n_real)
    half = n_real // 2
    ia, ib = perm[:half], perm[half:2 * half]

    # per-jet features, computed once
    graphs = tuple(EFP_D4_GRAPHS) + tuple(PRIME_EFP_N4_D4)
    n_d4 = len(EFP_D4_GRAPHS)
    efp_r, efp_g = efps(xr, mr, graphs), efps(xg, mg, graphs)
    mass_r, mass_g = jet_mass(xr, mr)[:, None], jet_mass(xg, mg)[:, None]
    vr, vg = _valid_particles(xr, mr), _valid_particles(xg, mg)

    args = (num_eval_samples, num_batches)

    def w1_pair(fr: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (_w1_feature_batches(fr, fg, *args, np.random.default_rng(seed)),
                _w1_feature_batches(fr[ia], fr[ib], *args, np.random.default_rng(seed)))

    val, flo = w1_pair(mass_r, mass_g)
    _put(out, "w1m", val[:, 0], flo[:, 0])

    val = _w1_particle_batches(xr, vr, xg, vg, *args, np.random.default_rng(seed))
    flo = _w1_particle_batches(xr[ia], vr[ia], xr[ib], vr[ib], *args, np.random.default_rng(seed))
    for f, name in enumerate(PARTICLE_FEATURE_NAMES):
        _put(out, f"w1p_{name}", val[:, f], flo[:, f])
    _put(out, "w1p_mean", val.mean(axis=1), flo.mean(axis=1))

    val, flo = w1_pair(efp_r[:, n_d4:], efp_g[:, n_d4:])
    for f in range(val.shape[1]):
        _put(out, f"w1efp_{f}", val[:, f], flo[:, f])
    _put(out, "w1efp_mean", val.mean(axis=1), flo.mean(axis=1))

    feat_r, feat_g = efp_r[:, :n_d4], efp_g[:, :n_d4]
    fpd_args = dict(min_samples=fpd_min_samples, max_samples=fpd_max_samples,
                    num_batches=fpd_num_batches, num_points=fpd_num_points, seed=seed)
    out["fpd"], out["fpd_err"] = fpd(feat_r, feat_g, **fpd_args)
    out["fpd_floor"], out["fpd_floor_err"] = fpd(feat_r[ia], feat_r[ib], **fpd_args)

    kpd_args = dict(num_batches=kpd_num_batches, batch_size=kpd_batch_size, seed=seed)
    out["kpd"], out["kpd_err"] = kpd(feat_r, feat_g, **kpd_args)
    out["kpd_floor"], out["kpd_floor_err"] = kpd(feat_r[ia], feat_r[ib], **kpd_args)
    return out
