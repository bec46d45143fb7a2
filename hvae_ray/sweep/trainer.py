"""Ray Train around the engine: one TorchTrainer per trial; rank 0 reports metrics and a checkpoint
every epoch; a restarted worker (or a resumed sweep) continues from the last reported checkpoint."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from hvae_ray.sweep.resources import CUDA_CONTEXT, allocator_fraction
from hvae_ray.sweep.spec import RANKABLE_METRICS

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


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the engine with Ray reporting as its callback.

    loop: {'config': Config dict, 'data_path': str, 'tb_dir': str, 'work_dir': str (the engine's
    save_dir: last/ and best/ checkpoints, inside the trial's directory), 'gpu_share': float,
    'card_bytes': float | None (the card size the share refers to; None = this device's),
    'context_bytes': float | None (the CUDA context measured for sizing; None = the usual figure)}.
    """
    import contextlib

    import psutil
    import ray
    import ray.train
    import torch

    from hvae_ray.config import from_dict
    from hvae_ray.data.io import load_jets
    from hvae_ray.engine import fit
    from hvae_ray.errors import TrainingDiverged

    # When this worker process was launched: with `reported_at`, start-up on the critical path (a
    # standby trial's wait for a share excluded) = first reported_at - worker_started_at - epoch_time_s.
    # Ray may start a worker process ahead and only later place this trial's worker in it (once its
    # share is free), so the process can be older than the trial's hold on the share; `loop_started_at`,
    # when this function began, always comes after the share was granted.
    loop_started_at = time.time()
    started_at = psutil.Process().create_time()
    cfg = from_dict(loop["config"], "trial config")
    node_id = ray.get_runtime_context().get_node_id()
    rank = ray.train.get_context().get_world_rank()
    cap_fraction = None
    if torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        if loop.get("gpu_share"):
            # Cap this process's allocator to its share so a neighbour's trial cannot be starved.
            total = torch.cuda.get_device_properties(device).total_memory
            context = loop.get("context_bytes") or CUDA_CONTEXT
            cap_fraction = allocator_fraction(loop["gpu_share"], loop.get("card_bytes") or total, total, context)
            torch.cuda.set_per_process_memory_fraction(cap_fraction, device)
    else:
        device = torch.device("cpu")

    def report(rep) -> None:
        metrics = {k: float(v) for k, v in rep.metrics.items() if isinstance(v, (int, float))}
        metrics["epochs_done"] = rep.epoch + 1  # ASHA's time attribute
        metrics["diverged"] = 0.0
        metrics["node_id"] = node_id  # which Ray node trained it (trial tables, multi-node checks)
        metrics["worker_started_at"] = started_at
        metrics["loop_started_at"] = loop_started_at
        metrics["reported_at"] = time.time()
        checkpoint = None
        if rank == 0:  # the trial's own epoch log survives a resume, unlike Tune's result.json
            _append_log(loop["work_dir"], metrics)
        if rank == 0 and rep.checkpoint_dir is not None:
            checkpoint = ray.train.Checkpoint.from_directory(str(rep.checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)

    sample = load_jets(loop["data_path"])
    ckpt = ray.train.get_checkpoint()  # set when a worker restarts or a sweep resumes
    try:
        with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext() as resume_dir:
            fit(cfg, sample, save_dir=loop["work_dir"], log_dir=loop["tb_dir"] if rank == 0 else None,
                resume=resume_dir or False, callbacks=[report], progress=False, device=device)
    except TrainingDiverged as e:
        # A diverged trial ends normally with a terminal report: the sweep carries on and the
        # trial table shows it as diverged, with the reason.
        # Every metric a sweep may rank on is +inf, whichever the sweep's is.
        final = {"diverged": 1.0, **dict.fromkeys(RANKABLE_METRICS, math.inf), "error": str(e), "node_id": node_id}
        if rank == 0:
            _append_log(loop["work_dir"], final)
        ray.train.report(final)
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(f"trial ran out of GPU memory within its share (allocator cap {cap_fraction:.3f} "
                           "of the card); raise resources.trial_memory_mb or lower batch_size/hidden_dim") from e


def _append_log(work_dir: str, metrics: dict[str, Any]) -> None:
    import json
    from pathlib import Path

    from hvae_ray.trials import METRICS_LOG

    path = Path(work_dir) / METRICS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(metrics) + "\n")


def backend_for(resources, cuda_here: bool) -> str:
    """gloo unless several GPU workers per trial can use NCCL (never on a host without CUDA)."""
    if resources.backend != "auto":
        return resources.backend
    return "nccl" if resources.uses_gpu and resources.num_workers > 1 and cuda_here else "gloo"


def make_trainer(loop: dict[str, Any], resources, gpu_share: float, storage: str, name: str,
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
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop, scaling_config=scaling, run_config=run,
                        torch_config=TorchConfig(backend=backend_for(resources, torch.cuda.is_available())))


def env_vars() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in TRAIN_ENV.items()}
