"""The HParams view of a sweep: each trial's session lists what sets it apart, and says how it ended.

The sweep's driver writes a trial's HParams session into the trial's own TensorBoard run when Tune
ends the trial (run to the end, stopped by ASHA, diverged or failed): the searched keys, every
effective config key that differs from the base config, ``outcome`` in the trial table's words, and
the session status (completed → success, diverged or error → failure, early-stopped → unknown).
TensorBoard keeps the first HParams summary of a run, so the session is written once, at the end: a
trial still training shows in the Scalars tab, and in the HParams tab once it has ended.

What the tab shows (:func:`shown_hparams`): each session is named by the trial table's trial id;
integer settings are written as text, since TensorBoard prints every number with five significant
digits (``200.00``); a key searched on a log scale (``loguniform``) is also written as
``log10(<key>)``, so parallel coordinates spread its values instead of bunching them at 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ray.tune import Callback

from hvae_ray.sweep.layout import EPOCHS_DONE, TrialPaths, is_diverged
from hvae_ray.sweep.spec import SweepSpec
from hvae_ray.tracking import HPARAM_METRICS, TensorBoardLogger

__all__ = ["trial_hparams", "shown_hparams", "write_trial_hparams", "TrialOutcomeCallback"]


def trial_hparams(spec: SweepSpec, sampled: dict[str, Any]) -> dict[str, Any]:
    """The searched keys and every effective config key that differs from the sweep's base config
    (a trial's config is the base with its sampled values applied), dotted, as TensorBoard shows them."""
    effective = spec.trial_config(sampled).flat()
    base = spec.base.flat()
    return {k: v for k, v in effective.items() if k in sampled or base.get(k) != v}


def shown_hparams(spec: SweepSpec, hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` as the HParams tab shows them: integers as text, and ``log10(<key>)`` beside each
    positive value of a key the sweep searches on a log scale."""
    log_keys = {k for k, dist in spec.search_space.items() if "loguniform" in dist}
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        out[key] = str(value) if number and isinstance(value, int) else value
        if key in log_keys and number and value > 0:
            out[f"log10({key})"] = math.log10(value)
    return out


def write_trial_hparams(tb_dir: str | Path, hparams: dict[str, Any], outcome: str, trial_id: str = "") -> None:
    """The trial's HParams session, named ``trial_id`` in the HParams tab (default: its run's folder)."""
    tb = TensorBoardLogger(tb_dir)
    tb.log_hparams({**hparams, "outcome": outcome}, dict.fromkeys(HPARAM_METRICS, 0.0), outcome=outcome,
                   group_name=trial_id)
    tb.close()


def outcome_of(last_result: dict[str, Any] | None, max_t: int, errored: bool = False) -> str:
    """How a trial ended, in the trial table's words."""
    if errored:
        return "error"
    last = last_result or {}
    if is_diverged(last):
        return "diverged"
    return "completed" if last.get(EPOCHS_DONE, 0) >= max_t else "early_stopped"


class TrialOutcomeCallback(Callback):
    """Runs in the sweep's driver: completes a trial's HParams session when Tune ends the trial."""

    def __init__(self, spec: SweepSpec, experiment_dir: str | Path):
        self.spec = spec
        self.experiment_dir = Path(experiment_dir)

    def _write(self, trial, errored: bool) -> None:
        tb_dir = TrialPaths.of(self.experiment_dir, trial.trial_id).tensorboard
        if not any(tb_dir.glob("events.out.tfevents.*")):  # the trial never started
            return
        sampled = {k: v for k, v in trial.config.items() if k in self.spec.search_space}
        outcome = outcome_of(trial.last_result, self.spec.scheduler.max_t, errored)
        write_trial_hparams(tb_dir, shown_hparams(self.spec, trial_hparams(self.spec, sampled)), outcome,
                            trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._write(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._write(trial, errored=True)
