"""The Python API the CLI is a thin layer over: train, sample, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hvae_ray.config import Config, load_config
from hvae_ray.errors import ConfigError, DataError


def resolve_data(data_path: str | Path | None, progress: bool = True) -> Path:
    """The given data file, or the default generated sample (q jets, made once and cached)."""
    if data_path is not None:
        return Path(data_path)
    from hvae_ray.data.generate import default_sample

    return default_sample(progress=progress)


def train(config: Config | str | Path | None = None, data_path: str | Path | None = None, *,
          save_dir: str | Path = "runs/train", log_dir: str | Path | None = None, resume: bool = False,
          save_test_indices: bool = False, overrides: dict[str, Any] | None = None,
          progress: bool = True, callbacks=()) -> dict[str, Any]:
    """Train a HyperVAE from a config (object, YAML path or None for defaults) on a data file.

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
    if not resume and (save_dir / "last" / CHECKPOINT_FILE).exists():
        raise DataError(f"{save_dir}: holds a previous run; pass --resume to continue it or choose "
                        "another --save-dir")
    from hvae_ray.outputs import check_output_dir

    check_output_dir(save_dir, "save folder")
    if log_dir is not None:
        check_output_dir(log_dir, "TensorBoard folder")
    sample = load_jets(resolve_data(data_path, progress))
    log_dir = Path(log_dir) if log_dir is not None else save_dir / "tb"
    return fit(cfg, sample, save_dir=save_dir, log_dir=log_dir, resume=resume, progress=progress,
               save_test_indices=save_test_indices, callbacks=callbacks)


#: Jets decoded and written per chunk by ``sample``: bounds its memory whatever ``n_jets`` is.
SAMPLE_CHUNK = 65_536


def sample(checkpoint: str | Path, n_jets: int, out: str | Path, seed: int = 0,
           device: str = "auto", overwrite: bool = False, progress: bool = False) -> Path:
    """Generate ``n_jets`` jets and write JetNet-layout ``particle_features`` (N, 30, 4) =
    (η_rel, φ_rel, pT_rel, mask) to ``out`` (.npz).

    Jets are decoded in chunks of ``SAMPLE_CHUNK`` and streamed to disk (memory stays bounded); the
    first chunk uses ``seed`` itself, chunk k a seed derived from (seed, k). The output path and the
    free disk space are checked before the model is loaded. A tqdm bar goes to stderr if ``progress``.
    """
    import zipfile

    from hvae_ray.data.jets import MAX_PARTICLES
    from hvae_ray.engine import generate, load_checkpoint, model_from_checkpoint, resolve_device
    from hvae_ray.outputs import check_free_space, check_output_file

    if isinstance(n_jets, bool) or not isinstance(n_jets, int) or n_jets < 1:
        raise ConfigError(f"n_jets must be an integer >= 1, got {n_jets!r}")
    out = check_output_file(out, overwrite=overwrite, suffix=".npz")
    n_bytes = n_jets * MAX_PARTICLES * 4 * 4  # float32 (N, 30, 4)
    check_free_space(out.parent, 2 * n_bytes + 2**20, f"sampling {n_jets} jets")  # array + archive
    model, normaliser, _ = model_from_checkpoint(load_checkpoint(checkpoint), where=str(checkpoint))
    dev = resolve_device(device)
    model = model.to(dev)
    tmp_npy = out.with_name(f".{out.name}.particle_features.npy")
    tmp_npz = out.with_name(out.name + ".tmp.npz")
    try:
        arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32,
                                        shape=(n_jets, MAX_PARTICLES, 4))
        from tqdm.auto import tqdm

        with tqdm(total=n_jets, unit="jet", desc="sampling", disable=not progress, leave=False) as bar:
            for k, start in enumerate(range(0, n_jets, SAMPLE_CHUNK)):
                b = min(SAMPLE_CHUNK, n_jets - start)
                chunk_seed = seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
                particles, mask = generate(model, normaliser, b, seed=chunk_seed, device=dev)
                arr[start:start + b, :, :3] = particles
                arr[start:start + b, :, 3] = mask
                bar.update(b)
        arr.flush()
        del arr
        with zipfile.ZipFile(tmp_npz, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            zf.write(tmp_npy, arcname="particle_features.npy")
        tmp_npz.replace(out)
    finally:
        tmp_npy.unlink(missing_ok=True)
        tmp_npz.unlink(missing_ok=True)
    return out


def _check_metric_sizes(sizes: dict) -> None:
    """Subsample sizes must be usable, checked before any jet is read."""
    lowest = {"num_eval_samples": 1, "num_batches": 1, "fpd_min_samples": 2, "fpd_max_samples": 2,
              "fpd_num_batches": 1, "fpd_num_points": 1, "kpd_num_batches": 1, "kpd_batch_size": 2}
    for key, value in sizes.items():
        if key in lowest and (isinstance(value, bool) or not isinstance(value, int) or value < lowest[key]):
            raise ConfigError(f"{key} must be an integer ≥ {lowest[key]}, got {value!r}")
    if sizes.get("fpd_min_samples", 20_000) > sizes.get("fpd_max_samples", 50_000):
        raise ConfigError(f"fpd_min_samples ({sizes.get('fpd_min_samples', 20_000)}) exceeds "
                          f"fpd_max_samples ({sizes.get('fpd_max_samples', 50_000)})")


def evaluate(real: str | Path, generated: str | Path, *, seed: int = 42, plots_dir: str | Path | None = None,
             log_dir: str | Path | None = None, overwrite: bool = False, **metric_kwargs) -> dict[str, float]:
    """The field's generation metrics (W1m, W1p, W1efp, FPD, KPD) of ``generated`` against ``real``,
    computed as jetnet 0.2.5 does (``physics.evaluate_generation``), each with its real-vs-real floor,
    the sample sizes and ``convention``; optional PNG plots (existing ones replaced only if
    ``overwrite``) and TensorBoard figures. Sizes and output folders are checked before any work."""
    from hvae_ray.data.io import load_jets
    from hvae_ray.physics import evaluate_generation

    _check_metric_sizes(metric_kwargs)
    if plots_dir is not None:
        from hvae_ray.outputs import check_output_dir
        from hvae_ray.plots import FIGURE_KEYS

        check_output_dir(plots_dir, "plots folder", files=[f"{k}.png" for k in FIGURE_KEYS],
                         overwrite=overwrite)
    if log_dir is not None:
        from hvae_ray.outputs import check_output_dir

        check_output_dir(log_dir, "TensorBoard folder")
    r, g = load_jets(real), load_jets(generated)
    result = evaluate_generation(r.particles, r.mask, g.particles, g.mask, seed=seed, **metric_kwargs)
    if plots_dir is not None or log_dir is not None:
        from hvae_ray.plots import distribution_figures, save_figures

        figs = distribution_figures(r.particles, r.mask, g.particles, g.mask)
        if plots_dir is not None:
            save_figures(figs, plots_dir, overwrite=overwrite)
        if log_dir is not None:
            from hvae_ray.tracking import TensorBoardLogger

            tb = TensorBoardLogger(log_dir)
            tb.log_figures(figs, 0, prefix="Evaluate")
            tb.close()
    return result
