"""The plan simulator: it agrees with the planner's expected cost where lengths are known, loses no
token through capping and recovery, and runs every strategy on a store."""

import dataclasses

import numpy as np
import pytest

from lsdist_jax.data import prompt_key
from lsdist_jax.schedule import (CostModel, Options, Requests, expected_cost, make_plan,
                                 plan_recovery)
from lsdist_jax.schedule.types import Batch, Plan
from lsdist_jax.schedule.simulate import simulate

COST = CostModel(step=(1.0, 0.01, 1e-4, 0.0, 2e-4), prefill=(1.0, 1e-3), batch_overhead_ms=0.5,
                 batch_buckets=(1, 2, 4, 8, 16, 32, 64), prompt_bucket=16, cache_bucket=32)
OPTIONS = Options(kv_budget_tokens=64 * 160, max_batch=64, fixed_batch=16)


def _requests(n=120, seed=0):
  rng = np.random.default_rng(seed)
  true = rng.integers(0, 200, n)
  return Requests(rng.integers(5, 60, n), 320, true_length=true), true


def test_known_lengths_without_recovery_cost_what_the_planner_expects():
  req, true = _requests()
  plan = make_plan("oracle", req, COST, OPTIONS)
  uncapped = Plan([Batch(b.members, int(max(b.cap, true[b.members].max()))) for b in plan.batches],
                  "oracle")
  result = simulate(uncapped, req, true, COST)
  assert result.recovery_batches == 0 and result.batches == len(plan.batches)
  assert result.seconds == pytest.approx(expected_cost(uncapped, req, COST, OPTIONS), rel=1e-9)


def test_capped_rows_are_recovered_and_every_token_is_generated_once():
  req, true = _requests(seed=1)
  plan = Plan([Batch(np.arange(i, min(i + 16, req.n)), 24) for i in range(0, req.n, 16)],
              "vanilla")
  recovered = []

  def recover(unfinished, generated):
    recovered.append(len(unfinished))
    assert (generated < true[unfinished]).all() and (generated > 0).all()
    return plan_recovery("vanilla", req, unfinished, generated, COST, OPTIONS)

  result = simulate(plan, req, true, COST, recover)
  assert result.generated_tokens == int(true.sum())
  assert recovered[0] == int((true > 24).sum()) and result.recovery_batches > 0
  capped_cost = result.seconds
  full = simulate(Plan([Batch(b.members, 300) for b in plan.batches], "vanilla"), req, true, COST)
  assert full.recovery_batches == 0 and full.generated_tokens == result.generated_tokens
  assert capped_cost != full.seconds


def test_rows_at_max_seq_len_end_without_recovery_forever():
  req = Requests(np.array([300, 10]), 320, true_length=np.array([50, 5]))
  result = simulate(Plan([Batch(np.array([0, 1]), 8)], "x"), req, np.array([50, 5]), COST,
                    lambda u, g: [Batch(u, 64)])
  assert result.generated_tokens == 20 + 5  # the first row stops at its room (320 - 300)


def test_every_strategy_runs_on_a_store_and_generates_the_same_tokens(tiny_store):
  from lsdist_jax.benchmark.simulate import EXACT, simulate_strategies

  store, exports, config = tiny_store
  out = simulate_strategies(config, store, exports, dataclasses.replace(COST), 96)
  names = [r["strategy"] for r in out["rows"]]
  assert names == list(config.benchmark.strategies) + [EXACT]
  assert len({r["generated_tokens"] for r in out["rows"]}) == 1
  oracle = next(r for r in out["rows"] if r["strategy"] == "oracle")
  assert oracle["x_oracle"] == 1.0 and all(r["samples_per_s"] > 0 for r in out["rows"])


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
  """A synthetic store (lengths depend on the hidden state) and a briefly trained predictor."""
  from lsdist_jax.config import default_config
  from lsdist_jax.paths import predictor_exports, predictor_workdir
  from lsdist_jax.pipeline import predictor_config
  from lsdist_jax.predictor import train
  from lsdist_jax.store import LengthStore

  root = tmp_path_factory.mktemp("sim")
  rng = np.random.default_rng(0)
  n, samples, dim = 60, 16, 8
  hidden = rng.normal(size=(n, dim)).astype(np.float32)
  center = (40 + 30 * np.tanh(hidden[:, 0]))[:, None]
  lengths = np.clip(rng.normal(center, 8, size=(n, samples)), 0, 120).astype(np.int32)
  store_dir = str(root / "store")
  meta = {"model": {"name": "synthetic"}, "generation": {"max_seq_len": 160}}
  store = LengthStore.create_or_open(store_dir, meta, hidden_dim=dim, samples_per_prompt=samples)
  store.write_chunk("p0", {"index": np.arange(n), "key": [prompt_key(f"p{i}") for i in range(n)],
                           "prompt_len": np.full(n, 20),
                           "lengths": lengths, "finished": lengths < 120, "hidden": hidden})
  config = default_config()
  config.generation.max_seq_len = 160
  config.predictor.max_len = 140
  config.predictor.hidden_sizes = (32,)
  config.predictor.epochs = 3
  config.predictor.batch_size = 16
  config.collect.store = store_dir
  config.schedule.kv_budget_tokens = 16 * 160
  config.schedule.max_batch = 64
  config.benchmark.split = "test"
  workdir = str(root / "run")
  config.benchmark.strategies = ("vanilla:16", "vanilla:best", "ssch-scalar-max", "ours",
                                 "ours-search", "ours-optimal", "oracle", "continuous-vanilla",
                                 "ours-continuous", "oracle-continuous")
  for name in ("distribution", "scalar-max"):
    train.train_and_evaluate(predictor_config(config, name), predictor_workdir(workdir, name))
  return store_dir, predictor_exports(workdir), config


def test_the_oracle_recovers_its_capped_rows_on_their_true_lengths():
  """An oracle plan may cap a long row on purpose; its recovery is planned on the true remaining
  lengths (point masses), never slower than fixed batches at the full cache."""
  req, true = _requests(n=200, seed=3)
  plan = make_plan("oracle", req, COST, OPTIONS)
  rounds = []

  def recover(unfinished, generated):
    rounds.append(len(unfinished))
    assert (generated < np.minimum(true, req.room)[unfinished]).all()
    return plan_recovery("oracle", req, unfinished, generated, COST, OPTIONS)

  result = simulate(plan, req, true, COST, recover)
  assert result.generated_tokens == int(true.sum()) and rounds
  fixed = simulate(plan, req, true, COST,
                   lambda u, g: plan_recovery("vanilla", req, u, g, COST, OPTIONS))
  assert result.seconds < fixed.seconds
