"""Checkpoints: one file in ``last/``, rewritten every epoch, copied to ``best/`` at a new best; read back
without running code.

A checkpoint is a dict of tensors and plain values: ``model``, ``optimizer`` (a ``torch.optim.AdamW``
state dict), ``scaler``, ``epoch``, ``best``, ``best_epoch``, ``generation``, ``config``, ``normaliser``,
``test_indices``, ``rng_cpu`` (and ``rng_cuda`` on a GPU; with a moving average of the weights, ``model``
holds the average and ``train_model`` the trained weights). A run alone and a member of a population
write the same kind, so ``sample``, ``prior fit``, ``train --resume`` and ``trials --best`` take either.
Every write goes through :func:`hvae_ray.io_safe.atomic_write`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hvae_ray.config import Config, from_dict
from hvae_ray.data.dense import FeatureNormaliser
from hvae_ray.errors import ConfigError, DataError, HvaeError
from hvae_ray.io_safe import atomic_copy, atomic_write, atomic_write_text, write_failed
from hvae_ray.model.hypervae import HyperVAE

CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic, link-safe write: a crash mid-save never leaves a truncated checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random number generators' states a checkpoint keeps: ``rng_cpu``, and ``rng_cuda`` on a GPU."""
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set the generators back to a checkpoint's :func:`rng_state` (the CUDA one where both have a GPU)."""
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], device)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file or directory safely (``weights_only=True``: no code can run)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise DataError(f"{path}: not a readable hvae-ray checkpoint ({e.__class__.__name__})") from e
    if not isinstance(state, dict) or not {"model", "config", "normaliser"} <= set(state):
        raise DataError(f"{path}: not an hvae-ray checkpoint (missing model/config/normaliser)")
    return state


def model_from_checkpoint(state: dict[str, Any], where: str = "checkpoint"
                          ) -> tuple[HyperVAE, FeatureNormaliser, Config]:
    cfg = from_dict(state["config"], f"{where} config")
    model = HyperVAE(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError) as e:
        raise DataError(f"{where}: the model weights do not match the checkpoint's config") from e
    return model.eval(), FeatureNormaliser.from_state_dict(state["normaliser"]), cfg


def check_resumable(cfg: Config, state: dict[str, Any], where: Path) -> None:
    """The model shape of ``cfg`` must be the checkpoint's; a one-line error names the first difference."""
    saved = state["config"].get("model", {}) if isinstance(state["config"], dict) else {}
    for key, value in cfg.to_dict()["model"].items():
        if key != "dropout" and key in saved and saved[key] != value:
            raise ConfigError(f"{where}: cannot resume: 'model.{key}' is {value!r} here but {saved[key]!r} "
                              "in the checkpoint")


def resume_state(resume: bool | str | Path, save_dir: Path | None, cfg: Config
                 ) -> tuple[dict[str, Any], Path] | None:
    """The checkpoint ``fit(resume=...)`` continues from and where it was read, or None."""
    if not resume:
        return None
    src = Path(resume) if not isinstance(resume, bool) else (save_dir / "last" if save_dir else None)
    if src is None:
        raise HvaeError("resume=True needs a save_dir holding last/checkpoint.pt")
    state = load_checkpoint(src)
    check_resumable(cfg, state, src)
    return state, src


def save_epoch(state: dict[str, Any], save_dir: Path, is_best: bool) -> Path:
    """Write ``last/`` and, at a new best, copy it to ``best/``; returns ``last/``. A write that fails (a
    full disk, a read-only folder) is one :class:`DataError` line; the checkpoints already there stay whole."""
    last = save_dir / "last"
    target = last / CHECKPOINT_FILE
    try:
        save_checkpoint(target, state)
        if is_best:
            target = save_dir / "best" / CHECKPOINT_FILE
            atomic_copy(last / CHECKPOINT_FILE, target)
    except OSError as e:
        kept = f"{last / CHECKPOINT_FILE} is the last good checkpoint" if (last / CHECKPOINT_FILE).is_file() \
            else "no checkpoint was written"
        raise DataError(f"{write_failed(target, e)}; training stopped after epoch {state['epoch']}; {kept}") from e
    return last


def write_run_files(save_dir: Path, cfg: Config, test_indices=None) -> None:
    """The run's ``config.yaml`` (and, when given, ``test_indices.npy``: indices into the sample)."""
    import numpy as np
    import yaml

    atomic_write_text(save_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if test_indices is not None:
        atomic_write(save_dir / "test_indices.npy", lambda f: np.save(f, test_indices))
