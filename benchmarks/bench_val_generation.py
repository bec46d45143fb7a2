"""What the per-epoch generation score costs: a training epoch against one ``Trainer.generation_metrics()``
call (sample ``generation_jets`` jets from a fitted or the standard prior, W1m, W1p, FPD), on one device.

Usage: python benchmarks/bench_val_generation.py --data FILE [--set KEY=VALUE ...] [--epochs 3]
Prints seconds per epoch, per call of each prior, and the share of an epoch at generation_every 1 and
at the config's generation_every. Ray is not imported.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs and calls (after one warm-up each)")
    a = ap.parse_args()

    import torch

    from hvae_ray.config import load_config, parse_override
    from hvae_ray.data.io import load_jets
    from hvae_ray.engine import Trainer, prepare, resolve_device

    cfg = load_config(None, dict(parse_override(s) for s in a.set))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.set_num_threads(1)  # as fit does on CUDA
    trainer = Trainer(cfg, prepare(cfg, load_jets(a.data), device=device), device)

    def timed(fn) -> float:
        fn()  # warm-up: CUDA graph capture, the validation EFPs
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.epochs):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / a.epochs

    epoch = timed(lambda: trainer.train_epoch(20))
    val = timed(lambda: trainer.evaluate(20))
    calls = {}
    for prior in ("fitted", "standard"):
        trainer.cfg = cfg.with_overrides({"generation_prior": prior})
        calls[prior] = timed(trainer.generation_metrics)
    print(f"device {device}, {trainer.n_train} training jets, "
          f"batch {cfg.batch_size} x {cfg.gradient_accumulation_steps}, generation_jets {cfg.generation_jets}")
    print(f"training epoch {epoch:.3f} s, validation {val:.3f} s")
    for prior, s in calls.items():
        print(f"generation_metrics ({prior} prior): {s:.3f} s = {100 * s / epoch:.1f} % of a training epoch at "
              f"generation_every 1, {100 * s / epoch / cfg.generation_every:.1f} % at generation_every "
              f"{cfg.generation_every}")


if __name__ == "__main__":
    main()
