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

from functools import lru_cache

import numpy as np
import torch
from torch_geometric.data import Data

from hvae_ray.data.dense import (  # noqa: F401
    EDGE_FEATURES,
    HYPEREDGE_FEATURES,
    LOG_EPS,
    DenseBatch,
    FeatureNormaliser,
    RawFeatures,
    delta_phi,
    group_features,
    knn_groups,
    node_features,
    pairwise_features,
    raw_features,
)

# The feature definitions live in the PyG-free module that training uses; re-exported here.
from hvae_ray.data.jets import MAX_PARTICLES


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


def dense_from_pyg(batch, num_slots: int = MAX_PARTICLES) -> DenseBatch:
    """A PyG batch of :class:`JetHypergraph` (features already normalised) → the :class:`DenseBatch` of
    the same jets: slot = node index within its jet, hyperedge m of a jet = the group centred on node m."""
    from torch_geometric.utils import to_dense_batch

    b, dev = batch.num_graphs, batch.x.device
    x, mask = to_dense_batch(batch.x, batch.batch, max_num_nodes=num_slots, batch_size=b)
    local = torch.arange(batch.num_nodes, device=dev) - batch.ptr[batch.batch]  # (N,)
    src, dst = batch.edge_index
    jet = batch.batch[src]
    edges = torch.zeros(b, num_slots, num_slots, batch.edge_attr.shape[-1], dtype=x.dtype, device=dev)
    edges[jet, local[src], local[dst]] = batch.edge_attr
    pair_mask = torch.zeros(b, num_slots, num_slots, dtype=torch.bool, device=dev)
    pair_mask[jet, local[src], local[dst]] = True
    centres = torch.arange(batch.hyperedge_attr.shape[0], device=dev)  # hyperedge id = its centre's node id
    hyper = torch.zeros(b, num_slots, batch.hyperedge_attr.shape[-1], dtype=x.dtype, device=dev)
    hyper[batch.batch[centres], local[centres]] = batch.hyperedge_attr
    members, groups = batch.hyperedge_index
    incidence = torch.zeros(b, num_slots, num_slots, dtype=torch.bool, device=dev)
    incidence[batch.batch[members], local[members], local[groups]] = True
    return DenseBatch(x, mask, edges, pair_mask, hyper, incidence, torch.ones(b, dtype=x.dtype, device=dev))
