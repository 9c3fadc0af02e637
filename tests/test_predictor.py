"""Predictors: KDE targets, learning a known rule, checkpoint resume/export/refusal, metrics."""

import json
import os

import jax
import numpy as np
import pytest

from lsdist_jax.config import default_config
from lsdist_jax.data import prompt_key
from lsdist_jax.predictor import Split, load_predictor, train_and_evaluate
from lsdist_jax.predictor import metrics
from lsdist_jax.predictor.calibration import apply_recalibration, fit_recalibration, pit_values
from lsdist_jax.predictor.losses import kde_target
from lsdist_jax.schedule import dist

MAX_LEN = 128


def test_kde_target_sums_to_one_is_the_histogram_as_sigma_vanishes_and_symmetric():
  lengths = np.array([[10, 10, 20, 63], [0, 5, 5, 5]])
  for sigma in (0.0, 1.0, 4.0, 30.0):
    np.testing.assert_allclose(kde_target(lengths, MAX_LEN, sigma).sum(1), 1.0, rtol=1e-6)
  sharp = kde_target(lengths, MAX_LEN, 1e-3)
  assert sharp[0, 10] == pytest.approx(0.5) and sharp[0, 63] == pytest.approx(0.25)
  single = kde_target(np.array([[32] * 3]), MAX_LEN, 5.0)[0]
  np.testing.assert_allclose(single[32 - 10:32], single[33:33 + 10][::-1], rtol=1e-5)
  assert single.argmax() == 32


