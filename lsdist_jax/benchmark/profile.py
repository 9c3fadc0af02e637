"""Profiling the engine for the planners' cost model: decode-step and prefill timings over a
grid of shapes on this device, fitted and saved as `<workdir>/cost_model.json` (with the device
and model shape it was profiled on).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import numpy as np

from lsdist_jax import paths
from lsdist_jax.files import write_json
from lsdist_jax.schedule import CostModel


def profile_cost(engine, batch_sizes: Sequence[int], cache_lens: Sequence[int], steps: int = 32,
                 prompt_len: int | Sequence[int] = 32, repeats: int = 2,
                 active_shares: Sequence[float] = (1.0, 0.25),
                 sampling: tuple[float, float] = (0.0, 1.0)) -> list[dict]:
  """Decode-step timings of this engine on this device, for fitting the planner's cost model.

  Rows: {"batch", "cache_len", "ms_per_step", "prefill_ms", "prompt_len", "live_tokens"}. Each
  shape runs `steps` forced steps and 2*`steps`; the difference gives ms/step without prefill.
  `active_shares`: the share of rows that keep generating (the others end at their first token),
  so that the live cache tokens vary at a fixed shape (one compiled program) and the fit can tell
  a whole-cache read from a live-slot read. Several `prompt_len`s give the prefill fit its
  per-token slope (continued rows re-prefill long contexts). sampling: (temperature, top_p)
  of the rows, as the runs to plan sample (the nucleus costs more per step than greedy)."""
  rows = []
  for p in _lengths(prompt_len):
    rows += _profile_prompt_len(engine, batch_sizes, cache_lens, steps, p, repeats,
                                active_shares, sampling)
  return rows


def _lengths(prompt_len) -> list[int]:
  return [int(prompt_len)] if np.ndim(prompt_len) == 0 else [int(p) for p in prompt_len]


def _context(p: int) -> list[int]:
  """A synthetic context of p tokens (the slot profile's)."""
  return [1] + [10 + j % 50 for j in range(p - 1)]


def _profile_prompt_len(engine, batch_sizes, cache_lens, steps, prompt_len, repeats,
                        active_shares, sampling) -> list[dict]:
  gen = engine.generator
  rows = []
  for b in batch_sizes:
    prompts = [[1] + [10 + (i + j) % 50 for j in range(prompt_len - 1)] for i in range(b)]
    for s in cache_lens:
      if s < prompt_len + 2 * steps:
        continue
      kw = dict(cap=2 * steps, max_seq_len=engine.config.max_position_embeddings, cache_len=s,
                temperature=float(sampling[0]), top_p=float(sampling[1]))
      gen.generate(prompts, forced_lengths=[1] * b, **kw)  # compile
      for share in active_shares:
        active = max(1, int(round(share * b)))
        times = {}
        for n_steps in (steps, 2 * steps):
          forced = [n_steps] * active + [1] * (b - active)
          best = float("inf")
          for _ in range(repeats):
            t0 = time.perf_counter()
            gen.generate(prompts, forced_lengths=forced, **kw)
            best = min(best, time.perf_counter() - t0)
          times[n_steps] = best
        ms_step = 1e3 * (times[2 * steps] - times[steps]) / steps
        prefill_ms = max(1e3 * times[steps] - ms_step * steps, 0.0)
        # steps steps+1 .. 2*steps: an active row reads its prompt + i cache tokens at step i
        live = active * (prompt_len + 1.5 * steps + 0.5)
        rows.append({"batch": int(b), "cache_len": int(s), "ms_per_step": round(ms_step, 4),
                     "prefill_ms": round(prefill_ms, 4), "prompt_len": int(prompt_len),
                     "live_tokens": round(live, 1)})
        logging.info("profile b=%d S=%d active=%d: %.3f ms/step, prefill %.2f ms", b, s, active,
                     ms_step, prefill_ms)
  return rows


def profile_slots(engine, batch_sizes: Sequence[int], cache_lens: Sequence[int], steps: int = 32,
                  prompt_len: int | Sequence[int] = 128, insert_rows: Sequence[int] = (8, 32),
                  repeats: int = 2, active_shares: Sequence[float] = (1.0, 0.25),
                  sampling: tuple[float, float] = (0.0, 1.0)) -> list[dict]:
  """Timings of the calls the continuous runner makes (`SlotBatch`), for fitting the cost model
  its plans are simulated with: what `profile_cost` times (a static `generate`) leaves out, an
  insert's move of its rows into their slots and its first-token program, a decode call's
  fixed cost and the slot loop's own per-step work.

  Per slot batch (B slots of cache S, each of `batch_sizes` x `cache_lens` that holds the
  shortest prompt length and 2 x `steps` tokens):
  * decode rows {"batch", "cache_len", "ms_per_step", "call_ms", "live_tokens", "context_len"}
    per prompt length whose context and 2 x `steps` tokens fit S (long contexts give the
    live-token cost its range): every slot
    filled, a share of the rows forced to run n steps (the others done at their insert), one
    decode call until all are done, timed at n = steps and 2 x steps; the difference gives
    ms/step, the rest of a call is `call_ms`;
  * insert rows {"batch" (rows k), "prompt_len" (the context block the insert runs at),
    "prefill_ms" (the whole call, its sampler included), "slots", "cache_len"}: an insert of k
    of `insert_rows` (<= B) rows of each prompt length whose block fits S into free slots.
  Fastest of `repeats`; the first call of each program compiles it, untimed. Then a row per
  slot program compiled (`program_memory`): whether it updates its state in place. sampling:
  (temperature, top_p) of the slots' rows, as `profile_cost`."""
  import jax

  gen = engine.generator
  lens = _lengths(prompt_len)
  rows = []
  for s in cache_lens:
    for b in batch_sizes:
      if s < min(lens) + 2 * steps + 1:
        continue
      batch = gen.open_slots(b, s, max_seq_len=s, temperature=float(sampling[0]),
                             top_p=float(sampling[1]))
      b = batch.slots  # the bucket it runs at

      def fill(k, context, forced):  # an insert of k rows into slots 0..k-1
        batch.insert(list(range(k)), [context] * k, list(range(k)), [0] * k,
                     forced_lengths=forced)
        jax.block_until_ready(batch.state)

      for p in lens:
        block = int(gen.buckets.insert_block(p, s))
        if block >= s:
          continue
        context = _context(p)
        for k in sorted({min(int(r), b) for r in insert_rows}):
          ms = _fastest(lambda: fill(k, context, [2] * k), repeats)
          rows.append({"batch": k, "prompt_len": block, "prefill_ms": round(ms, 4),
                       "slots": int(b), "cache_len": int(s)})
          logging.info("profile slots B=%d S=%d: an insert of %d rows at block %d: %.2f ms", b,
                       s, k, block, ms)
      for p in (p for p in lens if s >= p + 2 * steps + 1):  # long contexts: many live tokens
        context = _context(p)
        for share in active_shares:
          active = max(1, int(round(share * b)))
          calls = {}
          for n in (steps, 2 * steps):
            ran = []

            def decode():  # every slot filled (untimed), then one decode call until all are done
              fill(b, context, [n + 1] * active + [1] * (b - active))
              t0 = time.perf_counter()
              ran.append(batch.decode(b))
              jax.block_until_ready(batch.state)
              return time.perf_counter() - t0

            calls[n] = (_fastest(decode, repeats, timer=True), ran[-1])
          (t1, n1), (t2, n2) = calls[steps], calls[2 * steps]
          ms_step = (t2 - t1) / max(n2 - n1, 1)
          live = active * (p + 1.5 * steps + 0.5)  # as `profile_cost`'s rows
          rows.append({"batch": int(b), "cache_len": int(s), "ms_per_step": round(ms_step, 4),
                       "call_ms": round(max(t1 - n1 * ms_step, 0.0), 4),
                       "live_tokens": round(live, 1), "context_len": int(p)})
          logging.info("profile slots B=%d S=%d context %d active=%d: %.3f ms/step, %.2f ms a "
                       "call", b, s, p, active, ms_step, rows[-1]["call_ms"])
  return rows + program_memory(gen)


def program_memory(gen, prefix: str = "slot_") -> list[dict]:
  """{"program", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"} of each program
  the generator compiled whose name starts with `prefix` (where the backend reports it). A slot
  program updates its state in place: its outputs alias the donated state (alias_bytes), and
  temporaries as large as the state's KV cache would mean a copy of it on every call."""
  rows = []
  for key, exe in list(gen._executables.items()):  # (name, shapes...) -> compiled program
    if not key[0].startswith(prefix):
      continue
    try:
      m = exe.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
      m = None
    if m is None:
      continue
    rows.append({"program": key[0], "argument_bytes": int(m.argument_size_in_bytes),
                 "output_bytes": int(m.output_size_in_bytes),
                 "alias_bytes": int(m.alias_size_in_bytes),
                 "temp_bytes": int(m.temp_size_in_bytes)})
    logging.info("program %s: arguments %.1f MB, outputs %.1f MB aliasing %.1f MB, "
                 "temporaries %.1f MB", key[0], *(rows[-1][k] / 2**20 for k in (
                     "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")))
  return rows


def _fastest(fn, repeats: int, timer: bool = False) -> float:
  """ms of the fastest of `repeats` calls of fn, after one more that is not counted (it
  compiles). timer: fn returns its own seconds (it times only part of itself)."""
  best = float("inf")
  for i in range(repeats + 1):
    t0 = time.perf_counter()
    own = fn()
    seconds = own if timer else time.perf_counter() - t0
    if i:
      best = min(best, seconds)
  return 1e3 * best


def profile_and_save(engine, workdir: str, batch_sizes: Sequence[int],
                     cache_lens: Sequence[int], prompt_lens: Sequence[int],
                     runner: str = "static", insert_rows: Sequence[int] = (8, 32),
                     sampling: tuple[float, float] = (0.0, 1.0)) -> CostModel:
  """Profiles the engine, fits the cost model and saves it (and the raw rows) in `workdir`.
  runner: "static" times `generate` (`profile_cost`), "slots" the continuous runner's own
  calls (`profile_slots`); sampling: (temperature, top_p) the planned runs sample with."""
  from lsdist_jax.engine import device_kind, model_shape

  if runner not in ("static", "slots"):
    raise ValueError(f"profile runner must be 'static' or 'slots', got {runner!r}")
  if runner == "slots":
    rows = profile_slots(engine, batch_sizes, cache_lens, prompt_len=list(prompt_lens),
                         insert_rows=insert_rows, sampling=sampling)
  else:
    rows = profile_cost(engine, batch_sizes, cache_lens, prompt_len=list(prompt_lens),
                        sampling=sampling)
  cost = CostModel.fit(rows, device=device_kind(), model=model_shape(engine))
  os.makedirs(workdir, exist_ok=True)
  path = paths.profiled_cost_model(workdir)
  cost.save(path)
  write_json(rows, os.path.join(workdir, "cost_profile.json"))
  logging.info("cost model saved to %s", path)
  return cost
