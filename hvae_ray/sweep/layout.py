"""The experiment directory's contract: where each file lives, the sweep state, and what a trial reports.

Layout of an experiment directory (``<storage>/<name>``)::

  hvae_sweep.json                the sweep state (:class:`SweepState`): the validated sweep, its data
                                 file and GPU share; read by resume and by trial tables
  trial_<id>/                    Ray Tune's trial directory: params.json (the sampled values),
                                 result.json (one :class:`EpochReport` row per epoch), error.txt
  trial_<id>/events.out.*        the trial's TensorBoard run, named trial_<id> (+ its HParams session);
                                 in tensorboard/ in experiments written before
  trial_<id>/engine/             the engine's save_dir: last/, best/, and metrics.jsonl, rank 0's epoch
                                 log (the same rows as result.json, kept across resumes)
  _train/<trial_id>/             the trial's Ray Train run: its reported checkpoints

The file names and JSON keys are those of every experiment directory written so far, so old
directories read as new ones do.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvae_ray.errors import DataError
from hvae_ray.sweep.spec import SweepSpec, from_raw
from hvae_ray.tracking import RANKABLE_METRICS

SWEEP_FILE = "hvae_sweep.json"
TRIAL_PREFIX = "trial_"
TRAIN_DIR = "_train"
METRICS_LOG = "metrics.jsonl"

# Keys of a trial's report rows beside the engine's metrics; Tune adds the last three itself.
EPOCHS_DONE = "epochs_done"  # epochs trained so far: ASHA's time attribute
DIVERGED = "diverged"  # 1.0 in a diverged trial's terminal row (Tune's stop criterion), else 0.0
ERROR = "error"
NODE_ID = "node_id"
EPOCH = "epoch"  # 0-based, from the engine
CHECKPOINT_PATH = "checkpoint_path"
TIME_TOTAL = "time_total_s"


# ---------------------------------------------------------------------------------------------------------
# Paths


def trial_dirname(trial_id: str) -> str:
    return f"{TRIAL_PREFIX}{trial_id}"


@dataclass(frozen=True)
class TrialPaths:
    """The files of one trial, inside its Tune trial directory ``root``."""

    root: Path

    @classmethod
    def of(cls, experiment_dir: str | Path, trial_id: str) -> TrialPaths:
        return cls(Path(experiment_dir) / trial_dirname(trial_id))

    @property
    def trial_id(self) -> str:
        return self.root.name.removeprefix(TRIAL_PREFIX)

    @property
    def params(self) -> Path:
        return self.root / "params.json"

    @property
    def results(self) -> Path:
        return self.root / "result.json"

    @property
    def error(self) -> Path:
        return self.root / "error.txt"

    @property
    def tensorboard(self) -> Path:
        """The trial's TensorBoard run: the trial directory itself, so that TensorBoard names the run
        ``trial_<id>`` (a run's name is its folder's path under the log directory). Experiments written
        before kept it in ``tensorboard/``, which a resumed trial goes on writing to."""
        old = self.root / "tensorboard"
        return old if old.is_dir() else self.root

    @property
    def engine(self) -> Path:
        """The engine's save_dir: ``last/``, ``best/`` and the epoch log."""
        return self.root / "engine"

    @property
    def metrics_log(self) -> Path:
        return self.engine / METRICS_LOG

    @property
    def engine_best(self) -> Path:
        return self.engine / "best"


def trial_paths(experiment_dir: str | Path) -> list[TrialPaths]:
    """Every trial directory of an experiment, ordered by name."""
    exp = Path(experiment_dir)
    return [TrialPaths(p) for p in sorted(exp.iterdir()) if p.is_dir() and p.name.startswith(TRIAL_PREFIX)]


def train_storage(experiment_dir: str | Path) -> str:
    """Where the trials' Ray Train runs keep their checkpoints."""
    return f"{experiment_dir}/{TRAIN_DIR}"


# ---------------------------------------------------------------------------------------------------------
# The sweep state


