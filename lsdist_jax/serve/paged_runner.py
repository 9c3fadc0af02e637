"""Runs a paged plan (`schedule/paged.py`) with the engine's `PagedBatch`: the host's side of
the rules, refill point by refill point, as `simulate_paged` replays them (tested step for
step). Like `Runner.run_continuous` it decides nothing the plan and its rules do not."""

from __future__ import annotations

import collections
import time

import numpy as np

from lsdist_jax.llama.paged import open_paged
from lsdist_jax.schedule.paged import Admission, PagedPlan, pool_pages
from lsdist_jax.schedule.types import Options, Requests
from lsdist_jax.serve.runner import BatchRecord, EngineClock, RunResult
from lsdist_jax.shapes import round_up


def run_paged(runner, plan: PagedPlan, requests: Requests, options: Options) -> RunResult:
  """Executes `plan` with `runner`'s engine and requests. `requests`: the planner's (their
  pmfs, or true lengths for a plan that projects them)."""
  gen = runner.engine.generator
  n = len(runner.prompt_ids)
  if sorted(np.asarray(plan.order).tolist()) != list(range(n)):
    raise ValueError(f"a paged plan's order must hold each of the {n} requests once")
  page = plan.page
  pool = pool_pages(options, page, runner.max_seq_len)
  batch = open_paged(gen, plan.slots, pool, page, max_seq_len=runner.max_seq_len)
  slots = batch.slots
  if gen.compile_threads >= 1:  # compile ahead, in the order the run needs them
    order = np.asarray(plan.order, np.int64)
    blocks = np.asarray(gen.buckets.insert_block(
        runner.prompt_len[order], round_up(runner.max_seq_len, gen.buckets.cache)))
    batch.precompile([(min(slots, n), int(blocks[:slots].max()))]  # the first fill
                     + [(plan.refill, int(b)) for b in np.unique(blocks)])
  admission = Admission(plan, requests, requests.true_length, pool)
  generated: list[list[int]] = [[] for _ in range(n)]
  finished = np.zeros(n, bool)
  records: list[BatchRecord] = []
  seconds = {"generate": 0.0, "recover": 0.0, "compile": 0.0}
  runner.settle(seconds)
  queue = collections.deque(int(r) for r in plan.order)
  occupant = np.full(slots, -1, np.int64)
  start_ctx = np.zeros(slots, np.int64)  # each slot's context at its insert
  n_gen = np.zeros(slots, np.int64)
  stamp = np.zeros(slots, np.int64)
  free_pages, counter, first = pool, 0, True
  counts = {"insert_calls": 0, "decode_calls": 0, "decode_steps": 0, "preemptions": 0}
  bucket = gen.buckets.batch_size(plan.refill)
  while True:
    clock = EngineClock(gen)
    free = np.flatnonzero(occupant < 0)
    on = np.flatnonzero(occupant >= 0)
    ids = occupant[on]
    have = np.array([len(generated[r]) for r in ids], np.int64) + n_gen[on] - 1
    admission.start(ids, start_ctx[on] + n_gen[on] - 1, have)
    take = []
    while queue and len(take) < free.size:
      r = queue[0]
      c = int(runner.prompt_len[r]) + len(generated[r])
      if not admission.try_admit(r, c, len(generated[r]), free_pages, bool(on.size or take)):
        break
      queue.popleft()
      take.append(r)
      free_pages -= -(-c // page)
    step = max(len(take), 1) if first else bucket
    inserted = 0
    started = time.perf_counter()
    for i in range(0, len(take), step):
      rows = take[i:i + step]
      into = free[i:i + len(rows)]
      batch.insert(into, [runner.prompt_ids[r] + generated[r] for r in rows],
                   [runner.request_ids[r] for r in rows], [len(generated[r]) for r in rows],
                   list(range(counter + i, counter + i + len(rows))),
                   None if runner.forced is None else [int(runner.forced[r]) for r in rows],
                   min_rows=0 if first else plan.refill,
                   max_new_tokens=runner._left(rows, generated), **runner._settings(rows))
      inserted += gen.buckets.batch_size(max(len(rows), 0 if first else plan.refill))
      counts["insert_calls"] += 1
    for i, (j, r) in enumerate(zip(free, take)):
      occupant[j], start_ctx[j], n_gen[j] = r, runner.prompt_len[r] + len(generated[r]), 1
      stamp[j] = counter + i
    counter += len(take)
    first = False
    busy = int((occupant >= 0).sum())
    if busy == 0:
      if queue:
        continue
      break
    inserted_at = time.perf_counter()
    steps = batch.decode(plan.refill if queue else slots)
    decoded_at = time.perf_counter()
    read = batch.read()
    for key, value in (("insert_calls", inserted_at - started),
                       ("decode_calls", decoded_at - inserted_at),
                       ("reads", time.perf_counter() - decoded_at), ("decode_steps", steps)):
      seconds[key] = seconds.get(key, 0.0) + value  # where the time goes (`runner_split`)
    free_pages = read.free_pages
    kept = completed = 0
    back = []
    for j in np.flatnonzero(occupant >= 0):
      r = int(occupant[j])
      if not read.done[j]:
        n_gen[j] = read.num_generated[j]
        continue
      new = read.tokens[j, :read.num_generated[j]].tolist()
      generated[r] += new
      kept += len(new)
      finished[r] = bool(read.finished[j])
      occupant[j] = -1
      counts["preemptions"] += bool(read.preempted[j])
      if runner._ended(r, generated, finished):
        completed += 1
      else:  # preempted: back to the queue's front, in admission order
        back.append((int(stamp[j]), r))
    for _, r in sorted(back, reverse=True):
      queue.appendleft(r)
    counts["decode_calls"] += steps > 0
    counts["decode_steps"] += steps
    runner.on_progress(completed, kept)
    compiling, elapsed = clock.split()
    # cap -1: each row's is its room; the cache is the pool, whatever the rows
    records.append(BatchRecord("main", busy, slots, -1, runner.max_seq_len, steps, kept, elapsed,
                               clock.compiled, computed=slots * steps + inserted,
                               kv_tokens=pool * page))
    seconds["compile"] += compiling
    seconds["generate"] += elapsed
  gen.drop_precompiles()
  return RunResult(generated, finished, records, seconds, counts)
