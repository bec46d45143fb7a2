"""Population sweeps: a sweep's same-shape trials train as members of one population per GPU (or per CPU
host), each population in one Ray actor, the executor; Ray Tune stays the scheduler.

Every member is its own Tune trial. A trial's function (:func:`member_trial`) hands its config to an
executor and then, epoch by epoch, asks it for its member's next epoch, reports that epoch with its
checkpoint to Tune, and asks for the next one only once ``ray.tune.report`` has returned, i.e. once the
scheduler let the trial go on: no member trains an epoch that ASHA has not allowed. When Tune stops a
trial (ASHA, ``max_t``) or it fails, :class:`MemberLeaves`, a Tune callback on the driver, tells the
executor, and the member's slot takes the next trial at the next epoch boundary.

The executor (:class:`PopulationExecutor`) trains, at each epoch boundary, every member whose trial has
asked for its next epoch; it waits up to ``max_wait_s`` for the others, so a member whose trial is still
reporting usually trains in the same epoch, and one whose trial has gone never holds the others up. A
member's numbers do not depend on which others train beside it (each has its own batches, noise and
optimiser state; an idle slot is masked), so a late member trains exactly as it would have.

Faults: the executor is restarted by Ray when its process dies; its members' trials then fail, and Tune
retries them from their last checkpoints (the sweep's ``max_failures``). A member that diverges is
reported diverged; the others are unaffected.

Which trials can share a population, and how many members a population holds:
:func:`population_plan` (``resources.population: auto | N | off``).
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from hvae_ray.errors import HvaeError
from hvae_ray.sweep.layout import (
    EPOCH,
    METRICS_LOG,
    DivergedReport,
    EpochReport,
    SweepState,
    TrialPaths,
    append_jsonl,
    read_jsonl,
)
from hvae_ray.sweep.spec import SweepSpec

#: Report keys of a member's epoch beside the engine's metrics: the population's slots and how many members
#: trained in that epoch, and the membership's token (which :class:`MemberLeaves` passes back).
POPULATION = "population"
POPULATION_MEMBERS = "population_members"
MEMBER_TOKEN = "population_member"
#: Named actors of a sweep's executors: ``<prefix><experiment>-<index>`` (:func:`executor_names`).
EXECUTOR_PREFIX = "hvae-population-"
#: Most members in one population when sized automatically on a CPU.
CPU_SLOTS = 32
#: A member's epochs reach Tune with a checkpoint at a new best, at its end and every this many epochs; in
#: between, its own ``last/`` and epoch log hold them, and a resumed trial reports the epochs after Tune's
#: checkpoint from there (:func:`_catch_up`). Tune copies each checkpoint and saves its whole experiment
#: state once a trial has made two since the last save, which at a checkpoint per epoch of every member
#: took most of the time between a population's epochs.
CHECKPOINT_EVERY = 10
#: A population trains every slot, held or not; once at most half are held and no trial has joined for this
#: long, it is resized to its members (a join grows it back). Once the driver has said that every trial of
#: the sweep has started (:meth:`PopulationExecutor.all_started`), no join is waited for.
SHRINK_AFTER_S = 10.0


# ---------------------------------------------------------------------------------------------------------
# Which trials, how many per population


@dataclass(frozen=True)
class PopulationPlan:
    """How a sweep's trials train: ``executors`` populations of ``slots`` members each, or, with
    ``slots == 0``, one Ray Train process per trial (``reason`` says why)."""

    slots: int = 0
    executors: int = 0
    reason: str = ""

    @property
    def on(self) -> bool:
        return self.slots > 0

    @property
    def concurrency(self) -> int:
        return self.slots * self.executors

    def describe(self) -> str:
        if not self.on:
            return f"one process per trial: {self.reason}"
        where = f"{self.executors} populations" if self.executors > 1 else "one population"
        return f"trials train as members of {where} of up to {self.slots} ({self.reason})"


def varies_shape(key: str, split_seed: int) -> bool:
    """Whether searching config ``key`` changes what members of one population must share: a tensor's
    shape, the data and its split (``seed`` sets the split unless ``data.split_seed`` is set)."""
    from hvae_ray.engine.population import SHAPE_KEYS

    if key == "data.split_seed" or (key == "seed" and split_seed < 0):
        return True
    return any(key == s or key.startswith(s + ".") for s in SHAPE_KEYS)


def why_not(spec: SweepSpec, cuda: bool) -> str | None:
    """Why this sweep's trials cannot share a population (None: they can)."""
    base, res = spec.base, spec.resources
    if res.population == "off":
        return "resources.population is off"
    if res.num_workers > 1:
        return f"resources.num_workers is {res.num_workers}: a trial trains data-parallel over several processes"
    if base.engine != "dense":
        return f"engine is {base.engine}: populations train the dense engine"
    if cuda and base.mixed_precision == "fp16":
        return "mixed_precision is fp16: a population has no loss scaling (bf16 or false)"
    for key in spec.search_space:
        if varies_shape(key, base.data.split_seed):
            what = ("each trial has its own data split (set data.split_seed to share one)" if key == "seed"
                    else "the trials differ in shape or data")
            return f"'{key}' is searched: {what}"
    return None


