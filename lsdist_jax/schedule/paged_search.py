"""The paged planners (numpy only): admission rules for a paged KV pool (`schedule/paged.py`,
which holds the rules and the simulator), chosen by simulating candidates.

* `paged-vanilla`: no prediction. Dataset order, first come first served while pages are free
  (a 1% watermark, vLLM's default), preemption when the pool runs out.
* `paged-search` (ours): the batch size, the admission rule (first come first served, or by
  the projected peak of pool use, each row projected at a quantile of its predicted length
  given the tokens it has) and the refill, chosen by expected time over lengths sampled from
  the predicted pmfs; dataset order.
* `paged-oracle`: the same search on the true lengths (projections exact: its `reserve` rule
  never preempts). The best plan of that search, not a bound on every plan.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from lsdist_jax.schedule.continuous import refill_for, sample_lengths
from lsdist_jax.schedule.cost import CostModel
from lsdist_jax.schedule.paged import PagedPlan, pool_pages, simulate_paged
from lsdist_jax.schedule.types import Options, Requests

# tokens per page: the paged kernel reads a page per block, at no cost over the slot cache's at
# 32 (results/paged_step_h200.json); a row wastes half a page on average
PAGE = 32
WATERMARK = 0.01  # fcfs: this share of the pool's pages left free at admission (vLLM's)
PAGED_REFILL_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4)
DEFAULT_PAGED_REFILL = 1 / 8  # as continuous-vanilla's
QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
LEVELS = (0.9, 1.0, 1.1)
DRAWS = 1  # sampled length draws a candidate is scored on (4,096 requests' sums vary little)


MIN_SLOTS = 32  # the smallest batch the searches try


def slot_choices(requests: Requests, cost: CostModel, options: Options) -> list[int]:
  """Batch sizes a paged plan may run: the batch buckets <= max_batch, no more than the bucket
  holding every request, and at least MIN_SLOTS or the rows the pool holds at full length
  (fixed slots' count), whichever is fewer. The last is the largest."""
  top = int(cost.padded_batch(max(requests.n, 1)))
  fitting = sorted({min(int(b), top) for b in cost.batch_buckets if b <= options.max_batch})
  fitting = fitting or [int(min(options.max_batch, top))]
  least = min(MIN_SLOTS, max(1, int(options.kv_budget_tokens) // int(requests.max_seq_len)))
  return [b for b in fitting if b >= least] or fitting[-1:]


def paged_slots(requests: Requests, cost: CostModel, options: Options) -> int:
  """Rows decoding together with no length known: the largest batch bucket <= max_batch (what
  a user sets, as vLLM's max_num_seqs), no more than the bucket holding every request."""
  return slot_choices(requests, cost, options)[-1]


def plan_paged_vanilla(requests: Requests, cost: CostModel, options: Options,
                       refill_fraction: float = DEFAULT_PAGED_REFILL,
                       slots: int | None = None) -> PagedPlan:
  """Dataset order, fcfs, `slots` rows (default: `paged_slots`)."""
  slots = int(slots or paged_slots(requests, cost, options))
  pool = pool_pages(options, PAGE, requests.max_seq_len)
  return PagedPlan(np.arange(requests.n), slots, PAGE, refill_for(slots, refill_fraction),
                   "fcfs", watermark=int(np.ceil(WATERMARK * pool)), strategy="paged-vanilla",
                   notes={"refill_fraction": float(refill_fraction)})


def _search(best: PagedPlan, score: Callable, name: str, values) -> tuple[PagedPlan, float]:
  """`best` (scored `best.expected_cost`) or the candidate with `name` set to one of `values`
  of lowest score."""
  for value in values:
    if value == getattr(best, name):
      continue
    candidate = dataclasses.replace(best, **{name: value})
    candidate.expected_cost = score(candidate)
    if candidate.expected_cost < best.expected_cost:
      best = candidate
  return best


def _reserve_search(requests, cost, options, projection, samples, strategy, quantiles,
                    levels) -> PagedPlan:
  """Coordinate search, each step scored by mean simulated seconds over the rows of
  `samples`: the batch size (first come first served), the admission rule, for `reserve` its
  quantile and level, the refill, the batch sizes next to the chosen one again. Dataset order
  (admitting the longest predicted first never paid on the validation split)."""
  choices = slot_choices(requests, cost, options)
  pool = pool_pages(options, PAGE, requests.max_seq_len)

  def score(plan):
    plan = dataclasses.replace(plan, refill=refill_for(plan.slots, plan.notes["fraction"]))
    return float(np.mean([simulate_paged(plan, requests, s, cost, options).seconds
                          for s in samples]))

  best = PagedPlan(np.arange(requests.n), choices[-1], PAGE, 1, "fcfs",
                   watermark=int(np.ceil(WATERMARK * pool)), quantile=0.9, level=1.0,
                   projection=projection, strategy=strategy,
                   notes={"fraction": DEFAULT_PAGED_REFILL})
  best.expected_cost = score(best)
  best = _search(best, score, "slots", choices)
  best = _search(best, score, "admission", ("reserve",))
  if best.admission == "reserve":
    best = _search(best, score, "quantile", quantiles)
    best = _search(best, score, "level", levels)
  best = _search(best, score, "notes", [{"fraction": f} for f in PAGED_REFILL_FRACTIONS])
  at = choices.index(best.slots)
  best = _search(best, score, "slots", choices[max(at - 1, 0):at + 2])
  fraction = best.notes["fraction"]
  best.refill = refill_for(best.slots, fraction)
  best.notes = {"admission": best.admission, "slots": best.slots, "quantile": best.quantile,
                "level": best.level, "refill_fraction": fraction}
  return best


def plan_paged_search(requests: Requests, cost: CostModel, options: Options,
                      seed: int = 0) -> PagedPlan:
  if requests.length_pmf is None:
    raise ValueError("paged-search needs predicted length pmfs")
  samples = sample_lengths(requests.pmf_within_room(), np.random.default_rng(seed), DRAWS)
  return _reserve_search(requests, cost, options, "predicted", samples, "paged-search",
                         QUANTILES, LEVELS)


def plan_paged_oracle(requests: Requests, cost: CostModel, options: Options) -> PagedPlan:
  if requests.true_length is None:
    raise ValueError("paged-oracle needs the true lengths")
  true = np.minimum(requests.true_length, requests.room)
  return _reserve_search(requests, cost, options, "true", true[None], "paged-oracle", (),
                         (1.0,))


PAGED_PLANNERS: dict[str, Callable[..., PagedPlan]] = {
    "paged-vanilla": plan_paged_vanilla,
    "paged-search": plan_paged_search,
    "paged-oracle": plan_paged_oracle,
}
