"""The in-memory jet sample every format is read into and every model reads from.

Layout follows JetNet (Kansal et al., arXiv:2106.11535): per jet the ``MAX_PARTICLES`` hardest
constituents, ordered by decreasing pT, zero-padded, with per-particle (η_rel, φ_rel, pT_rel) and a
boolean mask; per jet (pT [GeV], η, mass [GeV], multiplicity).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hvae_ray.errors import DataError

MAX_PARTICLES = 30
PARTICLE_FEATURES = ("etarel", "phirel", "ptrel")
JET_FEATURES = ("pt", "eta", "mass", "num_particles")


@dataclass(frozen=True)
class JetSample:
    """A batch of jets.

    particles: float32 (N, P, 3) = (η_rel, φ_rel, pT_rel), zero where ``mask`` is False.
    mask:      bool (N, P), True for real particles; real particles come first, pT-ordered.
    jets:      float32 (N, 4) = (pT [GeV], η, mass [GeV], multiplicity). Formats that lack the
               absolute jet kinematics (JetNet arrays, PyG files) fill pT/η/mass with NaN
               (see ``has_jet_kinematics``); multiplicity is always set.
    source:    where the jets came from, for error messages.
    """

    particles: np.ndarray
    mask: np.ndarray
    jets: np.ndarray
    source: str = "<memory>"

    def __len__(self) -> int:
        return int(self.particles.shape[0])

    @property
    def has_jet_kinematics(self) -> bool:
        return bool(np.isfinite(self.jets[:, :3]).all())

    def subset(self, index: np.ndarray) -> JetSample:
        """The jets at ``index`` (an integer array), same source."""
        index = np.asarray(index, dtype=np.int64)
        return JetSample(self.particles[index], self.mask[index], self.jets[index], self.source)

    def validate(self) -> JetSample:
        """Check shapes and values; raise DataError naming the source and the first bad jet."""
        where = self.source
        if self.particles.ndim != 3 or self.particles.shape[2] != 3:
            raise DataError(f"{where}: particle features must have shape (N, P, 3), got {self.particles.shape}")
        n, p, _ = self.particles.shape
        if n == 0:
            raise DataError(f"{where}: the dataset is empty (0 jets)")
        if self.mask.shape != (n, p):
            raise DataError(f"{where}: mask shape {self.mask.shape} does not match particles {(n, p)}")
        if self.jets.shape != (n, len(JET_FEATURES)):
            raise DataError(f"{where}: jet features must have shape ({n}, 4), got {self.jets.shape}")
        bad = ~np.isfinite(self.particles).all(axis=(1, 2))
        if bad.any():
            raise DataError(f"{where}: jet {int(np.argmax(bad))} has NaN/inf particle features "
                            f"({int(bad.sum())} such jets)")
        empty = ~self.mask.any(axis=1)
        if empty.any():
            raise DataError(f"{where}: jet {int(np.argmax(empty))} has no particles "
                            f"({int(empty.sum())} such jets)")
        return self


def from_padded(particles: np.ndarray, mask: np.ndarray | None = None, jets: np.ndarray | None = None,
                source: str = "<memory>", max_particles: int = MAX_PARTICLES) -> JetSample:
    """Build a validated JetSample from padded arrays, keeping the ``max_particles`` hardest.

    particles: (N, P, ≥3) with (η_rel, φ_rel, pT_rel) first; a 4th column, if ``mask`` is None, is
    read as the JetNet mask. Without either, a particle is real when any of its features is non-zero.
    Particles are re-sorted by decreasing pT_rel so that slot i is the i-th hardest.
    """
    particles = np.asarray(particles, dtype=np.float32)
    if particles.ndim != 3 or particles.shape[2] < 3:
        raise DataError(f"{source}: particle features must have shape (N, P, >=3), got {particles.shape}")
    if mask is None:
        if particles.shape[2] >= 4:
            mask = particles[:, :, 3] > 0.5
        else:
            mask = (particles[:, :, :3] != 0).any(axis=2)
    mask = np.asarray(mask, dtype=bool)
    feats = particles[:, :, :3].copy()
    if len(feats) and not np.isfinite(feats[mask]).all():
        bad = ~np.isfinite(np.where(mask[..., None], feats, 0.0)).all(axis=(1, 2))
        raise DataError(f"{source}: jet {int(np.argmax(bad))} has NaN/inf particle features "
                        f"({int(bad.sum())} such jets)")
    feats[~mask] = 0.0
    # Sort real particles by decreasing pT_rel; padding goes last.
    key = np.where(mask, feats[:, :, 2], -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")
    feats = np.take_along_axis(feats, order[..., None], axis=1)[:, :max_particles]
    mask = np.take_along_axis(mask, order, axis=1)[:, :max_particles]
    if feats.shape[1] < max_particles:
        pad = max_particles - feats.shape[1]
        feats = np.pad(feats, ((0, 0), (0, pad), (0, 0)))
        mask = np.pad(mask, ((0, 0), (0, pad)))
    n = len(feats)
    if jets is None:
        jets = np.full((n, len(JET_FEATURES)), np.nan, dtype=np.float32)
    jets = np.array(jets, dtype=np.float32, copy=True)
    jets[:, 3] = mask.sum(axis=1)
    return JetSample(feats, mask, jets, source).validate()
