"""Compile times of the engine's programs (issue 18): how long each kind the generate job runs
takes to lower and to compile, with the prefill's blocks unrolled and scanned
(`engine.scan_prefill`), and how long a scanned and an unrolled prefill take to run, in the same
process. `launch/bench_compile.py` prints and saves them (docs/results/compile_times_*.json).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from lsdist_jax.benchmark.engine import median_time
from lsdist_jax.llama import decode

A = jax.ShapeDtypeStruct


def _timed(fn, *args) -> dict:
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  mid = time.perf_counter()
  lowered.compile()
  end = time.perf_counter()
  return {"lower_s": round(mid - start, 3), "compile_s": round(end - mid, 3)}


def program_rows(engine, *, slots: int, cache_len: int, rows: int, block: int,
                 top_k_candidates: int = 16) -> list[dict]:
  """One row per (program, scan_prefill, lower_blocks_once): lower_s and compile_s of the
  prediction prefill (`prefill_hidden`, rows x block), a slot insert (rows x block into slots x
  cache_len), the first-token sampling after it (`slot_first`, once per rows whatever the
  block: no blocks, one row), and a slot batch's decode loop (no scan: its blocks unrolled,
  each lowered or one lowered for all)."""
  cfg, out = engine.config, []
  ints = A((rows,), np.int32)
  tokens = A((rows, block), np.int32)
  settings = [A((rows,), np.uint32), A((rows,), np.float32), A((rows, 2), np.float32)]
  sampler = dict(top_k_candidates=top_k_candidates, eos_ids=(0,), filler_id=0)
  for scan, once in ((False, False), (False, True), (True, True)):
    model = engine.model.clone(scan_prefill=scan, lower_blocks_once=once)
    state = jax.eval_shape(lambda: decode.slot_state(slots, cache_len, model=model))
    programs = {
        "prefill_hidden": (lambda p, t, pl: decode.prefill_hidden(p, t, pl, model=model,
                                                                   hidden_layer=-1),
                           (engine.params, tokens, ints)),
        "slot_insert": (lambda p, st, *a: decode.slot_insert(p, st, *a, model=model),
                        (engine.params, state, ints, tokens, ints, ints)),
    }
    if not scan and not once:
      programs["slot_first"] = (
          lambda st, *a: decode.slot_first(st, *a, **sampler),
          (state, A((rows, cfg.vocab_size), np.float32), ints, A((rows,), np.uint32),
           ints, ints, ints, ints, *settings))
    if not scan:
      programs["slot_decode"] = (
          lambda p, st, *a: decode.slot_decode(p, st, *a, model=model, **sampler),
          (engine.params, state, A((), np.int32), A((slots,), np.uint32),
           A((slots,), np.float32), A((slots, 2), np.float32)))
    for name, (fn, args) in programs.items():
      out.append(dict(program=name, scan_prefill=scan, lower_blocks_once=once,
                      **_timed(fn, *args)))
  return out


def prefill_run_rows(engine, *, rows: int, block: int, repeats: int = 5) -> list[dict]:
  """Seconds per call (median of `repeats`, compiled first) of the prediction prefill with the
  blocks unrolled and scanned, on the same random tokens; and the largest difference of their
  hidden states."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, engine.config.vocab_size, size=(rows, block)), jnp.int32)
  pad = jnp.zeros((rows,), jnp.int32)
  out, hidden = [], {}
  for scan in (False, True):
    model = engine.model.clone(scan_prefill=scan)
    fn = jax.jit(lambda p, t, pl: decode.prefill_hidden(p, t, pl, model=model, hidden_layer=-1))
    hidden[scan] = np.asarray(jax.block_until_ready(fn(engine.params, tokens, pad)))
    seconds = median_time(lambda: jax.block_until_ready(fn(engine.params, tokens, pad)), repeats)
    out.append({"program": "prefill_hidden (run)", "scan_prefill": scan,
                "seconds": round(float(seconds), 5)})
  out[-1]["max_abs_diff_vs_unrolled"] = float(np.max(np.abs(hidden[True] - hidden[False])))
  return out


