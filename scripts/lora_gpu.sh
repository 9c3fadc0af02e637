#!/usr/bin/env bash
# The LoRA length predictor (issue 17, Sequence Scheduling's third system) on SmolLM2, one GPU:
#   bash scripts/lora_gpu.sh <SmolLM2 GGUF> <run folder> [<store>]
# <store>: the Alpaca store of scripts/collect_at_scale.sh (<its run>/alpaca: the shipped pool,
# alpaca_local, 7,451 prompts x 32) for the figures; default the committed
# docs/data/smollm2_alpaca_h100 (about 100 prompts, 80 of them train: a quick check only). Steps, each skipped when its output
# exists (rerun the script to resume; training itself resumes from its orbax checkpoints):
# 1. the scalar MLP (scalar-max) and the distribution predictor on the store's train split;
# 2. LoRA SFT (rank 8, alpha 16, q/v, AdamW 1e-4, warm-up + cosine, 3 epochs) on max_bin100,
#    then on the median bin; 3. the table rows on the test split: MAE vs each prompt's sampled
#    max, share in the right bin, the scalar MLP beside them, training time, prediction time per
#    1,000 prompts -> <run>/predictor_lora.json (copy to docs/results/); 4. the SmolLM2
#    benchmark with ssch-lora beside ssch-scalar-max and ours in one run; 5. the 7B-shape length
#    replay with ssch-lora (its answers come from the SmolLM2 LoRA, the model that recorded the
#    lengths, so its prediction time there is SmolLM2's, not a 7B's).
set -uo pipefail
gguf=$1
run=$2
store=${3:-docs/data/smollm2_alpaca_h100}
mkdir -p "$run"
log=$run/session.log
data=(--config.data.source=alpaca_local --config.data.slice=: --config.collect.store="$store")
config=(--config=configs/smollm2_alpaca.py:gpu "${data[@]}" --config.model.path="$gguf")
strategies="--config.benchmark.strategies=('vanilla:best','ssch-lora','ssch-scalar-max','ours','ours-search','oracle')"

step() {  # step <name> <output that marks it done> <command...>
  local name=$1 done=$2
  shift 2
  if [ -e "$done" ]; then echo "$(date +%T) $name: done before" >> "$log"; return; fi
  echo "$(date +%T) $name: start" >> "$log"
  "$@" > "$run/$name.log" 2>&1
  echo "$(date +%T) $name: exit $?" >> "$log"
}

step scalar_max "$run/predictor/scalar-max/export/predictor.json" \
  python3 launch/train.py "${config[@]}" --config.predictor.kind=scalar \
  --config.predictor.scalar_target=max --workdir="$run/predictor/scalar-max"
step distribution "$run/predictor/distribution/export/predictor.json" \
  python3 launch/train.py "${config[@]}" --workdir="$run/predictor/distribution"
step lora_max "$run/predictor/lora/export/lora.json" \
  python3 launch/train_lora.py "${config[@]}" --workdir="$run" --name=lora
step lora_median "$run/predictor/lora-median/export/lora.json" \
  python3 launch/train_lora.py "${config[@]}" --workdir="$run" --name=lora-median \
  --config.lora.target=median
step table "$run/predictor_lora.json" \
  python3 launch/train_lora.py "${config[@]}" --workdir="$run" --train=false \
  --evaluate=lora,lora-median --out="$run/predictor_lora.json"
step benchmark "$run/benchmark_lora.json" \
  python3 launch/benchmark.py --config=configs/smollm2_benchmark_h200.py "${data[@]}" \
  --config.model.path="$gguf" --workdir="$run" --name=benchmark_lora "$strategies"
step replay_7b "$run/benchmark_lora_replay_7b.json" \
  python3 launch/benchmark.py --config=configs/llama2_7b_replay_h200.py "${data[@]}" \
  --workdir="$run" --name=benchmark_lora_replay_7b "$strategies"
echo "$(date +%T) all done" >> "$log"
