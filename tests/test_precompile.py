"""Compilation ahead of use on the tiny model: the programs compiled in background threads are
exactly the ones a run then needs (nothing compiles again in the foreground), and the tokens
are those of a run that compiled each program on first use."""

import jax.numpy as jnp
import numpy as np
import pytest

from lsdist_jax.llama.generator import Generator
from lsdist_jax.llama.model import Llama
from lsdist_jax.serve.runner import Runner
from lsdist_jax.shapes import Buckets
from lsdist_jax.schedule.continuous import Phase
from test_runner import ContinuousPlan, _Engine  # the runner tests' plan stand-ins

BUCKETS = dict(batch=(1, 2, 4, 8), prompt=8, cache=32)
SAMPLING = dict(temperature=0.8, top_p=0.9, seed=5)


def _generator(tiny_params, threads):
  cfg, params = tiny_params
  return Generator(Llama(cfg, jnp.float32, jnp.float32), params, buckets=Buckets(**BUCKETS),
                   compile_threads=threads)


def _prompts(n, lo, hi, seed=0):
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(3, 256, size=rng.integers(lo, hi)).tolist() for _ in range(n)]


def _slot_run(gen):
  """A fill of 4 rows, then refills of 2 (padded to 2 rows), all with 9-16 token prompts."""
  batch = gen.open_slots(4, 64, max_seq_len=64, **SAMPLING)
  prompts = _prompts(6, 8, 15)
  batch.insert([0, 1, 2, 3], prompts[:4], [0, 1, 2, 3], [0] * 4)
  batch.decode(2)
  free = np.nonzero(batch.read().done)[0][:2].tolist()
  batch.insert(free, prompts[4:4 + len(free)], [4, 5][:len(free)], [0] * len(free),
               min_rows=2)
  batch.decode(4)
  read = batch.read()
  return read.tokens.tolist(), read.num_generated.tolist()


def test_precompiled_slot_programs_are_the_ones_run(tiny_params, monkeypatch):
  import sys

  from lsdist_jax.processes import GIL_HANDOFF_S

  monkeypatch.setattr(sys, "getswitchinterval", lambda: 0.005)  # Python's default: 5 ms
  switched = []
  monkeypatch.setattr(sys, "setswitchinterval", switched.append)
  gen = _generator(tiny_params, threads=2)
  started = gen.precompile_slots(4, 64, [(4, 16), (2, 16)])
  # compile threads trace in Python: the threads beside them get the GIL back sooner
  assert switched == [GIL_HANDOFF_S] and GIL_HANDOFF_S < 0.005
  assert started == 5  # decode + two inserts, each with its first-token sampling
  assert gen.precompile_slots(4, 64, [(4, 16)]) == 0  # already compiling: not again
  for future in list(gen._pending.values()):  # built (else a refill runs a covering program)
    future.result()
  tokens = _slot_run(gen)
  assert gen.compile_count == 5 and gen.precompiled_runs == 5  # none compiled in the foreground
  assert gen.background_compile_seconds > 0
  # each says how long it lowered, and when in the process it started
  assert all(0 < e["lower"] < e["seconds"] and e["started"] > 0 for e in gen.compile_log)
  # queued behind a running compilation: cancelled, never run; the one under way finishes
  busy = _generator(tiny_params, threads=1)
  assert busy.precompile_slots(4, 64, [(4, 16), (2, 16), (1, 16)]) == 7
  assert busy.drop_precompiles() >= 1 and len(busy._pending) <= 1
  plain = _generator(tiny_params, threads=0)
  assert plain.precompile_slots(4, 64, [(4, 16)]) == 0  # off
  assert _slot_run(plain) == tokens
  assert plain.compile_count == 5 and plain.precompiled_runs == 0


