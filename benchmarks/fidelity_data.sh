#!/usr/bin/env bash
# The fidelity study's jets, made by this project's generator: per flavour, three training sets of 30,000 jets
# with data seeds of their own (seed k of the study trains on data/fid/F_train30k_seedk.parquet) and one
# held-out set of 100,000 jets whose seed trains nothing (two disjoint 50,000-jet halves give the floor).
# Training sets are rewritten with zstd and byte-stream-split floats (the same values in about 70 % of the
# size, for copying to the GPU machine). Existing files are kept.
#   usage: benchmarks/fidelity_data.sh [FLAVOURS (q,g,t)]
set -euo pipefail
FLAVOURS=${1:-q,g,t}
declare -A TRAIN=([q]="401 411 421" [g]="402 412 422" [t]="403 413 423") HELDOUT=([q]=901 [g]=902 [t]=903)
mkdir -p data/fid
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in ${FLAVOURS//,/ }; do
  k=0
  for seed in ${TRAIN[$f]}; do
    k=$((k + 1)) out=data/fid/${f}_train30k_seed$k.parquet
    [ -f "$out" ] && continue
    hvae-ray data generate --flavor "$f" --n-jets 30000 --seed "$seed" --out "$tmp/jets.parquet" --force
    python3 - "$tmp/jets.parquet" "$out" <<'PY'
import sys
import pyarrow.parquet as pq
from hvae_ray.io_safe import atomic_write
table = pq.read_table(sys.argv[1])
atomic_write(sys.argv[2], lambda f: pq.write_table(table, f, compression="zstd", compression_level=19,
                                                           use_byte_stream_split=True, use_dictionary=False))
PY
  done
  out=data/fid/${f}_heldout100k.parquet
  [ -f "$out" ] || hvae-ray data generate --flavor "$f" --n-jets 100000 --seed "${HELDOUT[$f]}" --out "$out"
done
ls -la data/fid
