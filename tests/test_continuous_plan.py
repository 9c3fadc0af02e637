"""Continuous (slot-refill) plans: the event simulator against a plain step-by-step replay of the
runner's rules, against the static simulator where the two must agree, and the planners'
coverage, KV budget, oracle and search properties."""

import dataclasses

import numpy as np
import pytest

from lsdist_jax.schedule import CostModel, Options, Requests, dist, make_plan, plan_recovery
from lsdist_jax.schedule.continuous import (ContinuousPlan, Phase, expected_seconds,
                                            final_phase, insert_block, sample_lengths,
                                            simulate_continuous, slots_for)
from lsdist_jax.schedule.continuous_search import (CONTINUOUS_PLANNERS, make_continuous_plan,
                                                   plan_continuous, plan_continuous_oracle)
from lsdist_jax.schedule.types import Batch, Plan
from lsdist_jax.schedule.simulate import simulate

# Nonzero B x S and S terms, so the cache length a phase runs at shows in its time.
COST = CostModel(step=(1.0, 0.01, 1e-4, 0.003, 2e-4), prefill=(1.0, 1e-3), batch_overhead_ms=0.5,
                 batch_buckets=(1, 2, 4, 8, 16, 32, 64), prompt_bucket=16, cache_bucket=32)
OPTIONS = Options(kv_budget_tokens=64 * 160, max_batch=64, fixed_batch=16)
NAMES = sorted(CONTINUOUS_PLANNERS)

from conftest import random_requests  # noqa: E402




@pytest.fixture(scope="module")
def requests():
  return random_requests()


@pytest.fixture(scope="module")
def plans(requests):
  return {name: make_continuous_plan(name, requests, COST, OPTIONS) for name in NAMES}


# ----------------------------------------------------------------------------- reference


def reference_simulate(plan, req, true_length, cost, options):
  """The runner's rules step by step, in plain python (slow; tiny cases only)."""
  true = np.minimum(np.asarray(true_length), req.room)
  gen = np.zeros(req.n, np.int64)
  out = {"seconds": 0.0, "computed": 0, "steps": 0, "inserts": 0, "decodes": 0, "carried": 0}
  overhead = cost.batch_overhead_ms * 1e-3
  phases, carried, extra, k = list(plan.phases), [], 0, 0
  while k < len(phases) or carried:
    if k >= len(phases):
      ctx = np.array([req.prompt_len[r] + gen[r] for r in carried])
      phases.append(dataclasses.replace(final_phase(ctx, req.max_seq_len - ctx, cost, options),
                                        split_first=phases[-1].split_first))
      extra += 1
    phase = phases[k]
    k += 1
    size, refill = phase.slots, min(phase.refill, phase.slots)
    queue, next_carried = [], []
    for r in carried + [int(x) for x in phase.members]:
      if req.prompt_len[r] + gen[r] >= phase.cache_len:
        next_carried.append(r)  # does not fit this cache: on to the next phase
      else:
        queue.append(r)
    slots = [None] * size
    most = [size]  # the first fill takes any rows, every later insert a refill's bucket at most

    def done(s):
      return gen[s["row"]] == true[s["row"]] or s["j"] == s["cap"]

    def insert():
      free = [i for i in range(size) if slots[i] is None]
      take = queue[:min(len(free), most[0])]
      del queue[:len(take)]
      # a first fill that leaves rows queued (the phase refills), where the phase splits it:
      # inserts of a refill's bucket
      split = most[0] == size and queue and phase.split_first
      step = int(cost.padded_batch(refill)) if split else len(take)
      # every insert but a whole first fill runs a refill's program: at least `refill` rows
      pad = 0 if most[0] == size and not split else refill
      most[0] = int(cost.padded_batch(refill))
      for i, r in zip(free, take):
        c = int(req.prompt_len[r] + gen[r])
        slots[i] = {"row": r, "ctx": c, "j": 0,
                    "cap": min(phase.cache_len - c, req.max_seq_len - c)}
        # a row that reaches its room is done as it takes its last token (no EOS step): its
        # insert's token counts now, not as a step
        rest = true[r] - gen[r]
        slots[i]["first"] = 0 < rest == req.room[r] - gen[r] and rest <= slots[i]["cap"]
        gen[r] += slots[i]["first"]
      for at in range(0, len(take), step):
        part = free[at:min(at + step, len(take))]
        c_max = max(slots[i]["ctx"] for i in part)
        block = max(int(insert_block(c_max, phase.cache_len, cost)), phase.block)
        out["seconds"] += overhead + float(cost.prefill_time(max(len(part), pad), block))
        out["computed"] += int(cost.padded_batch(max(len(part), pad)))
        out["inserts"] += 1

    if queue:
      insert()
    while any(s is not None for s in slots):
      steps, live = 0, 0
      while True:  # one decode call
        free = sum(1 for s in slots if s is None or done(s))
        if (queue and free >= refill) or (not queue and free >= size - phase.drain):
          break
        for s in slots:
          if s is not None and not done(s):
            s["j"] += 1
            gen[s["row"]] += 1
            live += s["ctx"] + s["j"]
        steps += 1
      # the runner calls decode while a slot is held, also where it runs no step (the rows
      # are done at their insert, or enough slots were free already)
      out["seconds"] += (overhead + steps * float(cost.step_time(size, phase.cache_len))
                         + float(cost.live_time(live)))
      out["computed"] += int(cost.padded_batch(size)) * steps
      out["steps"] += steps
      out["decodes"] += 1
      draining = not queue and phase.drain > 0  # the phase ends: every row leaves
      for i in range(size):  # the done rows leave, in slot order
        s = slots[i]
        if s is not None and done(s):
          if gen[s["row"]] < true[s["row"]]:
            next_carried.append(s["row"])
          slots[i] = None
        elif s is not None and draining:  # after j steps it holds j + 1 tokens
          gen[s["row"]] += 0 if s["first"] else 1  # its insert sampled one
          next_carried.append(s["row"])
          slots[i] = None
      if queue:
        insert()
    carried = next_carried
    out["carried"] += len(carried)
  assert (gen == true).all()
  out.update(phases=len(phases), extra=extra, generated=int(true.sum()))
  return out


