"""The LoRA length predictor's export (adapters + a meta naming the base model, bin rule and
training settings), `load_lora` (refuses another base model's adapters) and `LoraPredictor`:
batched greedy answers from the merged weights, parsed to lengths, unparsable ones counted.
"""

from __future__ import annotations

import hashlib
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from lsdist_jax import exports
from lsdist_jax.errors import MissingFileError, StateMismatchError
from lsdist_jax.llama import lora
from lsdist_jax.llama.generator import Generator
from lsdist_jax.lora.data import (bin_up, instruction_ids, parse_answer, prompt_budget,
                                  query_ids)

META = "lora.json"
FORMAT = "lsdist_jax.lora"
KIND = "lora"


def base_identity(engine) -> dict:
  """What the adapters belong to: the model's shape and a digest of some of its weights (their
  bfloat16 values, so the same weights loaded in float32 or bfloat16 agree)."""
  params = engine.params
  last = lora.layer_names(params)[-1]
  probe = [params["embed"][:64], params[last]["mlp"]["w_down"][:64]]
  digest = hashlib.sha256()
  for x in jax.device_get([jnp.asarray(p).astype(jnp.bfloat16) for p in probe]):
    digest.update(np.asarray(x).tobytes())
  return {"model": engine.config.fingerprint(), "weights_sha256": digest.hexdigest()}


def marginal_bin(targets: np.ndarray) -> int:
  """The most frequent answer of the training set (the smallest of ties): the fallback for an
  answer that holds no number."""
  values, counts = np.unique(np.asarray(targets, np.int64), return_counts=True)
  return int(values[np.argmax(counts)])


def training_meta(config, train_examples: int, valid_examples: int, batch: int) -> dict:
  lc = config.lora
  return {"learning_rate": float(lc.learning_rate), "warmup_fraction": float(lc.warmup_fraction),
          "weight_decay": float(lc.weight_decay), "epochs": int(lc.epochs), "batch": int(batch),
          "compute_dtype": str(lc.compute_dtype), "seed": int(config.seed),
          "train_examples": int(train_examples), "valid_examples": int(valid_examples)}


def export_lora(directory: str, engine, adapters, spec: lora.LoraSpec, config, fallback: int,
                settings: dict) -> str:
  """Adapters (orbax) + lora.json, written last."""
  lc = config.lora
  meta = {"format": FORMAT, "version": 1, "kind": KIND, "lora": spec.to_dict(),
          "base": base_identity(engine),
          "base_model": {"name": engine.source or config.model.name, "dtype": engine.dtype,
                         "chat_format": engine.tokenizer.chat_format, "seed": int(config.seed)},
          "bin_rule": {"target": str(lc.target), "bin_width": int(lc.bin_width),
                       "name": f"{lc.target}_bin{int(lc.bin_width)}"},
          "answer_tokens": int(lc.answer_tokens), "max_prompt_tokens": int(lc.max_prompt_tokens),
          "fallback_bin": int(fallback), "training": settings}
  return exports.save(directory, adapters, meta, META)


def is_lora_export(directory: str) -> bool:
  return bool(directory) and exports.is_export(directory, META)


def read_lora_meta(directory: str) -> dict:
  return exports.read_meta(directory, META, FORMAT, "LoRA predictor export")


def check_base(meta: dict, engine, directory: str) -> None:
  """Refuses adapters trained on another base model (shape or weights)."""
  mine = base_identity(engine)
  theirs = meta["base"]
  # the shape, not the name (a GGUF's config is named after its file: a renamed or moved copy
  # of the same weights is the same base, which the weights' digest below decides)
  differ = sorted(k for k in set(theirs["model"]) | set(mine["model"])
                  if k != "name" and theirs["model"].get(k) != mine["model"].get(k))
  if differ:
    raise StateMismatchError(f"LoRA adapters at {directory} were trained on another base model "
                             f"({meta['base_model']['name']}): its {', '.join(differ)} differ "
                             f"from this engine's ({engine.source})")
  if theirs["weights_sha256"] != mine["weights_sha256"]:
    raise StateMismatchError(f"LoRA adapters at {directory} were trained on other weights "
                             f"({meta['base_model']['name']}) than this engine's "
                             f"({engine.source}), of the same shape")


def load_lora(directory: str, engine, max_len: int | None = None,
              batch: int = 64) -> "LoraPredictor":
  """The predictor of an export, on `engine` (which must be its base model)."""
  directory = os.path.abspath(directory)
  if not is_lora_export(directory):
    raise MissingFileError(f"no LoRA predictor export at {directory} (missing {META}); train one "
                           "with launch/train_lora.py")
  meta = read_lora_meta(directory)
  check_base(meta, engine, directory)
  spec = lora.LoraSpec(**meta["lora"])
  target = jax.eval_shape(lambda: lora.init_adapters(engine.params, spec))
  adapters = exports.restore_params(directory, target, what="LoRA predictor export")
  return LoraPredictor(meta, adapters, engine, max_len=max_len, batch=batch)


