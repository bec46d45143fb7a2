"""A population's members as runs: each with its own ``save_dir`` (``config.yaml``, ``last/``, ``best/``),
TensorBoard run, best epoch, patience and divergence check, as :func:`~hvae_ray.engine.fit` keeps them for
one run. Members join (new, or resumed from a checkpoint) and leave at epoch boundaries.

:class:`PopulationRuns` is what both :func:`fit_population` and a sweep's population executor
(:mod:`hvae_ray.sweep.population`) drive; it knows nothing of how its members are scheduled.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hvae_ray.config import OBJECTIVE_METRICS, Config
from hvae_ray.data.dense import FeatureNormaliser
from hvae_ray.data.jets import JetSample
from hvae_ray.engine.batches import prepare
from hvae_ray.engine.checkpoint import load_checkpoint, write_run_files
from hvae_ray.engine.population import Population
from hvae_ray.engine.runtime import resolve_device
from hvae_ray.engine.trainer import EpochReport, RunLog, patience_ran_out
from hvae_ray.errors import DataError

#: Threads that write members' checkpoints and TensorBoard scalars side by side.
WRITER_THREADS = 8
_writers: ThreadPoolExecutor | None = None


def _member_files() -> ThreadPoolExecutor:
    """The one pool (made on first use, shared by every population in the process) that writes members' files."""
    global _writers
    if _writers is None:
        _writers = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="member-files")
    return _writers


@dataclass
class MemberEpoch:
    """One member's epoch as its run saw it: ``report`` (metrics and ``last/``) or ``diverged`` (the
    reason), and ``done``: the member's run has ended (its epochs, patience, or divergence)."""

    slot: int
    report: EpochReport | None
    diverged: str | None
    done: bool


class PopulationRuns:
    """Runs of one shape trained as one :class:`Population` of ``slots`` on ``sample``'s split."""

    def __init__(self, shape: Config, sample: JetSample, slots: int, device: torch.device | str | None = None,
                 cuda_graphs: bool | None = None):
        dev = torch.device(device) if device is not None else resolve_device(shape.device)
        self.population = Population(shape, prepare(shape, sample, device=dev), slots, dev, cuda_graphs)
        self._runs: dict[int, RunLog] = {}

    @property
    def free(self) -> int:
        return self.population.slots - len(self.population.occupied)

    @property
    def slots(self) -> int:
        return self.population.slots

    def resize(self, slots: int) -> dict[int, int]:
        """Move the members to a population of ``slots`` slots (:meth:`Population.resized`), their runs
        with them; returns the slot map old → new."""
        self.population, moved = self.population.resized(slots)
        self._runs = {moved[slot]: run for slot, run in self._runs.items()}
        return moved

    def join(self, cfg: Config, save_dir: str | Path | None = None, log_dir: str | Path | None = None,
             resume: str | Path | None = None) -> int:
        """Add ``cfg`` as a member: new, or continuing from the checkpoint (file or folder) ``resume``.
        Returns its slot. A checkpoint from another split's normalisation is refused (DataError)."""
        state = None
        if resume is not None:
            state = load_checkpoint(resume)
            theirs = FeatureNormaliser.from_state_dict(state["normaliser"]).state_dict()
            if theirs != self.population.normaliser.state_dict():
                raise DataError(f"{resume}: this checkpoint was trained on another split or data file")
        slot = self.population.add(cfg, state)
        save = Path(save_dir) if save_dir is not None else None
        if save is not None and state is None:
            write_run_files(save, cfg)
        logger = None
        if log_dir is not None:
            from hvae_ray.tracking import TensorBoardLogger

            logger = TensorBoardLogger(log_dir)
        self._runs[slot] = RunLog(cfg, logger, self.population.splits, save)
        return slot

    def train_epoch(self, slots: Sequence[int] | None = None) -> list[MemberEpoch]:
        """One epoch of the members in ``slots`` (default: all): each one's metrics recorded as ``fit``
        records them (``last/``, ``best/``, TensorBoard). The members' files are written side by side, in
        threads (their fsyncs overlap), and all are written when this returns; a failed write raises."""
        out, writes = [], []
        for rep in self.population.train_epoch(slots):
            member, run = self.population.member(rep.slot), self._runs[rep.slot]
            if rep.diverged is not None:
                out.append(MemberEpoch(rep.slot, None, rep.diverged, True))
                continue
            report, write = run.prepare(member, rep.epoch, rep.metrics)
            writes.append(_member_files().submit(write))
            run.figures(member, report)
            done = rep.epoch + 1 >= member.cfg.epochs or patience_ran_out(member.cfg, member.best_epoch,
                                                                          rep.epoch, False)
            out.append(MemberEpoch(rep.slot, report, None, done))
        for w in writes:
            w.result()
        return out

    def leave(self, slot: int, finished: bool = False) -> dict[str, Any]:
        """Free ``slot``. A member that ``finished`` (its last epoch) gets its closing figures. Returns its
        summary: epochs run, best epoch and best value."""
        member, run = self.population.member(slot), self._runs.pop(slot)
        key = OBJECTIVE_METRICS[member.cfg.objective]
        summary = {"epochs_run": member.epoch - member.start_epoch, "best_epoch": member.best_epoch,
                   f"best_{key}": member.best, "save_dir": str(run.save_dir) if run.save_dir else None}
        try:
            if finished and member.active:
                run.close(member, member.epoch - 1)
        finally:
            if run.logger is not None:
                run.logger.close()
            self.population.remove(slot)
        return summary


def fit_population(cfgs: Sequence[Config], sample: JetSample, *, save_dirs: Sequence[str | Path | None] | None = None,
                   log_dirs: Sequence[str | Path | None] | None = None, device: torch.device | str | None = None,
                   slots: int | None = None) -> list[dict[str, Any]]:
    """Train ``cfgs`` (one shape) as one population: what :func:`~hvae_ray.engine.fit` does for each, with
    each member's own ``save_dir`` (``last/``, ``best/``, ``config.yaml``) and TensorBoard ``log_dir``,
    best epoch, patience and divergence. Returns one result per config, as ``fit`` returns it, with
    ``diverged`` set to the reason for a member that diverged. ``slots`` (default: all) bounds how many
    train at once; the others take a slot as one finishes."""
    n = len(cfgs)
    save_dirs = list(save_dirs or [None] * n)
    log_dirs = list(log_dirs or [None] * n)
    runs = PopulationRuns(cfgs[0], sample, slots or n, device)
    results: list[dict[str, Any]] = [{} for _ in cfgs]
    waiting, index = list(range(n)), {}

    while waiting or index:
        while waiting and runs.free:
            i = waiting.pop(0)
            index[runs.join(cfgs[i], save_dirs[i], log_dirs[i])] = i
        for ep in runs.train_epoch():
            if not ep.done:
                continue
            i = index.pop(ep.slot)
            last = {"diverged": ep.diverged} if ep.diverged is not None else dict(ep.report.metrics)
            results[i] = {**last, **runs.leave(ep.slot, finished=ep.diverged is None),
                          "log_dir": str(log_dirs[i]) if log_dirs[i] else None}
    return results
