#!/usr/bin/env bash
# Issue 16's table on one host with 2 GPUs (4 if present: tensor 2 x data 2 and tensor 4 too):
#   bash scripts/multigpu_gpu.sh [run folder]      (default runs/multigpu)
# Every row is one launch/bench_multigpu.py process (random weights, bf16, top-p sampling, every
# row forced to run all 256 steps; ms/step from a 256- and a 128-step call); rows go to
# <run>/rows/<name>.json and are merged into docs/results/multigpu.json at the end. Resumable:
# a row whose JSON exists is skipped. No compilation cache: first_call_s includes compiling.
# Rows: the one-GPU baselines (7B shape batch 48 cache 1024, kernel and dot; SmolLM2 batch 256
# and 64), tensor parallel over 2 GPUs, data parallel as one mesh, as two processes on one global
# mesh (jax.distributed on localhost) and as two independent processes (one per GPU); and the
# one-GPU and tensor-parallel steps profiled (<run>/traces/<name>.json).
set -uo pipefail
run=${1:-runs/multigpu}
rows=$run/rows
mkdir -p "$rows"
log=$run/session.log
gpus=$(nvidia-smi -L | wc -l)
export LSDIST_NO_COMPILE_CACHE=1
echo "$(date +%T) $gpus GPUs: $(nvidia-smi -L | head -n 1)" >> "$log"

row() {  # row <name> <env: CUDA_VISIBLE_DEVICES> <args...>
  local name=$1 devices=$2
  shift 2
  if [ -f "$rows/$name.json" ]; then echo "$(date +%T) $name: done before" >> "$log"; return; fi
  echo "$(date +%T) $name: start" >> "$log"
  CUDA_VISIBLE_DEVICES=$devices timeout 900 python3 launch/bench_multigpu.py "$@" \
    --row_out="$rows/$name.json" > "$run/$name.log" 2>&1
  echo "$(date +%T) $name: exit $? $(tail -n 1 "$run/$name.log" | cut -c1-300)" >> "$log"
}

pair() {  # pair <name> <args...>: two processes side by side, one per GPU
  local name=$1
  shift
  if [ -f "$rows/${name}_0.json" ] && [ -f "$rows/${name}_1.json" ]; then return; fi
  for k in 0 1; do
    CUDA_VISIBLE_DEVICES=$k timeout 900 python3 launch/bench_multigpu.py "$@" --group="$name" \
      --row_out="$rows/${name}_$k.json" > "$run/${name}_$k.log" 2>&1 &
  done
  wait
  echo "$(date +%T) $name: $(tail -n 1 "$run/${name}_0.log" | cut -c1-200)" >> "$log"
}

global() {  # global <name> <args...>: two processes, one GPU each, one global mesh
  local name=$1
  shift
  if [ -f "$rows/$name.json" ]; then return; fi
  local port=$((20000 + RANDOM % 20000))
  for k in 0 1; do
    CUDA_VISIBLE_DEVICES=$k timeout 900 python3 launch/bench_multigpu.py "$@" \
      --coordinator=127.0.0.1:$port --num_processes=2 --process_id=$k \
      --row_out="$rows/$name.json" > "$run/${name}_$k.log" 2>&1 &
  done
  wait
  echo "$(date +%T) $name: $(tail -n 1 "$run/${name}_0.log" | cut -c1-200)" >> "$log"
}

traced() {  # traced <name> <env: CUDA_VISIBLE_DEVICES> <args...>: a row with its step profiled
  local name=$1 devices=$2
  shift 2
  mkdir -p "$run/traces"
  if [ -f "$run/traces/$name.json" ]; then return; fi
  CUDA_VISIBLE_DEVICES=$devices timeout 900 python3 launch/bench_multigpu.py "$@" --repeats=1 \
    --trace="$run/traces/$name" --row_out="$run/traces/$name.json" > "$run/$name.log" 2>&1
  echo "$(date +%T) $name: exit $? (profile in $run/traces/$name.json)" >> "$log"
}

