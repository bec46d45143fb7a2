"""Set losses (Chamfer, Sinkhorn), the jet-level term and the config keys that choose them, on hand-built
jets with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from hvae_ray.config import OBJECTIVES, PARTICLE_LOSSES, from_dict
from hvae_ray.errors import ConfigError
from hvae_ray.evaluation.efp import jet_mass
from hvae_ray.model.losses import (
    chamfer_distance,
    jet_observables,
    jet_term,
    marginal_distance,
    masked_mse,
    particle_term,
    sinkhorn_distance,
)

EPS = 0.02  # sinkhorn_distance's default entropic ε


def t(rows) -> torch.Tensor:
    """One jet (P, F) → a batch of one (1, P, F), float32."""
    return torch.tensor(rows, dtype=torch.float32)[None]


def full_mask(p: int, b: int = 1) -> torch.Tensor:
    return torch.ones(b, p, dtype=torch.bool)


def assignment_cost(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The optimal one-to-one matching cost of one jet, averaged as the losses average it:
    Σ over matched pairs of the squared distance / (n · F)."""
    p, q = pred[0].double().numpy(), target[0].double().numpy()
    cost = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].sum() / (p.shape[0] * p.shape[1]))


@pytest.fixture(scope="module")
def separated():
    """A jet of 8 particles in 3 features, no two closer than 1 (squared distance ≥ 1 ≫ ε), and a
    permutation of it that moves every particle."""
    rng = np.random.default_rng(11)
    pts = np.stack(np.meshgrid([0.0, 1.5], [0.0, 1.5], [0.0, 1.5]), -1).reshape(8, 3)
    pts = pts + rng.uniform(-0.2, 0.2, pts.shape)
    perm = np.roll(np.arange(8), 3)
    return t(pts), t(pts[perm])


# ---------------------------------------------------------------------------------------------------------
# Chamfer


def test_chamfer_is_zero_for_a_permutation_where_the_slot_loss_is_not(separated):
    target, permuted = separated
    mask = full_mask(8)
    assert chamfer_distance(permuted, target, mask).item() == 0.0
    assert masked_mse(permuted, target, mask).item() > 0.5


def test_chamfer_hand_value_in_one_dimension():
    # d[i, j] = (p_i - t_j)²; nearest target of p = 0, 1, 6: 0, 1, 9 (sum 10);
    # nearest prediction of t = 0, 2, 3: 0, 1, 4 (sum 5) → 0.5 · (10 + 5) / (3 particles · 1 feature)
    pred, target = t([[0.0], [1.0], [6.0]]), t([[0.0], [2.0], [3.0]])
    assert chamfer_distance(pred, target, full_mask(3)).item() == pytest.approx(2.5, rel=1e-6)
    # not symmetric in its two directions' sums, but symmetric in its arguments
    assert chamfer_distance(target, pred, full_mask(3)).item() == pytest.approx(2.5, rel=1e-6)


def test_chamfer_hand_value_in_three_dimensions_averages_over_all_particles_of_the_batch():
    # Jet 0 (2 particles): d = [[1, 11], [2, 4]] → to_true 1 + 2 = 3, to_pred 1 + 4 = 5.
    # Jet 1 (1 particle, 1 padding slot): d = 1 → to_true 1, to_pred 1.
    # 0.5 · (4 + 6) / (3 real particles · 3 features) = 5/9 (a mean of per-jet means would be 1/2).
    pred = torch.tensor([[[0, 0, 0], [1, 1, 1]], [[1, 0, 0], [0, 0, 0]]], dtype=torch.float32)
    target = torch.tensor([[[0, 0, 1], [3, 1, 1]], [[0, 0, 0], [0, 0, 0]]], dtype=torch.float32)
    mask = torch.tensor([[True, True], [True, False]])
    assert chamfer_distance(pred[:1], target[:1], mask[:1]).item() == pytest.approx(8 / 12, rel=1e-6)
    assert chamfer_distance(pred, target, mask).item() == pytest.approx(5 / 9, rel=1e-6)