def random_case(seed):
  """A few requests in a random plan: phases of random caches (some too short for a prompt),
  slots and refills; short caches cap rows, and max_seq_len leaves some for the final phase."""
  rng = np.random.default_rng(seed)
  n = int(rng.integers(4, 22))
  max_seq_len = 96
  prompt = rng.integers(1, 40, n)
  true = rng.integers(0, 70, n)  # some beyond their room: clipped
  req = Requests(prompt, max_seq_len, true_length=true)
  n_phases = int(rng.integers(1, 4))
  where = rng.integers(0, n_phases, n)
  caches = np.sort(rng.choice([32, 48, 64, 96], n_phases))
  phases = []
  split = np.random.default_rng(seed + 1000).random(n_phases) < 0.5  # first fills: split or not
  for k in range(n_phases):
    members = rng.permutation(np.flatnonzero(where == k))
    slots = int(rng.integers(1, 6))
    drain = int(rng.integers(0, slots)) if rng.random() < 0.5 else 0
    block = int(rng.choice([0, 8, 16, 32])) if rng.random() < 0.5 else 0  # inserts' floor
    phases.append(Phase(members, int(caches[k]), slots, int(rng.integers(1, slots + 2)),
                        drain, min(block, int(caches[k])), bool(split[k])))
  return req, true, ContinuousPlan(phases, "random")


SMALL_COST = dataclasses.replace(COST, batch_buckets=(1, 2, 4, 8), prompt_bucket=8,
                                 cache_bucket=16)
SMALL_OPTIONS = Options(kv_budget_tokens=8 * 128, max_batch=8)


def test_event_simulator_matches_a_step_by_step_replay():
  seen_capped = seen_extra = seen_unfit = seen_drained = 0
  for seed in range(150):
    req, true, plan = random_case(seed)
    got = simulate_continuous(plan, req, true, SMALL_COST, SMALL_OPTIONS)
    want = reference_simulate(plan, req, true, SMALL_COST, SMALL_OPTIONS)
    assert got.seconds == pytest.approx(want["seconds"], rel=1e-9), seed
    assert (got.computed_tokens, got.decode_steps, got.insert_calls, got.decode_calls,
            got.carried_rows, got.batches, got.recovery_batches) == (
                want["computed"], want["steps"], want["inserts"], want["decodes"],
                want["carried"], want["phases"], want["extra"]), seed
    assert got.generated_tokens == want["generated"] == int(np.minimum(true, req.room).sum())
    seen_capped += got.carried_rows > 0
    seen_extra += got.recovery_batches > 0
    seen_unfit += any((req.prompt_len[p.members] >= p.cache_len).any() for p in plan.phases)
    seen_drained += any(p.drain for p in plan.phases) and got.carried_rows > 0
  # the cases covered carrying, the extra final phase, rows too long for their cache and
  # phases that drain
  assert seen_capped > 20 and seen_extra > 10 and seen_unfit > 10 and seen_drained > 10


