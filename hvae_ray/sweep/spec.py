"""Sweep files: YAML → validated :class:`SweepSpec` (no Ray here: ``sweep.tune`` builds the Tune search space).

A sweep file holds the base training config (a config file and/or inline dotted overrides), the search
space over any config key (dotted), the ASHA scheduler, trial counts, resources, data and storage.
Everything is checked before Ray starts, so a typo costs one line, not a cluster.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hvae_ray.config import (
    OBJECTIVE_METRICS,
    Config,
    apply_overrides,
    build_section,
    current_key,
    flatten,
    from_dict,
    read_yaml,
)
from hvae_ray.data.generate import FLAVORS
from hvae_ray.errors import ConfigError
from hvae_ray.tracking import RANKABLE_METRICS

SWEEP_PATIENCE = 0  # `train` stops at its own patience; in a sweep ASHA stops trials, unless the file asks
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid", "randint")
TOP_KEYS = {"name", "description", "base_config", "config", "search_space", "scheduler", "num_samples",
            "max_concurrent_trials", "standby_trials", "resources", "data", "storage", "seed", "max_failures"}


@dataclass
class SchedulerSpec:
    """ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", arXiv:1810.05934).

    ``metric`` is what trials are ranked on. The default ``val_objective`` (unweighted reconstruction
    terms + KL at a fixed reference weight) does not depend on a trial's own loss weights or KL
    schedule, so trials that differ in those are compared fairly; ``val_total`` does not have that
    property and is accepted only for sweeps that keep all weights fixed.
    """

    type: str = "asha"
    metric: str = "val_objective"
    mode: str = "min"
    max_t: int = 10
    grace_period: int = 2
    reduction_factor: float = 2.0


@dataclass
class ResourceSpec:
    """Per-trial resources.

    num_workers:     Ray Train workers per trial (>1 trains data-parallel).
    cpus_per_worker: CPUs reserved per worker.
    gpu_fraction:    GPU share per worker (0 = CPU only), or
    gpu_memory_gb:   the card's memory; each worker then gets the largest 1/k share that still holds
                     the trial's peak memory × headroom (see :mod:`hvae_ray.sweep.resources`).
    trial_memory_mb: whole-process GPU memory of one trial (CUDA context included); "auto" measures it
                     on a local GPU before the sweep, or falls back to a conservative estimate.
    backend:         torch.distributed backend: auto (nccl for multi-GPU-worker trials where CUDA
                     exists, gloo otherwise), gloo or nccl.
    population:      auto (trials that differ only in per-member keys train as members of one population
                     per GPU share or CPU host, as many as fit), N (at most N members per population) or
                     off (one Ray Train process per trial). See :mod:`hvae_ray.sweep.population`.
    """

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpu_fraction: float | None = None
    gpu_memory_gb: float | None = None
    trial_memory_mb: float | Literal["auto"] = "auto"
    headroom: float = 1.15
    backend: str = "auto"
    population: int | Literal["auto", "off"] = "auto"

    @property
    def uses_gpu(self) -> bool:
        """Whether trials take GPU shares (a fraction, or one sized from the card's memory)."""
        return bool(self.gpu_fraction) or self.gpu_memory_gb is not None


@dataclass
class DataSpec:
    """``path`` to a data file, or a generated sample (made once, cached on each node)."""

    path: str | None = None
    flavor: str = "q"
    n_jets: int = 1000
    seed: int = 0


@dataclass
class SweepSpec:
    name: str
    source: str
    base: Config
    search_space: dict[str, dict[str, Any]]
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    num_samples: int = 1
    max_concurrent_trials: int | None = None  # None: no limit, as many trials as the resources hold
    # Trials launched ahead of a free CPU/GPU share ("auto": max_concurrent_trials when trials use GPU
    # shares, else 0); see :meth:`tune_concurrency`.
    standby_trials: int | str = "auto"
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    data: DataSpec = field(default_factory=DataSpec)
    storage: str = "runs/sweeps"
    seed: int = 0
    max_failures: int = 1
    description: str = ""
    # The sweep file as validated, made self-contained: base config inlined, data path resolved. Trials,
    # `sweep resume` and trial tables rebuild the spec from it without the user's files.
    raw: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (stored in the experiment directory and passed to trials)."""
        import dataclasses

        return {
            "name": self.name, "source": self.source, "description": self.description,
            "config": self.base.to_dict(), "search_space": self.search_space,
            "scheduler": dataclasses.asdict(self.scheduler), "num_samples": self.num_samples,
            "max_concurrent_trials": self.max_concurrent_trials, "standby_trials": self.standby_trials,
            "resources": dataclasses.asdict(self.resources), "data": dataclasses.asdict(self.data),
            "storage": self.storage, "seed": self.seed, "max_failures": self.max_failures,
        }

    def largest_trial_config(self) -> Config:
        """The base config with every searched key that sets a trial's GPU footprint (batch size, model
        width/depth, neighbours per hyperedge) at its largest allowed value: what GPU shares are sized for."""
        big = {}
        for key, dist in self.search_space.items():
            if key in ("batch_size", "data.knn") or key.startswith("model."):
                values = [v for v in _corners(dist) if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if values:
                    big[key] = max(values)
        return self.base.with_overrides(big) if big else self.base

    def standby(self) -> int:
        """Standby trials: resolved from "auto" (only sweeps on GPU shares have them by default: on CPUs,
        a standby trial's start-up competes with training for the same cores). A sweep of GPU shares on
        a Ray instance without any GPU trains on CPUs, so it has none either."""
        if self.standby_trials != "auto":
            return int(self.standby_trials)
        if not self.resources.uses_gpu:
            return 0
        import sys

        ray = sys.modules.get("ray")  # the instance the sweep runs on, once it is started or joined
        if ray is not None and ray.is_initialized() and not ray.cluster_resources().get("GPU", 0):
            return 0
        return self.max_concurrent_trials or 0

    def tune_concurrency(self) -> int | None:
        """Trials Ray Tune runs at once: ``max_concurrent_trials`` plus the standby trials (None: no limit).

        A trial's start-up is a chain of three fresh processes (Tune's trial driver, Ray Train's
        controller, then the training worker), each importing torch; on a GPU host it took ~40 s,
        longer than a short ASHA rung trains. A standby trial goes through the driver and controller
        while others train, then waits for a share (its worker group's placement group) and takes it
        the moment a trial ends, so a freed share pays only the worker's own start. Where the cluster
        holds more trials than ``max_concurrent_trials``, standby trials train too: ``standby_trials: 0``
        makes ``max_concurrent_trials`` a hard cap.
        """
        if self.max_concurrent_trials is None:
            return None
        return self.max_concurrent_trials + self.standby()

    def expected_trials(self) -> int:
        """Trials the sweep runs in all: ``num_samples`` times every combination of its grid keys."""
        n = self.num_samples
        for dist in self.search_space.values():
            if "grid" in dist:
                n *= len(dist["grid"])
        return n

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        """The base config with a trial's sampled dotted values applied (validated)."""
        return self.base.with_overrides(sampled, f"{self.source}: search_space")


def _check_distribution(key: str, dist: Any, where: str) -> None:
    if not isinstance(dist, dict) or len(dist) != 1:
        raise ConfigError(f"{where}: search_space '{key}' must be one of "
                          f"{{{', '.join(DISTRIBUTIONS)}}}: ARGS")
    (kind, arg), = dist.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: search_space '{key}': unknown distribution '{kind}' "
                          f"(use {', '.join(DISTRIBUTIONS)})")
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: search_space '{key}': {kind} needs a non-empty list")
        return
    if not (isinstance(arg, list) and len(arg) == 2):
        raise ConfigError(f"{where}: search_space '{key}': {kind} needs [low, high]")
    try:
        low, high = float(arg[0]), float(arg[1])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: search_space '{key}': bounds must be numbers, got {arg!r}") from e
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"{where}: search_space '{key}': need low < high, got {arg!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: search_space '{key}': loguniform needs low > 0, got {low:g}")


