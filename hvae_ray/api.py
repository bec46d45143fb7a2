"""The Python API the CLI is a thin layer over: generate data, train, fit a prior, sample, evaluate, and
the sweep functions (``run_sweep``, ``resume_sweep``, the trial table's), imported from the sweep layer
on first use."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hvae_ray.config import Config, load_config
from hvae_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def resolve_data(data_path: str | Path | None, progress: bool = True) -> Path:
    """The given data file, or the default generated sample (q jets, made once and cached)."""
    if data_path is not None:
        return Path(data_path)
    from hvae_ray.data.generate import default_sample

    return default_sample(progress=progress)


def generate_data(flavor: str, n_jets: int, out: str | Path, seed: int = 0, *, workers: int | None = None,
                  overwrite: bool = False, progress: bool = True) -> Path:
    """Generate ``n_jets`` jets of ``flavor`` with Pythia 8 + FastJet (``data.generate.generate_jets``)
    into the Parquet file ``out``, its metadata naming flavor and seed. The output path and the size
    (memory for the jets, disk for the file) are checked before any jet is generated."""
    from hvae_ray.data.generate import check_generation_size, generate_jets
    from hvae_ray.data.io import save_parquet
    from hvae_ray.outputs import check_output_file

    if isinstance(n_jets, bool) or not isinstance(n_jets, (int, np.integer)) or n_jets < 1:
        raise ConfigError(f"`n_jets` must be an integer >= 1, got {n_jets!r}")
    out = check_output_file(out, overwrite=overwrite, suffix=".parquet")  # before minutes of work
    check_generation_size(n_jets, out.parent)  # memory and disk, in one line, before any jet
    jets = generate_jets(flavor, n_jets, seed, workers=workers, progress=progress)
    return save_parquet(jets, out, metadata={"flavor": flavor, "seed": str(seed)}, overwrite=overwrite)


def train(config: Config | str | Path | None = None, data_path: str | Path | None = None, *,
          save_dir: str | Path = "runs/train", log_dir: str | Path | None = None, resume: bool = False,
          save_test_indices: bool = False, overrides: dict[str, Any] | None = None,
          progress: bool = True, callbacks=()) -> dict[str, Any]:
    """Train a HyperVAE from a config (object, YAML path or None for defaults) on a data file: ``data_path``,
    else the config's ``data.path``, else the default generated sample.

    Checkpoints go to ``save_dir/{last,best}``, TensorBoard files to ``log_dir`` (default
    ``save_dir/tb``). Refuses to start over an existing run in ``save_dir`` unless ``resume``.
    Returns the engine's final metrics.
    """
    from hvae_ray.data.io import load_jets
    from hvae_ray.engine import CHECKPOINT_FILE, fit

    cfg = config if isinstance(config, Config) else load_config(config)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    save_dir = Path(save_dir)
    from hvae_ray.io_safe import hold
    from hvae_ray.outputs import check_output_dir

    def previous_run() -> None:
        if not resume and (save_dir / "last" / CHECKPOINT_FILE).exists():
            raise DataError(f"{save_dir}: holds a previous run; continue it with `resume=True` or choose "
                            "another `save_dir`")

    previous_run()
    check_output_dir(save_dir, "save folder")
    if log_dir is not None:
        check_output_dir(log_dir, "TensorBoard folder")
    # One run per save folder: a second run on it (or one resuming it) is refused while this one lives.
    with hold(save_dir, "save folder"):
        previous_run()  # a run that took the folder while this one started
        sample = load_jets(resolve_data(data_path if data_path is not None else (cfg.data.path or None), progress))
        log_dir = Path(log_dir) if log_dir is not None else save_dir / "tb"
        return fit(cfg, sample, save_dir=save_dir, log_dir=log_dir, resume=resume, progress=progress,
                   save_test_indices=save_test_indices, callbacks=callbacks)


#: Jets decoded and written per chunk by ``sample``: bounds its memory whatever ``n_jets`` is.
SAMPLE_CHUNK = 65_536


#: Where ``sample`` draws latent codes from: N(0, 1), or the mixture fitted by ``fit_prior``.
PRIORS = ("standard", "fitted")


def _checkpoint_dir(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def sample_codes(checkpoint: str | Path, prior: str | None = None, posterior_of: str | Path | None = None,
                 temperature: float = 1.0) -> tuple[str | None, str]:
    """Where ``sample`` draws its codes from: (the prior, or None with ``posterior_of``; one line saying
    so). ``prior`` None: the fitted prior when one is stored beside the checkpoint (``prior.pt`` of
    :func:`fit_prior`), else ``standard``."""
    from hvae_ray.latent import PRIOR_FILE

    if prior is not None and prior not in PRIORS:
        raise ConfigError(f"`prior` must be one of {', '.join(PRIORS)}, got {prior!r}")
    if posterior_of is not None:  # instead of any prior
        return None, f"codes: one draw of q(z | x) of each jet of {posterior_of}"
    stored = _checkpoint_dir(checkpoint) / PRIOR_FILE
    chosen = prior or ("fitted" if stored.is_file() else "standard")
    if chosen == "fitted":
        line = f"codes: the fitted prior {stored}" + (f" at temperature {temperature:g}" if temperature != 1.0 else "")
        return chosen, line + (" (stored beside the checkpoint; `prior='standard'` for N(0, 1))"
                               if prior is None else "")
    return chosen, "codes: N(0, 1), the standard prior" + (" (no fitted prior beside the checkpoint)"
                                                           if prior is None else "")


def sample(checkpoint: str | Path, n_jets: int, out: str | Path, seed: int = 0,
           device: str = "auto", overwrite: bool = False, progress: bool = False, prior: str | None = None,
           posterior_of: str | Path | None = None, temperature: float = 1.0,
           report: Callable[[str], object] | None = None) -> Path:
    """Generate ``n_jets`` jets and write JetNet-layout ``particle_features`` (N, 30, 4) =
    (η_rel, φ_rel, pT_rel, mask) to ``out`` (.npz).

    Codes come from ``prior``: ``standard`` N(0, 1), or ``fitted``, the checkpoint folder's prior of
    :func:`fit_prior`, its random draws scaled by ``temperature``; None (the default): the fitted prior
    when one is stored beside the checkpoint, else N(0, 1). With ``posterior_of`` (a jet file)
    the codes are one draw from q(z | x) of each of its first ``n_jets`` jets instead: the model's
    reconstructions, which bound what any prior can reach. One line saying where the codes come from
    (:func:`sample_codes`) goes to ``report``, else to this module's logger (INFO), before any jet is
    decoded. Jets are decoded in chunks of ``SAMPLE_CHUNK`` and streamed to disk (memory stays bounded);
    the first chunk uses ``seed`` itself, chunk k a seed derived from (seed, k). The output path, the free
    disk space and the prior are checked before any jet is decoded. A tqdm bar goes to stderr if ``progress``.
    """
    from hvae_ray.data.jets import MAX_PARTICLES
    from hvae_ray.engine import load_checkpoint, model_from_checkpoint, resolve_device
    from hvae_ray.outputs import check_free_space, check_output_file

    _check_sample_args(n_jets, temperature)
    prior, line = sample_codes(checkpoint, prior, posterior_of, temperature)
    if temperature != 1.0 and prior != "fitted":
        raise ConfigError("`temperature` applies to the fitted prior only (`prior='fitted'`)")
    out = check_output_file(out, overwrite=overwrite, suffix=".npz")
    n_bytes = n_jets * MAX_PARTICLES * 4 * 4  # float32 (N, 30, 4), streamed into the archive
    check_free_space(out.parent, n_bytes + n_bytes // 500 + 2**20, f"sampling {n_jets} jets")  # + zip's worst case
    model, normaliser, cfg = model_from_checkpoint(load_checkpoint(checkpoint), where=str(checkpoint))
    dev = resolve_device(device)
    decoder = _JetDecoder(model.to(dev), normaliser, cfg, dev)
    if posterior_of is not None:
        decoder.posterior_of(posterior_of, n_jets)
    if prior == "fitted":
        decoder.fitted_prior(_checkpoint_dir(checkpoint), temperature)
    (report or log.info)(line)
    _write_particle_features(out, n_jets, seed, decoder, progress)
    return out


def _check_sample_args(n_jets: int, temperature: float) -> None:
    if isinstance(n_jets, bool) or not isinstance(n_jets, int) or n_jets < 1:
        raise ConfigError(f"`n_jets` must be an integer >= 1, got {n_jets!r}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature <= 10):
        raise ConfigError(f"`temperature` must be a number in (0, 10], got {temperature!r}")


class _JetDecoder:
    """Decodes chunks of jets from the codes ``sample`` was asked for: N(0, 1) (unless told otherwise),
    the fitted prior, or q(z | x) of real jets."""

    def __init__(self, model, normaliser, cfg: Config, device):
        self.model, self.normaliser, self.cfg, self.device = model, normaliser, cfg, device
        self.prior = self.real = None
        self.temperature = 1.0

    def fitted_prior(self, folder: Path, temperature: float) -> None:
        from hvae_ray.latent import load_prior

        self.prior, self.temperature = load_prior(folder, self.cfg.model.latent_dim), temperature

    def posterior_of(self, jets: str | Path, n_jets: int) -> None:
        from hvae_ray.data.io import load_jets

        self.real = load_jets(jets)
        if n_jets > len(self.real):
            raise ConfigError(f"{jets}: holds {len(self.real)} jets, fewer than the {n_jets} to decode")

    def __call__(self, start: int, b: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Jets ``start``…``start + b``: particles (b, 30, 3) and mask (b, 30)."""
        from hvae_ray.engine import generate
        from hvae_ray.latent import decode, encode, posterior_codes

        if self.real is not None:
            part, mask = self.real.particles[start:start + b], self.real.mask[start:start + b]
            mu, logvar = encode(self.model, self.normaliser, self.cfg, part, mask, self.device)
            return decode(self.model, self.normaliser, posterior_codes(mu, logvar, seed), self.device)
        if self.prior is not None:
            return decode(self.model, self.normaliser, self.prior.sample(b, seed, self.temperature), self.device)
        return generate(self.model, self.normaliser, b, seed=seed, device=self.device)


