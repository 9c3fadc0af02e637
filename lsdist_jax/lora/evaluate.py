"""The LoRA predictor's rows of the predictor table, beside the scalar MLP's: on the store's
test split, MAE of the predicted length vs each prompt's sampled max, the share in the right
bin, training time and prediction time per 1,000 prompts.
"""

from __future__ import annotations

import os
import time

import numpy as np

from lsdist_jax import paths
from lsdist_jax.lora.data import bin_up, length_targets, store_prompts
from lsdist_jax.lora.predict import load_lora, read_lora_meta


def scores(name: str, predicted, lengths: np.ndarray, width: int, target: str) -> dict:
  """MAE of `predicted` [P] vs each prompt's sampled max (and vs its target), and the share of
  prompts whose predicted bin is the bin of their sampled max (and of their target)."""
  predicted = np.asarray(predicted, np.float64)
  true_max = lengths.max(axis=1).astype(np.float64)
  true_target = length_targets(lengths, target, width)
  bins = bin_up(predicted, width)
  return {"predictor": name, "target": f"{target}_bin{width}", "prompts": int(len(predicted)),
          "mae_vs_max": float(np.mean(np.abs(predicted - true_max))),
          "right_bin_share_max": float(np.mean(bins == bin_up(true_max, width))),
          "mae_vs_target": float(np.mean(np.abs(predicted - true_target))),
          "right_bin_share_target": float(np.mean(bins == true_target))}


def evaluate_lora(config, workdir: str, engine, lora_names=("lora",), store_path: str | None = None,
                  scalar_name: str = "scalar-max") -> list[dict]:
  """Rows for each LoRA export of `lora_names` under <workdir>/predictor/ and the scalar MLP
  (where its export exists), scored on the store's test split with config.lora.bin_width."""
  from lsdist_jax.predictor import load_predictor
  from lsdist_jax.store import LengthStore

  test = LengthStore.open(store_path or paths.store(config, workdir)).read("test")
  if not len(test["lengths"]):
    raise ValueError("the store has no test prompts to evaluate on")
  lengths = np.asarray(test["lengths"])
  width = int(config.lora.bin_width)
  prompt_ids = engine.encode(store_prompts(config, test))
  rows = []
  for name in lora_names:
    directory = paths.predictor_export(workdir, name)
    predictor = load_lora(directory, engine, batch=int(config.lora.predict_batch))
    predictor.predict_ids(prompt_ids[:predictor.batch])  # compiles the shapes it needs
    compiled = predictor.generator.compile_seconds
    predictor.unparsed = predictor.answers = 0
    t0 = time.perf_counter()
    predicted = predictor.predict_ids(prompt_ids)
    seconds = time.perf_counter() - t0 - (predictor.generator.compile_seconds - compiled)
    meta = read_lora_meta(directory)
    row = scores(name, predicted, lengths, width, meta["bin_rule"]["target"])
    row.update(unparsed=int(predictor.unparsed),
               train_seconds=meta["training"].get("train_seconds"),
               predict_seconds_per_1000=1000.0 * seconds / len(prompt_ids),
               note="one greedy answer per prompt from the LLM with merged adapters")
    rows.append(row)
  scalar_dir = paths.predictor_export(workdir, scalar_name)
  if os.path.isfile(os.path.join(scalar_dir, "predictor.json")):
    mlp = load_predictor(scalar_dir, hidden_dim=test["hidden"].shape[1])
    mlp.predict_scalar(test["hidden"])  # compiles
    t0 = time.perf_counter()
    predicted = mlp.predict_scalar(test["hidden"])
    seconds = time.perf_counter() - t0
    prefill = _prefill_seconds(engine, prompt_ids, int(config.collect.hidden_layer))
    row = scores(scalar_name, predicted, lengths, width, "max")
    row.update(unparsed=0, train_seconds=None,
               predict_seconds_per_1000=1000.0 * (seconds + prefill) / len(prompt_ids),
               note="MLP on the prompt's hidden state; prediction time includes the prefill "
                    "that computes it (the engine's own embed)")
    rows.append(row)
  return rows


def _prefill_seconds(engine, prompt_ids, layer: int) -> float:
  engine.embed(prompt_ids[:64], layer=layer)  # compiles
  compiled = engine.generator.compile_seconds
  t0 = time.perf_counter()
  engine.embed(prompt_ids, layer=layer)
  return time.perf_counter() - t0 - (engine.generator.compile_seconds - compiled)