def population_plan(spec: SweepSpec, state: SweepState, gpus: float) -> PopulationPlan:
    """The plan for ``spec`` on a cluster with ``gpus`` GPUs (``state.gpu_share`` > 0: the trials use them).

    ``resources.population: N`` holds N members per population; ``auto`` holds every trial the sweep
    creates, up to what fits: on a GPU the card's ``gpu_memory_gb`` less the CUDA context, over one
    member's measured memory with the sweep's headroom (:func:`measure_member_memory`); on a CPU at most
    :data:`CPU_SLOTS`. One population per GPU (at most as many as the trials need), or one on CPUs."""
    on_gpu = state.gpu_share > 0 and gpus > 0
    reason = why_not(spec, on_gpu)
    if reason is not None:
        return PopulationPlan(reason=reason)
    trials = spec.expected_trials()
    res = spec.resources
    if isinstance(res.population, int):
        slots, why = res.population, f"resources.population is {res.population}"
    elif on_gpu and state.card_bytes:
        fits = members_in_card(spec, state.card_bytes)
        slots, why = min(trials, fits), f"{fits} fit a {state.card_bytes / 2**30:.3g} GB card"
    else:
        slots, why = min(trials, CPU_SLOTS), "every trial" if trials <= CPU_SLOTS else f"at most {CPU_SLOTS} on CPUs"
    slots = max(1, min(slots, trials))
    executors = max(1, min(int(gpus), math.ceil(trials / slots))) if on_gpu else 1
    return PopulationPlan(slots=slots, executors=executors, reason=why)


