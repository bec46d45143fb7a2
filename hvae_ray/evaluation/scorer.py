"""The per-epoch generation score: jets decoded from the prior against the validation jets, on the run's
device, by jetnet-equal metrics (W1 of the jet mass and of the particle features, FPD of the EFPs).

:class:`GenerationScorer` prepares the validation side once (masses, particles and EFPs); each
:meth:`~GenerationScorer.score` call samples a model's jets and compares them. A run alone and every
member of a population share one scorer per split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from hvae_ray.config import Config
from hvae_ray.data.dense import FeatureNormaliser
from hvae_ray.data.jets import JetSample
from hvae_ray.evaluation.efp import efps, jet_mass
from hvae_ray.evaluation.metrics import fpd, wasserstein_1d

# The fidelity targets (generated vs held-out q jets): val_generation is the mean ratio to them.
GENERATION_TARGETS = {"val_w1m": 4e-3, "val_w1p": 4e-3, "val_fpd": 1e-2}
GENERATION_KEYS = (*GENERATION_TARGETS, "val_generation")
#: Jets per chunk of the score's EFPs (at least): fewer chunks, fewer small kernel launches. Its (chunk, 30, 30)
#: float64 powers of θ and einsum intermediates take ~30 MB at 512, within even a 64-jet validation batch's
#: activations, which the trial's GPU share is sized by (2,048 raised the default config's peak by ~80 MiB).
EFP_CHUNK = 512


@torch.no_grad()
def generate(model, normaliser: FeatureNormaliser, n_jets: int, seed: int = 0,
             device: torch.device | str = "cpu", batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Sample jets from the N(0, 1) prior. Returns particles (N, P, 3) physical (η_rel, φ_rel, pT_rel) and
    mask (N, P): a slot exists where its existence probability exceeds 1/2 (the most likely slot at
    least, so no jet is empty); padded slots are zero."""
    from hvae_ray.latent import decode

    model = getattr(model, "module", model)
    z = standard_codes(n_jets, model.cfg.latent_dim, seed, batch_size)
    return decode(model, normaliser, z, device=device, batch_size=batch_size)


