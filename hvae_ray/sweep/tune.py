"""Ray Tune around the trainer: ASHA over the sweep's search space, fractional GPUs, resume.

The sweep file is validated once, on the driver; each trial is handed the spec and its sampled values.
What the experiment directory holds is :mod:`hvae_ray.sweep.layout`'s.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from hvae_ray.errors import ConfigError, HvaeError, RayUnavailable
from hvae_ray.sweep.layout import (
    DIVERGED,
    EPOCHS_DONE,
    SweepState,
    TrialLoop,
    TrialPaths,
    is_experiment,
    read_sweep_state,
    train_storage,
    trial_dirname,
)
from hvae_ray.sweep.ray_internals import loopback_only
from hvae_ray.sweep.signing import Signer, VerifiedFiles, verify
from hvae_ray.sweep.spec import SweepSpec, load_sweep

#: Trial-table statuses by what they mean for the sweep as a whole.
FINISHED = ("completed", "early_stopped", "diverged", "error")
INTERRUPTED = ("running", "unfinished")


@dataclass
class SweepResult:
    """The experiment directory, Tune's results, and how many trials the sweep asked for."""

    experiment_dir: Path
    results: Any  # ray.tune.ResultGrid
    expected_trials: int | None = None
    signal: int | None = None  # the signal that stopped the sweep (SIGINT, SIGTERM), if one did

    @cached_property
    def table(self):
        """The sweep's trial table (``trials.load_trials``), read once: the sweep has ended."""
        from hvae_ray.sweep.trials import load_trials

        return load_trials(self.experiment_dir)

    @property
    def not_created(self) -> int:
        """Trials the sweep asked for that Tune never created (it creates them as slots free up)."""
        return max((self.expected_trials or 0) - self.table.num_rows, 0)

    def outcome(self) -> dict[str, list[str]]:
        """Trial ids that finished (any end: completed, stopped, diverged, failed), were interrupted
        mid-training, or never started (``pending``, or not yet created: numbered ``#k``)."""
        table = self.table
        out: dict[str, list[str]] = {"finished": [], "interrupted": [], "never started": []}
        for tid, status in zip(table.column("trial_id").to_pylist(), table.column("status").to_pylist()):
            kind = "finished" if status in FINISHED else "interrupted" if status in INTERRUPTED else "never started"
            out[kind].append(tid)
        out["never started"] += [f"#{table.num_rows + i + 1}" for i in range(self.not_created)]
        return out

    @property
    def interrupted(self) -> bool:
        """True when some trial did not finish: the run was stopped (Ctrl+C) before its end."""
        o = self.outcome()
        return bool(o["interrupted"] or o["never started"])

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for s in self.table.column("status").to_pylist():
            counts[s] = counts.get(s, 0) + 1
        text = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return text + (f", {self.not_created} not started" if self.not_created else "")


def search_space(spec: SweepSpec) -> dict[str, Any]:
    """The sweep's search space as Tune domains: {dotted config key: ray.tune domain}."""
    from ray import tune

    domains = {"loguniform": lambda lo, hi: tune.loguniform(float(lo), float(hi)),
               "uniform": lambda lo, hi: tune.uniform(float(lo), float(hi)),
               "randint": lambda lo, hi: tune.randint(int(lo), int(hi))}
    space = {}
    for key, dist in spec.search_space.items():
        (kind, arg), = dist.items()
        if kind == "choice":
            space[key] = tune.choice(list(arg))
        elif kind == "grid":
            space[key] = tune.grid_search(list(arg))
        else:
            space[key] = domains[kind](*arg)
    return space


def _trial_driver(sampled: dict[str, Any], state: SweepState, spec: SweepSpec) -> None:
    """One Tune trial: its config from the sweep's spec, then a TorchTrainer (kept light: no
    torch_geometric here)."""
    import ray.tune

    from hvae_ray.sweep.trainer import make_trainer

    ctx = ray.tune.get_context()
    cfg = spec.trial_config(sampled)
    paths = TrialPaths(Path(state.experiment_dir) / Path(ctx.get_trial_dir()).name)
    loop = TrialLoop.of(state, paths, cfg.to_dict())
    make_trainer(loop, spec.resources, state.gpu_share, state.train_storage, ctx.get_trial_id(),
                 score=(spec.scheduler.metric, spec.scheduler.mode)).fit()


def storage_root(storage: str) -> Path:
    """The experiment root as a filesystem path. Trials write TensorBoard files and the trial table is
    read with ordinary file access, so storage must be a local disk or a shared mount (NFS/EFS) that
    every node sees at the same path; object-store URIs are refused."""
    if "://" in storage and not storage.startswith("file://"):
        raise ConfigError(f"storage '{storage}': must be a filesystem path (local disk or a shared mount "
                          "such as NFS/EFS on every node), not an object-store URI")
    root = Path(storage.removeprefix("file://")).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"storage '{storage}': is a file; storage must be a folder")
    return root


