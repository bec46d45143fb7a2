#!/bin/bash
# Run 1: the per-epoch generation score, old against new hvae_ray under the same bench_core.py, two rounds, then a
# cProfile of the new score and the old score's parts timed one by one (profile/).
# OLD, NEW: source trees with hvae_ray/ of commit 6d53520 (old) and of 0143d5c without its EFP_CHUNK (new), each with
# benchmarks/bench_core.py and benchmarks/harness.py of 6d53520, made with `git archive ... | tar -x -C DIR`.
# DATA: hvae-ray data generate --flavor q --n-jets 30000 --seed 301 --out q_train30k.parquet
export OMP_NUM_THREADS=8
FQ="--set model.hidden_dim=128 --set model.latent_dim=16 --set model.decoder_layers=2 --set model.dropout=0 --set particle_loss=sinkhorn --set loss_weights.jet_features=3 --set learning_rate=8.94e-4 --set kl_max_weight=3.71e-4 --set kl_warmup_epochs=10 --set batch_size=512 --set gradient_accumulation_steps=1 --set loss_weights.particle_marginals=10 --set generation_jets=5000 --set generation_every=5"
for r in 1 2; do for v in OLD NEW; do
  (cd "${!v}" && PYTHONPATH=. timeout 150 python3 benchmarks/bench_core.py --skip generation,io,graphs,fit --data "$DATA" \
      --jets 30000 --device cuda --calls 3 $FQ --out "$OUT/gen_${v,,}_r$r")
done; done
(cd "$NEW" && PYTHONPATH=. python3 "$PAGE/profile/cprofile_generation.py" "$DATA" ${FQ//--set /} > "$OUT/gen_new_cprofile.txt")
(cd "$OLD" && PYTHONPATH=. python3 "$PAGE/profile/parts.py" "$DATA" 30000 cuda 5000 > "$OUT/gen_old_breakdown.txt")
