"""Latent codes: the fitted priors (Gaussian mixture and flow: fit, save, load, sample), posterior
encoding and decoding, and the `prior fit` / `sample --prior fitted` / `sample --posterior` commands
on a trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hvae_ray import latent
from hvae_ray.cli import main
from hvae_ray.data.io import save_parquet
from hvae_ray.data.jets import from_padded
from hvae_ray.engine import load_checkpoint, model_from_checkpoint, prepare
from hvae_ray.errors import DataError


def two_blobs(n: int, seed: int) -> np.ndarray:
    """A known mixture in 3 dimensions: 30 % around (-4, 0, 1) with σ 0.5, 70 % around (3, 2, -1) with σ 1."""
    rng = np.random.default_rng(seed)
    k = rng.random(n) < 0.3
    return np.where(k[:, None], rng.normal([-4, 0, 1], 0.5, (n, 3)), rng.normal([3, 2, -1], 1.0, (n, 3)))


def test_mixture_recovers_a_known_mixture():
    gmm = latent.GaussianMixture.fit(two_blobs(4000, 0), components=2, seed=0)
    order = np.argsort(gmm.means[:, 0])
    np.testing.assert_allclose(gmm.weights[order], [0.3, 0.7], atol=0.03)
    np.testing.assert_allclose(gmm.means[order], [[-4, 0, 1], [3, 2, -1]], atol=0.1)
    np.testing.assert_allclose(np.sqrt(gmm.variances[order]), [[0.5] * 3, [1.0] * 3], rtol=0.1)
    held_out = two_blobs(2000, 1)
    one = latent.GaussianMixture.fit(two_blobs(4000, 0), components=1, seed=0)
    assert gmm.log_prob(held_out).mean() > one.log_prob(held_out).mean() + 0.5  # two blobs fit better than one


def test_mixture_samples_are_seeded_and_follow_the_fit(tmp_path):
    gmm = latent.GaussianMixture.fit(two_blobs(3000, 2), components=2, seed=1)
    a, b, c = gmm.sample(5000, seed=3), gmm.sample(5000, seed=3), gmm.sample(5000, seed=4)
    assert a.shape == (5000, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.mean(a[:, 0] < 0) == pytest.approx(0.3, abs=0.03)
    latent.save_prior(tmp_path, gmm, {"components": 2})
    back = latent.load_prior(tmp_path, latent_dim=3)
    np.testing.assert_array_equal(back.sample(100, seed=5), gmm.sample(100, seed=5))
    with pytest.raises(DataError, match="3 latent dimensions, the model 4"):
        latent.load_prior(tmp_path, latent_dim=4)
    with pytest.raises(DataError, match="no fitted prior"):
        latent.load_prior(tmp_path / "elsewhere", latent_dim=3)


def test_flow_learns_a_bimodal_density_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    train, held_out = two_blobs(4000, 0), two_blobs(2000, 1)
    flow = latent.FlowPrior.fit(train, steps=400, seed=0)
    gauss = latent.GaussianMixture.fit(train, components=1, seed=0)
    # two well-separated blobs: the flow's density beats the best single Gaussian on held-out codes
    assert flow.log_prob(held_out).mean() > gauss.log_prob(held_out).mean() + 0.5
    a = flow.sample(5000, seed=3)
    assert a.shape == (5000, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, flow.sample(5000, seed=3))
    assert not np.array_equal(a, flow.sample(5000, seed=4))
    assert np.mean(a[:, 0] < -0.5) == pytest.approx(0.3, abs=0.05)  # the lighter blob keeps its weight
    latent.save_prior(tmp_path, flow, {"kind": "flow"})
    back = latent.load_prior(tmp_path, latent_dim=3)
    assert isinstance(back, latent.FlowPrior)
    np.testing.assert_array_equal(back.sample(100, seed=5), flow.sample(100, seed=5))
    np.testing.assert_allclose(back.log_prob(held_out[:50]), flow.log_prob(held_out[:50]), rtol=1e-6)
    with pytest.raises(DataError, match="3 latent dimensions, the model 4"):
        latent.load_prior(tmp_path, latent_dim=4)


def test_posterior_draws_are_seeded_with_the_posterior_spread():
    mu = np.zeros((20000, 2))
    logvar = np.log(np.array([[0.25, 4.0]])).repeat(20000, axis=0)
    z = latent.posterior_codes(mu, logvar, seed=0)
    np.testing.assert_allclose(z.std(axis=0), [0.5, 2.0], rtol=0.03)
    np.testing.assert_array_equal(z, latent.posterior_codes(mu, logvar, seed=0))


# ---------------------------------------------------------------------------------------------------------
# on a trained model

TINY = ["epochs=2", "batch_size=16", "gradient_accumulation_steps=1", "model.hidden_dim=8",
        "model.latent_dim=4", "model.num_layers=1", "device=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, p = 60, 30
    particles = np.zeros((n, p, 3), np.float32)
    mask = np.zeros((n, p), bool)
    for i in range(n):
        k = int(rng.integers(5, p + 1))
        particles[i, :k, :2] = rng.normal(0, 0.1, (k, 2))
        particles[i, :k, 2] = np.sort(rng.dirichlet(np.ones(k)))[::-1]
        mask[i, :k] = True
    root = tmp_path_factory.mktemp("latent")
    data = root / "jets.parquet"
    save_parquet(from_padded(particles, mask, source="<test>"), data)
    save_dir = root / "run"
    args = ["train", "--data-path", str(data), "--save-dir", str(save_dir), "--quiet"]
    assert main([*args, *(a for t in TINY for a in ("--set", t))]) == 0
    return data, save_dir


def test_encode_decode_round_trip_shapes(run):
    data, save_dir = run
    model, normaliser, cfg = model_from_checkpoint(load_checkpoint(save_dir / "best"))
    from hvae_ray.data.io import load_jets

    jets = load_jets(data)
    mu, logvar = latent.encode(model, normaliser, cfg, jets.particles, jets.mask, batch_size=7)
    assert mu.shape == logvar.shape == (60, 4) and np.isfinite(mu).all()
    # batching does not change the codes
    mu_all, _ = latent.encode(model, normaliser, cfg, jets.particles, jets.mask, batch_size=1024)
    np.testing.assert_allclose(mu, mu_all, rtol=1e-5, atol=1e-6)
    parts, mask = latent.decode(model, normaliser, torch.as_tensor(mu))
    assert parts.shape == (60, 30, 3) and mask.shape == (60, 30)
    assert (mask.sum(axis=1) >= 1).all() and (parts[~mask] == 0).all()


def test_prior_fit_then_sample_fitted_and_posterior(run, tmp_path, capsys):
    data, save_dir = run
    best = save_dir / "best"
    assert main(["sample", "--checkpoint", str(best), "--n-jets", "5", "--out", str(tmp_path / "x.npz"),
                 "--prior", "fitted", "--quiet"]) == 2
    assert "no fitted prior" in capsys.readouterr().err
    assert main(["prior", "fit", "--checkpoint", str(best), "--data-path", str(data), "--kind", "gmm",
                 "--components", "3", "--device", "cpu"]) == 0
    assert f"wrote {best / latent.PRIOR_FILE}" in capsys.readouterr().out
    state = torch.load(best / latent.PRIOR_FILE, weights_only=True)
    model, normaliser, cfg = model_from_checkpoint(load_checkpoint(best))
    from hvae_ray.data.io import load_jets

    splits = prepare(cfg, load_jets(data), normaliser)
    assert state["meta"]["n_jets"] == len(splits.train)  # fitted on the training split only
    assert state["kind"] == "gaussian_mixture" and state["means"].shape == (3, 4)
    assert main(["prior", "fit", "--checkpoint", str(best), "--data-path", str(data)]) == 2  # no overwrite
    assert "already exists" in capsys.readouterr().err

    base = ["sample", "--checkpoint", str(best), "--device", "cpu", "--quiet"]
    for name, extra in (("fitted", ["--prior", "fitted", "--n-jets", "40"]),
                        ("posterior", ["--posterior", str(data), "--n-jets", "40"])):
        a, b = tmp_path / f"{name}_a.npz", tmp_path / f"{name}_b.npz"
        assert main([*base, *extra, "--out", str(a)]) == 0
        assert main([*base, *extra, "--out", str(b)]) == 0
        fa, fb = np.load(a)["particle_features"], np.load(b)["particle_features"]
        assert fa.shape == (40, 30, 4)
        np.testing.assert_array_equal(fa, fb)  # seeded
    standard = tmp_path / "standard.npz"
    assert main([*base, "--prior", "standard", "--n-jets", "40", "--out", str(standard)]) == 0
    assert not np.array_equal(np.load(standard)["particle_features"],
                              np.load(tmp_path / "fitted_a.npz")["particle_features"])
    assert main([*base, "--posterior", str(data), "--n-jets", "61", "--out", str(tmp_path / "y.npz")]) == 2
    assert "holds 60 jets, fewer than the 61" in capsys.readouterr().err

    # a flow replaces the mixture with --force and is sampled the same way
    assert main(["prior", "fit", "--checkpoint", str(best), "--data-path", str(data), "--kind", "flow",
                 "--device", "cpu", "--force"]) == 0
    state = torch.load(best / latent.PRIOR_FILE, weights_only=True)
    assert state["kind"] == "flow" and state["dim"] == 4 and state["meta"]["n_jets"] == len(splits.train)
    flow_a, flow_b = tmp_path / "flow_a.npz", tmp_path / "flow_b.npz"
    for out in (flow_a, flow_b):
        assert main([*base, "--prior", "fitted", "--n-jets", "40", "--out", str(out)]) == 0
    fa = np.load(flow_a)["particle_features"]
    assert fa.shape == (40, 30, 4) and np.isfinite(fa).all()
    np.testing.assert_array_equal(fa, np.load(flow_b)["particle_features"])
    assert not np.array_equal(fa, np.load(tmp_path / "fitted_a.npz")["particle_features"])


def test_mixtures_fitted_side_by_side_are_each_ones_own_fit():
    """fit_many: one batched EM for several sets of codes (each its own seed, settling after its own number
    of iterations) gives each set the mixture fit gives it alone."""
    rng = np.random.default_rng(4)
    sets = [rng.normal(size=(300, 3)) * (1 + i) + i for i in range(3)] + [two_blobs(300, 5)]
    seeds = [3, 4, 5, 6]
    together = latent.GaussianMixture.fit_many(sets, components=5, seeds=seeds, iterations=100, tol=1e-4)
    for x, seed, mixture in zip(sets, seeds, together):
        alone = latent.GaussianMixture.fit(x, components=5, seed=seed, iterations=100, tol=1e-4)
        for field in ("weights", "means", "variances"):
            np.testing.assert_allclose(getattr(mixture, field), getattr(alone, field), rtol=1e-12, atol=1e-12)
