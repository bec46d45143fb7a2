"""The HParams view of a sweep: a session per trial, live while it trains, that lists what sets the trial
apart and says how it ended.

The sweep's driver (:class:`TrialOutcomeCallback`) writes each trial's session into the trial's own
TensorBoard run in two parts:

- when Tune starts the trial, its start: the searched keys and every effective config key that differs
  from the base config. The session shows in the HParams tab from then on, with no status yet (shown as
  unknown), and its metric columns (the last and best values of the run's scalars) follow the trial's
  epochs as it reports them.
  TensorBoard keeps the first start of a run, so it is written once: a trial that Tune restarts after a
  failure, or that ``sweep resume`` continues, keeps the start it has (the driver looks for it in the
  run's event files with TensorBoard's own reader, so a new driver finds it too);
- when Tune ends the trial (run to the end, stopped by ASHA, diverged or failed), its end: the session
  status (completed → success, diverged or error → failure, early-stopped → unknown). A trial that
  failed and runs again (``sweep resume`` retries it) loses that end, and gets the end of its new run.
  A trial whose start is missing at its end (one started by an older version) gets both then.

Each part is an event file of its own beside the training's, put in place whole
(:func:`~hvae_ray.io_safe.atomic_write`), never through a link. TensorBoard follows only a run's last
event file (by name) for new events, so the start's file is named to come before the training's files
(TensorBoard reads it, then moves on to them) and the end's file after them.

What the tab shows (:func:`shown_hparams`): each session is named by the trial table's trial id;
integer settings are written as text, since TensorBoard prints every number with five significant
digits (``200.00``); a key searched on a log scale (``loguniform``) is also written as
``log10(<key>)``, so parallel coordinates spread its values instead of bunching them at 0. How a trial
ended in words (``early_stopped``, ``diverged``...) is the trial table's ``status`` column.
"""

from __future__ import annotations

import math
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback
from tensorboard.plugins.hparams import metadata as hparams_metadata

from hvae_ray.io_safe import atomic_write_bytes
from hvae_ray.sweep.layout import EPOCHS_DONE, TrialPaths, is_diverged
from hvae_ray.sweep.spec import SweepSpec
from hvae_ray.tracking import HPARAM_METRICS, TensorBoardLogger

__all__ = ["trial_hparams", "shown_hparams", "session_tags", "write_session_start", "write_session_end",
           "reopen_session", "TrialOutcomeCallback"]


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


# The event files of a session's two parts (TensorBoard reads every file with ``tfevents`` in its name),
# named as TensorBoard's writers name theirs: ``events.out.tfevents.<time>.<host>.<pid>.<suffix>``.
START_SUFFIX = "hparams_start"
END_SUFFIX = "hparams_end"
START_TAG = hparams_metadata.SESSION_START_INFO_TAG
END_TAG = hparams_metadata.SESSION_END_INFO_TAG
_SESSION_TAG_BYTES = (START_TAG.encode(), END_TAG.encode())  # looked for in each raw event before parsing it


def _event_file_name(stamp: int, suffix: str) -> str:
    return f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}.{suffix}"


def _stamp_after(tb_dir: str | Path) -> int:
    """A time for a file name that comes after every event file in ``tb_dir``: now, or a second past the
    latest time in their names (a writer whose clock runs ahead, or one that started this second)."""
    stamps = [int(part) for p in event_files(tb_dir)
              if p.name.startswith("events.out.tfevents.") and (part := p.name.split(".")[3]).isdigit()]
    return max([int(time.time()), *(s + 1 for s in stamps)])


def _warn(message: str) -> None:
    print(f"hvae-ray: warning: {message}", file=sys.stderr)


