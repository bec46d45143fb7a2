"""Real-vs-generated figures of hvae_ray.evaluation.plots: two histograms each, PNGs written and readable."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from hvae_ray.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jets(n: int, seed: int, eta_scale: float = 1.0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 30, 3), dtype=np.float32)
    mask = np.zeros((n, 30), dtype=bool)
    for j, k in enumerate(rng.integers(3, 31, size=n)):
        pt = np.sort(rng.dirichlet(np.ones(k)))[::-1]
        x[j, :k] = np.stack([rng.normal(0, 0.1 * eta_scale, k), rng.normal(0, 0.1, k), pt], axis=1)
        mask[j, :k] = True
    return x, mask


@pytest.fixture(scope="module")
def figs():
    x, m = _jets(200, 0)
    y, n = _jets(150, 1, eta_scale=2.0)
    return plots.distribution_figures(x, m, y, n)


def test_figures_have_two_labelled_histograms(figs):
    assert tuple(figs) == plots.FIGURE_KEYS
    for key, fig in figs.items():
        (ax,) = fig.axes
        assert len(ax.patches) == 2, key  # one polygon per histogram (stepfilled + step)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Real", "Generated"]
        assert ax.get_xlabel() and ax.get_ylabel()
    assert "rad" in figs["phirel"].axes[0].get_xlabel()
    assert "p_T^{\\mathrm{jet}}" in figs["mass"].axes[0].get_xlabel()


def test_histograms_share_bins(figs):
    ax = figs["etarel"].axes[0]
    real, gen = ax.patches
    xs_r = np.unique(np.round(real.get_xy()[:, 0], 12))
    xs_g = np.unique(np.round(gen.get_xy()[:, 0], 12))
    np.testing.assert_allclose(xs_r, xs_g)


def test_mask_none_matches_explicit_mask():
    x, m = _jets(50, 2)
    a = plots.distribution_figures(x, m, x, m)["multiplicity"].axes[0].patches[0].get_xy()
    b = plots.distribution_figures(x, None, x, None)["multiplicity"].axes[0].patches[0].get_xy()
    np.testing.assert_allclose(a, b)


def test_save_figures_writes_pngs_and_refuses_overwrite(figs, tmp_path):
    out = tmp_path / "plots"
    paths = plots.save_figures(figs, out)
    assert [p.name for p in paths] == [f"{k}.png" for k in plots.FIGURE_KEYS]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    before = paths[0].stat().st_mtime_ns
    with pytest.raises(FileExistsError):
        plots.save_figures(figs, out)
    assert paths[0].stat().st_mtime_ns == before
    assert plots.save_figures(figs, out, overwrite=True) == paths