def _corners(dist: dict[str, Any]) -> list[Any]:
    (kind, arg), = dist.items()
    if kind in ("choice", "grid"):
        return list(arg)
    if kind == "randint":
        return [int(arg[0]), int(arg[1]) - 1]
    return [float(arg[0]), float(arg[1])]


def from_raw(raw: dict[str, Any], where: str, base_dir: Path | None = None) -> SweepSpec:
    """Validate a sweep file's mapping (``where`` names it in messages; relative paths in it are taken
    from ``base_dir``): every key, every range end and every combination of them. Runs once per sweep,
    on the driver; trials are handed the spec it returns."""
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'")
    base = _base_config(raw, where, base_dir)
    space = _search_space(raw, base, where)
    sched = _scheduler(raw, space, where)
    _check_one_best(base, space, sched, where)
    if sched.max_t > base.epochs:
        base = base.with_overrides({"epochs": sched.max_t})
    data = _data(raw, where, base_dir)
    spec = SweepSpec(name=str(raw.get("name") or (Path(where).stem if where else "sweep")), source=where,
                     base=base, search_space=space, scheduler=sched, resources=_resources(raw, where), data=data,
                     description=str(raw.get("description") or ""))
    _set_counts(spec, raw, where)
    spec.raw = {k: v for k, v in raw.items() if k != "base_config"}
    spec.raw["config"] = base.to_dict()
    spec.raw["search_space"] = space
    if data.path is not None:
        spec.raw["data"] = {**(raw.get("data") or {}), "path": data.path}
    return spec


