"""The runner on the tiny model: capped plans with recovery return exactly the uncapped responses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsdist_jax.llama.generator import Generator
from lsdist_jax.shapes import Buckets
from lsdist_jax.llama.model import Llama
from lsdist_jax.schedule.continuous import Phase
from lsdist_jax.serve.runner import Runner


from conftest import Batch, Plan, RunnerEngine as _Engine  # noqa: E402


@pytest.fixture(scope="module")
def runner(tiny_params):
  cfg, params = tiny_params
  gen = Generator(Llama(cfg, jnp.float32, jnp.float32), params,
                  buckets=Buckets(batch=(1, 2, 4, 8, 16), prompt=8, cache=32))
  rng = np.random.default_rng(11)
  prompts = [[1] + rng.integers(3, 256, size=rng.integers(3, 12)).tolist() for _ in range(12)]
  return Runner(_Engine(gen), prompts, request_ids=range(100, 112), temperature=0.8, top_p=0.9,
                seed=3, max_seq_len=72)


def test_fcr_recovery_equals_uncapped_generation(runner):
  vanilla = runner.run(Plan([Batch(np.arange(12), 72)]))
  assert not any(r.phase == "recovery" for r in vanilla.batches)
  order = np.random.default_rng(0).permutation(12)
  capped = Plan([Batch(order[:5], 4), Batch(order[5:9], 7), Batch(order[9:], 2)])
  recovered = runner.run(capped, recover=lambda ids, so_far: [Batch(ids[::2], 5),
                                                                Batch(ids[1::2], 9)])
  assert any(r.phase == "recovery" for r in recovered.batches)
  assert recovered.tokens == vanilla.tokens
  assert (recovered.finished == vanilla.finished).all()


def test_request_longer_than_its_cap_is_recovered_never_lost(runner):
  result = runner.run(Plan([Batch(np.arange(12), 1)]))  # every row capped at one token
  lengths = np.array([len(t) for t in result.tokens])
  assert (lengths > 1).any()
  done_at_max = runner.prompt_len + lengths >= runner.max_seq_len
  assert (result.finished | done_at_max).all()
  assert result.effective_token_ratio <= 1.0
  assert result.generated_tokens == lengths.sum()


def test_plan_that_loses_or_repeats_a_request_is_refused(runner):
  with pytest.raises(ValueError, match="exactly once"):
    runner.run(Plan([Batch(np.arange(11), 72)]))
  with pytest.raises(ValueError, match="exactly once"):
    runner.run(Plan([Batch(np.arange(12), 72), Batch(np.array([3]), 72)]))


def test_length_replay_runs_to_the_recorded_lengths(tiny_params):
  cfg, params = tiny_params
  gen = Generator(Llama(cfg, jnp.float32, jnp.float32), params,
                  buckets=Buckets(batch=(1, 2, 4, 8), prompt=8, cache=32))
  prompts = [[1, 5, 6], [1, 7], [1, 9, 9, 9]]
  forced = [5, 0, 30]
  replay = Runner(_Engine(gen), prompts, [0, 1, 2], temperature=0.6, top_p=0.9, seed=0,
                  max_seq_len=64, forced_lengths=forced)
  result = replay.run(Plan([Batch(np.arange(3), 8)]))
  assert [len(t) for t in result.tokens] == forced
  assert result.finished.all()


def test_static_batches_run_the_steps_the_simulator_counts(runner):
  """A row that reaches its room is done as it takes its last token, one step before a row of
  that length would sample its EOS: the simulator's steps (computed tokens) are the engine's,
  with rows at their room among the longest."""
  from lsdist_jax.schedule import CostModel, Requests
  from lsdist_jax.schedule.simulate import simulate
  from lsdist_jax.schedule.types import Batch as SimBatch, Plan as SimPlan

  true = np.array([len(t) for t in runner.run(Plan([Batch(np.arange(12), 72)])).tokens])
  room = runner.max_seq_len - runner.prompt_len
  assert (true == room).any()
  requests = Requests(runner.prompt_len, runner.max_seq_len, true_length=true)
  cost = CostModel(batch_buckets=(1, 2, 4, 8, 16), prompt_bucket=8, cache_bucket=32)
  for groups in ([np.arange(12)], [np.arange(6), np.arange(6, 12)],
                 [np.array([2, 10, 4]), np.array([0, 1, 3, 5, 6, 7, 8, 9, 11])]):
    result = runner.run(Plan([Batch(g, 72) for g in groups]))
    sim = simulate(SimPlan([SimBatch(g, 72) for g in groups], "static"), requests, true, cost)
    assert sum(r.padded_size * (r.steps + 1) for r in result.batches) == sim.computed_tokens


def test_profile_rows_vary_live_tokens_at_one_shape_and_fit_a_cost_model(tiny_params):
  from lsdist_jax.benchmark.profile import profile_cost
  from lsdist_jax.schedule import CostModel

  cfg, params = tiny_params
  gen = Generator(Llama(cfg, jnp.float32, jnp.float32), params,
                  buckets=Buckets(batch=(4, 8), prompt=8, cache=32))
  engine = _Engine(gen)
  engine.config = cfg
  rows = profile_cost(engine, [4, 8], [64], steps=8, prompt_len=8, repeats=1)
  assert gen.compile_count == 2  # one program per (batch, cache) shape, whatever the active share
  assert len(rows) == 4
  by_share = {(r["batch"], r["live_tokens"]) for r in rows}
  # a quarter of the rows active reads a quarter of the live tokens (at least one row)
  assert by_share == {(4, 4 * 20.5), (4, 1 * 20.5), (8, 8 * 20.5), (8, 2 * 20.5)}
  assert all(set(r) >= {"ms_per_step", "prefill_ms", "cache_len", "prompt_len"} for r in rows)
  fitted = CostModel.fit(rows)
  assert len(fitted.step) == 5 and min(fitted.step) >= 0.0
  # two prompt lengths: rows of each, for the prefill's per-token slope
  # sampled as the planned runs sample (the nucleus's per-step cost is not greedy's)
  asked, real = [], gen.generate
  gen.generate = lambda *a, **kw: asked.append((kw["temperature"], kw["top_p"])) or real(*a, **kw)
  two = profile_cost(engine, [4], [64], steps=8, prompt_len=(8, 24), repeats=1,
                     active_shares=(1.0,), sampling=(0.7, 0.9))
  assert [r["prompt_len"] for r in two] == [8, 24] and set(asked) == {(0.7, 0.9)}
  assert len(CostModel.fit(rows + two).prefill) == 2


def test_slot_profile_times_the_runners_own_calls_and_fits_a_cost_model(tiny_params):
  from lsdist_jax.benchmark.profile import profile_slots
  from lsdist_jax.schedule import CostModel

  cfg, params = tiny_params
  gen = Generator(Llama(cfg, jnp.float32, jnp.float32), params,
                  buckets=Buckets(batch=(2, 4, 8), prompt=8, cache=32))
  engine = _Engine(gen)
  opened, real = [], gen.open_slots
  gen.open_slots = lambda *a, **kw: opened.append((kw["temperature"], kw["top_p"])) or real(*a,
                                                                                           **kw)
  rows = profile_slots(engine, [4, 8], [64], steps=8, prompt_len=[8, 32], insert_rows=(2, 8),
                       repeats=1, sampling=(0.7, 0.9))
  assert set(opened) == {(0.7, 0.9)}  # its slots sample as the planned runs'
  gen.open_slots = real
  decode = [r for r in rows if "ms_per_step" in r]
  inserts = [r for r in rows if "prefill_ms" in r]
  programs = [r for r in rows if "program" in r]
  # each slot program updates the donated state in place: no temporary copy of its KV cache
  assert {r["program"].split("/")[0] for r in programs} == {"slot_insert", "slot_first",
                                                             "slot_decode"}
  for r in programs:
    slots, cache = (int(x) for x in r["program"].split("/")[1:3])
    state = sum(x.nbytes for x in jax.tree.leaves(
        gen.open_slots(slots, cache, max_seq_len=cache).state))
    assert r["alias_bytes"] == state, r
    if not r["program"].endswith("/32/-1"):
      assert r["temp_bytes"] < state / 2, r  # (a longer block's prefill needs more than that)
  # per slot batch: an insert of each rows count (at most its slots) and context, a decode
  # row per share and context (a row's live tokens: its context and 12.5 for 8 of 16 steps)
  assert sorted((r["slots"], r["batch"], r["prompt_len"]) for r in inserts) == [
      (s, k, p) for s, ks in ((4, (2, 4)), (8, (2, 8))) for k in ks for p in (8, 32)]
  assert all(r["prefill_ms"] > 0 for r in inserts)
  assert sorted((r["batch"], r["context_len"], r["live_tokens"]) for r in decode) == [
      (b, p, a * (p + 12.5)) for b, shares in ((4, (1, 4)), (8, (2, 8))) for p in (8, 32)
      for a in shares]
  # a difference of two timings (noise on a busy machine may make it negative): a number
  assert all(r["call_ms"] >= 0 and np.isfinite(r["ms_per_step"]) for r in decode)
  fitted = CostModel.fit(rows)
  assert fitted.batch_overhead_ms == pytest.approx(np.median([r["call_ms"] for r in decode]))
  assert min(fitted.step) >= 0.0 and min(fitted.prefill) >= 0.0


@dataclasses.dataclass
class ContinuousPlan:
  phases: list


def test_continuous_plan_with_carried_rows_equals_static_generation(runner):
  vanilla = runner.run(Plan([Batch(np.arange(12), 72)]))
  order = np.random.default_rng(1).permutation(12)
  # 32-token slots cap most rows; they continue in the 64-token phase, then in an extra phase
  plan = ContinuousPlan([Phase(order[:7], 32, 4, 1), Phase(order[7:], 64, 2, 2)])
  extra = []

  def final_phase(contexts, rooms):
    extra.append(len(contexts))
    return Phase(np.zeros(0, np.int64), 96, 4, 1)

  result = runner.run_continuous(plan, final_phase)
  assert result.tokens == vanilla.tokens
  assert (result.finished == vanilla.finished).all()
  assert any(r.phase == "main" for r in result.batches)
  assert extra and any(r.phase == "recovery" for r in result.batches)
  assert result.generated_tokens == vanilla.generated_tokens
  assert sum(r.generated for r in result.batches) == result.generated_tokens
  assert 0 < result.effective_token_ratio <= 1.0
  with pytest.raises(ValueError, match="exactly once"):
    runner.run_continuous(ContinuousPlan([Phase(order[:7], 32, 4, 1)]))


def test_a_phase_that_refills_makes_its_first_fill_of_refill_sized_inserts(runner, monkeypatch):
  """A phase with more rows than slots fills its slots with inserts of a refill's bucket, one
  after another (the programs its refills run), so no insert or sampler of all its slots' rows
  is compiled; one whose rows fit its slots, or that does not split its first fill, inserts
  them in one call. Token for token as one static batch every way."""
  vanilla = runner.run(Plan([Batch(np.arange(12), 72)]))
  gen = runner.engine.generator
  order = np.random.default_rng(6).permutation(12)

  def names(since):
    return [e["name"] for e in gen.compile_log[since:]]

  before = len(gen.compile_log)
  result = runner.run_continuous(ContinuousPlan([Phase(order, 80, 8, 2)]))
  assert result.tokens == vanilla.tokens
  assert (result.finished == vanilla.finished).all()
  compiled = names(before)
  assert "slot_decode/8/96" in compiled
  assert not any(n.startswith(("slot_insert/8/96/8/", "slot_first/8/96/8")) for n in compiled)
  assert any(n.startswith("slot_insert/8/96/2/") for n in compiled)
  assert result.seconds["calls"][0][0] == 8  # the first fill: all 8 slots, before any decode
  before = len(gen.compile_log)
  fits = runner.run_continuous(ContinuousPlan([Phase(order[:8], 80, 8, 2),
                                               Phase(order[8:], 96, 4, 4)]))
  assert any(n.startswith("slot_insert/8/96/8/") for n in names(before))
  assert fits.tokens == vanilla.tokens
  # a phase that does not split its first fill inserts all its first rows in one call (that
  # program, compiled just above)
  from lsdist_jax.llama.slots import SlotBatch

  inserted, real_insert = [], SlotBatch.insert
  monkeypatch.setattr(SlotBatch, "insert", lambda self, slot_ids, contexts, *a, **k: (
      inserted.append(len(contexts)), real_insert(self, slot_ids, contexts, *a, **k))[1])
  for split in (True, False):
    inserted.clear()
    run = runner.run_continuous(ContinuousPlan([Phase(order, 80, 8, 2, split_first=split)]))
    assert run.tokens == vanilla.tokens
    assert inserted[:4 if split else 1] == ([2, 2, 2, 2] if split else [8])


def test_a_planned_phase_without_members_runs_the_rows_carried_into_it(runner):
  """The searches may end a plan with a whole-room phase of no members of its own
  (continuous_search.with_last_refill): the rows capped before run there, token for token as
  one static batch, and the runner appends no final phase; one that nothing reaches runs no
  call."""
  vanilla = runner.run(Plan([Batch(np.arange(12), 72)]))
  order = np.random.default_rng(2).permutation(12)
  plan = ContinuousPlan([Phase(order, 32, 4, 1), Phase(np.zeros(0, np.int64), 96, 4, 4)])

  def final_phase(contexts, rooms):
    raise AssertionError("no row should be left after the plan's own phases")

  result = runner.run_continuous(plan, final_phase)
  assert result.tokens == vanilla.tokens
  assert (result.finished == vanilla.finished).all()
  assert {r.phase for r in result.batches} == {"main"}
  assert any(r.cache_len == 96 for r in result.batches)
  whole = runner.run_continuous(ContinuousPlan([Phase(order, 96, 4, 1),
                                                Phase(np.zeros(0, np.int64), 96, 4, 4)]),
                                final_phase)
  assert whole.tokens == vanilla.tokens


def test_a_draining_phase_carries_its_running_rows_on_unchanged(runner):
  """Phases that end once at most `drain` rows still run (schedule/continuous.py): those rows
  leave mid-response and continue in the next phase, token for token as one static batch."""
  vanilla = runner.run(Plan([Batch(np.arange(12), 72)]))
  order = np.random.default_rng(4).permutation(12)
  first = Phase(order[:8], 64, 4, 1, drain=2)
  # the first phase alone: the rows it carries on are those that did not fit or reached their
  # slot's room, plus at most `drain` rows cut mid-response
  generated = [[] for _ in range(12)]
  finished = np.zeros(12, bool)
  seconds = {"generate": 0.0, "recover": 0.0, "compile": 0.0}
  carried = runner._run_phase(first, [int(r) for r in first.members], "main", generated,
                              finished, [], seconds)
  room = np.minimum(64, runner.max_seq_len) - runner.prompt_len
  cut = [r for r in carried if 0 < len(generated[r]) < room[r]]
  assert 1 <= len(cut) <= first.drain
  assert all(vanilla.tokens[r][:len(generated[r])] == generated[r] for r in cut)
  plan = ContinuousPlan([first, Phase(order[8:], 96, 4, 2, drain=3)])
  result = runner.run_continuous(plan, lambda c, r: Phase(np.zeros(0, np.int64), 96, 4, 1))
  assert result.tokens == vanilla.tokens
  assert (result.finished == vanilla.finished).all()


def test_progress_is_reported_as_each_request_completes(runner):
  """The generate job's bar: each request counted once, when it completes (not per chunk),
  with every kept token, for static batches with recovery and for continuous phases."""
  calls = []
  runner.on_progress = lambda requests, tokens: calls.append((requests, tokens))
  try:
    order = np.random.default_rng(2).permutation(12)
    static = runner.run(Plan([Batch(order[:6], 3), Batch(order[6:], 72)]),
                        recover=lambda ids, so_far: [Batch(ids, 72)])
    assert sum(c[0] for c in calls) == 12 and sum(c[1] for c in calls) == static.generated_tokens
    assert len([c for c in calls if c[0]]) >= 2  # moved before the end
    calls.clear()
    plan = ContinuousPlan([Phase(order[:7], 32, 4, 1), Phase(order[7:], 64, 2, 2)])
    result = runner.run_continuous(plan, lambda c, r: Phase(np.zeros(0, np.int64), 96, 4, 1))
    assert sum(c[0] for c in calls) == 12 and sum(c[1] for c in calls) == result.generated_tokens
    assert len([c for c in calls if c[0]]) > 3
  finally:
    runner.on_progress = lambda requests, tokens: None


def test_device_lock_serialises_calls_and_its_wait_is_not_timed(runner, tmp_path):
  """Benchmark workers sharing a device: a call waits for the lock, and the runner leaves the
  wait out of the batch's time."""
  import fcntl
  import threading
  import time

  gen = runner.engine.generator
  plan = Plan([Batch(np.arange(12), 72)])
  free = runner.run(plan)  # compiled, unlocked
  lock = str(tmp_path / "device.lock")
  held = threading.Event()

  def hold(seconds=1.5):
    with open(lock, "a") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      held.set()
      time.sleep(seconds)
      fcntl.flock(f, fcntl.LOCK_UN)

  gen.device_lock, wait0 = lock, gen.wait_seconds
  try:
    other = threading.Thread(target=hold)
    other.start()
    held.wait()
    start = time.perf_counter()
    locked = runner.run(plan)
    wall = time.perf_counter() - start
    other.join()
  finally:
    gen.device_lock = None
  waited = gen.wait_seconds - wait0
  assert waited > 1.0  # the call waited for the other holder
  assert locked.tokens == free.tokens
  assert locked.seconds["generate"] < wall - 1.0  # ... and that wait is not counted
