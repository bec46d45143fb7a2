"""Jet observables the generation metrics are built on: the relative jet mass and energy flow
polynomials (EFPs), in plain numpy, with jetnet 0.2.5's conventions.

Inputs are padded particle arrays as in JetNet (Kansal et al., arXiv:2106.11535):
``particles`` of shape (N, P, 3) = (η_rel, φ_rel, pT_rel) with η_rel = η − η_jet, φ_rel = φ − φ_jet [rad]
and pT_rel = pT / pT_jet, and an optional boolean ``mask`` of shape (N, P), True for real particles.
When ``mask`` is None a particle is padding iff all three of its features are exactly 0 (the JetNet
convention). All returned observables are dimensionless (relative to the jet pT).

Energy flow polynomials follow Komiske, Metodiev and Thaler, "Energy flow polynomials: a complete
linear basis for jet substructure", JHEP 04 (2018) 013, arXiv:1712.07124, with jetnet's choices:
hadronic measure, β = 1, and energy fractions z_i = pT_rel,i *as given* (not renormalised over the
kept particles), in energyflow's column order. ``tests/evaluation/test_jetnet_parity.py`` holds them
to energyflow's own numbers on the same jets.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["EFP_D4_GRAPHS", "PRIME_EFP_N4_D4", "as_particles", "efps", "jet_mass"]

Edge = tuple[int, int]
Graph = tuple[Edge, ...]

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


def as_particles(particles: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
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


def _abs_dphi(dphi):
    """|Δφ| of an angle difference, wrapped into [0, π] (energyflow's: π − ||Δφ| − π|, mod 2π)."""
    return np.pi - abs(abs(dphi) % (2 * np.pi) - np.pi)  # numpy arrays or torch tensors



def jet_mass(particles: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Relative jet mass m / pT_jet, from the sum of massless particle four-vectors.

    Each particle is a massless four-vector built from (pT_rel, η_rel, φ_rel):
    p = pT_rel · (cosh η_rel, cos φ_rel, sin φ_rel, sinh η_rel); the mass of their sum is in units of
    the jet pT (the notes' definition, as jetnet's ``jet_features``). The mass is invariant under a
    common shift of η_rel (a longitudinal boost) and of φ_rel (a rotation).

    particles: (N, P, 3) = (η_rel, φ_rel, pT_rel); mask: (N, P) bool or None.
    Returns (N,) float64, dimensionless, ≥ 0 (a negative m² from rounding is clipped to 0).
    """
    x, _ = as_particles(particles, mask)
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


def _connected_efp(graph: Graph, z, theta_pow: dict, einsum=None):
    """EFP of one connected graph for a chunk of jets, by einsum over the particle indices.

    z: (n_jets, P); theta_pow[w]: (n_jets, P, P) = θ_ij^w, numpy arrays or torch tensors (then
    ``einsum`` is :func:`_torch_einsum`). Returns (n_jets,).
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
    if einsum is not None:
        return einsum(",".join(subs) + "->a", *operands)
    return np.einsum(",".join(subs) + "->a", *operands, optimize="greedy")


_PATHS: dict = {}


def _torch_einsum(subscripts: str, *operands):
    """``torch.einsum`` one pair of operands at a time along numpy's greedy contraction order (without
    a path, torch contracts left to right, and a 4-vertex EFP would build a (jets, P, P, P, P) array)."""
    import torch

    inputs, out = subscripts.split("->")
    subs = inputs.split(",")
    key = (subscripts, tuple(tuple(o.shape) for o in operands))
    if key not in _PATHS:  # numpy's planner reads shapes only: zero-stride views stand in for the arrays
        views = [np.broadcast_to(np.zeros(()), tuple(o.shape)) for o in operands]
        _PATHS[key] = np.einsum_path(subscripts, *views, optimize="greedy")[0][1:]
    ops = list(operands)
    for pair in _PATHS[key]:  # positions in the current list; the result goes to its end
        picked, picked_subs = [ops[i] for i in pair], [subs[i] for i in pair]
        for i in sorted(pair, reverse=True):
            del ops[i], subs[i]
        needed = set("".join(subs)) | set(out)
        result = "".join(dict.fromkeys(c for sub in picked_subs for c in sub if c in needed))
        ops.append(torch.einsum(",".join(picked_subs) + "->" + result, *picked))
        subs.append(result)
    return ops[0] if subs[0] == out else torch.einsum(f"{subs[0]}->{out}", ops[0])


def efps(
    particles: np.ndarray,
    mask: np.ndarray | None = None,
    graphs: Sequence[Sequence[tuple[int, int]]] = EFP_D4_GRAPHS,
    chunk_size: int = 2048,
    device=None,
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
    one-particle jet. ``device`` (a torch device, e.g. a GPU): compute there in float64 with torch, the
    same contractions (the per-epoch generation score does); None: numpy.
    """
    x, _ = as_particles(particles, mask)
    graphs = [tuple((int(a), int(b)) for a, b in g) for g in graphs]
    decomposed = [[_canonical(c) for c in _components(g)] for g in graphs]
    unique = sorted({c for comps in decomposed for c in comps}, key=lambda g: (len(g), g))
    col = {c: i for i, c in enumerate(unique)}
    n_jets = x.shape[0]
    values = np.empty((n_jets, len(unique)))
    max_w = max((max(_multiplicities(c).values(), default=1) for c in unique), default=1)
    einsum, xt = None, x
    if device is not None:  # values stay on the device until the end: one copy to the host, no sync per graph
        import torch

        einsum, xt = _torch_einsum, torch.as_tensor(x, device=device)
        values = torch.empty((n_jets, len(unique)), dtype=torch.float64, device=device)
    for start in range(0, n_jets, chunk_size):
        sl = slice(start, start + chunk_size)
        z = xt[sl, :, 2]  # pT_rel as given (jetnet's convention), 0 for padding
        deta = xt[sl, :, None, 0] - xt[sl, None, :, 0]
        dphi = _abs_dphi(xt[sl, :, None, 1] - xt[sl, None, :, 1])
        theta = (deta**2 + dphi**2) ** 0.5
        theta_pow = {1: theta}
        for w in range(2, max_w + 1):
            theta_pow[w] = theta_pow[w - 1] * theta
        for c, i in col.items():
            values[sl, i] = _connected_efp(c, z, theta_pow, einsum)
    values = values if einsum is None else values.cpu().numpy()
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
