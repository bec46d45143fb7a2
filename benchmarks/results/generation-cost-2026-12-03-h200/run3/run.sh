#!/bin/bash
# Run 3: the per-epoch generation score, old (6d53520) against new (09638d5) hvae_ray under the same bench_core.py:
# the fidelity sweep's config on 30k jets and the default config on 20k jets.
# OLD, NEW: source trees with hvae_ray/ of each commit and benchmarks/bench_core.py + benchmarks/harness.py of
# 6d53520 (`git archive COMMIT hvae_ray | tar -x -C DIR`, likewise for the two scripts); DATA as in run1/run.sh.
export OMP_NUM_THREADS=8
FQ="--set model.hidden_dim=128 --set model.latent_dim=16 --set model.decoder_layers=2 --set model.dropout=0 --set particle_loss=sinkhorn --set loss_weights.jet_features=3 --set learning_rate=8.94e-4 --set kl_max_weight=3.71e-4 --set kl_warmup_epochs=10 --set batch_size=512 --set gradient_accumulation_steps=1 --set loss_weights.particle_marginals=10 --set generation_jets=5000 --set generation_every=5"
run() {  # OLD|NEW, name, jets, sets...
  local v=$1 name=$2 jets=$3; shift 3
  (cd "${!v}" && PYTHONPATH=. timeout 150 python3 benchmarks/bench_core.py --skip generation,io,graphs,fit --data "$DATA" \
      --jets "$jets" --device cuda --calls 3 "$@" --out "$OUT/${name}_${v,,}")
}
for v in OLD NEW; do run $v fidelity 30000 $FQ; done
for v in OLD NEW; do run $v default 20000; done