def load_base_engine(directory: str, engine_config=None):
  """The base model an export names (length replay schedules another model's shape)."""
  from lsdist_jax.engine import Engine

  base = read_lora_meta(directory)["base_model"]
  return Engine.load(base["name"], dtype=base["dtype"], chat_format=base["chat_format"],
                     seed=int(base["seed"]), engine_config=engine_config)


class LoraPredictor:
  """`predict_ids(prompt ids) -> lengths [n]`: one greedy answer of a few tokens per prompt
  from the base weights with the adapters merged; `unparsed` counts answers without a number
  (each replaced by the training set's most frequent bin)."""

  kind = KIND

  def __init__(self, meta: dict, adapters, engine, max_len: int | None = None, batch: int = 64):
    self.meta = meta
    self.engine = engine
    self.spec = lora.LoraSpec(**meta["lora"])
    self.width = int(meta["bin_rule"]["bin_width"])
    self.fallback = int(meta["fallback_bin"])
    self.answer_tokens = int(meta["answer_tokens"])
    self.max_prompt_tokens = int(meta["max_prompt_tokens"])
    self.max_len = max_len
    self.batch = int(batch)
    self.instruction = instruction_ids(engine.tokenizer, self.width)
    self.max_prompt_tokens = prompt_budget(self.max_prompt_tokens, self.instruction,
                                           self.answer_tokens,
                                           engine.config.max_position_embeddings)
    merged = lora.merge(engine.params, adapters, self.spec)
    base = engine.generator
    self.generator = Generator(engine.model, merged, mesh=engine.mesh, buckets=base.buckets,
                               pad_id=base.pad_id, top_k_candidates=base.top_k_candidates)
    self.unparsed = 0  # answers without a number, over this predictor's life
    self.answers = 0
    self.engine_is_serving = False  # set where the serving engine is this base model

  def answer_texts(self, prompt_ids) -> list[str]:
    """The generated answer of each prompt (served token ids), greedy."""
    self.generator.device_lock = self.engine.generator.device_lock
    queries = [query_ids(p, self.instruction, self.max_prompt_tokens) for p in prompt_ids]
    limit = self.engine.config.max_position_embeddings
    texts = []
    for start in range(0, len(queries), self.batch):
      chunk = queries[start:start + self.batch]
      longest = max(len(q) for q in chunk)
      result = self.generator.generate(chunk, cap=self.answer_tokens,
                                       max_seq_len=min(limit, longest + self.answer_tokens),
                                       temperature=0.0, top_p=1.0, seed=0)
      for row in range(len(chunk)):
        texts.append(self.engine.tokenizer.decode(
            result.tokens[row, :result.num_generated[row]].tolist()))
    return texts

  def predict_ids(self, prompt_ids) -> np.ndarray:
    """Predicted lengths [n] (the answered bins, float64) of prompts given as served ids."""
    if not len(prompt_ids):
      return np.zeros((0,), np.float64)
    parsed = [parse_answer(t) for t in self.answer_texts(prompt_ids)]
    missing = sum(p is None for p in parsed)
    self.unparsed += missing
    self.answers += len(parsed)
    if missing:
      logging.warning("LoRA predictor: %d of %d answers held no number; the training set's "
                      "bin %d stands in for them", missing, len(parsed), self.fallback)
    values = bin_up([self.fallback if p is None else p for p in parsed], self.width)
    if self.max_len is not None:
      values = np.minimum(values, int(self.max_len))
    return values.astype(np.float64)

  def predict_texts(self, texts) -> np.ndarray:
    """Predicted lengths [n] of prompts given as text (chat-formatted by the base's tokenizer)."""
    return self.predict_ids(self.engine.encode(list(texts)))


def load_lora_on(directory: str, engine=None, own_base: bool = False,
                 max_len: int | None = None, batch: int = 64,
                 engine_config=None) -> LoraPredictor:
  """The predictor on the serving `engine` where that is its base model; with `own_base`
  (length replay schedules another model's shape; the simulator has no engine) otherwise on
  the base model the export names, loaded here; else `load_lora`'s refusal."""
  if engine is not None:
    try:
      predictor = load_lora(directory, engine, max_len=max_len, batch=batch)
      predictor.engine_is_serving = True
      return predictor
    except StateMismatchError:
      if not own_base:
        raise
  base = load_base_engine(directory, engine_config)
  logging.info("LoRA predictor %s runs on its own base model %s", directory, base.source)
  return load_lora(directory, base, max_len=max_len, batch=batch)
