"""Real-vs-generated figures of hvae_ray.evaluation.plots: two histograms with error bars, W1 and a ratio panel
each, one panel per EFP, PNGs written and readable."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from hvae_ray.evaluation import plots
from hvae_ray.evaluation.efp import PRIME_EFP_N4_D4, efps

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


def _panels(fig):
    """(histogram axes, ratio axes) pairs of a figure, in drawing order."""
    hists = [ax for ax in fig.axes if ax.get_label() == "hist"]
    ratios = [ax for ax in fig.axes if ax.get_label() == "ratio"]
    assert len(hists) == len(ratios) and len(fig.axes) == 2 * len(hists)
    return list(zip(hists, ratios))


def _w1_text(ax) -> float:
    title = ax.get_legend().get_title().get_text()
    assert title.startswith("$W_1$ = "), title
    return float(title.split("=")[1])


def _bars(container) -> tuple[np.ndarray, np.ndarray]:
    """(centre, half-length) of each vertical error bar of an errorbar container."""
    segs = [s if len(s) else np.full((2, 2), np.nan) for s in container.lines[2][0].get_segments()]  # NaN: no bar
    ys = np.array(segs)[:, :, 1]
    return ys.mean(axis=1), 0.5 * (ys[:, 1] - ys[:, 0])


def _counts(ax, i: int) -> np.ndarray:
    """Per-bin counts of histogram ``i`` recovered from its Poisson error bars: (density / (√N / (N_in·w)))²."""
    y, err = _bars(ax.containers[i])
    return np.round(np.divide(y, err, out=np.zeros_like(y), where=err > 0) ** 2)


def test_figures_have_two_labelled_histograms_and_a_ratio_panel(figs):
    assert tuple(figs) == plots.FIGURE_KEYS
    for key, fig in figs.items():
        for ax, ax_ratio in _panels(fig):
            assert len(ax.patches) == 2, key  # one polygon per histogram (stepfilled + step)
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["Real", "Generated"]
            assert len(ax.containers) == 2, key  # the error bars of each histogram
            assert ax_ratio.get_xlabel() and ax.get_ylabel() is not None
            assert ax_ratio.get_ylim() == plots.RATIO_LIMITS
            assert any(np.all(np.asarray(line.get_ydata()) == 1.0) for line in ax_ratio.lines), key  # the line at 1
            assert ax_ratio.get_shared_x_axes().joined(ax, ax_ratio)
    assert "rad" in _panels(figs["phirel"])[0][1].get_xlabel()
    assert "p_T^{\\mathrm{jet}}" in _panels(figs["mass"])[0][1].get_xlabel()


def test_ratio_panel_is_generated_over_real_per_bin():
    x, m = _jets(120, 3)
    y, n = _jets(80, 4, eta_scale=1.5)
    fig = plots.distribution_figures(x, m, y, n, num_bins=10)["multiplicity"]
    ((ax, ax_ratio),) = _panels(fig)
    bins = np.arange(-0.5, 31.5)
    cr, _ = np.histogram(m.sum(axis=1), bins=bins)
    cg, _ = np.histogram(n.sum(axis=1), bins=bins)
    ratio_line = ax_ratio.containers[0].lines[0]
    np.testing.assert_allclose(ratio_line.get_xdata(), np.arange(31))
    dr, dg = cr / cr.sum(), cg / cg.sum()
    expected = np.where(cr > 0, dg / np.where(cr > 0, dr, 1), np.nan)
    np.testing.assert_allclose(ratio_line.get_ydata(), expected, equal_nan=True)
    both = (cr > 0) & (cg > 0)
    assert both.any()
    # Error bars on each histogram are √N per bin; the ratio's are the propagated relative errors.
    np.testing.assert_array_equal(_counts(ax, 0), cr)
    np.testing.assert_array_equal(_counts(ax, 1), cg)
    _, half = _bars(ax_ratio.containers[0])
    np.testing.assert_allclose(half[both], expected[both] * np.sqrt(1 / cr[both] + 1 / cg[both]))


def test_w1_in_legend_matches_scipy():
    x, m = _jets(60, 5)
    y, n = _jets(40, 6, eta_scale=3.0)
    figs = plots.distribution_figures(x, m, y, n)
    expected = {
        "etarel": wasserstein_distance(x[..., 0][m], y[..., 0][n]),
        "ptrel": wasserstein_distance(x[..., 2][m], y[..., 2][n]),
        "multiplicity": wasserstein_distance(m.sum(axis=1), n.sum(axis=1)),
    }
    for key, w1 in expected.items():
        assert w1 > 0
        assert _w1_text(_panels(figs[key])[0][0]) == pytest.approx(w1, rel=1e-3), key
    assert _w1_text(_panels(plots.distribution_figures(x, m, x, m)["mass"])[0][0]) == 0.0


def test_ptrel_sum_counts_every_jet_and_shows_the_shift():
    x, m = _jets(90, 7)
    y, n = _jets(70, 8)
    y[..., 2] *= np.where(np.arange(70) % 2 == 0, 0.8, 1.0)[:, None]  # half the generated jets lose 20% of pT
    ((ax, _),) = _panels(plots.distribution_figures(x, m, y, n)["ptrel_sum"])
    real, gen = ax.patches
    xs = real.get_xy()[:, 0]
    assert _counts(ax, 0).sum() == 90 and _counts(ax, 1).sum() == 70
    w1 = wasserstein_distance(x[..., 2].sum(axis=1), y[..., 2].sum(axis=1))
    assert w1 == pytest.approx(0.1, abs=1e-3)
    assert _w1_text(ax) == pytest.approx(w1, rel=1e-3)
    assert xs.min() < 0.8 < 1.0 < xs.max()


def test_efp_figure_has_one_panel_per_prime_efp(figs):
    panels = _panels(figs["efp"])
    assert len(panels) == len(PRIME_EFP_N4_D4) == 5
    assert [ax_ratio.get_xlabel().split()[:2] for _, ax_ratio in panels] == [["EFP", str(k)] for k in range(5)]
    x, m = _jets(200, 0)
    y, n = _jets(150, 1, eta_scale=2.0)
    er, eg = efps(x, m, graphs=PRIME_EFP_N4_D4), efps(y, n, graphs=PRIME_EFP_N4_D4)
    for k, (ax, _) in enumerate(panels):
        assert ax.get_yscale() == "log"
        assert _w1_text(ax) == pytest.approx(wasserstein_distance(er[:, k], eg[:, k]), rel=1e-3)


def test_histograms_share_bins(figs):
    ((ax, _),) = _panels(figs["etarel"])
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
