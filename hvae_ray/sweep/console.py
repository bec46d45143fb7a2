"""The sweep's console: a line when a trial starts and a line when it ends, in the trial table's words.

:class:`SweepConsole` is a Ray Tune callback run by the sweep's driver. It prints a header, then for each
trial (named by the trial table's id):

- ``started``: its searched values;
- its end, with the table's status (completed, early_stopped, diverged, error), the epochs it ran, the
  ranking metric (``scheduler.metric``: the last value and the trial's best) and ``val_kl``, the ASHA
  rungs it passed, how many of the sweep's trials have finished and about how long the rest take.

An ASHA rung reached (``epochs_done`` equal to ``grace_period * reduction_factor**k``) goes to a status
line that is rewritten in place on a terminal, with the overall progress and the estimate; the trial's
end line lists the rungs it passed (and the one that stopped it). So the console holds at most two lines
per trial, whatever the rungs, and a log file gets the same lines without the status line.

Ray's own output (its result boxes, progress tables, its ``Tuner.restore`` hint on Ctrl+C, and the
raylet's notice that many worker processes started) is hidden: Tune runs with ``verbose=0``.
``hvae-ray sweep run/resume --verbose`` (or ``HVAE_RAY_VERBOSE=1``) brings it back in place of this
console.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from hvae_ray.errors import HvaeError
from hvae_ray.sweep.hparams import outcome_of
from hvae_ray.sweep.layout import EPOCHS_DONE, ERROR, TrialPaths, read_sweep_state
from hvae_ray.sweep.ray_internals import filter_driver_messages, run_config_of
from hvae_ray.sweep.spec import SweepSpec

__all__ = ["SweepConsole", "VERBOSE_ENV", "TUNE_OUTPUT_ENV", "verbose", "tune_verbosity", "console_callbacks",
           "on_restore", "rungs", "expected_epochs"]

#: Set to 1 for Ray's own console output instead of this one (``--verbose`` sets it).
VERBOSE_ENV = "HVAE_RAY_VERBOSE"


def verbose() -> bool:
    """Whether Ray's own console output is wanted (``HVAE_RAY_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "0").strip().lower() in ("1", "true", "yes")


#: Tune's choice of console engine, read when a run starts: "0" is its legacy engine. The default engine
#: prints its experiment box, its closing trial table and each error at any ``verbose``; at ``verbose=0``
#: the legacy one prints nothing.
TUNE_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
_set_output_env = False


def tune_verbosity() -> int:
    """Tune's ``verbose`` for a run starting now: 0 (silent: this console speaks, and Tune's legacy engine is
    selected, which keeps quiet at 0) unless Ray's output is wanted (1, with the engine the user had)."""
    global _set_output_env
    if verbose():
        if _set_output_env:
            os.environ.pop(TUNE_OUTPUT_ENV, None)
            _set_output_env = False
        return 1
    if os.environ.get(TUNE_OUTPUT_ENV) != "0":
        os.environ[TUNE_OUTPUT_ENV] = "0"
        _set_output_env = True
    return 0


def console_callbacks(spec: SweepSpec, experiment_dir: str | Path) -> list[Callback]:
    """The console callback for a sweep's run config, or none when Ray's own output is wanted."""
    return [] if verbose() else [SweepConsole(spec, experiment_dir)]


def on_restore(tuner, spec: SweepSpec, experiment_dir: str | Path) -> None:
    """A restored Tuner keeps the run config it was saved with: set its verbosity and console for this
    run (a fresh console, also for experiments saved without one)."""
    run_config = run_config_of(tuner)
    if run_config is None:
        return
    run_config.verbose = tune_verbosity()
    kept = [c for c in (run_config.callbacks or []) if not isinstance(c, SweepConsole)]
    run_config.callbacks = kept + console_callbacks(spec, experiment_dir)


def _population_of(experiment_dir: str | Path) -> tuple[int, int] | None:
    """(slots, executors) when the sweep's trials train as population members, from its state file."""
    try:
        state = read_sweep_state(experiment_dir)
    except HvaeError:
        return None
    return (state.population_slots, state.population_executors) if state.population_slots > 0 else None


def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """ASHA's rungs: the epochs ``grace_period * reduction_factor**k`` below ``max_t`` at which it compares trials."""
    out, k = [], 0
    while (r := grace_period * reduction_factor ** k) < max_t:
        out.append(int(r))
        k += 1
    return out