def members_in_card(spec: SweepSpec, card_bytes: float) -> int:
    """How many members of the sweep's largest config fit a card of ``card_bytes``: measured with a short
    population burst on the local GPU (:func:`measure_member_memory`)."""
    from hvae_ray.sweep.resources import CUDA_CONTEXT, MiB

    measured = measure_member_memory(spec.largest_trial_config())
    context = measured.get("context", CUDA_CONTEXT) if measured else CUDA_CONTEXT
    if measured is None:
        print("population: no local GPU to measure a member's memory; sized for 120 MiB per member",
              file=sys.stderr)
        base, per_member = 200 * MiB, 120 * MiB
    else:
        base, per_member = measured["base"], measured["per_member"]
    room = card_bytes - context - base * spec.resources.headroom
    return max(1, int(room // (per_member * spec.resources.headroom)))


def measure_member_memory(cfg, ks: tuple[int, int] = (2, 6)) -> dict[str, float] | None:
    """Torch's peak allocated bytes of populations of ``ks`` members of ``cfg`` (training, validation and
    the generation score), each in a fresh process on the local GPU; returns the fixed part ``base``, the
    part each member adds ``per_member`` and the CUDA ``context`` (whole process less reserved, by NVML),
    or None without CUDA. A burst that fails raises :class:`~hvae_ray.sweep.resources.BurstFailed`."""
    import json
    import subprocess

    try:
        import torch

        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    from hvae_ray.sweep.resources import BurstFailed

    peaks = []
    for k in ks:
        code = ("import json,sys\nfrom hvae_ray.config import from_dict\n"
                "from hvae_ray.sweep.population import _member_burst\n"
                f"print('RESULT', json.dumps(_member_burst(from_dict(json.loads(sys.argv[1]), 'member'), {k})))\n")
        try:
            out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict())], capture_output=True,
                                 text=True, timeout=600)
        except (subprocess.TimeoutExpired, OSError) as e:
            raise BurstFailed(f"the population burst did not run: {e}") from None
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            errors = [ln.strip() for ln in (out.stderr or "").splitlines() if ln.strip()]
            raise BurstFailed(errors[-1][:300] if errors else "the population burst printed no result")
        peaks.append(json.loads(line[7:]))
    (k0, k1), (p0, p1) = ks, peaks
    per_member = max((p1["allocated_peak"] - p0["allocated_peak"]) / (k1 - k0), 1.0)
    base = max(p0["allocated_peak"] - k0 * per_member, 0.0) + (p1["reserved_peak"] - p1["allocated_peak"])
    context = p1["process"] - p1["reserved_peak"] if math.isfinite(p1["process"]) else float("nan")
    out = {"base": base, "per_member": per_member}
    return out | ({"context": context} if math.isfinite(context) and context > 0 else {})


def _member_burst(cfg, k: int) -> dict[str, float]:
    """A population of ``k`` members of ``cfg`` on the GPU, briefly: an epoch of synthetic 30-particle jets,
    validation and the generation score for each member."""
    import torch

    from hvae_ray.engine import PopulationRuns
    from hvae_ray.sweep.resources import _device_used, burst_jets

    dev = torch.device("cuda")
    used0 = _device_used(dev)
    n = max(256, math.ceil(8 * cfg.batch_size * cfg.gradient_accumulation_steps / (1 - cfg.data.val_fraction
                                                                                    - cfg.data.test_fraction)))
    runs = PopulationRuns(cfg, burst_jets(n), k, dev)
    for i in range(k):
        runs.join(cfg.with_overrides({"seed": i, "data.split_seed": cfg.data.split_seed if cfg.data.split_seed >= 0
                                      else cfg.seed}, "member burst"))
    runs.train_epoch()
    torch.cuda.synchronize()
    used1 = _device_used(dev)
    return {"allocated_peak": float(torch.cuda.max_memory_allocated(dev)),
            "reserved_peak": float(torch.cuda.max_memory_reserved(dev)),
            "process": float(used1 - used0) if used0 is not None and used1 is not None else float("nan")}


# ---------------------------------------------------------------------------------------------------------
# The executor


@dataclass
class _Join:
    trial_id: str
    config: dict[str, Any]
    work_dir: str
    tb_dir: str
    resume: str | None
    loop_started_at: float
    token: str | None = None
    error: str | None = None


@dataclass
class _Member:
    trial_id: str
    token: str
    slot: int
    log: Path  # the trial's epoch log, appended to as soon as an epoch is trained (and checkpointed)
    loop_started_at: float
    wants: bool = False  # its trial asked for its next epoch
    result: dict[str, Any] | None = None  # that epoch's outcome, for the waiting call
    asked_at: float = field(default_factory=time.monotonic)


