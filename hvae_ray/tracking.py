"""Metric names (the one namespace: TensorBoard tags, what sweeps rank on, what the trial table and the
terminal show) and the TensorBoard writer."""

from __future__ import annotations

import math
from collections.abc import Iterable
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
    "val_w1p": "Metrics/val_w1p",
    "val_fpd": "Metrics/val_fpd",
    "val_generation": "Metrics/val_generation",
    "lr": "Train/lr",
    "epoch_time_s": "Train/epoch_time_s",
}
for _c in COMPONENTS:
    TAGS[f"train_{_c}"] = f"Loss/train_{_c}"
    TAGS[f"val_{_c}"] = f"Loss/val_{_c}"

# Best-so-far scalars, written beside the per-epoch ones: the lowest value up to each epoch, and the KL
# of the best epoch by val_objective (the epoch a run keeps in best/ when its objective is reconstruction;
# with objective: generation it keeps the best by val_generation). TensorBoard lists tag groups in
# alphabetical order: this group's name puts it after KL and Loss, the ones to look at first.
BEST_GROUP = "Lowest"
BEST_TAGS: dict[str, str] = {
    "val_objective": f"{BEST_GROUP}/val_objective",
    "val_recon": f"{BEST_GROUP}/val_recon",
    "val_w1m": f"{BEST_GROUP}/val_w1m",
    "val_fpd": f"{BEST_GROUP}/val_fpd",
    "val_generation": f"{BEST_GROUP}/val_generation",
}
KL_AT_BEST_TAG = f"{BEST_GROUP}/val_kl_at_best"

# Whether the KL levels off: the least-squares slope of val_kl (nats per epoch) over the last
# KL_SLOPE_EPOCHS epochs up to each epoch (from the second epoch on).
KL_SLOPE_EPOCHS = 20
KL_SLOPE_TAG = f"KL/slope_last{KL_SLOPE_EPOCHS}"

# Metric columns of TensorBoard's HParams tab (values read from these scalar tags of each run): the
# last value next to the best so far.
HPARAM_METRICS = ("Loss/val_objective", BEST_TAGS["val_objective"], "Loss/val_recon", BEST_TAGS["val_recon"],
                  "Loss/val_kl", KL_AT_BEST_TAG, "Metrics/val_w1m", BEST_TAGS["val_w1m"],
                  "Metrics/val_fpd", BEST_TAGS["val_fpd"], "Metrics/val_generation", BEST_TAGS["val_generation"],
                  KL_SLOPE_TAG)

# Session statuses of the HParams tab, by how a run ended (in the trial table's words); a run still going
# has no session end, and so no status (the tab shows it as unknown).
SESSION_STATUS = {"completed": "STATUS_SUCCESS", "early_stopped": "STATUS_UNKNOWN",
                  "diverged": "STATUS_FAILURE", "error": "STATUS_FAILURE"}

# Metrics a sweep may rank its trials on (``scheduler.metric``).
RANKABLE_METRICS = ("val_objective", "val_recon", "val_w1m", "val_total", "val_generation", "val_fpd")

# Metrics of the trial table: best_<m>, last_<m> and <m>_at_best columns for each.
TRIAL_METRICS = ("val_objective", "val_recon", "val_kl", "val_w1m", "val_fpd", "val_generation", "val_total",
                 "train_total", "train_kl")

# What ``hvae-ray train`` prints: after each epoch (metric, how it is shown, its number format), and
# at the end of the run.
EPOCH_LINE = (("train_total", "train {}", ".4g"), ("val_total", "val {}", ".4g"), ("val_kl", "kl {}", ".4g"),
              ("kl_weight", "β {}", ".2g"), ("val_w1m", "val_w1m {}", ".4g"), ("val_fpd", "val_fpd {}", ".4g"),
              ("epoch_time_s", "{} s", ".2f"))
