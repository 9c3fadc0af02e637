"""The paged engine on the tiny model: a paged run returns exactly the responses of plain
generation (preempted rows included), its calls and steps are those `simulate_paged` replays,
and the paged decode kernel agrees with the gathered attention."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsdist_jax.llama.generator import Generator
from lsdist_jax.llama.model import Llama
from lsdist_jax.llama.paged import open_paged
from lsdist_jax.llama.paged_attention import paged_decode_attention, write_and_attend
from lsdist_jax.schedule import CostModel, Options, Requests
from lsdist_jax.schedule.paged import PagedPlan, simulate_paged
from lsdist_jax.serve.paged_runner import run_paged
from lsdist_jax.serve.runner import Runner, runner_split
from lsdist_jax.shapes import Buckets

MAX_SEQ_LEN = 72
BUCKETS = Buckets(batch=(1, 2, 4, 8, 16), prompt=8, cache=32)


from conftest import Batch, Plan, RunnerEngine as _Engine  # noqa: E402


def _runner(tiny_params, forced=None, n=12, seed=11, threads=0):
  cfg, params = tiny_params
  gen = Generator(Llama(cfg, jnp.float32, jnp.float32), params, buckets=BUCKETS,
                  compile_threads=threads)
  rng = np.random.default_rng(seed)
  prompts = [[1] + rng.integers(3, 256, size=rng.integers(3, 12)).tolist() for _ in range(n)]
  return Runner(_Engine(gen), prompts, request_ids=range(100, 100 + n), temperature=0.8,
                top_p=0.9, seed=3, max_seq_len=MAX_SEQ_LEN, forced_lengths=forced)


@pytest.fixture(scope="module")
def reference(tiny_params):
  runner = _runner(tiny_params)
  return runner, runner.run(Plan([Batch(np.arange(12), MAX_SEQ_LEN)]))


@pytest.mark.parametrize("admission,budget,slots,page", [
    ("fcfs", 8 * 72, 8, 8),  # room for every row: no preemption
    ("fcfs", 160, 8, 8),  # a pool of 20 pages: rows are preempted and prefilled again
    ("reserve", 192, 4, 16),
])
def test_a_paged_run_returns_the_responses_of_plain_generation(reference, admission, budget,
                                                               slots, page):
  runner, plain = reference
  lengths = np.array([len(t) for t in plain.tokens])
  requests = Requests(runner.prompt_len, MAX_SEQ_LEN, true_length=lengths)
  plan = PagedPlan(np.random.default_rng(1).permutation(12), slots, page, 2, admission,
                   projection="true")
  result = run_paged(runner, plan, requests, Options(kv_budget_tokens=budget, max_batch=16))
  assert result.tokens == plain.tokens
  assert (result.finished == plain.finished).all()
  if budget == 160:
    assert result.counts["preemptions"] > 0


def test_calls_steps_and_preemptions_are_the_simulators(tiny_params):
  rng = np.random.default_rng(4)
  forced = rng.integers(0, 50, 16)
  forced[[2, 9]] = 1000  # these reach their room: done as they take their last token
  runner = _runner(tiny_params, forced=forced, n=16, seed=5)
  true = np.minimum(forced, MAX_SEQ_LEN - runner.prompt_len)
  cost = CostModel(batch_buckets=BUCKETS.batch, prompt_bucket=8, cache_bucket=32)
  # a predicted pmf: each request's length give or take a few tokens
  pmf = np.zeros((16, MAX_SEQ_LEN + 1))
  for i, t in enumerate(true):
    pmf[i, max(t - 3, 0):t + 4] = 1.0
  for admission, budget, projection in (("fcfs", 256, "true"), ("reserve", 320, "true"),
                                        ("reserve", 256, "predicted"), ("fcfs", 1024, "true")):
    requests = Requests(runner.prompt_len, MAX_SEQ_LEN, length_pmf=pmf,
                        true_length=true if projection == "true" else None)
    plan = PagedPlan(np.arange(16), 8, 8, 2, admission, watermark=1, quantile=0.7,
                     projection=projection)
    options = Options(kv_budget_tokens=budget, max_batch=16)
    result = run_paged(runner, plan, requests, options)
    sim = simulate_paged(plan, requests, true, cost, options)
    assert [len(t) for t in result.tokens] == true.tolist()
    assert result.counts == {"insert_calls": sim.insert_calls, "decode_calls": sim.decode_calls,
                             "decode_steps": sim.decode_steps, "preemptions": sim.carried_rows}
    split = runner_split(result.seconds)["runner_split"]
    assert split["decode_steps"] == sim.decode_steps and split["ms_per_decode_step"] > 0
    if (admission, budget) == ("fcfs", 256):
      assert sim.carried_rows > 0  # the tight pool preempts


@pytest.mark.parametrize("seed", [1, 4])
def test_a_tight_pool_with_rows_that_reach_their_room_steps_as_simulated(tiny_params, seed):
  """Rows forced past their room (done as they take their last token: one step less than a
  row ending at EOS) in a pool that preempts, some of it in calls that began with an empty
  queue (they run until every row is done, whatever they preempt): the engine's calls, steps
  and preemptions are the simulator's."""
  rng = np.random.default_rng(seed)
  forced = rng.integers(0, 90, 16)
  runner = _runner(tiny_params, forced=forced, n=16, seed=seed)
  true = np.minimum(forced, MAX_SEQ_LEN - runner.prompt_len)
  assert (true == MAX_SEQ_LEN - runner.prompt_len).any()
  requests = Requests(runner.prompt_len, MAX_SEQ_LEN, true_length=true)
  plan = PagedPlan(np.arange(16), 8, 8, 2, "fcfs", watermark=1, projection="true")
  options = Options(kv_budget_tokens=256, max_batch=16)
  result = run_paged(runner, plan, requests, options)
  sim = simulate_paged(plan, requests, true, CostModel(batch_buckets=BUCKETS.batch,
                                                       prompt_bucket=8, cache_bucket=32),
                       options)
  assert [len(t) for t in result.tokens] == true.tolist()
  assert result.counts == {"insert_calls": sim.insert_calls, "decode_calls": sim.decode_calls,
                           "decode_steps": sim.decode_steps, "preemptions": sim.carried_rows}
  assert sim.carried_rows > 0