def _write_particle_features(out: Path, n_jets: int, seed: int, decode_chunk: _JetDecoder, progress: bool) -> None:
    """Decode ``n_jets`` jets chunk by chunk, each streamed into the archive's (N, 30, 4) array as it is
    decoded (memory stays one chunk); the archive is written through :func:`hvae_ray.io_safe.atomic_write`.
    A write that fails (full disk, read-only folder) is one DataError line; nothing is left behind."""
    import zipfile

    from tqdm.auto import tqdm

    from hvae_ray.data.jets import MAX_PARTICLES
    from hvae_ray.io_safe import atomic_write, write_failed

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf, \
                zf.open("particle_features.npy", "w", force_zip64=True) as member, \
                tqdm(total=n_jets, unit="jet", desc="sampling", disable=not progress, leave=False) as bar:
            np.lib.format.write_array_header_1_0(
                member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                         "shape": (n_jets, MAX_PARTICLES, 4)})
            for k, start in enumerate(range(0, n_jets, SAMPLE_CHUNK)):
                b = min(SAMPLE_CHUNK, n_jets - start)
                chunk_seed = seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
                particles, mask = decode_chunk(start, b, chunk_seed)
                arr = np.empty((b, MAX_PARTICLES, 4), dtype=np.float32)
                arr[:, :, :3] = particles
                arr[:, :, 3] = mask
                member.write(arr.tobytes())
                bar.update(b)

    try:
        atomic_write(out, write)
    except OSError as e:
        raise write_failed(out, e) from None


