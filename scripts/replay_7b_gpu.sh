#!/usr/bin/env bash
# The LLaMA-2-7B-shape length replay with every strategy, ssch-lora and the paged ones included
# (issues 15 and 17), in one run on one host of several GPUs (4 x H200: about 25 minutes):
#   bash scripts/replay_7b_gpu.sh <SmolLM2 GGUF> <run folder>
# with the predictor exports of configs/smollm2_benchmark_7451.py (launch/pipeline.py
# --stages=train, CPU, a minute each) in <run>/work/predictor. The 4,096 requests, seeds and
# budget are those of configs/llama2_7b_replay_7451.py.
# One benchmark worker per GPU (launch/benchmark.py --worker: each claims the next strategy of
# its list not taken; each has its GPU to itself). GPU 0 first trains Sequence Scheduling's LoRA
# predictor on SmolLM2 (launch/train_lora.py, about two minutes), then its worker takes
# `ssch-lora`, the longest strategy, and after it whatever is left; the others start at once
# without it. A last step writes the report of all of them (<run>/work/<name>.json, .png).
# Resumable: each step writes <run>/<step>.done; a rerun skips finished steps and the workers
# resume the strategies not saved. Progress: <run>/session.log; logs: <run>/<step>.log.
# Start it with setsid and poll session.log. PROFILE=1 plans with a cost model fitted on this
# host instead of the config's H100 one: launch/benchmark.py --profile_only on GPU 1 (while GPU
# 0 trains the LoRA predictor; slot batches of 32 and 128 rows at caches 256 and 768, or
# PROFILE_CACHE; a few minutes), timing the continuous runner's own insert and decode calls
# (--profile_runner=slots; PROFILE_RUNNER=static times a static generate instead, as session
# 20's run did: that model missed the runner's inserts by about 2x and its decode calls by
# 1.2x). The benchmark's state is keyed by the cost model: a run resumes only with its own.
# One GPU (a host of one, or CUDA_VISIBLE_DEVICES of one id): the same steps one after another
# (profile, LoRA predictor where STRATEGIES holds ssch-lora, then one benchmark process).
# STRATEGIES=continuous-vanilla,ours-continuous,... runs only those (a run of its own: NAME
# names its report, default benchmark_replay_7b).
# CONFIG=<config> benchmarks another config the same way (e.g. configs/smollm2_benchmark_7451.py,
# with FLAGS="--config.model.path=<GGUF>" and PROFILE_SAMPLING=greedy, the launcher's default
# for a real model; the replay's random weights profile with the config's sampling). FLAGS are
# added to the profile's and the benchmark's command lines. DEVICES=2,3 runs on those GPU ids
# only (the first plays GPU 0's part), so that two such runs can share a host of four.
set -uo pipefail
source "$(dirname "$0")/steps.sh"  # run_folder, step <name> <command...>
run_folder "$1" "$2"
name=${NAME:-benchmark_replay_7b}
config=${CONFIG:-configs/llama2_7b_replay_lora.py}
read -r -a flags <<< "${FLAGS:-}"
gpus=$(nvidia-smi -L | wc -l)
IFS=', ' read -r -a devices <<< "${DEVICES:-$(seq -s ' ' 0 $((gpus - 1)))}"
gpus=${#devices[@]}
case "${CUDA_VISIBLE_DEVICES:-,}" in *,*) ;; *) gpus=1 ;; esac  # one id given: one GPU
[ -z "${DEVICES:-}" ] || [ "$gpus" -gt 1 ] || export CUDA_VISIBLE_DEVICES=${devices[0]}
rm -f "$work/${name}_state/"*.claim  # claims of an interrupted run: its strategies run again

# The reference first (identical responses are counted against it), then the longest, so that
# the workers' last strategies end close together.
rest="'ssch-scalar-max','ours-search','ours','ours-optimal','paged-vanilla','ours-paged',"
rest+="'oracle-paged','continuous-vanilla','ours-continuous','oracle-continuous','oracle'"
all="('vanilla:best','ssch-lora',$rest)"
if [ -n "${STRATEGIES:-}" ]; then all="('$(echo "$STRATEGIES" | sed "s/,/','/g")',)"; fi
others=${all//\'ssch-lora\',/}  # what the GPUs other than 0 take: all but ssch-lora
replay=(python3 launch/benchmark.py --config="$config" --workdir="$work" --name="$name"
        "${flags[@]}")
echo "$(date +%T) $gpus GPUs: $(nvidia-smi -L | head -n 1)" >> "$log"
rm -f "$run/profile.failed"
if [ "${PROFILE:-0}" = 1 ]; then
  replay+=(--config.schedule.cost_model="$work/cost_model.json")
fi
profile=(python3 launch/benchmark.py --config="$config" --workdir="$work" --name="$name"
         "${flags[@]}" --profile --profile_only --profile_runner="${PROFILE_RUNNER:-slots}"
         --profile_batches=32,128 --profile_cache="${PROFILE_CACHE:-256,768}" --profile_prompts=128,512
         --profile_inserts=8,32,128 --profile_sampling="${PROFILE_SAMPLING:-config}")
lora=(python3 launch/train_lora.py --config=configs/smollm2_benchmark_7451.py
      --config.model.path="$gguf" --workdir="$work" --name=lora)
train_lora() { [[ "$all" != *ssch-lora* ]] || step lora_max "${lora[@]}"; }
if [ "$gpus" -eq 1 ]; then
  { [ "${PROFILE:-0}" != 1 ] || step profile "${profile[@]}"; } && train_lora &&
    step benchmark "${replay[@]}" --config.benchmark.strategies="$all"
  rc=$?
  echo "$(date +%T) all done (exit $rc)" >> "$log"
  exit $rc
fi
(
  export CUDA_VISIBLE_DEVICES=${devices[0]}
  train_lora &&
    while [ "${PROFILE:-0}" = 1 ] && [ ! -f "$run/profile.done" ]; do
      [ -f "$run/profile.failed" ] && exit 1
      sleep 5
    done &&
    step worker0 "${replay[@]}" --worker --config.benchmark.strategies="$all"
) &
if [ "${PROFILE:-0}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=${devices[1]} step profile "${profile[@]}" || {
    touch "$run/profile.failed"; wait; exit 1; }
fi
for g in $(seq 1 $((gpus - 1))); do
  CUDA_VISIBLE_DEVICES=${devices[$g]} step "worker$g" "${replay[@]}" --worker \
    --config.benchmark.strategies="$others" &
done
wait
# Every strategy saved: this writes the report, in the order of $all.
CUDA_VISIBLE_DEVICES=${devices[0]} step report "${replay[@]}" --config.benchmark.strategies="$all"
echo "$(date +%T) all done" >> "$log"
