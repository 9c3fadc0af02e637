#!/usr/bin/env bash
# The user's job at full speed (issue 18) on one GPU:
#   bash scripts/generate_job_gpu.sh <SmolLM2 GGUF> <run folder> <predictor export dir> [flags]
# The predictor: a distribution export trained on the 7,451-prompt store's train split, e.g.
# <work>/predictor/distribution/export of `python3 launch/pipeline.py
# --config=configs/smollm2_benchmark_7451.py --config.model.path=<GGUF> --workdir=<work>
# --stages=train` (as scripts/openai_batch_gpu.sh trains it). scripts/generate_job_gpu.py then:
# 1. writes prompts files of prompts that predictor never saw (the store's valid/test splits):
#    500 test prompts, and 8,192 lines cycling the ~1,500 valid + test prompts;
# 2. times launch/generate.py (configs/smollm2_alpaca.py:gpu, continuous-search) as a whole
#    process: 500 prompts with an empty compilation cache, again with it warm, 8,192 cold;
# 3. plain static batching (engine.generate, batches of 512 / 1,024 / 2,048, compilation
#    included) on the 8,192 lines, each batch size in its own cold process;
# 4. merges docs/results/generate_job.json and prints the table with the targets.
# Flags after the third argument go to the .py (e.g. --batches=256,512 or
# --job_args="--config.schedule.kv_budget_tokens=auto"). A rerun skips a finished step
# (<run>/<step>.done). Logs: <run>/<step>.log; progress: stdout and <run>/session.log.
set -uo pipefail
gguf=$1
run=$2
predictor=$3
shift 3
mkdir -p "$run"
python3 scripts/generate_job_gpu.py --config=configs/smollm2_alpaca.py:gpu \
  --model_path="$gguf" --predictor="$predictor" --run="$run" "$@" 2>&1 | tee -a "$run/session.log"