@pytest.mark.parametrize("name", NAMES)
def test_planned_plans_replay_the_same_step_by_step(name):
  req = random_requests(n=50, seed=3)
  options = dataclasses.replace(OPTIONS, kv_budget_tokens=16 * 160)
  plan = (plan_continuous(req, COST, options, threshold=0.3) if name == "continuous"
          else make_continuous_plan(name, req, COST, options))
  got = simulate_continuous(plan, req, req.true_length, COST, options)
  want = reference_simulate(plan, req, req.true_length, COST, options)
  assert got.seconds == pytest.approx(want["seconds"], rel=1e-9)
  assert (got.computed_tokens, got.decode_steps, got.carried_rows) == (
      want["computed"], want["steps"], want["carried"])
  if name == "continuous":
    assert got.carried_rows > 0


def test_one_full_phase_costs_the_static_batch_plus_one_call_overhead():
  """One phase holding every request (slots = n, a cache for each whole room): the same steps,
  live tokens, prefill and computed tokens as the static batch with cap = the room. Continuous
  execution makes two calls (insert, then one decode call) where the static batch makes one
  generate call, so it costs exactly one batch_overhead more."""
  rng = np.random.default_rng(5)
  for n in (1, 7, 20, 32):
    prompt = rng.integers(3, 50, n)
    true = rng.integers(0, 300, n)
    req = Requests(prompt, 240, true_length=true)
    room = int(req.room.max())
    cache_len = int(COST.cache_len(int(prompt.max()), room))
    static = simulate(Plan([Batch(np.arange(n), room)], "static"), req, true, COST)
    for refill in (1, n):
      plan = ContinuousPlan([Phase(rng.permutation(n), cache_len, n, refill)], "one")
      got = simulate_continuous(plan, req, true, COST, OPTIONS)
      # the insert pads its context block to prompt_bucket x 2^i (fewer programs)
      padding = float(COST.prefill_time(n, insert_block(int(prompt.max()), cache_len, COST))
                      - COST.prefill_time(n, int(prompt.max())))
      assert got.seconds == pytest.approx(static.seconds + COST.batch_overhead_ms * 1e-3
                                          + padding, rel=1e-12)
      assert got.computed_tokens == static.computed_tokens
      assert got.generated_tokens == static.generated_tokens
      assert (got.insert_calls, got.carried_rows, got.recovery_batches) == (1, 0, 0)


@pytest.mark.parametrize("name", NAMES)
def test_every_request_in_exactly_one_phase_within_the_kv_budget(requests, plans, name):
  plan = plans[name]
  assert sorted(plan.members().tolist()) == list(range(requests.n))
  caches = [p.cache_len for p in plan.phases]
  assert caches == sorted(set(caches))  # short caches first, one phase each
  for p in plan.phases:
    assert p.slots * p.cache_len <= OPTIONS.kv_budget_tokens and p.slots <= OPTIONS.max_batch
    assert int(COST.padded_batch(p.slots)) == p.slots  # a batch bucket: no padded rows
    assert 1 <= p.refill <= p.slots
    assert (requests.prompt_len[p.members] < p.cache_len).all()
  result = simulate_continuous(plan, requests, requests.true_length, COST, OPTIONS)
  assert result.generated_tokens == int(np.minimum(requests.true_length, requests.room).sum())
  assert result.seconds > 0 and 0 < result.effective_token_ratio <= 1


def test_phase_admission_is_longest_key_first_and_covers_the_key(requests):
  plan = plan_continuous(requests, COST, OPTIONS, threshold=0.7)
  key = np.minimum(dist.quantile(requests.length_pmf, 0.7), requests.room)
  for p in plan.phases:
    assert (np.diff(key[p.members]) <= 0).all()
    cap = np.minimum(p.cache_len - requests.prompt_len[p.members], requests.room[p.members])
    assert (cap >= np.minimum(key[p.members] + OPTIONS.fcr_slack, requests.room[p.members])).all()


