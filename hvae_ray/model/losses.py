"""Reconstruction terms, KL and KL schedules: pure functions of tensors and the epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from hvae_ray.config import COMPONENTS, OBJECTIVE_COMPONENTS, Config


def kl_weight(epoch: int, cfg: Config) -> float:
    """KL weight β at (0-based) ``epoch``.

    linear:   β(e) = max(kl_min_weight, kl_max_weight · min(1, e / kl_warmup_epochs));
              with the defaults 1e-5 at e=10, 5e-5 at e=50 and 1e-4 from e=100 on.
    cyclical: the same ramp restarted ``kl_cycles`` times over ``epochs``, each cycle ramping for the
              first ``kl_cycle_ramp`` of its length and then holding the cap (Fu et al., "Cyclical
              Annealing Schedule", NAACL 2019, arXiv:1903.10145).
    """
    if cfg.kl_schedule == "cyclical":
        period = max(1.0, cfg.epochs / cfg.kl_cycles)
        phase = (epoch % period) / period
        ramp = min(1.0, phase / cfg.kl_cycle_ramp)
    elif cfg.kl_warmup_epochs == 0:
        ramp = 1.0
    else:
        ramp = min(1.0, epoch / cfg.kl_warmup_epochs)
    return max(cfg.kl_min_weight, cfg.kl_max_weight * ramp)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per jet and latent dimension, nats.  (B, Z) → (B, Z)"""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float | torch.Tensor = 0.0,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over jets of the KL summed over latent dimensions (nats per jet).

    With ``free_bits`` λ > 0 each dimension's batch-mean KL is floored at λ before summing
    (Kingma et al., "Improved Variational Inference with Inverse Autoregressive Flow", 2016), so the
    optimiser gains nothing from pushing a dimension below λ nats: a guard against posterior collapse.
    ``weight`` (B,): 1 for a jet, 0 for a padding jet of a fixed-size batch (None: all jets count).
    """
    kl = kl_per_dim(mu.float(), logvar.float())  # (B, Z)
    if weight is None:
        kl = kl.mean(dim=0)  # (Z,)
    else:
        w = weight.float()
        kl = (kl * w[:, None]).sum(dim=0) / w.sum().clamp(min=1)
    if torch.is_tensor(free_bits):  # one value per population member (0: no floor)
        kl = torch.where(free_bits > 0, torch.maximum(kl, free_bits), kl)
    elif free_bits > 0:
        kl = torch.clamp(kl, min=free_bits)
    return kl.sum()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the rows where ``mask`` is True (all rows when None)."""
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)
    if mask is None:
        return err.mean()
    return (err * mask).sum() / mask.sum().clamp(min=1)


