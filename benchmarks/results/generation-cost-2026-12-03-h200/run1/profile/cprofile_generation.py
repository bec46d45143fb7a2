"""cProfile of Trainer.generation_metrics: 3 calls after one epoch and one warm-up call, on CUDA; top 40 functions.

python cprofile_generation.py DATA KEY=VALUE..., run in a tree with hvae_ray/ and benchmarks/harness.py.
"""

import cProfile
import io
import pstats
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import harness  # noqa: E402

from hvae_ray import engine  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    torch.set_num_threads(1)  # as fit does on CUDA
    cfg = harness.config(sys.argv[2:], {"device": "cuda"})
    tr = engine.Trainer(cfg, engine.prepare(cfg, harness.load_sample(sys.argv[1], 30000), device=dev), dev)
    tr.train_epoch(0)
    tr.generation_metrics()
    torch.cuda.synchronize()
    prof, t = cProfile.Profile(), time.perf_counter()
    prof.enable()
    for _ in range(3):
        tr.generation_metrics()
    torch.cuda.synchronize()
    prof.disable()
    print(f"3 calls {time.perf_counter() - t:.3f} s")
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
    print(text.getvalue().replace(sys.prefix, "<prefix>"))


if __name__ == "__main__":
    main()
