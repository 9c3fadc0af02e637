"""The evaluation table of the predictors on the store's test split: distribution, scalar
baselines (where their exports exist) and the marginal baseline, with JSON and PNG outputs;
and the K-fold cross-validated table of the distribution predictor over every prompt.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lsdist_jax import paths
from lsdist_jax.predictor import metrics
from lsdist_jax.predictor.calibration import apply_recalibration
from lsdist_jax.predictor.train import Split, load_predictor, load_splits, train_and_evaluate


def evaluate_predictors(config, exports: dict, out_dir: str, store_path: str | None = None) -> dict:
  """exports: {"distribution": dir, "scalar-max": dir, "scalar-mean": dir} (missing ones skipped)."""
  store_path = store_path or paths.store(config)
  splits = load_splits(store_path)
  test, train = splits["test"], splits["train"]
  if test.hidden.shape[0] == 0:
    raise ValueError(f"the store at {store_path} has no test prompts")
  max_len = int(config.predictor.max_len)
  sigma = float(config.predictor.kde_sigma)
  lengths = np.minimum(test.lengths, max_len)
  rows, preds = [], {}
  for name, path in exports.items():
    if not path or not os.path.exists(os.path.join(path, "predictor.json")):
      continue
    predictor = load_predictor(path, hidden_dim=test.hidden.shape[1], max_len=max_len)
    if predictor.kind == "distribution":
      raw = predictor.predict_pmf(test.hidden, recalibrated=False)
      recalibration = predictor.meta.get("recalibration")
      preds[name] = apply_recalibration(raw, recalibration)
      rows.append(metrics.evaluate_pmf(name, preds[name], lengths, sigma))
      if recalibration:  # the same network before recalibration
        rows.append(metrics.evaluate_pmf(f"{name}-uncalibrated", raw, lengths, sigma))
    else:
      rows.append(metrics.evaluate_scalar(name, predictor.predict_scalar(test.hidden), lengths))
  marginal = np.tile(metrics.marginal_pmf(np.minimum(train.lengths, max_len), max_len),
                     (lengths.shape[0], 1))
  rows.append(metrics.evaluate_pmf("marginal", marginal, lengths, sigma))
  os.makedirs(out_dir, exist_ok=True)
  out = {"test_prompts": int(lengths.shape[0]), "samples_per_prompt": int(lengths.shape[1]),
         "max_len": max_len, "kde_sigma": sigma, "rows": rows}
  with open(os.path.join(out_dir, "predictor.json"), "w") as f:
    json.dump(out, f, indent=1)
  metrics.reliability_plot(rows, os.path.join(out_dir, "reliability.png"))
  if "distribution" in preds:
    metrics.example_plot(preds["distribution"], lengths, os.path.join(out_dir, "examples.png"))
  return out


def table_text(out: dict) -> str:
  lines = [f"{'model':14s} {'KL':>8s} {'W1':>8s} {'CRPS':>8s} {'cov.5':>6s} {'cov.8':>6s} "
           f"{'cov.9':>6s} {'MAEmed':>7s} {'MAEmax':>7s}"]
  fmt = lambda v, w: f"{v:{w}.3f}" if isinstance(v, float) else f"{'-':>{w}s}"
  for r in out["rows"]:
    c = r["coverage"]
    lines.append(f"{r['model']:14s} {fmt(r['kl'], 8)} {fmt(r['w1'], 8)} {fmt(r['crps'], 8)} "
                 f"{fmt(c['0.5'], 6)} {fmt(c['0.8'], 6)} {fmt(c['0.9'], 6)} "
                 f"{fmt(r['mae_median'], 7)} {fmt(r['mae_max'], 7)}")
  return "\n".join(lines)


def cross_validate(config, store_path: str, out_dir: str, folds: int = 5, seed: int = 0) -> dict:
  """K-fold evaluation of the distribution predictor over every prompt of the store: each fold
  is held out once; the others are split into train and valid (valid: one fold's share) for
  early stopping and recalibration, exactly as a real training run uses them. The held-out
  predictions of all folds are scored together, with the marginal of each fold's training pool
  as the baseline, so calibration is measured on every prompt rather than on the test split."""
  from lsdist_jax.store import LengthStore

  if folds < 2:
    raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")

  data = LengthStore.open(store_path).read()
  hidden, all_lengths = data["hidden"].astype(np.float32), data["lengths"]
  n = hidden.shape[0]
  if n < 2 * folds:
    raise ValueError(f"the store at {store_path} holds {n} prompts: too few for {folds} folds")
  max_len = int(config.predictor.max_len)
  sigma = float(config.predictor.kde_sigma)
  lengths = np.minimum(all_lengths, max_len)
  fold = np.random.default_rng(seed).permutation(n) % folds
  config = config.copy_and_resolve_references()
  config.predictor.kind = "distribution"
  preds = {"distribution": np.zeros((n, max_len + 1)),
           "distribution-uncalibrated": np.zeros((n, max_len + 1)),
           "marginal": np.zeros((n, max_len + 1))}
  for k in range(folds):
    held = np.nonzero(fold == k)[0]
    pool = np.nonzero(fold != k)[0]
    valid = pool[fold[pool] == (k + 1) % folds]
    train = pool[fold[pool] != (k + 1) % folds]
    result = train_and_evaluate(config, os.path.join(out_dir, f"fold{k}"), {
        "train": Split(hidden[train], all_lengths[train]),
        "valid": Split(hidden[valid], all_lengths[valid])})
    predictor = load_predictor(result["export"])
    raw = predictor.predict_pmf(hidden[held], recalibrated=False)
    preds["distribution-uncalibrated"][held] = raw
    preds["distribution"][held] = apply_recalibration(raw, predictor.meta.get("recalibration"))
    preds["marginal"][held] = metrics.marginal_pmf(lengths[train], max_len)
  rows = [metrics.evaluate_pmf(name, pred, lengths, sigma) for name, pred in preds.items()]
  out = {"folds": folds, "prompts": n, "samples_per_prompt": int(lengths.shape[1]),
         "max_len": max_len, "kde_sigma": sigma, "rows": rows}
  with open(os.path.join(out_dir, "predictor_cv.json"), "w") as f:
    json.dump(out, f, indent=1)
  metrics.reliability_plot(rows, os.path.join(out_dir, "reliability_cv.png"))
  return out
