"""The generation metrics of the field, computed exactly as the ``jetnet`` library 0.2.5 computes them
(``CONVENTION``), so that our numbers are the numbers papers quote.

Metrics follow Kansal et al., "Evaluating generative models in high energy physics",
PRD 107, 076017 (2023), arXiv:2211.10295:

- W1m, W1p, W1efp: 1-Wasserstein distances of the jet mass, of the particle features and of five
  energy flow polynomials, averaged over subsamples drawn with replacement at jetnet's sizes.
- FPD: Fréchet distance between Gaussian fits of the 36 EFPs with d ≤ 4, extrapolated to infinite
  sample size through a linear fit in 1/N; seeds and draws as jetnet's.
- KPD: unbiased quadratic-time MMD² with the polynomial kernel k(x, y) = (x·y/dim + 1)⁴.

Jets are padded arrays (N, P, 3) = (η_rel, φ_rel, pT_rel) with an optional (N, P) mask, as in
:mod:`hvae_ray.evaluation.efp`. ``tests/evaluation/test_jetnet_parity.py`` holds every function here
to jetnet's own numbers on the same jets (``tests/fixtures/jetnet_parity/make_fixture.py`` makes
that fixture).

Every metric is quoted together with a floor: the same metric between two disjoint real sets
(``evaluate_generation``). Values of all metrics grow as the samples shrink, so compare a model's
numbers with a floor of the same N (``per_side``), and with published values only at the papers' scale:
50,000 generated against 50,000 real jets.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from scipy.optimize import curve_fit
from scipy.stats import wasserstein_distance

from hvae_ray.data.jets import PARTICLE_FEATURES
from hvae_ray.evaluation.efp import EFP_D4_GRAPHS, PRIME_EFP_N4_D4, as_particles, efps, jet_mass

__all__ = [
    "CONVENTION",
    "FPDResult",
    "fpd_batch_sizes",
    "w1m",
    "w1p",
    "wasserstein_1d",
    "w1efp",
    "frechet_distance",
    "fpd",
    "kpd",
    "mmd_poly_unbiased",
    "evaluate_generation",
]

# ----------------------------------------------------------------------------------------------
# W1 metrics
# ----------------------------------------------------------------------------------------------
#
# Batching as jetnet 0.2.5 (``jetnet.evaluation.w1m``/``w1p``/``w1efp``): ``num_batches`` times, draw
# ``num_eval_samples`` jets *with replacement* from each set (not capped at the set sizes; the
# generator's ``choice(n, size)`` draws the same indices as ``integers(0, n, size)``), first the real
# then the generated indices, and take scipy's ``wasserstein_distance``; report mean and std over the
# batches. jetnet draws from an unseeded module-level generator; here it is ``default_rng(seed)``, so
# a jetnet run whose generator is seeded alike draws the very same jets.
#
# A subsample drawn with replacement is the set itself with each jet counted as often as it was drawn,
# so every metric takes the set and those counts (``_counts``) rather than a copy of ``num_eval_samples``
# jets: the same numbers up to rounding (W1's CDFs are the same integer ratios, FPD's and KPD's moments
# the same sums in another order), at the cost of the set's size instead of the subsample's (50,000
# jets drawn from a 10,000-jet set sort 10,000 jets' values, not 50,000).

#: The convention every metric here follows, stated in ``evaluate_generation``'s output.
CONVENTION = "jetnet-0.2.5"


def _draws(rng: np.random.Generator, n1: int, n2: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of one batch: ``size`` jets with replacement from each set, real first (as jetnet)."""
    if n1 < 1 or n2 < 1:
        raise ValueError("W1 needs at least one jet in each sample")
    if size < 1:
        raise ValueError(f"num_eval_samples must be ≥ 1, got {size}")
    return rng.integers(0, n1, size=size), rng.integers(0, n2, size=size)


