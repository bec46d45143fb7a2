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

# Physical ranges of (η_rel, φ_rel, pT_rel), checked on load (:func:`range_problem`).
#: Anti-kT radius of JetNet's jets (and of ours).
JET_RADIUS = 0.8
#: |η_rel| and |φ_rel| of a particle with pT_rel >= HARD_PT_REL stay within jet radius + ANGLE_MARGIN.
#: Measured on 6,000 Pythia jets (q, W, t) of this package: at most 0.78 in η_rel and 0.86 in φ_rel.
ANGLE_MARGIN = 0.4
HARD_PT_REL = 0.01
#: FastJet clusters in rapidity, so a soft massive hadron's pseudorapidity can lie far from the axis
#: (up to 3.9 at pT_rel < 1e-3 in the same jets); for those only a gross bound applies.
SOFT_ETA_LIMIT = 10.0
#: A constituent carries at most the jet's pT, up to this tolerance.
PT_REL_TOLERANCE = 0.05
#: Σ pT_rel of a jet's particles is 1 for all constituents (a little above: scalar against vector
#: sum), less when only the hardest are kept: measured 0.63 to 1.05. Beyond these the pT column is not
#: pT_rel (a per-jet or min-max rescaling, or another quantity).
PT_SUM_MAX = 1.5
PT_SUM_MEDIAN_MIN = 0.25


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


@dataclass(frozen=True)
class RangeProblem:
    """The first particle (or jet) outside the physical ranges, and what rule it breaks.

    row: index into the particle rows checked (None for a rule about a jet or the whole sample);
    jet: the jet; feature: eta_rel, phi_rel, pt_rel or sum_pt_rel; value: the offending value;
    rule: what the value should be, in words; count: how many rows (or jets) break the rule.
    """

    row: int | None
    jet: int | None
    feature: str
    value: float
    rule: str
    count: int


def range_problem(features: np.ndarray, jet: np.ndarray, n_jets: int,
                  jet_radius: float = JET_RADIUS) -> RangeProblem | None:
    """The first value of real particles outside the physical ranges, or None when all are inside.

    features: (M, 3) physical (η_rel, φ_rel, pT_rel) of the real particles; jet: (M,) the jet of each
    row, in 0..n_jets-1. Rules, in this order: finite values; 0 <= pT_rel <= 1 + PT_REL_TOLERANCE;
    |φ_rel| <= R + ANGLE_MARGIN; |η_rel| <= R + ANGLE_MARGIN for particles with pT_rel >= HARD_PT_REL
    and <= SOFT_ETA_LIMIT for all; Σ pT_rel <= PT_SUM_MAX per jet; median Σ pT_rel >= PT_SUM_MEDIAN_MIN.
    """
    names = ("eta_rel", "phi_rel", "pt_rel")

    def first(bad: np.ndarray, feature: str, rule: str) -> RangeProblem | None:
        if not bad.any():
            return None
        row = int(np.argmax(bad))
        value = float(features[row, names.index(feature)])
        return RangeProblem(row, int(jet[row]), feature, value, rule, int(bad.sum()))

    finite = np.isfinite(features)
    for k, name in enumerate(names):
        found = first(~finite[:, k], name, "a finite number (NaN/inf particle features)")
        if found:
            return found
    eta, phi, pt = features[:, 0], features[:, 1], features[:, 2]
    limit = jet_radius + ANGLE_MARGIN
    checks = (
        (pt < 0, "pt_rel", "a pT fraction in [0, 1], not negative"),
        (pt > 1 + PT_REL_TOLERANCE, "pt_rel", f"a pT fraction in [0, 1] (tolerance {PT_REL_TOLERANCE})"),
        (np.abs(phi) > limit, "phi_rel", f"within the jet radius {jet_radius:g} + {ANGLE_MARGIN:g}"),
        ((np.abs(eta) > limit) & (pt >= HARD_PT_REL), "eta_rel",
         f"within the jet radius {jet_radius:g} + {ANGLE_MARGIN:g} for a particle with pT_rel >= {HARD_PT_REL:g}"),
        (np.abs(eta) > SOFT_ETA_LIMIT, "eta_rel", f"within {SOFT_ETA_LIMIT:g} of the jet axis"),
    )
    for bad, feature, rule in checks:
        found = first(bad, feature, rule)
        if found:
            return found
    sums = np.bincount(jet, weights=pt.astype(np.float64), minlength=n_jets)
    over = sums > PT_SUM_MAX
    if over.any():
        j = int(np.argmax(over))
        return RangeProblem(None, j, "sum_pt_rel", float(sums[j]),
                            f"at most {PT_SUM_MAX:g} (the jet's particles share its pT)", int(over.sum()))
    has = np.bincount(jet, minlength=n_jets) > 0
    if has.any():
        median = float(np.median(sums[has]))
        if median < PT_SUM_MEDIAN_MIN:
            return RangeProblem(None, None, "sum_pt_rel", median,
                                f"near 1 (median over jets at least {PT_SUM_MEDIAN_MIN:g})", int(has.sum()))
    return None


def from_particles(features: np.ndarray, jet: np.ndarray, n_jets: int, jets: np.ndarray | None = None,
                   source: str = "<memory>", max_particles: int = MAX_PARTICLES) -> JetSample:
    """A validated JetSample from the real particles as rows: features (M, 3) physical (η_rel, φ_rel,
    pT_rel) with pT_rel >= 0, jet (M,) the jet of each row. Each jet keeps its ``max_particles`` hardest,
    in decreasing pT_rel (ties in row order)."""
    features = np.asarray(features, dtype=np.float32)
    jet = np.asarray(jet, dtype=np.int64)
    if len(features) and float(features[:, 2].min()) < 0:
        raise DataError(f"{source}: negative pT_rel; particles cannot be ordered by pT")
    order = np.lexsort((-features[:, 2], jet))  # by jet, then by decreasing pT; stable
    jet_sorted = jet[order]
    starts = np.searchsorted(jet_sorted, np.arange(n_jets))
    rank = np.arange(len(order)) - starts[jet_sorted]
    keep = rank < max_particles
    particles = np.zeros((n_jets, max_particles, 3), dtype=np.float32)
    mask = np.zeros((n_jets, max_particles), dtype=bool)
    particles[jet_sorted[keep], rank[keep]] = features[order[keep]]
    mask[jet_sorted[keep], rank[keep]] = True
    if jets is None:
        jets = np.full((n_jets, len(JET_FEATURES)), np.nan, dtype=np.float32)
    jets = np.array(jets, dtype=np.float32, copy=True)
    jets[:, 3] = mask.sum(axis=1)
    return JetSample(particles, mask, jets, source).validate()


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
    if mask.any() and float(feats[..., 2][mask].min()) < 0:
        bad = (np.where(mask, feats[..., 2], 0.0) < 0).any(axis=1)
        raise DataError(f"{source}: jet {int(np.argmax(bad))} has a negative pT_rel; particles cannot be "
                        f"ordered by pT ({int(bad.sum())} such jets)")
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
