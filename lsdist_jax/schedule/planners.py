"""Planners: per-request length pmfs (or scalars) + prompt lengths + a cost model -> a plan of
ordered batches, each with its members and its cap on generated tokens. numpy only.

`make_plan(name, requests, cost, options)` selects one by name: vanilla, sorted, ssch, vbs,
search (the paper's threshold search, on expected time), optimal (dynamic programming over batch
boundaries and caps), oracle (true lengths). `plan_recovery` plans the rows that hit their cap.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from lsdist_jax.schedule import dist
from lsdist_jax.schedule.cost import CostModel
from lsdist_jax.schedule.types import Batch, Options, Plan, Requests
from lsdist_jax.shapes import Buckets

SSCH_TABLE = ((200, 256), (400, 128), (600, 64), (800, 32))  # total length <= k -> batch size
SSCH_LAST = 16
SEARCH_THRESHOLDS = np.round(np.arange(0.10, 0.995, 0.01), 2)  # 0.10 ... 0.99 (90 values)
RECOVERY_MIN_CAP = 32
CAP_GRID = (8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768,
            896, 1024, 1280, 1536, 2048)


# ----------------------------------------------------------------------------- expected cost


class _Prepared:
  """Per-request arrays the cost needs, computed once per request set (pmfs within room)."""

  def __init__(self, requests: Requests, cost: CostModel, options: Options):
    self.pmf = requests.pmf_within_room()
    self.bins = self.pmf.shape[1]
    self.log_f = dist.log_cdf(self.pmf)
    surv = dist.survival(self.pmf)
    self.surv = surv
    zero = np.zeros((surv.shape[0], 1))
    self.csum = np.concatenate([zero, np.cumsum(surv, axis=1)], axis=1)
    t = np.arange(self.bins, dtype=np.float64)
    self.tcsum = np.concatenate([zero, np.cumsum(t * surv, axis=1)], axis=1)
    self.prompt = requests.prompt_len
    self.token_cost = _recovery_token_cost(requests, cost, options)
    self.recovery_rows = _recovery_rows(requests, cost, options)
    self.cost = cost

  def reprefill_time(self, context):
    """Seconds a recovered row adds to its recovery batch's prefill (its prompt + the tokens
    generated before the cap, run again); the call's fixed cost is shared by the batch."""
    e, f = self.cost.prefill
    return (f * np.asarray(context) + e / self.recovery_rows) * 1e-3

  def live_work(self, rows: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Expected cache tokens request r reads over the steps it runs in a batch capped at c:
    step i (1..min(L, c)) reads its prompt + i tokens, so E = sum_{i<=c} P(L >= i) (p + i).
    rows: [n], caps: broadcastable to [n, k] -> [n, k]."""
    rows = np.asarray(rows)
    caps = np.minimum(np.asarray(caps), self.bins)
    at = np.broadcast_to(caps, (rows.size,) + np.shape(caps)[-1:])  # [n, k] column per cap
    reach = np.take_along_axis(self.csum[rows], at, 1)  # sum_{t<c} P(L > t)
    moment = np.take_along_axis(self.tcsum[rows], at, 1)  # sum_{t<c} t P(L > t)
    return self.prompt[rows][:, None] * reach + moment + reach

  def batch_cost(self, members: np.ndarray, cap: int) -> float:
    """Expected seconds of one batch: its run to min(max length, cap) steps, plus the recovery
    work of members beyond the cap (their remaining tokens and a re-prefill)."""
    cap = int(min(cap, self.bins))
    f_max = np.exp(self.log_f[members, :cap].sum(axis=0))
    steps = float(np.sum(1.0 - f_max))
    prompt = self.prompt[members]
    live = float(self.live_work(members, np.array([cap])).sum()) if self.cost.live_coef else 0.0
    own = float(self.cost.batch_time(len(members), int(prompt.max()), cap, steps, live))
    tail = float((self.csum[members, -1] - self.csum[members, cap]).sum())
    failed = self.surv[members, cap] if cap < self.bins - 1 else np.zeros(len(members))
    reprefill = float((failed * self.reprefill_time(prompt + cap)).sum())
    return own + tail * self.token_cost + reprefill


def _recovery_rows(requests: Requests, cost: CostModel, options: Options) -> int:
  """Rows of a recovery batch: the long tail at the full cache length, as many as the KV budget
  (and max_batch) allow."""
  full = int(requests.max_seq_len)
  return max(1, min(options.max_batch, options.kv_budget_tokens // int(cost.cache_len(0, full))))


def _recovery_token_cost(requests: Requests, cost: CostModel, options: Options) -> float:
  """Seconds per token generated in recovery (recovery batches of `_recovery_rows` at the full
  cache length); a recovered row has already generated past its cap, so its live cache is
  taken as 3/4 of the full length."""
  full = int(requests.max_seq_len)
  rows = _recovery_rows(requests, cost, options)
  return float(cost.step_time(rows, cost.cache_len(0, full), rows * 0.75 * full) / rows)


def _with_known_lengths(requests: Requests) -> Requests:
  if requests.length_pmf is not None:
    return requests
  if requests.true_length is None:
    raise ValueError("expected_cost needs length pmfs or true lengths")
  return dataclasses.replace(requests, length_pmf=dist.point_masses(
      np.minimum(requests.true_length, requests.room), requests.max_seq_len))


def expected_cost(plan: Plan, requests: Requests, cost: CostModel,
                  options: Options | None = None, prepared: _Prepared | None = None) -> float:
  """Expected seconds of a plan under the requests' pmfs (or true lengths when no pmf)."""
  options = options or Options()
  prepared = prepared or _Prepared(_with_known_lengths(requests), cost, options)
  return float(sum(prepared.batch_cost(b.members, b.cap) for b in plan.batches))


# ----------------------------------------------------------------------------- builders


def fits(cost: CostModel, options: Options, size: int, max_prompt: int, cap: int) -> bool:
  return (size <= options.max_batch
          and int(cost.kv_tokens(size, max_prompt, cap)) <= options.kv_budget_tokens)


class _Shapes:
  """The cost model's padded shapes with python ints, for tight python loops."""

  def __init__(self, cost: CostModel, max_batch: int):
    self.padded = cost.padded_batch(np.arange(max_batch + 2)).tolist()
    self.buckets = Buckets(tuple(cost.batch_buckets), cost.prompt_bucket, cost.cache_bucket)

  def kv(self, size: int, max_prompt: int, cap: int) -> int:
    return self.padded[size] * self.buckets.cache_len(max_prompt, cap)


def budget_batches(order: np.ndarray, key_len: np.ndarray, requests: Requests, cost: CostModel,
                   options: Options, fcr: bool) -> list[Batch]:
  """Consecutive requests of `order` into batches as large as the KV budget and max_batch allow,
  each capped at its longest predicted length (+ slack) with FCR, or at the room without."""
  room = requests.room.tolist()
  keys = np.asarray(key_len).tolist()
  prompts = requests.prompt_len.tolist()
  shapes = _Shapes(cost, options.max_batch)
  slack, budget, max_batch = options.fcr_slack, options.kv_budget_tokens, options.max_batch

  def cap_of(max_key, max_room):
    return max(1, min(max_key + slack, max_room)) if fcr else max_room

  batches, current = [], []
  max_key = max_room = max_prompt = 0
  for r in order.tolist():
    k2, room2, p2 = max(max_key, keys[r]), max(max_room, room[r]), max(max_prompt, prompts[r])
    size = len(current) + 1
    if current and (size > max_batch or shapes.kv(size, p2, cap_of(k2, room2)) > budget):
      batches.append(Batch(np.asarray(current), cap_of(max_key, max_room)))
      current, k2, room2, p2 = [], keys[r], room[r], prompts[r]
    current.append(r)
    max_key, max_room, max_prompt = k2, room2, p2
  if current:
    batches.append(Batch(np.asarray(current), cap_of(max_key, max_room)))
  for b in batches:
    if len(b.members) == 1 and shapes.kv(1, int(requests.prompt_len[b.members[0]]),
                                         b.cap) > budget:
      raise ValueError(f"a single request (prompt {int(requests.prompt_len[b.members[0]])} "
                       f"tokens, cap {b.cap}) exceeds kv_budget_tokens={budget}")
  return batches


def _fixed_batches(order: np.ndarray, size: int, requests: Requests) -> list[Batch]:
  room = requests.room
  return [Batch(order[i:i + size], int(room[order[i:i + size]].max()))
          for i in range(0, len(order), size)]


def _fixed_batches_within_budget(order, requests, cost, options) -> list[Batch]:
  """Fixed-size batches of `order`, uncapped; one that would exceed the KV budget at full
  length is split (every strategy runs under the same memory)."""
  batches = []
  for b in _fixed_batches(order, options.fixed_batch, requests):
    batches.extend(_split_to_budget(b.members, b.cap, requests, cost, options))
  return batches


def predicted_length(requests: Requests, threshold: float) -> np.ndarray:
  """The length a planner sorts by: the pmf's threshold quantile, else the scalar prediction."""
  if requests.length_pmf is not None:
    return dist.quantile_of_cdf(requests.length_cdf(), threshold)
  if requests.scalar_length is not None:
    return np.rint(np.asarray(requests.scalar_length)).astype(np.int64)
  raise ValueError("this planner needs predicted pmfs or scalar lengths")


# ----------------------------------------------------------------------------- planners


def plan_vanilla(requests, cost, options) -> Plan:
  """Dataset order, fixed batch size, no cap below max_seq_len (a batch that would exceed the KV
  budget at full length is split: every strategy runs under the same memory)."""
  return Plan(_fixed_batches_within_budget(np.arange(requests.n), requests, cost, options),
              "vanilla")


def plan_sorted(requests, cost, options) -> Plan:
  key = predicted_length(requests, options.threshold)
  order = np.argsort(key, kind="stable")
  return Plan(_fixed_batches_within_budget(order, requests, cost, options), "sorted",
              options.threshold)


def plan_ssch(requests, cost, options) -> Plan:
  """Sequence Scheduling: sort by predicted length; buckets of `cell` tokens of total length
  (prompt + response); batch size from the bucket's table entry; a bucket's short last batch moves
  to the next bucket; with FCR the cap is the bucket length (+ slack) minus the prompt. Batches
  are also split to respect the KV budget (every strategy runs under the same memory)."""
  pred = predicted_length(requests, options.threshold)
  total = np.maximum(requests.prompt_len + pred, requests.prompt_len + 1)
  cell = options.ssch_cell
  bucket = np.maximum(cell, np.ceil(total / cell).astype(np.int64) * cell)
  order = np.lexsort((total, bucket))
  batches, carry = [], np.zeros(0, np.int64)
  buckets = np.unique(bucket)
  for k, b in enumerate(buckets):
    members = np.concatenate([carry, order[bucket[order] == b]])
    size = next((bs for limit, bs in SSCH_TABLE if b <= limit), SSCH_LAST)
    chunks = [members[i:i + size] for i in range(0, len(members), size)]
    carry = np.zeros(0, np.int64)
    if len(chunks) and len(chunks[-1]) < max(size // 2, 16) and k + 1 < len(buckets):
      carry = chunks.pop()
    for chunk in chunks:
      room = requests.room[chunk]
      cap = (int(max(1, min(b + options.fcr_slack - requests.prompt_len[chunk].max(),
                             room.max()))) if options.fcr else int(room.max()))
      batches.extend(_split_to_budget(chunk, cap, requests, cost, options))
  return Plan(batches, "ssch", options.threshold)


def _split_to_budget(members, cap, requests, cost, options) -> list[Batch]:
  out, i = [], 0
  while i < len(members):
    size = len(members) - i
    while size > 1 and not fits(cost, options, size, int(requests.prompt_len[members[i:i + size]]
                                                         .max()), cap):
      size -= 1
    out.append(Batch(members[i:i + size], cap))
    i += size
  return out


def plan_vbs(requests, cost, options, threshold=None) -> Plan:
  """Sort by the threshold quantile; batch sizes from the KV budget; FCR caps (if on)."""
  threshold = options.threshold if threshold is None else threshold
  key = np.minimum(predicted_length(requests, threshold), requests.room)
  order = np.lexsort((requests.prompt_len, key))
  batches = budget_batches(order, key, requests, cost, options, options.fcr)
  return Plan(batches, "vbs", threshold)


def plan_search(requests, cost, options) -> Plan:
  """The probabilistic planner: the threshold (0.10 ... 0.99) whose VBS + FCR plan has the
  least expected time under the predicted pmfs."""
  if requests.length_pmf is None:
    raise ValueError("search needs predicted pmfs")
  best, table = None, []
  prepared = _Prepared(requests, cost, options)
  for t in SEARCH_THRESHOLDS:
    plan = plan_vbs(requests, cost, options, threshold=float(t))
    plan.expected_cost = expected_cost(plan, requests, cost, options, prepared)
    table.append((float(t), plan.expected_cost))
    if best is None or plan.expected_cost < best.expected_cost:
      best = plan
  best.strategy = "search"
  best.notes["threshold_costs"] = table
  return best


def plan_optimal(requests, cost, options) -> Plan:
  """Beyond one global threshold: over requests sorted by expected length, choose every batch's
  boundaries and cap by dynamic programming on the same expected cost. The search plan is a
  candidate too, so this is never worse than `search` in expected cost."""
  if requests.length_pmf is None:
    raise ValueError("optimal needs predicted pmfs")
  dp_plan = _optimal_dp(requests, cost, options)
  dp_plan.expected_cost = expected_cost(dp_plan, requests, cost, options)
  searched = plan_search(requests, cost, options)
  if searched.expected_cost < dp_plan.expected_cost:
    searched.strategy = "optimal"
    searched.notes["from"] = "search"
    return searched
  dp_plan.notes["search_expected_cost"] = searched.expected_cost
  return dp_plan


def _optimal_dp(requests: Requests, cost: CostModel, options: Options) -> Plan:
  """DP over requests sorted by expected length: best[j] = min over a last batch [i, j) of a
  bucket size and a cap from CAP_GRID of best[i] + that batch's expected cost."""
  prep = _Prepared(requests, cost, options)
  n, bins = prep.pmf.shape
  order = np.lexsort((requests.prompt_len, dist.mean(prep.pmf)))
  log_f = prep.log_f[order]
  prompt = requests.prompt_len[order]
  room = requests.room[order]
  caps = np.array(sorted({c for c in CAP_GRID if c < bins - 1} | {bins - 1}), np.int64)
  prefix_log = np.concatenate([np.zeros((1, bins)), np.cumsum(log_f, axis=0)])
  tails = prep.csum[order, -1][:, None] - prep.csum[order][:, caps]  # [n, G]
  fails = np.where(caps[None, :] < bins - 1, prep.surv[order][:, np.minimum(caps, bins - 1)], 0.0)
  extra = tails * prep.token_cost + fails * prep.reprefill_time(prompt[:, None] + caps)
  # the live-cache reads of each member: at a grid cap, or (last column) to its own end
  live = np.zeros((n, caps.size + 1))
  if cost.live_coef:
    live = cost.live_time(prep.live_work(order, np.append(caps, bins)[None, :]))
  extra = np.concatenate([extra, np.zeros((n, 1))], axis=1) + live
  prefix_extra = np.concatenate([np.zeros((1, caps.size + 1)), np.cumsum(extra, axis=0)])
  # One more cap per batch: the longest length any member can have (its pmf's support), which
  # needs no recovery; for known lengths (oracle) that is the exact batch maximum.
  support = (bins - 1) - np.argmax(prep.pmf[order][:, ::-1] > 0, axis=1)
  caps_ext = np.concatenate([caps, [-1]])
  sizes = np.array(sorted({s for s in cost.batch_buckets if s <= options.max_batch}
                          | {options.max_batch}), np.int64)
  best = np.full(n + 1, np.inf)
  best[0] = 0.0
  choice = np.zeros((n + 1, 2), np.int64)  # (start, cap)
  for j in range(1, n + 1):
    starts = np.unique(np.concatenate([j - sizes[sizes <= j], [0] if j <= options.max_batch
                                       else []]).astype(np.int64))
    lo = int(starts.min())
    run_prompt = np.maximum.accumulate(prompt[lo:j][::-1])[::-1]  # max over [i, j)
    run_room = np.maximum.accumulate(room[lo:j][::-1])[::-1]
    run_support = np.maximum.accumulate(support[lo:j][::-1])[::-1]
    max_prompt, batch_room = run_prompt[starts - lo], run_room[starts - lo]
    size = j - starts
    exact = np.maximum(1, np.minimum(run_support[starts - lo], batch_room))
    cap = np.concatenate([np.minimum(caps[None, :], batch_room[:, None]), exact[:, None]], 1)
    f_max = np.exp(prefix_log[j][None, :] - prefix_log[starts])  # [S, bins]
    steps_upto = np.concatenate([np.zeros((starts.size, 1)), np.cumsum(1.0 - f_max, axis=1)], 1)
    steps = np.take_along_axis(steps_upto, np.minimum(cap, bins), axis=1)
    time = cost.batch_time(size[:, None], max_prompt[:, None], cap, steps)
    # recovery and live-cache cost at grid caps; at the support only live cache (no recovery)
    extra = prefix_extra[j][None, :] - prefix_extra[starts]
    total = best[starts][:, None] + time + extra
    ok = ((size[:, None] <= options.max_batch)
          & (cost.kv_tokens(size[:, None], max_prompt[:, None], cap) <= options.kv_budget_tokens))
    # caps beyond the batch's room are all the same batch: keep the first
    ok[:, :-1] &= (caps[None, :] <= batch_room[:, None]) | (
        np.arange(caps.size)[None, :] == np.argmax(caps[None, :] >= batch_room[:, None],
                                                   axis=1)[:, None])
    total = np.where(ok, total, np.inf)
    flat = int(np.argmin(total))
    s_idx, g = divmod(flat, caps_ext.size)
    if not np.isfinite(total.flat[flat]):
      raise ValueError(f"no batch of request {int(order[j - 1])} fits "
                       f"kv_budget_tokens={options.kv_budget_tokens}")
    best[j] = total.flat[flat]
    choice[j] = (starts[s_idx], cap[s_idx, g])
  batches, j = [], n
  while j > 0:
    i, c = choice[j]
    batches.append(Batch(order[i:j], int(c)))
    j = int(i)
  return Plan(batches[::-1], "optimal", notes={"dp_cost": float(best[n])})


def plan_oracle(requests, cost, options) -> Plan:
  """True lengths known: the optimal plan for point-mass pmfs (no recovery needed)."""
  if requests.true_length is None:
    raise ValueError("oracle needs the true lengths (from a first run with the same seeds)")
  known = _with_known_lengths(dataclasses.replace(requests, length_pmf=None))
  plan = _optimal_dp(known, cost, options)
  plan.strategy = "oracle"
  plan.expected_cost = expected_cost(plan, known, cost, options)
  return plan


PLANNERS: dict[str, Callable[..., Plan]] = {
    "vanilla": plan_vanilla,
    "sorted": plan_sorted,
    "ssch": plan_ssch,
    "vbs": plan_vbs,
    "search": plan_search,
    "optimal": plan_optimal,
    "oracle": plan_oracle,
}


def make_plan(name: str, requests: Requests, cost: CostModel,
              options: Options | None = None) -> Plan:
  """The plan of the planner called `name` (see PLANNERS)."""
  if name not in PLANNERS:
    raise ValueError(f"unknown planner {name!r}; planners: {sorted(PLANNERS)}")
  options = options or Options()
  plan = PLANNERS[name](requests, cost, options)
  seen = np.zeros(requests.n, np.int64)
  for b in plan.batches:
    np.add.at(seen, b.members, 1)
  assert (seen == 1).all(), "planner lost or repeated a request"
  if plan.expected_cost is None and (requests.length_pmf is not None
                                     or requests.true_length is not None):
    plan.expected_cost = expected_cost(plan, requests, cost, options)
  return plan


def plan_recovery(name: str, requests: Requests, unfinished: np.ndarray, generated: np.ndarray,
                  cost: CostModel, options: Options | None = None) -> list[Batch]:
  """Batches for the rows that reached their cap: each continues from prompt + its `generated`
  tokens. With pmfs, the remaining length is planned from the pmf conditioned on L > generated
  (the same planner, on the conditional pmfs); without, fixed batches at the full cache, as
  large as the budget allows (the reference's recovery)."""
  options = options or Options()
  unfinished = np.asarray(unfinished, np.int64)
  generated = np.asarray(generated, np.int64)
  if name == "oracle" and requests.true_length is not None:
    requests = _with_known_lengths(requests)  # the oracle plans its recovery on true lengths too
  sub_prompt = requests.prompt_len[unfinished] + generated
  sub_max = None  # each row's own max_tokens, less what it generated
  if requests.max_tokens is not None:
    sub_max = np.maximum(requests.max_tokens[unfinished] - generated, 1)
  if requests.length_pmf is None or name in ("vanilla", "sorted", "ssch"):
    # The largest fixed size whose padded batch at the worst prompt and full room fits the budget.
    worst_prompt, worst_cap = int(sub_prompt.max()), requests.max_seq_len - int(sub_prompt.min())
    size = min(options.max_batch, unfinished.size)
    while size > 1 and not fits(cost, options, size, worst_prompt, worst_cap):
      size -= 1
    plain = Requests(sub_prompt, requests.max_seq_len, max_tokens=sub_max)
    batches = _fixed_batches(np.arange(unfinished.size), size, plain)
  else:
    remaining = dist.shift_left(dist.conditional_above(requests.length_pmf[unfinished],
                                                       generated), generated)
    sub = Requests(sub_prompt, requests.max_seq_len, remaining, max_tokens=sub_max)
    inner = "optimal" if name in ("optimal", "oracle") else "vbs"
    sub_options = dataclasses.replace(options, threshold=options.recovery_threshold)
    planned = PLANNERS[inner](sub, cost, sub_options).batches
    # A row that outlives its prediction again must still end in few rounds: each recovery cap
    # at least doubles what its rows have generated so far (and is at least RECOVERY_MIN_CAP).
    batches = []
    for b in planned:
      floor = max(RECOVERY_MIN_CAP, int(generated[b.members].max()))
      cap = int(min(max(b.cap, floor), sub.room[b.members].max()))
      batches.extend(_split_to_budget(b.members, cap, sub, cost, options))
  return [Batch(unfinished[b.members], b.cap, "recovery") for b in batches]