def expected_epochs(grace_period: int, reduction_factor: float, max_t: int) -> float:
    """Epochs a trial trains on average under ASHA: all of them reach the first rung, and a
    ``1 / reduction_factor`` share of those at each rung go on to the next (or to ``max_t``)."""
    marks = [*rungs(grace_period, reduction_factor, max_t), max_t]
    total, share, previous = 0.0, 1.0, 0
    for i, mark in enumerate(marks):
        total += share * (mark - previous)
        previous = mark
        if i < len(marks) - 1:
            share /= reduction_factor
    return total


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _TuneRunLog(logging.Filter):
    """Drops what Tune's run loop logs below a warning, and its hints at the end of an interrupted run
    ("Resume experiment with: Tuner.restore(...)", "Trials did not complete"): the sweep's command prints
    its own, with the command to resume."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        text = record.getMessage()
        return record.levelno >= logging.WARNING and not ("Tuner.restore(" in text
                                                          or text.startswith("Trials did not complete"))


_TUNE_LOG_FILTER = _TuneRunLog()

#: Raylet messages the driver prints that say nothing a sweep's user can act on: a sweep starts more
#: worker processes at once than Ray expects (each trial is a chain of three processes).
_RAYLET_NOISE = ("PYTHON worker processes have been started",)


def _raylet_noise(message: dict[str, Any]) -> bool:
    """The raylet's start-up concurrency notice (unless Ray's own output is wanted)."""
    lines = message.get("lines", [])
    return (not verbose() and message.get("pid") == "raylet" and bool(lines)
            and all(any(n in ln for n in _RAYLET_NOISE) for ln in lines))


def _quiet_raylet_notices() -> None:
    """Keep the raylet's start-up concurrency notice off the console; every other message passes."""
    filter_driver_messages(_raylet_noise)