#: Trials a sweep may ask for: Tune keeps every trial in memory and in its saved state.
MAX_TRIALS = 10_000


def _base_config(raw: dict[str, Any], where: str, base_dir: Path | None) -> Config:
    """The base training config: ``base_config`` (a file) with the inline ``config`` keys applied. A
    sweep's trials are stopped by ASHA: ``patience`` is off (``SWEEP_PATIENCE``) unless the sweep sets it."""
    base_raw: dict[str, Any] = {}
    if raw.get("base_config"):
        path = Path(raw["base_config"])
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        base_raw = read_yaml(path)
    base = from_dict({"patience": SWEEP_PATIENCE, **base_raw}, str(raw.get("base_config") or where))
    inline = raw.get("config") or {}
    if not isinstance(inline, dict):
        raise ConfigError(f"{where}: 'config' must be a mapping of config keys")
    return from_dict(apply_overrides(base.to_dict(), flatten(inline), f"{where}: config"), f"{where}: config")


def _search_space(raw: dict[str, Any], base: Config, where: str) -> dict[str, dict[str, Any]]:
    """The checked search space: known keys, valid distributions, and a valid config at every range end
    and every combination of them."""
    space = raw.get("search_space") or {}
    if not isinstance(space, dict):
        raise ConfigError(f"{where}: 'search_space' must be a mapping of dotted config keys")
    space = {current_key(key, f"{where}: search_space"): dist for key, dist in space.items()}
    known = base.flat()
    for key, dist in space.items():
        if key not in known:
            raise ConfigError(f"{where}: search_space: unknown config key '{key}'")
        _check_distribution(key, dist, where)
        for value in _corners(dist):
            base.with_overrides({key: value}, f"{where}: search_space '{key}'={value!r}")
    # Every combination of range ends must make a valid config (e.g. kl_max_weight >= kl_min_weight),
    # so no trial fails on a value the sweep file allowed.
    keys = list(space)
    for combo in itertools.islice(itertools.product(*(_corners(space[k]) for k in keys)), 4096):
        base.with_overrides(dict(zip(keys, combo)),
                            f"{where}: search_space " + ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo)))
    return space


