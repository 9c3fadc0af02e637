"""The evaluation table of the predictors on the store's test split: distribution, scalar
baselines (where their exports exist) and the marginal baseline, with JSON and PNG outputs;
the K-fold cross-validated table of the distribution predictor over every prompt; and the whole
evaluation from two stores (`train_and_report`): recipes chosen on validation, the test table,
and the out-of-domain tables per `dataset` of an instructions_mix store.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lsdist_jax import paths
from lsdist_jax.predictor import metrics
from lsdist_jax.files import write_json
from lsdist_jax.predictor.calibration import apply_recalibration, fit_recalibration, pit_values
from lsdist_jax.predictor.train import Split, load_predictor, load_splits, train_and_evaluate

# The rows' precision in the JSON tables (metrics in tokens or nats; coverage shares).
DIGITS = 4


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
  """The rows as text; each coverage with its 95% bootstrap interval where there is one."""
  width = max([26] + [len(r["model"]) for r in out["rows"]])
  lines = [f"{'model':{width}s} {'KL':>7s} {'W1':>7s} {'CRPS':>7s} {'cov.5 [95% CI]':>19s} "
           f"{'cov.8 [95% CI]':>19s} {'cov.9 [95% CI]':>19s} {'MAEmed':>7s} {'MAEmax':>7s}"]
  fmt = lambda v, w: f"{v:{w}.3f}" if isinstance(v, (int, float)) else f"{'-':>{w}s}"

  def cov(r, q):
    ci = (r.get("coverage_ci") or {}).get(q)
    value = r["coverage"][q]
    if value is None:
      return f"{'-':>19s}"
    return f"{value:.3f} [{ci[0]:.3f},{ci[1]:.3f}]" if ci else f"{value:19.3f}"

  for r in out["rows"]:
    lines.append(f"{r['model']:{width}s} {fmt(r['kl'], 7)} {fmt(r['w1'], 7)} "
                 f"{fmt(r['crps'], 7)} {cov(r, '0.5')} {cov(r, '0.8')} {cov(r, '0.9')} "
                 f"{fmt(r['mae_median'], 7)} {fmt(r['mae_max'], 7)}")
  return "\n".join(lines)


def report_text(out: dict) -> str:
  """The test table and each out-of-domain table of `train_and_report`, as text."""
  parts = [f"predictor recipe: {out['recipe']['chosen']} (by {out['recipe']['by']}: "
           + ", ".join(f"{k} {v['crps']:.2f}" for k, v in out["recipe"]["validation"].items())
           + ")", f"test split: {out['test_prompts']} prompts x {out['samples_per_prompt']}",
           table_text(out)]
  for name, table in out.get("out_of_domain", {}).items():
    parts += [f"out of domain, {name}: {table['prompts']} prompts", table_text(table)]
  return "\n".join(parts)


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


def scalar_name(target: str) -> str:
  """The table's name of the scalar baseline trained on `target` (max, mean or a quantile)."""
  return f"scalar-{target}" if target in ("max", "mean") else f"scalar-q{float(target):g}"


def _kind_config(config, kind: str, target: str = "max", recipe: str | None = None):
  c = config.copy_and_resolve_references()
  c.predictor.kind = kind
  c.predictor.scalar_target = target
  if recipe is not None:
    c.predictor.recipe = recipe
  return c


def train_predictors(config, splits: dict[str, Split], workdir: str) -> dict:
  """Trains (or resumes) every candidate recipe of the distribution predictor and every scalar
  baseline of config.evaluate under <workdir>/predictor/, and picks the recipe with the least
  CRPS on the validation prompts (of the network before recalibration, which those prompts fit).
  Returns {"distribution": {recipe: Predictor}, "chosen": recipe, "validation": {recipe: row},
  "scalar": {name: Predictor}}."""
  ev = config.evaluate
  recipes = [str(r) for r in ev.recipes]
  if not recipes:
    raise ValueError("evaluate.recipes is empty: name at least one predictor recipe")
  max_len = int(config.predictor.max_len)
  valid = splits["valid"]
  out = {"distribution": {}, "validation": {}, "scalar": {}}
  for recipe in recipes:
    result = train_and_evaluate(_kind_config(config, "distribution", recipe=recipe),
                                os.path.join(workdir, "predictor", f"distribution-{recipe}"),
                                splits)
    predictor = load_predictor(result["export"])
    raw = predictor.predict_pmf(valid.hidden, recalibrated=False)
    row = metrics.evaluate_pmf(recipe, raw, np.minimum(valid.lengths, max_len),
                               float(config.predictor.kde_sigma), int(ev.bootstrap_draws))
    row.update(best_epoch=result["best_epoch"], settings=predictor.meta.get("training"),
               hidden_sizes=predictor.meta["hidden_sizes"])
    out["distribution"][recipe] = predictor
    out["validation"][recipe] = _rounded(row)
  out["chosen"] = min(recipes, key=lambda r: out["validation"][r]["crps"])
  for target in ev.scalar_targets:
    name = scalar_name(str(target))
    result = train_and_evaluate(_kind_config(config, "scalar", str(target)),
                                os.path.join(workdir, "predictor", name), splits)
    out["scalar"][name] = load_predictor(result["export"])
  return out