def fit_prior(checkpoint: str | Path, data_path: str | Path | None = None, *, kind: str = "gmm",
              components: int = 100, seed: int = 0, device: str = "auto", overwrite: bool = False) -> Path:
    """Fit a prior to the latent codes of the checkpoint's training jets and write it beside the
    checkpoint (``prior.pt``), which ``sample`` then draws from unless told ``prior="standard"``.

    ``kind`` ``gmm`` (default): a ``components``-Gaussian mixture (diagonal covariances, capped at the
    number of jets) fitted to the posterior means; ``flow``: a RealNVP flow fitted to one posterior
    draw per training jet; from at most ``PRIOR_FIT_JETS`` jets, a seeded subset. On the model of
    ``benchmarks/results/fidelity-2026-12-02-h200`` a 100-component mixture gave the best W1m and W1p
    (2.9e-3 and 4.6e-3, against 3.9e-3 and 5.6e-3 with 20 components, whose FPD was lower: 3.8e-3
    against 5.4e-3); the flow's tails decode to jets no real jet resembles (FPD 1.7e-2 even at
    temperature 0.8). ``data_path`` must be the file the model was trained on (default: the default
    sample, as ``train``): the training split is recomputed from the checkpoint's config (same seed,
    fractions, max_jets). Ex-post density estimation, Ghosh et al., arXiv:1903.12436.
    """
    from hvae_ray.data.io import load_jets
    from hvae_ray.engine import load_checkpoint, model_from_checkpoint, prepare, resolve_device
    from hvae_ray.latent import PRIOR_FILE, PRIOR_KINDS, FlowPrior, GaussianMixture, encode, posterior_codes, save_prior

    if kind not in PRIOR_KINDS:
        raise ConfigError(f"`kind` must be one of {', '.join(PRIOR_KINDS)}, got {kind!r}")
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ConfigError(f"`components` must be an integer >= 1, got {components!r}")
    folder = _checkpoint_dir(checkpoint)
    if (folder / PRIOR_FILE).exists() and not overwrite:
        raise DataError(f"{folder / PRIOR_FILE}: already exists; not overwriting it (use `overwrite=True`)")
    model, normaliser, cfg = model_from_checkpoint(load_checkpoint(checkpoint), where=str(checkpoint))
    dev = resolve_device(device)
    splits = prepare(cfg, load_jets(resolve_data(data_path, progress=False)), normaliser)
    index = splits.train
    if len(index) > PRIOR_FIT_JETS:
        index = np.sort(np.random.default_rng(seed).choice(index, PRIOR_FIT_JETS, replace=False))
    train = splits.sample.subset(index)
    mu, logvar = encode(model.to(dev), normaliser, cfg, train.particles, train.mask, dev)
    if kind == "flow":
        prior = FlowPrior.fit(posterior_codes(mu, logvar, seed), seed=seed, device=dev)
        meta = {"kind": kind, "n_jets": len(mu), "seed": seed}
    else:
        prior = GaussianMixture.fit(mu, components=components, seed=seed, device=dev)
        meta = {"kind": kind, "components": len(prior.weights), "seed": seed, "n_jets": len(mu)}
    meta["mean_log_likelihood"] = float(prior.log_prob(mu).mean())
    return save_prior(folder, prior, meta)


