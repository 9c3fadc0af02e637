"""Continuous (slot-refill) plans: phases of `slots` rows decoding together over a KV cache of
`cache_len` tokens per row, each finished row's slot refilled with the phase's next queued
request (the length predictor decides which phase, i.e. which cache length, a request is
admitted to; the planners are in `schedule/continuous_search.py`); and an exact replay of the
runner's rules under the cost model, so planners can be searched on expected time and
strategies simulated without a GPU. numpy only.

The runner's rules (`simulate_continuous` follows them exactly):

* A plan is an ordered list of phases; phase k has `members` (request ids in admission order),
  `cache_len` S, `slots` B and `refill` m (clamped to 1..B).
* A request of prompt p that generated g tokens in earlier phases has context c = p + g. It fits
  a slot only if c < S; there it may generate at most cap = min(S - c, max_seq_len - c) tokens.
* The phase's queue is the rows carried from the previous phase followed by its members. Rows of
  the queue that do not fit (c >= S) are taken out at the start and carried on to the next phase
  (ahead of the rows this phase caps), in queue order.
* The first fill takes min(B, len(queue)) rows into slots in ascending slot index, queue
  order: in one insert call when it takes the whole queue or the phase's `split_first` is
  False, else (the phase refills) in insert calls of padded_batch(m) rows each, one after
  another (the refills' program, so that none of all B rows is compiled); then decode. A row
  with r tokens still to generate occupies its slot for min(r, cap) decode steps and is then
  done: finished if r <= cap, else capped (it generated exactly cap tokens here); r - 1 steps
  where r <= cap reaches the request's room (done as it takes its last token: no step samples
  an EOS after it).
  One decode call runs steps until at least m slots are free (done or empty) while the queue is
  non-empty, or until every slot is done once the queue is empty; it is made while any slot is
  held, even where it runs no step (rows done at their insert: r = 0, or enough slots free
  already). Then the done rows leave; if the queue
  is non-empty, one insert call fills min(free, len(queue), padded_batch(m)) free slots
  (ascending slot index) with the next queued requests (after the first fill an insert takes no
  more than a refill's batch bucket: one program per context block; other free slots wait for
  the next refill); and so on until the queue is empty and every slot is done.
* A phase with drain d >= 1 ends early: once its queue is empty, its last decode call runs only
  until at most d slots are still running (no step if that holds already). The rows still
  running then leave with the tokens they generated (j + 1 after j decode steps in the slot:
  the insert sampled the first), as their slots' tail would run at low occupancy, and are
  carried on like capped rows, in slot order with the rows capped at that call. d = 0: the
  phase runs until every slot is done.
* Rows capped in a phase are carried to the front of the next phase's queue in the order they
  left: by the decode call after which they left, then by slot index. If the last phase leaves
  rows, the runner appends `final_phase(...)` (a cache that holds every row's whole room, so
  nothing is capped; its first fill split or not as the phase before it) with those rows as
  its queue; at most 16 such extra phases.
* Seconds: each insert call of k rows whose longest context is c_max costs batch_overhead +
  prefill_time(k', max(insert_block(c_max), block)), k' = max(k, m) for every insert but a
  whole first fill's (the engine runs a refill's program: at least m rows), k' = k for that
  one (the engine pads the block to
  prompt_bucket x 2^i; a phase's `block` > 0 pads every insert to at least that block, so that
  its inserts share one program);
  each decode call costs batch_overhead + steps * step_time(B, S) plus the live-token cost: at
  its j-th decode step in a slot a row reads c + j cache tokens.
* Computed tokens: padded_batch(B) per decode step, plus padded_batch(k') per insert call (the
  token the prefill samples). Generated tokens: the true lengths, each clipped to its room.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from lsdist_jax.schedule import dist
from lsdist_jax.schedule.cost import CostModel
from lsdist_jax.schedule.types import Options, Requests
from lsdist_jax.schedule.simulate import SimResult, ends_at_room
from lsdist_jax.shapes import context_block, round_up_array

MAX_EXTRA_PHASES = 16


@dataclass
class Phase:
  members: np.ndarray  # request ids, in admission order
  cache_len: int  # S: KV-cache tokens per slot
  slots: int  # B: rows decoding together
  refill: int  # m: a decode call ends once m slots are free (while the queue is non-empty)
  drain: int = 0  # d: once the queue is empty, the phase ends when at most d rows still run
  block: int = 0  # every insert prefills at least this context block (0: each its own)
  # where the phase refills, its first fill is made of refill-sized inserts (the refills'
  # programs: none of all its slots' rows to compile); False: one insert of all its first rows
  split_first: bool = True

  def __post_init__(self):
    self.members = np.asarray(self.members, np.int64).reshape(-1)
    self.cache_len, self.slots, self.refill = int(self.cache_len), int(self.slots), int(self.refill)
    self.drain, self.block, self.split_first = int(self.drain), int(self.block), bool(
        self.split_first)
    if not 0 <= self.block <= self.cache_len:
      raise ValueError(f"a phase's block must be in 0..cache_len={self.cache_len}, got "
                       f"{self.block}")
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
  # distinct programs the run compiles (`programs`): each phase's decode loop, an insert per
  # (rows, context block) and a first-token sampler per rows
  programs: int = 0
  program_keys: frozenset = frozenset()  # those programs (`programs`' keys)
  # of `seconds`, the insert calls' (their overhead and prefill; the rest is decode calls'):
  # beside a run's measured split (`runner_split`), it says which side the cost model misses
  insert_seconds: float = 0.0


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
    self.programs: set[tuple] = set()
    self.insert_seconds = 0.0


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
  # 1: a row whose tokens are its steps + 1 (beside its steps, its insert's token): a drained
  # row, and one that reaches its room (done as it takes its last token, no step for an EOS)
  first = ends_at_room(remaining, requests.room[queue] - generated[queue], cap)
  occ -= first

  finish = np.full(slots, -1, np.int64)  # the step at which the slot's row is done; -1: empty
  slot_row = np.full(slots, -1, np.int64)  # queue position held by the slot; -1: empty
  now = pos = 0
  most = slots  # rows an insert takes: the first fill any, later at most a refill's bucket
  bucket = int(cost.padded_batch(refill))
  insert_k, insert_ctx, left = [], [], []  # left: queue positions as their slots free (-1s too)
  steps = decodes = 0
  while True:
    if pos < n:  # the done rows leave, the free slots take the next queued rows
      free = np.flatnonzero(finish <= now)
      left.append(slot_row[free])
      k = min(free.size, n - pos, most)
      # a first fill is one insert when it takes every queued row, else (the phase refills)
      # inserts of a refill's bucket each, the refills' programs (no decode between them)
      if most == slots:  # the first fill
        whole_first = pos + k >= n or not phase.split_first
      whole = most == slots and whole_first
      step = k if whole else bucket
      pad = 0 if whole else refill  # the runner's min_rows: a refill runs at least m rows
      most = bucket
      use, idle = free[:k], free[k:]
      slot_row[use] = np.arange(pos, pos + k)
      finish[use] = now + occ[pos:pos + k]
      if idle.size:
        slot_row[idle] = -1
        finish[idle] = -1
      for c in range(pos, pos + k, max(step, 1)):
        insert_k.append(max(min(step, pos + k - c), pad))
        insert_ctx.append(int(ctx[c:min(c + step, pos + k)].max()))
      pos += k
    if pos < n:  # every slot is occupied: run until the refill-th earliest is done
      until = int(np.partition(finish, refill - 1)[refill - 1])
    elif phase.drain:  # until at most `drain` rows still run
      running = np.sort(finish[finish > now])[::-1]
      until = int(running[phase.drain]) if running.size > phase.drain else now
    else:
      until = int(finish.max())
    run = max(0, until - now)
    # the runner calls decode while a slot is held (a row running means one is), 0 steps too;
    # with rows still queued every slot is (or a refill's rows just went in)
    if pos < n or (slot_row >= 0).any():
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
      left.append(slot_row[held])
      break

  generated[queue] += occ + first
  occ_f = occ.astype(np.float64)
  live = float((occ_f * ctx + occ_f * (occ_f + 1.0) / 2.0).sum())
  ks = np.asarray(insert_k, np.int64)
  blocks = np.maximum(insert_block(insert_ctx, cache, cost), phase.block)
  overhead = cost.batch_overhead_ms * 1e-3
  inserting = float(np.sum(cost.prefill_call_time(ks, blocks)))
  seconds = (inserting + overhead * decodes + steps * float(cost.step_time(slots, cache))
             + float(cost.live_time(live)))
  tally.seconds += seconds
  tally.insert_seconds += inserting
  tally.phase_seconds.append(seconds)
  tally.computed += int(np.sum(cost.padded_batch(ks))) + int(cost.padded_batch(slots)) * steps
  tally.inserts += ks.size
  tally.decodes += decodes
  tally.steps += steps
  tally.programs |= programs(slots, cache, ks, blocks, refill, cost, decodes > 0, whole_first)
  left = np.concatenate(left)
  left = left[left >= 0]
  return np.concatenate([unfit, queue[left[capped[left]]]])


def programs(slots: int, cache: int, ks, blocks, refill: int, cost: CostModel,
             decoded: bool = True, whole_first: bool = True) -> set[tuple]:
  """The programs a phase of `slots` x `cache` compiles for insert calls of ks rows at context
  blocks `blocks` (the runner's rule: every insert after the first fill padded to at least
  `refill` rows; the first fill one insert at its own rows bucket where `whole_first`, else
  refill-sized inserts like the rest): its decode loop, an insert per (rows, block), a
  first-token sampler per rows."""
  ks = np.asarray(ks, np.int64).reshape(-1)
  least = np.full(ks.size, int(refill), np.int64)
  least[:1] = 1 if whole_first else int(refill)
  rows = np.asarray(cost.padded_batch(np.maximum(ks, least)), np.int64).reshape(-1).tolist()
  blocks = np.broadcast_to(np.asarray(blocks, np.int64), ks.shape).tolist()
  out = {("insert", slots, cache, r, b) for r, b in zip(rows, blocks)}
  out |= {("first", slots, cache, r) for r in rows}
  return out | ({("decode", slots, cache)} if decoded else set())


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
      phases.append(dataclasses.replace(final_phase(ctx, requests.max_seq_len - ctx, cost,
                                                    options), split_first=phases[-1].split_first))
      extra += 1
    carried = _run_phase(phases[k], carried, requests, true, generated, cost, tally)
    tally.carried += carried.size
    k += 1
  if not np.array_equal(generated, true):
    raise AssertionError("the simulation did not generate every request's true length")
  return ContinuousSimResult(tally.seconds, len(phases), extra, int(true.sum()), tally.computed,
                             tally.inserts, tally.decodes, tally.steps, tally.carried,
                             tally.phase_seconds, len(tally.programs),
                             frozenset(tally.programs), tally.insert_seconds)


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
  """Mean simulated seconds of `plan` over the rows of `samples` ([draws, n] lengths), with
  options.compile_seconds for each distinct program the run compiles (none for those in
  options.compiled: compiled or compiling already)."""
  samples = np.atleast_2d(samples)
  runs = [simulate_continuous(plan, requests, s, cost, options) for s in samples]
  return float(np.mean([r.seconds + options.compile_seconds
                        * len(r.program_keys - options.compiled) for r in runs]))
