"""GPU shares for trials: how many trials fit on one card, and each trial's own memory cap.

A trial's footprint on the card is the whole process, not only what torch allocates: the CUDA context
(kernels, cuBLAS/cuDNN handles; a few hundred MiB) and the allocator's cache come on top of the
tensors. A trial's need is its CUDA context (fixed, a per-process cost) plus its allocator's peak times a
headroom (that part varies with what a batch holds); a share is the largest 1/k of the card that
holds the need, so k trials run side by side, and each trial caps its allocator to its share less its
context.
"""

from __future__ import annotations

import math

MiB = 1024**2
GiB = 1024**3
# Whole-process GPU memory of one trial at the default config when it cannot be measured: a CUDA
# context (~500 MiB on recent drivers) plus tensors and allocator cache. Deliberately generous.
DEFAULT_TRIAL_MEMORY = 900 * MiB
# What the CUDA context itself takes, outside torch's allocator (and so outside its memory cap):
# measured 760 MiB on an H100 (864 MiB whole process, 104 MiB reserved by torch).
CUDA_CONTEXT = 760 * MiB


def gpu_fraction(card_bytes: float, trial_bytes: float, headroom: float = 1.15, context_bytes: float = 0.0) -> float:
    """The GPU share per trial: 1/k for the largest k with k · need ≤ card_bytes, where a trial's need is
    ``context_bytes + (trial_bytes - context_bytes) · headroom``: the headroom covers the allocator's
    part of the whole-process ``trial_bytes``, not the fixed CUDA context.

    >>> gpu_fraction(4 * GiB, 870 * MiB)   # headroom on the whole process
    0.25
    >>> gpu_fraction(4 * GiB, 900 * MiB, headroom=1.25)
    0.3333333333333333
    >>> gpu_fraction(4 * GiB, 972 * MiB, 1.15, 764 * MiB)  # default config on an H100, validation included
    0.25
    """
    if card_bytes <= 0 or trial_bytes <= 0:
        raise ValueError("card and trial memory must be positive")
    context = min(max(context_bytes, 0.0), trial_bytes)
    need = context + (trial_bytes - context) * headroom
    k = math.floor(card_bytes / need)
    if k < 1:
        raise ValueError(f"one trial needs {need / GiB:.2f} GiB with headroom; the card has {card_bytes / GiB:.2f} GiB")
    return 1.0 / k


def allocator_fraction(share: float, card_bytes: float, device_bytes: float | None = None,
                       context_bytes: float = CUDA_CONTEXT) -> float:
    """Fraction for ``torch.cuda.set_per_process_memory_fraction`` that keeps the whole process inside
    ``share`` of a ``card_bytes`` card. The CUDA context lives outside the allocator's cap, so it is
    subtracted; torch applies the fraction to the real device (``device_bytes``, default the card), so
    a share of a 4 GiB card on a larger GPU still caps the process at its 4 GiB-card budget."""
    device_bytes = device_bytes or card_bytes
    cap = share * card_bytes - context_bytes
    return max(0.05 * share * card_bytes / device_bytes, min(1.0, cap / device_bytes))


class BurstFailed(RuntimeError):
    """The memory burst ran on a GPU and gave no figure; the message says why, in one line."""


