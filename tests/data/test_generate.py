"""Pythia 8 + FastJet generation: determinism across worker counts, JetNet cuts, argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from hvae_ray.data import generate
from hvae_ray.data.generate import default_sample_path, generate_jets
from hvae_ray.data.jets import MAX_PARTICLES
from hvae_ray.errors import ConfigError


@pytest.fixture(scope="module")
def q_jets():
    """20 q jets in chunks of 8 (three chunks, the last one short), one worker and two workers."""
    one = generate._generate("q", 20, seed=11, workers=1, progress=False, chunk_size=8)
    two = generate._generate("q", 20, seed=11, workers=2, progress=False, chunk_size=8)
    return one, two


@pytest.mark.slow
def test_worker_count_does_not_change_the_jets(q_jets):
    one, two = q_jets
    assert len(one) == len(two) == 20
    np.testing.assert_array_equal(one.particles, two.particles)
    np.testing.assert_array_equal(one.mask, two.mask)
    np.testing.assert_array_equal(one.jets, two.jets)


@pytest.mark.slow
def test_smaller_sample_is_a_prefix_and_seed_matters(q_jets):
    one, _ = q_jets
    short = generate._generate("q", 10, seed=11, workers=1, progress=False, chunk_size=8)
    np.testing.assert_array_equal(short.particles, one.particles[:10])
    other = generate._generate("q", 4, seed=12, workers=1, progress=False, chunk_size=8)
    assert not np.array_equal(other.jets, one.jets[:4])


@pytest.mark.slow
def test_jetnet_cuts_and_layout(q_jets):
    sample, _ = q_jets
    p, mask, jets = sample.particles, sample.mask, sample.jets
    assert p.shape == (20, MAX_PARTICLES, 3) and p.dtype == np.float32
    assert sample.has_jet_kinematics
    assert ((jets[:, 0] > 800) & (jets[:, 0] < 1600)).all()
    assert (np.abs(jets[:, 1]) < 2.5).all()
    assert (jets[:, 2] > 0).all()
    assert (np.abs(p[..., 1]) <= np.float32(np.pi)).all()
    # The anti-kT jet's constituents are within ~R of its axis in (y, phi); only soft massive hadrons
    # stray further in pseudorapidity.
    hard = p[..., 2] > 0.01
    assert (np.abs(p[..., 0][hard]) < 0.9).all() and (np.abs(p[..., 1][hard]) < 0.9).all()
    # pT_rel of the kept particles: positive, and their scalar sum can exceed 1 only by the small
    # amount by which a scalar pT sum exceeds the vector sum of a collimated jet.
    assert (p[..., 2][mask] > 0).all()
    sums = p[..., 2].sum(axis=1)
    assert (sums <= 1.05).all() and (sums > 0.5).all()
    # Real particles first, padding zero, pT-ordered, multiplicity = number kept.
    counts = mask.sum(axis=1)
    assert (mask == (np.arange(MAX_PARTICLES) < counts[:, None])).all()
    assert (p[~mask] == 0).all()
    assert (np.diff(p[..., 2], axis=1) <= 0).all()
    np.testing.assert_array_equal(jets[:, 3], counts)
    assert counts.mean() > 20  # 1 TeV quark jets have dozens of constituents


@pytest.mark.slow
def test_public_function_matches_chunked_driver():
    a = generate_jets("g", 5, seed=3, workers=2, progress=False)
    b = generate._generate("g", 5, seed=3, workers=1, progress=False, chunk_size=generate.CHUNK_SIZE)
    np.testing.assert_array_equal(a.particles, b.particles)
    np.testing.assert_array_equal(a.jets, b.jets)


@pytest.mark.parametrize("kwargs, match", [
    (dict(flavor="b", n_jets=10, seed=0), "unknown jet flavor"),
    (dict(flavor="q", n_jets=0, seed=0), "n_jets"),
    (dict(flavor="q", n_jets=2.5, seed=0), "n_jets"),
    (dict(flavor="q", n_jets=10, seed=-1), "seed"),
    (dict(flavor="q", n_jets=10, seed=0, workers=0), "workers"),
])
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match) as excinfo:
        generate_jets(progress=False, **kwargs)
    assert "\n" not in str(excinfo.value)


def test_chunk_seeds_are_valid_and_distinct():
    seeds = [generate.chunk_seed(s, c) for s in range(3) for c in range(200)]
    assert all(1 <= x <= 900_000_000 for x in seeds)
    assert len(set(seeds)) == len(seeds)
    # fixed numbers, not only fixed within a process: the same (seed, chunk) makes the same jets on
    # another machine or after an upgrade (SeedSequence is stable across numpy versions)
    assert (generate.chunk_seed(0, 5), generate.chunk_seed(7, 0), generate.init_seed(0)) == \
        (786548030, 227301575, 556625779)


def test_phi_wrapping_is_half_open():
    wrapped = generate._wrap_phi(np.array([np.pi, -np.pi, 3 * np.pi, 0.1 - 2 * np.pi, 7.0]))
    np.testing.assert_allclose(wrapped, [np.pi, np.pi, np.pi, 0.1, 7.0 - 2 * np.pi])
    assert ((wrapped > -np.pi) & (wrapped <= np.pi)).all()


def test_default_sample_path_uses_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HVAE_RAY_CACHE", str(tmp_path / "c"))
    path = default_sample_path("w", 300, 4)
    assert path.parent == tmp_path / "c" and path.suffix == ".parquet"
    assert "w" in path.name and "300" in path.name and "seed4" in path.name
    monkeypatch.delenv("HVAE_RAY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_sample_path().parent == tmp_path / "xdg" / "hvae-ray"
    with pytest.raises(ConfigError):
        default_sample_path("x")


@pytest.mark.slow
def test_default_sample_is_generated_once(tmp_path, monkeypatch):
    from hvae_ray.data.io import load_jets, read_parquet_metadata

    monkeypatch.setenv("HVAE_RAY_CACHE", str(tmp_path))
    path = generate.default_sample("z", n_jets=6, seed=1, progress=False)
    sample = load_jets(path)
    assert len(sample) == 6 and sample.has_jet_kinematics
    meta = read_parquet_metadata(path)
    assert meta["flavor"] == "z" and meta["seed"] == "1" and "pythia8mc" in meta["generator"]
    mtime = path.stat().st_mtime_ns
    assert generate.default_sample("z", n_jets=6, seed=1, progress=False) == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
