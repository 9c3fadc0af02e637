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
                 active_shares: Sequence[float] = (1.0, 0.25)) -> list[dict]:
  """Decode-step timings of this engine on this device, for fitting the planner's cost model.

  Rows: {"batch", "cache_len", "ms_per_step", "prefill_ms", "prompt_len", "live_tokens"}. Each
  shape runs `steps` forced steps and 2*`steps`; the difference gives ms/step without prefill.
  `active_shares`: the share of rows that keep generating (the others end at their first token),
  so that the live cache tokens vary at a fixed shape (one compiled program) and the fit can tell
  a whole-cache read from a live-slot read. Several `prompt_len`s give the prefill fit its
  per-token slope (continued rows re-prefill long contexts)."""
  lens = [int(prompt_len)] if np.ndim(prompt_len) == 0 else [int(p) for p in prompt_len]
  rows = []
  for p in lens:
    rows += _profile_prompt_len(engine, batch_sizes, cache_lens, steps, p, repeats,
                                active_shares)
  return rows


def _profile_prompt_len(engine, batch_sizes, cache_lens, steps, prompt_len, repeats,
                        active_shares) -> list[dict]:
  gen = engine.generator
  rows = []
  for b in batch_sizes:
    prompts = [[1] + [10 + (i + j) % 50 for j in range(prompt_len - 1)] for i in range(b)]
    for s in cache_lens:
      if s < prompt_len + 2 * steps:
        continue
      kw = dict(cap=2 * steps, max_seq_len=engine.config.max_position_embeddings, cache_len=s,
                temperature=0.0, top_p=1.0)
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


def profile_and_save(engine, workdir: str, batch_sizes: Sequence[int],
                     cache_lens: Sequence[int], prompt_lens: Sequence[int]) -> CostModel:
  """Profiles the engine, fits the cost model and saves it (and the raw rows) in `workdir`."""
  from lsdist_jax.engine import device_kind, model_shape

  rows = profile_cost(engine, batch_sizes, cache_lens, prompt_len=list(prompt_lens))
  cost = CostModel.fit(rows, device=device_kind(), model=model_shape(engine))
  os.makedirs(workdir, exist_ok=True)
  path = paths.profiled_cost_model(workdir)
  cost.save(path)
  write_json(rows, os.path.join(workdir, "cost_profile.json"))
  logging.info("cost model saved to %s", path)
  return cost
