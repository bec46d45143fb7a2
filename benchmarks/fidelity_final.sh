#!/usr/bin/env bash
# The sweep winner trained alone on the GPU within SECONDS (the last and the best epoch by val_generation stay on
# disk), then its priors compared on held-out jets by fidelity.py priors:  $0 BEST_YAML EPOCHS SECONDS  (into $OUT)
set -uo pipefail
BEST=$1; EPOCHS=$2; LIMIT=$3
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$(date +%s)
timeout "$LIMIT" python3 -m hvae_ray train --config "$BEST" --data-path data/q_train30k.parquet --save-dir /tmp/final \
  --set epochs="$EPOCHS" --set device=cuda 2>&1 | tr '\r' '\n' | grep --line-buffered -v 'Warning\|it/s\|^$' \
  | tee "$OUT/train.log"
echo "train wall time: $(( $(date +%s) - t0 )) s"
python3 benchmarks/fidelity.py priors --checkpoint /tmp/final/best --train data/q_train30k.parquet \
  --heldout data/q_heldout10k.parquet --priors gmm100:1,gmm20:1,flow:0.8 --device cuda --out /tmp/pc 2>&1 \
  | grep -v Warning | tee "$OUT/prior_compare.log"
cp /tmp/pc/prior_compare.json /tmp/final/best/checkpoint.pt /tmp/final/config.yaml /tmp/pc/prior_gmm100/prior.pt "$OUT/"
echo "total: $(( $(date +%s) - t0 )) s"