class PopulationExecutor:
    """One population in one process (a threaded Ray actor; ``ray.remote`` is applied by
    :func:`start_executors`). A background thread trains; trials call :meth:`join`, :meth:`epoch` and
    :meth:`leave` from their own processes."""

    def __init__(self, shape: dict[str, Any], data_path: str, slots: int, card_bytes: float | None = None,
                 context_bytes: float | None = None, threads: int | None = None, max_wait_s: float = 2.0,
                 shrink_after_s: float = SHRINK_AFTER_S):
        import psutil
        import ray
        import torch

        from hvae_ray.config import from_dict
        from hvae_ray.data.io import load_jets
        from hvae_ray.engine import PopulationRuns

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        cfg = from_dict(shape, "population shape")
        device = torch.device("cpu")
        if ray.get_gpu_ids() and torch.cuda.is_available():
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
            if card_bytes:
                from hvae_ray.sweep.resources import CUDA_CONTEXT, allocator_fraction

                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(
                    allocator_fraction(1.0, card_bytes, total, context_bytes or CUDA_CONTEXT), device)
        self.runs = PopulationRuns(cfg, load_jets(data_path), slots, device)
        self.slots, self.max_wait_s, self.shrink_after_s = slots, max_wait_s, shrink_after_s
        self._joined_at = time.monotonic()  # the last join, for shrinking
        self._peak = 0  # the most members held since the last resize
        self.resizes: list[tuple[int, int]] = []
        self.node_id = ray.get_runtime_context().get_node_id()
        self.started_at = psutil.Process().create_time()
        self._cond = threading.Condition()
        self._members: dict[str, _Member] = {}
        self._joins: list[_Join] = []
        self._leaves: list[tuple[str, str | None]] = []
        self._all_started = False  # no trial of the sweep is left to start (a retried one may still join)
        self._epochs = 0
        threading.Thread(target=self._train_loop, name="population", daemon=True).start()

    # Calls from trials and from the driver -------------------------------------------------------------

    def join(self, trial_id: str, config: dict[str, Any], work_dir: str, tb_dir: str,
             resume: str | None = None, loop_started_at: float | None = None) -> str | None:
        """Make ``trial_id`` a member (replacing a membership it held before: a retried trial) at the next
        epoch boundary; returns the membership's token, or None at once when every slot is taken."""
        with self._cond:
            held = 1 if trial_id in self._members else 0
            if self.slots - len(self._members) + held + len(self._leaves) - len(self._joins) <= 0:
                return None
            j = _Join(trial_id, config, work_dir, tb_dir, resume, loop_started_at or time.time())
            self._joins.append(j)
            self._cond.notify_all()
            while j.token is None and j.error is None:
                self._cond.wait(timeout=1.0)
        if j.error is not None:
            raise HvaeError(j.error)
        return j.token

    def epoch(self, token: str) -> dict[str, Any]:
        """Train the member's next epoch (with the others that asked, at the next boundary) and return its
        outcome: ``metrics``, ``checkpoint`` (its ``last/``), ``done``, ``diverged``, the population's size."""
        with self._cond:
            member = self._by_token(token)
            member.wants, member.result, member.asked_at = True, None, time.monotonic()
            self._cond.notify_all()
            while member.result is None:
                if self._by_token(token, missing_ok=True) is None and member.result is None:
                    raise HvaeError(f"trial {member.trial_id} left the population")
                self._cond.wait(timeout=1.0)
            return member.result

    def leave(self, trial_id: str, token: str | None = None) -> None:
        """``trial_id``'s member leaves at the next epoch boundary: its membership ``token``, or (None)
        whatever membership it holds."""
        with self._cond:
            self._leaves.append((trial_id, token))
            self._cond.notify_all()

    def all_started(self) -> None:
        """Every trial of the sweep has started: a population that members have left is resized to those
        that remain at the next epoch boundary, without waiting ``shrink_after_s`` for a trial to join."""
        with self._cond:
            self._all_started = True
            self._cond.notify_all()

    def info(self) -> dict[str, Any]:
        with self._cond:
            return {"slots": self.slots, "members": sorted(self._members), "epochs": self._epochs,
                    "device": str(self.runs.population.device), "node_id": self.node_id,
                    "trained_slots": self.runs.slots, "resizes": list(self.resizes)}

    # The training thread -------------------------------------------------------------------------------

    def _by_token(self, token: str, missing_ok: bool = False) -> _Member | None:
        found = next((m for m in self._members.values() if m.token == token), None)
        if found is None and not missing_ok:
            raise HvaeError("not a member of this population (it left, or the executor restarted)")
        return found

    def _train_loop(self) -> None:
        while True:
            try:
                with self._cond:
                    batch = self._next_batch()
                outcomes = self._train(batch)
                with self._cond:
                    self._deliver(batch, outcomes)
                    self._cond.notify_all()
            except Exception:  # noqa: BLE001 - said in the executor's log; the population goes on
                traceback.print_exc()
                time.sleep(0.1)

    def _next_batch(self) -> list[_Member]:
        """At an epoch boundary: leaves, then joins, then the members to train: every member once all have
        asked, or those that asked once the first of them has waited ``max_wait_s``."""
        while True:
            self._apply_leaves()
            self._admit()
            self._shrink()
            asked = [m for m in self._members.values() if m.wants]
            waited = time.monotonic() - min((m.asked_at for m in asked), default=time.monotonic())
            if asked and (len(asked) == len(self._members) or waited >= self.max_wait_s):
                for m in asked:
                    m.wants = False
                return asked
            self._cond.wait(timeout=0.02 if asked else 0.5)

    def _apply_leaves(self) -> None:
        for trial_id, token in self._leaves:
            m = self._members.get(trial_id)
            if m is not None and token in (None, m.token):
                self._remove(m)
        self._leaves.clear()

    def _remove(self, m: _Member, finished: bool = False) -> None:
        del self._members[m.trial_id]
        self.runs.leave(m.slot, finished=finished)

    def _admit(self) -> None:
        from hvae_ray.config import from_dict

        while self._joins:
            j = self._joins[0]
            if j.trial_id in self._members:
                self._remove(self._members[j.trial_id])  # its earlier attempt
            if not self.runs.free and self.runs.slots < self.slots:
                self._resize(min(self.slots, len(self._members) + len(self._joins)))
            if not self.runs.free:
                return
            self._joins.pop(0)
            self._joined_at = time.monotonic()
            self._peak = max(self._peak, len(self._members) + 1)
            try:
                slot = self.runs.join(from_dict(j.config, f"trial {j.trial_id}"), j.work_dir, j.tb_dir, j.resume)
            except Exception as e:  # noqa: BLE001 - the trial's join fails with it; the population goes on
                j.error = f"population: trial {j.trial_id} cannot join: {type(e).__name__}: {e}"
            else:
                j.token = uuid.uuid4().hex
                self._members[j.trial_id] = _Member(j.trial_id, j.token, slot, Path(j.work_dir) / METRICS_LOG,
                                                    j.loop_started_at)
            self._cond.notify_all()

    def _shrink(self) -> None:
        """Every slot is computed, held or not: once members have left and at most half the trained slots
        are held, with no trial joining for ``shrink_after_s`` (or none left to start), train the members
        alone (a trial that joins later grows the population back, up to its ``slots``). Slots not yet
        filled (trials still starting) never shrink it."""
        held = len(self._members)
        quiet = self._all_started or time.monotonic() - self._joined_at >= self.shrink_after_s
        if held and held <= self.runs.slots // 2 and self._peak > held and not self._joins and quiet:
            self._resize(held)

    def _resize(self, slots: int) -> None:
        before = self.runs.slots
        moved = self.runs.resize(slots)
        for m in self._members.values():
            m.slot = moved[m.slot]
        self.resizes.append((before, slots))
        self._peak = len(self._members)
        print(f"population: {before} slots -> {slots} for {len(self._members)} members", file=sys.stderr)

    def _train(self, batch: list[_Member]) -> dict[int, dict[str, Any]]:
        """One epoch of ``batch``'s members; each one's outcome: its report ``row`` (already in its epoch
        log, beside its ``last/`` checkpoint), ``checkpoint``, ``done``, ``diverged``; a fault of the whole
        step is every member's ``error``."""
        slots = [m.slot for m in batch]
        try:
            epochs = self.runs.train_epoch(slots)
        except Exception as e:  # noqa: BLE001 - handed to each waiting trial, which fails and is retried
            return {s: {"error": f"{type(e).__name__}: {e}"} for s in slots}
        self._epochs += 1
        members = {m.slot: m for m in batch}
        out = {}
        for ep in epochs:
            m, rep = members[ep.slot], ep.report
            if rep is None:
                row = DivergedReport(ep.diverged, self.node_id).to_row()
            else:
                metrics = {k: float(v) for k, v in rep.metrics.items() if isinstance(v, (int, float))}
                row = EpochReport(metrics, epochs_done=rep.epoch + 1, node_id=self.node_id,
                                  worker_started_at=self.started_at, loop_started_at=m.loop_started_at,
                                  reported_at=time.time()).to_row()
                row |= {POPULATION: self.slots, POPULATION_MEMBERS: len(slots), MEMBER_TOKEN: m.token}
            append_jsonl(m.log, row)
            out[ep.slot] = {"row": row, "done": ep.done, "diverged": ep.diverged, "is_best": bool(rep and rep.is_best),
                            "epoch": rep.epoch if rep else None,
                            "checkpoint": str(rep.checkpoint_dir) if rep and rep.checkpoint_dir else None}
        return out

    def _deliver(self, batch: list[_Member], outcomes: dict[int, dict[str, Any]]) -> None:
        for m in batch:
            m.result = outcomes.get(m.slot, {"error": "the population returned no outcome for this member"})
            if m.result.get("done") and self._members.get(m.trial_id) is m:
                self._remove(m, finished=m.result.get("diverged") is None)


