"""Throughput of jet generation (1 worker vs all cores) and of Parquet write + read.

Usage: python benchmarks/bench_generation.py [--jets 400] [--flavor q]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from hvae_ray.data.generate import generate_jets
from hvae_ray.data.io import load_jets, save_parquet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jets", type=int, default=400)
    parser.add_argument("--flavor", default="q")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    sample = None
    for workers in dict.fromkeys([1, cores]):
        start = time.perf_counter()
        sample = generate_jets(args.flavor, args.jets, args.seed, workers=workers, progress=False)
        elapsed = time.perf_counter() - start
        print(f"generation {args.flavor} jets, {workers} worker(s): {args.jets / elapsed:.1f} jets/s "
              f"({args.jets} jets in {elapsed:.2f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        reps = max(1, 200_000 // len(sample))
        start = time.perf_counter()
        for _ in range(reps):
            save_parquet(sample, path, overwrite=True)
        write = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(reps):
            load_jets(path)
        read = time.perf_counter() - start
        n = reps * len(sample)
        print(f"parquet write: {n / write:.0f} jets/s")
        print(f"parquet read: {n / read:.0f} jets/s")
        print(f"parquet write+read: {n / (write + read):.0f} jets/s ({path.stat().st_size / len(sample):.0f} "
              f"bytes/jet)")


if __name__ == "__main__":
    main()