@dataclass(frozen=True)
class SweepState:
    """What the driver resolved before the first trial, stored as ``hvae_sweep.json``.

    raw:            the sweep file made self-contained (base config inlined, data path resolved): the
                    sweep is stored once, as this; :attr:`spec` is it validated (``sweep.spec.from_raw``)
    source:         the sweep file it came from (for messages)
    gpu_share:      each trial worker's share of a GPU (0: CPU only)
    card_bytes:     the card size the share was sized for (None: not sized from memory)
    trial_bytes:    one trial's whole-process GPU memory the share holds
    context_bytes:  the CUDA context measured while sizing (None: the usual figure)
    population_slots, population_executors: the trials train as members of this many populations of
                    this many slots (0: one process per trial; :mod:`hvae_ray.sweep.population`)
    """

    raw: dict[str, Any]
    source: str
    name: str
    storage: str
    experiment_dir: str
    data_path: str
    train_storage: str
    gpu_share: float = 0.0
    card_bytes: float | None = None
    trial_bytes: float | None = None
    context_bytes: float | None = None
    population_slots: int = 0
    population_executors: int = 0

    @functools.cached_property
    def spec(self) -> SweepSpec:
        """The sweep, validated from :attr:`raw` (once per state)."""
        return from_raw(self.raw, self.source)

    @property
    def metric(self) -> str:
        """The metric the sweep ranks its trials by (its scheduler's)."""
        return self.spec.scheduler.metric

    @property
    def mode(self) -> str:
        return self.spec.scheduler.mode

    @property
    def max_t(self) -> int:
        return int(self.spec.scheduler.max_t)

    @property
    def searched_keys(self) -> list[str]:
        return list(self.spec.search_space)

    def on_cpus(self) -> SweepState:
        """The same sweep with its trials on CPUs only (no GPU share)."""
        return dataclasses.replace(self, gpu_share=0.0, card_bytes=None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> SweepState:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise DataError(f"{where}: incomplete sweep state ({e})") from e

    def write(self) -> Path:
        from hvae_ray.io_safe import atomic_write_text

        return atomic_write_text(Path(self.experiment_dir) / SWEEP_FILE,
                                 json.dumps(self.to_dict(), indent=2, default=str))


def is_experiment(experiment_dir: str | Path) -> bool:
    return (Path(experiment_dir) / SWEEP_FILE).exists()


def read_sweep_state(experiment_dir: str | Path) -> SweepState:
    """The sweep an experiment directory was run with; DataError if it has none or it is unreadable."""
    exp = Path(experiment_dir)
    f = exp / SWEEP_FILE
    if not f.is_file():
        raise DataError(f"{exp}: not an hvae-ray experiment directory (no {SWEEP_FILE})")
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{f}: unreadable sweep state ({e.__class__.__name__})") from e
    if not isinstance(data, dict):
        raise DataError(f"{f}: unreadable sweep state (not a JSON object)")
    return SweepState.from_dict(data, str(f))


# ---------------------------------------------------------------------------------------------------------
# What a trial is given, and what it reports


@dataclass(frozen=True)
class TrialLoop:
    """Everything a trial's Ray Train workers need (their ``train_loop_config``, as a plain dict).

    config:         the trial's validated Config, as a dict
    data_path:      the jets file
    tb_dir:         the trial's TensorBoard run (written by rank 0)
    work_dir:       the engine's save_dir, inside the trial directory
    gpu_share:      this worker's share of its GPU (0: no allocator cap)
    card_bytes:     the card size the share refers to (None: this device's)
    context_bytes:  the CUDA context measured for sizing (None: the usual figure)
    """

    config: dict[str, Any]
    data_path: str
    tb_dir: str
    work_dir: str
    gpu_share: float = 0.0
    card_bytes: float | None = None
    context_bytes: float | None = None

    @classmethod
    def of(cls, state: SweepState, paths: TrialPaths, config: dict[str, Any]) -> TrialLoop:
        return cls(config=config, data_path=state.data_path, tb_dir=str(paths.tensorboard),
                   work_dir=str(paths.engine), gpu_share=state.gpu_share, card_bytes=state.card_bytes,
                   context_bytes=state.context_bytes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialLoop:
        return cls(**data)


@dataclass(frozen=True)
class EpochReport:
    """The row a trial reports after each epoch: the engine's numeric metrics and the trial's own keys.

    worker_started_at (when the worker process was launched), loop_started_at (when its training
    function began, after its GPU share was granted) and reported_at are Unix times [s], as is the first
    row's ``first_step_at`` (the engine's first optimiser step): start-up on a trial's critical path is
    first_step_at − loop_started_at once the share is granted, first_step_at − worker_started_at in all.
    """

    metrics: dict[str, float]
    epochs_done: int
    node_id: str
    worker_started_at: float
    loop_started_at: float
    reported_at: float

    def to_row(self) -> dict[str, Any]:
        return {**self.metrics, EPOCHS_DONE: self.epochs_done, DIVERGED: 0.0, NODE_ID: self.node_id,
                "worker_started_at": self.worker_started_at, "loop_started_at": self.loop_started_at,
                "reported_at": self.reported_at}


@dataclass(frozen=True)
class DivergedReport:
    """A diverged trial's terminal row: every metric a sweep may rank on is +inf, whichever it ranks on."""

    error: str
    node_id: str

    def to_row(self) -> dict[str, Any]:
        return {DIVERGED: 1.0, **dict.fromkeys(RANKABLE_METRICS, math.inf), ERROR: self.error,
                NODE_ID: self.node_id}


def is_diverged(row: dict[str, Any]) -> bool:
    return row.get(DIVERGED) == 1.0


def read_jsonl(f: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (empty when absent; a line still being written is skipped)."""
    f = Path(f)
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed driver
    return rows


def append_jsonl(f: str | Path, row: dict[str, Any]) -> None:
    f = Path(f)
    f.parent.mkdir(parents=True, exist_ok=True)
    with f.open("a") as out:
        out.write(json.dumps(row) + "\n")
