"""Reconstruction terms, KL and KL schedules: pure functions of tensors and the epoch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hvae_ray.config import COMPONENTS, Config


def kl_weight(epoch: int, cfg: Config) -> float:
    """KL weight β at (0-based) ``epoch``.

    linear:   β(e) = max(kl_divergence, kl_max_weight · min(1, e / kl_warmup_epochs));
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
    return max(cfg.kl_divergence, cfg.kl_max_weight * ramp)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per jet and latent dimension, nats.  (B, Z) → (B, Z)"""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0,
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
    if free_bits > 0:
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
    loss = beta * kl
    for c in COMPONENTS:
        loss = loss + getattr(cfg.loss_weights, c) * terms[c]
    return loss


def objective(recon: dict[str, float], kl: float, cfg: Config) -> float:
    """Weight-independent score: Σ_c L_c (unweighted) + objective_kl_weight · KL.

    Loss weights rescale the total loss, so ranking trials on it rewards small weights. This sum of the
    unweighted terms at a fixed KL weight compares trials with different weights and KL schedules.
    """
    value = sum(recon[c] for c in COMPONENTS) + cfg.objective_kl_weight * kl
    return value if math.isfinite(value) else math.inf


def reconstruction_terms(dec, tgt) -> dict[str, torch.Tensor]:
    """The four unweighted reconstruction terms of a decoded batch against its dense targets.

    ``dec`` is a :class:`~hvae_ray.model.hypervae.Decoded`, ``tgt`` a :class:`~hvae_ray.model.hypervae.Targets`:
    particle features over real slots, edge features over real pairs, hyperedge features over real
    groups, and the existence mask over all slots.
    """
    b, i, j = tgt.edge_slots
    hb, hc = tgt.hyper_slots
    return {
        "particle_features": masked_mse(dec.particles, tgt.particles, tgt.mask),
        "edge_features": masked_mse(dec.edges[b, i, j], tgt.edges),
        "hyperedge_features": masked_mse(dec.hyperedges[hb, hc], tgt.hyperedges),
        "topology": topology_loss(dec.exist_logits, tgt.mask),
    }


def dense_reconstruction_terms(dec, batch) -> dict[str, torch.Tensor]:
    """The four terms of :func:`reconstruction_terms` against a :class:`~hvae_ray.data.dense.DenseBatch`:
    real slots, real pairs (i ≠ j) and real groups selected by masks instead of index lists, so the
    shapes are static; padding jets (weight 0) count in no term."""
    return {
        "particle_features": masked_mse(dec.particles, batch.x, batch.mask),
        "edge_features": masked_mse(dec.edges, batch.edges, batch.pair_mask),
        "hyperedge_features": masked_mse(dec.hyperedges, batch.hyperedges, batch.mask),
        "topology": topology_loss(dec.exist_logits, batch.mask, batch.weight),
    }
