#!/usr/bin/env bash
# The scheduling benchmarks at scale of docs/BENCHMARKS.md (issue 15), on a host with 2 GPUs:
#   bash scripts/benchmark_at_scale.sh <SmolLM2 GGUF> <run folder>
# 1. the predictors, trained on the 7,451-prompt store's train split (launch/pipeline.py
#    --stages=train; the settings of docs/results/predictor.json); 2. SmolLM2: every strategy of
#    configs/smollm2_benchmark_7451.py on 2,048 requests over the 763 unseen test prompts, one
#    run, 4 workers over both GPUs; 3. the LLaMA-2-7B-shape length replay: 4,096 requests over the
#    same prompts' recorded lengths (configs/llama2_7b_replay_7451.py), 2 workers.
# Each step writes <run>/<step>.done when it ends well; a rerun skips finished steps and the
# benchmarks resume their saved strategies. Progress: <run>/session.log; logs: <run>/<step>.log.
set -uo pipefail
source "$(dirname "$0")/steps.sh"  # run_folder, step <name> <command...>
run_folder "$1" "$2"

step train python3 launch/pipeline.py --config=configs/smollm2_benchmark_7451.py \
  --config.model.path="$gguf" --workdir="$work" --stages=train || exit 1
step smollm2 python3 launch/benchmark.py --config=configs/smollm2_benchmark_7451.py \
  --config.model.path="$gguf" --workdir="$work" --workers=4 --devices=0,1
step replay_7b python3 launch/benchmark.py --config=configs/llama2_7b_replay_7451.py \
  --workdir="$work" --name=benchmark_replay_7b --workers=2 --devices=0,1
echo "$(date +%T) all done" >> "$log"