def _counts(index: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` items was drawn: (n,) ints, from the drawn indices."""
    return np.bincount(index, minlength=n)


def _w1_weighted(u: np.ndarray, v: np.ndarray, u_counts: np.ndarray, v_counts: np.ndarray) -> float:
    """scipy's W1 of ``u`` with each value repeated ``u_counts`` times against ``v`` likewise (counts
    of 0 left out)."""
    ku, kv = u_counts > 0, v_counts > 0
    return wasserstein_distance(u[ku], v[kv], u_counts[ku], v_counts[kv])


def _w1_feature_batches(
    x1: np.ndarray, x2: np.ndarray, num_eval_samples: int, num_batches: int, rng: np.random.Generator
) -> np.ndarray:
    """W1 per feature column between with-replacement subsamples of two per-jet feature sets.

    x1: (N1, F), x2: (N2, F). Returns (num_batches, F).
    """
    out = np.empty((num_batches, x1.shape[1]))
    for b in range(num_batches):
        i1, i2 = _draws(rng, len(x1), len(x2), num_eval_samples)
        c1, c2 = _counts(i1, len(x1)), _counts(i2, len(x2))
        for f in range(x1.shape[1]):
            out[b, f] = _w1_weighted(x1[:, f], x2[:, f], c1, c2)
    return out


def _w1_particle_batches(
    p1: np.ndarray, m1: np.ndarray, p2: np.ndarray, m2: np.ndarray,
    num_eval_samples: int, num_batches: int, rng: np.random.Generator,
) -> np.ndarray:
    """W1 per particle feature between the real particles of jet subsamples. Returns (num_batches, 3)."""
    nf = p1.shape[2]
    out = np.empty((num_batches, nf))
    # each real particle once, with its jet: a particle counts as often as its jet was drawn
    jet1, jet2 = np.nonzero(m1)[0], np.nonzero(m2)[0]
    a, c = p1[m1], p2[m2]
    for b in range(num_batches):
        i1, i2 = _draws(rng, len(p1), len(p2), num_eval_samples)
        w1, w2 = _counts(i1, len(p1))[jet1], _counts(i2, len(p2))[jet2]
        if not w1.any() or not w2.any():
            out[b] = np.inf
            continue
        for f in range(nf):
            out[b, f] = _w1_weighted(a[:, f], c[:, f], w1, w2)
    return out


def wasserstein_1d(u, v) -> float:
    """W1 between two unweighted 1-D samples, as ``scipy.stats.wasserstein_distance(u, v)``, by torch on
    the tensors' device in float64: ∫ |F_u − F_v| dx over the merged sorted values, the empirical CDFs
    taken by ``searchsorted`` (scipy's ``_cdf_distance`` at p = 1, to rounding). u, v: 1-D torch tensors
    or arrays (then on the CPU). The per-epoch generation score calls it on the GPU, where the ~10⁵
    particles of a few thousand jets take milliseconds instead of scipy's tens of."""
    import torch

    u = torch.as_tensor(u).double()
    v = torch.as_tensor(v, device=u.device).double()
    if u.numel() < 1 or v.numel() < 1:
        raise ValueError("W1 needs at least one value in each sample")
    merged = torch.sort(torch.cat([u, v])).values
    at = merged[:-1]
    u_cdf = torch.searchsorted(torch.sort(u).values, at, right=True).double() / u.numel()
    v_cdf = torch.searchsorted(torch.sort(v).values, at, right=True).double() / v.numel()
    return float(((u_cdf - v_cdf).abs() * torch.diff(merged)).sum())


def _valid_particles(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Real particles: inside the mask and not all-zero (jetnet's ``exclude_zeros``)."""
    return m & (x != 0).any(axis=2)


def w1m(
    real: np.ndarray,
    gen: np.ndarray,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    seed: int = 42,
    *,
    real_mask: np.ndarray | None = None,
    gen_mask: np.ndarray | None = None,
) -> tuple[float, float]:
    """W1 between the relative jet-mass distributions (W1m; Kansal et al., arXiv:2106.11535).

    ``num_batches`` times, draw ``num_eval_samples`` jets with replacement from each set (jetnet's
    batching, see above) and take the W1 of their masses; return mean and std over the batches.

    real, gen: (N1, P, 3), (N2, P', 3) = (η_rel, φ_rel, pT_rel); masks (N, P) bool or None.
    Returns (mean, std), in units of the jet pT (dimensionless). Seeded: ``numpy.random.default_rng(seed)``.
    """
    mr = jet_mass(real, real_mask)[:, None]
    mg = jet_mass(gen, gen_mask)[:, None]
    w = _w1_feature_batches(mr, mg, num_eval_samples, num_batches, np.random.default_rng(seed))[:, 0]
    return float(w.mean()), float(w.std())


def w1p(
    real: np.ndarray,
    gen: np.ndarray,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    seed: int = 42,
    *,
    real_mask: np.ndarray | None = None,
    gen_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """W1 per particle feature (η_rel, φ_rel, pT_rel) between all real particles of jet subsamples (W1p).

    ``num_batches`` times, draw ``num_eval_samples`` jets with replacement from each set, pool their
    particles leaving out padding (outside the mask, or all three features exactly 0 as jetnet's
    ``exclude_zeros``), and take W1 per feature (Kansal et al., arXiv:2106.11535).

    real, gen: (N1, P, 3), (N2, P', 3); masks (N, P) bool or None.
    Returns (means (3,), stds (3,)) in the features' units (η: none, φ: rad, pT: fraction of jet pT).
    """
    xr, mr = as_particles(real, real_mask)
    xg, mg = as_particles(gen, gen_mask)
    w = _w1_particle_batches(xr, _valid_particles(xr, mr), xg, _valid_particles(xg, mg),
                             num_eval_samples, num_batches, np.random.default_rng(seed))
    return w.mean(axis=0), w.std(axis=0)


def w1efp(
    real: np.ndarray,
    gen: np.ndarray,
    num_eval_samples: int = 50_000,
    num_batches: int = 5,
    seed: int = 42,
    *,
    real_mask: np.ndarray | None = None,
    gen_mask: np.ndarray | None = None,
    graphs: Sequence[Sequence[tuple[int, int]]] = PRIME_EFP_N4_D4,
) -> tuple[np.ndarray, np.ndarray]:
    """W1 per EFP between with-replacement subsamples of jets (W1efp; Kansal et al., arXiv:2106.11535).

    By default the five prime EFPs with n = 4, d = 4 (``PRIME_EFP_N4_D4``), with ``efps``' jetnet
    convention (hadronic measure, β = 1, z = pT_rel as given).

    real, gen: (N1, P, 3), (N2, P', 3); masks (N, P) bool or None.
    Returns (means (G,), stds (G,)), dimensionless; the field quotes their mean as W1efp.
    """
    er = efps(real, real_mask, graphs)
    eg = efps(gen, gen_mask, graphs)
    w = _w1_feature_batches(er, eg, num_eval_samples, num_batches, np.random.default_rng(seed))
    return w.mean(axis=0), w.std(axis=0)


# ----------------------------------------------------------------------------------------------
# FPD and KPD
# ----------------------------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), with the matrix square root from
    ``scipy.linalg.sqrtm``; if it is not finite (near-singular product) ``eps`` is added to both
    diagonals, and a small imaginary part from rounding is discarded (as jetnet).

    mu: (F,), sigma: (F, F) (scalars are accepted for F = 1). Returns a float in the features' units².
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, float)), np.atleast_1d(np.asarray(mu2, float))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, float)), np.atleast_2d(np.asarray(sigma2, float))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError("mean vectors and covariance matrices do not match in shape")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on (near-)singular products; handled below
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _normalise(real: np.ndarray, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide each feature of both sets by its largest |value| in the real set (1 where that is 0)."""
    scale = np.abs(real).max(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return real / scale, gen / scale


def _as_feature_pair(real_features, gen_features, normalise: bool) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(real_features, dtype=np.float64)
    y = np.asarray(gen_features, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N, F) with equal F, got {x.shape} and {y.shape}")
    if len(x) < 1 or len(y) < 1:
        raise ValueError("need at least one jet in each sample")
    return _normalise(x, y) if normalise else (x, y)


class FPDResult(tuple):
    """``(value, error)`` of FPD, with the batch sizes the Fréchet distance was measured at.

    Unpacks as a 2-tuple; ``batch_sizes`` is the (num_points,) int array of subsample sizes.
    """

    def __new__(cls, value: float, error: float, batch_sizes: np.ndarray = ()):
        obj = super().__new__(cls, (float(value), float(error)))
        obj.batch_sizes = np.asarray(batch_sizes, dtype=np.int64)
        return obj

    def __getnewargs__(self):
        return (self[0], self[1], self.batch_sizes)

    @property
    def value(self) -> float:
        return self[0]

    @property
    def error(self) -> float:
        return self[1]


def fpd_batch_sizes(min_samples: int = 20_000, max_samples: int = 50_000, num_points: int = 10) -> np.ndarray:
    """The FPD subsample sizes: ``num_points`` sizes evenly spaced in 1/N, truncated to int (as jetnet)."""
    if min_samples < 2 or max_samples < min_samples or num_points < 1:
        raise ValueError(f"need 2 ≤ min_samples ≤ max_samples and num_points ≥ 1, "
                         f"got {min_samples}, {max_samples}, {num_points}")
    return (1.0 / np.linspace(1.0 / min_samples, 1.0 / max_samples, num_points)).astype(np.int32)


def _moments(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``'s, ddof 1) of the rows of ``x`` each repeated ``counts`` times."""
    keep = counts > 0
    x, w = x[keep], counts[keep].astype(np.float64)
    n = w.sum()
    mean = w @ x / n
    d = x - mean
    return mean, (d.T * w) @ d / (n - 1)


def _linear(t, intercept, slope):
    return intercept + slope * t


def fpd(
    real_features: np.ndarray,
    gen_features: np.ndarray,
    min_samples: int = 20_000,
    max_samples: int = 50_000,
    num_batches: int = 20,
    num_points: int = 10,
    seed: int = 42,
    normalise: bool = True,
) -> FPDResult:
    """Fréchet physics distance (Kansal et al., arXiv:2211.10295), extrapolated to infinite samples.

    As ``jetnet.evaluation.fpd`` (0.2.5), draw for draw:

    1. Divide each feature of both sets by its largest |value| in the real set.
    2. At the ``num_points`` sizes of ``fpd_batch_sizes`` (evenly spaced in 1/N), draw ``num_batches``
       pairs of subsamples with replacement (from ``default_rng(seed)``, real then generated, sizes
       not capped at the set sizes), take the Fréchet distance of their Gaussian fits and average.
    3. Fit FD(N) = a + b/N with a, b ≥ 0 and return a with its fit uncertainty.

    With sets smaller than ``max_samples`` the value includes the sets' own finite-sample effect;
    jetnet recommends 50,000 jets. real_features, gen_features: (N1, F), (N2, F), e.g.
    ``efps(..., graphs=EFP_D4_GRAPHS)``. Returns ``FPDResult`` = (value, error), dimensionless.
    """
    x, y = _as_feature_pair(real_features, gen_features, normalise)
    sizes = fpd_batch_sizes(min_samples, max_samples, num_points)
    rng = np.random.default_rng(seed)
    vals = np.empty(len(sizes))
    for p, n in enumerate(sizes):
        batch = np.empty(num_batches)
        for b in range(num_batches):
            a = _counts(rng.integers(0, len(x), size=n), len(x))
            c = _counts(rng.integers(0, len(y), size=n), len(y))
            batch[b] = frechet_distance(*_moments(x, a), *_moments(y, c))
        vals[p] = batch.mean()
    inv = 1.0 / sizes
    if np.ptp(inv) == 0:  # a single size: no extrapolation possible
        return FPDResult(vals.mean(), vals.std(), sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, cov = curve_fit(_linear, inv, vals, bounds=([0, 0], [np.inf, np.inf]))
    return FPDResult(params[0], np.sqrt(max(cov[0, 0], 0.0)), sizes)


def _poly_kernel_sum(a: np.ndarray, b: np.ndarray, degree: int, block: int = 1024,
                     wa: np.ndarray | None = None, wb: np.ndarray | None = None) -> float:
    """Σ_ij (a_i·b_j / dim + 1)^degree, in row blocks to bound memory; with weights ``wa``, ``wb``
    Σ_ij wa_i wb_j (a_i·b_j / dim + 1)^degree."""
    dim = a.shape[1]
    total = 0.0
    for s in range(0, len(a), block):
        k = a[s:s + block] @ b.T
        k /= dim
        k += 1.0
        if degree == 4:  # two squarings: several times faster than a float power
            np.square(k, out=k)
            np.square(k, out=k)
        else:
            np.power(k, degree, out=k)
        total += float(k.sum()) if wa is None else float(wa[s:s + block] @ k @ wb)
    return total


def mmd_poly_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 4) -> float:
    """Unbiased quadratic-time MMD² with the kernel k(a, b) = (a·b/dim + 1)^degree.

    MMD² = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(n(n−1)) − 2 Σ_ij k(x_i, y_j)/(mn)
    (Gretton et al., JMLR 13 (2012) 723; as KID, Bińkowski et al., arXiv:1801.01401).
    x: (m, F), y: (n, F) with m, n ≥ 2. Returns a float; it can be slightly negative.
    """
    return _mmd_poly(x, None, y, None, degree)


def _mmd_poly(x: np.ndarray, cx: np.ndarray | None, y: np.ndarray, cy: np.ndarray | None, degree: int) -> float:
    """``mmd_poly_unbiased`` of ``x`` with row i repeated ``cx[i]`` times (once each if None) and ``y``
    likewise: Σ_{i≠j} over the repeated rows is Σ_uv c_u c_v k_uv − Σ_u c_u k_uu."""
    if cx is not None:
        kx, ky = cx > 0, cy > 0
        x, cx, y, cy = x[kx], cx[kx].astype(np.float64), y[ky], cy[ky].astype(np.float64)
    m = len(x) if cx is None else cx.sum()
    n = len(y) if cy is None else cy.sum()
    dim = x.shape[1]
    kxx_self = (np.einsum("ij,ij->i", x, x) / dim + 1.0) ** degree
    kyy_self = (np.einsum("ij,ij->i", y, y) / dim + 1.0) ** degree
    kxx_diag = kxx_self.sum() if cx is None else kxx_self @ cx
    kyy_diag = kyy_self.sum() if cy is None else kyy_self @ cy
    kxx = _poly_kernel_sum(x, x, degree, wa=cx, wb=cx) - kxx_diag
    kyy = _poly_kernel_sum(y, y, degree, wa=cy, wb=cy) - kyy_diag
    kxy = _poly_kernel_sum(x, y, degree, wa=cx, wb=cy)
    return float(kxx / (m * (m - 1)) + kyy / (n * (n - 1)) - 2.0 * kxy / (m * n))


def kpd(
    real_features: np.ndarray,
    gen_features: np.ndarray,
    num_batches: int = 10,
    batch_size: int = 5000,
    seed: int = 42,
    normalise: bool = True,
) -> tuple[float, float]:
    """Kernel physics distance (Kansal et al., arXiv:2211.10295), as ``jetnet.evaluation.kpd`` (0.2.5).

    Features of both sets are divided by their largest |value| in the real set. Batch i draws
    ``batch_size`` jets with replacement from each set with ``default_rng(seed + 1000 i)`` (jetnet's
    seeding, real then generated, not capped at the set sizes) and takes the unbiased MMD² with the
    polynomial kernel k(x, y) = (x·y/dim + 1)⁴.

    real_features, gen_features: (N1, F), (N2, F). Returns (median, error), dimensionless, with the
    error half the 16.275–83.725 percentile range of the batch values (jetnet's, ±1σ for a Gaussian).
    """
    x, y = _as_feature_pair(real_features, gen_features, normalise)
    if batch_size < 2:
        raise ValueError(f"KPD needs batch_size ≥ 2, got {batch_size}")
    vals = np.empty(num_batches)
    for i in range(num_batches):
        rng = np.random.default_rng(seed + i * 1000)
        cx = _counts(rng.integers(0, len(x), size=batch_size), len(x))
        cy = _counts(rng.integers(0, len(y), size=batch_size), len(y))
        vals[i] = _mmd_poly(x, cx, y, cy, 4)
    lo, hi = np.percentile(vals, [16.275, 83.725])
    return float(np.median(vals)), float((hi - lo) / 2.0)


# ----------------------------------------------------------------------------------------------
# all metrics with their floors
# ----------------------------------------------------------------------------------------------


def _put(out: dict, key: str, batches: np.ndarray, floor: np.ndarray) -> None:
    """Store mean/std of per-batch values (B,) for a metric and its floor."""
    out[key] = float(batches.mean())
    out[f"{key}_err"] = float(batches.std())
    out[f"{key}_floor"] = float(floor.mean())
    out[f"{key}_floor_err"] = float(floor.std())


def _sample_sizes(n_real: int, n_gen: int, per_side: int | None, num_eval_samples: int, num_batches: int,
                  fpd_min: int, fpd_max: int, fpd_batches: int, fpd_points: int, kpd_batches: int,
                  kpd_size: int) -> dict:
    """The bookkeeping keys of ``evaluate_generation``: set sizes and every subsample size used."""
    fpd_batch_sizes(fpd_min, fpd_max, fpd_points)  # checks the range before any work
    n_floor = n_real // 2 if per_side is None else per_side
    return {
        "convention": CONVENTION,
        "n_real": n_real,
        "n_gen": n_gen,
        "n_per_side": 0 if per_side is None else per_side,
        "n_floor": n_floor,
        "w1_eval_samples": num_eval_samples,
        "w1_num_batches": num_batches,
        "fpd_min_samples": fpd_min,
        "fpd_max_samples": fpd_max,
        "fpd_num_points": fpd_points,
        "fpd_num_batches": fpd_batches,
        "kpd_batch_size": kpd_size,
        "kpd_num_batches": kpd_batches,
        # jetnet recommends ≥ 50k jets: smaller sets add their own finite-sample effect to every value
        "small_sample": int(min(n_gen, n_floor) < max(num_eval_samples, fpd_max)),
    }


def evaluate_generation(
    real_particles: np.ndarray, real_mask: np.ndarray | None, gen_particles: np.ndarray,
    gen_mask: np.ndarray | None, seed: int = 42, num_eval_samples: int = 50_000, num_batches: int = 5,
    fpd_min_samples: int = 20_000, fpd_max_samples: int = 50_000, fpd_num_batches: int = 20,
    fpd_num_points: int = 10, kpd_num_batches: int = 10, kpd_batch_size: int = 5000, per_side: int | None = None,
) -> dict:
    """All generation metrics of the field, as jetnet 0.2.5 computes them, each with a floor.

    **Values** are jetnet's: ``w1m``, ``w1p``, ``w1efp`` of the generated set against the whole real
    set, and ``fpd``, ``kpd`` on the 36 d ≤ 4 EFPs, with jetnet's defaults and batching (subsamples
    drawn with replacement at the requested sizes, whatever the set sizes) and jetnet's seeds (W1m,
    W1p, W1efp each from ``default_rng(seed)``, FPD with ``seed``, KPD with ``seed + 1000 i``). With
    the default ``seed = 42`` FPD and KPD equal jetnet's default call on the same arrays; W1 values
    equal jetnet's whenever its module generator is seeded with ``seed`` before each metric. These are
    the numbers to compare with papers that quote jetnet (MPGAN, iGAPT, EPiC), at the paper's sample
    sizes: the values grow as the sets shrink below the recommended 50,000 jets (``small_sample``).

    **Floors**: the same metric with the same subsample sizes and seeds between two disjoint halves
    of the real set (split by ``default_rng(seed).permutation``): what a perfect generator would
    score against a real set of half the size. A value is meaningful only well above its floor.

    **Same N** (``per_side`` = N): N generated jets (the first N) against N real jets, and the floor
    between those N real jets and N others, disjoint (the first and second N of the permutation above):
    value and floor then see the same sample sizes, and ``M_ratio`` = value / floor is each metric's
    distance from a perfect generator in units of real-vs-real noise. Needs 2N real and N generated
    jets. Papers compare 50,000 with 50,000 jets; quote N beside any other numbers.

    real_particles, gen_particles: (N, P, 3) = (η_rel, φ_rel, pT_rel); masks (N, P) bool or None.
    Needs at least 4 real and 2 generated jets.

    Returns a dict. For each metric M: ``M`` (value), ``M_err`` (std over batches for W1, the fit
    uncertainty for FPD, half the 16–84 % range for KPD), ``M_floor`` and ``M_floor_err``; metrics
    ``w1m``; ``w1p_etarel``, ``w1p_phirel``, ``w1p_ptrel`` and their mean ``w1p_mean`` (its error is
    the std of the per-batch mean); ``w1efp_0`` … ``w1efp_4`` (``PRIME_EFP_N4_D4`` in order) and
    ``w1efp_mean``; ``fpd``; ``kpd``. Bookkeeping: ``convention`` (the string ``CONVENTION``),
    ``n_real``, ``n_gen``, ``n_floor`` (jets per half), ``w1_eval_samples``, ``w1_num_batches``,
    ``fpd_min_samples``, ``fpd_max_samples``, ``fpd_num_points``, ``fpd_num_batches``,
    ``kpd_batch_size``, ``kpd_num_batches`` and ``small_sample`` (1 when the generated set or a real
    floor set is smaller than the largest subsample, else 0); ``n_per_side`` (N, or 0 without
    ``per_side``); with ``per_side``, ``M_ratio`` for each metric M.
    """
    xr, mr = as_particles(real_particles, real_mask)
    xg, mg = as_particles(gen_particles, gen_mask)
    if per_side is not None and (per_side < 2 or len(xr) < 2 * per_side or len(xg) < per_side):
        raise ValueError(f"{per_side} jets per side needs at least {2 * max(per_side, 2)} real and "
                         f"{max(per_side, 2)} generated jets, got {len(xr)} and {len(xg)}")
    if len(xr) < 4 or len(xg) < 2:
        raise ValueError(f"need at least 4 real and 2 generated jets, got {len(xr)} and {len(xg)}")
    out: dict = _sample_sizes(len(xr), len(xg), per_side, num_eval_samples, num_batches, fpd_min_samples,
                              fpd_max_samples, fpd_num_batches, fpd_num_points, kpd_num_batches,
                              kpd_batch_size)
    real, gen, floor = _compared_sets(xr, mr, xg, mg, per_side, seed)
    out.update(_w1_metrics(real, gen, floor, num_eval_samples, num_batches, seed))
    fpd_args = dict(min_samples=fpd_min_samples, max_samples=fpd_max_samples,
                    num_batches=fpd_num_batches, num_points=fpd_num_points, seed=seed)
    kpd_args = dict(num_batches=kpd_num_batches, batch_size=kpd_batch_size, seed=seed)
    out.update(_efp_distances(real.efp_d4, gen.efp_d4, (floor[0].efp_d4, floor[1].efp_d4), fpd_args, kpd_args))
    return out | (_ratios(out) if per_side is not None else {})


def _ratios(out: dict) -> dict:
    """Each metric's value over its floor (``M_ratio``; inf over a zero floor)."""
    keys = [k[: -len("_floor")] for k in out if k.endswith("_floor") and k != "n_floor"]
    return {f"{k}_ratio": out[k] / out[f"{k}_floor"] if out[f"{k}_floor"] > 0 else float("inf") for k in keys}


@dataclass(frozen=True)
class _JetFeatures:
    """The per-jet inputs of every metric, computed once per set of N jets."""

    particles: np.ndarray  # (N, P, 3), padding zeroed
    valid: np.ndarray      # (N, P) bool: real particles (jetnet's exclude_zeros)
    mass: np.ndarray       # (N, 1) relative jet mass
    efp_d4: np.ndarray     # (N, 36) the d ≤ 4 EFPs of FPD and KPD
    efp_w1: np.ndarray     # (N, 5) the prime n = 4, d = 4 EFPs of W1efp

    @classmethod
    def of(cls, x: np.ndarray, m: np.ndarray) -> _JetFeatures:
        values = efps(x, m, tuple(EFP_D4_GRAPHS) + tuple(PRIME_EFP_N4_D4))
        n_d4 = len(EFP_D4_GRAPHS)
        return cls(x, _valid_particles(x, m), jet_mass(x, m)[:, None], values[:, :n_d4], values[:, n_d4:])

    def take(self, index: np.ndarray) -> _JetFeatures:
        return _JetFeatures(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def _compared_sets(xr: np.ndarray, mr: np.ndarray, xg: np.ndarray, mg: np.ndarray, per_side: int | None,
                   seed: int) -> tuple[_JetFeatures, _JetFeatures, tuple[_JetFeatures, _JetFeatures]]:
    """The real and generated sets a value compares, and the floor's two real sets: all jets and two
    halves of the real ones, or (``per_side`` = N) N generated, N real and N other real jets."""
    a, b = _real_parts(len(xr), per_side, seed)
    if per_side is None:
        real = _JetFeatures.of(xr, mr)
        return real, _JetFeatures.of(xg, mg), (real.take(a), real.take(b))
    both = _JetFeatures.of(xr[np.concatenate([a, b])], mr[np.concatenate([a, b])])
    floor = (both.take(np.arange(per_side)), both.take(np.arange(per_side, 2 * per_side)))
    return floor[0], _JetFeatures.of(xg[:per_side], mg[:per_side]), floor


def _real_parts(n_real: int, per_side: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The floor's two disjoint samples of the real set's indices: its two halves, or its first and second
    ``per_side`` jets, in the order of ``default_rng(seed).permutation``."""
    perm = np.random.default_rng(seed).permutation(n_real)
    n = n_real // 2 if per_side is None else per_side
    return perm[:n], perm[n:2 * n]


def _w1_metrics(real: _JetFeatures, gen: _JetFeatures, floor: tuple[_JetFeatures, _JetFeatures],
                num_eval_samples: int, num_batches: int, seed: int) -> dict:
    """W1m, W1p per feature and their mean, W1efp per EFP and their mean: values (``real`` against
    ``gen``) and floors (between the two sets of ``floor``)."""
    a, b = floor

    def w1(x: _JetFeatures, y: _JetFeatures, feature: str) -> np.ndarray:
        """(num_batches, F) W1 of one feature between x and y, drawn from a fresh ``default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        if feature == "particles":
            return _w1_particle_batches(x.particles, x.valid, y.particles, y.valid, num_eval_samples,
                                        num_batches, rng)
        return _w1_feature_batches(getattr(x, feature), getattr(y, feature), num_eval_samples, num_batches, rng)

    out: dict = {}
    val, flo = w1(real, gen, "mass"), w1(a, b, "mass")
    _put(out, "w1m", val[:, 0], flo[:, 0])
    val, flo = w1(real, gen, "particles"), w1(a, b, "particles")
    for f, name in enumerate(PARTICLE_FEATURES):
        _put(out, f"w1p_{name}", val[:, f], flo[:, f])
    _put(out, "w1p_mean", val.mean(axis=1), flo.mean(axis=1))
    val, flo = w1(real, gen, "efp_w1"), w1(a, b, "efp_w1")
    for f in range(val.shape[1]):
        _put(out, f"w1efp_{f}", val[:, f], flo[:, f])
    _put(out, "w1efp_mean", val.mean(axis=1), flo.mean(axis=1))
    return out


def _efp_distances(real: np.ndarray, gen: np.ndarray, floor: tuple[np.ndarray, np.ndarray],
                   fpd_args: dict, kpd_args: dict) -> dict:
    """FPD and KPD on the d ≤ 4 EFPs (real, gen: (N, 36)), each with its floor between the two real sets
    of ``floor``."""
    a, b = floor
    out: dict = {}
    out["fpd"], out["fpd_err"] = fpd(real, gen, **fpd_args)
    out["fpd_floor"], out["fpd_floor_err"] = fpd(a, b, **fpd_args)
    out["kpd"], out["kpd_err"] = kpd(real, gen, **kpd_args)
    out["kpd_floor"], out["kpd_floor_err"] = kpd(a, b, **kpd_args)
    return out