def event_files(tb_dir: str | Path) -> list[Path]:
    """The event files TensorBoard reads in ``tb_dir`` (every file with ``tfevents`` in its name), by
    name; links left out (none when the folder is missing)."""
    try:
        with os.scandir(tb_dir) as entries:
            return sorted(Path(e.path) for e in entries if "tfevents" in e.name and e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return []


def session_tags(tb_dir: str | Path) -> set[str]:
    """The parts of an HParams session the run in ``tb_dir`` has (``START_TAG``, ``END_TAG``), read from
    its event files with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    found: set[str] = set()
    for path in event_files(tb_dir):
        for raw in RawEventFileLoader(str(path)).Load():
            if not any(tag in raw for tag in _SESSION_TAG_BYTES):  # a scalar, an image...: not parsed
                continue
            for value in Event.FromString(raw).summary.value:
                if value.tag in (START_TAG, END_TAG) and \
                        value.metadata.plugin_data.plugin_name == hparams_metadata.PLUGIN_NAME:
                    found.add(value.tag)
    return found


def _put_events(tb_dir: str | Path, name: str, write: Callable[[TensorBoardLogger], object]) -> Path:
    """What ``write`` writes through a :class:`TensorBoardLogger`, as the event file ``tb_dir/name``:
    written in a private temporary folder, then put in place whole (:func:`atomic_write_bytes`: a reader
    never sees half of it, and nothing is written through a link)."""
    with tempfile.TemporaryDirectory(prefix="hvae-ray-hparams-") as tmp:
        tb = TensorBoardLogger(tmp)
        try:
            write(tb)
        finally:
            tb.close()
        [events] = Path(tmp).glob("events.out.tfevents.*")
        data = events.read_bytes()
    return atomic_write_bytes(Path(tb_dir) / name, data)


def write_session_start(tb_dir: str | Path, hparams: dict[str, Any], trial_id: str = "", *,
                        first: bool = True) -> Path:
    """The start of a trial's HParams session (its values ``hparams``, named ``trial_id`` in the tab;
    default: its run's folder), as an event file of its own in ``tb_dir``. ``first`` (at the trial's
    start): its file is named with the time 0, to come before every file the trial's training writes,
    since TensorBoard follows only a run's last file for new events and would otherwise stop following
    the training's; else (at the trial's end) with a time after the files there."""
    name = _event_file_name(0 if first else _stamp_after(tb_dir), START_SUFFIX)
    return _put_events(tb_dir, name, lambda tb: tb.log_hparams_start(hparams, HPARAM_METRICS, group_name=trial_id))


def write_session_end(tb_dir: str | Path, outcome: str) -> Path:
    """The end of a trial's HParams session: its status for ``outcome`` (a key of ``SESSION_STATUS``),
    as an event file of its own in ``tb_dir``, named to come after the files there."""
    name = _event_file_name(_stamp_after(tb_dir), END_SUFFIX)
    return _put_events(tb_dir, name, lambda tb: tb.log_hparams_end(outcome))


def reopen_session(tb_dir: str | Path) -> list[Path]:
    """Remove the session ends :func:`write_session_end` wrote in ``tb_dir`` (a trial that ended and runs
    again is running); returns them. An end written in one file with its start (by older versions) stays."""
    gone = [p for p in event_files(tb_dir) if p.name.endswith(f".{END_SUFFIX}")]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def trial_folder(experiment_dir: str | Path, trial_id: str, make: bool = False) -> Path | None:
    """The trial's TensorBoard folder (its trial folder; ``tensorboard/`` in it in older experiments),
    made if missing when ``make``. None when it is missing, or when it or the trial folder is not a folder
    of its own (a link, a file): nothing is written through a link."""
    paths = TrialPaths.of(experiment_dir, trial_id)
    tb_dir = paths.tensorboard
    for folder in dict.fromkeys((paths.root, tb_dir)):
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            _warn(f"{folder}: is a link or not a folder; the trial's HParams session is not written there")
            return None
    return tb_dir


def outcome_of(last_result: dict[str, Any] | None, max_t: int, errored: bool = False) -> str:
    """How a trial ended, in the trial table's words."""
    if errored:
        return "error"
    last = last_result or {}
    if is_diverged(last):
        return "diverged"
    return "completed" if last.get(EPOCHS_DONE, 0) >= max_t else "early_stopped"


class TrialOutcomeCallback(Callback):
    """Runs in the sweep's driver: writes a trial's HParams session, its start when Tune starts the trial
    (once: a restarted or resumed trial keeps the start it has) and its end when Tune ends it. A session
    that cannot be written (a full disk, a link) is a warning, not the sweep's end."""

    def __init__(self, spec: SweepSpec, experiment_dir: str | Path):
        self.spec = spec
        self.experiment_dir = Path(experiment_dir)

    def _hparams(self, trial) -> dict[str, Any]:
        sampled = {k: v for k, v in trial.config.items() if k in self.spec.search_space}
        return shown_hparams(self.spec, trial_hparams(self.spec, sampled))

    def _start(self, trial) -> None:
        tb_dir = trial_folder(self.experiment_dir, trial.trial_id, make=True)
        if tb_dir is None:
            return
        reopen_session(tb_dir)  # one that ended and runs again (a failed trial `sweep resume` retries)
        if START_TAG not in session_tags(tb_dir):
            write_session_start(tb_dir, self._hparams(trial), trial.trial_id)

    def _end(self, trial, errored: bool) -> None:
        tb_dir = trial_folder(self.experiment_dir, trial.trial_id)
        if tb_dir is None or not event_files(tb_dir):  # the trial never started
            return
        written = session_tags(tb_dir)
        if START_TAG not in written:  # a trial started by an older version
            write_session_start(tb_dir, self._hparams(trial), trial.trial_id, first=False)
        if END_TAG not in written:
            write_session_end(tb_dir, outcome_of(trial.last_result, self.spec.scheduler.max_t, errored))

    def _safely(self, part: Callable[..., None], trial, *args) -> None:
        try:
            part(trial, *args)
        except OSError as e:
            _warn(f"trial {trial.trial_id}: could not write its HParams session: {e.strerror or e}")

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._safely(self._start, trial)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._safely(self._end, trial, False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._safely(self._end, trial, True)