b7=(--model=llama-2-7b --cache=1024)
sm=(--model=smollm2-135m --cache=512)
# The target rows first, then the diagnostic ones (the dot product instead of the kernel), so a
# session cut short still has every target's row and its one-GPU baseline.
# one GPU with the kernel (the baselines of this session)
row 7b_1gpu_pallas 0 "${b7[@]}" --batch=48 --decode_attention=pallas
row sm_1gpu_pallas_256 0 "${sm[@]}" --batch=256 --decode_attention=pallas
# tensor parallel over 2 GPUs (target: <= 0.6x the one-GPU kernel ms/step; Engine.random <= 10 s,
# first call <= 60 s)
row 7b_tp2_pallas 0,1 "${b7[@]}" --batch=48 --tensor=2 --decode_attention=pallas
# where the step's time goes, one GPU against tensor parallel (rows with a "trace": per step,
# each device stream's busy time against its span, device time by event kind, busiest events;
# kept apart from the report's rows)
traced 7b_1gpu_trace 0 "${b7[@]}" --batch=48 --decode_attention=pallas
traced 7b_tp2_trace 0,1 "${b7[@]}" --batch=48 --tensor=2 --decode_attention=pallas
# the decode loop as CUDA graphs, its loop, branches and (on the mesh) all-reduces included:
# fewer launches per step is what the fixed per-step cost would need (the row records the flag)
cmdbuf=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL,+COLLECTIVES
XLA_FLAGS=$cmdbuf row 7b_1gpu_pallas_cmdbuf 0 "${b7[@]}" --batch=48 --decode_attention=pallas
XLA_FLAGS=$cmdbuf row 7b_tp2_pallas_cmdbuf 0,1 "${b7[@]}" --batch=48 --tensor=2 \
  --decode_attention=pallas
# data parallel over 2 GPUs (targets: 7B batch 96 >= 1.85x, SmolLM2 batch 512 >= 1.8x one GPU)
row 7b_dp2_pallas 0,1 "${b7[@]}" --batch=96 --data=2 --decode_attention=pallas
row sm_dp2_pallas 0,1 "${sm[@]}" --batch=512 --data=2 --decode_attention=pallas
pair 7b_2proc "${b7[@]}" --batch=48 --decode_attention=pallas
pair sm_2proc "${sm[@]}" --batch=256 --decode_attention=pallas
global 7b_dp2_global "${b7[@]}" --batch=96 --data=2 --decode_attention=pallas
global sm_dp2_global "${sm[@]}" --batch=512 --data=2 --decode_attention=pallas
if [ "$gpus" -ge 4 ]; then
  row 7b_tp4_pallas 0,1,2,3 "${b7[@]}" --batch=48 --tensor=4 --decode_attention=pallas
  row 7b_tp2dp2_pallas 0,1,2,3 "${b7[@]}" --batch=96 --tensor=2 --data=2 \
    --decode_attention=pallas
fi
python3 launch/bench_multigpu.py --merge="$rows" --out=docs/results/multigpu.json \
  --command="bash scripts/multigpu_gpu.sh $run"
# collective settings against the defaults (the row records them under "env")
XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true \
  row 7b_tp2_pallas_oneshot 0,1 "${b7[@]}" --batch=48 --tensor=2 --decode_attention=pallas
NCCL_PROTO=LL row 7b_tp2_pallas_nccl_ll 0,1 "${b7[@]}" --batch=48 --tensor=2 \
  --decode_attention=pallas
# diagnostics: the dot product, one GPU and tensor parallel
row 7b_1gpu_dot 0 "${b7[@]}" --batch=48 --decode_attention=dot
row 7b_tp2_dot 0,1 "${b7[@]}" --batch=48 --tensor=2 --decode_attention=dot
row sm_1gpu_dot_64 0 "${sm[@]}" --batch=64 --decode_attention=dot
row sm_tp2_dot_64 0,1 "${sm[@]}" --batch=64 --tensor=2 --decode_attention=dot
python3 launch/bench_multigpu.py --merge="$rows" --out=docs/results/multigpu.json \
  --command="bash scripts/multigpu_gpu.sh $run"
echo "$(date +%T) all done: docs/results/multigpu.json" >> "$log"
