"""Toy jets shared by the evaluation tests, as fixtures that return their factory."""

from __future__ import annotations

import numpy as np
import pytest


def toy_jets(n: int, seed: int, eta_scale: float = 1.0, num_particles: int = 30):
    """Jet-like toy sample: pT-ordered Dirichlet pT fractions, softer particles wider in (η, φ)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, num_particles, 3), dtype=np.float32)
    mask = np.zeros((n, num_particles), dtype=bool)
    mult = rng.integers(5, num_particles + 1, size=n)
    for j, k in enumerate(mult):
        pt = np.sort(rng.dirichlet(np.full(k, 0.8)))[::-1]
        width = 0.03 / np.sqrt(pt + 0.01)
        x[j, :k, 0] = rng.normal(0.0, 1.0, k) * width * eta_scale
        x[j, :k, 1] = rng.normal(0.0, 1.0, k) * width
        x[j, :k, 2] = pt
        mask[j, :k] = True
    return x, mask


def one_jet(rows, num_particles: int = 5) -> np.ndarray:
    """A single padded jet (1, P, 3) from a list of (η_rel, φ_rel, pT_rel)."""
    x = np.zeros((1, num_particles, 3))
    x[0, : len(rows)] = rows
    return x


@pytest.fixture(name="toy_jets", scope="session")
def toy_jets_factory():
    return toy_jets


@pytest.fixture(name="one_jet", scope="session")
def one_jet_factory():
    return one_jet
