"""KL schedules, KL divergence with free bits, masked reconstruction terms and the weight-free objective."""

from __future__ import annotations

import math

import pytest
import torch

from hvae_ray.config import COMPONENTS, OBJECTIVE_COMPONENTS, Config
from hvae_ray.model.losses import (
    kl_divergence,
    kl_per_dim,
    kl_weight,
    masked_mse,
    objective,
    topology_loss,
    total_loss,
)

# ---------------------------------------------------------------------------------------------------------
# KL weight schedule


@pytest.mark.parametrize("epoch, expected", [
    (0, 1e-5),     # the floor: kl_max_weight * 0 is below kl_min_weight
    (1, 1e-5),
    (10, 1e-5),    # 1e-4 * 10/100 = 1e-5
    (20, 2e-5),
    (50, 5e-5),
    (99, 9.9e-5),
    (100, 1e-4),   # the cap
    (250, 1e-4),
    (10_000, 1e-4),
])
def test_linear_schedule_with_defaults(epoch, expected):
    assert kl_weight(epoch, Config()) == pytest.approx(expected, rel=1e-12)


def test_linear_schedule_is_monotone_and_bounded():
    cfg = Config()
    values = [kl_weight(e, cfg) for e in range(cfg.epochs)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert min(values) == cfg.kl_min_weight
    assert max(values) == cfg.kl_max_weight


def test_the_weight_ramps_over_the_warmup_and_reaches_the_cap_at_its_end():
    """The weight climbs linearly from the floor to the cap over kl_warmup_epochs (not capped after
    one epoch, as ``min(kl_max_weight, epoch / kl_warmup_epochs)`` would be)."""
    cfg = Config().with_overrides({"kl_warmup_epochs": 40, "kl_min_weight": 0.0, "kl_max_weight": 1e-3})
    assert kl_weight(1, cfg) == pytest.approx(1e-3 / 40)
    assert kl_weight(20, cfg) == pytest.approx(1e-3 / 2)
    assert kl_weight(39, cfg) < 1e-3 == kl_weight(40, cfg) == kl_weight(41, cfg)


def test_zero_warmup_gives_the_cap_immediately():
    cfg = Config().with_overrides({"kl_warmup_epochs": 0})
    assert kl_weight(0, cfg) == cfg.kl_max_weight
    assert kl_weight(5, cfg) == cfg.kl_max_weight


def test_zero_floor_starts_at_zero():
    cfg = Config().with_overrides({"kl_min_weight": 0.0})
    assert kl_weight(0, cfg) == 0.0
    assert kl_weight(50, cfg) == pytest.approx(5e-5)


def test_cyclical_schedule_restarts_every_cycle():
    cfg = Config().with_overrides({"kl_schedule": "cyclical", "epochs": 40, "kl_cycles": 4,
                                   "kl_cycle_ramp": 0.5})
    period = 10
    values = [kl_weight(e, cfg) for e in range(cfg.epochs)]
    for c in range(cfg.kl_cycles):
        cycle = values[c * period:(c + 1) * period]
        assert cycle[0] == cfg.kl_min_weight                      # each cycle starts at the floor
        assert max(cycle) == pytest.approx(cfg.kl_max_weight)     # and reaches the cap
        assert cycle[period // 2] == pytest.approx(cfg.kl_max_weight)   # cap after the ramp fraction
        assert cycle[-1] == pytest.approx(cfg.kl_max_weight)      # and holds it to the end of the cycle
        assert all(b >= a for a, b in zip(cycle, cycle[1:]))     # monotone within a cycle
    assert values[period] < values[period - 1]                   # the restart: a drop back to the floor
    assert values[2] == pytest.approx(cfg.kl_max_weight * 2 / 5)  # linear ramp over 5 epochs


def test_cyclical_schedule_with_full_ramp():
    cfg = Config().with_overrides({"kl_schedule": "cyclical", "epochs": 20, "kl_cycles": 2,
                                   "kl_cycle_ramp": 1.0, "kl_min_weight": 0.0})
    assert kl_weight(5, cfg) == pytest.approx(cfg.kl_max_weight / 2)
    assert kl_weight(10, cfg) == 0.0
    assert kl_weight(15, cfg) == pytest.approx(cfg.kl_max_weight / 2)


# ---------------------------------------------------------------------------------------------------------
# KL divergence


def test_kl_of_standard_normal_posterior_is_zero():
    mu, logvar = torch.zeros(5, 3), torch.zeros(5, 3)
    assert kl_divergence(mu, logvar).item() == 0.0
    assert torch.equal(kl_per_dim(mu, logvar), torch.zeros(5, 3))


def test_kl_analytic_value():
    # KL(N(mu, s^2) || N(0, 1)) = 0.5 (mu^2 + s^2 - 1 - ln s^2) per dimension.
    mu = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    logvar = torch.tensor([[math.log(4.0), 0.0], [math.log(0.25), 0.0]])
    jet0 = 0.5 * (1 + 4 - 1 - math.log(4.0)) + 0.5 * (4 + 1 - 1 - 0)
    jet1 = 0.5 * (0 + 0.25 - 1 - math.log(0.25)) + 0.5 * (1 + 1 - 1 - 0)
    assert kl_divergence(mu, logvar).item() == pytest.approx((jet0 + jet1) / 2, rel=1e-6)
    assert kl_per_dim(mu, logvar)[0, 0].item() == pytest.approx(0.5 * (4 - math.log(4.0)), rel=1e-6)


def test_kl_is_non_negative():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(64, 8, generator=g) * 3, torch.randn(64, 8, generator=g) * 3
    assert (kl_per_dim(mu, logvar) >= 0).all()


def test_free_bits_floor_each_dimension():
    # Per-dimension batch-mean KL: dim 0 -> 0, dim 1 -> 0.5 * 0.04 = 0.02, dim 2 -> 0.5 * 9 = 4.5.
    mu = torch.tensor([[0.0, 0.2, 3.0]])
    logvar = torch.zeros(1, 3)
    assert kl_divergence(mu, logvar).item() == pytest.approx(4.52, rel=1e-6)
    # λ = 0.5 lifts dims 0 and 1 to 0.5 each, leaves dim 2 alone.
    assert kl_divergence(mu, logvar, free_bits=0.5).item() == pytest.approx(0.5 + 0.5 + 4.5, rel=1e-6)


def test_free_bits_remove_the_gradient_below_the_floor():
    mu = torch.tensor([[0.2, 3.0]], requires_grad=True)
    logvar = torch.zeros(1, 2, requires_grad=True)
    kl_divergence(mu, logvar, free_bits=0.5).backward()
    assert mu.grad[0, 0].item() == 0.0   # below λ: the optimiser gains nothing
    assert mu.grad[0, 1].item() == pytest.approx(3.0)   # above λ: d/dmu 0.5 mu^2 = mu


def test_free_bits_is_floored_on_the_batch_mean_not_per_jet():
    # Two jets: dim KL 0 and 2 (mean 1) -> with λ = 0.5 the mean (1.0) is above the floor: unchanged.
    mu = torch.tensor([[0.0], [2.0]])
    logvar = torch.zeros(2, 1)
    assert kl_divergence(mu, logvar, free_bits=0.5).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# Reconstruction terms


def test_masked_mse_ignores_masked_rows():
    pred = torch.tensor([[[1.0, 1.0], [100.0, -50.0], [3.0, 3.0]]])
    target = torch.zeros(1, 3, 2)
    mask = torch.tensor([[True, False, True]])
    # Rows 0 and 2: per-row means 1 and 9 -> 5.
    assert masked_mse(pred, target, mask).item() == pytest.approx(5.0)
    changed = pred.clone()
    changed[0, 1] = 1e6
    assert masked_mse(changed, target, mask).item() == pytest.approx(5.0)


def test_masked_mse_without_mask_averages_every_row():
    pred = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    assert masked_mse(pred, torch.zeros(2, 2)).item() == pytest.approx(5.0)


def test_masked_mse_with_nothing_unmasked_is_zero_not_nan():
    out = masked_mse(torch.ones(2, 3, 3), torch.zeros(2, 3, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert out.item() == 0.0


def test_topology_loss_rewards_the_right_mask():
    mask = torch.tensor([[True, True, False, False]])
    right = torch.tensor([[8.0, 8.0, -8.0, -8.0]])
    assert topology_loss(right, mask).item() < 1e-3
    assert topology_loss(-right, mask).item() > 5.0


# ---------------------------------------------------------------------------------------------------------
# Total loss and objective


VALUES = (0.4, 0.3, 0.2, 0.1, 0.05, 0.07)


def _terms(values=VALUES) -> dict[str, torch.Tensor]:
    assert len(values) == len(COMPONENTS)
    return {c: torch.tensor(v) for c, v in zip(COMPONENTS, values, strict=True)}


def test_total_loss_is_the_weighted_sum_plus_beta_kl():
    cfg = Config()  # jet_features and particle_marginals have weight 0 by default
    loss = total_loss(_terms(), torch.tensor(10.0), 1e-3, cfg)
    expected = 1.0 * 0.4 + 0.5 * 0.3 + 0.3 * 0.2 + 0.1 * 0.1 + 0.0 * 0.05 + 0.0 * 0.07 + 1e-3 * 10.0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    jet = cfg.with_overrides({"loss_weights.jet_features": 2.0})
    loss = total_loss(_terms(), torch.tensor(10.0), 1e-3, jet)
    assert loss.item() == pytest.approx(expected + 2.0 * 0.05, rel=1e-6)
    both = jet.with_overrides({"loss_weights.particle_marginals": 3.0})
    loss = total_loss(_terms(), torch.tensor(10.0), 1e-3, both)
    assert loss.item() == pytest.approx(expected + 2.0 * 0.05 + 3.0 * 0.07, rel=1e-6)


def test_objective_does_not_depend_on_loss_weights_or_schedule():
    recon = {c: float(v) for c, v in zip(COMPONENTS, VALUES, strict=True)}
    base = Config()
    other = base.with_overrides({"loss_weights.particle_features": 0.01, "loss_weights.edge_features": 3.0,
                                 "loss_weights.topology": 0.0, "loss_weights.jet_features": 1.0,
                                 "loss_weights.particle_marginals": 2.0,
                                 "kl_max_weight": 1e-2, "kl_schedule": "cyclical"})
    # The total loss does change with the weights ...
    kl = torch.tensor(10.0)
    assert total_loss(_terms(), kl, 1e-3, base).item() != pytest.approx(total_loss(_terms(), kl, 1e-3, other).item())
    # ... the objective does not.
    assert objective(recon, 10.0, base) == objective(recon, 10.0, other)
    # the jet and marginal terms (the last two values) are reported but not part of the objective
    assert objective(recon, 10.0, base) == pytest.approx(sum(VALUES[:4]) + base.objective_kl_weight * 10.0)
    assert {"jet_features", "particle_marginals"}.isdisjoint(OBJECTIVE_COMPONENTS) and len(OBJECTIVE_COMPONENTS) == 4


def test_objective_uses_its_own_kl_weight():
    recon = dict.fromkeys(COMPONENTS, 0.0)
    cfg = Config().with_overrides({"objective_kl_weight": 0.5})
    assert objective(recon, 4.0, cfg) == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_objective_of_a_diverged_run_is_inf(bad):
    recon = dict.fromkeys(COMPONENTS, 0.1)
    assert objective(recon, bad, Config()) == math.inf
    recon["topology"] = bad
    assert objective(recon, 1.0, Config()) == math.inf
