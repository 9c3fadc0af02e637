"""Paged continuous execution (the engine's side: `llama/paged.py`, `serve/paged_runner.py`):
every row's KV cache lives in pages of one pool of `kv_budget_tokens` tokens and grows a page
at a time, so the budget bounds the tokens rows hold, not slots x a cache length. What a length
predictor decides here is how many requests run at once and when one may enter without the
pool running out. The planners are in `schedule/paged_search.py`. numpy only.

The rules (`simulate_paged` follows them, and so does the engine's paged run, step for step):

* A plan has `slots` B (rows decoding together), `page` tokens per page, a pool of
  P = kv_budget_tokens // page pages, `refill` m (at most B), an admission `order` (request
  ids) and an admission rule. The queue starts as `order`.
* A row with context c (prompt + tokens generated before) holds ceil(c / page) pages once
  inserted; with r tokens still to generate it runs r decode steps (the last samples its EOS),
  r - 1 where r reaches its room (done as it takes its last token). At its j-th step (1-based)
  it writes the KV of position c + j - 1 (a new page when that position is a page's first) and
  reads c + j cache tokens.
* Before each decode step the rows whose next position starts a page ask for one. If the free
  pages do not cover them, running rows are preempted in the reverse order of their admission
  (the latest first, as vLLM does), each freeing its pages (a preempted row asks for nothing),
  until they do. A preempted row leaves with the tokens it holds (j + 1 after j steps: its
  insert sampled the first) and, unless that reaches its room, goes back to the front of the
  queue (rows preempted together in admission order) to be prefilled again from its context.
  Rows that finish at a step free their pages after it.
* Refill points: the start, and the end of every decode call. There the queue's front requests
  are admitted into free slots in queue order until one is refused (into every free slot:
  preemption may free many at once); one with nothing left to generate (preempted with its last
  token) is done at its insert, its pages and slot free before the decode call:
  - `fcfs` (no prediction): admitted while the free pages less the row's pages at its first
    step stay >= `watermark`;
  - `reserve`: each running row's usage is projected from its projected total length (the
    true one, or the `quantile` of its predicted length given the tokens it has); a request
    is admitted when the projected pool use of the running rows and it, step by step from now,
    stays within `level` x P pages, and the free pages cover its first step (a row's use at
    future step t is bounded by (c + t + page - 1) / page, so exact lengths never preempt).
  If nothing runs, the front request is admitted anyway. The admitted rows are inserted in one
  call at the start, else in calls of the bucket of m rows each (a call of fewer rows runs at
  m rows: one program per context block).
* A decode call runs steps until at least min(B, f + m) slots are free (f: free after the
  refill; preempted and finished rows free theirs) where the queue was not empty at its start
  (rows it preempts do not change that), else until every row is done.
* Seconds: an insert call of k rows of longest context c costs batch_overhead + prefill_time(k,
  insert_block(c)); a decode call batch_overhead + steps x step_time(B, max_seq_len) plus the
  live-token cost of the cache tokens its rows read.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from lsdist_jax.schedule.continuous import ContinuousSimResult, insert_block
from lsdist_jax.schedule.cost import CostModel
from lsdist_jax.schedule.simulate import ends_at_room
from lsdist_jax.schedule.types import Options, Requests
from lsdist_jax.shapes import round_up

ADMISSIONS = ("fcfs", "reserve")
PROJECTIONS = ("predicted", "true")


@dataclasses.dataclass
class PagedPlan:
  order: np.ndarray  # request ids, admission order
  slots: int  # B
  page: int  # tokens per page
  refill: int  # m
  admission: str = "fcfs"
  watermark: int = 0  # fcfs: pages left free at admission
  quantile: float = 0.9  # reserve, predicted: a row's projected length
  level: float = 1.0  # reserve: the projected peak may reach this fraction of the pool
  projection: str = "predicted"  # reserve: "predicted" (the pmf) or "true" (true lengths)
  strategy: str = ""
  expected_cost: float | None = None
  threshold: float | None = None
  notes: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.order = np.asarray(self.order, np.int64).reshape(-1)
    self.slots, self.page, self.refill = int(self.slots), int(self.page), int(self.refill)
    if self.slots < 1 or self.page < 1 or self.refill < 1:
      raise ValueError(f"a paged plan needs slots, page and refill >= 1; got {self.slots}, "
                       f"{self.page}, {self.refill}")
    self.refill = min(self.refill, self.slots)
    if self.admission not in ADMISSIONS or self.projection not in PROJECTIONS:
      raise ValueError(f"admission must be one of {ADMISSIONS} and projection one of "
                       f"{PROJECTIONS}; got {self.admission!r}, {self.projection!r}")


def pool_pages(options: Options, page: int, max_seq_len: int) -> int:
  """Pages of the pool; it must hold one row of max_seq_len tokens."""
  pages = int(options.kv_budget_tokens) // int(page)
  if pages * int(page) < int(max_seq_len):
    raise ValueError(f"kv_budget_tokens={options.kv_budget_tokens} does not hold one row of "
                     f"max_seq_len={max_seq_len} tokens in pages of {page}")
  return pages


class Projector:
  """Projected total lengths of rows that have generated g tokens and go on (length > g):
  exact (`true`), or the q-quantile of the predicted pmf given length > g (the room where the
  pmf has no mass left)."""

  def __init__(self, requests: Requests, true: np.ndarray | None, quantile: float):
    self.true, self.q, self.room = true, float(quantile), requests.room
    if true is None:
      cdf = requests.__dict__.get("_paged_cdf")
      if cdf is None or cdf[0] is not requests.length_pmf:
        f = np.cumsum(requests.pmf_within_room(), axis=1)
        f /= f[:, -1:]
        cdf = (requests.length_pmf, f, (f + 2.0 * np.arange(f.shape[0])[:, None]).reshape(-1))
        requests.__dict__["_paged_cdf"] = cdf
      self.cdf, self.flat = cdf[1], cdf[2]

  def __call__(self, ids: np.ndarray, generated: np.ndarray) -> np.ndarray:
    if self.true is not None:
      return np.maximum(self.true[ids], generated + 1)
    bins = self.cdf.shape[1]
    g = np.minimum(generated, bins - 1)
    below = self.cdf[ids, g]
    target = below + self.q * (1.0 - below)
    idx = np.searchsorted(self.flat, target - 1e-12 + 2.0 * ids, side="left") - bins * ids
    length = np.where(1.0 - below > 1e-9, np.minimum(idx, bins - 1), self.room[ids])
    return np.maximum(length, generated + 1)


class Admission:
  """The admission rule at a refill point (`fcfs` or `reserve`), shared by the simulator and
  the runner. `start` takes the running rows (request ids, contexts in cache, tokens each has in
  all); `try_admit` says whether request r (context c, g tokens so far) enters now, and counts
  it in if so."""

  def __init__(self, plan: PagedPlan, requests: Requests, true: np.ndarray | None, pool: int):
    self.plan, self.pool, self.page = plan, pool, plan.page
    self.horizon = int(requests.max_seq_len) + 1
    self.project = None
    if plan.admission == "reserve":
      self.project = Projector(requests, true if plan.projection == "true" else None,
                               plan.quantile)

  def start(self, ids: np.ndarray, contexts: np.ndarray, have: np.ndarray) -> None:
    self.rows = (np.asarray(ids, np.int64), np.asarray(contexts, np.int64),
                 np.asarray(have, np.int64))
    self.usage = None

  def try_admit(self, r: int, c: int, g: int, free_pages: int, running: bool) -> bool:
    """Whether request r may enter (with `free_pages` free); `running`: anything runs or was
    admitted this round (if not, it enters anyway)."""
    need = -(-(c + 1) // self.page)
    if self.plan.admission == "fcfs":
      ok = free_pages - need >= self.plan.watermark
    else:
      if self.usage is None:
        self.usage = _projected_use(self.project, *self.rows, self.page, self.horizon)
      total = int(self.project(np.array([r]), np.array([g]))[0])
      own = _ramp(c, total - g, self.page, self.horizon)
      ok = free_pages >= need and float((self.usage + own).max()) <= self.plan.level * self.pool
      if ok or not running:
        self.usage = self.usage + own
    return bool(ok or not running)


def _window(ctx, left, held, free_pages: int, page: int, free_more) -> tuple[int, bool]:
  """(w, stop): the decode steps the running rows (contexts in cache `ctx`, steps `left`, pages
  `held`) run before the first step whose page requests exceed the free pages (that step
  preempts: w stops short of it, and w = 0 when it is the next), and whether the call stops
  after those w steps: once `free_more` more rows are done (None: when every row is), the rule
  checked after each step. A row asks for a page at each step that starts with its context at
  a page boundary; a row done at a step frees its pages for the next."""
  n = ctx.size
  if free_more is None:
    last = int(left.max())
  elif free_more <= 0:
    last = 1
  else:
    last = int(np.sort(left)[min(int(free_more), n) - 1])
  first = (-ctx) % page + 1  # the row's first step that asks for a page
  asks = first[:, None] + page * np.arange(-(-last // page) + 1)[None, :]
  asks = np.where(asks <= np.minimum(left, last)[:, None], asks, 0)
  need = np.bincount(asks.reshape(-1), minlength=last + 1)
  need[0] = 0
  ends = left <= last
  freed = np.bincount(left[ends], weights=(held + (asks > 0).sum(axis=1))[ends],
                      minlength=last + 1)
  # free pages before step s: the start's, less what steps before s took, plus what rows done
  # at steps before s gave back
  before = free_pages - np.cumsum(need) + need + np.cumsum(freed) - freed
  over = np.flatnonzero(need[1:] > before[1:])
  if over.size:
    return int(over[0]), False
  return last, True


def simulate_paged(plan: PagedPlan, requests: Requests, true_length: np.ndarray,
                   cost: CostModel, options: Options) -> ContinuousSimResult:
  """Seconds of `plan` run by the rules above when request r generates true_length[r] tokens
  (at most its room)."""
  true = np.minimum(np.asarray(true_length, np.int64), requests.room)
  page, B, m = plan.page, plan.slots, plan.refill
  pool = pool_pages(options, page, requests.max_seq_len)
  admission = Admission(plan, requests, true, pool)
  prompt, room = requests.prompt_len, requests.room
  generated = np.zeros(requests.n, np.int64)
  queue = collections.deque(int(r) for r in plan.order)
  row = np.full(B, -1, np.int64)
  ctx = np.zeros(B, np.int64)
  left = np.zeros(B, np.int64)
  held = np.zeros(B, np.int64)
  stamp = np.zeros(B, np.int64)
  ran = np.zeros(B, np.int64)
  last = np.zeros(B, np.int64)  # 1: the row reaches its room, done as it takes its last token
  free_pages, counter = pool, 0
  bucket = int(cost.padded_batch(m))
  block_cap = round_up(int(requests.max_seq_len), int(cost.cache_bucket))
  insert_k, insert_ctx = [], []
  steps = decodes = preempted = 0
  live = 0.0
  first = True
  while True:
    # ---- refill point
    free = np.flatnonzero(row < 0)
    on = row >= 0
    admission.start(row[on], ctx[on], generated[row[on]] + ran[on])
    admitted = []
    while queue and len(admitted) < free.size:
      r = queue[0]
      c = int(prompt[r] + generated[r])
      running = bool(on.any()) or bool(admitted)
      if not admission.try_admit(r, c, int(generated[r]), free_pages, running):
        break
      queue.popleft()
      s = int(free[len(admitted)])
      rest = true[r] - generated[r]
      last[s] = ends_at_room(rest, room[r] - generated[r])  # no step for an EOS after it
      row[s], ctx[s], left[s], ran[s] = r, c, rest - last[s], 0
      held[s] = -(-c // page)
      free_pages -= int(held[s])
      stamp[s], counter = counter, counter + 1
      admitted.append(c)
    step = len(admitted) if first else bucket
    for i in range(0, len(admitted), max(step, 1)):  # after the first, padded to m rows
      insert_k.append(max(min(step, len(admitted) - i), 0 if first else m))
      insert_ctx.append(max(admitted[i:i + step]))
    first = False
    ended = (row >= 0) & (left == 0)  # nothing left to generate: done at its insert
    generated[row[ended]] += last[ended]
    free_pages += int(held[ended].sum())
    row[ended], held[ended] = -1, 0
    if not (row >= 0).any():
      if queue:
        continue
      break
    # ---- decode call: windows of steps in which no row can be preempted run at once
    # (`_window`); a step that preempts runs alone, as the rules say, then the same advance
    target = min(B, int((row < 0).sum()) + m)
    waiting = bool(queue)  # at the call's start (the engine is told then): rows preempted in
    ran_steps = 0  # the call do not end it early
    while True:
      running = row >= 0
      if not running.any():
        break
      w, stop = _window(ctx[running], left[running], held[running], free_pages, page,
                        target - int((~running).sum()) if waiting else None)
      if not w:  # the next step preempts: one step, the latest admitted rows leaving first
        needers = running & (ctx % page == 0)
        short = int(needers.sum()) - free_pages
        for s in np.flatnonzero(running)[np.argsort(-stamp[running], kind="stable")]:
          free_pages += int(held[s])
          short -= int(held[s]) + int(needers[s])
          r = int(row[s])
          generated[r] += int(ran[s]) + 1
          if generated[r] < room[r]:
            queue.appendleft(r)  # later-admitted pushed first: the queue keeps admission order
          row[s], held[s] = -1, 0
          preempted += 1
          if short <= 0:
            break
        running = row >= 0
        w, stop = 1, None  # whether the call stops: checked after the step
      idx = np.flatnonzero(running)
      t = np.minimum(w, left[idx])
      c = ctx[idx]
      gained = (c + t - 1) // page - (c - 1) // page  # pages asked for: boundaries crossed
      held[idx] += gained
      free_pages -= int(gained.sum())
      live += float(int((t * c + t * (t + 1) // 2).sum()))
      ctx[idx] += t
      ran[idx] += t
      left[idx] -= t
      ran_steps += w
      done = running & (left == 0)
      generated[row[done]] += ran[done] + last[done]
      free_pages += int(held[done].sum())
      row[done], held[done] = -1, 0
      if stop or (stop is None and waiting and int((row < 0).sum()) >= target):
        break
    if ran_steps:
      decodes += 1
      steps += ran_steps
  if not np.array_equal(generated, true):
    raise AssertionError("the paged simulation did not generate every request's true length")
  ks = np.asarray(insert_k, np.int64)
  blocks = insert_block(np.asarray(insert_ctx, np.int64), block_cap, cost)
  overhead = cost.batch_overhead_ms * 1e-3
  inserting = float(np.sum(cost.prefill_call_time(ks, blocks)))
  seconds = (inserting + overhead * decodes + steps * float(cost.step_time(B, block_cap))
             + float(cost.live_time(live)))
  computed = int(np.sum(cost.padded_batch(ks))) + int(cost.padded_batch(B)) * steps
  keys = {("paged-insert", B, pool, int(cost.padded_batch(k)), int(b))
          for k, b in zip(ks.tolist(), np.broadcast_to(blocks, ks.shape).tolist())}
  keys |= {("paged-decode", B, pool)}
  return ContinuousSimResult(seconds, 1, 0, int(true.sum()), computed, int(ks.size), decodes,
                             steps, preempted, [seconds], len(keys), frozenset(keys), inserting)


def _ramp(context: int, tokens: int, page: int, horizon: int) -> np.ndarray:
  """A row's projected pages at future steps t = 0..horizon-1 (step t+1 of its run): bounded by
  (context + t + page) / page while it runs (t < tokens), 0 after."""
  t = np.arange(horizon, dtype=np.float64)
  return np.where(t < tokens, (context + t + page) / page, 0.0)


def _projected_use(project, ids, contexts, have, page, horizon) -> np.ndarray:
  """Sum of the running rows' `_ramp`s (request ids, contexts in cache, tokens each has in
  all): projected pages in use at each future step (difference counts over the steps at which
  rows are projected to end)."""
  if ids.size == 0:
    return np.zeros(horizon)
  ends = np.clip(project(ids, have) - have, 0, horizon)
  base = (contexts + page) / page
  ended = np.cumsum(np.bincount(ends, minlength=horizon + 1))[:horizon]
  ended_base = np.cumsum(np.bincount(ends, weights=base, minlength=horizon + 1))[:horizon]
  t = np.arange(horizon, dtype=np.float64)
  return (base.sum() - ended_base) + (ids.size - ended) * t / page
