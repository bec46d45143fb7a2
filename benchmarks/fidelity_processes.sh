#!/usr/bin/env bash
# The fidelity recipe for each flavour and seed as its own `hvae-ray train` process (bf16, CUDA graph),
# all at once on one GPU under CUDA MPS, each stopped by Ctrl+C (SIGINT: its last/ and best/ stay whole)
# after SECONDS at most; then each best/ is slimmed (no optimiser state) and gets a fitted 100-Gaussian
# prior. Into $OUT per flavour: FLAVOUR.tar (each seed's best/, config.yaml, log), FLAVOUR-tb.tar (TensorBoard runs).
# Seed k of a flavour trains on its own jets, data/fid/FLAVOUR_train30k_seedk.parquet (hvae-ray data generate
# --flavor F --n-jets 30000 --seed D, with a data seed D of its own; benchmarks/fidelity_data.sh makes them).
#   usage: benchmarks/fidelity_processes.sh [SECONDS (420)] [FLAVOURS (q,g,t)] [SEEDS (1,2,3)] [--set KEY=VALUE ...]
set -uo pipefail
SECONDS_MAX=${1:-420} FLAVOURS=${2:-q,g,t} SEEDS=${3:-1,2,3}
shift $(( $# < 3 ? $# : 3 ))
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" /tmp/fid
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-cuda-mps-control -d && echo "MPS on"
RECIPE=(--config benchmarks/results/fidelity-2026-12-02-h200/best/config.yaml --set lr_schedule=cosine
        --set ema_decay=0.999 --set data.split_seed=0 --set patience=0)
for f in ${FLAVOURS//,/ }; do for s in ${SEEDS//,/ }; do
  d=/tmp/fid/$f/seed$s; data=data/fid/${f}_train30k_seed$s.parquet; mkdir -p "$d"
  [ -f "$data" ] || { echo "skip $f seed $s: no $data"; continue; }
  echo "hvae-ray train --data-path $data ${RECIPE[*]} $* --set seed=$s --save-dir $f/seed$s --quiet" > "$d/train.log"
  timeout --signal=INT "$SECONDS_MAX" python3 -m hvae_ray train --data-path "$data" \
    "${RECIPE[@]}" "$@" --set seed="$s" --save-dir "$d" --quiet >> "$d/train.log" 2>&1 &
done; done
while sleep 60; do jobs -r | grep -q . || break; echo "heartbeat $(date +%T): $(tail -qn1 /tmp/fid/*/seed*/train.log | cut -c1-60 | tr '\n' '|')"; done
wait
echo quit | nvidia-cuda-mps-control
# each best/ slimmed first (no optimiser state), then its prior fitted within PRIOR_SECONDS in all; a best/ left
# without one gets it from `hvae-ray prior fit` where the tar is unpacked
timeout "${PRIOR_SECONDS:-120}" python3 - "$FLAVOURS" "$SEEDS" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from fidelity import _slim
from hvae_ray import api
from hvae_ray.engine import load_checkpoint
bests = [(f, s, Path(f"/tmp/fid/{f}/seed{s}/best")) for f in sys.argv[1].split(",") for s in sys.argv[2].split(",")]
bests = [(f, s, b) for f, s, b in bests if b.is_dir()]
for f, s, best in bests:
    state = load_checkpoint(best)
    print(f, s, "best epoch", state["epoch"], "of", state["config"]["epochs"], flush=True)
    _slim(best)
for f, s, best in bests:
    api.fit_prior(best, f"data/fid/{f}_train30k_seed{s}.parquet", components=100, device="cuda")
    print(f, s, "prior fitted", flush=True)
PY
for f in ${FLAVOURS//,/ }; do
  tar -C /tmp/fid -cf "$OUT/$f.tar" --exclude=last --exclude=tb "$f"
  tar -C /tmp/fid -cf "$OUT/$f-tb.tar" $(cd /tmp/fid && ls -d "$f"/seed*/tb)
done
ls -la "$OUT"
