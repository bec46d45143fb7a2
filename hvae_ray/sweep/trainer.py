"""Ray Train around the engine: one TorchTrainer per trial; rank 0 reports metrics and a checkpoint
every epoch; a restarted worker (or a resumed sweep) continues from the last reported checkpoint."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvae_ray.sweep.layout import METRICS_LOG, DivergedReport, EpochReport, TrialLoop, append_jsonl
from hvae_ray.sweep.resources import CUDA_CONTEXT, allocator_fraction

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s),
# which delays every report by up to that long: with epochs of a few seconds that is the largest
# overhead of the whole stack. 0.05 s keeps a report at ~0.05 s.
# A standby trial's controller waits for its worker group's placement group (a free share) for up to
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (default 60 s), then gives the group up and asks again; a
# longer wait keeps a standby trial queued instead of cycling placement groups every minute.
# NCCL_NVLS_ENABLE=0: no NVLink multicast (NVLS) for multi-GPU trials; on a shared host its buffers can
# take memory that other trials' shares count on. Set it in the environment to change any of these.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05", "RAY_TRAIN_V2_ENABLED": "1",
             "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600", "NCCL_NVLS_ENABLE": "0"}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the engine with Ray reporting as its callback.

    loop_config: a :class:`~hvae_ray.sweep.layout.TrialLoop` as a dict (Ray Train passes plain data).
    """
    import contextlib

    import ray.train
    import torch

    from hvae_ray.config import from_dict
    from hvae_ray.data.io import load_jets
    from hvae_ray.engine import fit
    from hvae_ray.errors import TrainingDiverged

    loop = TrialLoop.from_dict(loop_config)
    reporter = _Reporter.start(loop)  # first: its loop_started_at is when this function began
    cfg = from_dict(loop.config, "trial config")
    device, cap_fraction = _device(loop)
    sample = load_jets(loop.data_path)
    ckpt = ray.train.get_checkpoint()  # set when a worker restarts or a sweep resumes
    try:
        with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext() as resume_dir:
            fit(cfg, sample, save_dir=loop.work_dir, log_dir=loop.tb_dir if reporter.rank == 0 else None,
                resume=resume_dir or False, callbacks=[reporter], progress=False, device=device)
    except TrainingDiverged as e:
        # A diverged trial ends normally with a terminal report: the sweep carries on and the
        # trial table shows it as diverged, with the reason.
        reporter.diverged(str(e))
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(f"trial ran out of GPU memory within its share (allocator cap {cap_fraction:.3f} "
                           "of the card); raise resources.trial_memory_mb or lower batch_size/hidden_dim") from e


def _device(loop: TrialLoop):
    """This worker's device, and the allocator cap set on it for the trial's GPU share (None: no cap)."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu"), None
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    if not loop.gpu_share:
        return device, None
    # Cap this process's allocator to its share so a neighbour's trial cannot be starved.
    total = torch.cuda.get_device_properties(device).total_memory
    context = loop.context_bytes or CUDA_CONTEXT
    cap_fraction = allocator_fraction(loop.gpu_share, loop.card_bytes or total, total, context)
    torch.cuda.set_per_process_memory_fraction(cap_fraction, device)
    return device, cap_fraction


@dataclass
class _Reporter:
    """The engine's callback on a worker: each epoch's report to Ray Train (with rank 0's checkpoint),
    and rank 0's copy in the trial's own epoch log, which survives a resume unlike Tune's result.json."""

    log: Path
    rank: int
    node_id: str  # which Ray node trained it (trial tables, multi-node checks)
    worker_started_at: float
    loop_started_at: float

    @classmethod
    def start(cls, loop: TrialLoop) -> _Reporter:
        import psutil
        import ray
        import ray.train

        # Ray may start a worker process ahead and only later place this trial's worker in it (once its
        # share is free), so the process can be older than the trial's hold on the share; the loop's
        # start always comes after the share was granted.
        return cls(log=Path(loop.work_dir) / METRICS_LOG, rank=ray.train.get_context().get_world_rank(),
                   node_id=ray.get_runtime_context().get_node_id(),
                   worker_started_at=psutil.Process().create_time(), loop_started_at=time.time())

    def __call__(self, rep) -> None:
        import ray.train

        metrics = {k: float(v) for k, v in rep.metrics.items() if isinstance(v, (int, float))}
        row = EpochReport(metrics, epochs_done=rep.epoch + 1, node_id=self.node_id,
                          worker_started_at=self.worker_started_at, loop_started_at=self.loop_started_at,
                          reported_at=time.time()).to_row()
        checkpoint = None
        if self.rank == 0:
            append_jsonl(self.log, row)
            if rep.checkpoint_dir is not None:
                checkpoint = ray.train.Checkpoint.from_directory(str(rep.checkpoint_dir))
        ray.train.report(row, checkpoint=checkpoint)

    def diverged(self, error: str) -> None:
        import ray.train

        row = DivergedReport(error, self.node_id).to_row()
        if self.rank == 0:
            append_jsonl(self.log, row)
        ray.train.report(row)


def backend_for(resources, cuda_here: bool) -> str:
    """gloo unless several GPU workers per trial can use NCCL (never on a host without CUDA)."""
    if resources.backend != "auto":
        return resources.backend
    return "nccl" if resources.uses_gpu and resources.num_workers > 1 and cuda_here else "gloo"


def make_trainer(loop: TrialLoop, resources, gpu_share: float, storage: str, name: str,
                 score: tuple[str, str] | None = None):
    """A TorchTrainer for one trial whose reports flow to Tune (TuneReportCallback).

    score: (metric, mode) the sweep ranks on; the 2 best checkpoints by it are kept besides the latest
    (which Ray Train always keeps, for resume), so the trial table's best_checkpoint stays on disk.
    """
    import ray.train
    import torch
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    use_gpu = gpu_share > 0
    if use_gpu:
        per_worker["GPU"] = gpu_share
    scaling = ray.train.ScalingConfig(num_workers=resources.num_workers, use_gpu=use_gpu,
                                      resources_per_worker=per_worker)
    run = ray.train.RunConfig(
        name=name, storage_path=storage, callbacks=[TuneReportCallback()],
        # No restart inside Ray Train: when Tune stops a trial (ASHA, max_t) it kills the trial's driver,
        # the kill reaches the training worker a moment before the controller, and a controller allowed
        # to retry asks for a new placement group in that moment; the controller then dies, Ray Train's
        # cleaner never learns of that group, and its CPU/GPU share stays taken for good (a sweep on a
        # small host stalls). A failed worker is retried by Tune instead (the sweep's max_failures): the
        # trial's driver starts again and its TorchTrainer restores the run's last checkpoint.
        failure_config=ray.train.FailureConfig(max_failures=0),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute=score[0] if score else None,
            checkpoint_score_order=score[1] if score else "max"),
    )
    if resources.num_workers == 1:
        torch_config = _without_process_group(TorchConfig)
    else:
        torch_config = TorchConfig(backend=backend_for(resources, torch.cuda.is_available()))
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop.to_dict(), scaling_config=scaling, run_config=run,
                        torch_config=torch_config)


def _without_process_group(torch_config_cls):
    """A TorchConfig whose backend sets nothing up: a one-worker trial needs no torch.distributed process
    group, and creating one opens its rendezvous store (c10d's TCPStore), which torch binds to every
    interface for the whole trial, with no setting to keep it on loopback."""
    from ray.train.backend import Backend

    class SingleWorker(torch_config_cls):
        @property
        def backend_cls(self):
            return Backend

    return SingleWorker()


def env_vars() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in TRAIN_ENV.items()}