def start_executors(plan: PopulationPlan, state: SweepState, spec: SweepSpec) -> list:
    """The sweep's executors as named, restartable Ray actors: each holds a whole GPU (the card the plan
    sized it for) or, on CPUs, the CPUs its members would have had as trials."""
    import ray

    gpu = 1.0 if state.gpu_share > 0 else 0.0
    # the members' CPUs as trials would have had them, less what their trials' functions hold (0.01 each),
    # within one node's CPUs
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
    cpus = max(0.01, min(spec.resources.cpus_per_worker * plan.slots, node_cpus) - 0.01 * plan.slots)
    actor = ray.remote(PopulationExecutor)
    options = {"num_cpus": cpus if not gpu else spec.resources.cpus_per_worker, "num_gpus": gpu,
               "max_restarts": -1, "max_task_retries": 0, "max_concurrency": 4 * plan.slots + 16}
    out = []
    for name in executor_names(state.experiment_dir, plan.executors):
        out.append(actor.options(name=name, **options).remote(
            spec.base.to_dict(), state.data_path, plan.slots, state.card_bytes, state.context_bytes,
            threads=max(1, round(cpus)) if not gpu else None))
    return out


def stop_executors(executors: list, names: list[str]) -> None:
    """Kill the executors and wait (up to 30 s) until their names are free for a next run of the sweep."""
    import ray

    for ex in executors:
        ray.kill(ex, no_restart=True)
    deadline = time.monotonic() + 30
    while _executors(names) and time.monotonic() < deadline:
        time.sleep(0.1)