#: At most this many training jets' codes are used by ``fit_prior`` (a seeded subset).
PRIOR_FIT_JETS = 50_000


#: Bytes a metric subsample of one jet takes while it is drawn (int64 indices, then their counts).
SUBSAMPLE_BYTES_PER_JET = 16
#: Subsample batches and FPD sizes a metric may ask for (each a pass over its subsample).
MAX_METRIC_BATCHES = 100_000


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _check_metric_sizes(sizes: dict) -> None:
    """Subsample sizes must be usable, checked before any jet is read."""
    lowest = {"num_eval_samples": 1, "num_batches": 1, "fpd_min_samples": 2, "fpd_max_samples": 2,
              "fpd_num_batches": 1, "fpd_num_points": 1, "kpd_num_batches": 1, "kpd_batch_size": 2}
    for key, value in sizes.items():
        if key in lowest and (isinstance(value, bool) or not isinstance(value, int) or value < lowest[key]):
            raise ConfigError(f"`{key}` must be an integer ≥ {lowest[key]}, got {value!r}")
    if sizes.get("fpd_min_samples", 20_000) > sizes.get("fpd_max_samples", 50_000):
        raise ConfigError(f"`fpd_min_samples` ({sizes.get('fpd_min_samples', 20_000)}) exceeds "
                          f"`fpd_max_samples` ({sizes.get('fpd_max_samples', 50_000)})")
    for key in ("num_batches", "fpd_num_batches", "fpd_num_points", "kpd_num_batches"):
        if sizes.get(key, 0) > MAX_METRIC_BATCHES:
            raise ConfigError(f"`{key}` must be at most {MAX_METRIC_BATCHES}, got {sizes[key]}")
    from hvae_ray.outputs import format_bytes

    memory = _physical_memory()
    for key in ("num_eval_samples", "fpd_max_samples", "kpd_batch_size"):
        n = sizes.get(key, 0)
        need = SUBSAMPLE_BYTES_PER_JET * n  # the draw's indices and their counts
        if memory and need > memory // 2:
            raise ConfigError(f"`{key}` of {n} jets needs about {format_bytes(need)} of memory per subsample; "
                              f"this machine has {format_bytes(memory)}")


