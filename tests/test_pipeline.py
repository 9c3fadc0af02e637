"""The whole job on the tiny model: collect -> train -> evaluate -> benchmark, and generate."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import tiny  # noqa: E402
from lsdist_jax import Engine  # noqa: E402
from lsdist_jax.engine import load_engine  # noqa: E402
from lsdist_jax.llama.config import get_preset  # noqa: E402
from lsdist_jax.serve.job import run_generate  # noqa: E402
from lsdist_jax.paths import predictor_exports
from lsdist_jax.pipeline import run_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def engine():
  return load_engine(tiny.get_config())


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, engine):
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  summary = run_pipeline(tiny.get_config(), workdir, engine=engine)
  return workdir, summary


def test_every_strategy_returns_identical_responses_to_vanilla(pipeline_run):
  workdir, summary = pipeline_run
  rows = {r["strategy"]: r for r in summary["benchmark"]["rows"]}
  assert set(rows) == {"vanilla:16", "vanilla:best", "ssch-scalar-max", "ours", "ours-search",
                       "ours-optimal", "oracle", "continuous-vanilla", "ours-continuous",
                       "oracle-continuous", "paged-vanilla", "ours-paged", "oracle-paged"}
  for name, row in rows.items():
    assert row["identical_share"] == 1.0, name  # float32 on CPU: exactly the same responses
    assert 0 < row["effective_token_ratio"] <= 1.0
    assert row["peak_kv_tokens"] <= summary["benchmark"]["kv_budget_tokens"]
  assert any(r["recovery_batches"] > 0 for r in rows.values())  # FCR exercised
  budget = summary["benchmark"]["kv_budget_tokens"]  # a paged run holds one pool of it
  assert rows["ours-paged"]["peak_kv_tokens"] == budget // 32 * 32
  with open(os.path.join(workdir, "benchmark.json")) as f:
    saved = json.load(f)
  assert {"device", "date", "model", "prompts", "kv_budget_tokens", "replay", "rows"} <= set(saved)
  assert os.path.isfile(os.path.join(workdir, "benchmark.png"))
  assert os.path.isfile(os.path.join(workdir, "benchmark.md"))


def test_evaluation_table_has_every_model(pipeline_run):
  workdir, summary = pipeline_run
  names = [r["model"] for r in summary["evaluate"]["rows"]]
  assert names == ["distribution", "distribution-uncalibrated", "scalar-max", "scalar-mean",
                   "marginal"]
  assert os.path.isfile(os.path.join(workdir, "reliability.png"))
  assert os.path.isfile(os.path.join(workdir, "length_spread.png"))


def test_generate_job_writes_every_response_in_input_order_and_resumes(pipeline_run, engine,
                                                                       tmp_path):
  workdir, _ = pipeline_run
  lines = [json.dumps({"prompt": f"question {i}?"}) if i % 3 else
           json.dumps({"instruction": f"Do task {i}.", "input": "now" if i % 2 else ""})
           for i in range(7)]
  src = tmp_path / "in.jsonl"
  src.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out.jsonl"
  config = tiny.get_config()
  # a budget too small for a chunk's rows at once: the job predicts and plans (a chunk that
  # fits at once runs without its predictor, tests/test_generate_job.py)
  config.schedule.kv_budget_tokens = 2 * 256
  summary = run_generate(config, str(src), str(out), predictor_exports(workdir)["distribution"],
                         chunk_size=3, engine=engine, show_progress=False)
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r["line"] for r in rows] == list(range(1, 8)) and summary["prompts"] == 7
  direct = engine.generate([r["prompt"] for r in rows], max_new_tokens=256,
                           max_seq_len=config.generation.max_seq_len,
                           temperature=config.generation.temperature,
                           top_p=config.generation.top_p, seed=config.generation.seed,
                           request_ids=[r["line"] for r in rows])
  assert [r["response_tokens"] for r in rows] == [len(d.token_ids) for d in direct]
  # static batches with FCR, a paged pool, and no predictor at all: the very same responses
  for strategy, predictor in (("search", predictor_exports(workdir)["distribution"]),
                              ("paged-search", predictor_exports(workdir)["distribution"]),
                              ("continuous-search", None), ("paged-search", None)):
    other = tmp_path / f"{strategy}-{predictor is None}.jsonl"
    run_generate(config, str(src), str(other), predictor, strategy=strategy, chunk_size=4,
                 engine=engine, show_progress=False)
    assert [json.loads(x)["response"] for x in other.read_text().splitlines()] == [
        r["response"] for r in rows]
  with pytest.raises(FileExistsError):
    run_generate(config, str(src), str(out), None, engine=engine, show_progress=False)


def test_length_replay_benchmark_forces_the_recorded_lengths(pipeline_run, tmp_path):
  from lsdist_jax.benchmark.run import run_benchmark
  from lsdist_jax.store import LengthStore

  workdir, _ = pipeline_run
  config = tiny.get_config()
  config.collect.store = os.path.join(workdir, "store")
  # Any model runs with the store's length statistics, here one of another width than the model
  # that recorded them (the predictors read the recorded hidden states).
  other = dataclasses.replace(get_preset("tiny"), hidden_size=32, name="tiny-32")
  config.benchmark.replay = True
  config.benchmark.strategies = ("vanilla:16", "ours-optimal", "oracle", "ours-continuous",
                                 "paged-vanilla", "ours-paged", "oracle-paged")
  engine = Engine.random(other, dtype="float32", engine_config=config.engine)
  out = run_benchmark(config, str(tmp_path), engine=engine,
                      predictor_dirs=predictor_exports(workdir))
  assert out["model"] == "random:tiny-32"
  assert out["replay"] is True
  assert out["requests"] == int(config.benchmark.requests)
  assert 1 <= out["distinct_prompts"] <= out["requests"]
  data = LengthStore.open(config.collect.store).read()
  recorded = set(data["lengths"].reshape(-1).tolist())
  tokens = {r["strategy"]: r["generated_tokens"] for r in out["rows"]}
  assert len(set(tokens.values())) == 1  # every strategy generated exactly the replayed lengths
  # the runner follows the simulator's rules step for step: each continuous or paged plan,
  # simulated again on the lengths it generated, runs the decode steps it ran
  split = {r["strategy"]: r for r in out["rows"] if "runner_split" in r}
  assert set(split) == {"ours-continuous", "paged-vanilla", "ours-paged", "oracle-paged"}
  for r in split.values():
    assert r["simulated_split"]["decode_steps"] == r["runner_split"]["decode_steps"], r
    assert r["simulated_split"]["seconds"] > 0
  # a slot run's split says which of its call seconds were compile waits, and its decode calls
  cont = split["ours-continuous"]["runner_split"]
  assert cont["decodes"] == split["ours-continuous"]["simulated_split"]["decodes"]
  assert 0 <= cont["insert_compile_wait"] <= cont["insert_calls"]
  assert 0 <= cont["decode_compile_wait"] <= cont["decode_calls"]
  assert all(r["identical_share"] == 1.0 for r in out["rows"])
  state = os.path.join(str(tmp_path), "benchmark_state")
  lengths = np.load(os.path.join(state, "vanilla_16.r0.npz"))["lengths"]
  assert set(lengths.tolist()) <= recorded
  # the plans follow the cost model: a rerun planned with another is refused, not mixed in
  from lsdist_jax.serve.plan import load_cost_model

  cost = load_cost_model(config, str(tmp_path), engine)
  other_cost = dataclasses.replace(cost, batch_overhead_ms=cost.batch_overhead_ms + 1.0)
  with pytest.raises(ValueError, match="another benchmark"):
    run_benchmark(config, str(tmp_path), engine=engine, cost=other_cost,
                  predictor_dirs=predictor_exports(workdir))
  # and so is one timed from a warm start (benchmark.warm_start): its rows are not mixed in
  warm = config.copy_and_resolve_references()
  warm.benchmark.warm_start = True
  with pytest.raises(ValueError, match="another benchmark"):
    run_benchmark(warm, str(tmp_path), engine=engine, cost=cost,
                  predictor_dirs=predictor_exports(workdir))
  assert out["warm_start"] is False


@pytest.mark.slow  # several processes
def test_benchmark_workers_share_the_strategies_and_match_one_process(pipeline_run, tmp_path):
  """`launch/benchmark.py --workers=2`: two processes take the strategies between them (each
  once) and the starting process reports them all, with the responses of the one-process run."""
  import shutil
  import subprocess

  workdir, summary = pipeline_run
  shutil.copytree(os.path.join(workdir, "predictor"), str(tmp_path / "predictor"))
  strategies = ("vanilla:best", "ours-search", "oracle", "ours-continuous")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "benchmark.py"),
       f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", f"--workdir={tmp_path}",
       f"--config.collect.store={os.path.join(workdir, 'store')}",
       f"--config.benchmark.strategies={strategies!r}", "--workers=2"],
      env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / "benchmark.json") as f:
    rows = {r["strategy"]: r for r in json.load(f)["rows"]}
  assert set(rows) == set(strategies)
  assert all(r["identical_share"] == 1.0 for r in rows.values())
  state = tmp_path / "benchmark_state"
  claims = sorted(p.name for p in state.iterdir() if p.name.endswith(".claim"))
  assert claims == sorted(f"{s.replace(':', '_')}.r0.json.claim" for s in strategies)
  logs = [(state / f"worker{k}.log").read_text() for k in range(2)]
  ran = [sum(f"{s:<16s}" in log for s in strategies) for log in logs]
  assert sum(ran) == len(strategies)  # each strategy ran in exactly one worker
  # The report again from the saved results alone (no engine), as after an interrupted run.
  os.remove(tmp_path / "benchmark.json")
  again = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "benchmark.py"), f"--workdir={tmp_path}",
       "--report_only"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert again.returncode == 0, again.stderr[-3000:]
  with open(tmp_path / "benchmark.json") as f:
    assert {r["strategy"]: r for r in json.load(f)["rows"]} == rows
  single = np.load(os.path.join(workdir, "benchmark_state", "vanilla_best.r0.npz"))
  both = np.load(state / "vanilla_best.r0.npz")
  assert (single["tokens"] == both["tokens"]).all()
  assert (single["lengths"] == both["lengths"]).all()


def test_report_from_saved_results_names_what_is_missing(pipeline_run, tmp_path):
  import shutil

  from lsdist_jax.benchmark.report import report_from_state

  workdir, summary = pipeline_run
  out = report_from_state(workdir, write=False)
  expected = {r["strategy"]: r["samples_per_s"] for r in summary["benchmark"]["rows"]}
  assert {r["strategy"]: r["samples_per_s"] for r in out["rows"]} == expected
  assert out["kv_budget_tokens"] == summary["benchmark"]["kv_budget_tokens"]
  by_name = {r["strategy"]: r for r in out["rows"]}
  for row in out["rows"]:  # ratios to the references that ran, in the same run
    assert row["x_vanilla_best"] == pytest.approx(
        row["samples_per_s"] / by_name["vanilla:best"]["samples_per_s"])
    assert row["x_oracle"] == pytest.approx(
        row["samples_per_s"] / by_name["oracle"]["samples_per_s"])
  shutil.copytree(os.path.join(workdir, "benchmark_state"), str(tmp_path / "benchmark_state"))
  os.remove(tmp_path / "benchmark_state" / "ours-search.r0.npz")
  with pytest.raises(ValueError, match="ours-search"):
    report_from_state(str(tmp_path))
  partial = report_from_state(str(tmp_path), write=False, allow_missing=True)
  assert partial["not_run"] == ["ours-search (repeat 0)"]
  assert len(partial["rows"]) == len(expected) - 1
  with pytest.raises(FileNotFoundError, match="meta.json"):
    report_from_state(str(tmp_path / "nowhere"))


def test_capped_store_applies_the_length_convention_at_another_max_seq_len(tmp_path):
  """The committed store's lengths at this run's max_seq_len: capped at max_seq_len - prompt,
  unfinished exactly there; prompts, keys, splits and hidden states unchanged."""
  from lsdist_jax.data import prompt_key
  from lsdist_jax.pipeline import capped_store, store_origin
  from lsdist_jax.store import LengthStore

  n = 12
  lengths = np.tile(np.array([5, 50, 90, 200]), (n, 1))
  meta = {"model": {"name": "m", "dtype": "bfloat16"}, "split_seed": 0,
          "generation": {"max_seq_len": 300, "temperature": 0.6, "top_p": 0.9},
          "split_fractions": [0.8, 0.1, 0.1]}
  src = LengthStore.create_or_open(str(tmp_path / "src"), meta, hidden_dim=4,
                                   samples_per_prompt=4)
  prompt_len = np.arange(n) * 5 + 10
  src.write_chunk("c", {"index": np.arange(n), "key": [prompt_key(f"q{i}") for i in range(n)],
                        "prompt_len": prompt_len, "lengths": lengths,
                        "finished": lengths < 300 - prompt_len[:, None],
                        "hidden": np.random.default_rng(0).normal(size=(n, 4))})
  out = capped_store(str(tmp_path / "src"), str(tmp_path / "capped"), 100)
  before, after = src.read(), LengthStore.open(out).read()
  room = 100 - prompt_len[:, None]
  np.testing.assert_array_equal(after["lengths"], np.minimum(lengths, room))
  np.testing.assert_array_equal(after["finished"], lengths < room)
  for key in ("key", "split", "prompt_len"):
    np.testing.assert_array_equal(after[key], before[key])
  np.testing.assert_allclose(after["hidden"], before["hidden"], rtol=1e-6)
  assert LengthStore.open(out).meta["generation"]["max_seq_len"] == 100
  assert "12 prompts x 4 samples" in store_origin(str(tmp_path / "src"))


def test_claims_say_whether_each_run_shows_them():
  from lsdist_jax.pipeline import claims_text

  measured = [{"strategy": "continuous-vanilla", "samples_per_s": 2.0},
              {"strategy": "ours-continuous", "samples_per_s": 1.8}]
  simulated = [{"strategy": "continuous-vanilla", "samples_per_s": 2.0},
               {"strategy": "ours-continuous", "samples_per_s": 2.5},
               {"strategy": "vanilla:best", "samples_per_s": 1.0},
               {"strategy": "ours-optimal", "samples_per_s": 1.5}]
  lines = claims_text(measured, simulated)
  assert lines[0] == ("ours-continuous vs continuous-vanilla: measured 0.90x (does NOT beat); "
                      "simulated 1.25x (beats)")
  assert lines[1] == "ours-optimal vs vanilla:best: simulated 1.50x (beats)"
  assert claims_text(None, None)[0].endswith("not run")