def test_the_oracle_without_a_key_cap_never_caps_a_row(requests, plans):
  uncapped = plan_continuous_oracle(requests, COST, OPTIONS, key_caps=(None,),
                                    drain_fractions=(0.0,))
  result = simulate_continuous(uncapped, requests, requests.true_length, COST, OPTIONS)
  assert result.carried_rows == 0 and result.recovery_batches == 0
  assert result.seconds == pytest.approx(uncapped.expected_cost, rel=1e-12)
  # the oracle also tries cascades (keys capped at K): never slower than without
  oracle = plans["continuous-oracle"]
  assert oracle.expected_cost <= uncapped.expected_cost
  assert oracle.expected_cost == pytest.approx(simulate_continuous(
      oracle, requests, requests.true_length, COST, OPTIONS).seconds, rel=1e-12)


@pytest.mark.parametrize("name", ["continuous-search", "continuous-oracle"])
def test_the_searches_drain_only_where_it_pays(requests, name):
  """Draining (ending a phase's low-occupancy tail, its rows carried on) is tried last: the
  plan chosen is never slower than the same search without it, the last phase never drains,
  and a drained plan's expected time is its simulation's."""
  planner = CONTINUOUS_PLANNERS[name]
  options = dataclasses.replace(OPTIONS, kv_budget_tokens=16 * 160)
  # the last phase's refill (tried after the drain) left out: it may add a phase after the last
  plain = planner(requests, COST, options, drain_fractions=(0.0,), last_refill_fractions=())
  drained = planner(requests, COST, options, last_refill_fractions=())
  assert drained.expected_cost <= plain.expected_cost
  assert drained.phases[-1].drain == 0 and all(p.drain == 0 for p in plain.phases)
  assert [r for r in drained.notes["search"] if r[0] == "drain"]
  fraction = drained.notes["drain_fraction"]
  assert all(p.drain == min(p.slots - 1, int(fraction * p.slots))
             for p in drained.phases[:-1])
  if name == "continuous-oracle":
    assert drained.expected_cost == pytest.approx(simulate_continuous(
        drained, requests, requests.true_length, COST, options).seconds, rel=1e-12)


def test_slots_go_past_the_largest_bucket_in_its_multiples_up_to_max_batch():
  """A budget and max_batch beyond the largest bucket (64 here): slots are the multiple of it
  the engine pads to (batch_bucket), as many as max_batch and the budget allow."""
  big = dataclasses.replace(OPTIONS, kv_budget_tokens=1 << 20, max_batch=200)
  assert slots_for(128, COST, big) == 192
  assert slots_for(128, COST, dataclasses.replace(big, kv_budget_tokens=128 * 150)) == 128
  assert slots_for(128, COST, dataclasses.replace(big, kv_budget_tokens=128 * 40)) == 32
  assert slots_for(128, COST, big, rows=70) == int(COST.padded_batch(70)) == 128
  assert slots_for(128, COST, OPTIONS) == 64  # max_batch 64: the largest bucket


@pytest.mark.parametrize("name", NAMES)
def test_no_phase_has_more_slots_than_rows_can_queue_there(name):
  """A small job under a large budget: a phase's slots stop at the batch bucket holding the
  requests of it and of the phases before it (every row its queue can ever hold)."""
  req = random_requests(n=40, seed=7)
  options = dataclasses.replace(OPTIONS, kv_budget_tokens=1 << 20, max_batch=512)
  plan = (plan_continuous(req, COST, options, threshold=0.5) if name == "continuous"
          else make_continuous_plan(name, req, COST, options))
  queued = 0
  for phase in plan.phases:
    queued += phase.members.size
    assert phase.slots == min(slots_for(phase.cache_len, COST, options),
                              int(COST.padded_batch(queued)))
  assert max(p.slots for p in plan.phases) <= int(COST.padded_batch(req.n)) < 512


def test_vanilla_is_one_uncapped_phase_in_dataset_order(requests, plans):
  (phase,) = plans["continuous-vanilla"].phases
  assert phase.members.tolist() == list(range(requests.n))
  assert phase.slots == slots_for(phase.cache_len, COST, OPTIONS, rows=requests.n)
  result = simulate_continuous(plans["continuous-vanilla"], requests, requests.true_length, COST,
                               OPTIONS)
  assert result.carried_rows == 0 and result.batches == 1


