#!/usr/bin/env bash
# Each flavour's and seed's best/ under RESULTS (RESULTS/F/seedS/best, as fidelity_processes.sh's tars unpack)
# sampled with its fitted prior (the default) and evaluated against held-out jets at N per side, N = 50,000 (the
# papers' scale), with the floor from two disjoint real sets of the same N. Writes RESULTS/F/seedS/{command.txt,
# evaluate.json, plots/} and prints the table (benchmarks/fidelity_table.py). Held-out jets:
# data/fid/F_heldout100k.parquet (hvae-ray data generate --flavor F --n-jets 100000 --seed 90x; never trained on).
#   usage: benchmarks/fidelity_evaluate.sh RESULTS [FLAVOURS (q,g,t)] [SEEDS (1,2,3)] [N (50000)]
set -euo pipefail
RESULTS=${1:?usage: $0 RESULTS [FLAVOURS] [SEEDS] [N]} FLAVOURS=${2:-q,g,t} SEEDS=${3:-1,2,3} N=${4:-50000}
GEN=$(mktemp -d)
trap 'rm -rf "$GEN"' EXIT
for f in ${FLAVOURS//,/ }; do for s in ${SEEDS//,/ }; do
  d=$RESULTS/$f/seed$s
  [ -d "$d/best" ] || { echo "skip $f seed $s: no $d/best"; continue; }
  real=data/fid/${f}_heldout100k.parquet
  echo "$f seed $s: sampling $N jets"
  hvae-ray sample --checkpoint "$d/best" --n-jets "$N" --seed 7 --out "$GEN/$f$s.npz" --device cpu
  hvae-ray evaluate --real "$real" --generated "$GEN/$f$s.npz" --per-side "$N" --json --plots "$d/plots" \
    > "$GEN/$f$s.json"
  mv "$GEN/$f$s.json" "$d/evaluate.json"
  { head -n1 "$d/train.log" 2>/dev/null || true
    echo "hvae-ray sample --checkpoint $f/seed$s/best --n-jets $N --seed 7 --out gen.npz --device cpu"
    echo "hvae-ray evaluate --real $real --generated gen.npz --per-side $N --json --plots $f/seed$s/plots"
  } > "$d/command.txt"
done; done
python3 benchmarks/fidelity_table.py "$RESULTS"
