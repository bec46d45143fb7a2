#!/usr/bin/env bash
# The fidelity sweep on one GPU host without network (benchmarks/results/fidelity-*): installs the offline Ray bundle
# .raykit (../shared/tools/offline-ray-kit.sh .raykit), runs sweeps/fidelity_q.yaml within SECONDS, copies the trial
# table, the winner's config, best checkpoint and a flow prior fitted to it into $OUT.  usage: $0 [SECONDS]
set -euo pipefail
LIMIT=${1:-520}
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
tail -5 "$OUT/sweep.log"