def experiment_path(storage: str, name: str) -> Path:
    """``<storage>/<name>``, with ``name`` a plain folder name: nothing written outside ``storage``."""
    root = storage_root(storage)
    if (not isinstance(name, str) or not name or len(name) > 200 or name.startswith(".")
            or any(c in name for c in "/\\\0") or Path(name).name != name):
        raise ConfigError(f"`name` must be a plain folder name (no '/', not starting with '.'), got "
                          f"{name[:80]!r}" if isinstance(name, str) else "`name` must be a string")
    return root / name


def ray_init(address: str | None, **local: Any):
    """Connect to the cluster at ``address``, or start a Ray instance of our own (``local``: more
    ``ray.init`` arguments for it, e.g. ``num_cpus``/``num_gpus``; private, authenticated and stopped
    with this process: :mod:`hvae_ray.sweep.local`); returns ``ray.init``'s context, or None when Ray was
    already initialised (then an ``address`` must name the cluster this process is connected to).
    Raises RayUnavailable (one line) when Ray cannot be started or reached."""
    import ray

    from hvae_ray.sweep import local as local_ray
    from hvae_ray.sweep.trainer import env_vars

    for k, v in env_vars().items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        _same_cluster(ray, address)
        return None
    if address:
        try:
            return ray.init(address=address, runtime_env={"env_vars": env_vars()}, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - Ray raises many kinds (ConnectionError, ValueError, ...)
            raise RayUnavailable(f"cannot connect to the Ray cluster at {address[:200]!r}: {_first_line(e)}") from None
    temp_dir = local_ray.temp_root()
    local_ray.require_token_auth()
    # Ray Train's placement-group cleaner, which frees a trial's resources when Tune stops the
    # trial (ASHA), finds its cluster through the State API by auto-detection unless told where:
    # with any other Ray instance on this host that fails, stopped trials keep their CPU/GPU
    # share for good and the sweep stalls. So the workers are told this instance's API server.
    port = _free_port()
    env = {**env_vars(), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    reaper = local_ray.Reaper()
    try:
        # address="local": always a new instance of our own, never a cluster that `ray start` left
        # running on this host (ray.init's default would join it); clusters are joined by `address`.
        with loopback_only(), reaper.marked():
            context = ray.init(address="local", runtime_env={"env_vars": env}, include_dashboard=True,
                               dashboard_host="127.0.0.1", dashboard_port=port, _temp_dir=str(temp_dir),
                               **{"log_to_driver": False, **local})
    except Exception as e:  # noqa: BLE001 - a busy host (a startup timeout), a port taken meanwhile, ...
        reaper.close()
        raise RayUnavailable(f"the local Ray instance failed to start: {_first_line(e)}") from None
    local_ray.started()
    return context


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0][:300] if lines else "") or type(e).__name__


def _same_cluster(ray, address: str | None) -> None:
    """RayUnavailable unless ``address`` (if any) names the cluster this process is connected to."""
    import socket

    if not address or address == "auto":
        return
    connected = ray.get_runtime_context().gcs_address

    def resolved(addr: str) -> str:
        host, _, port = addr.removeprefix("ray://").rpartition(":")
        try:
            return f"{socket.gethostbyname(host)}:{port}"
        except OSError:
            return addr

    if resolved(address) != resolved(connected):
        raise RayUnavailable(f"this process is already connected to the Ray cluster at {connected}; it cannot "
                             f"also use the cluster at {address[:200]!r}")