def test_embed_runs_one_program_per_block_and_keeps_prompt_order(tiny_params):
  gen = _generator(tiny_params, threads=2)
  prompts = _prompts(11, 2, 40, seed=3)
  hidden = gen.embed(prompts, max_batch=4)
  blocks = {min(b for b in (8, 16, 32, 64) if b >= -(-len(p) // 8) * 8) for p in prompts}
  assert gen.compile_count <= len(blocks) and gen.precompiled_runs == gen.compile_count
  alone = np.concatenate([gen.embed([p]) for p in prompts[:5]])
  np.testing.assert_allclose(hidden[:5], alone, rtol=2e-4, atol=2e-4)


def test_merge_blocks_merges_the_cheapest_levels_while_padding_costs_less_than_compiling():
  from lsdist_jax.shapes import merge_blocks

  def seconds(rows, block):  # 1 ms a row-token: 64 rows x 64 more tokens cost 4.1 s
    return 1e-3 * rows * block

  calls = [64] * 5 + [128] * 2 + [256]
  assert merge_blocks(calls, 64, seconds, 0.0) == {64: 64, 128: 128, 256: 256}  # none
  # 128 -> 256: 2 calls x 8.2 s = 16.4 s; 64 -> 128: 5 x 4.1 = 20.5 s
  assert merge_blocks(calls, 64, seconds, 17.0) == {64: 64, 128: 256, 256: 256}
  # then 64 -> 256: 5 x 12.3 = 61.4 s
  assert merge_blocks(calls, 64, seconds, 70.0) == {64: 256, 128: 256, 256: 256}
  assert merge_blocks([32, 32], 8, seconds, 1e9) == {32: 32}


def test_embed_rows_pad_the_least_time_of_prefill():
  from lsdist_jax.shapes import embed_rows

  def per_token(rows, block):  # no fixed cost a call: the fewest padded rows win
    return 1e-6 * rows * block

  def per_call(rows, block):  # a large fixed cost a call: the fewest calls win
    return 1.0 + 1e-6 * rows * block

  assert embed_rows(24, (4, 16, 64), 128) == 64  # no cost model: the largest
  assert embed_rows(24, (4, 16, 64), 128, per_token) == 4  # 24 rows, none padded
  assert embed_rows(24, (16, 64), 128, per_token) == 16  # 2 x 16 = 32 rows, not 64
  assert embed_rows(24, (4, 16, 64), 128, per_call) == 64  # one call
  assert embed_rows(64, (16, 64), 128, per_token) == 64  # equal padding: the fewer calls


def test_embed_rows_count_a_slot_profiles_fixed_cost_per_call():
  """A slot runner's profile fits no prefill intercept (a call's fixed cost is its
  batch_overhead_ms): the embedding's calls are sized with it, not one prompt per call (as a
  GPU run did, 763 prompts embedded in 3 s)."""
  from lsdist_jax.schedule import CostModel
  from lsdist_jax.shapes import embed_rows

  cost = CostModel(step=(1.0, 0.003, 1e-6, 1e-4, 5e-6), prefill=(0.0, 0.00176),
                   batch_overhead_ms=4.0)
  sizes = (1, 2, 4, 8, 16, 32, 64)
  assert embed_rows(763, sizes, 256, cost.prefill_time) == 1  # what the prefill alone picks
  assert embed_rows(763, sizes, 256, cost.prefill_call_time) == 64
  assert cost.prefill_call_time(8, 256) == cost.prefill_time(8, 256) + 4e-3


def test_embed_with_merged_blocks_compiles_one_program_and_keeps_the_states(tiny_params):
  gen = _generator(tiny_params, threads=2)
  prompts = _prompts(11, 2, 40, seed=3)  # blocks of 8 to 64 tokens
  bucketed = gen.embed(prompts, max_batch=4)
  assert gen.compile_count > 1
  merged_gen = _generator(tiny_params, threads=2)
  merged = merged_gen.embed(prompts, max_batch=4, prefill_seconds=lambda rows, block: 0.0,
                            compile_seconds=1.0)
  assert merged_gen.compile_count == 1
  np.testing.assert_allclose(merged, bucketed, rtol=2e-4, atol=2e-4)


def test_requests_are_embedded_in_calls_sized_by_a_slot_profiles_fixed_cost(tiny_params):
  """The prediction's prefill (`serve.requests.embed_requests`'s arguments) with a cost model of
  no prefill intercept and a fixed cost per call: calls of the most rows, not of one."""
  from lsdist_jax.schedule import CostModel
  from lsdist_jax.serve.requests import _merge

  cost = CostModel(step=(1.0, 0.003, 1e-6, 1e-4, 5e-6), prefill=(0.0, 0.00176),
                   batch_overhead_ms=4.0)
  gen = _generator(tiny_params, threads=0)
  gen.embed(_prompts(7, 3, 7, seed=4), max_batch=4, **_merge(cost, 0.0))  # 2 calls, not 7
  rows = {k[-3][0][0] for k in gen._executables if k[0].startswith("prefill")}  # tokens
  assert rows == {4}


def test_continuous_run_with_programs_compiled_ahead_equals_on_first_use(tiny_params):
  prompts = _prompts(8, 3, 7, seed=7)  # one context block (8) for every prompt
  order = np.random.default_rng(2).permutation(8)
  plan = ContinuousPlan([Phase(order[:5], 32, 4, 2), Phase(order[5:], 64, 2, 1)])
  results = {}
  for threads in (0, 3):
    gen = _generator(tiny_params, threads)
    runner = Runner(_Engine(gen), prompts, request_ids=range(8), max_seq_len=64, **SAMPLING)
    result = runner.run_continuous(plan, lambda c, r: Phase(np.zeros(0, np.int64), 64, 2, 1))
    results[threads] = (result.tokens, result.finished.tolist(), gen)
  assert results[0][:2] == results[3][:2]
  ahead = results[3][2]
  assert ahead.precompiled_runs >= 3  # the phases' decode loops and first fills at least
  # what the run did not use and had not started compiling was cancelled at its end
  assert all(f.running() or f.done() and not f.cancelled() for f in ahead._pending.values())
  # refills are padded to the refill's rows: one insert program per (rows, block)
  inserts = {k for k in ahead._executables if k[0].startswith("slot_insert")}
  assert len({k[0].split("/")[3] for k in inserts}) <= 3


def test_a_warm_start_runs_once_its_programs_compiled_ahead_are_built(tiny_params):
  """Runner.warm_start (a steady-state benchmark): a continuous or paged run first waits for
  every program it compiles ahead, counted as compile time; the tokens are those of a run
  that did not wait."""
  from lsdist_jax.schedule.paged import PagedPlan
  from lsdist_jax.schedule import Options, Requests
  from lsdist_jax.serve.paged_runner import run_paged

  prompts = _prompts(8, 3, 7, seed=7)
  plan = ContinuousPlan([Phase(np.arange(8), 64, 4, 2)])
  tokens = {}
  for warm in (False, True):
    gen = _generator(tiny_params, threads=2)
    runner = Runner(_Engine(gen), prompts, request_ids=range(8), max_seq_len=64, **SAMPLING)
    runner.warm_start = warm
    settled, real = [], gen.wait_precompiles

    def spy():  # how many programs were compiling ahead, and whether all were built after it
      pending = list(gen._pending.values())
      real()
      settled.append((len(pending), all(f.done() for f in pending), gen.compile_seconds))

    gen.wait_precompiles = spy
    result = runner.run_continuous(plan, lambda c, r: Phase(np.zeros(0, np.int64), 64, 2, 1))
    tokens[warm] = result.tokens
    if warm:
      (n, built, waited), = settled
      assert n >= 3 and built and result.seconds["compile"] >= waited > 0
      assert gen.precompiled_runs >= 3
    else:
      assert settled == []
    lengths = np.array([len(t) for t in result.tokens])
    paged = PagedPlan(np.arange(8), 4, 16, 2, "fcfs", projection="true")
    got = run_paged(runner, paged, Requests(runner.prompt_len, 64, true_length=lengths),
                    Options(kv_budget_tokens=4 * 64, max_batch=8))
    assert got.tokens == result.tokens
    assert len(settled) == (2 if warm else 0)
  assert tokens[True] == tokens[False]


def test_a_shared_prefill_runs_a_program_compiled_ahead_too(tiny_params):
  # equal contexts prefill at half the rows (SlotBatch.insert(share_prefill=True)): that twin of
  # each insert program is compiled ahead as well, so sharing costs no foreground compilation
  gen = _generator(tiny_params, threads=2)
  # decode, insert, its twin, the first-token sampling
  assert gen.precompile_slots(4, 64, [(4, 16)], share_prefill=True) == 4
  batch = gen.open_slots(4, 64, max_seq_len=64, **SAMPLING)
  prompt = _prompts(1, 8, 15)[0]
  batch.insert([0, 1, 2, 3], [prompt] * 4, [0, 1, 2, 3], [0] * 4, share_prefill=True)
  batch.decode(4)
  assert batch.prefilled_rows == 2
  assert gen.compile_count == 3 and gen.precompiled_runs == 3


def test_compile_times_cover_each_program_both_ways_and_the_prefills_agree():
  from lsdist_jax.benchmark.compile_times import prefill_run_rows, program_rows
  from lsdist_jax.engine import Engine

  engine = Engine.random("tiny", dtype="float32")
  rows = program_rows(engine, slots=4, cache_len=32, rows=2, block=8)
  assert [(r["program"], r["scan_prefill"], r["lower_blocks_once"]) for r in rows] == [
      ("prefill_hidden", False, False), ("slot_insert", False, False),
      ("slot_first", False, False), ("slot_decode", False, False),
      ("prefill_hidden", False, True), ("slot_insert", False, True),
      ("slot_decode", False, True), ("prefill_hidden", True, True), ("slot_insert", True, True)]
  assert all(r["lower_s"] > 0 and r["compile_s"] > 0 for r in rows)
  run = prefill_run_rows(engine, rows=2, block=8, repeats=2)
  assert [r["scan_prefill"] for r in run] == [False, True] and all(r["seconds"] > 0 for r in run)
  assert run[1]["max_abs_diff_vs_unrolled"] < 1e-4


def test_engine_xla_flags_reach_xla_before_its_backend_starts(tmp_path):
  """engine.xla_flags is added to $XLA_FLAGS before the backend starts (XLA then dumps what it
  compiles where --xla_dump_to says); a flag the user's $XLA_FLAGS names keeps their value;
  once the backend runs, nothing is added."""
  import os
  import subprocess
  import sys

  dump = tmp_path / "dump"
  code = f"""
import os, jax, jax.numpy as jnp
from lsdist_jax.engine import apply_xla_flags
added = apply_xla_flags("--xla_dump_to={dump} --xla_cpu_use_thunk_runtime=false")
assert added == ["--xla_dump_to={dump}"], added
assert "--xla_cpu_use_thunk_runtime=true" in os.environ["XLA_FLAGS"]
jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()
assert apply_xla_flags("--xla_dump_hlo_as_text") == []
"""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_cpu_use_thunk_runtime=true")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert dump.is_dir() and any(dump.iterdir())


def test_programs_compile_in_the_order_a_phase_needs_them(tiny_params):
  """The first fill's insert and sampler queue first, then the decode loop, then the refills'
  programs; a phase whose prompts all fit its first fill queues no refill programs."""
  gen = _generator(tiny_params, threads=1)
  gen.precompile_slots(4, 64, [(4, 16), (2, 8), (2, 16)])
  names = [k[0] for k in gen._pending]
  assert names == ["slot_insert/4/64/4/16/-1", "slot_first/4/64/4", "slot_decode/4/64",
                   "slot_insert/4/64/2/8/-1", "slot_first/4/64/2", "slot_insert/4/64/2/16/-1"]
  gen.drop_precompiles()
  prompts = _prompts(4, 3, 7, seed=1)
  whole = _generator(tiny_params, threads=2)
  runner = Runner(_Engine(whole), prompts, request_ids=range(4), max_seq_len=64, **SAMPLING)
  # a cache of the whole room (max_seq_len): no row is carried on to another phase
  runner.run_continuous(ContinuousPlan([Phase(np.arange(4), 64, 4, 2)]),
                        lambda c, r: Phase(np.zeros(0, np.int64), 64, 2, 1))
  built = [k[0] for k in list(whole._executables) + list(whole._pending)]
  assert sorted(built) == ["slot_decode/4/64", "slot_first/4/64/4", "slot_insert/4/64/4/8/-1"]
  assert whole.precompiled_runs == 3


def test_decode_step_rows_time_both_loops_at_each_cache():
  from lsdist_jax.benchmark.compile_times import decode_step_rows
  from lsdist_jax.engine import Engine

  engine = Engine.random("tiny", dtype="float32")
  rows = decode_step_rows(engine, batch=2, prompt_len=8, steps=8, cache_lens=[32, 64], repeats=1)
  assert [r["program"] for r in rows] == ["decode step (static)"] + ["decode step (slots)"] * 2
  # the static loop at the cache its rows need (the engine's bucket), the slots at each asked
  assert rows[0]["cache_len"] >= 8 + 8 and [r["cache_len"] for r in rows[1:]] == [32, 64]
  assert all(r["ms_per_step"] == r["ms_per_step"] for r in rows)  # a number, not NaN


def test_insert_call_rows_time_each_rows_count_then_the_fixed_calls():
  from lsdist_jax.benchmark.compile_times import insert_call_rows
  from lsdist_jax.engine import Engine

  engine = Engine.random("tiny", dtype="float32")
  rows = insert_call_rows(engine, slots=4, cache_len=64, rows_list=[1, 4], block=16, repeats=1)
  assert [(r["program"], r.get("rows")) for r in rows] == [
      ("slot insert call", 1), ("slot insert call", 4), ("slot read and empty decode call", None)]
  assert all(0 < r["host_ms"] <= r["done_ms"] for r in rows[:2])
  assert rows[2]["read_ms"] > 0 and rows[2]["empty_decode_ms"] > 0
  # one insert program per rows count (the engine's buckets round slots, cache and block)
  names = [name for name in engine.generator.program_states() if name.startswith("slot_insert")]
  assert len(names) == 2 and len({name.split("/")[3] for name in names}) == 2


def test_trace_summary_ranks_device_events_by_total_time(tmp_path):
  import gzip
  import json

  from lsdist_jax.benchmark.traces import trace_streams, trace_summary

  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
            {"ph": "X", "pid": 1, "name": "python", "dur": 9e6},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "stream 7"}},
            {"ph": "X", "pid": 2, "tid": 7, "name": "attention", "ts": 0.0, "dur": 3000.0},
            {"ph": "X", "pid": 2, "tid": 7, "name": "attention", "ts": 2000.0, "dur": 1000.0},
            {"ph": "X", "pid": 2, "tid": 7, "name": "sort", "ts": 10000.0, "dur": 2500.0}]
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  with gzip.open(folder / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  assert trace_summary(str(tmp_path)) == [
      {"name": "attention", "lane": "/device:GPU:0", "ms": 4.0, "count": 2},
      {"name": "sort", "lane": "/device:GPU:0", "ms": 2.5, "count": 1}]
  # the stream covers 0-3 ms (the overlap counted once) and 10-12.5 ms of a 12.5 ms span
  assert trace_streams(str(tmp_path)) == [{"lane": "/device:GPU:0", "thread": "stream 7",
                                           "events": 3, "busy_ms": 5.5, "span_ms": 12.5}]
  with pytest.raises(FileNotFoundError):
    trace_summary(str(tmp_path / "plugins" / "none"))


def test_a_refill_runs_a_covering_insert_while_its_own_still_compiles(tiny_params):
  """While a refill's own insert compiles in the background, the refill runs the first fill's
  insert (more rows, padded; `SlotBatch._covering`) instead of waiting for it; the tokens are
  those of a run on each program's own shapes. A program nobody is compiling is compiled and
  run as before (no padding for good)."""
  import threading

  gen = _generator(tiny_params, threads=2)
  gen.precompile_slots(4, 64, [(4, 16)])
  for future in list(gen._pending.values()):
    future.result()
  release = threading.Event()
  real = gen._compile_behind

  def held(jitted, args):  # compiles only once released: "still compiling" for the refill
    release.wait(60)
    return real(jitted, args)

  gen._compile_behind = held
  assert gen.precompile_slots(4, 64, [(2, 16)]) == 2  # the refill's insert and its sampler
  try:
    tokens = _slot_run(gen)
    assert gen.program_states()["slot_insert/4/64/2/16/-1"] is False  # never waited for
    assert gen.compile_seconds < 1.0
  finally:
    release.set()
  assert tokens == _slot_run(_generator(tiny_params, threads=0))
  # nothing compiling: the refill's own program compiles in the foreground and runs
  fresh = _generator(tiny_params, threads=2)
  fresh.precompile_slots(4, 64, [(4, 16)])
  for future in list(fresh._pending.values()):
    future.result()
  assert _slot_run(fresh) == tokens
  assert fresh.program_states()["slot_insert/4/64/2/16/-1"] is True


def test_a_warm_start_builds_the_inserts_of_rows_carried_into_a_later_phase(tiny_params):
  """Rows that fill a phase's cache go on to the next one with contexts as long as it: their
  insert there, at that context's block, is compiled ahead with the rest, so a warm-started
  run compiles nothing in the foreground (it did: a 7B replay waited 20 s for one)."""
  prompts = _prompts(8, 3, 7, seed=7)  # blocks of 8
  forced = [40, 40, 5, 5, 5, 5, 5, 5]  # rows 0 and 1 outgrow the 32-token cache
  plan = ContinuousPlan([Phase(np.arange(6), 32, 4, 2, split_first=False),
                         Phase(np.arange(6, 8), 64, 2, 1, split_first=False)])
  gen = _generator(tiny_params, threads=2)
  runner = Runner(_Engine(gen), prompts, request_ids=range(8), max_seq_len=64,
                  forced_lengths=forced, **SAMPLING)
  runner.warm_start = True
  marks, real = [], gen.wait_precompiles

  def spy():
    real()
    marks.append(len(gen.compile_log))

  gen.wait_precompiles = spy
  result = runner.run_continuous(plan, lambda c, r: Phase(np.zeros(0, np.int64), 64, 2, 1))
  assert [len(t) for t in result.tokens] == forced
  assert any(r.phase == "main" and r.cache_len == 64 for r in result.batches)
  after = gen.compile_log[marks[0]:]
  assert after and all("lower" in entry for entry in after), after  # each built ahead