def measure_trial_memory(steps: int = 20, cfg=None, use_cache: bool = True) -> dict[str, float] | None:
    """Run a short training burst of ``cfg`` (default: the default config) on the local GPU in a fresh
    process; return {'allocated_peak', 'reserved_peak', 'process'} in bytes, or None without CUDA.
    A burst that fails (it exits with an error, runs past 600 s or prints no figure) raises
    :class:`BurstFailed` with the burst's last error line.

    'process' is the growth of the device's used memory (NVML) over the run, i.e. what nvidia-smi
    shows for the process, context and cache included. Meaningful on an otherwise idle card.
    The figure is kept in the cache directory per host, visible GPUs, torch version and the config
    keys that set the footprint, so a second sweep of the same shape starts without the ~20 s burst.
    """
    import json
    import subprocess
    import sys

    from hvae_ray.config import Config

    try:
        import torch

        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    cfg = cfg or Config()
    key = _memory_key(cfg, steps, torch.__version__)
    cache = _memory_cache_file()
    if use_cache:
        hit = _read_json(cache).get(key)
        if isinstance(hit, dict) and all(isinstance(hit.get(k), (int, float)) for k in
                                         ("allocated_peak", "reserved_peak", "process")):
            return {**hit, "cached": True}
    code = (
        "import json,sys\n"
        "from hvae_ray.config import from_dict\n"
        "from hvae_ray.sweep.resources import _burst\n"
        f"cfg = from_dict(json.loads(sys.argv[1]), 'trial memory config')\n"
        f"print('RESULT', json.dumps(_burst({steps}, cfg)))\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict())], capture_output=True,
                             text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise BurstFailed("it ran past 600 s") from None
    except OSError as e:
        raise BurstFailed(f"it could not start: {e.strerror or e}") from None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            try:
                result = json.loads(line[7:])
            except ValueError:
                break
            if use_cache and math.isfinite(result.get("process", math.nan)):
                _write_cache(cache, key, result)
            return result
    errors = [line.strip() for line in (out.stderr or "").splitlines() if line.strip()]
    why = errors[-1][:300] if errors else "it printed no result"
    raise BurstFailed(f"exit status {out.returncode}: {why}" if out.returncode else why)


def _memory_key(cfg, steps: int, torch_version: str) -> str:
    import hashlib
    import json
    import os
    import socket

    shape = {"probe": 2, "model": cfg.to_dict()["model"], "batch_size": cfg.batch_size, "knn": cfg.data.knn,
             "engine": cfg.engine, "accum": cfg.gradient_accumulation_steps,
             "mixed_precision": cfg.mixed_precision, "steps": steps, "torch": torch_version,
             "host": socket.gethostname(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def _memory_cache_file():
    from hvae_ray.data.generate import cache_dir

    return cache_dir() / "trial-memory.json"


def _read_json(path) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path, key: str, result: dict) -> None:
    """Atomic update (a rename), so concurrent sweeps never read half a file."""
    import json

    from hvae_ray.io_safe import atomic_write_text

    try:
        data = _read_json(path)
        data[key] = result
        atomic_write_text(path, json.dumps(data, indent=1))
    except OSError:
        pass  # a read-only cache only costs the next sweep another measurement


def _burst(steps: int, cfg=None, n_jets: int = 256) -> dict[str, float]:
    """What a trial does on the GPU, briefly, through the engine's own :class:`~hvae_ray.engine.Trainer`:
    an epoch of at least ``steps`` training batches of synthetic 30-particle jets (the worst case: all
    slots full), a validation pass (its batches of ``max(64, batch_size)`` jets peak above training's),
    1500 jets sampled from N(0, 1) in the 512-jet batches the run's figures are drawn in, and the
    generation score (in validation's batches), on a validation split of at least one such batch."""
    import torch

    from hvae_ray import engine
    from hvae_ray.config import Config

    cfg = cfg or Config()
    dev = torch.device("cuda")
    used0 = _device_used(dev)
    train_share = 1.0 - cfg.data.val_fraction - cfg.data.test_fraction
    n_jets = max(n_jets, math.ceil(steps * cfg.batch_size / train_share) + 2,
                 math.ceil(engine.validation_batch_size(cfg) / cfg.data.val_fraction) + 2)
    splits = engine.prepare(cfg, burst_jets(n_jets), device=dev)
    trainer = engine.Trainer(cfg, splits, dev)
    epoch = cfg.kl_warmup_epochs  # the KL weight at its cap
    trainer.train_epoch(epoch)
    trainer.evaluate(epoch)
    engine.generate(trainer.model, splits.normaliser, 1500, device=dev)
    trainer.generation_metrics()
    torch.cuda.synchronize()
    used1 = _device_used(dev)
    return {"allocated_peak": float(torch.cuda.max_memory_allocated(dev)),
            "reserved_peak": float(torch.cuda.max_memory_reserved(dev)),
            "process": float(used1 - used0) if used0 is not None and used1 is not None else float("nan")}


def burst_jets(n: int):
    """``n`` synthetic jets of 30 particles (every slot full: a burst's worst case), seeded: η, φ ~ N(0, 0.2),
    pT_rel exponential and normalised to sum to 1."""
    import numpy as np

    from hvae_ray.data.jets import from_padded

    rng = np.random.default_rng(0)
    p = np.zeros((n, 30, 3), np.float32)
    p[..., :2] = rng.normal(0, 0.2, (n, 30, 2))
    pt = rng.exponential(1, (n, 30))
    p[..., 2] = pt / pt.sum(1, keepdims=True)
    return from_padded(p)


def _device_used(dev) -> float | None:
    import torch

    try:
        return float(torch.cuda.device_memory_used(dev))
    except Exception:  # noqa: BLE001 - NVML missing: no whole-process figure
        return None


def trial_footprint(measured: dict[str, float] | None) -> tuple[float, float]:
    """(whole-process bytes, of which CUDA context) of a trial from :func:`measure_trial_memory`'s figures:
    the context is the process less the allocator's reserved peak; without a whole-process figure above
    that peak (no NVML, or a card other processes freed memory on meanwhile), the reserved peak plus
    :data:`CUDA_CONTEXT`; without a measurement, the default estimate."""
    if measured and math.isfinite(measured["process"]) and measured["process"] > measured["reserved_peak"]:
        return measured["process"], measured["process"] - measured["reserved_peak"]
    if measured:
        return measured["reserved_peak"] + CUDA_CONTEXT, CUDA_CONTEXT
    return DEFAULT_TRIAL_MEMORY, min(CUDA_CONTEXT, DEFAULT_TRIAL_MEMORY)


def trial_share(gpu_memory_gb: float, trial_memory_mb: float | str, headroom: float,
                cfg=None) -> tuple[float, float, float]:
    """(GPU share per trial, whole-process trial bytes, of which CUDA context) for a card of
    ``gpu_memory_gb``.

    ``trial_memory_mb`` = "auto": ``cfg`` (the sweep's largest trial) measured on a local GPU when there
    is one (see :func:`trial_footprint`), else the default estimate; a burst that fails on the GPU is
    said in one line on stderr (why, and the default size the shares are sized for instead). A number
    is a whole-process size in MiB, of which :data:`CUDA_CONTEXT` is taken as context.
    """
    if trial_memory_mb == "auto":
        try:
            measured = measure_trial_memory(cfg=cfg)
        except BurstFailed as e:
            import sys

            print(f"trial memory: the measuring burst failed ({e}); GPU shares are sized for the default "
                  f"{DEFAULT_TRIAL_MEMORY / MiB:.0f} MiB per trial instead (set resources.trial_memory_mb to "
                  "give the size)", file=sys.stderr)
            measured = None
        trial, context = trial_footprint(measured)
    else:
        trial = float(trial_memory_mb) * MiB
        context = min(CUDA_CONTEXT, trial)
    return gpu_fraction(gpu_memory_gb * GiB, trial, headroom, context), trial, context


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon serves this user's processes: its control pipe exists in
    ``CUDA_MPS_PIPE_DIRECTORY`` (default /tmp/nvidia-mps)."""
    import os
    from pathlib import Path

    return (Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")) / "control").exists()