def _scheduler(raw: dict[str, Any], space: dict[str, Any], where: str) -> SchedulerSpec:
    sched = build_section(SchedulerSpec, raw.get("scheduler"), "scheduler", where)
    if sched.type != "asha":
        raise ConfigError(f"{where}: 'scheduler.type' must be asha, got {sched.type!r}")
    if sched.metric not in RANKABLE_METRICS:
        raise ConfigError(f"{where}: 'scheduler.metric' must be one of {', '.join(RANKABLE_METRICS)}, "
                          f"got {sched.metric!r}")
    if sched.mode not in ("min", "max"):
        raise ConfigError(f"{where}: 'scheduler.mode' must be min or max, got {sched.mode!r}")
    if sched.metric == "val_total" and any(k.startswith("loss_weights.") or k.startswith("kl_")
                                           for k in space):
        raise ConfigError(f"{where}: 'scheduler.metric' val_total is not comparable across trials whose "
                          "loss weights or KL settings differ; use val_objective")
    if sched.max_t < 1 or sched.grace_period < 1 or sched.grace_period > sched.max_t:
        raise ConfigError(f"{where}: 'scheduler' needs 1 <= grace_period <= max_t, got "
                          f"grace_period={sched.grace_period}, max_t={sched.max_t}")
    if sched.reduction_factor <= 1:
        raise ConfigError(f"{where}: 'scheduler.reduction_factor' must be > 1, got {sched.reduction_factor}")
    return sched


def _check_one_best(base: Config, space: dict[str, Any], sched: SchedulerSpec, where: str) -> None:
    """ASHA ranks trials by ``scheduler.metric`` and each trial keeps its best epoch by its ``objective``'s
    metric: the two must be one metric, or the sweep's best trial and its best checkpoint disagree."""
    if "objective" in space:
        raise ConfigError(f"{where}: 'objective' cannot be searched: trials of one sweep keep their best "
                          "epochs by one metric, the scheduler's")
    expected = OBJECTIVE_METRICS[base.objective]
    if sched.metric != expected:
        raise ConfigError(f"{where}: 'scheduler.metric' is {sched.metric} but trials keep their best epoch by "
                          f"{expected} (config 'objective: {base.objective}'); set scheduler.metric: {expected}, "
                          "or the objective whose metric it is")


def _resources(raw: dict[str, Any], where: str) -> ResourceSpec:
    section = raw.get("resources")
    if isinstance(section, dict) and section.get("population") is False:
        raw = {**raw, "resources": {**section, "population": "off"}}  # YAML reads a bare `off` as false
    res = build_section(ResourceSpec, raw.get("resources"), "resources", where)
    if res.num_workers < 1:
        raise ConfigError(f"{where}: 'resources.num_workers' must be >= 1, got {res.num_workers}")
    if res.cpus_per_worker < 0:
        raise ConfigError(f"{where}: 'resources.cpus_per_worker' must be >= 0")
    if res.gpu_fraction is not None and res.gpu_memory_gb is not None:
        raise ConfigError(f"{where}: 'resources' takes gpu_fraction or gpu_memory_gb, not both")
    if res.gpu_fraction is not None and not 0 <= res.gpu_fraction <= 1:
        raise ConfigError(f"{where}: 'resources.gpu_fraction' must be in [0, 1], got {res.gpu_fraction}")
    if res.gpu_memory_gb is not None and res.gpu_memory_gb <= 0:
        raise ConfigError(f"{where}: 'resources.gpu_memory_gb' must be > 0, got {res.gpu_memory_gb}")
    if isinstance(res.trial_memory_mb, float) and res.trial_memory_mb <= 0:
        raise ConfigError(f"{where}: 'resources.trial_memory_mb' must be > 0")
    if res.headroom < 1:
        raise ConfigError(f"{where}: 'resources.headroom' must be >= 1, got {res.headroom}")
    if res.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"{where}: 'resources.backend' must be auto, gloo or nccl, got {res.backend!r}")
    pop = res.population
    if isinstance(pop, float) and pop.is_integer():
        res.population = pop = int(pop)
    if not (pop in ("auto", "off") or (isinstance(pop, int) and not isinstance(pop, bool) and 1 <= pop <= 1024)):
        raise ConfigError(f"{where}: 'resources.population' must be auto, off or an integer in [1, 1024], "
                          f"got {str(pop)[:40]!r}")
    return res


