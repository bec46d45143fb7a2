"""Where and how a run computes: the device, the process group's rank, mixed precision, CPU threads."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hvae_ray.config import Config
from hvae_ray.errors import HvaeError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HvaeError(f"config: device '{name}' requested but CUDA is not available")
    return torch.device(name)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_mean(values: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """Average running sums over ranks (weighted by batch count)."""
    _, world = rank_world()
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys] + [float(count)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(t)
    total = max(t[-1].item(), 1.0)
    return {k: t[i].item() / total for i, k in enumerate(keys)}


class Precision:
    """Mixed precision of a run: autocast to bf16 where the GPU has it, else fp16 with a loss scaler;
    fp32 on a CPU or with ``mixed_precision: false``."""

    def __init__(self, cfg: Config, device: torch.device):
        self.device = device
        self.enabled = cfg.mixed_precision and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)
        self.graphed = False  # set by the step: autocast's weight cache is off inside a captured graph

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.enabled,
                              cache_enabled=not self.graphed)


def limit_threads(device: torch.device) -> int:
    """One intra-op thread when training on CUDA (unless OMP_NUM_THREADS says otherwise); returns the
    thread count to restore. Small batches on a GPU are launch-bound: CPU thread pools over tiny
    tensors only add overhead (an epoch of the default config on an H100: 4.97 s with 16 threads,
    3.50 s with one)."""
    threads = torch.get_num_threads()
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return threads
