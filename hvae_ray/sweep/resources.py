"""GPU shares for trials: how many trials fit on one card, and each trial's own memory cap.

A trial's footprint on the card is the whole process, not only what torch allocates: the CUDA context
(kernels, cuBLAS/cuDNN handles; a few hundred MiB) and the allocator's cache come on top of the
tensors. ``trial_memory_bytes`` is that whole-process figure; a share is the largest 1/k of the card
that holds it with headroom, so k trials run side by side.
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


def gpu_fraction(card_bytes: float, trial_bytes: float, headroom: float = 1.15) -> float:
    """The GPU share per trial: 1/k for the largest k with k · trial_bytes · headroom ≤ card_bytes.

    >>> gpu_fraction(4 * GiB, 870 * MiB)   # default-config trial as measured on an H100: 4 fit
    0.25
    >>> gpu_fraction(4 * GiB, 900 * MiB, headroom=1.25)
    0.3333333333333333
    """
    if card_bytes <= 0 or trial_bytes <= 0:
        raise ValueError("card and trial memory must be positive")
    k = math.floor(card_bytes / (trial_bytes * headroom))
    if k < 1:
        raise ValueError(f"one trial needs {trial_bytes * headroom / GiB:.2f} GiB with headroom; "
                         f"the card has {card_bytes / GiB:.2f} GiB")
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


def measure_trial_memory(steps: int = 20) -> dict[str, float] | None:
    """Run a short training burst of the default config on the local GPU in a fresh process; return
    {'allocated_peak', 'reserved_peak', 'process'} in bytes, or None without CUDA.

    'process' is the growth of the device's used memory (NVML) over the run, i.e. what nvidia-smi
    shows for the process, context and cache included. Meaningful on an otherwise idle card.
    """
    import json
    import subprocess
    import sys

    code = (
        "import json,torch\n"
        "from hvae_ray.sweep.resources import _burst\n"
        f"print('RESULT', json.dumps(_burst({steps})))\n"
    )
    try:
        import torch

        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return None


def _burst(steps: int, cfg=None, n_jets: int = 256) -> dict[str, float]:
    """Train ``steps`` batches of synthetic 30-particle jets (the worst case: all slots full), then
    sample 1500 jets as validation's W1m does."""
    import numpy as np
    import torch
    from torch_geometric.loader import DataLoader

    from hvae_ray.config import Config
    from hvae_ray.data.graphs import FeatureNormaliser, build_graphs, raw_features
    from hvae_ray.data.jets import from_padded
    from hvae_ray.model.hypervae import HyperVAE, dense_targets
    from hvae_ray.model.losses import kl_divergence, reconstruction_terms, total_loss

    cfg = cfg or Config()
    dev = torch.device("cuda")
    used0 = _device_used(dev)
    rng = np.random.default_rng(0)
    p = np.zeros((n_jets, 30, 3), np.float32)
    p[..., :2] = rng.normal(0, 0.2, (n_jets, 30, 2))
    pt = rng.exponential(1, (n_jets, 30))
    p[..., 2] = pt / pt.sum(1, keepdims=True)
    sample = from_padded(p)
    raw = raw_features(sample, cfg.data.knn)
    graphs = build_graphs(raw, FeatureNormaliser.fit(raw))
    model = HyperVAE(cfg.model).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    amp = cfg.mixed_precision
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    loader = DataLoader(graphs, batch_size=cfg.batch_size, shuffle=True)
    done = 0
    while done < steps:
        for batch in loader:
            batch = batch.to(dev)
            with torch.autocast("cuda", dtype=dtype, enabled=amp):
                out = model(batch)
                terms = reconstruction_terms(out.decoded, dense_targets(batch))
                loss = total_loss(terms, kl_divergence(out.mu, out.logvar), 1e-4, cfg)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done >= steps:
                break
    # Validation samples jets from the prior every epoch (W1m); include it in the peak.
    from hvae_ray.engine import generate

    generate(model, FeatureNormaliser.fit(raw), 1500, device=dev)
    torch.cuda.synchronize()
    used1 = _device_used(dev)
    return {"allocated_peak": float(torch.cuda.max_memory_allocated(dev)),
            "reserved_peak": float(torch.cuda.max_memory_reserved(dev)),
            "process": float(used1 - used0) if used0 is not None and used1 is not None else float("nan")}


def _device_used(dev) -> float | None:
    import torch

    try:
        return float(torch.cuda.device_memory_used(dev))
    except Exception:  # noqa: BLE001 - NVML missing: no whole-process figure
        return None


def trial_share(gpu_memory_gb: float, trial_memory_mb: float | str, headroom: float) -> tuple[float, float]:
    """(GPU share per trial, trial bytes used) for a card of ``gpu_memory_gb``.

    ``trial_memory_mb`` = "auto": measured on a local GPU when there is one, else the default estimate.
    """
    if trial_memory_mb == "auto":
        measured = measure_trial_memory()
        if measured and math.isfinite(measured["process"]) and measured["process"] > 0:
            trial = measured["process"]
        elif measured:
            trial = measured["reserved_peak"] + CUDA_CONTEXT
        else:
            trial = DEFAULT_TRIAL_MEMORY
    else:
        trial = float(trial_memory_mb) * MiB
    return gpu_fraction(gpu_memory_gb * GiB, trial, headroom), trial