def synthetic(n, seed, dim=8, samples=16):
  """Lengths ~ Normal(mu(h), 8) with mu = 55 + 20 * h[0] (clipped): a rule the net can learn."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(n, dim)).astype(np.float32)
  mu = np.clip(55 + 20 * hidden[:, 0], 25, MAX_LEN - 25)
  lengths = np.clip(np.rint(mu[:, None] + 8 * rng.normal(size=(n, samples))), 0, MAX_LEN)
  return Split(hidden, lengths.astype(np.int32)), mu


def small_config(kind="distribution", epochs=30):
  c = default_config()
  c.seed = 0
  c.predictor.kind = kind
  c.predictor.max_len = MAX_LEN
  c.predictor.hidden_sizes = (64, 64)
  c.predictor.dropout = 0.0
  c.predictor.kde_sigma = 2.0
  c.predictor.input_noise_std = 0.05
  c.predictor.learning_rate = 3e-3
  c.predictor.batch_size = 64
  c.predictor.epochs = epochs
  c.predictor.recalibration_folds = 0  # the map from the validation prompts (one test uses K)
  return c


@pytest.fixture(scope="module")
def data():
  train, _ = synthetic(512, 0)
  valid, _ = synthetic(128, 1)
  test, mu = synthetic(128, 2)
  return {"train": train, "valid": valid, "test": test}, mu


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
  splits, _ = data
  workdir = str(tmp_path_factory.mktemp("dist"))
  result = train_and_evaluate(small_config(), workdir, splits)
  return workdir, result


def test_training_beats_the_marginal_and_recovers_the_rule(data, trained):
  splits, mu = data
  workdir, result = trained
  predictor = load_predictor(os.path.join(workdir, "export"), hidden_dim=8, max_len=MAX_LEN)
  pred = predictor.predict_pmf(splits["test"].hidden)
  marginal = np.tile(metrics.marginal_pmf(splits["train"].lengths, MAX_LEN), (128, 1))
  ours = metrics.evaluate_pmf("distribution", pred, splits["test"].lengths, 2.0)
  base = metrics.evaluate_pmf("marginal", marginal, splits["test"].lengths, 2.0)
  assert ours["kl"] < 0.5 * base["kl"] and ours["crps"] < 0.6 * base["crps"]
  # quantiles of Normal(mu, 8): median ~ mu, q0.9 ~ mu + 10.3
  assert np.median(np.abs(dist.quantile(pred, 0.5) - mu)) < 4.0
  assert np.median(np.abs(dist.quantile(pred, 0.9) - (mu + 10.25))) < 5.0
  assert all(abs(ours["coverage"][q] - float(q)) < 0.1 for q in ("0.5", "0.8", "0.9"))


def test_resumed_training_equals_an_uninterrupted_run(data, trained, tmp_path):
  splits, _ = data
  _, uninterrupted = trained
  workdir = str(tmp_path / "resumed")
  stopped = train_and_evaluate(small_config(), workdir, splits, stop_after_epochs=11)
  assert stopped == {"stopped_at_epoch": 11}
  # checkpoints are every 10 epochs: epoch 11 was lost with the "crash" and is run again
  resumed = train_and_evaluate(small_config(), workdir, splits)
  for a, b in zip(jax.tree.leaves(uninterrupted["params"]), jax.tree.leaves(resumed["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed["best_epoch"] == uninterrupted["best_epoch"]
  with open(os.path.join(workdir, "train_log.jsonl")) as f:
    epochs = [json.loads(line)["epoch"] for line in f]
  assert epochs == list(range(1, small_config().predictor.epochs + 1))


def test_export_reloads_identically_and_refuses_other_shapes(data, trained):
  splits, _ = data
  workdir, _ = trained
  path = os.path.join(workdir, "export")
  a = load_predictor(path).predict_pmf(splits["test"].hidden)
  b = load_predictor(path).predict_pmf(splits["test"].hidden)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a.sum(1), 1.0)
  with pytest.raises(ValueError, match="hidden states of size 8"):
    load_predictor(path, hidden_dim=576)
  with pytest.raises(ValueError, match="0..1024 is needed"):
    load_predictor(path, max_len=1024)
  with pytest.raises(ValueError, match=r"\[n, 8\]"):
    load_predictor(path).predict_pmf(np.zeros((2, 9)))
  with pytest.raises(FileNotFoundError, match="no predictor export"):
    load_predictor(os.path.join(workdir, "nothing"))


def test_resuming_a_workdir_of_another_predictor_is_refused(data, trained):
  splits, _ = data
  workdir, _ = trained
  other = small_config()
  other.predictor.max_len = 64
  with pytest.raises(ValueError, match="another predictor"):
    train_and_evaluate(other, workdir, splits)


def test_scalar_predictor_learns_the_max(data, tmp_path):
  splits, mu = data
  config = small_config("scalar", epochs=40)
  config.predictor.scalar_target = "max"
  train_and_evaluate(config, str(tmp_path), splits)
  pred = load_predictor(str(tmp_path / "export")).predict_scalar(splits["test"].hidden)
  row = metrics.evaluate_scalar("scalar-max", pred, splits["test"].lengths)
  assert row["mae_max"] < 12.0 and row["kl"] is None
  assert row["mae_max"] < np.mean(np.abs(splits["train"].lengths.max(1).mean()
                                         - splits["test"].lengths.max(1)))


def test_metrics_sanity():
  rng = np.random.default_rng(0)
  lengths = rng.integers(5, 100, size=(20, 30))
  perfect = dist.empirical_pmf(lengths, MAX_LEN)
  marginal = np.tile(metrics.marginal_pmf(lengths, MAX_LEN), (20, 1))
  good = metrics.evaluate_pmf("perfect", perfect, lengths, 0.0)
  bad = metrics.evaluate_pmf("marginal", marginal, lengths, 0.0)
  assert good["w1"] == pytest.approx(0.0) and good["kl"] == pytest.approx(0.0, abs=1e-6)
  assert bad["w1"] > 0 and bad["kl"] > 0 and good["crps"] < bad["crps"]
  point = np.full(20, 25.0)
  scalar = metrics.evaluate_scalar("s", point, lengths)
  assert scalar["w1"] == pytest.approx(np.abs(lengths - 25).mean())
  # a point-mass pmf scores the same W1 and CRPS as the scalar
  mass = dist.empirical_pmf(np.full((20, 1), 25), MAX_LEN)
  assert metrics.wasserstein1(mass, lengths) == pytest.approx(scalar["w1"])
  assert metrics.crps(mass, lengths) == pytest.approx(scalar["crps"])


def test_coverage_interval_holds_the_figure_and_narrows_with_more_prompts():
  rng = np.random.default_rng(3)
  mu = rng.uniform(30, 90, 400)
  lengths = np.clip(np.rint(mu[:, None] + 10 * rng.normal(size=(400, 16))), 0, MAX_LEN)
  pred = _normal_pmf(mu, np.full(400, 10.0))
  widths = {}
  for n in (10, 400):
    ci = metrics.coverage_interval(pred[:n], lengths[:n])
    cov = metrics.coverage(pred[:n], lengths[:n], (0.5, 0.8, 0.9))
    for q in ("0.5", "0.8", "0.9"):
      assert ci[q][0] <= cov[q] <= ci[q][1]
    widths[n] = ci["0.5"][1] - ci["0.5"][0]
  assert widths[400] < widths[10] / 3  # ~ 1 / sqrt(prompts)


def _normal_pmf(mu, sd, max_len=MAX_LEN):
  t = np.arange(max_len + 1)
  pmf = np.exp(-0.5 * ((t[None, :] - np.asarray(mu)[:, None]) / np.asarray(sd)[:, None]) ** 2)
  return pmf / pmf.sum(1, keepdims=True)


def test_recalibration_of_a_too_wide_prediction_restores_quantile_coverage():
  rng = np.random.default_rng(0)
  mu = rng.uniform(30, 90, size=200)
  true = _normal_pmf(mu, np.full(200, 6.0))
  draw = lambda n: np.stack([rng.choice(MAX_LEN + 1, size=n, p=p) for p in true])
  wide = _normal_pmf(mu + 4.0, np.full(200, 15.0))  # shifted and 2.5x too wide
  held_out, fresh = draw(32), draw(32)
  before = metrics.coverage(wide, fresh)
  assert abs(before["0.1"] - 0.1) > 0.05 and abs(before["0.9"] - 0.9) > 0.05
  recal = fit_recalibration(pit_values(wide, held_out), knots=21)
  assert np.all(np.diff(recal["value"]) >= 0) and recal["value"][0] == 0 == 1 - recal["value"][-1]
  fixed = apply_recalibration(wide, recal)
  np.testing.assert_allclose(fixed.sum(1), 1.0)
  after = metrics.coverage(fixed, fresh)
  assert all(abs(after[q] - float(q)) < 0.05 for q in after), after
  assert metrics.crps(fixed, fresh) < metrics.crps(wide, fresh)


def test_recalibration_of_a_calibrated_prediction_is_near_identity():
  rng = np.random.default_rng(1)
  mu = rng.uniform(30, 90, size=300)
  pmf = _normal_pmf(mu, np.full(300, 8.0))
  samples = np.stack([rng.choice(MAX_LEN + 1, size=32, p=p) for p in pmf])
  pit = pit_values(pmf, samples)
  assert abs(pit.mean() - 0.5) < 0.02 and abs(np.mean(pit <= 0.2) - 0.2) < 0.02
  recal = fit_recalibration(pit)
  np.testing.assert_allclose(recal["value"], recal["grid"], atol=0.02)
  assert apply_recalibration(pmf, None) is pmf
  with pytest.raises(ValueError, match="held-out samples"):
    fit_recalibration(np.zeros(0))


def test_export_carries_the_recalibration_fitted_on_validation(data, trained):
  splits, _ = data
  workdir, _ = trained
  predictor = load_predictor(os.path.join(workdir, "export"))
  recal = predictor.meta["recalibration"]
  raw = predictor.predict_pmf(splits["valid"].hidden, recalibrated=False)
  expected = fit_recalibration(pit_values(raw, splits["valid"].lengths, 0),
                               small_config().predictor.recalibration_knots)
  np.testing.assert_allclose(recal["value"], expected["value"])
  test_raw = predictor.predict_pmf(splits["test"].hidden, recalibrated=False)
  np.testing.assert_allclose(predictor.predict_pmf(splits["test"].hidden),
                             apply_recalibration(test_raw, recal))


def test_cross_validation_scores_every_prompt_held_out(data, tmp_path):
  from lsdist_jax.predictor.evaluate import cross_validate
  from lsdist_jax.store import LengthStore

  splits, _ = data
  pool = splits["train"]  # 512 prompts whose lengths follow a known rule of hidden[0]
  meta = {"model": {"name": "synthetic"}, "generation": {"max_seq_len": MAX_LEN + 40},
          "split_seed": 0, "split_fractions": [0.8, 0.1, 0.1]}
  store = LengthStore.create_or_open(str(tmp_path / "store"), meta, hidden_dim=8,
                                     samples_per_prompt=pool.lengths.shape[1])
  n = 160
  store.write_chunk("p0", {"index": np.arange(n), "key": [prompt_key(f"p{i}") for i in range(n)],
                           "prompt_len": np.full(n, 10),
                           "lengths": pool.lengths[:n], "finished": np.ones_like(pool.lengths[:n]),
                           "hidden": pool.hidden[:n]})
  config = small_config(epochs=25)
  config.predictor.batch_size = 16
  out = cross_validate(config, str(tmp_path / "store"), str(tmp_path / "cv"), folds=4)
  assert out["prompts"] == n and out["folds"] == 4
  rows = {r["model"]: r for r in out["rows"]}
  assert set(rows) == {"distribution", "distribution-uncalibrated", "marginal"}
  assert rows["distribution"]["crps"] < 0.6 * rows["marginal"]["crps"]  # learned out of fold
  assert all(abs(v - float(q)) < 0.1 for q, v in rows["distribution"]["coverage"].items())
  assert os.path.isfile(tmp_path / "cv" / "predictor_cv.json")
  assert sorted(os.listdir(tmp_path / "cv")) == ["fold0", "fold1", "fold2", "fold3",
                                                  "predictor_cv.json", "reliability_cv.png"]
  with pytest.raises(ValueError, match="at least 2 folds"):
    cross_validate(config, str(tmp_path / "store"), str(tmp_path / "cv1"), folds=1)


def test_out_of_fold_recalibration_uses_every_training_prompt(data, tmp_path):
  """With recalibration_folds=K the map is fitted on the validation samples plus every training
  sample, each scored by a network trained without its fold; that network's fold runs are
  resumable workdirs of their own, and the map it gives still calibrates held-out prompts."""
  splits, _ = data
  small = {"train": Split(splits["train"].hidden[:96], splits["train"].lengths[:96]),
           "valid": splits["valid"]}
  config = small_config(epochs=8)
  config.predictor.recalibration_folds = 3
  train_and_evaluate(config, str(tmp_path / "run"), small)
  meta = load_predictor(str(tmp_path / "run" / "export")).meta
  samples = splits["valid"].lengths.size + small["train"].lengths.size
  assert meta["recalibration_samples"] == samples
  for k in range(3):
    assert os.path.isfile(str(tmp_path / "run" / "recalibration" / f"fold{k}" / "export" /
                              "predictor.json"))
  predictor = load_predictor(str(tmp_path / "run" / "export"))
  test = splits["test"]
  pit = pit_values(predictor.predict_pmf(test.hidden), test.lengths, 1)
  for q in (0.5, 0.8, 0.9):
    assert abs(float(np.mean(pit <= q)) - q) < 0.1
  config.predictor.recalibration_folds = 60
  with pytest.raises(ValueError, match="recalibration_folds=60 needs at least 120"):
    train_and_evaluate(config, str(tmp_path / "bad"), small)


def _write_store(path, keys, split: Split, meta_data: dict):
  from lsdist_jax.store import LengthStore

  n = len(keys)
  meta = {"model": {"name": "synthetic"}, "generation": {"max_seq_len": MAX_LEN + 40},
          "split_seed": 0, "split_fractions": [0.8, 0.1, 0.1], "data": meta_data}
  store = LengthStore.create_or_open(path, meta, hidden_dim=split.hidden.shape[1],
                                     samples_per_prompt=split.lengths.shape[1])
  store.write_chunk("p0", {"index": np.arange(n), "key": list(keys), "prompt_len": np.full(n, 10),
                           "lengths": split.lengths[:n], "finished": np.ones_like(split.lengths[:n]),
                           "hidden": split.hidden[:n]})
  return path


def test_train_and_report_chooses_a_recipe_on_validation_and_scores_each_mix_dataset(tmp_path):
  """The whole evaluation from two stores: recipes trained and chosen on validation, the test
  table with bootstrap intervals, the out-of-domain table per `dataset` of a mix store (whose
  lengths follow another rule: the Alpaca-trained net is off there) and its in-domain
  recalibration row, which repairs the coverage that the shift breaks."""
  import ml_collections
  from lsdist_jax.data import open_source
  from lsdist_jax.predictor.evaluate import report_text, train_and_report

  pool, _ = synthetic(300, 3)
  alpaca = _write_store(str(tmp_path / "alpaca"), [prompt_key(f"a{i}") for i in range(300)],
                        pool, {"source": "alpaca_local"})
  prompts = open_source(ml_collections.ConfigDict(
      {"source": "instructions_mix", "datasets": ()})).prompts
  mix = ([p for p in prompts if p.dataset == "dolly15k"][:100]
         + [p for p in prompts if p.dataset == "gsm8k_test"][:100])
  shifted, _ = synthetic(len(mix), 4)
  shifted.lengths[:] = np.minimum(shifted.lengths + 10, MAX_LEN)  # longer than Alpaca's rule
  mix_path = _write_store(str(tmp_path / "mix"), [p.key for p in mix], shifted,
                          {"source": "instructions_mix"})
  config = small_config(epochs=25)
  config.evaluate.recipes = ("current", "seed")
  config.evaluate.bootstrap_draws = 300
  config.evaluate.mix_recalibration_prompts = 60
  config.evaluate.scalar_targets = ("max", "0.9")
  out_path = str(tmp_path / "results" / "predictor.json")
  out = train_and_report(config, alpaca, str(tmp_path / "work"), mix_path, out_path)
  with open(out_path) as f:
    assert json.load(f) == json.loads(json.dumps(out))
  assert out["test_prompts"] + out["train_prompts"] + out["valid_prompts"] == 300
  validation = out["recipe"]["validation"]
  assert set(validation) == {"current", "seed"}
  # Adam at 1e-5 for 25 epochs barely moves the seed's net: today's wins on validation CRPS.
  assert out["recipe"]["chosen"] == "current"
  assert validation["current"]["crps"] < validation["seed"]["crps"]
  rows = {r["model"]: r for r in out["rows"]}
  assert list(rows) == ["distribution", "distribution-uncalibrated", "distribution-seed-recipe",
                        "scalar-max", "scalar-q0.9", "marginal"]
  for key in ("kl", "w1", "crps"):
    assert rows["distribution"][key] < rows["marginal"][key], key
  for q, (lo, hi) in rows["distribution"]["coverage_ci"].items():
    assert lo <= rows["distribution"]["coverage"][q] <= hi
  assert rows["scalar-max"]["coverage"]["0.9"] is None and rows["scalar-max"]["kl"] is None
  ood = out["out_of_domain"]
  assert set(ood) == {"all", "dolly15k", "gsm8k_test"}
  assert ood["dolly15k"]["prompts"] + ood["gsm8k_test"]["prompts"] == ood["all"]["prompts"] == 140
  every = {r["model"]: r for r in ood["all"]["rows"]}
  off = lambda r: max(abs(r["coverage"][q] - float(q)) for q in ("0.5", "0.8", "0.9"))
  assert off(every["distribution"]) > 0.1  # the shift breaks the Alpaca calibration
  assert off(every["distribution-recalibrated-in-domain"]) < 0.5 * off(every["distribution"])
  assert "out of domain, gsm8k_test" in report_text(out)
  assert os.path.isfile(tmp_path / "results" / "predictor_reliability.png")


def test_seed_recipe_scales_the_reference_widths_to_the_hidden_size():
  from lsdist_jax.errors import ConfigError
  from lsdist_jax.predictor.train import with_recipe

  config = small_config()
  config.predictor.recipe = "seed"
  seed = with_recipe(config, 576).predictor
  assert tuple(seed.hidden_sizes) == (1152, 576, 288)
  assert (seed.learning_rate, seed.batch_size, seed.epochs, seed.kde_sigma,
          seed.input_noise_std, seed.dropout) == (1e-5, 1024, 300, 32.0, 1.0, 0.5)
  assert with_recipe(small_config(), 576).predictor.hidden_sizes == (64, 64)
  config.predictor.recipe = "paper"
  with pytest.raises(ConfigError, match="predictor.recipe 'paper'"):
    with_recipe(config, 576)