def executor_names(experiment_dir: str, n: int) -> list[str]:
    """The executors' actor names: one experiment's, whichever driver runs or resumes it."""
    import hashlib

    tag = hashlib.sha256(str(experiment_dir).encode()).hexdigest()[:12]
    return [f"{EXECUTOR_PREFIX}{tag}-{i}" for i in range(n)]


def _executors(names: list[str]) -> list:
    import ray

    out = []
    for name in names:
        try:
            out.append(ray.get_actor(name))
        except ValueError:
            continue
    return out


# ---------------------------------------------------------------------------------------------------------
# A trial's side


def member_trial(sampled: dict[str, Any], state: SweepState, spec: SweepSpec) -> None:
    """One Tune trial as a population member: join an executor (continuing from the trial's checkpoint
    when Tune restores one), then report each epoch the executor trains for it, asking for the next
    only once the report returned (the scheduler let it go on)."""
    import ray
    import ray.tune

    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = spec.trial_config(sampled)
    paths = TrialPaths(Path(state.experiment_dir) / Path(ctx.get_trial_dir()).name)
    ckpt = ray.tune.get_checkpoint()
    resume = ckpt.path if ckpt is not None else None
    resume, finished = _catch_up(paths, cfg, resume)
    if finished:
        return
    names = executor_names(state.experiment_dir, state.population_executors)
    executor, token = _join(trial_id, cfg.to_dict(), paths, resume, names)
    while True:
        out = ray.get(executor.epoch.remote(token))
        if out.get("error"):
            raise RuntimeError(f"population: {out['error']}")
        if out["diverged"] is not None:
            ray.tune.report(out["row"])
            return
        keep = out["done"] or out["is_best"] or (out["epoch"] + 1) % CHECKPOINT_EVERY == 0
        ray.tune.report(out["row"], checkpoint=ray.tune.Checkpoint.from_directory(out["checkpoint"]) if keep else None)
        if out["done"]:
            return