def _local_gpus() -> float:
    """GPUs of the Ray instance this process started or joined (0 on a machine without one)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(spec: SweepSpec, name: str, storage: str) -> SweepState:
    """Resolve data and the GPU share once, on the driver, before any trial starts."""
    from hvae_ray.data.io import load_jets
    from hvae_ray.sweep.resources import GiB, trial_share

    res = spec.resources
    if spec.data.path is not None:
        data_path = Path(spec.data.path).resolve()
        load_jets(data_path).validate()  # a bad data file fails here, not in every trial
    else:
        from hvae_ray.data.generate import default_sample

        data_path = default_sample(spec.data.flavor, spec.data.n_jets, spec.data.seed)
    gpu_share, card_bytes, trial_bytes, context_bytes = 0.0, None, None, None
    if res.gpu_memory_gb is not None:
        gpu_share, trial_bytes, context_bytes = trial_share(res.gpu_memory_gb, res.trial_memory_mb, res.headroom,
                                                            spec.largest_trial_config())
        card_bytes = res.gpu_memory_gb * GiB
    elif res.gpu_fraction:
        gpu_share = res.gpu_fraction
    root = storage_root(storage)
    experiment_dir = str(root / name)
    return SweepState(raw=spec.raw, source=spec.source, name=name, storage=str(root),
                      experiment_dir=experiment_dir, data_path=str(data_path),
                      train_storage=train_storage(experiment_dir), gpu_share=gpu_share, card_bytes=card_bytes,
                      trial_bytes=trial_bytes, context_bytes=context_bytes)


def _tuner(spec: SweepSpec, state: SweepState):
    import ray.tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    from hvae_ray.sweep.console import console_callbacks, tune_verbosity
    from hvae_ray.sweep.driver import SignState
    from hvae_ray.sweep.hparams import TrialOutcomeCallback

    _no_tune_tensorboard()
    sched = spec.scheduler
    asha = ASHAScheduler(time_attr=EPOCHS_DONE, max_t=sched.max_t, grace_period=sched.grace_period,
                         reduction_factor=sched.reduction_factor)
    members = state.population_slots > 0
    extra: dict[str, Any] = {}
    leaves: list = []
    if members:
        from hvae_ray.sweep.population import MemberLeaves, executor_names

        # A member's checkpoints are the trial's own (Tune keeps the latest and the 2 best by the sweep's
        # metric); a trial in its own process has its Ray Train run keep them (sweep.trainer).
        leaves = [MemberLeaves(executor_names(state.experiment_dir, state.population_executors),
                                expected=spec.expected_trials())]
        extra = {"checkpoint_config": ray.tune.CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=sched.metric, checkpoint_score_order=sched.mode)}
    return ray.tune.Tuner(
        _trainable(state, spec),
        param_space=search_space(spec),
        tune_config=ray.tune.TuneConfig(metric=sched.metric, mode=sched.mode, scheduler=asha,
                                        num_samples=spec.num_samples,
                                        max_concurrent_trials=(state.population_slots * state.population_executors
                                                               if members else spec.tune_concurrency()),
                                        trial_dirname_creator=_trial_dirname),
        run_config=ray.tune.RunConfig(name=state.name, storage_path=state.storage,
                                      failure_config=ray.tune.FailureConfig(max_failures=spec.max_failures),
                                      callbacks=[JsonLoggerCallback(), CSVLoggerCallback(),
                                                 TrialOutcomeCallback(spec, state.experiment_dir),
                                                 SignState(state.experiment_dir),
                                                 *console_callbacks(spec, state.experiment_dir)]
                                      + leaves,
                                      stop={DIVERGED: 1.0}, verbose=tune_verbosity(), **extra),
    )


def _no_tune_tensorboard() -> None:
    """Keep Tune's own TensorBoard logger out: it would write a second run per trial (``ray/tune/*``
    scalars and an empty HParams session) beside the trial's own ``tensorboard/`` run. Tune's JSON and
    CSV logs stay (the trial table reads them); they are passed to the run explicitly."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"


def _trainable(state: SweepState, spec: SweepSpec):
    """The trial's function with the sweep state and spec bound: a population member
    (:func:`~hvae_ray.sweep.population.member_trial`) or a TorchTrainer of its own (:func:`_trial_driver`).
    It holds no resources itself (the executors or the TorchTrainer's workers hold the CPUs/GPUs), so
    concurrency is set by their resources and ``max_concurrent_trials``."""
    import ray.tune

    from hvae_ray.sweep.population import member_trial

    fn = member_trial if state.population_slots > 0 else _trial_driver
    return ray.tune.with_resources(ray.tune.with_parameters(fn, state=state, spec=spec), {"CPU": 0.01})


@contextmanager
def _executors(state: SweepState, spec: SweepSpec):
    """The sweep's population executors while its trials run (none when each trial has its own process)."""
    from hvae_ray.sweep.population import PopulationPlan, executor_names, start_executors, stop_executors

    executors = []
    if state.population_slots > 0:
        plan = PopulationPlan(state.population_slots, state.population_executors)
        executors = start_executors(plan, state, spec)
    try:
        yield executors
    finally:
        if executors:
            stop_executors(executors, executor_names(state.experiment_dir, state.population_executors))


def _plan_populations(spec: SweepSpec, state: SweepState) -> SweepState:
    """Decide whether and how the trials share populations (said in one line), into the sweep state."""
    import dataclasses

    import ray

    from hvae_ray.sweep.population import population_plan

    plan = population_plan(spec, state, float(ray.cluster_resources().get("GPU", 0)))
    print(f"sweep: {plan.describe()}", file=sys.stderr)
    if not plan.on and state.gpu_share > 0 and _local_gpus():
        from hvae_ray.sweep.resources import mps_running

        print("sweep: CUDA MPS is " + ("on: trials sharing a GPU run side by side" if mps_running() else
                                       "off: trials sharing a GPU take turns on it (README: CUDA MPS)"),
              file=sys.stderr)
    return dataclasses.replace(state, population_slots=plan.slots, population_executors=plan.executors)


