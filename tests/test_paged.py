"""Paged execution (simulated): the simulator against a plain per-page replay of its rules, the
projections, preemption, and the planners' choices."""

import numpy as np
import pytest

from lsdist_jax.schedule import CostModel, Options, Requests, dist
from lsdist_jax.schedule.paged import PagedPlan, Projector, pool_pages, simulate_paged
from lsdist_jax.schedule.paged_search import (PAGED_PLANNERS, paged_slots, plan_paged_oracle,
                                              plan_paged_search, plan_paged_vanilla,
                                              slot_choices)
from lsdist_jax.serve.strategies import check_strategies

COST = CostModel(step=(1.0, 0.01, 1e-4, 0.003, 2e-4), prefill=(1.0, 1e-3), batch_overhead_ms=0.5,
                 batch_buckets=(1, 2, 4, 8, 16, 32, 64), prompt_bucket=16, cache_bucket=32)


def _requests(n=60, seed=0, max_seq_len=320, spread=200):
  rng = np.random.default_rng(seed)
  prompt = rng.integers(5, 60, n)
  true = rng.integers(0, spread, n)
  pmf = dist.empirical_pmf(np.clip(true[:, None] + rng.integers(-30, 30, (n, 8)), 0, 300), 300)
  return Requests(prompt, max_seq_len, length_pmf=pmf, true_length=true), true


