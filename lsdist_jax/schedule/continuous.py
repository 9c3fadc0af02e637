"""Continuous (slot-refill) plans: phases of `slots` rows decoding together over a KV cache of
`cache_len` tokens per row, each finished row's slot refilled with the phase's next queued
request; the planners that build them (the length predictor decides which phase, i.e. which cache
length, a request is admitted to); and an exact replay of the runner's rules under the cost
model, so planners can be searched on expected time and strategies simulated without a GPU.
numpy only.

The runner's rules (`simulate_continuous` follows them exactly):

* A plan is an ordered list of phases; phase k has `members` (request ids in admission order),
  `cache_len` S, `slots` B and `refill` m (clamped to 1..B).
* A request of prompt p that generated g tokens in earlier phases has context c = p + g. It fits
  a slot only if c < S; there it may generate at most cap = min(S - c, max_seq_len - c) tokens.
* The phase's queue is the rows carried from the previous phase followed by its members. Rows of
  the queue that do not fit (c >= S) are taken out at the start and carried on to the next phase
  (ahead of the rows this phase caps), in queue order.
* One insert call fills min(B, len(queue)) slots (ascending slot index, queue order); then
  decode. A row with r tokens still to generate occupies its slot for min(r, cap) decode steps
  and is then done: finished if r <= cap, else capped (it generated exactly cap tokens here).
  One decode call runs steps until at least m slots are free (done or empty) while the queue is
  non-empty, or until every slot is done once the queue is empty. A call that would run no step
  (rows already done at their insert: r = 0) is not made. Then the done rows leave; if the queue
  is non-empty, one insert call fills min(free, len(queue)) free slots (ascending slot index) with
  the next queued requests; and so on until the queue is empty and every slot is done.
* A phase with drain d >= 1 ends early: once its queue is empty, its last decode call runs only
  until at most d slots are still running (no step if that holds already). The rows still
  running then leave with the tokens they generated (j + 1 after j decode steps in the slot:
  the insert sampled the first), as their slots' tail would run at low occupancy, and are
  carried on like capped rows, in slot order with the rows capped at that call. d = 0: the
  phase runs until every slot is done.
* Rows capped in a phase are carried to the front of the next phase's queue in the order they
  left: by the decode call after which they left, then by slot index. If the last phase leaves
  rows, the runner appends `final_phase(...)` (a cache that holds every row's whole room, so
  nothing is capped) with those rows as its queue; at most 16 such extra phases.
* Seconds: each insert call of k rows whose longest context is c_max costs batch_overhead +
  prefill_time(k, insert_block(c_max)) (the engine pads the block to prompt_bucket x 2^i);
  each decode call costs batch_overhead + steps * step_time(B, S) plus the live-token cost: at
  its j-th decode step in a slot a row reads c + j cache tokens.
* Computed tokens: padded_batch(B) per decode step, plus padded_batch(k) per insert call (the
  token the prefill samples). Generated tokens: the true lengths, each clipped to its room.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lsdist_jax.schedule import dist
from lsdist_jax.schedule.cost import CostModel
from lsdist_jax.schedule.planners import CAP_GRID, SEARCH_THRESHOLDS, predicted_length
from lsdist_jax.schedule.types import Options, Requests
from lsdist_jax.schedule.simulate import SimResult
from lsdist_jax.shapes import context_block, round_up_array

REFILL_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)  # refill m = this fraction of the slots
DEFAULT_REFILL_FRACTION = 1 / 8
# The search's thresholds: every 0.05 of the planners' grid (0.10 ... 0.95) and 0.99.
CONTINUOUS_SEARCH_THRESHOLDS = tuple(float(t) for t in SEARCH_THRESHOLDS
                                     if round(t * 100) % 5 == 0 or t >= 0.99)
MIN_PHASE_FACTOR = 2.0  # a phase with fewer members than this x its slots merges into the next
PHASE_FACTORS = (1.0, 2.0, 4.0, 8.0)  # the min_phase_factor values the searches try
MAX_EXTRA_PHASES = 16
SEARCH_KEY_CAPS = (None, 128, 256, 512)  # the key caps continuous-search tries
# Drains the searches try, as fractions of each phase's slots (every phase but the last): a
# phase whose queue is empty ends once at most this many rows still run, and they carry on.
DRAIN_FRACTIONS = (0.0, 1 / 8, 1 / 4)


@dataclass
class Phase:
  members: np.ndarray  # request ids, in admission order
  cache_len: int  # S: KV-cache tokens per slot
  slots: int  # B: rows decoding together
  refill: int  # m: a decode call ends once m slots are free (while the queue is non-empty)
  drain: int = 0  # d: once the queue is empty, the phase ends when at most d rows still run

  def __post_init__(self):
    self.members = np.asarray(self.members, np.int64).reshape(-1)
    self.cache_len, self.slots, self.refill = int(self.cache_len), int(self.slots), int(self.refill)
    self.drain = int(self.drain)
    if self.slots < 1 or self.refill < 1 or self.cache_len < 1:
      raise ValueError(f"a phase needs cache_len, slots and refill >= 1, got {self.cache_len}, "
                       f"{self.slots}, {self.refill}")
    if not 0 <= self.drain < self.slots:
      raise ValueError(f"a phase's drain must be in 0..slots-1, got {self.drain} of "
                       f"{self.slots} slots")


@dataclass
class ContinuousPlan:
  phases: list[Phase]
  strategy: str
  threshold: float | None = None
  expected_cost: float | None = None  # seconds (simulated: mean over sampled or true lengths)
  notes: dict = field(default_factory=dict)

  def members(self) -> np.ndarray:
    return (np.concatenate([p.members for p in self.phases]) if self.phases
            else np.zeros(0, np.int64))


@dataclass
class ContinuousSimResult(SimResult):
  """SimResult of a continuous plan. `batches`: phases run, the extra final ones included;
  `recovery_batches`: the extra final phases the runner appended (rows left by the last planned
  phase). The rest counts calls and the rows carried from phase to phase."""
  insert_calls: int = 0
  decode_calls: int = 0
  decode_steps: int = 0
  carried_rows: int = 0  # row carries (a row carried twice counts twice)
  phase_seconds: list = field(default_factory=list)


# ----------------------------------------------------------------------------- shapes


def slots_for(cache_len: int, cost: CostModel, options: Options, rows: int | None = None) -> int:
  """Slots of a phase of `cache_len` tokens: the largest batch size the engine runs (a batch
  bucket, or beyond the largest a multiple of it, as `batch_bucket` pads) <= min(max_batch,
  kv_budget_tokens // cache_len) (that limit itself where no bucket is that small); with `rows`,
  no more than the size that holds `rows`."""
  limit = min(int(options.max_batch), int(options.kv_budget_tokens) // int(cache_len))
  if limit < 1:
    raise ValueError(f"one row of a {int(cache_len)}-token KV cache exceeds "
                     f"kv_budget_tokens={options.kv_budget_tokens}")
  largest = max(int(b) for b in cost.batch_buckets)
  fitting = [int(b) for b in cost.batch_buckets if b <= limit]
  slots = (limit // largest) * largest if limit >= largest else (
      max(fitting) if fitting else limit)
  if rows is not None:
    slots = min(slots, int(cost.padded_batch(max(int(rows), 1))))
  return int(slots)


def refill_for(slots: int, fraction: float) -> int:
  return int(max(1, min(slots, round(fraction * slots))))


def slot_cache_len(contexts, tokens, cost: CostModel):
  """The smallest cache length (a multiple of cost.cache_bucket) in which a row of context c can
  generate `tokens` (>= 1) more: c + tokens <= S (so also c < S). Elementwise."""
  need = np.asarray(contexts, np.int64) + np.maximum(np.asarray(tokens, np.int64), 1)
  return round_up_array(need, int(cost.cache_bucket))


def insert_block(contexts, cache_len: int, cost: CostModel) -> np.ndarray:
  """The context block an insert call prefills (as `SlotBatch.insert` pads it): the prompt
  block of the longest context, rounded up to prompt_bucket x 2^i where that fits the cache
  (fewer programs to compile). Elementwise over insert calls' longest contexts."""
  block = np.asarray(cost.prompt_block(np.asarray(contexts, np.int64)), np.int64)
  return np.asarray(context_block(block, int(cost.prompt_bucket), int(cache_len)), np.int64)


def final_phase(contexts: np.ndarray, rooms: np.ndarray, cost: CostModel,
                options: Options) -> Phase:
  """The phase the runner appends for the rows the last phase left (contexts c, rooms
  max_seq_len - c): a cache that holds every row's whole room, S = max slot_cache_len(c, room)
  (nothing can be capped), as many slots as the KV budget allows (at most max_batch, and no
  more than the batch bucket that holds these rows), refill max(1, slots // 8). Its `members`
  is empty: the rows come as its carried queue."""
  contexts = np.asarray(contexts, np.int64).reshape(-1)
  rooms = np.asarray(rooms, np.int64).reshape(-1)
  if contexts.size == 0:
    raise ValueError("final_phase needs at least one row")
  cache_len = int(slot_cache_len(contexts, rooms, cost).max())
  slots = slots_for(cache_len, cost, options, rows=contexts.size)
  return Phase(np.zeros(0, np.int64), cache_len, slots, max(1, slots // 8))


# ----------------------------------------------------------------------------- simulation


class _Tally:
  def __init__(self):
    self.seconds = 0.0
    self.computed = 0
    self.inserts = 0
    self.decodes = 0
    self.steps = 0
    self.carried = 0
    self.phase_seconds: list[float] = []


def _run_phase(phase: Phase, carried: np.ndarray, requests: Requests, true: np.ndarray,
               generated: np.ndarray, cost: CostModel, tally: _Tally) -> np.ndarray:
  """Runs one phase (updates `generated` and `tally`); returns the rows it carries on."""
  cache, slots = phase.cache_len, phase.slots
  refill = max(1, min(phase.refill, slots))
  queue = np.concatenate([np.asarray(carried, np.int64), phase.members])
  ctx = requests.prompt_len[queue] + generated[queue]
  fit = ctx < cache
  unfit = queue[~fit]
  queue, ctx = queue[fit], ctx[fit]
  n = queue.size
  if n == 0:
    tally.phase_seconds.append(0.0)
    return unfit
  cap = np.minimum(cache - ctx, requests.max_seq_len - ctx)
  remaining = true[queue] - generated[queue]
  occ = np.minimum(remaining, cap)  # decode steps each row holds its slot
  capped = remaining > cap
  first = np.zeros(n, np.int64)  # 1: a drained row's token from its insert (beside its steps)

  finish = np.full(slots, -1, np.int64)  # the step at which the slot's row is done; -1: empty
  slot_row = np.full(slots, -1, np.int64)  # queue position held by the slot; -1: empty
  now = pos = 0
  insert_k, insert_ctx, left_capped = [], [], []
  steps = decodes = 0
  while True:
    if pos < n:  # the done rows leave, the free slots take the next queued rows
      free = np.flatnonzero(finish <= now)
      gone = slot_row[free]
      gone = gone[gone >= 0]
      left_capped.append(gone[capped[gone]])
      k = min(free.size, n - pos)
      use, idle = free[:k], free[k:]
      slot_row[use] = np.arange(pos, pos + k)
      finish[use] = now + occ[pos:pos + k]
      slot_row[idle] = -1
      finish[idle] = -1
      insert_k.append(k)
      insert_ctx.append(int(ctx[pos:pos + k].max()))
      pos += k
    if pos < n:  # every slot is occupied: run until the refill-th earliest is done
      until = int(np.partition(finish, refill - 1)[refill - 1])
    elif phase.drain:  # until at most `drain` rows still run
      running = np.sort(finish[finish > now])[::-1]
      until = int(running[phase.drain]) if running.size > phase.drain else now
    else:
      until = int(finish.max())
    run = max(0, until - now)
    if run:
      decodes += 1
      steps += run
      now += run
    if pos >= n:
      held = slot_row >= 0
      # Drained: still running when the phase ends. After j decode steps a row holds j + 1
      # tokens (its insert sampled the first).
      cut = held & (finish > now)
      occ[slot_row[cut]] -= finish[cut] - now
      first[slot_row[cut]] = 1
      capped[slot_row[cut]] = True
      gone = slot_row[held]
      left_capped.append(gone[capped[gone]])
      break

  generated[queue] += occ + first
  occ_f = occ.astype(np.float64)
  live = float((occ_f * ctx + occ_f * (occ_f + 1.0) / 2.0).sum())
  ks = np.asarray(insert_k, np.int64)
  overhead = cost.batch_overhead_ms * 1e-3
  seconds = (overhead * (ks.size + decodes)
             + float(np.sum(cost.prefill_time(ks, insert_block(insert_ctx, cache, cost))))
             + steps * float(cost.step_time(slots, cache)) + float(cost.live_time(live)))
  tally.seconds += seconds
  tally.phase_seconds.append(seconds)
  tally.computed += int(np.sum(cost.padded_batch(ks))) + int(cost.padded_batch(slots)) * steps
  tally.inserts += ks.size
  tally.decodes += decodes
  tally.steps += steps
  return np.concatenate([unfit, queue[np.concatenate(left_capped)]])


def simulate_continuous(plan: ContinuousPlan, requests: Requests, true_length: np.ndarray,
                        cost: CostModel, options: Options | None = None,
                        max_extra_phases: int = MAX_EXTRA_PHASES) -> ContinuousSimResult:
  """Seconds of `plan` run by the runner's rules (module docstring) when request r generates
  true_length[r] tokens (at most its room). `batches` counts the phases run (extra final ones
  included), `recovery_batches` the extra final phases."""
  options = options or Options()
  true = np.minimum(np.asarray(true_length, np.int64), requests.room)
  generated = np.zeros(requests.n, np.int64)
  tally = _Tally()
  carried = np.zeros(0, np.int64)
  phases = list(plan.phases)
  extra = 0
  k = 0
  while k < len(phases) or carried.size:
    if k >= len(phases):
      if extra == max_extra_phases:
        raise RuntimeError(f"{carried.size} requests unfinished after {extra} extra phases")
      ctx = requests.prompt_len[carried] + generated[carried]
      phases.append(final_phase(ctx, requests.max_seq_len - ctx, cost, options))
      extra += 1
    carried = _run_phase(phases[k], carried, requests, true, generated, cost, tally)
    tally.carried += carried.size
    k += 1
  if not np.array_equal(generated, true):
    raise AssertionError("the simulation did not generate every request's true length")
  return ContinuousSimResult(tally.seconds, len(phases), extra, int(true.sum()), tally.computed,
                             tally.inserts, tally.decodes, tally.steps, tally.carried,
                             tally.phase_seconds)


def sample_lengths(pmf: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
  """`draws` lengths per row of `pmf` ([n, M+1]) by inverse CDF -> [draws, n] int. Pass
  requests.pmf_within_room() to keep every length within its request's room."""
  pmf = np.asarray(pmf, np.float64)
  n, bins = pmf.shape
  f = dist.cdf(dist.normalize(pmf))
  # rows offset by 2 each make one increasing array: one searchsorted for every row
  flat = (f + 2.0 * np.arange(n)[:, None]).reshape(-1)
  u = rng.random((draws, n))
  idx = np.searchsorted(flat, u + 2.0 * np.arange(n)[None, :], side="right")
  return np.minimum(idx - bins * np.arange(n)[None, :], bins - 1).astype(np.int64)


def expected_seconds(plan: ContinuousPlan, requests: Requests, samples: np.ndarray,
                     cost: CostModel, options: Options) -> float:
  """Mean simulated seconds of `plan` over the rows of `samples` ([draws, n] lengths)."""
  samples = np.atleast_2d(samples)
  return float(np.mean([simulate_continuous(plan, requests, s, cost, options).seconds
                        for s in samples]))


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


def _with_refill(phases: list[Phase], fraction: float) -> list[Phase]:
  return [dataclasses.replace(p, refill=refill_for(p.slots, fraction)) for p in phases]


def with_drain(phases: list[Phase], fraction: float) -> list[Phase]:
  """Every phase but the last drains at `fraction` of its slots (rounded down); the last runs
  its tail out (what it would carry goes to the runner's final phase)."""
  return [dataclasses.replace(p, drain=min(p.slots - 1, int(fraction * p.slots))
                              if k + 1 < len(phases) else 0)
          for k, p in enumerate(phases)]


def _search_drain(best: ContinuousPlan, evaluate, fractions) -> ContinuousPlan:
  """`best` with the drain fraction (of `fractions`) of least `evaluate`; notes: drain_fraction,
  and the search table gains a row per fraction tried (drain fraction in the key cap's place
  is not mixed up: its notes' first value is "drain")."""
  chosen, table = best, []
  best.notes["drain_fraction"] = 0.0
  for fraction in fractions:
    if fraction == 0.0:
      continue
    plan = dataclasses.replace(best, phases=with_drain(best.phases, fraction),
                               notes=dict(best.notes, drain_fraction=float(fraction)))
    plan.expected_cost = evaluate(plan)
    table.append(("drain", float(fraction), best.notes.get("min_phase_factor"),
                  plan.expected_cost, best.notes.get("key_cap")))
    if plan.expected_cost < chosen.expected_cost:
      chosen = plan
  chosen.notes["search"] = list(best.notes.get("search", [])) + table
  return chosen


# ----------------------------------------------------------------------------- planners


def plan_continuous(requests: Requests, cost: CostModel, options: Options,
                    threshold: float | None = None,
                    refill_fraction: float = DEFAULT_REFILL_FRACTION) -> ContinuousPlan:
  """Phases keyed by the pmf's `threshold` quantile (options.threshold by default), or by the
  scalar prediction."""
  threshold = options.threshold if threshold is None else float(threshold)
  key = np.minimum(predicted_length(requests, threshold), requests.room)
  phases = continuous_phases(requests, key, cost, options, refill_fraction=refill_fraction)
  return ContinuousPlan(phases, "continuous",
                        threshold if requests.length_pmf is not None else None,
                        notes={"refill_fraction": float(refill_fraction)})


def _phases_key(phases: list[Phase]) -> tuple:
  return tuple((p.cache_len, p.slots, p.members.tobytes()) for p in phases)


def _search(candidates, evaluate, strategy: str) -> ContinuousPlan:
  """The candidate plan of least `evaluate(plan)`. candidates: (phases, refill fraction,
  threshold, notes); the table row of each is (notes' first value, fraction, min_phase_factor,
  seconds, key cap). Identical phase lists (many thresholds give the same phases) are evaluated
  once."""
  best, table, seen = None, [], {}
  for phases, fraction, threshold, notes in candidates:
    plan = ContinuousPlan(_with_refill(phases, fraction), strategy, threshold,
                          notes={"refill_fraction": float(fraction), **notes})
    key = (_phases_key(phases), fraction)
    if key not in seen:
      seen[key] = evaluate(plan)
    plan.expected_cost = seen[key]
    table.append((next(iter(notes.values())), float(fraction), notes["min_phase_factor"],
                  plan.expected_cost, notes.get("key_cap")))
    if best is None or plan.expected_cost < best.expected_cost:
      best = plan
  best.notes["search"] = table
  return best


def plan_continuous_search(requests: Requests, cost: CostModel, options: Options,
                           rng_seed: int = 0, draws: int = 2,
                           thresholds=CONTINUOUS_SEARCH_THRESHOLDS,
                           refill_fractions=REFILL_FRACTIONS,
                           phase_factors=PHASE_FACTORS,
                           key_caps=SEARCH_KEY_CAPS,
                           drain_fractions=DRAIN_FRACTIONS) -> ContinuousPlan:
  """The probabilistic planner: the threshold, key cap, refill fraction and min_phase_factor
  whose plan has the least expected time, estimated by simulating each candidate on the same
  `draws` sets of lengths sampled from the predicted pmfs (seed `rng_seed`; common random
  numbers); the refill fraction is chosen last, for the best phases. A key cap K admits a
  request whose quantile is longer than K to a short, wide cache first (it carries on to a
  longer one), as the oracle may. Last, the drain (`with_drain`) for the best plan. notes:
  search = [(threshold, refill fraction, min_phase_factor, expected seconds, key cap)], then a
  ("drain", fraction, ...) row per drain tried."""
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

  def evaluate(plan):
    return expected_seconds(plan, requests, samples, cost, options)

  best = _search(candidates(), evaluate, "continuous-search")
  notes = {k: best.notes[k] for k in ("threshold", "min_phase_factor", "key_cap")}
  others = [(best.phases, f, best.threshold, notes) for f in refill_fractions if f != first]
  if others:
    table = best.notes["search"]
    refined = _search([(best.phases, first, best.threshold, notes)] + others, evaluate,
                      "continuous-search")
    refined.notes["search"] = table + refined.notes["search"][1:]
    best = refined
  best = _search_drain(best, evaluate, drain_fractions)
  best.notes.update(draws=int(draws), rng_seed=int(rng_seed))
  return best


def plan_continuous_oracle(requests: Requests, cost: CostModel, options: Options,
                           refill_fractions=REFILL_FRACTIONS, phase_factors=PHASE_FACTORS,
                           key_caps=(None,) + CAP_GRID,
                           drain_fractions=DRAIN_FRACTIONS) -> ContinuousPlan:
  """Phases keyed by the true lengths (no slack), or by min(true length, K) for a key cap K
  (a cascade: a row longer than K starts in a short, wide cache and carries on, as a static
  plan's recovery does); the key cap, refill fraction and min_phase_factor with the least
  simulated time on the true lengths (then the drain, as continuous-search does). With K = None
  nothing is capped. notes: search = [(key cap, refill fraction, min_phase_factor, seconds,
  key cap)], then a ("drain", fraction, ...) row per drain tried."""
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

  return _search_drain(_search(candidates(), evaluate, "continuous-oracle"), evaluate,
                       drain_fractions)


def plan_continuous_vanilla(requests: Requests, cost: CostModel, options: Options,
                            refill_fraction: float = DEFAULT_REFILL_FRACTION) -> ContinuousPlan:
  """No prediction: dataset order, one phase whose cache holds every request's whole room
  (nothing is capped), slots from the KV budget (no more than the bucket holding every
  request)."""
  cache_len = int(slot_cache_len(requests.prompt_len, requests.room, cost).max())
  slots = slots_for(cache_len, cost, options, rows=requests.n)
  phase = Phase(np.arange(requests.n), cache_len, slots, refill_for(slots, refill_fraction))
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
