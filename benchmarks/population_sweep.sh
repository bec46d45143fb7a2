#!/usr/bin/env bash
# Population sweeps against one process per trial on one GPU host without network, into $OUT (results under
# benchmarks/results/population-sweep-*): installs the offline Ray bundle .raykit (../shared/tools/offline-ray-kit.sh
# .raykit), then runs bench_sweep.py on SWEEP (default sweeps/seed_250_jets.yaml) with resources.population off,
# then auto, sized for a GPU_GB card (default 4), on data/q1000.parquet's first n_jets jets, within LIMIT seconds.
#   usage: benchmarks/population_sweep.sh [SWEEP] [GPU_GB] [LIMIT] [MODES (default off,auto)]
set -uo pipefail
SWEEP=${1:-sweeps/seed_250_jets.yaml} GPU_GB=${2:-4} LIMIT=${3:-540} MODES=${4:-off,auto}
mkdir -p /tmp/kit /tmp/site "$OUT"
tar -C /tmp/kit -xJf .raykit/ray-kit.tar.xz
python3 -m pip install -q --no-index --upgrade --no-deps --no-compile --target /tmp/site /tmp/kit/wheels/*.whl
cp -a /tmp/kit/site/. /tmp/site/
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git log --oneline -1 > "$OUT/commit.txt" 2>/dev/null
cd benchmarks && timeout "$LIMIT" python3 bench_sweep.py --skip overhead --sweep "../$SWEEP" --data ../data/q1000.parquet \
  --modes "$MODES" --gpu-memory-gb "$GPU_GB" --timeout $(( LIMIT / 2 - 10 )) --out "$OUT/sweep" 2>&1 | tail -60
