"""The continuous planners (numpy only): phases built from per-request key lengths, and the
searches that choose them by simulating candidates under the runner's rules
(`schedule/continuous.py`, which holds the rules, the plan types and the simulator)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from lsdist_jax.schedule import dist
from lsdist_jax.schedule.continuous import (ContinuousPlan, Phase, expected_seconds,
                                            insert_block, programs, refill_for, sample_lengths,
                                            simulate_continuous, slot_cache_len, slots_for)
from lsdist_jax.schedule.cost import CostModel
from lsdist_jax.schedule.planners import CAP_GRID, SEARCH_THRESHOLDS, predicted_length
from lsdist_jax.schedule.types import Options, Requests

REFILL_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)  # refill m = this fraction of the slots
DEFAULT_REFILL_FRACTION = 1 / 8
# The search's thresholds: every 0.05 of the planners' grid (0.10 ... 0.95) and 0.99.
CONTINUOUS_SEARCH_THRESHOLDS = tuple(float(t) for t in SEARCH_THRESHOLDS
                                     if round(t * 100) % 5 == 0 or t >= 0.99)
MIN_PHASE_FACTOR = 2.0  # a phase with fewer members than this x its slots merges into the next
PHASE_FACTORS = (1.0, 2.0, 4.0, 8.0)  # the min_phase_factor values the searches try
SEARCH_KEY_CAPS = (None, 128, 256, 512)  # the key caps continuous-search tries
# Drains the searches try, as fractions of each phase's slots (every phase but the last): a
# phase whose queue is empty ends once at most this many rows still run, and they carry on.
DRAIN_FRACTIONS = (0.0, 1 / 8, 1 / 4)
# Refills the searches try, last, for the phase that holds every row's whole room: the plan's own
# last phase where its cache is that long, else one more phase of that cache with no members of
# its own (where the rows capped at the end go: as the runner's final phase, at this refill). A
# refill of all its slots runs those rows as one batch, no insert while any still decodes.
LAST_REFILL_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


# ----------------------------------------------------------------------------- phase building


def continuous_phases(requests: Requests, key_len: np.ndarray, cost: CostModel, options: Options,
                      order: np.ndarray | None = None,
                      refill_fraction: float = DEFAULT_REFILL_FRACTION, slack: int | None = None,
                      min_phase_factor: float = MIN_PHASE_FACTOR) -> list[Phase]:
  """Phases from per-request key lengths (the tokens a request should be able to generate).

  Request r goes to the smallest cache length S (a multiple of cost.cache_bucket) with
  p_r + min(key_r + slack, room_r) <= S (`slot_cache_len`: by the runner's rule its cap there,
  min(S - p_r, room_r), covers its key; a key at its room is never capped). Phases run in
  increasing S (capped rows carry forward to longer caches). A phase of fewer than
  min_phase_factor x slots members merges into the next larger S (the last one takes what
  comes). Slots from `slots_for` (the KV budget; no more than the batch bucket that holds the
  requests of this phase and the earlier ones, all a phase can ever queue), refill a fraction
  of the slots. Admission
  order within a phase: `order` (request ids, by priority), by default longest key first (so a
  phase's tail drains short rows)."""
  slack = options.fcr_slack if slack is None else int(slack)
  key = np.maximum(np.asarray(key_len, np.int64), 0)
  if key.shape != (requests.n,):
    raise ValueError(f"key_len has shape {key.shape}, expected ({requests.n},)")
  if requests.n == 0:
    return []
  want = np.maximum(np.minimum(key + slack, requests.room), 1)
  need = np.asarray(slot_cache_len(requests.prompt_len, want, cost), np.int64)
  if order is None:
    order = np.lexsort((np.arange(requests.n), -key))
  order = np.asarray(order, np.int64)
  rank = np.empty(requests.n, np.int64)
  rank[order] = np.arange(requests.n)
  levels = np.unique(need)
  phases, pending, before = [], np.zeros(0, np.int64), 0
  for i, cache_len in enumerate(levels.tolist()):
    members = np.concatenate([pending, np.flatnonzero(need == cache_len)])
    # No more slots than rows can ever queue here: this phase's and the earlier ones' (carried)
    slots = slots_for(cache_len, cost, options, rows=before + members.size)
    if i + 1 < levels.size and members.size < min_phase_factor * slots:
      pending = members
      continue
    members = members[np.argsort(rank[members], kind="stable")]
    phases.append(Phase(members, cache_len, slots, refill_for(slots, refill_fraction)))
    before += members.size
    pending = np.zeros(0, np.int64)
  return phases


def _with_refill(phases: list[Phase], fraction: float, split: bool = True) -> list[Phase]:
  return [dataclasses.replace(p, refill=refill_for(p.slots, fraction), split_first=split)
          for p in phases]


def with_drain(phases: list[Phase], fraction: float) -> list[Phase]:
  """Every phase but the last drains at `fraction` of its slots (rounded down); the last runs
  its tail out (what it would carry goes to the runner's final phase)."""
  return [dataclasses.replace(p, drain=min(p.slots - 1, int(fraction * p.slots))
                              if k + 1 < len(phases) else 0)
          for k, p in enumerate(phases)]


def with_last_refill(phases: list[Phase], requests: Requests, cost: CostModel, options: Options,
                     fraction: float) -> list[Phase]:
  """`phases` whose rows all end in a phase of the cache that holds every request's whole room
  (`slot_cache_len` of its prompt and room), at refill `fraction` of its slots: the last phase's
  refill where its cache is that long, else one more phase of that cache with no members (the
  rows carried out of the last phase queue there instead of in the runner's `final_phase`;
  slots from the KV budget, as for a phase of every request)."""
  top = int(slot_cache_len(requests.prompt_len, requests.room, cost).max())
  if phases and phases[-1].cache_len >= top:
    last = phases[-1]
    return phases[:-1] + [dataclasses.replace(last, refill=refill_for(last.slots, fraction))]
  slots = slots_for(top, cost, options, rows=requests.n)
  return list(phases) + [Phase(np.zeros(0, np.int64), top, slots, refill_for(slots, fraction),
                               split_first=phases[-1].split_first if phases else True)]


def with_blocks(phases: list[Phase], requests: Requests, cost: CostModel) -> list[Phase]:
  """Every phase's inserts at one context block, that of its longest member prompt (rows
  carried in with longer contexts still take their own): one insert program per rows count
  instead of one per block, for padding that costs less than a compilation."""
  return [dataclasses.replace(p, block=int(insert_block(
      int(requests.prompt_len[p.members].max()), p.cache_len, cost))) if p.members.size else p
          for p in phases]


def admission_orders(requests: Requests) -> dict[str, np.ndarray]:
  """Admission orders (request ids, first admitted first) the search tries besides each
  phase's own (longest key first): by predicted mean length, longest first and shortest
  first. Shortest first leaves the predicted-long requests for the end, where they fill the
  slots while the queue drains: with many responses that run to the cap and are hard to tell
  apart, the tail after the last refill is about one response long whatever the order, and is
  better spent full."""
  mean = dist.mean(requests.pmf_within_room())
  ids = np.arange(requests.n)
  return {"mean_longest_first": np.lexsort((ids, -mean)),
          "mean_shortest_first": np.lexsort((ids, mean))}


def with_order(phases: list[Phase], order: np.ndarray) -> list[Phase]:
  """Each phase's members admitted in `order` (request ids by priority)."""
  rank = np.empty(order.size, np.int64)
  rank[order] = np.arange(order.size)
  return [dataclasses.replace(p, members=p.members[np.argsort(rank[p.members], kind="stable")])
          for p in phases]


def _search_variants(best: ContinuousPlan, evaluate, label: str, note: str, own,
                     variants) -> ContinuousPlan:
  """`best`, or the variant of its phases (`variants`: (value, phases) pairs) of least
  `evaluate`; notes[note]: the value chosen (`own` for `best` as it is), and the search table
  gains a row per variant, (label, value, min_phase_factor, expected seconds, key cap)."""
  chosen, table = best, []
  best.notes[note] = own
  for value, phases in variants:
    plan = dataclasses.replace(best, phases=phases, notes=dict(best.notes, **{note: value}))
    plan.expected_cost = evaluate(plan)
    table.append((label, value, best.notes.get("min_phase_factor"), plan.expected_cost,
                  best.notes.get("key_cap")))
    if plan.expected_cost < chosen.expected_cost:
      chosen = plan
  chosen.notes["search"] = list(best.notes.get("search", [])) + table
  return chosen


def _search_order(best: ContinuousPlan, evaluate, requests: Requests) -> ContinuousPlan:
  """`best` with the admission order (its own, or one of `admission_orders`) of least
  `evaluate`; notes: admission; search rows ("order", name, ...)."""
  return _search_variants(best, evaluate, "order", "admission", "key_longest_first",
                          [(name, with_order(best.phases, order))
                           for name, order in admission_orders(requests).items()])


def _search_drain(best: ContinuousPlan, evaluate, fractions) -> ContinuousPlan:
  """`best` with the drain fraction (of `fractions`, 0 meaning `best` as it is) of least
  `evaluate`; notes: drain_fraction; search rows ("drain", fraction, ...)."""
  return _search_variants(best, evaluate, "drain", "drain_fraction", 0.0,
                          [(float(f), with_drain(best.phases, f)) for f in fractions if f != 0.0])


def _search_last_refill(best: ContinuousPlan, evaluate, requests: Requests, cost: CostModel,
                        options: Options, fractions) -> ContinuousPlan:
  """`best`, or `best` with its rows ending in a whole-room phase at a refill of `fractions`
  (`with_last_refill`), of least `evaluate`; notes: last_refill (None: `best` as it is);
  search rows ("last_refill", fraction, ...). Not tried where every phase holds the whole room
  (no row is ever carried; the refill search covered those phases)."""
  top = int(slot_cache_len(requests.prompt_len, requests.room, cost).max()) if requests.n else 0
  carries = any(p.cache_len < top for p in best.phases)
  variants = []
  for f in fractions if carries else ():
    phases = with_last_refill(best.phases, requests, cost, options, f)
    if len(phases) > len(best.phases) or phases[-1].refill != best.phases[-1].refill:
      variants.append((float(f), phases))
  return _search_variants(best, evaluate, "last_refill", "last_refill", None, variants)


def _search_first_fill(best: ContinuousPlan, evaluate, choices=(True, False)
                       ) -> ContinuousPlan:
  """`best` (searched with its phases' first fills split or not: `Phase.split_first`, one
  value for all), or, where `choices` holds the other value, `best` with it, of least
  `evaluate`: a split first fill compiles no insert of all the slots' rows, which wins where
  options.compile_seconds is charged; one insert makes fewer, larger prefill calls. notes:
  split_first; search row ("split_first", the other value, ...)."""
  own = all(p.split_first for p in best.phases)
  return _search_variants(best, evaluate, "split_first", "split_first", own, [
      (not own, [dataclasses.replace(p, split_first=not own) for p in best.phases])]
      if (not own) in choices else [])


def first_fill_by_cost(phase: Phase, requests: Requests, cost: CostModel,
                       options: Options) -> Phase:
  """`phase` (every request queued in it) with the first fill of least cost, without lengths:
  split (`split_first`) unless one insert of the first rows costs less than the refill-sized
  inserts, its two programs' compilation charged (options.compile_seconds, unless
  options.compiled holds them)."""
  n = phase.members.size
  k = min(n, phase.slots)
  if n <= k:
    return phase
  cache, members = phase.cache_len, phase.members[:k]
  refill = max(1, min(phase.refill, phase.slots))
  step = int(cost.padded_batch(refill))

  def block(rows):  # the context block an insert of these members prefills
    return max(int(insert_block(int(requests.prompt_len[rows].max()), cache, cost)), phase.block)

  def seconds(rows):  # one insert call of these members
    return float(cost.prefill_call_time(rows.size, block(rows)))

  split = sum(seconds(members[c:c + step]) for c in range(0, k, step))
  own = programs(phase.slots, cache, [k], [block(members)], refill, cost, decoded=False)
  whole = seconds(members) + options.compile_seconds * len(own - options.compiled)
  return dataclasses.replace(phase, split_first=bool(split <= whole))


# ----------------------------------------------------------------------------- planners


def plan_continuous(requests: Requests, cost: CostModel, options: Options,
                    threshold: float | None = None,
                    refill_fraction: float = DEFAULT_REFILL_FRACTION) -> ContinuousPlan:
  """Phases keyed by the pmf's `threshold` quantile (options.threshold by default), or by the
  scalar prediction; first fills split where compilation is charged (as the searches start)."""
  threshold = options.threshold if threshold is None else float(threshold)
  key = np.minimum(predicted_length(requests, threshold), requests.room)
  phases = continuous_phases(requests, key, cost, options, refill_fraction=refill_fraction)
  phases = [dataclasses.replace(p, split_first=options.compile_seconds > 0) for p in phases]
  return ContinuousPlan(phases, "continuous",
                        threshold if requests.length_pmf is not None else None,
                        notes={"refill_fraction": float(refill_fraction)})


def _phases_key(phases: list[Phase], blocks: bool = False) -> tuple:
  return tuple((p.cache_len, p.slots, p.members.tobytes()) + ((p.block,) if blocks else ())
               for p in phases)


def _search(candidates, evaluate, strategy: str, split: bool = True) -> ContinuousPlan:
  """The candidate plan of least `evaluate(plan)`, first fills split or not (`split`).
  candidates: (phases, refill fraction, threshold, notes); the table row of each is (notes'
  first value, fraction, min_phase_factor, seconds, key cap). Identical phase lists (many
  thresholds give the same phases) are evaluated once."""
  best, table, seen = None, [], {}
  for phases, fraction, threshold, notes in candidates:
    plan = ContinuousPlan(_with_refill(phases, fraction, split), strategy, threshold,
                          notes={"refill_fraction": float(fraction), **notes})
    key = (_phases_key(phases, blocks=True), fraction)
    if key not in seen:
      seen[key] = evaluate(plan)
    plan.expected_cost = seen[key]
    table.append((next(iter(notes.values())), float(fraction), notes["min_phase_factor"],
                  plan.expected_cost, notes.get("key_cap")))
    if best is None or plan.expected_cost < best.expected_cost:
      best = plan
  best.notes["search"] = table
  return best


def _search_refill(best: ContinuousPlan, evaluate, first: float, refill_fractions,
                   requests: Requests, cost: CostModel, strategy: str) -> ContinuousPlan:
  """`best` (searched at refill fraction `first`) with the refill fraction, and one context
  block per phase or not (`with_blocks`; notes: one_block), of least `evaluate`: with
  compilations charged, fewer insert programs may let a smaller refill win. The search table
  gains a row per candidate after the first."""
  notes = {k: best.notes[k] for k in ("threshold", "min_phase_factor", "key_cap")}
  blocked = with_blocks(best.phases, requests, cost)
  variants = [(best.phases, False)] + ([(blocked, True)] if _phases_key(blocked, True) !=
                                       _phases_key(best.phases, True) else [])
  candidates = [(phases, f, best.threshold, dict(notes, one_block=one))
                for phases, one in variants for f in refill_fractions]
  candidates.sort(key=lambda c: (c[1] != first) or c[3]["one_block"])  # `best` itself first
  refined = _search(candidates, evaluate, strategy, best.phases[0].split_first)
  refined.notes["search"] = best.notes["search"] + refined.notes["search"][1:]
  return refined


def plan_continuous_search(requests: Requests, cost: CostModel, options: Options,
                           rng_seed: int = 0, draws: int = 2,
                           thresholds=CONTINUOUS_SEARCH_THRESHOLDS,
                           refill_fractions=REFILL_FRACTIONS,
                           phase_factors=PHASE_FACTORS,
                           key_caps=SEARCH_KEY_CAPS,
                           drain_fractions=DRAIN_FRACTIONS,
                           last_refill_fractions=LAST_REFILL_FRACTIONS,
                           split_first=(True, False)) -> ContinuousPlan:
  """The probabilistic planner: the threshold, key cap, refill fraction and min_phase_factor
  whose plan has the least expected time, estimated by simulating each candidate on the same
  `draws` sets of lengths sampled from the predicted pmfs (seed `rng_seed`; common random
  numbers); the refill fraction is chosen last, for the best phases. A key cap K admits a
  request whose quantile is longer than K to a short, wide cache first (it carries on to a
  longer one), as the oracle may; one more candidate gives every request its whole room (no
  row carried on: the fewest programs, which wins where options.compile_seconds outweighs the
  decode time shorter caches save). Then, for the best phases, the refill size and one block
  per phase or not (`_search_refill`), the admission order (`_search_order`), the drain
  (`with_drain`), the refill of the whole-room phase where capped rows end
  (`with_last_refill`) and last the first fills, split or not (`split_first`). notes: search =
  [(threshold, refill fraction, min_phase_factor, expected seconds, key cap)], then an
  ("order", name, ...) row per order, a ("drain", fraction, ...) row per drain, a
  ("last_refill", fraction, ...) row per last refill tried and a ("split_first", False, ...)
  row."""
  if requests.length_pmf is None:
    raise ValueError("continuous-search needs predicted pmfs")
  samples = sample_lengths(requests.pmf_within_room(), np.random.default_rng(rng_seed), draws)

  first = DEFAULT_REFILL_FRACTION if DEFAULT_REFILL_FRACTION in refill_fractions else (
      refill_fractions[0])

  def candidates():
    # Phases (threshold x key cap x merging) at one refill size, then the refill size for the
    # best phases: the refill size hardly changes which phases win, and this is 4x fewer runs.
    for t in thresholds:
      quantile = np.minimum(predicted_length(requests, float(t)), requests.room)
      for key_cap in key_caps:
        if key_cap is not None and key_cap >= int(quantile.max()):
          continue
        key = quantile if key_cap is None else np.minimum(quantile, int(key_cap))
        for factor in phase_factors:
          phases = continuous_phases(requests, key, cost, options, min_phase_factor=factor)
          yield phases, first, float(t), {"threshold": float(t),
                                          "min_phase_factor": float(factor), "key_cap": key_cap}
    # every request's whole room (nothing carried on, the fewest programs to compile)
    yield (continuous_phases(requests, requests.room, cost, options, slack=0), first, 1.0,
           {"threshold": 1.0, "min_phase_factor": MIN_PHASE_FACTOR, "key_cap": None})

  def evaluate(plan):
    return expected_seconds(plan, requests, samples, cost, options)

  # first fills split where compilation is charged (the job), else one insert (the steady
  # state); the other tried last
  best = _search(candidates(), evaluate, "continuous-search", options.compile_seconds > 0)
  best = _search_refill(best, evaluate, first, refill_fractions, requests, cost,
                        "continuous-search")
  best = _search_order(best, evaluate, requests)
  best = _search_drain(best, evaluate, drain_fractions)
  best = _search_last_refill(best, evaluate, requests, cost, options, last_refill_fractions)
  best = _search_first_fill(best, evaluate, split_first)
  best.notes.update(draws=int(draws), rng_seed=int(rng_seed))
  return best


def plan_continuous_oracle(requests: Requests, cost: CostModel, options: Options,
                           refill_fractions=REFILL_FRACTIONS, phase_factors=PHASE_FACTORS,
                           key_caps=(None,) + CAP_GRID,
                           drain_fractions=DRAIN_FRACTIONS,
                           last_refill_fractions=LAST_REFILL_FRACTIONS,
                           split_first=(True, False)) -> ContinuousPlan:
  """Phases keyed by the true lengths (no slack), or by min(true length, K) for a key cap K
  (a cascade: a row longer than K starts in a short, wide cache and carries on, as a static
  plan's recovery does); the key cap, refill fraction and min_phase_factor with the least
  simulated time on the true lengths (then the drain, the last phase's refill and the first
  fills, as continuous-search does). With K = None nothing is capped. notes: search = [(key
  cap, refill fraction, min_phase_factor, seconds, key cap)], then a ("drain", fraction, ...)
  row per drain, a ("last_refill", fraction, ...) row per last refill tried and a
  ("split_first", False, ...) row."""
  if requests.true_length is None:
    raise ValueError("continuous-oracle needs the true lengths")
  true = np.minimum(np.asarray(requests.true_length, np.int64), requests.room)
  caps = [k for k in key_caps if k is None or k < int(true.max())]

  def candidates():
    for key_cap in caps:
      key = true if key_cap is None else np.minimum(true, int(key_cap))
      for factor in phase_factors:
        phases = continuous_phases(requests, key, cost, options, slack=0, min_phase_factor=factor)
        for fraction in refill_fractions:
          yield phases, fraction, None, {"key_cap": key_cap, "min_phase_factor": float(factor)}

  def evaluate(plan):
    return simulate_continuous(plan, requests, true, cost, options).seconds

  best = _search_drain(_search(candidates(), evaluate, "continuous-oracle",
                               options.compile_seconds > 0), evaluate,
                       drain_fractions)
  return _search_first_fill(_search_last_refill(best, evaluate, requests, cost, options,
                                                last_refill_fractions), evaluate, split_first)


def plan_continuous_vanilla(requests: Requests, cost: CostModel, options: Options,
                            refill_fraction: float = DEFAULT_REFILL_FRACTION) -> ContinuousPlan:
  """No prediction: dataset order, one phase whose cache holds every request's whole room
  (nothing is capped), slots from the KV budget (no more than the bucket holding every
  request), its first fill split or not by its cost (`first_fill_by_cost`)."""
  cache_len = int(slot_cache_len(requests.prompt_len, requests.room, cost).max())
  slots = slots_for(cache_len, cost, options, rows=requests.n)
  phase = first_fill_by_cost(Phase(np.arange(requests.n), cache_len, slots,
                                   refill_for(slots, refill_fraction)), requests, cost, options)
  return ContinuousPlan([phase], "continuous-vanilla",
                        notes={"refill_fraction": float(refill_fraction)})


CONTINUOUS_PLANNERS: dict[str, Callable[..., ContinuousPlan]] = {
    "continuous": plan_continuous,
    "continuous-search": plan_continuous_search,
    "continuous-oracle": plan_continuous_oracle,
    "continuous-vanilla": plan_continuous_vanilla,
}


def make_continuous_plan(name: str, requests: Requests, cost: CostModel,
                         options: Options | None = None) -> ContinuousPlan:
  """The plan of the continuous planner called `name` (see CONTINUOUS_PLANNERS); checks that
  every request is in exactly one phase and every phase fits the KV budget."""
  if name not in CONTINUOUS_PLANNERS:
    raise ValueError(f"unknown continuous planner {name!r}; continuous planners: "
                     f"{sorted(CONTINUOUS_PLANNERS)}")
  options = options or Options()
  plan = CONTINUOUS_PLANNERS[name](requests, cost, options)
  seen = np.bincount(plan.members(), minlength=requests.n) if plan.phases else np.zeros(
      requests.n, np.int64)
  if seen.size != requests.n or not (seen == 1).all():
    raise ValueError(f"planner {name!r} lost or repeated a request")
  for p in plan.phases:
    if p.slots * p.cache_len > options.kv_budget_tokens or p.slots > options.max_batch:
      raise ValueError(f"planner {name!r}: a phase of {p.slots} x {p.cache_len} tokens exceeds "
                       f"kv_budget_tokens={options.kv_budget_tokens} or max_batch")
  return plan