def _ceil(a, b):
  return -(-a // b)


def reference(plan, req, true_length, cost, options):
  """The module's rules replayed with explicit page lists, one step at a time (tiny cases)."""
  true = np.minimum(np.asarray(true_length), req.room)
  page, pool = plan.page, pool_pages(options, plan.page, req.max_seq_len)
  project = Projector(req, true if plan.projection == "true" else None, plan.quantile)
  free, queue, slots = list(range(pool)), [int(r) for r in plan.order], [None] * plan.slots
  gen = np.zeros(req.n, np.int64)
  counter, first, steps, decodes, preempted, live, inserts = 0, True, 0, 0, 0, 0.0, []

  def use_at(c, tokens, t):
    return (c + t + page) / page if t < tokens else 0.0

  while True:
    open_slots = [i for i, s in enumerate(slots) if s is None]
    admitted = []
    while queue and len(admitted) < len(open_slots):
      r = queue[0]
      c = int(req.prompt_len[r] + gen[r])
      if plan.admission == "fcfs":
        ok = len(free) - _ceil(c + 1, page) >= plan.watermark
      else:
        rows = [s for s in slots if s is not None]
        ends = [(s["ctx"], int(project(np.array([s["r"]]), np.array([gen[s["r"]] + s["ran"]]))[0])
                 - gen[s["r"]] - s["ran"]) for s in rows]
        mine = int(project(np.array([r]), np.array([gen[r]]))[0]) - gen[r]
        peak = max(sum(use_at(c0, e, t) for c0, e in ends) + use_at(c, mine, t)
                   for t in range(req.max_seq_len + 1))
        ok = len(free) >= _ceil(c + 1, page) and peak <= plan.level * pool
      if not ok and (any(s is not None for s in slots) or admitted):
        break
      queue.pop(0)
      s = open_slots[len(admitted)]
      pages = [free.pop(0) for _ in range(_ceil(c, page))]
      rest = int(true[r] - gen[r])
      last = int(0 < rest == req.room[r] - gen[r])  # reaches its room: no step for an EOS
      slots[s] = {"r": r, "ctx": c, "left": rest - last, "ran": 0, "pages": pages,
                  "stamp": counter, "last": last}
      counter += 1
      admitted.append(c)
    size = len(admitted) if first else int(cost.padded_batch(plan.refill))
    inserts += [(max(min(size, len(admitted) - i), 0 if first else plan.refill),
                 max(admitted[i:i + size])) for i in range(0, len(admitted), max(size, 1))]
    first = False
    for i, s in enumerate(slots):  # nothing left to generate: done at its insert
      if s is not None and s["left"] == 0:
        gen[s["r"]] += s["last"]
        free += s["pages"]
        slots[i] = None
    if all(s is None for s in slots):
      if queue:
        continue
      break
    target = min(plan.slots, sum(s is None for s in slots) + plan.refill)
    waiting = bool(queue)  # as the call starts: what it preempts does not end it early
    ran = 0
    while any(s is not None for s in slots):
      needers = [i for i, s in enumerate(slots) if s is not None and s["ctx"] % page == 0]
      for i in sorted((i for i, s in enumerate(slots) if s is not None),
                      key=lambda i: -slots[i]["stamp"]):
        if len(needers) <= len(free):
          break
        s = slots[i]
        free += s["pages"]
        gen[s["r"]] += s["ran"] + 1
        if gen[s["r"]] < req.room[s["r"]]:
          queue.insert(0, s["r"])
        slots[i] = None
        preempted += 1
        needers = [j for j in needers if j != i]
      for i in needers:
        slots[i]["pages"].append(free.pop(0))
      done = []
      for i, s in enumerate(slots):
        if s is None:
          continue
        assert len(s["pages"]) * page >= s["ctx"] + 1  # the position it writes has a page
        live += s["ctx"] + 1
        s["ctx"] += 1
        s["ran"] += 1
        s["left"] -= 1
        if s["left"] == 0:
          done.append(i)
      ran += 1
      for i in done:
        gen[slots[i]["r"]] += slots[i]["ran"] + slots[i]["last"]
        free += slots[i]["pages"]
        slots[i] = None
      if waiting and sum(s is None for s in slots) >= target:
        break
    if ran:
      decodes, steps = decodes + 1, steps + ran
  assert (gen == true).all() and len(free) == pool
  return {"steps": steps, "decodes": decodes, "inserts": len(inserts), "preempted": preempted,
          "live": live, "insert_rows": [k for k, _ in inserts]}


CASES = [  # (admission, projection, slots, page, refill, budget tokens, seed)
    ("fcfs", "predicted", 16, 16, 2, 2048, 0),
    ("fcfs", "predicted", 32, 8, 4, 1536, 1),  # a tight pool: preemption
    ("reserve", "true", 16, 16, 2, 2048, 2),
    ("reserve", "predicted", 16, 16, 4, 1536, 3),
    ("reserve", "predicted", 8, 32, 1, 1024, 4),
    # tight pools, many preemptions: the simulator runs the steps between them as one window
    ("fcfs", "predicted", 32, 4, 3, 700, 5),
    ("fcfs", "true", 16, 8, 16, 800, 7),
    ("reserve", "predicted", 32, 8, 8, 900, 9),
    ("fcfs", "predicted", 8, 16, 2, 640, 11),
]


@pytest.mark.parametrize("admission,projection,slots,page,refill,budget,seed", CASES)
def test_the_simulator_matches_a_per_page_replay(admission, projection, slots, page, refill,
                                                 budget, seed):
  req, true = _requests(n=40, seed=seed)
  options = Options(kv_budget_tokens=budget, max_batch=64)
  rng = np.random.default_rng(seed)
  plan = PagedPlan(rng.permutation(req.n), slots, page, refill, admission,
                   watermark=2 if admission == "fcfs" else 0, quantile=0.8,
                   level=1.0 if seed % 2 else 1.1, projection=projection)
  got = simulate_paged(plan, req, true, COST, options)
  want = reference(plan, req, true, COST, options)
  assert got.generated_tokens == int(np.minimum(true, req.room).sum())
  assert (got.decode_steps, got.decode_calls, got.insert_calls, got.carried_rows) == (
      want["steps"], want["decodes"], want["inserts"], want["preempted"])
  computed = sum(int(COST.padded_batch(k)) for k in want["insert_rows"])
  assert got.computed_tokens == computed + int(COST.padded_batch(slots)) * want["steps"]
  if seed in (1, 5, 7, 11):
    assert got.carried_rows > 0  # the tight pool did preempt


def test_exact_projections_never_preempt_and_fcfs_does_on_the_same_pool():
  req, true = _requests(n=80, seed=5, spread=260)
  options = Options(kv_budget_tokens=1280, max_batch=64)
  fcfs = PagedPlan(np.arange(req.n), 32, 16, 4, "fcfs")
  exact = PagedPlan(np.arange(req.n), 32, 16, 4, "reserve", projection="true")
  assert simulate_paged(fcfs, req, true, COST, options).carried_rows > 0
  assert simulate_paged(exact, req, true, COST, options).carried_rows == 0


def test_projection_is_the_conditional_quantile_or_the_room():
  pmf = np.zeros((2, 11))
  pmf[0, [2, 4, 8]] = [0.5, 0.25, 0.25]
  pmf[1, 3] = 1.0
  req = Requests(np.array([5, 5]), 50, length_pmf=pmf)
  project = Projector(req, None, 0.5)
  # Row 0: given length > 2 the mass is {4: 0.5, 8: 0.5}, median 4; given > 4 it is 8.
  assert project(np.array([0, 0, 0]), np.array([0, 2, 4])).tolist() == [2, 4, 8]
  # Row 1 has no mass beyond 3: its room (45), and never less than the tokens it has + 1.
  assert project(np.array([1, 1]), np.array([3, 60])).tolist() == [45, 61]
  exact = Projector(req, np.array([7, 1]), 0.5)
  assert exact(np.array([0, 1]), np.array([2, 3])).tolist() == [7, 4]


def test_planners_choose_within_their_grids_and_the_oracle_expects_its_true_time():
  req, true = _requests(n=120, seed=6)
  options = Options(kv_budget_tokens=3072, max_batch=64)
  assert paged_slots(req, COST, options) == 64 == slot_choices(req, COST, options)[-1]
  vanilla = plan_paged_vanilla(req, COST, options)
  assert (vanilla.admission, vanilla.slots, vanilla.order.tolist()) == (
      "fcfs", 64, list(range(req.n)))
  oracle = plan_paged_oracle(req, COST, options)
  assert oracle.expected_cost == pytest.approx(
      simulate_paged(oracle, req, true, COST, options).seconds)
  ours = plan_paged_search(Requests(req.prompt_len, req.max_seq_len, length_pmf=req.length_pmf),
                           COST, options)
  for plan in (oracle, ours):
    assert plan.slots in slot_choices(req, COST, options)
    assert sorted(plan.order.tolist()) == list(range(req.n))
  # the oracle's search starts from vanilla's plan and keeps a change only where it is faster
  assert oracle.expected_cost <= simulate_paged(vanilla, req, true, COST, options).seconds
  assert oracle.order.tolist() == ours.order.tolist() == list(range(req.n))
  with pytest.raises(ValueError, match="true lengths"):
    plan_paged_oracle(Requests(req.prompt_len, req.max_seq_len), COST, options)
  assert set(PAGED_PLANNERS) == {"paged-vanilla", "paged-search", "paged-oracle"}


def test_bad_plans_pools_and_strategy_orders_are_named():
  with pytest.raises(ValueError, match="admission"):
    PagedPlan(np.arange(3), 4, 16, 1, "greedy")
  assert PagedPlan(np.arange(3), 4, 16, 9).refill == 4  # clamped to the slots
  with pytest.raises(ValueError, match="does not hold one row"):
    pool_pages(Options(kv_budget_tokens=256), 16, 320)
  with pytest.raises(ValueError, match="needs a strategy before it"):
    check_strategies(["oracle-paged", "paged-vanilla"])
