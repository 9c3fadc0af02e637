#!/usr/bin/env bash
# The paged pool measured against slots (docs/BENCHMARKS.md, "Session 18"), on one GPU:
#   bash scripts/paged_gpu.sh <SmolLM2 GGUF> <run folder>
# with the predictor exports of configs/smollm2_benchmark_7451.py (launch/pipeline.py
# --stages=train) in <run folder>/work/predictor. 1. SmolLM2: the continuous and the paged
# strategies on the 2,048 requests of configs/smollm2_benchmark_7451.py, one run; 2. the
# LLaMA-2-7B-shape length replay, 4,096 requests (configs/llama2_7b_replay_7451.py): the
# baselines and the paged strategies first, so that a run cut short still compares them.
# Each step writes <run>/<step>.done when it ends well; a rerun skips finished steps and the
# benchmarks resume their saved strategies. Progress: <run>/session.log; logs: <run>/<step>.log.
# A run longer than one device call: start it with setsid and poll session.log.
set -uo pipefail
source "$(dirname "$0")/steps.sh"  # run_folder, step <name> <command...>
run_folder "$1" "$2"

strategies="('continuous-vanilla','paged-vanilla','ours-paged','oracle-paged',"
strategies+="'ours-continuous','oracle-continuous')"
step smollm2_paged python3 launch/benchmark.py --config=configs/smollm2_benchmark_7451.py \
  --config.model.path="$gguf" --workdir="$work" --name=benchmark_paged \
  --config.benchmark.strategies="$strategies"
step replay_7b_paged python3 launch/benchmark.py --config=configs/llama2_7b_replay_7451.py \
  --workdir="$work" --name=benchmark_replay_7b_paged --config.benchmark.strategies="$strategies"
echo "$(date +%T) all done" >> "$log"