RUN_SUMMARY = ("epochs_run", "train_total", "val_total", "val_kl", "val_objective", "val_w1m")


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None with fewer than two distinct x."""
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def kl_slope(val_kl_by_epoch: list[tuple[float, float]]) -> float | None:
    """The slope of val_kl over the last ``KL_SLOPE_EPOCHS`` (epoch, val_kl) points."""
    return slope(val_kl_by_epoch[-KL_SLOPE_EPOCHS:])


class TensorBoardLogger:
    """Writes the engine's per-epoch metrics under their tags; one event file per run directory."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.kl_history: list[tuple[float, float]] = []  # (epoch, val_kl), for the KL slope
        self.best = self._previous_bests()  # a resumed run continues its best-so-far curves
        self.writer = SummaryWriter(str(self.log_dir))

    def _previous_bests(self) -> dict[str, float]:
        if not any(self.log_dir.glob("events.out.tfevents.*")):
            return {}
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(self.log_dir), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))
        best = {key: min(e.value for e in acc.Scalars(tag)) for key, tag in BEST_TAGS.items() if tag in tags}
        if KL_AT_BEST_TAG in tags:
            best["kl_at_best"] = acc.Scalars(KL_AT_BEST_TAG)[-1].value
        if TAGS["val_kl"] in tags:
            last = {e.step: e.value for e in acc.Scalars(TAGS["val_kl"])}  # an epoch written twice: its last
            self.kl_history = sorted(last.items())[-KL_SLOPE_EPOCHS:]
        return best

    def log_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        def finite(key: str) -> float | None:
            value = metrics.get(key)
            return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

        for key, tag in TAGS.items():
            if (value := finite(key)) is not None:
                self.writer.add_scalar(tag, value, epoch)
        for key, tag in BEST_TAGS.items():
            if (value := finite(key)) is None:
                continue
            if key == "val_objective" and value < self.best.get(key, math.inf) and finite("val_kl") is not None:
                self.best["kl_at_best"] = finite("val_kl")
            self.best[key] = min(value, self.best.get(key, math.inf))
            self.writer.add_scalar(tag, self.best[key], epoch)
        if "kl_at_best" in self.best and finite("val_objective") is not None:
            self.writer.add_scalar(KL_AT_BEST_TAG, self.best["kl_at_best"], epoch)
        if (kl := finite("val_kl")) is not None:
            self.kl_history = ([(e, v) for e, v in self.kl_history if e < epoch] + [(epoch, kl)])[-KL_SLOPE_EPOCHS:]
            if (s := kl_slope(self.kl_history)) is not None:
                self.writer.add_scalar(KL_SLOPE_TAG, s, epoch)
        self.writer.flush()

    def log_figures(self, figures: dict[str, Any], step: int, prefix: str = "Distributions") -> None:
        for name, fig in figures.items():
            self.writer.add_figure(f"{prefix}/{name}", fig, step, close=False)
        self.writer.flush()

    def log_hparams_start(self, hparams: dict[str, Any], metrics: Iterable[str] = HPARAM_METRICS,
                          group_name: str = "") -> None:
        """The start of this run's HParams session, in the run's own directory (so `tensorboard --logdir
        EXPERIMENT` lists every run in the HParams tab): the experiment summary (``hparams``' keys and the
        scalar tags ``metrics`` as the tab's columns) and the session's values. ``group_name`` is the
        session's name in the tab (its "Trial ID"; default: the run's folder). The metric columns are read
        from the run's scalars, so they follow the run as it writes them. TensorBoard keeps the first
        summary of each tag in a run: write a run's start once."""
        from tensorboard.plugins.hparams import plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        exp, ssi, _ = hparams_summary(clean, dict.fromkeys(metrics, 0.0))
        if group_name:
            meta = ssi.value[0].metadata.plugin_data
            start = plugin_data_pb2.HParamsPluginData.FromString(meta.content)
            start.session_start_info.group_name = group_name
            meta.content = start.SerializeToString()
        fw = self.writer.file_writer  # SummaryWriter's event file writer (public attribute while open)
        for s in (exp, ssi):
            fw.add_summary(s)
        self.writer.flush()

    def log_hparams_end(self, outcome: str) -> None:
        """The end of this run's HParams session: its status for ``outcome``, a key of ``SESSION_STATUS``.
        A session without an end has no status (the tab shows unknown). TensorBoard keeps the first end of
        a run: write it once, when the run has ended."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        if outcome not in SESSION_STATUS:
            raise ValueError(f"unknown outcome {outcome!r}: one of {', '.join(SESSION_STATUS)}")
        end = plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(SESSION_STATUS[outcome])),
            version=0)
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                      content=end.SerializeToString()))
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG,
                                                                         metadata=meta)]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
