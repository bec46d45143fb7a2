#!/usr/bin/env bash
# The fidelity page's two GPU commands (benchmarks/results/fidelity-*) on one host without network, into $OUT:
#   $0 sweep [SECONDS]  installs the offline Ray bundle .raykit (../shared/tools/offline-ray-kit.sh .raykit), runs
#     sweeps/fidelity_q.yaml within SECONDS (520), copies the trial table, the winner's config, best checkpoint and a
#     flow prior fitted to it;  $0 final BEST_YAML EPOCHS SECONDS: the sweep winner trained alone on the GPU within
#     SECONDS (the last and the best epoch by val_generation stay on disk), then its priors compared on held-out jets.
set -uo pipefail
export PYTHONPATH=$PWD
case ${1:-} in
  sweep) LIMIT=${2:-520}
    set -e
    mkdir -p /tmp/kit /tmp/site
    tar -C /tmp/kit -xJf .raykit/ray-kit.tar.xz
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/kit/wheels/*.whl
    cp -a /tmp/kit/site/. /tmp/site/
    export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    t0=$(date +%s)
    timeout "$LIMIT" python3 -m hvae_ray sweep run sweeps/fidelity_q.yaml 2>&1 \
      | grep --line-buffered -v '^[│├╭╰]' | grep --line-buffered -v 'Warning' > "$OUT/sweep.log" || true
    echo "sweep wall time: $(( $(date +%s) - t0 )) s"
    E=$(ls -d runs/sweeps/fidelity_q-* | tail -1)
    python3 -m hvae_ray trials "$E" | tee "$OUT/trials.txt"
    python3 -m hvae_ray trials "$E" --export "$OUT/trials.csv"
    python3 -m hvae_ray trials "$E" --best > "$OUT/best.yaml"
    BEST=$(python3 -c 'import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("best_val_generation") not in (None, "", "inf")]
print(min(rows, key=lambda r: float(r["best_val_generation"]))["trial_id"])' "$OUT/trials.csv")
    D=$(ls -d "$E"/*"$BEST"*/engine/best)
    echo "best trial $BEST: $D"
    python3 -m hvae_ray prior fit --checkpoint "$D" --data-path data/q_train30k.parquet --device cuda
    cp "$D/checkpoint.pt" "$D/prior.pt" "$OUT/"
    tail -5 "$OUT/sweep.log";;
  final) [ $# = 4 ] || { echo "usage: $0 final BEST_YAML EPOCHS SECONDS" >&2; exit 2; }
    BEST=$2 EPOCHS=$3 LIMIT=$4
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    t0=$(date +%s)
    timeout "$LIMIT" python3 -m hvae_ray train --config "$BEST" --data-path data/q_train30k.parquet \
      --save-dir /tmp/final --set epochs="$EPOCHS" --set device=cuda 2>&1 | tr '\r' '\n' \
      | grep --line-buffered -v 'Warning\|it/s\|^$' | tee "$OUT/train.log"
    echo "train wall time: $(( $(date +%s) - t0 )) s"
    python3 benchmarks/fidelity.py priors --checkpoint /tmp/final/best --train data/q_train30k.parquet \
      --heldout data/q_heldout10k.parquet --priors gmm100:1,gmm20:1,flow:0.8 --device cuda --out /tmp/pc 2>&1 \
      | grep -v Warning | tee "$OUT/prior_compare.log"
    cp /tmp/pc/prior_compare.json /tmp/final/best/checkpoint.pt /tmp/final/config.yaml /tmp/pc/prior_gmm100/prior.pt \
      "$OUT/"
    echo "total: $(( $(date +%s) - t0 )) s";;
  -h|--help) sed -n 2,6p "$0";;
  *) echo "$0: the first argument is sweep or final, not '${1:-}'" >&2; exit 2;;
esac