def _per_side(per_side: int | str, n_real: int, n_gen: int) -> int | None:
    """Jets per side of a same-N comparison: ``"auto"``, as many as both files allow (the generated
    jets, at most half the real ones); ``"all"`` (None), every generated jet against every real one;
    or N, checked against the files."""
    if per_side == "all":
        return None
    n = max(2, min(n_gen, n_real // 2)) if per_side == "auto" else per_side
    if n_real < 2 * n or n_gen < n:
        raise DataError(f"{n} jets per side needs {2 * n} real jets (the value's and the floor's) and {n} "
                        f"generated jets; the files hold {n_real} and {n_gen}")
    return n


def evaluate(real: str | Path, generated: str | Path, *, seed: int = 42, per_side: int | str = "auto",
             plots_dir: str | Path | None = None, log_dir: str | Path | None = None, overwrite: bool = False,
             **metric_kwargs) -> dict[str, float]:
    """The field's generation metrics (W1m, W1p, W1efp, FPD, KPD) of ``generated`` against ``real``,
    computed as jetnet 0.2.5 does (``evaluation.metrics.evaluate_generation``), each with its
    real-vs-real floor, the sample sizes and ``convention``; optional PNG plots (existing ones replaced
    only if ``overwrite``) and TensorBoard figures. Sizes and output folders are checked before any work.

    ``per_side`` (default ``"auto"``): N generated against N real jets, the floor between those N real
    jets and N others, and each metric's ratio to its floor (``M_ratio``); ``"auto"`` takes the largest N
    the files allow, ``"all"`` every jet of both files (the floor then from two halves of the real ones,
    no ratios). The papers' scale is 50,000 per side: 100,000 real jets and 50,000 generated."""
    from hvae_ray.data.io import load_jets
    from hvae_ray.evaluation.metrics import evaluate_generation
    from hvae_ray.outputs import check_output_dir

    _check_metric_sizes(metric_kwargs)
    if not (per_side in ("auto", "all") or (isinstance(per_side, int) and not isinstance(per_side, bool)
                                            and per_side >= 2)):
        raise ConfigError(f"jets per side must be 'auto', 'all' or an integer ≥ 2, got {per_side!r}")
    # The generated jets skip the physical-range check: how unphysical they are is what the metrics measure.
    r, g = load_jets(real), load_jets(generated, check_ranges=False)
    n = _per_side(per_side, len(r), len(g))
    if plots_dir is not None:
        from hvae_ray.evaluation.plots import FIGURE_KEYS

        check_output_dir(plots_dir, "plots folder", files=[f"{k}.png" for k in FIGURE_KEYS],
                         overwrite=overwrite)
    if log_dir is not None:
        check_output_dir(log_dir, "TensorBoard folder")
    result = evaluate_generation(r.particles, r.mask, g.particles, g.mask, seed=seed, per_side=n, **metric_kwargs)
    if plots_dir is not None or log_dir is not None:
        from hvae_ray.evaluation.plots import distribution_figures, save_figures

        figs = distribution_figures(r.particles, r.mask, g.particles, g.mask)
        if plots_dir is not None:
            save_figures(figs, plots_dir, overwrite=overwrite)
        if log_dir is not None:
            from hvae_ray.tracking import TensorBoardLogger

            tb = TensorBoardLogger(log_dir)
            tb.log_figures(figs, 0, prefix="Evaluate")
            tb.close()
    return result


#: The sweep functions, by the module that defines them: imported on first use (the trial table's
#: with pyarrow, the sweeps' with Ray when they start).
SWEEP_FUNCTIONS = {
    "run_sweep": ("hvae_ray.sweep.tune", "run_sweep"),
    "resume_sweep": ("hvae_ray.sweep.tune", "resume_sweep"),
    "load_trials": ("hvae_ray.sweep.trials", "load_trials"),
    "sort_trials": ("hvae_ray.sweep.trials", "sort_trials"),
    "best_config_yaml": ("hvae_ray.sweep.trials", "best_config_yaml"),
    "export_trials": ("hvae_ray.sweep.trials", "export"),
    "format_trials": ("hvae_ray.sweep.trials", "format_table"),
    "sweep_metric": ("hvae_ray.sweep.trials", "sweep_metric"),
    "write_report": ("hvae_ray.sweep.report", "write_report"),
    "sign_experiment": ("hvae_ray.sweep.tune", "sign_experiment"),
}


def __getattr__(name: str):
    if name in SWEEP_FUNCTIONS:
        import importlib

        module, attr = SWEEP_FUNCTIONS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hvae_ray.api' has no attribute {name!r}")
