#!/usr/bin/env bash
# The GPU proof on one GPU host (a dry run on a CPU host), one folder per part in OUT and gpu_proof.md of them all:
# a trial's memory (bench_core.py), k trials packed on the card (bench_engine.py --pack), Ray's per-epoch overhead,
# the 250-jet seed sweep and kl_caps.yaml, its best trial evaluated on held-out jets (bench_sweep.py).
#   benchmarks/gpu_proof.sh --data JETS --heldout REAL_JETS [--out OUT] [--sweep-timeout S] [--standby N]
# Sizes from the environment: CARD_GB=4 MEMORY_JETS=2000 MEMORY_EPOCHS=3 PACK_KS=1,2,4,6 PACK_JETS=3000 SEED_SAMPLES=8
# SEED_MAX_T=45 SEED_GRACE=15 REAL_JETS=20000 REAL_SAMPLES=4 REAL_MAX_T=3 GEN_JETS=10000 SWEEP_TIMEOUT=480 STANDBY=
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/gpu-proof-$(date +%F)
while [ $# -gt 0 ]; do
  case $1 in --data) DATA=$2;; --heldout) HELD=$2;; --out) OUT=$2;; --sweep-timeout) SWEEP_TIMEOUT=$2;;
    --standby) STANDBY=$2;; -h|--help) sed -n 2,7p "$0"; exit;; *) echo "$0: unknown option $1" >&2; exit 2;; esac
  shift 2
done
py() { PYTHONUNBUFFERED=1 "${PYTHON:-python3}" "$@"; }
J=${MEMORY_JETS:-2000} E=${MEMORY_EPOCHS:-3} C=${CARD_GB:-4} M=${SEED_MAX_T:-45} R=${REAL_MAX_T:-3}
S=(--data "$DATA" --gpu-memory-gb "$C" --timeout "${SWEEP_TIMEOUT:-480}" ${STANDBY:+--sweep-set standby_trials=$STANDBY})
py benchmarks/bench_core.py --data "$DATA" --jets "$J" --fit-epochs "$E" --card-gb "$C" --skip generation,io,graphs,phases \
  --out "$OUT/memory"
py benchmarks/bench_engine.py --data "$DATA" --batches '' --pack "${PACK_KS:-1,2,4,6}" --pack-jets "${PACK_JETS:-3000}" \
  --pack-card-gb "$C" --out "$OUT/packing"
py benchmarks/bench_sweep.py "${S[@]}" --scales "$J:$E" --trial-cpus 1 --overhead-gpu-fraction 0.25 --skip sweep \
  --out "$OUT/overhead"
py benchmarks/bench_sweep.py "${S[@]}" --skip overhead --sweep sweeps/seed_250_jets.yaml --sweep-set config.data.max_jets=250 \
  --sweep-set num_samples="${SEED_SAMPLES:-8}" --sweep-set scheduler.max_t="$M" --sweep-set config.epochs="$M" \
  --sweep-set scheduler.grace_period="${SEED_GRACE:-15}" --out "$OUT/seed"
py benchmarks/bench_sweep.py "${S[@]}" --skip overhead --sweep sweeps/kl_caps.yaml --sweep-set config.data.max_jets="${REAL_JETS:-20000}" \
  --sweep-set num_samples="${REAL_SAMPLES:-4}" --sweep-set scheduler.max_t="$R" --sweep-set config.epochs="$R" \
  --sweep-set scheduler.grace_period=1 --sweep-set config.batch_size=32 --sweep-set config.gradient_accumulation_steps=1 \
  --evaluate "$HELD" --gen-jets "${GEN_JETS:-10000}" --out "$OUT/real"
for p in memory packing overhead seed real; do printf '## %s\n\n' $p; cat "$OUT/$p/results.md"; echo; done > "$OUT/gpu_proof.md"
