#!/usr/bin/env bash
# The LoRA length predictor (issue 17, Sequence Scheduling's third system) on SmolLM2, one GPU:
#   bash scripts/lora_gpu.sh <SmolLM2 GGUF> <run folder> [last step]
# Steps, in order (each writes <run>/<step>.done when it ends well; a rerun skips finished steps,
# and training resumes from its orbax checkpoints); [last step] stops after that one:
#   train       the distribution and scalar predictors on the 7,451-prompt store's train split
#               (launch/pipeline.py --stages=train, configs/smollm2_benchmark_7451.py), in <run>/work
#   lora_max    LoRA SFT (rank 8, alpha 16, q/v, AdamW 1e-4, warm-up + cosine, 3 epochs) on each
#               prompt's max_bin100 -> <run>/work/predictor/lora (what `ssch-lora` plans with)
#   lora_median the same on the median bin -> <run>/work/predictor/lora-median
#   table       the rows on the 763 test prompts: MAE vs each prompt's sampled max, share in the
#               right bin, the scalar MLP beside them, training time, prediction time per 1,000
#               prompts -> <run>/predictor_lora.json (copy to docs/results/)
#   benchmark   the SmolLM2 benchmark with ssch-lora beside ssch-scalar-max and ours, one run
#               (configs/smollm2_benchmark_lora.py; workers over the GPUs of $DEVICES, default 0)
#   replay_7b   the 7B-shape length replay with ssch-lora (configs/llama2_7b_replay_lora.py; its
#               answers come from the SmolLM2 LoRA, the model that recorded the lengths)
# Progress: <run>/session.log; logs: <run>/<step>.log. BOTH=1 runs the last two side by side,
# each worker's allocator capped (--memory_fraction: 0.3 of each card for SmolLM2, 0.6 for the
# 7B shape; uncapped, session 12's 7B replay ran out of memory on a card where the SmolLM2
# worker's allocator had grown). On 4 x H200 the SmolLM2 run took 19 minutes that way; the 7B
# replay (~70 GPU minutes simulated, its ssch-lora strategy the longest) had done 2 of 10
# strategies after 17 minutes: give it a machine of its own or more than one session.
set -uo pipefail
gguf=$1
run=$2
last=${3:-replay_7b}
devices=${DEVICES:-0}
workers=$(( $(echo "$devices" | tr ',' '\n' | wc -l) ))
mkdir -p "$run"
log=$run/session.log
work=$run/work
config=(--config=configs/smollm2_benchmark_7451.py --config.model.path="$gguf")

source "$(dirname "$0")/steps.sh"  # step <name> <command...>
stop_after() { [ "$1" = "$last" ] && { echo "$(date +%T) stopped after $1" >> "$log"; exit 0; }; }

step train python3 launch/pipeline.py "${config[@]}" --workdir="$work" --stages=train || exit 1
stop_after train
step lora_max python3 launch/train_lora.py "${config[@]}" --workdir="$work" --name=lora || exit 1
stop_after lora_max
step lora_median python3 launch/train_lora.py "${config[@]}" --workdir="$work" \
  --name=lora-median --config.lora.target=median
stop_after lora_median
step table python3 launch/train_lora.py "${config[@]}" --workdir="$work" --train=false \
  --evaluate=lora,lora-median --out="$run/predictor_lora.json"
stop_after table
# The two benchmark runs share one lock per GPU (--lock_dir): with BOTH=1 they run side by side,
# each worker's timed calls never overlapping another's on its GPU (the 7B replay's long
# strategies keep every GPU busy while the SmolLM2 run fills the gaps).
# Alone, each worker has its GPU to itself and keeps JAX's preallocated pool.
locks=() small_memory=() large_memory=()
if [ "${BOTH:-0}" = 1 ]; then
  locks=(--lock_dir="$run/locks")
  small_memory=(--memory_fraction=0.3) large_memory=(--memory_fraction=0.6)
  mkdir -p "$run/locks"
fi
benchmark() {
  step benchmark python3 launch/benchmark.py --config=configs/smollm2_benchmark_lora.py \
    --config.model.path="$gguf" --workdir="$work" --name=benchmark_lora \
    --workers="$workers" --devices="$devices" "${locks[@]}" "${small_memory[@]}"
}
replay_7b() {
  step replay_7b python3 launch/benchmark.py --config=configs/llama2_7b_replay_lora.py \
    --workdir="$work" --name=benchmark_lora_replay_7b \
    --workers="$workers" --devices="$devices" "${locks[@]}" "${large_memory[@]}"
}
if [ "${BOTH:-0}" = 1 ] && [ "$last" = replay_7b ]; then
  replay_7b & benchmark & wait
else
  benchmark
  stop_after benchmark
  replay_7b
fi
echo "$(date +%T) all done" >> "$log"
