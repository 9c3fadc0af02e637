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

from lsdist_jax.llama import decode, sampling

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
  """One row per (program, scan_prefill): lower_s and compile_s of the prediction prefill
  (`prefill_hidden`, rows x block), a slot insert (rows x block into slots x cache_len), a
  slot batch's decode loop, and two parts of the insert alone: its sampling and its cache move
  (neither depends on the scan)."""
  cfg, out = engine.config, []
  per_row = [A((rows, block) if i == 1 else (rows,), np.uint32 if i == 3 else np.int32)
             for i in range(8)]  # slots, tokens, pad_len, request ids, starts, caps, limits, forced
  settings = [A((rows,), np.uint32), A((rows,), np.float32), A((rows, 2), np.float32)]
  for scan in (False, True):
    model = engine.model.clone(scan_prefill=scan)
    kw = dict(model=model, top_k_candidates=top_k_candidates, eos_ids=(0,), filler_id=0)
    state = jax.eval_shape(lambda: decode.slot_state(slots, cache_len, model=model))
    programs = {
        "prefill_hidden": (lambda p, t, pl: decode.prefill_hidden(p, t, pl, model=model,
                                                                   hidden_layer=-1),
                           (engine.params, per_row[1], per_row[2])),
        "slot_insert": (lambda p, st, *a: decode.slot_insert(p, st, *a, hidden_layer=-1, **kw),
                        (engine.params, state, *per_row, *settings, A((rows,), np.int32))),
    }
    if not scan:  # the decode loop and the insert's parts do not change with the scan
      programs["slot_decode"] = (
          lambda p, st, *a: decode.slot_decode(p, st, *a, **kw),
          (engine.params, state, A((), np.int32), A((slots,), np.uint32),
           A((slots,), np.float32), A((slots, 2), np.float32)))
      programs["insert: sampling alone"] = (
          lambda lg, *a: sampling.choose(lg, *a, top_k_candidates=top_k_candidates,
                                         eos=jnp.zeros((1,), jnp.int32), filler_id=0),
          (A((rows, cfg.vocab_size), np.float32), per_row[3], per_row[4], per_row[7],
           *settings))
    for name, (fn, args) in programs.items():
      out.append(dict(program=name, scan_prefill=scan, **_timed(fn, *args)))
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
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(engine.params, tokens, pad))
      times.append(time.perf_counter() - start)
    out.append({"program": "prefill_hidden (run)", "scan_prefill": scan,
                "seconds": round(float(np.median(times)), 5)})
  out[-1]["max_abs_diff_vs_unrolled"] = float(np.max(np.abs(hidden[True] - hidden[False])))
  return out