def test_search_expects_no_more_than_the_plain_plan_under_the_same_samples(requests, plans):
  searched = plans["continuous-search"]
  samples = sample_lengths(requests.pmf_within_room(), np.random.default_rng(0), 2)
  plain = plan_continuous(requests, COST, OPTIONS, threshold=0.6)
  plain_cost = expected_seconds(plain, requests, samples, COST, OPTIONS)
  assert searched.expected_cost <= plain_cost + 1e-12
  assert searched.expected_cost == pytest.approx(
      expected_seconds(searched, requests, samples, COST, OPTIONS), rel=1e-12)
  # the table holds the plain plan's own candidate at the same expected cost
  row = [r for r in searched.notes["search"]
         if r[0] == 0.6 and r[1] == 1 / 8 and r[2] == 2.0 and r[4] is None]
  assert len(row) == 1 and row[0][3] == pytest.approx(plain_cost, rel=1e-12)


def test_sampled_lengths_follow_the_pmf_within_room():
  rng = np.random.default_rng(7)
  pmf = rng.dirichlet(np.ones(30) * 0.5, size=4)
  draws = sample_lengths(pmf, np.random.default_rng(1), 100_000)
  assert draws.shape == (100_000, 4) and draws.min() >= 0 and draws.max() <= 29
  for i in range(4):
    np.testing.assert_allclose(np.bincount(draws[:, i], minlength=30) / 1e5, pmf[i], atol=6e-3)
  req = Requests(np.array([5, 20]), 30, length_pmf=np.ones((2, 40)))
  within = sample_lengths(req.pmf_within_room(), np.random.default_rng(2), 2000)
  assert (within <= req.room[None, :]).all() and (within == req.room[None, :]).any(axis=0).all()


def test_final_phase_holds_every_row_and_fits_the_budget():
  ctx = np.array([40, 200, 7])
  rooms = 320 - ctx
  phase = final_phase(ctx, rooms, COST, OPTIONS)
  assert (np.minimum(phase.cache_len - ctx, rooms) == rooms).all()  # nothing can be capped
  assert phase.slots * phase.cache_len <= OPTIONS.kv_budget_tokens
  assert phase.slots == 4 and phase.refill == 1  # the bucket that holds 3 rows
  with pytest.raises(ValueError, match="kv_budget_tokens"):
    final_phase(ctx, rooms, COST, dataclasses.replace(OPTIONS, kv_budget_tokens=100))


def test_rows_left_after_the_last_phase_get_extra_phases_then_an_error():
  req = Requests(np.array([10, 10, 10]), 200, true_length=np.array([5, 150, 60]))
  plan = ContinuousPlan([Phase(np.arange(3), 64, 2, 1)], "short")
  result = simulate_continuous(plan, req, req.true_length, COST, OPTIONS)
  assert (result.batches, result.recovery_batches, result.carried_rows) == (2, 1, 2)
  assert result.generated_tokens == 215
  with pytest.raises(RuntimeError, match="unfinished"):
    simulate_continuous(plan, req, req.true_length, COST, OPTIONS, max_extra_phases=0)


def test_unknown_planner_and_unfitting_budget_are_clear_errors(requests):
  with pytest.raises(ValueError, match="continuous-oracle"):
    make_continuous_plan("continuous-magic", requests, COST, OPTIONS)
  with pytest.raises(ValueError, match="kv_budget_tokens"):
    make_continuous_plan("continuous-vanilla", requests, COST,
                         dataclasses.replace(OPTIONS, kv_budget_tokens=200))


def test_on_a_bimodal_workload_under_a_binding_budget_continuous_beats_static_oracle():
  """Few long responses among many short ones: a static batch holds its KV cache until its
  longest row ends, a slot is refilled as soon as its row ends. (True for the SmolLM2 H100 cost
  model; with the 7B model's fixed per-call prefill cost the static oracle can win.)"""
  rng = np.random.default_rng(0)
  n = 300
  long = rng.random(n) < 0.3
  true = np.where(long, rng.integers(300, 520, n), rng.integers(5, 60, n))
  req = Requests(rng.integers(10, 60, n), 640, true_length=true)
  # SmolLM2's decode step on an H100 with a light per-call prefill cost
  cost = CostModel(step=(1.13, 0.0027, 0.0, 0.0, 9.6e-6), prefill=(2.0, 2.0e-4),
                   batch_overhead_ms=1.0)
  options = Options(kv_budget_tokens=32 * 640, max_batch=256)
  static_plan = make_plan("oracle", req, cost, options)
  static = simulate(static_plan, req, true, cost,
                    lambda u, g: plan_recovery("oracle", req, u, g, cost, options))
  plan = make_continuous_plan("continuous-oracle", req, cost, options)
  continuous = simulate_continuous(plan, req, true, cost, options)
  assert continuous.generated_tokens == static.generated_tokens
  assert continuous.seconds < static.seconds


