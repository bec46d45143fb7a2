"""Metric names (one namespace), the TensorBoard writer, and figures of real vs generated jets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hvae_ray.config import COMPONENTS

# Metric keys reported by the engine each epoch → TensorBoard tags.
TAGS: dict[str, str] = {
    "train_total": "Loss/train_total",
    "train_kl": "Loss/train_kl",
    "kl_weight": "KL/weight",
    "val_total": "Loss/val_total",
    "val_kl": "Loss/val_kl",
    "val_recon": "Loss/val_recon",
    "val_objective": "Loss/val_objective",
    "val_w1m": "Metrics/val_w1m",
    "lr": "Train/lr",
    "epoch_time_s": "Train/epoch_time_s",
}
for _c in COMPONENTS:
    TAGS[f"train_{_c}"] = f"Loss/train_{_c}"
    TAGS[f"val_{_c}"] = f"Loss/val_{_c}"

# Metric columns of TensorBoard's HParams tab (values read from these scalar tags of each run).
HPARAM_METRICS = ("Loss/val_objective", "Loss/val_recon", "Loss/val_kl", "Metrics/val_w1m")

REQUIRED_TAGS = ("Loss/train_total", "Loss/train_kl", "KL/weight", "Loss/val_total", "Loss/val_kl",
                 *(f"Loss/{s}_{c}" for s in ("train", "val") for c in COMPONENTS))


class TensorBoardLogger:
    """Writes the engine's per-epoch metrics under their tags; one event file per run directory."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        for key, tag in TAGS.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def log_figures(self, figures: dict[str, Any], step: int, prefix: str = "Distributions") -> None:
        for name, fig in figures.items():
            self.writer.add_figure(f"{prefix}/{name}", fig, step, close=False)
        self.writer.flush()

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """HParams summary in this run's own directory, so `tensorboard --logdir EXPERIMENT` lists every
        run in the HParams tab. ``metrics`` names the scalar tags shown as metric columns."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, sei = hparams_summary(clean, dict(metrics))
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
