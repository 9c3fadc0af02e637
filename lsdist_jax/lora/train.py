"""LoRA supervised fine-tuning of the engine's LLM to answer its response-length bin: optax
AdamW with warm-up + cosine decay, cross-entropy on the answer tokens only, base weights frozen,
orbax checkpoints (latest + best by validation loss, resumable), then the export.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lsdist_jax import paths
from lsdist_jax.errors import ConfigError
from lsdist_jax.llama import lora
from lsdist_jax.llama.model import Llama, init_cache
from lsdist_jax.lora.data import Examples, build_examples, store_prompts
from lsdist_jax.lora.predict import export_lora, marginal_bin, training_meta
from lsdist_jax.predictor import checkpoints
from lsdist_jax.predictor.train import keep_log

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def spec_of(lora_config) -> lora.LoraSpec:
  return lora.LoraSpec(int(lora_config.rank), float(lora_config.alpha),
                       tuple(lora_config.targets))


def optimizer(lora_config, total_steps: int):
  """AdamW on a linear warm-up to lora.learning_rate, then cosine decay to 0."""
  warmup = int(round(float(lora_config.warmup_fraction) * total_steps))
  schedule = optax.warmup_cosine_decay_schedule(0.0, float(lora_config.learning_rate),
                                                max(warmup, 1), max(total_steps, warmup + 1),
                                                end_value=0.0)
  return optax.adamw(schedule, weight_decay=float(lora_config.weight_decay))


class LoraTrainer:
  """Jitted loss and step for one engine's model; the base params are an argument, never
  updated (only the adapters are differentiated and carried in the state)."""

  def __init__(self, engine, lora_config, total_steps: int):
    dtype_name = str(lora_config.compute_dtype)
    if dtype_name not in COMPUTE_DTYPES:
      raise ConfigError(f"lora.compute_dtype={dtype_name!r}; expected one of "
                        f"{sorted(COMPUTE_DTYPES)}")
    self.compute = COMPUTE_DTYPES[dtype_name]
    self.spec = spec_of(lora_config)
    self.config = engine.config
    self.model = Llama(engine.config, dtype=self.compute, param_dtype=self.compute,
                       decode_impl="dot")
    self.window = int(lora_config.answer_tokens)
    self.tx = optimizer(lora_config, total_steps)
    self.step = jax.jit(self._step)
    self.eval_batch = jax.jit(self._eval)

  def answer_logits(self, adapters, base, tokens, pad_len):
    """Logits [B, window, V] at the positions that predict the last `window` tokens."""
    params = lora.apply(base, adapters, self.spec,
                        dtype=jnp.float32 if self.compute == jnp.float32 else None)
    b, t = tokens.shape
    cache = init_cache(self.config, b, t, self.compute)
    _, hidden, _ = self.model.apply({"params": params}, tokens, cache, jnp.zeros((), jnp.int32),
                                    pad_len, logits_at="last", hidden_layers=(-1,),
                                    hidden_at="all")
    h = hidden[-1][:, t - 1 - self.window:t - 1]
    if self.config.tie_word_embeddings:
      return jnp.einsum("bkd,vd->bkv", h, params["embed"].astype(self.compute),
                        preferred_element_type=jnp.float32)
    return jnp.einsum("bkd,dv->bkv", h, params["lm_head"].astype(self.compute),
                      preferred_element_type=jnp.float32)

  def token_losses(self, adapters, base, tokens, pad_len, labels):
    logits = self.answer_logits(adapters, base, tokens, pad_len)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits

  def loss(self, adapters, base, tokens, pad_len, labels, mask):
    losses, _ = self.token_losses(adapters, base, tokens, pad_len, labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  def _step(self, state, base, tokens, pad_len, labels, mask):
    loss, grads = jax.value_and_grad(self.loss)(state["adapters"], base, tokens, pad_len, labels,
                                                mask)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["adapters"])
    return dict(state, adapters=optax.apply_updates(state["adapters"], updates),
                opt_state=opt_state), loss

  def _eval(self, adapters, base, tokens, pad_len, labels, mask):
    """(loss summed over answer tokens, answer tokens, rows whose whole answer is argmax)."""
    losses, logits = self.token_losses(adapters, base, tokens, pad_len, labels)
    right = (jnp.argmax(logits, -1) == labels) | (mask == 0)
    return jnp.sum(losses * mask), jnp.sum(mask), jnp.sum(jnp.all(right, axis=1))

  def init_state(self, base, seed: int) -> dict:
    adapters = lora.init_adapters(base, self.spec, seed)
    return {"adapters": adapters, "opt_state": self.tx.init(adapters),
            "epoch": np.zeros((), np.int32), "best_valid": np.full((), np.inf, np.float32)}

  def evaluate(self, adapters, base, examples: Examples, batch: int, bucket: int) -> dict:
    total = tokens = exact = 0.0
    for start in range(0, examples.n, batch):
      rows = range(start, min(start + batch, examples.n))
      out = self.eval_batch(adapters, base, *examples.batch(rows, bucket, self.window))
      total, tokens, exact = (a + float(b) for a, b in zip((total, tokens, exact), out))
    return {"loss": total / max(tokens, 1.0), "answer_exact": exact / max(examples.n, 1)}


def store_data(config, engine, store_path: str | None = None) -> dict:
  """{"train": (prompt ids, lengths [P, N]), "valid": ...} of a store's splits, each prompt's
  text found in config.data and encoded (chat format) by the engine."""
  from lsdist_jax.store import LengthStore

  store = LengthStore.open(store_path or paths.store(config))
  out = {}
  for split in ("train", "valid"):
    data = store.read(split)
    out[split] = (engine.encode(store_prompts(config, data)), np.asarray(data["lengths"]))
  if not len(out["train"][1]) or not len(out["valid"][1]):
    raise ConfigError(f"the store has {len(out['train'][1])} train and {len(out['valid'][1])} "
                      "valid prompts; LoRA training needs both")
  return out


def train_lora(config, workdir: str, engine, data: dict | None = None,
               stop_after_epochs: int | None = None) -> dict:
  """Trains adapters on data["train"] (default: the store's train split), keeps the best epoch
  by validation loss, resumes from <workdir>/checkpoints, exports to <workdir>/export.

  `stop_after_epochs` ends this call early (tests simulate an interrupted run)."""
  import orbax.checkpoint as ocp

  lc = config.lora
  started = time.perf_counter()
  data = data or store_data(config, engine)
  context = engine.config.max_position_embeddings
  train = build_examples(engine.tokenizer, *data["train"], lc, context)
  valid = build_examples(engine.tokenizer, *data["valid"], lc, context)
  batch = max(1, min(int(lc.batch_size), train.n))
  steps_per_epoch = max(1, train.n // batch)
  epochs = int(lc.epochs)
  trainer = LoraTrainer(engine, lc, steps_per_epoch * epochs)
  bucket = int(config.engine.prompt_bucket)
  base = engine.params
  seed = int(config.seed)
  os.makedirs(workdir, exist_ok=True)
  root, latest, best = checkpoints.managers(workdir)
  settings = training_meta(config, train.n, valid.n, batch)
  run_meta = {"spec": {"lora": trainer.spec.to_dict(), "base": engine.fingerprint(),
                       "settings": settings}, "seed": seed}
  state = trainer.init_state(base, seed)
  resumed = checkpoints.resume(root, latest, best, state, run_meta)
  if resumed is not None:
    state = resumed
    logging.info("resuming LoRA training after epoch %d", int(state["epoch"]))
  log_path = os.path.join(workdir, "train_log.jsonl")
  keep_log(log_path, int(state["epoch"]))
  epochs_run = 0
  every = max(1, int(lc.checkpoint_every))
  pending_best = None
  for epoch in range(int(state["epoch"]), epochs):
    t0 = time.perf_counter()
    order = np.random.default_rng([seed, epoch]).permutation(train.n)
    losses = []
    for step in range(steps_per_epoch):
      rows = order[step * batch:(step + 1) * batch]
      state, loss = trainer.step(state, base, *train.batch(rows, bucket, trainer.window))
      losses.append(loss)
    train_loss = float(np.mean(jax.device_get(losses)))
    scores = trainer.evaluate(state["adapters"], base, valid, batch, bucket)
    improved = scores["loss"] < float(state["best_valid"])
    state = dict(state, epoch=np.full((), epoch + 1, np.int32),
                 best_valid=np.full((), min(scores["loss"], float(state["best_valid"])),
                                    np.float32))
    if improved:
      pending_best = (epoch + 1, jax.device_get(state["adapters"]))
    if (epoch + 1) % every == 0 or epoch + 1 == epochs:
      if pending_best is not None:  # best before latest, as predictor/train.py does
        best.save(pending_best[0], args=ocp.args.StandardSave({"params": pending_best[1]}))
        best.wait_until_finished()
        pending_best = None
      latest.save(epoch + 1, args=ocp.args.StandardSave(jax.device_get(state)))
      latest.wait_until_finished()
    record = {"epoch": epoch + 1, "train_loss": train_loss, "valid_loss": scores["loss"],
              "valid_answer_exact": scores["answer_exact"], "best": bool(improved),
              "seconds": round(time.perf_counter() - t0, 3)}
    with open(log_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    logging.info("LoRA epoch %d: train %.4f valid %.4f, exact answers %.3f%s (%.1fs)",
                 epoch + 1, train_loss, scores["loss"], scores["answer_exact"],
                 " *" if improved else "", record["seconds"])
    epochs_run += 1
    if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
      latest.close()
      best.close()
      return {"stopped_at_epoch": epoch + 1}
  best_epoch, adapters = checkpoints.restore_best(root, best, jax.device_get(state["adapters"]))
  latest.close()
  best.close()
  seconds = time.perf_counter() - started
  settings.update(best_epoch=int(best_epoch), best_valid_loss=float(state["best_valid"]),
                  train_seconds=round(seconds, 2), steps=steps_per_epoch * epochs)
  export_dir = os.path.join(workdir, "export")
  export_lora(export_dir, engine, jax.device_get(adapters), trainer.spec, config,
              marginal_bin(train.targets), settings)
  return {"export": export_dir, "best_epoch": int(best_epoch),
          "best_valid_loss": float(state["best_valid"]), "train_seconds": seconds,
          "adapters": adapters}