def _trial_dirname(trial) -> str:
    return trial_dirname(trial.trial_id)


def _said(result: SweepResult, hint: bool) -> SweepResult:
    """``result``, after one line on stderr saying how to resume it when it was interrupted (``hint``)."""
    if hint and result.interrupted:
        print(f"sweep interrupted ({result.summary()}); continue with resume_sweep({str(result.experiment_dir)!r}) "
              f"or: hvae-ray sweep resume {result.experiment_dir}", file=sys.stderr)
    return result


def run_sweep(sweep: str | Path, overrides: dict[str, Any] | None = None, *, name: str | None = None,
              storage: str | None = None, address: str | None = None,
              on_start: Callable[[Path], None] | None = None, hint: bool = True) -> SweepResult:
    """Run a sweep file. ``overrides`` are dotted keys of the sweep file (``config.epochs``,
    ``num_samples``, ``scheduler.max_t``, ...). ``on_start(experiment_dir)`` is called once the
    experiment directory exists, before the first trial. Returns the experiment directory and Tune's
    results."""
    from hvae_ray.io_safe import hold

    spec = load_sweep(sweep, overrides)
    storage = storage or spec.storage
    name = name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    exp = experiment_path(storage, name)  # storage a folder, the experiment inside it: before Ray starts

    def exists() -> None:
        if is_experiment(exp):
            raise ConfigError(f"{exp}: an experiment of this name exists; resume it (`resume_sweep`) or "
                              "choose another `name`")

    exists()  # checked before any data is generated or measured
    state = _prepare(spec, name, storage)
    try:
        exp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{exp}: cannot create the experiment folder: {e.strerror}") from None
    with hold(exp, "experiment"):  # one driver per experiment, until its sweep ends
        exists()  # another driver made it meanwhile
        ray_init(address)
        if address is None and state.gpu_share > 0 and not _local_gpus():
            # A share of a GPU that this machine does not have would leave every trial waiting for ever.
            print("no GPU on this machine: the trials train on its CPUs (the sweep's GPU share is not used)",
                  file=sys.stderr)
            state = state.on_cpus()
        state = _plan_populations(spec, state)
        state.write()
        if on_start is not None:
            on_start(exp)
        from hvae_ray.sweep.driver import stop_on_signals

        signer = Signer(exp)
        with stop_on_signals() as stopped, _executors(state, spec):
            try:
                tuner = _tuner(spec, state)
                signer.sign()  # tuner.pkl
                results = tuner.fit()
            finally:
                signer.sign()
    return _said(SweepResult(exp, results, spec.expected_trials(), stopped.signal), hint)


def resume_sweep(experiment_dir: str | Path, *, address: str | None = None,
                 on_start: Callable[[Path], None] | None = None, hint: bool = True) -> SweepResult:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones continue from their
    last checkpoint (their Ray Train runs restore from ``_train/<trial_id>``), errored ones retry."""
    import ray.tune

    from hvae_ray.io_safe import hold

    exp = Path(experiment_dir).resolve()
    state = read_sweep_state(exp)
    spec = state.spec
    if not ray.tune.Tuner.can_restore(str(exp)):
        raise HvaeError(f"{exp}: Ray Tune has no saved experiment state to resume from")
    with hold(exp, "experiment"):  # not while its sweep (or another resume) still runs
        verified = verify(exp)  # before Ray unpickles any of it; Ray then reads these bytes, not the files again
        ray_init(address)
        _no_tune_tensorboard()
        if on_start is not None:
            on_start(exp)
        from hvae_ray.sweep.driver import stop_on_signals

        signer = Signer(exp)
        with stop_on_signals() as stopped, _executors(state, spec):
            try:
                tuner = ray.tune.Tuner.restore(str(exp), trainable=_trainable(state, spec), resume_unfinished=True,
                                               resume_errored=True, restart_errored=False,
                                               param_space=search_space(spec),
                                               storage_filesystem=VerifiedFiles(exp, verified).filesystem())
                from hvae_ray.sweep.console import on_restore

                on_restore(tuner, spec, exp)  # this run's console and verbosity, not the saved run config's
                results = tuner.fit()
            finally:
                signer.sign()
    return _said(SweepResult(exp, results, spec.expected_trials(), stopped.signal), hint)


def sign_experiment(experiment_dir: str | Path) -> list[Path]:
    """Sign, with this user's key, the files of an experiment that Ray unpickles on resume, as they are
    now (``sweep.signing``): for an experiment its sweep could not sign (a driver killed the moment
    Tune saved its state) whose folder only you can write. Returns the files."""
    from hvae_ray.io_safe import hold
    from hvae_ray.sweep.signing import loaded_files

    exp = Path(experiment_dir).resolve()
    read_sweep_state(exp)
    with hold(exp, "experiment"):
        Signer(exp).sign()
        return loaded_files(exp)
