#!/usr/bin/env bash
# The collection measurements of docs/BENCHMARKS.md ("Alpaca at scale"), on a host with 2 GPUs:
#   bash scripts/collect_at_scale.sh <SmolLM2 GGUF> <run folder>
# 1. one GPU: the first 1,024 prompts of the shuffled Alpaca pool x 32 samples (beside it, on the
#    other GPU, the sampling-fidelity check against transformers, launch/fidelity.py);
# 2. two GPUs, one process each: the next 2,048 prompts (twice the work), then the rest of the
#    pool into the same store; 3. the instructions-mix store (2,000 prompts x 16, two GPUs);
# 4. the same collection as a data-parallel mesh over both GPUs in one process (short run).
# Each step writes <run>/<step>.json (collect_summary fields); compilation caches are off so
# every measured run compiles its own programs. Resumable: a step whose summary exists is skipped.
set -uo pipefail
gguf=$1
run=$2
mkdir -p "$run"
log=$run/session.log
common=(--config.model.path="$gguf" --config.engine.compilation_cache= --noplots)
alpaca=(--config=configs/smollm2_alpaca.py:gpu --config.data.source=alpaca_local
        --config.collect.store="$run/alpaca")

step() {  # step <name> <args...>: runs launch/collect.py unless <run>/<name>.json exists
  local name=$1
  shift
  if [ -f "$run/$name.json" ]; then echo "$(date +%T) $name: done before" >> "$log"; return; fi
  echo "$(date +%T) $name: start" >> "$log"
  python3 launch/collect.py "$@" "${common[@]}" --workdir="$run/$name.work" --summary="$name" \
    > "$run/$name.log" 2>&1
  local rc=$?
  cp "$run/$name.work/$name.json" "$run/$name.json" 2>/dev/null
  echo "$(date +%T) $name: exit $rc" >> "$log"
}

if [ ! -f "$run/fidelity.json" ]; then  # transformers at batch 256 (16 prompts x 16 a call)
  CUDA_VISIBLE_DEVICES=1 timeout 480 python3 launch/fidelity.py --gguf="$gguf" --prompts=64 \
    --samples=16 --out="$run/fidelity.json" > "$run/fidelity.log" 2>&1 &
  fidelity=$!
fi
step one_gpu "${alpaca[@]}" --config.data.slice=0:1024 --devices=0
[ -n "${fidelity:-}" ] && wait "$fidelity"
echo "$(date +%T) fidelity: $(tail -c 300 "$run/fidelity.log" | tr '\n' ' ')" >> "$log"
step two_gpu "${alpaca[@]}" --config.data.slice=1024:3072 --devices=0,1
step alpaca_rest "${alpaca[@]}" --config.data.slice=: --devices=0,1
step mix --config=configs/smollm2_mix_gpu.py --config.collect.store="$run/mix" --devices=0,1
# one process, a (data=2) mesh over both GPUs; capped at 3 minutes
timeout 180 python3 launch/collect.py "${alpaca[@]}" "${common[@]}" --config.data.slice=0:256 \
  --config.collect.store="$run/mesh_store" --workdir="$run/mesh.work" --summary=mesh \
  > "$run/mesh.log" 2>&1
echo "$(date +%T) mesh: exit $? $(cp "$run/mesh.work/mesh.json" "$run/mesh.json" 2>&1)" >> "$log"
for name in alpaca mix; do  # the stores as committed: float16 hidden states
  [ -d "$run/compact_$name" ] || python3 launch/compact_store.py --store="$run/$name" \
    --out="$run/compact_$name" >> "$log" 2>&1
done
echo "$(date +%T) all done" >> "$log"