@pytest.mark.parametrize("fill", [0.0, 2.0, -1e3, 1e4])
def test_chamfer_ignores_padding_slots_whatever_they_hold(fill):
    pred, target = t([[0.0], [1.0], [6.0]]), t([[0.0], [2.0], [3.0]])
    mask = torch.tensor([[True, True, True, False, False]])
    # padding that would be a perfect match for p = 6 (fill 6) or t = 2 (fill 2) if it counted
    pad_p = torch.cat([pred, torch.tensor([[[fill], [2.0]]])], dim=1)
    pad_t = torch.cat([target, torch.tensor([[[6.0], [fill]]])], dim=1)
    assert chamfer_distance(pad_p, pad_t, mask).item() == pytest.approx(2.5, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Sinkhorn


def test_sinkhorn_is_near_zero_for_a_permutation(separated):
    target, permuted = separated
    mask = full_mask(8)
    value = sinkhorn_distance(permuted, target, mask).item()
    # squared distances between distinct particles ≥ 1 = 50 ε: the blur costs ~exp(-50), nothing
    assert 0.0 <= value < 1e-6
    assert masked_mse(permuted, target, mask).item() > 0.5


@pytest.mark.parametrize("pred_rows, target_rows", [
    ([[0.0], [1.0]], [[0.9], [0.1]]),                           # 1D: the crossed matching is the right one
    ([[0.0, 0.0, 0.0], [1.0, 0.5, -0.5]], [[1.1, 0.4, -0.3], [0.2, -0.1, 0.1]]),  # 3D, likewise
])
def test_sinkhorn_equals_the_optimal_assignment_and_beats_the_wrong_one(pred_rows, target_rows):
    pred, target = t(pred_rows), t(target_rows)
    mask = full_mask(2)
    f = pred.shape[-1]
    best = assignment_cost(pred, target)
    identity = float(((pred - target) ** 2).sum() / (2 * f))  # slot i ↔ particle i: the wrong matching
    crossed = float(((pred - target.flip(1)) ** 2).sum() / (2 * f))
    assert best == pytest.approx(crossed) and best < identity - 0.1  # the optimum is the crossed one
    value = sinkhorn_distance(pred, target, mask).item()
    assert value == pytest.approx(best, abs=1e-5)
    assert value < identity
    assert masked_mse(pred, target, mask).item() == pytest.approx(identity, rel=1e-6)


def test_sinkhorn_is_one_to_one_where_chamfer_shares_a_particle():
    # Both predictions sit on t = 0: Chamfer pays only for t = 1 being far (0.5 · 1 / 2), the matching
    # pays for sending one of them to t = 1 (1 / 2).
    pred, target = t([[0.0], [0.0]]), t([[0.0], [1.0]])
    mask = full_mask(2)
    assert chamfer_distance(pred, target, mask).item() == pytest.approx(0.25, rel=1e-6)
    assert sinkhorn_distance(pred, target, mask).item() == pytest.approx(0.5, abs=1e-5)


def test_sinkhorn_ignores_padding_slots_and_averages_over_all_particles():
    # jet 0: the 1D pair above (optimum 0.02 summed over particles); jet 1: one particle 0 ↔ 2 (cost 4)
    pred = torch.tensor([[[0.0], [1.0], [7.0]], [[0.0], [0.9], [0.1]]])
    target = torch.tensor([[[0.9], [0.1], [7.0]], [[2.0], [-3.0], [1.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    value = sinkhorn_distance(pred, target, mask).item()
    assert value == pytest.approx((0.02 + 4.0) / 3, abs=1e-5)


def test_sinkhorn_gradients_flow_to_pred_with_the_plan_held_fixed():
    pred = t([[0.0, 0.0, 0.0], [1.0, 0.5, -0.5], [5.0, 5.0, 5.0]]).requires_grad_(True)
    target = t([[1.1, 0.4, -0.3], [0.2, -0.1, 0.1], [-9.0, 9.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    sinkhorn_distance(pred, target, mask).backward()
    grad = pred.grad[0]
    assert torch.isfinite(grad).all()
    assert grad[:2].abs().sum() > 0
    assert (grad[2] == 0).all()  # a padding slot gets no gradient
    # With the plan fixed at the matching (mass 1/2 per pair), d/dp_i of Σ P_ij |p_i - t_j|² · n / (n F)
    # is (p_i - t_σ(i)) / F with σ the crossed matching.
    expected = (pred.detach()[0, :2] - target[0, :2].flip(0)) / 3
    torch.testing.assert_close(grad[:2], expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# particle_term


def test_particle_term_dispatches_to_the_three_kinds():
    # slot: (4 + 1 + 9) / 3; chamfer: 0.5 · (1 + 2) / 3; optimal matching: (0 + 1 + 1) / 3
    pred, target = t([[0.0], [0.0], [3.0]]), t([[2.0], [1.0], [0.0]])
    mask = full_mask(3)
    values = {kind: particle_term(pred, target, mask, kind).item() for kind in PARTICLE_LOSSES}
    assert set(values) == {"slot", "chamfer", "sinkhorn"}
    assert values["slot"] == pytest.approx(14 / 3, rel=1e-6)
    assert values["chamfer"] == pytest.approx(0.5, rel=1e-6)
    assert values["sinkhorn"] == pytest.approx(2 / 3, abs=1e-5)
    assert values["slot"] == masked_mse(pred, target, mask).item()
    assert values["chamfer"] == chamfer_distance(pred, target, mask).item()
    assert values["sinkhorn"] == sinkhorn_distance(pred, target, mask).item()


# ---------------------------------------------------------------------------------------------------------
# Jet observables and the jet term

PHYS = np.array([[0.1, -0.2, 0.6], [-0.3, 0.25, 0.4]])  # two massless particles (η_rel, φ_rel, pT_rel)


def as_nodes(phys: np.ndarray) -> torch.Tensor:
    """(..., P, 3) physical (η, φ, pT) → node features (η, φ, ln pT), float32."""
    x = np.array(phys, dtype=np.float64)
    x[..., 2] = np.log(x[..., 2])
    return torch.tensor(x, dtype=torch.float32)


IDENTITY = (torch.zeros(3), torch.ones(3))


def test_jet_mass_of_two_massless_particles_is_the_formula_and_physics_jet_mass():
    (eta1, phi1, pt1), (eta2, phi2, pt2) = PHYS
    m2 = 2 * pt1 * pt2 * (math.cosh(eta1 - eta2) - math.cos(phi1 - phi2))
    ln_m, ln_s = jet_observables(as_nodes(PHYS)[None], full_mask(2), *IDENTITY)
    assert ln_m.shape == ln_s.shape == (1,)
    assert ln_m.item() == pytest.approx(0.5 * math.log(m2), rel=1e-5)
    assert ln_m.item() == pytest.approx(math.log(jet_mass(PHYS[None], np.ones((1, 2), bool))[0]), rel=1e-5)
    assert ln_s.item() == pytest.approx(math.log(pt1 + pt2), abs=1e-6)


def test_jet_observables_undo_the_normalisation_and_ignore_padding():
    rng = np.random.default_rng(5)
    n, p = 6, 12
    phys = np.zeros((n, p, 3))
    mask = np.zeros((n, p), bool)
    for i, k in enumerate([2, 3, 5, 8, 12, 12]):
        phys[i, :k, :2] = rng.normal(0, 0.3, (k, 2))
        phys[i, :k, 2] = np.sort(rng.dirichlet(np.ones(k)))[::-1]
        phys[i, k:] = [3.0, -2.0, 50.0]  # padding slots: far away and hard, if they counted
        mask[i, :k] = True
    mean, std = torch.tensor([0.05, -0.02, -2.5]), torch.tensor([0.3, 0.25, 1.1])
    x = (as_nodes(phys) - mean) / std
    ln_m, ln_s = jet_observables(x, torch.from_numpy(mask), mean, std)
    expected_m = jet_mass(np.where(mask[..., None], phys, 0.0), mask)
    expected_s = (phys[..., 2] * mask).sum(1)
    np.testing.assert_allclose(ln_m.numpy(), np.log(expected_m), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ln_s.numpy(), np.log(expected_s), rtol=1e-4, atol=1e-5)


def jets_for_jet_term():
    """Three jets of 3 slots: two particles, three particles, one particle (+ padding)."""
    phys = np.array([
        [[0.1, -0.2, 0.6], [-0.3, 0.25, 0.4], [0.0, 0.0, 1.0]],
        [[0.05, 0.1, 0.5], [-0.2, -0.1, 0.3], [0.3, 0.2, 0.2]],
        [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],
    ])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    return as_nodes(phys), mask


def scaled(x: torch.Tensor, factors) -> torch.Tensor:
    """Every pT of jet b multiplied by factors[b] (ln pT shifted by ln c)."""
    out = x.clone()
    out[..., 2] += torch.log(torch.tensor(factors, dtype=torch.float32))[:, None]
    return out


def test_jet_term_is_zero_for_identical_jets():
    x, mask = jets_for_jet_term()
    assert jet_term(x, x.clone(), mask, IDENTITY).item() == 0.0


def test_jet_term_of_scaled_pt_is_twice_the_squared_log_factor():
    # m ∝ pT and Σ pT ∝ pT: scaling by c gives Δ ln m = Δ ln Σ pT = ln c, so (ln c)² + (ln c)².
    x, mask = jets_for_jet_term()
    two = mask[:2]
    value = jet_term(scaled(x[:2], [2.0, 2.0]), x[:2], two, IDENTITY).item()
    assert value == pytest.approx(2 * math.log(2.0) ** 2, rel=1e-4)
    # a mean over jets: (2 ln²2 + 2 ln²3) / 2
    value = jet_term(scaled(x[:2], [2.0, 1 / 3]), x[:2], two, IDENTITY).item()
    assert value == pytest.approx(math.log(2.0) ** 2 + math.log(3.0) ** 2, rel=1e-4)


def test_jet_term_ignores_weight_zero_jets_and_jets_of_fewer_than_two_particles():
    x, mask = jets_for_jet_term()
    # Jet 2 has one particle: its Σ pT is off by ln 5 (its mass is 0 either way), yet it does not count.
    pred = scaled(x, [2.0, 2.0, 5.0])
    assert jet_term(pred, x, mask, IDENTITY).item() == pytest.approx(2 * math.log(2.0) ** 2, rel=1e-4)
    # Jet 1 with weight 0 does not count either, however wrong it is.
    pred = scaled(x, [2.0, 100.0, 5.0])
    weight = torch.tensor([1.0, 0.0, 1.0])
    assert jet_term(pred, x, mask, IDENTITY, weight).item() == pytest.approx(2 * math.log(2.0) ** 2, rel=1e-4)
    assert jet_term(pred, x, mask, IDENTITY).item() > 10  # without the weight it does
    # No jet left: 0, not NaN.
    assert jet_term(pred, x, mask, IDENTITY, torch.tensor([0.0, 0.0, 1.0])).item() == 0.0


def test_jet_term_ignores_what_the_padding_slots_of_the_prediction_hold():
    x, mask = jets_for_jet_term()
    pred = scaled(x, [2.0, 2.0, 2.0])
    pred[~mask] = torch.tensor([40.0, -40.0, 30.0])
    value = jet_term(pred, x, mask, IDENTITY)
    assert torch.isfinite(value) and value.item() == pytest.approx(2 * math.log(2.0) ** 2, rel=1e-4)


def test_jet_term_has_finite_gradients():
    x, mask = jets_for_jet_term()
    pred = scaled(x, [2.0, 0.5, 1.0]).requires_grad_(True)
    jet_term(pred, x, mask, IDENTITY).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[mask].abs().sum() > 0
    assert (pred.grad[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Config keys


def config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as excinfo:
        from_dict(raw)
    return str(excinfo.value)


@pytest.mark.parametrize("raw, key", [
    ({"particle_loss": "emd"}, "particle_loss"),
    ({"particle_loss": "Chamfer"}, "particle_loss"),
    ({"objective": "fidelity"}, "objective"),
    ({"generation_every": 0}, "generation_every"),
    ({"generation_every": -2}, "generation_every"),
    ({"generation_jets": 99}, "generation_jets"),
    ({"loss_weights": {"jet_features": -1.0}}, "loss_weights.jet_features"),
])
def test_config_refuses_bad_values_naming_the_key(raw, key):
    msg = config_error(raw)
    assert f"'{key}'" in msg and "\n" not in msg


def test_config_accepts_every_particle_loss_and_objective():
    for kind in PARTICLE_LOSSES:
        assert from_dict({"particle_loss": kind}).particle_loss == kind
    for objective in OBJECTIVES:
        assert from_dict({"objective": objective}).objective == objective
    cfg = from_dict({"generation_every": 1, "generation_jets": 100, "loss_weights": {"jet_features": 1.0}})
    assert (cfg.generation_every, cfg.generation_jets, cfg.loss_weights.jet_features) == (1, 100, 1.0)


def pooled_w2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Squared 1-D W2 per feature of the pooled real particles, by numpy: sort, pair by rank, average."""
    m = mask.numpy()
    p, q = pred.double().numpy()[m], target.double().numpy()[m]  # (N, F)
    return float(((np.sort(p, axis=0) - np.sort(q, axis=0)) ** 2).mean())


def test_marginal_distance_is_the_sorted_pairing_of_the_pooled_real_particles():
    gen = torch.Generator().manual_seed(3)
    pred, target = torch.randn(4, 6, 3, generator=gen), torch.randn(4, 6, 3, generator=gen) * 2 + 1
    mask = torch.rand(4, 6, generator=gen) < 0.7
    mask[0] = False  # a padding jet: no particle
    mask[1, 0] = True
    got = marginal_distance(pred, target, mask).item()
    assert got == pytest.approx(pooled_w2(pred, target, mask), rel=1e-5)
    assert got > 0.5  # the two samples differ in mean and spread


def test_marginal_distance_is_zero_for_particles_exchanged_between_jets_where_set_losses_are_not():
    target = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]])
    pred = target.flip(0)  # each jet decoded as the other one: the same pool of particles
    mask = full_mask(2, b=2)
    assert marginal_distance(pred, target, mask).item() == 0.0
    assert sinkhorn_distance(pred, target, mask).item() > 1.0


def test_marginal_distance_ignores_padding_slots_whatever_they_hold():
    target = torch.tensor([[[0.0], [1.0], [0.0]]])
    pred = torch.tensor([[[1.0], [0.0], [1e30]]])  # the same real pool {0, 1}; the padding slot is huge
    mask = torch.tensor([[True, True, False]])
    assert marginal_distance(pred, target, mask).item() == 0.0


def test_marginal_distance_of_a_shrunk_sample_pushes_it_outwards():
    """Predictions at half the true spread: the gradient widens them (moves each away from the centre)."""
    target = torch.linspace(-1, 1, 9).reshape(1, 9, 1)
    pred = (0.5 * target).clone().requires_grad_(True)
    loss = marginal_distance(pred, target, full_mask(9))
    assert loss.item() == pytest.approx(((0.5 * target) ** 2).mean().item())
    loss.backward()
    step = -pred.grad[0, :, 0]
    assert torch.all(step[target[0, :, 0] > 0] > 0) and torch.all(step[target[0, :, 0] < 0] < 0)