def test_insert_block_is_the_engines_padding():
  """The simulator's insert block equals what SlotBatch.insert pads a context block to."""
  from lsdist_jax.shapes import context_block

  pb = COST.prompt_bucket
  for c_max in (1, 15, 16, 17, 40, 100, 200):
    for cache_len in (64, 128, 256):
      block = -(-c_max // pb) * pb
      assert int(insert_block(c_max, cache_len, COST)) == context_block(block, pb, cache_len)
  assert [int(insert_block(c, s, COST)) for c, s in ((40, 256), (200, 256), (200, 128))] == [
      64, 256, 208]


def test_a_search_charged_for_compilation_plans_fewer_programs(requests):
  """With every program costing seconds to compile (schedule.compile_seconds), the search picks
  a plan that compiles fewer programs than the steady-state one and carries no row on to a
  phase the runner appends (whose programs cannot be compiled ahead)."""
  free = make_continuous_plan("continuous-search", requests, COST, OPTIONS)
  charged = make_continuous_plan("continuous-search", requests, COST,
                                 dataclasses.replace(OPTIONS, compile_seconds=100.0))
  true = np.asarray(requests.true_length)
  run_free = simulate_continuous(free, requests, true, COST, OPTIONS)
  run_charged = simulate_continuous(charged, requests, true, COST, OPTIONS)
  assert run_charged.programs < run_free.programs
  assert run_charged.recovery_batches == 0
  # the charge is part of the expected time the search compares
  samples = true[None, :]
  plain = expected_seconds(charged, requests, samples, COST, OPTIONS)
  priced = expected_seconds(charged, requests, samples, COST,
                            dataclasses.replace(OPTIONS, compile_seconds=2.0))
  assert priced == pytest.approx(plain + 2.0 * run_charged.programs)
  # programs compiled (or compiling) already are not charged: the early start's decode loop
  assert len(run_charged.program_keys) == run_charged.programs
  decode = {key for key in run_charged.program_keys if key[0] == "decode"}
  assert decode
  early = expected_seconds(charged, requests, samples, COST,
                           dataclasses.replace(OPTIONS, compile_seconds=2.0, compiled=decode))
  assert early == pytest.approx(priced - 2.0 * len(decode))


def test_one_block_per_phase_pays_where_compilation_is_charged():
  """Charged for each program's compilation, the search pads a phase's inserts to one context
  block (each refill then one program, whatever its rows' prompts) where that costs less;
  steady state (nothing charged) it never pads. The padded plan compiles fewer programs."""
  from lsdist_jax.schedule.continuous_search import with_blocks

  base = random_requests(n=400, seed=3)
  # mostly short prompts, one in ten long: small refills see several context blocks
  prompt = np.where(np.arange(base.n) % 10 == 0, 60, 5)
  requests = Requests(prompt, base.max_seq_len, base.length_pmf, true_length=base.true_length)

  def search(seconds):
    return make_continuous_plan("continuous-search", requests, COST,
                                dataclasses.replace(OPTIONS, compile_seconds=seconds))

  free, charged = search(0.0), search(100.0)
  assert all(p.block == 0 for p in free.phases) and not free.notes["one_block"]
  assert charged.notes["one_block"] and any(p.block > 0 for p in charged.phases)
  true = np.asarray(requests.true_length)
  plain = dataclasses.replace(charged, phases=[dataclasses.replace(p, block=0)
                                               for p in charged.phases])
  padded = simulate_continuous(charged, requests, true, COST, OPTIONS)
  unpadded = simulate_continuous(plain, requests, true, COST, OPTIONS)
  assert padded.programs < unpadded.programs
  assert padded.seconds >= unpadded.seconds  # the padding costs prefill time, never saves it
  # each phase's block: that of its longest member prompt
  for p in with_blocks(charged.phases, requests, COST):
    assert p.block == int(insert_block(int(requests.prompt_len[p.members].max()), p.cache_len,
                                       COST))
  with pytest.raises(ValueError, match="block"):
    Phase([0], 64, 4, 1, block=65)


def test_the_search_admits_in_the_order_of_least_expected_time(requests):
  """Besides each phase's own order (longest key first) the search tries the predicted mean's
  longest-first and shortest-first orders and keeps the one of least expected time; an order
  only permutes each phase's members."""
  from lsdist_jax.schedule.continuous_search import admission_orders, with_order

  plan = make_continuous_plan("continuous-search", requests, COST, OPTIONS)
  rows = [r for r in plan.notes["search"] if r[0] == "order"]
  assert [r[1] for r in rows] == ["mean_longest_first", "mean_shortest_first"]
  assert plan.notes["admission"] in ("key_longest_first", "mean_longest_first",
                                     "mean_shortest_first")
  assert plan.expected_cost <= min(r[3] for r in rows) + 1e-9
  mean = dist.mean(requests.pmf_within_room())
  for name, order in admission_orders(requests).items():
    assert sorted(order.tolist()) == list(range(requests.n))
    ranked = mean[order]
    assert (np.diff(ranked) <= 0).all() if name == "mean_longest_first" else (
        np.diff(ranked) >= 0).all()
    for before, after in zip(plan.phases, with_order(plan.phases, order)):
      assert sorted(before.members.tolist()) == sorted(after.members.tolist())
      assert (np.diff(np.argsort(order)[after.members]) > 0).all()  # in `order` within a phase


def test_the_last_refill_is_tried_and_kept_only_where_expected_time_falls(requests):
  """The searches try, last, the refill of the phase that holds every request's whole room (the
  last phase's own where its cache is that long, else one more phase without members of its own
  for the rows capped at the end): a variant is kept only where the expected time falls, and
  the plan keeps every request once within the KV budget."""
  from lsdist_jax.schedule.continuous_search import (LAST_REFILL_FRACTIONS, slot_cache_len,
                                                     with_last_refill)

  top = int(slot_cache_len(requests.prompt_len, requests.room, COST).max())
  for name in ("continuous-search", "continuous-oracle"):
    planner = CONTINUOUS_PLANNERS[name]
    # a cascade (keys capped short): rows carry to the end, where the refill matters
    plain = planner(requests, COST, OPTIONS, key_caps=(32,), last_refill_fractions=(),
                    split_first=())
    tried = planner(requests, COST, OPTIONS, key_caps=(32,), split_first=())
    rows = [r for r in tried.notes["search"] if r[0] == "last_refill"]
    assert rows and {r[1] for r in rows} <= set(LAST_REFILL_FRACTIONS)
    assert plain.notes["last_refill"] is None and not [
        r for r in plain.notes["search"] if r[0] == "last_refill"]
    assert tried.expected_cost <= plain.expected_cost
    if tried.notes["last_refill"] is None:
      assert all(r[3] >= plain.expected_cost for r in rows)
      assert _phases_equal(tried.phases, plain.phases)
    else:
      assert tried.expected_cost < plain.expected_cost
      assert tried.expected_cost == pytest.approx(min(r[3] for r in rows), rel=1e-12)
      assert _phases_equal(tried.phases, with_last_refill(
          plain.phases, requests, COST, OPTIONS, tried.notes["last_refill"]))
      assert tried.phases[-1].cache_len == top
    make_continuous_plan(name, requests, COST, OPTIONS)  # coverage and budget checks pass


def _phases_equal(a, b) -> bool:
  return len(a) == len(b) and all(
      (p.cache_len, p.slots, p.refill, p.drain, p.block) == (q.cache_len, q.slots, q.refill,
                                                             q.drain, q.block)
      and p.members.tolist() == q.members.tolist() for p, q in zip(a, b))


def test_an_appended_whole_room_phase_runs_as_the_runners_final_phase():
  """with_last_refill appends, to phases whose last cache is short, a phase of the whole-room
  cache with no members: at the final phase's own refill and slots it simulates exactly as the
  runner's final phase; at another refill it is what the capped rows run in (no extra phase),
  replayed step by step the same; a whole-room last phase only changes its refill."""
  from lsdist_jax.schedule.continuous_search import continuous_phases, with_last_refill

  requests = random_requests(n=60, seed=5)
  options = dataclasses.replace(OPTIONS, kv_budget_tokens=8 * 320)  # 8 slots of the whole room
  key = np.minimum(requests.true_length, 24)  # short caches: most long rows are capped
  phases = continuous_phases(requests, key, COST, options)
  base = ContinuousPlan(phases, "x")
  ran = simulate_continuous(base, requests, requests.true_length, COST, options)
  assert ran.recovery_batches == 1  # the runner's final phase: > 8 rows, so 8 slots
  same = ContinuousPlan(with_last_refill(phases, requests, COST, options, 1 / 8), "x")
  assert same.phases[-1].slots == 8
  assert same.phases[-1].members.size == 0 and len(same.phases) == len(phases) + 1
  again = simulate_continuous(same, requests, requests.true_length, COST, options)
  assert again.recovery_batches == 0 and again.seconds == pytest.approx(ran.seconds, rel=1e-12)
  assert again.decode_steps == ran.decode_steps and again.insert_calls == ran.insert_calls
  for fraction in (1 / 2, 1.0):
    plan = ContinuousPlan(with_last_refill(phases, requests, COST, options, fraction), "x")
    assert plan.phases[-1].refill == max(1, round(fraction * plan.phases[-1].slots))
    got = simulate_continuous(plan, requests, requests.true_length, COST, options)
    ref = reference_simulate(plan, requests, requests.true_length, COST, options)
    assert got.recovery_batches == 0 and got.seconds == pytest.approx(ref["seconds"], rel=1e-9)
  whole = with_last_refill(plan.phases, requests, COST, options, 1 / 4)
  assert len(whole) == len(plan.phases) and whole[-1].refill == whole[-1].slots // 4


@pytest.mark.parametrize("name", ["continuous-search", "continuous-oracle"])
def test_rows_capped_together_end_in_a_phase_that_takes_them_together(name):
  """Half the requests run to 300 tokens, which no prediction tells apart: they are capped in
  the short, wide cache together and their rest is equally long. The runner's final phase
  would take them a refill (slots / 8) at a time as its slots all free at once; the search
  appends a whole-room phase that refills every slot, and the run is faster."""
  n = 200
  pmf = np.zeros((n, 311))
  pmf[:, [5, 300]] = 0.5
  true = np.where(np.arange(n) % 2 == 0, 5, 300)
  requests = Requests(np.full(n, 10), 320, pmf, true_length=true)
  planner = CONTINUOUS_PLANNERS[name]
  plain = planner(requests, COST, OPTIONS, last_refill_fractions=())
  tried = planner(requests, COST, OPTIONS)
  assert plain.phases[-1].cache_len < 320 and plain.notes["last_refill"] is None
  assert tried.notes["last_refill"] == 1.0 and tried.expected_cost < plain.expected_cost
  last = tried.phases[-1]
  assert last.cache_len == 320 and last.members.size == 0 and last.refill == last.slots
  assert _phases_equal(tried.phases[:-1], plain.phases)
  faster = simulate_continuous(tried, requests, true, COST, OPTIONS)
  slower = simulate_continuous(plain, requests, true, COST, OPTIONS)
  assert faster.recovery_batches == 0 and slower.recovery_batches == 1
  assert faster.seconds < slower.seconds


def test_first_fills_are_split_where_compilation_is_charged_and_one_insert_where_it_is_cheaper(
    requests):
  """The searches plan with first fills split (`Phase.split_first`: the refills' programs,
  none of all the slots' rows) where compilation is charged, else one insert, and try the
  other last, kept only where the expected time falls: with compilation charged (the search's
  expected time charges it; the oracle's simulated time does not) the split fill wins; with
  none charged and costly prefill calls, one insert. continuous-vanilla decides by the first
  fill's own cost."""
  from lsdist_jax.schedule.continuous_search import first_fill_by_cost

  calls = dataclasses.replace(COST, batch_overhead_ms=400.0)  # each insert call costs 0.4 s
  for cost, compile_seconds, want in ((COST, 50.0, True), (calls, 0.0, False)):
    options = dataclasses.replace(OPTIONS, compile_seconds=compile_seconds)
    for name in ("continuous-search", "continuous-oracle"):
      plan = CONTINUOUS_PLANNERS[name](requests, cost, options)
      rows = [r for r in plan.notes["search"] if r[0] == "split_first"]
      chosen, own = plan.notes["split_first"], compile_seconds > 0
      assert len(rows) == 1 and rows[0][1] is (not own)
      assert {p.split_first for p in plan.phases} == {chosen}
      assert (plan.expected_cost <= rows[0][3]) if chosen is own else (
          plan.expected_cost == pytest.approx(rows[0][3], rel=1e-12))
      if name == "continuous-search" or not compile_seconds:
        assert chosen is want, (name, compile_seconds)
      make_continuous_plan(name, requests, cost, options)
    vanilla = CONTINUOUS_PLANNERS["continuous-vanilla"](requests, cost, options)
    assert vanilla.phases[0].split_first is want
  # a phase that takes every request at once has nothing to split
  whole = Phase(np.arange(8), 256, 16, 2)
  assert first_fill_by_cost(whole, requests, calls, OPTIONS) is whole
