"""ssch-lora end to end on the tiny model: LoRA trained on a store's train split (prompt texts
found by key), then planned with in the engine-free simulator and run in the benchmark, its
prediction time counted; the generate job plans ssch with the export and refuses mismatches."""

import json

import numpy as np
import pytest

from configs import tiny
from lsdist_jax.errors import ConfigError
from lsdist_jax.paths import predictor_exports, predictor_workdir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A store of the tiny config's prompts (synthetic lengths) and a LoRA trained on it briefly."""
  from lsdist_jax.data import load_prompts
  from lsdist_jax.engine import load_engine
  from lsdist_jax.lora.train import train_lora
  from lsdist_jax.predictor import train
  from lsdist_jax.store import LengthStore

  root = tmp_path_factory.mktemp("lora_serve")
  config = tiny.get_config()
  config.engine.compilation_cache = ""
  config.lora.epochs = 1
  config.lora.batch_size = 8
  config.lora.max_prompt_tokens = 48
  config.lora.learning_rate = 1e-3
  config.collect.store = str(root / "store")
  config.benchmark.strategies = ("vanilla:16", "ssch-lora")
  engine = load_engine(config)
  prompts = load_prompts(config.data)
  ids = engine.encode([p.text for p in prompts])
  n, samples = len(prompts), 4
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 120, (n, samples)).astype(np.int32)
  store = LengthStore.create_or_open(config.collect.store, {"model": {"name": "tiny"}},
                                     hidden_dim=engine.config.hidden_size,
                                     samples_per_prompt=samples)
  store.write_chunk("p0", {"index": np.array([p.index for p in prompts]),
                           "key": [p.key for p in prompts],
                           "prompt_len": np.array([len(x) for x in ids]), "lengths": lengths,
                           "finished": np.ones((n, samples), bool),
                           "hidden": np.zeros((n, engine.config.hidden_size), np.float32)})
  workdir = str(root / "run")
  result = train_lora(config, predictor_workdir(workdir, "lora"), engine)
  scalar = config.copy_and_resolve_references()
  scalar.predictor.kind, scalar.predictor.scalar_target = "scalar", "max"
  train.train_and_evaluate(scalar, predictor_workdir(workdir, "scalar-max"))
  return config, engine, workdir, result


def test_training_reads_the_stores_train_split(lora_run):
  from lsdist_jax.store import LengthStore

  config, _, _, result = lora_run
  meta = json.load(open(f"{result['export']}/lora.json"))
  data = LengthStore.open(config.collect.store).read()
  assert meta["training"]["train_examples"] == int((data["split"] == "train").sum())
  assert meta["training"]["valid_examples"] == int((data["split"] == "valid").sum())


def test_ssch_lora_runs_in_the_simulator(lora_run):
  from lsdist_jax.benchmark.simulate import simulate_strategies
  from lsdist_jax.serve.plan import load_cost_model

  config, _, workdir, _ = lora_run
  sim = config.copy_and_resolve_references()
  out = simulate_strategies(sim, config.collect.store, predictor_exports(workdir),
                            load_cost_model(sim, workdir), 24)
  rows = {r["strategy"]: r for r in out["rows"]}
  assert set(rows) == {"vanilla:16", "ssch-lora", "exact-distribution"}
  assert rows["ssch-lora"]["generated_tokens"] == rows["vanilla:16"]["generated_tokens"]
  assert rows["ssch-lora"]["samples_per_s"] > 0


def test_ssch_lora_runs_in_the_benchmark_with_its_prediction_timed(lora_run):
  from lsdist_jax.benchmark.run import run_benchmark

  config, engine, workdir, _ = lora_run
  out = run_benchmark(config, workdir, engine=engine)
  rows = {r["strategy"]: r for r in out["rows"]}
  assert rows["ssch-lora"]["seconds_predict"] > 0 and rows["vanilla:16"]["seconds_predict"] == 0
  assert rows["ssch-lora"]["generated_tokens"] == rows["vanilla:16"]["generated_tokens"]


def test_the_generate_job_plans_ssch_with_the_lora_export_only(lora_run, tmp_path):
  from lsdist_jax.serve.job import run_generate

  config, engine, workdir, result = lora_run
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps({"prompt": f"Name {k} colours."}) + "\n" for k in range(5)))
  out = tmp_path / "out.jsonl"
  summary = run_generate(config, str(src), str(out), result["export"], strategy="ssch",
                         engine=engine, show_progress=False)
  assert summary["prompts"] == 5 and len(out.read_text().splitlines()) == 5
  with pytest.raises(ConfigError, match="--strategy ssch"):
    run_generate(config, str(src), str(tmp_path / "o2.jsonl"), result["export"],
                 strategy="vbs", engine=engine, show_progress=False)
  with pytest.raises(ConfigError, match="not one"):
    run_generate(config, str(src), str(tmp_path / "o3.jsonl"),
                 predictor_exports(workdir)["distribution"], strategy="ssch", engine=engine,
                 show_progress=False)


def test_the_table_rows_score_lora_beside_the_scalar_mlp_on_the_test_split(lora_run):
  from lsdist_jax.lora.evaluate import evaluate_lora
  from lsdist_jax.store import LengthStore

  config, engine, workdir, _ = lora_run
  rows = evaluate_lora(config, workdir, engine, ("lora",))
  test = LengthStore.open(config.collect.store).read("test")
  assert [r["predictor"] for r in rows] == ["lora", "scalar-max"]
  for row in rows:
    assert row["prompts"] == len(test["lengths"]) and row["predict_seconds_per_1000"] > 0
    assert 0 <= row["right_bin_share_max"] <= 1 and row["mae_vs_max"] >= 0
  assert rows[0]["train_seconds"] > 0 and rows[0]["target"] == "max_bin100"