def test_an_insert_holds_at_most_a_quarter_of_the_pool_in_each_call(reference, monkeypatch):
  """A call's prefill holds rows x block tokens of KV before paging them in: an insert of more
  than the pool's share is made in calls of fewer rows, with the same responses."""
  runner, plain = reference
  gen = runner.engine.generator
  calls = []
  run = gen._run

  def recording(name, *args):
    if name.startswith("paged_insert/"):
      calls.append(name)
    return run(name, *args)

  monkeypatch.setattr(gen, "_run", recording)
  budget = 160  # 20 pages of 8: 40 tokens a call, two rows of a 16-token block
  plan = PagedPlan(np.arange(12), 8, 8, 8, "fcfs")
  result = run_paged(runner, plan, Requests(runner.prompt_len, MAX_SEQ_LEN),
                     Options(kv_budget_tokens=budget, max_batch=16))
  assert result.tokens == plain.tokens
  shapes = [tuple(int(x) for x in name.split("/")[4:6]) for name in calls]
  assert all(rows * block <= budget // 4 or rows == min(BUCKETS.batch) for rows, block in shapes)
  assert len(calls) > result.counts["insert_calls"]  # the first fill of 8 rows took several


def test_the_paged_kernel_agrees_with_the_gathered_attention():
  rng = np.random.default_rng(0)
  b, kvh, groups, hd, pages, page, width = 3, 2, 2, 16, 12, 8, 4
  q = jnp.asarray(rng.normal(size=(b, kvh, groups, hd)), jnp.float32)
  pool = {name: jnp.asarray(rng.normal(size=(kvh, pages, page, hd)), jnp.float32)
          for name in ("k", "v")}
  table = jnp.asarray([[3, 7, 1, pages], [0, 2, pages, pages], [5, 4, 6, 8]], jnp.int32)
  lo = jnp.asarray([0, 0, 0], jnp.int32)
  write = jnp.asarray([20, 9, 31], jnp.int32)  # each row writes its newest position here
  new = {name: jnp.asarray(rng.normal(size=(b, kvh, hd)), jnp.float32) for name in ("k", "v")}
  out, written = write_and_attend(q, new["k"], new["v"], pool, write, lo, write + 1, table,
                                  impl="dot", dtype=jnp.float32)
  flat = {name: x.reshape(kvh, pages * page, hd) for name, x in written.items()}
  kernel = paged_decode_attention(q, flat["k"], flat["v"], lo, write + 1, table, page=page,
                                  interpret=True)
  np.testing.assert_allclose(np.asarray(kernel), np.asarray(out), atol=2e-5)
  # the new key sits at its page and offset: row 0 position 20 -> entry 2 of its table, page 1
  np.testing.assert_allclose(np.asarray(written["k"][:, 1, 4]), np.asarray(new["k"][0]))
  # a row reads its positions only: changing a page it does not hold changes nothing
  moved = {name: x.at[:, 11].set(0.0) for name, x in written.items()}
  again = paged_decode_attention(q, moved["k"].reshape(kvh, -1, hd),
                                 moved["v"].reshape(kvh, -1, hd), lo, write + 1, table,
                                 page=page, interpret=True)
  np.testing.assert_allclose(np.asarray(again), np.asarray(kernel), atol=1e-6)


def test_a_pool_that_cannot_hold_a_row_is_named(tiny_params):
  cfg, params = tiny_params
  gen = Generator(Llama(cfg, jnp.float32, jnp.float32), params, buckets=BUCKETS)
  with pytest.raises(ValueError, match="does not hold one row"):
    open_paged(gen, 4, 4, 8, max_seq_len=MAX_SEQ_LEN)


def test_programs_compiled_ahead_are_the_ones_a_paged_run_runs(tiny_params):
  results = {}
  for threads in (0, 2):
    runner = _runner(tiny_params, threads=threads)
    gen = runner.engine.generator
    plan = PagedPlan(np.arange(12), 8, 8, 2, "fcfs")
    result = run_paged(runner, plan, Requests(runner.prompt_len, MAX_SEQ_LEN),
                       Options(kv_budget_tokens=160, max_batch=16))
    results[threads] = (result.tokens, gen)
  assert results[0][0] == results[2][0]
  ahead = results[2][1]
  # the first fill's insert and sampler and the decode loop at least ran as compiled ahead
  assert ahead.precompiled_runs >= 3 and ahead.background_compile_seconds > 0
  assert results[0][1].precompiled_runs == 0