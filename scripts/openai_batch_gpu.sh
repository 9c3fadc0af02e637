#!/usr/bin/env bash
# The OpenAI batch-file measurement (issue 19) on one GPU:
#   bash scripts/openai_batch_gpu.sh <SmolLM2 GGUF> <run folder> [requests=8192]
# 1. the distributional predictor, trained from the committed 7,451-prompt store (as
#    scripts/benchmark_at_scale.sh does); 2. scripts/openai_batch_gpu.py: a batch file of
#    <requests> chat lines over the shipped Alpaca prompts (max_tokens 64/256/1024, mixed
#    temperatures and top-p), served three ways — ours with per-request settings, the same
#    prompts with the settings ignored (global max), plain static batching — and one row each
#    appended to docs/results/generate_job.json.
# A rerun skips a finished step (<run>/<step>.done). Logs: <run>/<step>.log.
set -uo pipefail
gguf=$1
run=$2
requests=${3:-8192}
mkdir -p "$run"
work=$run/work

step() {  # step <name> <command...>
  local name=$1
  shift
  if [ -f "$run/$name.done" ]; then echo "$name: done before"; return 0; fi
  "$@" > "$run/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc"
  [ $rc -eq 0 ] && touch "$run/$name.done"
  return $rc
}

step train python3 launch/pipeline.py --config=configs/smollm2_benchmark_7451.py \
  --config.model.path="$gguf" --workdir="$work" --stages=train || exit 1
step openai_batch python3 scripts/openai_batch_gpu.py \
  --config=configs/smollm2_alpaca.py:gpu --model_path="$gguf" \
  --predictor="$work/predictor/distribution/export" --run="$run" --requests="$requests"