def decode_step_rows(engine, *, batch: int, prompt_len: int, steps: int, cache_lens,
                     repeats: int = 3, prompts=None, trace_dir: str = "",
                     loops=("static", "slots")) -> list[dict]:
  """Milliseconds per decode step of the static loop (`Generator.generate`) and of a slot batch's
  loop (`SlotBatch.decode`, what continuous plans run) on the same `batch` rows of `prompt_len`
  random tokens (or the token ids `prompts`, cycled), every row forced to run exactly `steps`
  (and steps // 2) tokens: the difference over the difference in steps, compiled first, median
  of `repeats`. The static loop runs at the cache its rows need; the slot loop at each of
  `cache_lens` (the live tokens stay the same). With `trace_dir`, one more slot run at the
  first cache length is traced with jax.profiler (a Perfetto trace: `traces.trace_summary`). loops:
  which of the two to time."""
  gen = engine.generator
  rng = np.random.default_rng(0)
  if prompts:
    prompts = [list(prompts[i % len(prompts)]) for i in range(batch)]
  else:
    prompts = [[1] + rng.integers(3, engine.config.vocab_size, size=prompt_len - 1).tolist()
               for _ in range(batch)]
  prompt_len = max(len(p) for p in prompts)
  need = gen.buckets.cache * -(-(prompt_len + steps) // gen.buckets.cache)
  longest = max([need] + [int(c) for c in cache_lens])

  def static(n):
    gen.generate(prompts, cap=steps, forced_lengths=[n] * batch, cache_len=need,
                 max_seq_len=longest, seed=0, temperature=0.6, top_p=0.9)

  def slots(cache_len):
    def run(n):
      b = gen.open_slots(batch, cache_len, max_seq_len=longest)
      b.insert(list(range(batch)), prompts, list(range(batch)), [0] * batch,
               forced_lengths=[n] * batch)
      b.decode(b.slots)  # until every slot is done: n - 1 steps after the insert's token
      jax.block_until_ready(b.state)
    return run

  out = []
  runs = [("static", static, need)] + [("slots", slots(c), c) for c in cache_lens]
  for name, fn, cache in [run for run in runs if run[0] in loops]:
    fn(steps)  # compile
    full = median_time(lambda: fn(steps), repeats)
    half = median_time(lambda: fn(steps // 2), repeats)
    out.append({"program": f"decode step ({name})", "batch": batch, "cache_len": int(cache),
                "prompt_len": prompt_len, "steps": steps,
                "ms_per_step": round(1e3 * (full - half) / (steps - steps // 2), 3)})
  if trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      slots(int(cache_lens[0]))(steps)
  return out


def insert_call_rows(engine, *, slots: int, cache_len: int, rows_list, block: int,
                     prompts=None, repeats: int = 5) -> list[dict]:
  """Milliseconds of a slot batch's per-call work (what a refill costs beside its decode
  steps), compiled first, median of `repeats`: per rows in `rows_list`, an insert of that many
  prompts (token ids `prompts`, cycled, or random ones) padded to context block `block`, as
  host time (the call returning) and as done on the device; then a read of the slots and a
  decode call that runs no step (every slot done: its fixed cost)."""
  gen = engine.generator
  rng = np.random.default_rng(0)
  top = max(int(r) for r in rows_list)
  if prompts:
    prompts = [list(prompts[i % len(prompts)])[-block:] for i in range(top)]
  else:
    prompts = [[1] + rng.integers(3, engine.config.vocab_size, size=block - 1).tolist()
               for _ in range(top)]
  batch = gen.open_slots(slots, cache_len, max_seq_len=cache_len)
  out = []

  def insert(n):
    start = time.perf_counter()
    batch.insert(list(range(n)), prompts[:n], list(range(n)), [0] * n, min_block=block)
    host = time.perf_counter() - start
    jax.block_until_ready(batch.state)
    return host, time.perf_counter() - start

  for n in [int(r) for r in rows_list]:
    insert(n)  # compile
    times = np.array([insert(n) for _ in range(repeats)])
    out.append({"program": "slot insert call", "slots": slots, "cache_len": cache_len,
                "rows": n, "block": block, "host_ms": round(1e3 * float(np.median(times[:, 0])), 3),
                "done_ms": round(1e3 * float(np.median(times[:, 1])), 3)})
  batch.decode(batch.slots)  # every slot done
  batch.read()
  read = median_time(batch.read, repeats)
  idle = median_time(lambda: batch.decode(batch.slots), repeats)
  out.append({"program": "slot read and empty decode call", "slots": slots,
              "cache_len": cache_len, "read_ms": round(1e3 * float(read), 3),
              "empty_decode_ms": round(1e3 * float(idle), 3)})
  return out