def _data(raw: dict[str, Any], where: str, base_dir: Path | None) -> DataSpec:
    data = build_section(DataSpec, raw.get("data"), "data", where)
    if data.path is None:
        if data.flavor not in FLAVORS:
            raise ConfigError(f"{where}: 'data.flavor' must be one of {', '.join(FLAVORS)}")
        if data.n_jets < 10:
            raise ConfigError(f"{where}: 'data.n_jets' must be >= 10, got {data.n_jets}")
    elif base_dir is not None and not Path(data.path).is_absolute() and not Path(data.path).exists():
        candidate = base_dir / data.path
        if candidate.exists():
            data.path = str(candidate.resolve())
    return data


def _set_counts(spec: SweepSpec, raw: dict[str, Any], where: str) -> None:
    """Trial counts, storage and name, checked and set on ``spec``."""
    for key, low in (("num_samples", 1), ("max_concurrent_trials", 1), ("seed", 0), ("max_failures", 0)):
        if key in raw:
            v = raw[key]
            if key == "max_concurrent_trials" and v is None:
                continue  # null: no limit
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                hint = " (null or leaving it out means no limit)" if key == "max_concurrent_trials" else ""
                raise ConfigError(f"{where}: '{key}' must be an integer >= {low}{hint}, got {v!r}")
            setattr(spec, key, v)
    trials = spec.expected_trials()
    if trials > MAX_TRIALS:
        raise ConfigError(f"{where}: the sweep asks for {trials} trials (num_samples {spec.num_samples} × its "
                          f"grid); at most {MAX_TRIALS} are run by one sweep")
    if "standby_trials" in raw:
        v = raw["standby_trials"]
        if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ConfigError(f"{where}: 'standby_trials' must be an integer >= 0 or auto, got {v!r}")
        spec.standby_trials = v
    if "storage" in raw:
        if not isinstance(raw["storage"], str) or not raw["storage"]:
            raise ConfigError(f"{where}: 'storage' must be a directory path or URI")
        spec.storage = raw["storage"]
    if "name" in raw and (not isinstance(raw["name"], str) or not raw["name"].replace("-", "").replace(
            "_", "").isalnum()):
        raise ConfigError(f"{where}: 'name' must use letters, digits, '-' and '_' only, got {raw['name']!r}")




def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep file; ``overrides`` are dotted keys of the sweep file itself
    (e.g. ``{"num_samples": 4, "config.epochs": 3, "scheduler.max_t": 3}``)."""
    path = Path(path)
    raw = read_yaml(path, "sweep")  # size and alias expansion checked before parsing
    if overrides:
        raw = _apply_sweep_overrides(raw, overrides, str(path))
    return from_raw(raw, str(path), path.parent)


def _apply_sweep_overrides(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in overrides.items():
        head, _, rest = dotted.partition(".")
        if head not in TOP_KEYS:
            raise ConfigError(f"{where}: override: unknown key '{dotted}'")
        if not rest:
            out[head] = value
            continue
        section = out.setdefault(head, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: override '{dotted}': '{head}' is not a mapping")
        section = dict(section)
        section[rest] = value  # config.* keep dotted keys; flatten() in from_raw resolves them
        out[head] = section
    return out