def table_rows(models: dict, hidden: np.ndarray, lengths: np.ndarray, marginal: np.ndarray,
               sigma: float, draws: int, recalibration: dict | None = None) -> list[dict]:
  """The rows of one table over prompts (hidden [P, D], lengths [P, N], already clipped to the
  predictors' max_len): the chosen distribution predictor (its own recalibration), the same
  network before it, with `recalibration` (another map) if given, the other recipes, the scalar
  baselines and the marginal pmf `marginal` [L+1]."""
  chosen = models["distribution"][models["chosen"]]
  raw = chosen.predict_pmf(hidden, recalibrated=False)
  pmfs = {"distribution": apply_recalibration(raw, chosen.meta.get("recalibration")),
          "distribution-uncalibrated": raw}
  if recalibration is not None:
    pmfs["distribution-recalibrated-in-domain"] = apply_recalibration(raw, recalibration)
  for recipe, predictor in models["distribution"].items():
    if recipe != models["chosen"]:
      pmfs[f"distribution-{recipe}-recipe"] = predictor.predict_pmf(hidden)
  pmfs["marginal"] = np.tile(marginal, (hidden.shape[0], 1))
  rows = [metrics.evaluate_pmf(name, pmf, lengths, sigma, draws) for name, pmf in pmfs.items()]
  rows[-1:-1] = [metrics.evaluate_scalar(name, predictor.predict_scalar(hidden), lengths)
                 for name, predictor in models["scalar"].items()]
  return [_rounded(r) for r in rows]