def standard_codes(n_jets: int, latent_dim: int, seed: int = 0, batch_size: int = 512) -> torch.Tensor:
    """n_jets seeded N(0, 1) codes (n_jets, latent_dim), drawn ``batch_size`` at a time."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.cat([torch.randn(min(batch_size, n_jets - s), latent_dim, generator=gen)
                      for s in range(0, n_jets, batch_size)])


@dataclass(frozen=True)
class _Reference:
    """Jet masses (N,) and real particles (M, 3) on the device, EFPs (N, 36)."""

    mass: torch.Tensor
    particles: torch.Tensor
    efps: np.ndarray


class GenerationScorer:
    """Scores models against ``reference`` (the validation jets) on ``device`` in batches of ``batch``.

    :meth:`score` returns ``val_w1m`` (relative mass), ``val_w1p`` (mean over η_rel, φ_rel, pT_rel of
    all particles), ``val_fpd`` (Fréchet distance of the 36 d ≤ 4 EFPs, extrapolated over subsample
    sizes n/2…n as jetnet does, with fewer draws) and ``val_generation``, their mean ratio to the
    fidelity targets (:data:`GENERATION_TARGETS`): at most 1 when a model meets all three on average.
    Full-sized numbers to quote are ``hvae-ray evaluate``'s on held-out jets. On a GPU jets are encoded
    and decoded in ``batch``-sized batches and their EFPs computed in chunks of :data:`EFP_CHUNK`, so the
    score's memory stays within a validation pass's, which a trial's GPU share is sized by.
    """

    def __init__(self, reference: JetSample, device: torch.device, batch: int):
        self.reference_jets, self.device, self.batch = reference, device, batch
        self._ref: _Reference | None = None

    def _efps(self, particles: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """On a GPU with torch in chunks of at least :data:`EFP_CHUNK`; numpy on a CPU (the faster there)."""
        cuda = self.device.type == "cuda"
        return efps(particles, mask, chunk_size=max(self.batch, EFP_CHUNK), device=self.device if cuda else None)

    def reference(self) -> _Reference:
        if self._ref is None:
            val = self.reference_jets
            self._ref = _Reference(mass=torch.as_tensor(jet_mass(val.particles, val.mask), device=self.device),
                                   particles=torch.as_tensor(val.particles[val.mask], device=self.device),
                                   efps=self._efps(val.particles, val.mask))
        return self._ref

    def generated(self, model, normaliser: FeatureNormaliser, cfg: Config, train: JetSample,
                  autocast: AbstractContextManager | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """As many jets as the reference, decoded from ``cfg.generation_prior``'s codes (seeded by
        ``cfg.seed``): ``fitted``, a 20-component Gaussian mixture fitted to the posterior means of
        ``train`` at this epoch (a cheap stand-in for the 100-component mixture ``prior fit`` fits after
        training; N(0, 1) samples rank models poorly when the KL weight is small), or ``standard``, N(0, 1).
        (None, None) if the posterior means are not finite. ``model`` is a dense :class:`HyperVAE`."""
        from hvae_ray.latent import decode, encode

        mu = None
        if cfg.generation_prior == "fitted":
            with autocast or nullcontext():
                mu, _ = encode(model, normaliser, cfg, *self.encoded(train), self.device, self.batch)
        z = self.codes([mu], [cfg], getattr(model, "module", model).cfg.latent_dim)[0]
        if z is None:
            return None, None
        return decode(model, normaliser, z, self.device, self.batch if mu is not None else 512)

    def encoded(self, train: JetSample) -> tuple[np.ndarray, np.ndarray]:
        """The training jets whose posterior means a fitted prior is fitted to: (particles, mask)."""
        n = len(self.reference_jets)
        return train.particles[:n], train.mask[:n]

    def codes(self, mus: Sequence[np.ndarray | None], cfgs: Sequence[Config], latent_dim: int
              ) -> list[np.ndarray | None]:
        """The codes each model decodes (see :meth:`generated`), from its posterior means (None for a
        ``standard`` prior) and config: the ``fitted`` ones' mixtures fitted side by side; None where the
        means are not finite."""
        from hvae_ray.latent import GaussianMixture

        n = len(self.reference_jets)
        out: list[np.ndarray | None] = [None] * len(cfgs)
        fitted = [i for i, c in enumerate(cfgs) if c.generation_prior == "fitted" and np.isfinite(mus[i]).all()]
        mixtures = GaussianMixture.fit_many([mus[i] for i in fitted], components=20,
                                            seeds=[cfgs[i].seed for i in fitted], iterations=100, tol=1e-4,
                                            device=self.device) if fitted else []
        for i, gmm in zip(fitted, mixtures):
            out[i] = gmm.sample(n, seed=cfgs[i].seed)
        for i, c in enumerate(cfgs):
            if c.generation_prior != "fitted":
                out[i] = standard_codes(n, latent_dim, c.seed)
        return out

    def score(self, model, normaliser: FeatureNormaliser, cfg: Config, train: JetSample,
              autocast: AbstractContextManager | None = None) -> dict[str, float]:
        """The generation metrics of ``model`` (see the class)."""
        return self.compare([self.generated(model, normaliser, cfg, train, autocast)], [cfg.seed])[0]

    def compare(self, generated: Sequence[tuple[np.ndarray | None, np.ndarray | None]], seeds: Sequence[int]
                ) -> list[dict[str, float]]:
        """The generation metrics of each set of generated jets (particles, mask), as many as the reference,
        with its FPD seed of ``seeds``; a set that is None or not finite scores inf. The EFPs of all the
        sets are computed in one call."""
        ref = self.reference()
        n = len(ref.mass)
        good = [i for i, (p, _) in enumerate(generated) if p is not None and np.isfinite(p).all()]
        out: list[dict[str, float]] = [{k: math.inf for k in GENERATION_KEYS} for _ in generated]
        if not good:
            return out
        all_efps = self._efps(np.concatenate([generated[i][0] for i in good]),
                              np.concatenate([generated[i][1] for i in good]))

        def metrics(j: int) -> dict[str, float]:
            i = good[j]
            return self._metrics(*generated[i], all_efps[j * n:(j + 1) * n], seeds[i])

        if len(good) == 1:
            out[good[0]] = metrics(0)
            return out
        with ThreadPoolExecutor(max_workers=min(len(good), os.cpu_count() or 1)) as pool:  # FPD's LAPACK
            for i, result in zip(good, pool.map(metrics, range(len(good)))):  # calls run side by side
                out[i] = result
        return out

    def _metrics(self, gen_p: np.ndarray, gen_m: np.ndarray, gen_efps: np.ndarray, seed: int) -> dict[str, float]:
        ref = self.reference()
        n = len(ref.mass)
        gen_mass = torch.as_tensor(jet_mass(gen_p, gen_m), device=self.device)
        gen_parts = torch.as_tensor(gen_p[gen_m], device=self.device)
        out = {"val_w1m": wasserstein_1d(ref.mass, gen_mass),
               "val_w1p": float(np.mean([wasserstein_1d(ref.particles[:, f], gen_parts[:, f])
                                         for f in range(gen_p.shape[-1])]))}
        if np.isfinite(gen_efps).all() and n >= 4:
            out["val_fpd"] = float(fpd(ref.efps, gen_efps, min_samples=max(2, n // 2), max_samples=n,
                                       num_batches=4, num_points=4, seed=seed)[0])
        else:
            out["val_fpd"] = math.inf
        out["val_generation"] = float(np.mean([out[k] / t for k, t in GENERATION_TARGETS.items()]))
        return out