class SweepConsole(Callback):
    """Prints the sweep's trial events (see the module docstring). Holds no stream, so that it pickles
    with the Tuner's run config: it writes to ``sys.stdout`` as it is when it prints."""

    def __init__(self, spec: SweepSpec, experiment_dir: str | Path):
        sched = spec.scheduler
        self.experiment_dir = str(experiment_dir)
        self.name = spec.name
        self.metric, self.mode, self.max_t = sched.metric, sched.mode, int(sched.max_t)
        self.rungs = rungs(sched.grace_period, sched.reduction_factor, sched.max_t)
        self.per_trial = expected_epochs(sched.grace_period, sched.reduction_factor, sched.max_t)
        self.searched = list(spec.search_space)
        self.total = spec.expected_trials()
        self.concurrent = spec.max_concurrent_trials
        self.population = _population_of(experiment_dir)
        self._reset()

    def _reset(self) -> None:
        self.started_at: float | None = None
        self.finished: dict[str, int] = {}  # trial id -> epochs it ran
        self.broken: set[str] = set()  # trials that diverged or failed
        self.epochs: dict[str, int] = {}  # trial id -> epochs done, as reported
        self.best: dict[str, float] = {}
        self.passed: dict[str, list[int]] = {}
        self.announced: set[str] = set()
        self.status_shown = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(started_at=None, finished={}, broken=set(), epochs={}, best={}, passed={}, announced=set(),
                     status_shown=False)  # a run's progress is not saved with the run config
        return state

    # -- output

    @property
    def _out(self):
        return sys.stdout

    def _tty(self) -> bool:
        try:
            return self._out.isatty()
        except (AttributeError, ValueError):
            return False

    def _line(self, text: str) -> None:
        out = self._out
        if self.status_shown:
            out.write("\r\x1b[K")
            self.status_shown = False
        out.write(text + "\n")
        out.flush()

    def _status(self, text: str) -> None:
        if not self._tty():
            return
        out = self._out
        out.write("\r\x1b[K" + text[: max(20, _columns() - 1)])
        out.flush()
        self.status_shown = True

    # -- progress

    def _progress(self, trials: list) -> str:
        done = len(self._finished_ids(trials))
        text = f"{done}/{self.total} finished"
        left = self.seconds_left(trials)
        if done < self.total and left is not None and left >= 1:
            text += f", about {_duration(left)} left"
        return text

    def _finished_ids(self, trials: list) -> set[str]:
        ended = {t.trial_id for t in trials if getattr(t, "status", None) in ("TERMINATED", "ERROR")}
        return ended | set(self.finished)

    def seconds_left(self, trials: list, now: float | None = None) -> float | None:
        """The sweep's remaining time: the epochs still to train (a trial trains the mean epochs of the
        trials ASHA has ended, or ASHA's expectation before it has ended any: diverged and failed trials
        say nothing of it), at the rate the sweep has trained epochs since its first trial started. None
        before any epoch was reported."""
        trained = sum(self.epochs.values())
        if self.started_at is None or trained <= 0:
            return None
        elapsed = (now if now is not None else time.monotonic()) - self.started_at
        finished = self._finished_ids(trials)
        ran = [self.finished[t] for t in self.finished if t not in self.broken]
        per_trial = sum(ran) / len(ran) if ran else self.per_trial
        running = sum(min(e, per_trial) for t, e in self.epochs.items() if t not in finished)
        remaining = max(0.0, (self.total - len(finished)) * per_trial - running)
        return remaining * elapsed / trained

    # -- Tune's callbacks

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        logging.getLogger("ray.tune.tune").addFilter(_TUNE_LOG_FILTER)
        _quiet_raylet_notices()
        self._reset()
        rungs = ", ".join(map(str, self.rungs)) or "none"
        at_once = f", {self.concurrent} at a time" if self.concurrent else ""
        if self.population:
            slots, executors = self.population
            at_once = (f", as members of {executors} populations of {slots}" if executors > 1 else
                       f", as members of one population of {slots}")
        self._line(f"sweep {self.name}: {self.total} trials{at_once}; ASHA on {self.metric} ({self.mode}), "
                   f"rungs at epoch {rungs}, at most {self.max_t} epochs")

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
        tid = trial.trial_id
        if tid in self.announced:
            return  # restarted after a failure: said already
        self.announced.add(tid)
        values = " ".join(f"{k}={_number(trial.config[k])}" for k in self.searched if k in trial.config)
        self._line(f"{tid} started  {values}".rstrip())

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        tid = trial.trial_id
        done = result.get(EPOCHS_DONE)
        if isinstance(done, (int, float)):
            self.epochs[tid] = int(done)
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            old = self.best.get(tid)
            better = old is None or (value < old if self.mode == "min" else value > old)
            self.best[tid] = value if better else old
        if isinstance(done, (int, float)) and int(done) in self.rungs:
            self.passed.setdefault(tid, []).append(int(done))
            self._status(f"{tid} reached rung {int(done)}: {self.metric} {_number(value)}, "
                         f"val_kl {_number(result.get('val_kl'))} · {self._progress(trials)}")
        elif self.started_at is not None:
            self._status(f"{tid} epoch {_number(done)}: {self.metric} {_number(value)} · {self._progress(trials)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trials, trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trials, trial, errored=True)

    def on_experiment_end(self, trials: list, **info) -> None:
        done = len(self._finished_ids(trials))
        took = _duration(time.monotonic() - self.started_at) if self.started_at is not None else "0 s"
        ended = "finished" if done >= self.total else "stopped"
        self._line(f"sweep {ended} after {took}: {done}/{self.total} trials finished")

    def _ended(self, trials: list, trial, errored: bool) -> None:
        tid = trial.trial_id
        last = trial.last_result or {}
        status = outcome_of(last, self.max_t, errored)
        epochs = self.epochs.get(tid, int(last.get(EPOCHS_DONE, 0) or 0))
        self.finished[tid] = epochs
        if status in ("diverged", "error"):
            self.broken.add(tid)
        text = f"{tid} {status} after {epochs} epoch{'s' * (epochs != 1)}"
        if status == "diverged":
            text += f": {last.get(ERROR) or 'diverged'}"
        elif status == "error":
            text += f": {self._error(tid)}"
        else:
            value = last.get(self.metric)
            text += f": {self.metric} {_number(value)}"
            if tid in self.best and self.best[tid] != value:
                text += f" (best {_number(self.best[tid])})"
            text += f", val_kl {_number(last.get('val_kl'))}"
            passed = [r for r in self.passed.get(tid, []) if r < epochs or status == "completed"]
            if passed:
                text += f"; rungs passed: {', '.join(map(str, passed))}"
            if status == "early_stopped" and epochs in self.rungs:
                text += f"; stopped at rung {epochs}"
        self._line(f"{text} · {self._progress(trials)}")

    def _error(self, trial_id: str) -> str:
        path = TrialPaths.of(self.experiment_dir, trial_id).error
        try:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        except OSError:
            return "failed (no error file)"
        return lines[-1].strip()[:200] if lines else "failed"


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((100, 24)).columns

