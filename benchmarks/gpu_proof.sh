#!/usr/bin/env bash
# The GPU proof in one command: memory per trial, packing trials on one card, the 250-jet seed case,
# a real sweep with its best trial evaluated, and the costs around them (see benchmarks/gpu_proof.py).
#
#   benchmarks/gpu_proof.sh --data JETS.parquet --heldout REAL_JETS.parquet [--out DIR] [sizes...]
#
# Make the data on any machine with the project installed (Pythia 8 + FastJet), e.g.
#   hvae-ray data generate --flavor q --n-jets 20000 --seed 1 --out q20k.parquet
#   hvae-ray data generate --flavor q --n-jets 10000 --seed 2 --out q10k_heldout.parquet
# then run this on a single-GPU Linux host where the project and Ray are importable. With the default
# sizes it takes about 9 minutes on one H100; `--help` lists the sizes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_proof.py "$@"