def _catch_up(paths: TrialPaths, cfg, resume: str | None) -> tuple[str | None, bool]:
    """Report the epochs the member trained and logged that Tune's checkpoint does not hold (a sweep
    stopped between the member's epoch log and Tune's state), so that none is trained twice; returns the
    checkpoint to continue from, and whether the trial had already finished.

    Only when the member's own ``last/`` is the newest logged epoch and every epoch after Tune's
    checkpoint is in the log; otherwise the member continues from Tune's checkpoint."""
    last = paths.engine / "last"
    if resume is None and not last.exists():
        return None, False  # a new trial: nothing to catch up (and no need for torch in its process)
    import ray.tune

    from hvae_ray.engine import load_checkpoint
    from hvae_ray.engine.trainer import patience_ran_out
    from hvae_ray.errors import DataError

    try:
        start = int(load_checkpoint(resume)["epoch"]) if resume is not None else -1
        newest = load_checkpoint(last)
    except DataError:
        return resume, False
    rows = [r for r in read_jsonl(paths.metrics_log) if isinstance(r.get(EPOCH), (int, float))]
    pending = [r for r in rows if r[EPOCH] > start]
    epochs = [int(r[EPOCH]) for r in pending]
    if not pending or epochs != list(range(start + 1, start + 1 + len(pending))) \
            or int(newest["epoch"]) != epochs[-1]:
        return resume, False
    for row in pending[:-1]:
        ray.tune.report(row)
    ray.tune.report(pending[-1], checkpoint=ray.tune.Checkpoint.from_directory(str(last)))
    epoch = epochs[-1]
    done = epoch + 1 >= cfg.epochs or patience_ran_out(cfg, int(newest["best_epoch"]), epoch, False)
    return str(last), done


def _join(trial_id: str, config: dict[str, Any], paths: TrialPaths, resume: str | None, names: list[str]):
    """The first executor with a free slot, and the membership's token (waits while every slot is taken)."""
    import ray

    while True:
        executors = _executors(names)
        if not executors:
            raise HvaeError("population: the sweep's executors are gone (the Ray instance is stopping)")
        for ex in executors:
            token = ray.get(ex.join.remote(trial_id, config, str(paths.engine), str(paths.tensorboard), resume,
                                           time.time()))
            if token is not None:
                return ex, token
        time.sleep(0.1)


class MemberLeaves(Callback):
    """A Tune callback on the driver that tells the executors when a trial ends:
    stopped, finished, failed for good (whatever membership it holds leaves), or failed and about to be
    retried (the membership of its last report leaves; the retry's own join replaces any other); and,
    once, when all ``expected`` trials of the sweep exist and none waits to start (no trial is left to
    join, so a population that members leave shrinks at once)."""

    def __init__(self, names: list[str], expected: int | None = None):
        self.names, self.expected, self._said_all_started = names, expected, False

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if self._said_all_started or self.expected is None or len(trials) < self.expected:
            return
        if any(t.status == Trial.PENDING for t in trials):
            return
        self._said_all_started = True
        for ex in _executors(self.names):
            ex.all_started.remote()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._leave(trial.trial_id, None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._leave(trial.trial_id, None)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        token = (trial.last_result or {}).get(MEMBER_TOKEN)
        if token:
            self._leave(trial.trial_id, token)

    def _leave(self, trial_id: str, token: str | None) -> None:
        for ex in _executors(self.names):
            ex.leave.remote(trial_id, token)