def _rounded(obj):
  if isinstance(obj, float):  # significant digits: a learning rate of 1e-5 stays 1e-5
    return float(f"{obj:.{DIGITS}g}") if 0 < abs(obj) < 1 else round(obj, DIGITS)
  if isinstance(obj, dict):
    return {k: _rounded(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_rounded(v) for v in obj]
  return obj


def mix_datasets(store_meta: dict, keys) -> np.ndarray:
  """The `dataset` field of each stored prompt (by key), from the data source the store was
  collected from (its meta.json). [P] str."""
  import ml_collections
  from lsdist_jax.data import open_source
  from lsdist_jax.errors import StateMismatchError

  source = (store_meta.get("data") or {}).get("source")
  if not source:
    raise StateMismatchError("the out-of-domain store's meta.json names no data source")
  prompts = open_source(ml_collections.ConfigDict({"source": source, "datasets": ()})).prompts
  by_key = {p.key: p.dataset for p in prompts}
  missing = [k for k in keys if k not in by_key]
  if missing:
    raise StateMismatchError(f"{len(missing)} prompts of the out-of-domain store are not in its "
                             f"source {source!r} (first key {missing[0]})")
  names = np.array([by_key[k] or "" for k in keys])
  if (names == "").any():
    raise StateMismatchError(f"the records of {source!r} have no 'dataset' field: per-dataset "
                             "tables need a source such as instructions_mix")
  return names


def _check_same_collection(meta: dict, mix_meta: dict, mix_path: str) -> None:
  from lsdist_jax.errors import StateMismatchError

  for key in ("model", "generation", "length_convention", "hidden_dim"):
    if meta.get(key) != mix_meta.get(key):
      raise StateMismatchError(f"the out-of-domain store {mix_path} was collected with another "
                               f"{key} ({mix_meta.get(key)!r}, the training store: "
                               f"{meta.get(key)!r}); its lengths are not comparable")


def out_of_domain(config, models: dict, marginal: np.ndarray, mix_path: str, meta: dict) -> dict:
  """Per `dataset` of the mix store: the table of `table_rows`, scored on the mix prompts outside
  the in-domain recalibration set (evaluate.mix_recalibration_prompts prompts of the mix store's
  train split, seeded), plus "all" over every dataset together."""
  from lsdist_jax.store import LengthStore

  store = LengthStore.open(mix_path)
  _check_same_collection(meta, store.meta, mix_path)
  data = store.read()
  datasets = mix_datasets(store.meta, data["key"])
  max_len = int(config.predictor.max_len)
  sigma, draws = float(config.predictor.kde_sigma), int(config.evaluate.bootstrap_draws)
  lengths = np.minimum(data["lengths"], max_len)
  hidden = data["hidden"].astype(np.float32)
  n_fit = int(config.evaluate.mix_recalibration_prompts)
  fit = np.zeros(len(lengths), bool)
  recalibration = None
  if n_fit > 0:
    pool = np.nonzero(data["split"] == "train")[0]
    if pool.size < n_fit:
      raise ValueError(f"evaluate.mix_recalibration_prompts={n_fit}, but the mix store's train "
                       f"split holds {pool.size} prompts")
    fit[np.random.default_rng([int(config.seed), 15]).choice(pool, n_fit, replace=False)] = True
    chosen = models["distribution"][models["chosen"]]
    raw = chosen.predict_pmf(hidden[fit], recalibrated=False)
    recalibration = fit_recalibration(pit_values(raw, lengths[fit], int(config.seed)),
                                      int(config.predictor.recalibration_knots))
  out = {}
  for name in ["all"] + sorted(set(datasets.tolist())):
    keep = ~fit & ((datasets == name) | (name == "all"))
    if not keep.any():
      continue
    out[name] = {"prompts": int(keep.sum()),
                 "rows": table_rows(models, hidden[keep], lengths[keep], marginal, sigma, draws,
                                    recalibration)}
  return out


def train_and_report(config, store_path: str, workdir: str, mix_store: str = "",
                     out_path: str | None = None) -> dict:
  """The predictor evaluation from a store of Alpaca prompts (and optionally a mix store): every
  predictor trained on the train split, the distribution recipe chosen on validation, the
  test-split table, the out-of-domain tables; written to `out_path` (default
  <workdir>/predictor.json) with the reliability and example plots beside it."""
  from lsdist_jax.store import LengthStore

  store = LengthStore.open(store_path)
  splits = load_splits(store_path)
  test = splits["test"]
  if test.hidden.shape[0] == 0:
    raise ValueError(f"the store at {store_path} has no test prompts")
  max_len = int(config.predictor.max_len)
  sigma, draws = float(config.predictor.kde_sigma), int(config.evaluate.bootstrap_draws)
  models = train_predictors(config, splits, workdir)
  marginal = metrics.marginal_pmf(np.minimum(splits["train"].lengths, max_len), max_len)
  lengths = np.minimum(test.lengths, max_len)
  out = {"store": store_path, "test_prompts": int(lengths.shape[0]),
         "train_prompts": int(splits["train"].hidden.shape[0]),
         "valid_prompts": int(splits["valid"].hidden.shape[0]),
         "samples_per_prompt": int(lengths.shape[1]), "max_len": max_len, "kde_sigma": sigma,
         "recipe": {"chosen": models["chosen"], "by": "least validation CRPS of the network "
                    "before recalibration", "validation": models["validation"]},
         "rows": table_rows(models, test.hidden, lengths, marginal, sigma, draws)}
  mix_store = mix_store or str(config.evaluate.mix_store)
  if mix_store:
    out["out_of_domain_store"] = mix_store
    out["out_of_domain"] = out_of_domain(config, models, marginal, mix_store, store.meta)
  out_path = out_path or os.path.join(workdir, "predictor.json")
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  write_json(out, out_path)
  stem = os.path.splitext(os.path.basename(out_path))[0]
  metrics.reliability_plot(out["rows"], os.path.join(out_dir, f"{stem}_reliability.png"))
  chosen = models["distribution"][models["chosen"]]
  metrics.example_plot(chosen.predict_pmf(test.hidden), lengths,
                       os.path.join(out_dir, f"{stem}_examples.png"))
  return out