def topology_loss(exist_logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Binary cross-entropy of the per-slot existence logits against the true mask.  (B, P), (B, P)

    The mask fixes the multiplicity (its sum) and, since slots are pT-ordered, which particles exist.
    ``weight`` (B,) leaves padding jets (weight 0) of a fixed-size batch out of the mean.
    """
    if weight is None:
        return F.binary_cross_entropy_with_logits(exist_logits.float(), mask.float())
    bce = F.binary_cross_entropy_with_logits(exist_logits.float(), mask.float(), reduction="none")  # (B, P)
    w = weight.float()
    return (bce * w[:, None]).sum() / (w.sum() * bce.shape[1]).clamp(min=1)


def total_loss(terms: dict[str, torch.Tensor], kl: torch.Tensor, beta: float, cfg: Config) -> torch.Tensor:
    """Σ_c w_c · L_c + β · KL with the config's loss weights."""
    return weighted_loss(terms, kl, beta, {c: getattr(cfg.loss_weights, c) for c in COMPONENTS})


def weighted_loss(terms: dict[str, torch.Tensor], kl: torch.Tensor, beta: float | torch.Tensor,
                  weights: Mapping[str, float | torch.Tensor]) -> torch.Tensor:
    """Σ_c w_c · L_c + β · KL; β and the weights may be tensors (a population member's, under ``vmap``)."""
    loss = beta * kl
    for c in COMPONENTS:
        loss = loss + weights[c] * terms[c]
    return loss


def objective(recon: dict[str, float], kl: float, cfg: Config) -> float:
    """Weight-independent score: Σ_c L_c (unweighted, c in ``OBJECTIVE_COMPONENTS``) + objective_kl_weight · KL.

    Loss weights rescale the total loss, so ranking trials on it rewards small weights. This sum of the
    unweighted terms at a fixed KL weight compares trials with different weights and KL schedules.
    """
    value = sum(recon[c] for c in OBJECTIVE_COMPONENTS) + cfg.objective_kl_weight * kl
    return value if math.isfinite(value) else math.inf


def chamfer_distance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Symmetric Chamfer distance between the predicted and the true particles of each jet, per feature.

    pred, target: (B, P, F); mask: (B, P) bool, the real particles (the first n slots of a jet with n
    particles; the decoder's first n slots are its prediction of them). Each real particle's squared
    distance to the nearest one of the other set, both ways, averaged over all real particles of the
    batch and the F features (so it is on the scale of :func:`masked_mse`). Permutation-invariant: a
    decoder is not asked to put soft particles of similar pT in pT order (Fan, Su, Guibas, CVPR 2017).
    """
    d = _pair_cost(pred, target)  # (B, P, P) [predicted i, true j]
    pair = mask[:, :, None] & mask[:, None, :]
    d = d.masked_fill(~pair, torch.finfo(d.dtype).max)
    m = mask.float()
    to_true = (d.amin(dim=2).clamp(max=1e6) * m).sum()
    to_pred = (d.amin(dim=1).clamp(max=1e6) * m).sum()
    return 0.5 * (to_true + to_pred) / (m.sum() * pred.shape[-1]).clamp(min=1)


def sinkhorn_distance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, epsilon: float = 0.02,
                      iterations: int = 40) -> torch.Tensor:
    """Entropic optimal-transport matching cost between the predicted and the true particles, per feature.

    Each jet's n predicted particles (its first n slots) and its n true particles carry mass 1/n each;
    the transport plan of the entropy-regularised problem (Cuturi, NeurIPS 2013), found by
    ``iterations`` log-domain Sinkhorn updates at ``epsilon`` (in the units of the squared normalised
    features), is held fixed and the loss is Σ_ij P_ij C_ij: a soft one-to-one matching, where Chamfer
    lets several predictions share one particle. Fixed iteration count: no host synchronisation, so
    the step can be captured in a CUDA graph. Averaged as :func:`chamfer_distance`.
    """
    cost = _pair_cost(pred, target)  # (B, P, P)
    pair = mask[:, :, None] & mask[:, None, :]
    m = mask.float()
    n = m.sum(dim=1, keepdim=True)  # (B, 1)
    log_w = torch.where(mask, -torch.log(n.clamp(min=1)), torch.full_like(m, -1e9))  # (B, P) log 1/n
    with torch.no_grad():
        k = torch.where(pair, -cost.detach() / epsilon, torch.full_like(cost, -1e9))
        f = torch.zeros_like(m)
        g = torch.zeros_like(m)
        for _ in range(iterations):
            f = log_w - torch.logsumexp(k + g[:, None, :], dim=2)
            g = log_w - torch.logsumexp(k + f[:, :, None], dim=1)
        plan = torch.exp(k + f[:, :, None] + g[:, None, :]) * pair  # (B, P, P), rows and columns sum to 1/n
    per_jet = (plan * cost).sum(dim=(1, 2))  # mean matched squared distance per particle
    return (per_jet * n[:, 0]).sum() / (m.sum() * pred.shape[-1]).clamp(min=1)


def marginal_distance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared 1-D Wasserstein-2 distance between the batch's pooled predicted and true particle features,
    per feature, averaged as :func:`masked_mse`.

    pred, target: (B, P, F); mask: (B, P) bool, the real particles (each jet's first n slots stand for
    its n particles). Each feature of all real particles of the batch is sorted, predicted and true
    alike, and the k-th smallest prediction is compared with the k-th smallest true value: in one
    dimension that pairing is the optimal transport plan. Per-jet terms fit each jet's particles to
    their conditional mean given the code, which pulls the particles a code cannot place towards the
    jet axis; this term asks for the marginal distributions themselves, which W1p measures. Masked
    entries sort last in both sets (the same count), so the shapes stay static for a CUDA graph.
    """
    fill = torch.finfo(torch.float32).max
    p = pred.float().masked_fill(~mask[..., None], fill).flatten(0, 1)  # (B·P, F)
    t = target.float().masked_fill(~mask[..., None], fill).flatten(0, 1)
    n_real = mask.sum()
    first = torch.arange(p.shape[0], device=p.device)[:, None] < n_real  # the real values sort first
    diff = torch.where(first, torch.sort(p, dim=0).values - torch.sort(t, dim=0).values, 0.0)
    return diff.pow(2).sum() / (n_real * p.shape[-1]).clamp(min=1)


def _pair_cost(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, P, F), (B, P, F) → (B, P, P) squared Euclidean distances [pred i, target j], float32."""
    return (pred.float()[:, :, None, :] - target.float()[:, None, :, :]).pow(2).sum(dim=-1)


def particle_term(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """The particle-feature term of ``kind`` (:data:`~hvae_ray.config.PARTICLE_LOSSES`): 'slot' compares
    slot i with the i-th hardest particle (:func:`masked_mse`), 'chamfer' and 'sinkhorn' match sets."""
    if kind == "chamfer":
        return chamfer_distance(pred, target, mask)
    if kind == "sinkhorn":
        return sinkhorn_distance(pred, target, mask)
    return masked_mse(pred, target, mask)


def jet_observables(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln m, ln Σ pT_rel) of each jet from normalised node features x (B, P, 3) over ``mask`` (B, P).

    ``mean``, ``std`` (3,) undo the node normalisation to (η_rel, φ_rel, ln pT_rel). The relative mass
    of massless particles is m² = Σ_ij pT_i pT_j (cosh Δη_ij − cos Δφ_ij), which has no cancellation.
    """
    raw = x.float() * std + mean
    eta, phi = raw[..., 0], raw[..., 1]
    pt = torch.exp(raw[..., 2].clamp(max=5.0)) * mask  # (B, P)
    deta = (eta[:, :, None] - eta[:, None, :]).clamp(-10.0, 10.0)
    dphi = phi[:, :, None] - phi[:, None, :]
    m2 = (pt[:, :, None] * pt[:, None, :] * (torch.cosh(deta) - torch.cos(dphi))).sum(dim=(1, 2))
    return 0.5 * torch.log(m2.clamp(min=0) + 1e-12), torch.log(pt.sum(dim=1) + 1e-12)


def jet_term(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, node_stats, weight=None
             ) -> torch.Tensor:
    """Jet-level term: (Δ ln m)² + (Δ ln Σ pT_rel)² between each jet and its reconstruction from the same
    slots, averaged over jets with at least two particles (weight 0 jets excluded).

    Slot-wise and set losses score particles one at a time; a jet's mass is a sum over its pairs, so
    small errors that all pull soft particles towards the axis add up to a mass that is too low. This
    term asks for the mass and the pT sum directly (unit-free: log ratios).
    """
    mean, std = node_stats
    m_hat, s_hat = jet_observables(pred, mask, mean, std)
    m_true, s_true = jet_observables(target, mask, mean, std)
    keep = (mask.sum(dim=1) >= 2).float()
    if weight is not None:
        keep = keep * weight.float()
    per_jet = (m_hat - m_true).pow(2) + (s_hat - s_true).pow(2)
    return (per_jet * keep).sum() / keep.sum().clamp(min=1)


def reconstruction_terms(dec, tgt, node_stats, particle_loss: str = "slot") -> dict[str, torch.Tensor]:
    """The unweighted reconstruction terms (:data:`~hvae_ray.config.COMPONENTS`) of a decoded batch
    against its dense targets.

    ``dec`` is a :class:`~hvae_ray.model.hypervae.Decoded`, ``tgt`` a :class:`~hvae_ray.model.hypervae.Targets`:
    particle features over real slots (:func:`particle_term`), edge features over real pairs,
    hyperedge features over real groups, the existence mask over all slots, the jet mass and pT sum
    (:func:`jet_term`; ``node_stats`` = the node normaliser's (mean, std) on the device), and the batch's
    particle-feature marginals (:func:`marginal_distance`).
    """
    b, i, j = tgt.edge_slots
    hb, hc = tgt.hyper_slots
    return {
        "particle_features": particle_term(dec.particles, tgt.particles, tgt.mask, particle_loss),
        "edge_features": masked_mse(dec.edges[b, i, j], tgt.edges),
        "hyperedge_features": masked_mse(dec.hyperedges[hb, hc], tgt.hyperedges),
        "topology": topology_loss(dec.exist_logits, tgt.mask),
        "jet_features": jet_term(dec.particles, tgt.particles, tgt.mask, node_stats),
        "particle_marginals": marginal_distance(dec.particles, tgt.particles, tgt.mask),
    }


def dense_reconstruction_terms(dec, batch, node_stats, particle_loss: str = "slot") -> dict[str, torch.Tensor]:
    """The terms of :func:`reconstruction_terms` against a :class:`~hvae_ray.data.dense.DenseBatch`:
    real slots, real pairs (i ≠ j) and real groups selected by masks instead of index lists, so the
    shapes are static; padding jets (weight 0) count in no term."""
    return {
        "particle_features": particle_term(dec.particles, batch.x, batch.mask, particle_loss),
        "edge_features": masked_mse(dec.edges, batch.edges, batch.pair_mask),
        "hyperedge_features": masked_mse(dec.hyperedges, batch.hyperedges, batch.mask),
        "topology": topology_loss(dec.exist_logits, batch.mask, batch.weight),
        "jet_features": jet_term(dec.particles, batch.x, batch.mask, node_stats, batch.weight),
        "particle_marginals": marginal_distance(dec.particles, batch.x, batch.mask),
    }
