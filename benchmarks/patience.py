"""What a default patience would cost and save: `hvae-ray train` with the built-in config (the default
1,000 q jets, patience 0) for --epochs, one process per --seeds seed side by side; then, from each run's
`Loss/val_objective`, for every patience P of --patience: the epoch the run would have stopped at (P
epochs without a better value, counted from the end of the KL warm-up, as `patience` counts), the best
value it would have kept against the whole run's best, and the epochs saved.

  python benchmarks/patience.py --epochs 200 --seeds 1,2 --patience 10,20,30,50 --out OUT   # runs in OUT/runs
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import harness
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hvae_ray import load_config


def curve(log_dir: Path) -> list[float]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars("Loss/val_objective"), key=lambda e: e.step)]


def stop(values: list[float], patience: int, warmup: int) -> tuple[int, int]:
    """(last epoch trained, best epoch kept) under ``patience`` (0: every epoch)."""
    best = 0
    for epoch, v in enumerate(values):
        if v < values[best]:
            best = epoch
        if patience and epoch - max(best, warmup) >= patience:
            return epoch, best
    return len(values) - 1, best


def main() -> None:
    a = harness.parser(__doc__, "out", epochs=200, seeds="1,2", patience="10,20,30,50").parse_args()
    out = Path(a.out or "patience-runs") / "runs"
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    t0, procs = time.time(), []
    for s in seeds:
        cmd = [sys.executable, "-m", "hvae_ray", "train", "--set", f"epochs={a.epochs}", "--set", f"seed={s}",
               "--save-dir", str(out / f"seed{s}"), "--quiet"]
        (out / f"seed{s}.cmd").write_text(" ".join(cmd[1:]) + "\n")
        procs.append(subprocess.Popen(cmd, stdout=open(out / f"seed{s}.log", "w"), stderr=subprocess.STDOUT,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for p in procs:
        p.wait()
    harness.say(f"trained {len(seeds)} runs of {a.epochs} epochs in {time.time() - t0:.0f} s")
    warmup = load_config(None).kl_warmup_epochs
    rows = []
    for s in seeds:
        values = curve(out / f"seed{s}" / "tb")
        full_last, full_best = stop(values, 0, warmup)
        for p in [0, *(int(x) for x in a.patience.split(","))]:
            last, best = stop(values, p, warmup)
            rows.append({"seed": s, "patience": p, "epochs_run": last + 1, "best_epoch": best + 1,
                         "best_val_objective": values[best], "x_full_best": values[best] / values[full_best],
                         "epochs_saved": f"{1 - (last + 1) / len(values):.0%}"})
    harness.save(a, {"epochs": a.epochs, "warmup": warmup, "rows": rows},
                 harness.table(rows, "seed patience epochs_run best_epoch best_val_objective x_full_best epochs_saved",
                               f"default config, {a.epochs} epochs, KL warm-up {warmup} epochs"))


if __name__ == "__main__":
    main()
