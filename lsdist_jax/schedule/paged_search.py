"""The paged planners (numpy only): admission rules for a paged KV pool (`schedule/paged.py`,
which holds the rules and the simulator), chosen by simulating candidates.

* `paged-vanilla`: no prediction. Dataset order, first come first served while pages are free
  (a 1% watermark, vLLM's default), preemption when the pool runs out.
* `paged-search` (ours): admission by the projected peak of pool use, each row projected at a
  quantile of its predicted length given the tokens it has; the quantile, the order (dataset
  order, or longest predicted first) and the refill are chosen by expected time over lengths
  sampled from the predicted pmfs.
* `paged-oracle`: the same rule with every true length (it never preempts); order and refill
  chosen on the true lengths.
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
ORDERS = ("given", "longest")
DRAWS = 2  # sampled length draws a candidate is scored on


MIN_SLOTS = 16  # the smallest batch the searches try


def slot_choices(requests: Requests, cost: CostModel, options: Options) -> list[int]:
  """Batch sizes a paged plan may run: the batch buckets <= max_batch (at least MIN_SLOTS where
  any is), no more than the bucket holding every request. The last is the largest."""
  top = int(cost.padded_batch(max(requests.n, 1)))
  fitting = sorted({min(int(b), top) for b in cost.batch_buckets if b <= options.max_batch})
  fitting = fitting or [int(min(options.max_batch, top))]
  return [b for b in fitting if b >= MIN_SLOTS] or fitting[-1:]


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


def _order(requests: Requests, key: np.ndarray, how: str) -> np.ndarray:
  if how == "given":
    return np.arange(requests.n)
  return np.lexsort((np.arange(requests.n), -np.asarray(key)))


def _search(base: PagedPlan, choices: list[tuple[str, tuple]], score: Callable) -> PagedPlan:
  """Coordinate search: each field in turn takes the value of lowest score, the others held."""
  best, best_score = base, score(base)
  for name, values in choices:
    for value in values:
      if name != "order" and value == getattr(best, name):
        continue
      candidate = dataclasses.replace(best, **{name: value})
      s = score(candidate)
      if s < best_score:
        best, best_score = candidate, s
  best.expected_cost = float(best_score)
  return best


def _reserve_search(requests, cost, options, key, projection, samples, strategy,
                    quantiles, levels) -> PagedPlan:
  """Coordinate search (slots, then the quantile, level, order and refill fraction) of a
  `reserve` plan, scored by mean simulated seconds over the rows of `samples`."""
  orders = {how: _order(requests, key, how) for how in ORDERS}
  choices = slot_choices(requests, cost, options)
  pool = pool_pages(options, PAGE, requests.max_seq_len)
  base = PagedPlan(orders["given"], choices[-1], PAGE, refill_for(choices[-1],
                                                                  DEFAULT_PAGED_REFILL),
                   "reserve", watermark=int(np.ceil(WATERMARK * pool)), quantile=0.9,
                   level=1.0, projection=projection, strategy=strategy)

  def score(plan):
    plan = dataclasses.replace(plan, refill=refill_for(plan.slots, plan.notes["fraction"]))
    return float(np.mean([simulate_paged(plan, requests, s, cost, options).seconds
                          for s in samples]))

  base.notes = {"fraction": DEFAULT_PAGED_REFILL}
  fractions = tuple({"fraction": f} for f in PAGED_REFILL_FRACTIONS)
  plan = _search(base, [("slots", tuple(choices)), ("quantile", quantiles), ("level", levels),
                        ("order", tuple(orders[h] for h in ORDERS[1:])), ("notes", fractions),
                        ("admission", ("fcfs",)), ("slots", tuple(choices))], score)
  fraction = plan.notes["fraction"]
  plan.refill = refill_for(plan.slots, fraction)
  plan.notes = {"admission": plan.admission, "slots": plan.slots, "quantile": plan.quantile,
                "level": plan.level,
                "refill_fraction": fraction,
                "order": "given" if np.array_equal(plan.order, orders["given"]) else "longest"}
  return plan


def plan_paged_search(requests: Requests, cost: CostModel, options: Options,
                      seed: int = 0) -> PagedPlan:
  if requests.length_pmf is None:
    raise ValueError("paged-search needs predicted length pmfs")
  samples = sample_lengths(requests.pmf_within_room(), np.random.default_rng(seed), DRAWS)
  f = requests.length_cdf()
  median = np.argmax(f >= 0.5, axis=1)
  return _reserve_search(requests, cost, options, median, "predicted", samples, "paged-search",
                         QUANTILES, LEVELS)


def plan_paged_oracle(requests: Requests, cost: CostModel, options: Options) -> PagedPlan:
  if requests.true_length is None:
    raise ValueError("paged-oracle needs the true lengths")
  true = np.minimum(requests.true_length, requests.room)
  return _reserve_search(requests, cost, options, true, "true", true[None], "paged-oracle",
                         (), (1.0,))


PAGED_PLANNERS: dict[str, Callable[..., PagedPlan]] = {
    "paged-vanilla": plan_paged_vanilla,
    "paged-search": plan_paged_search,
    "paged-oracle": plan_paged_oracle,
}
