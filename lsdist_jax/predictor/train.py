"""Training of the length predictors: optax, jitted steps, data-parallel over the mesh's `data` axis,
orbax checkpoints (best by validation loss + latest, resumable), and the standalone export that
`load_predictor` restores without this module's training code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lsdist_jax import exports, paths
from lsdist_jax.errors import MissingFileError
from lsdist_jax.files import write_lines
from lsdist_jax.predictor import checkpoints
from lsdist_jax.predictor.calibration import apply_recalibration, fit_recalibration, pit_values
from lsdist_jax.predictor.losses import kde_target, per_example_loss, scalar_target
from lsdist_jax.predictor.nets import LengthPredictor

EXPORT_META = "predictor.json"


@dataclasses.dataclass
class Split:
  hidden: np.ndarray  # [P, D] float32
  lengths: np.ndarray  # [P, N] int


def load_splits(store_path: str) -> dict[str, Split]:
  from lsdist_jax.store import LengthStore

  store = LengthStore.open(store_path)
  out = {}
  for name in ("train", "valid", "test"):
    d = store.read(name)
    out[name] = Split(d["hidden"].astype(np.float32), d["lengths"])
  if out["train"].hidden.shape[0] == 0 or out["valid"].hidden.shape[0] == 0:
    raise ValueError(f"store {store_path} has {out['train'].hidden.shape[0]} train and "
                     f"{out['valid'].hidden.shape[0]} valid prompts; collect more prompts")
  return out


def with_recipe(config, hidden_dim: int):
  """The config whose predictor section follows `predictor.recipe`: "current" as it is, "seed"
  replaced by the reference code's recipe (config.PREDICTOR_RECIPES), widths scaled to
  `hidden_dim`."""
  from lsdist_jax.config import PREDICTOR_RECIPES
  from lsdist_jax.errors import ConfigError

  recipe = str(config.predictor.get("recipe", "current"))
  if recipe == "current":
    return config
  if recipe not in PREDICTOR_RECIPES:
    raise ConfigError(f"predictor.recipe {recipe!r}: expected 'current' or one of "
                      f"{sorted(PREDICTOR_RECIPES)}")
  settings = dict(PREDICTOR_RECIPES[recipe])
  config = config.copy_and_resolve_references()
  config.predictor.hidden_sizes = tuple(max(1, int(round(f * hidden_dim)))
                                        for f in settings.pop("width_factors"))
  for key, value in settings.items():
    config.predictor[key] = value
  return config


def predictor_spec(config, hidden_dim: int) -> dict:
  pc = config.predictor
  return {"kind": pc.kind, "hidden_dim": int(hidden_dim), "max_len": int(pc.max_len),
          "hidden_sizes": [int(s) for s in pc.hidden_sizes], "dropout": float(pc.dropout),
          "scalar_target": str(pc.scalar_target) if pc.kind == "scalar" else None}


def _targets(spec: dict, lengths: np.ndarray, sigma: float) -> np.ndarray:
  if spec["kind"] == "distribution":
    return kde_target(lengths, spec["max_len"], sigma)
  return np.minimum(scalar_target(lengths, spec["scalar_target"]), spec["max_len"])


def _optimizer(pc, steps_total: int):
  lr = float(pc.learning_rate)
  if pc.schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, max(steps_total, 1))
  elif pc.schedule != "constant":
    raise ValueError(f"predictor.schedule {pc.schedule!r}: expected 'constant' or 'cosine'")
  if pc.optimizer == "adam":
    return optax.adam(lr)
  if pc.optimizer == "adamw":
    return optax.adamw(lr, weight_decay=float(pc.weight_decay))
  raise ValueError(f"predictor.optimizer {pc.optimizer!r}: expected 'adam' or 'adamw'")


class _Trainer:
  """Jitted steps for one model/optimizer, with batches sharded over the mesh's data axis."""

  def __init__(self, spec, pc, mesh, steps_total):
    self.spec = spec
    self.model = LengthPredictor(spec["kind"], spec["max_len"], tuple(spec["hidden_sizes"]),
                                 spec["dropout"])
    self.tx = _optimizer(pc, steps_total)
    self.noise = float(pc.input_noise_std)
    self.loss_name = pc.loss
    self.mesh = mesh
    self.batch_sharding = NamedSharding(mesh, P("data"))
    self.replicated = NamedSharding(mesh, P())
    self.train_step = jax.jit(self._train_step)
    self.eval_loss = jax.jit(self._loss_sum)

  def _per_example(self, out, y):
    return per_example_loss(self.spec["kind"], self.loss_name, out, y, self.spec["max_len"])

  def loss(self, params, x, y, train, key):
    out = self.model.apply({"params": params}, x, train=train, rngs={"dropout": key})
    return jnp.mean(self._per_example(out, y))

  def _loss_sum(self, params, x, y, weight):
    """Sum of per-example losses (weight 0 for padding rows)."""
    out = self.model.apply({"params": params}, x, train=False)
    return jnp.sum(self._per_example(out, y) * weight)

  def _train_step(self, state, x, y, key):
    noise_key, dropout_key = jax.random.split(key)
    x = x + self.noise * jax.random.normal(noise_key, x.shape, x.dtype)
    loss, grads = jax.value_and_grad(self.loss)(state["params"], x, y, True, dropout_key)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(state, params=params, opt_state=opt_state), loss

  def init_state(self, seed, hidden_dim):
    params = self.model.init(jax.random.key(seed), jnp.zeros((2, hidden_dim)))["params"]
    return {"params": params, "opt_state": self.tx.init(params),
            "epoch": np.zeros((), np.int32), "best_valid": np.full((), np.inf, np.float32)}

  def evaluate(self, params, x, y, batch):
    total, n = 0.0, x.shape[0]
    data = self.mesh.shape["data"]
    for start in range(0, n, batch):
      xb, yb = x[start:start + batch], y[start:start + batch]
      size = -(-xb.shape[0] // data) * data
      weight = np.zeros(size, np.float32)
      weight[:xb.shape[0]] = 1.0
      pad = [(0, size - xb.shape[0])] + [(0, 0)] * (xb.ndim - 1)
      padded_y = np.pad(yb, [(0, size - yb.shape[0])] + [(0, 0)] * (yb.ndim - 1))
      args = [jax.device_put(a, self.batch_sharding) for a in (np.pad(xb, pad), padded_y, weight)]
      total += float(self.eval_loss(params, *args))
    return total / max(n, 1)


def train_and_evaluate(config, workdir: str, data: dict[str, Split] | None = None,
                       stop_after_epochs: int | None = None) -> dict:
  """Trains config.predictor.kind on the store's train split (or `data`), keeps the best epoch by
  validation loss, resumes from <workdir>/checkpoints, exports the best to <workdir>/export.

  `stop_after_epochs` ends this call early (tests simulate an interrupted run)."""
  import orbax.checkpoint as ocp
  from lsdist_jax import sharding as shd

  if data is None:
    data = load_splits(paths.store(config))
  train, valid = data["train"], data["valid"]
  config = with_recipe(config, train.hidden.shape[1])
  pc = config.predictor
  folds = int(pc.recalibration_folds) if pc.kind == "distribution" and pc.recalibrate else 0
  if folds and train.hidden.shape[0] < 2 * folds:
    raise ValueError(f"predictor.recalibration_folds={folds} needs at least {2 * folds} "
                     f"training prompts, got {train.hidden.shape[0]}")
  hidden_dim = train.hidden.shape[1]
  spec = predictor_spec(config, hidden_dim)
  mean = train.hidden.mean(axis=0)
  std = train.hidden.std(axis=0) + 1e-6
  norm = lambda h: ((h - mean) / std).astype(np.float32)
  x_train, x_valid = norm(train.hidden), norm(valid.hidden)
  y_train = _targets(spec, train.lengths, float(pc.kde_sigma))
  y_valid = _targets(spec, valid.lengths, float(pc.kde_sigma))

  mesh = shd.make_mesh(config.mesh)
  data_size = mesh.shape["data"]
  batch = max(data_size, min(int(pc.batch_size), x_train.shape[0]) // data_size * data_size)
  steps_per_epoch = max(1, x_train.shape[0] // batch)
  trainer = _Trainer(spec, pc, mesh, steps_per_epoch * int(pc.epochs))
  os.makedirs(workdir, exist_ok=True)
  root, latest, best = checkpoints.managers(workdir)
  run_meta = {"spec": spec, "seed": int(config.seed), "batch": batch,
              "train_prompts": int(x_train.shape[0])}
  state = trainer.init_state(int(config.seed), hidden_dim)
  resumed = checkpoints.resume(root, latest, best, state, run_meta)
  if resumed is not None:
    state = resumed
    logging.info("resuming predictor training after epoch %d", int(state["epoch"]))
  state = jax.device_put(state, trainer.replicated)

  log_path = os.path.join(workdir, "train_log.jsonl")
  keep_log(log_path, int(state["epoch"]))  # epochs after the checkpoint are run again
  key = jax.random.key(int(config.seed) + 1)
  epochs_run = 0
  every = max(1, int(pc.checkpoint_every))
  pending_best = None  # (epoch, params) of a best not yet on disk
  bar = _epoch_bar(int(pc.epochs), int(state["epoch"]), os.path.basename(workdir.rstrip("/")))
  for epoch in range(int(state["epoch"]), int(pc.epochs)):
    t0 = time.perf_counter()
    perm = np.random.default_rng([int(config.seed), epoch]).permutation(x_train.shape[0])
    losses = []
    for step in range(steps_per_epoch):
      idx = perm[step * batch:(step + 1) * batch]
      xb = jax.device_put(x_train[idx], trainer.batch_sharding)
      yb = jax.device_put(y_train[idx], trainer.batch_sharding)
      state, loss = trainer.train_step(state, xb, yb,
                                       jax.random.fold_in(key, epoch * steps_per_epoch + step))
      losses.append(loss)
    train_loss = float(np.mean(jax.device_get(losses)))
    valid_loss = trainer.evaluate(state["params"], x_valid, y_valid, batch)
    improved = valid_loss < float(state["best_valid"])
    state = dict(state, epoch=np.full((), epoch + 1, np.int32),
                 best_valid=np.full((), min(valid_loss, float(state["best_valid"])), np.float32))
    if improved:
      pending_best = (epoch + 1, jax.device_get(state["params"]))
    if (epoch + 1) % every == 0 or epoch + 1 == int(pc.epochs):
      # Best before latest: a run resumed from this latest finds the best it has seen on disk.
      # Epochs are deterministic, so a run resumed after a crash between checkpoints repeats
      # the lost epochs exactly and reaches the same best.
      if pending_best is not None:
        best.save(pending_best[0], args=ocp.args.StandardSave({"params": pending_best[1]}))
        best.wait_until_finished()
        pending_best = None
      latest.save(epoch + 1, args=ocp.args.StandardSave(state))
      latest.wait_until_finished()
    record = {"epoch": epoch + 1, "train_loss": train_loss, "valid_loss": valid_loss,
              "best": improved, "seconds": round(time.perf_counter() - t0, 3)}
    with open(log_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    bar.set_postfix_str(f"train {train_loss:.4f} valid {valid_loss:.4f} "
                        f"best {float(state['best_valid']):.4f}", refresh=False)
    bar.update(1)
    epochs_run += 1
    if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
      bar.close()
      return {"stopped_at_epoch": epoch + 1}
  bar.close()
  best_step, best_params = checkpoints.restore_best(root, best, jax.device_get(state["params"]))
  best_params = jax.device_get(best_params)
  extra = {"best_epoch": int(best_step), "best_valid_loss": float(state["best_valid"]),
           "loss": pc.loss, "kde_sigma": float(pc.kde_sigma), "recipe": str(pc.recipe),
           "training": {"optimizer": pc.optimizer, "learning_rate": float(pc.learning_rate),
                        "batch": batch, "epochs": int(pc.epochs),
                        "input_noise_std": float(pc.input_noise_std)}}
  if spec["kind"] == "distribution" and pc.recalibrate:
    # Fitted on prompts the weights never trained on: the validation prompts, and with
    # recalibration_folds > 0 also every training prompt, scored by a model trained without it.
    raw = Predictor(_export_meta(spec, mean, std), best_params).predict_pmf(valid.hidden)
    pit = [pit_values(raw, np.minimum(valid.lengths, spec["max_len"]), int(config.seed))]
    pit += _out_of_fold_pit(config, workdir, train, valid, folds)
    extra["recalibration"] = fit_recalibration(np.concatenate(pit),
                                               int(pc.recalibration_knots))
    extra["recalibration_samples"] = int(sum(p.size for p in pit))
  export_dir = os.path.join(workdir, "export")
  export_predictor(export_dir, spec, best_params, mean, std, extra)
  latest.close()
  best.close()
  return {"best_epoch": int(best_step), "best_valid_loss": float(state["best_valid"]),
          "epochs": int(pc.epochs), "export": export_dir, "params": jax.device_get(state["params"])}


def _epoch_bar(epochs: int, done: int, name: str):
  """One progress bar over the epochs, showing the current losses (the per-epoch records go to
  train_log.jsonl)."""
  from tqdm import tqdm

  return tqdm(total=epochs, initial=done, desc=f"train {name}", unit="epoch", mininterval=1.0,
              dynamic_ncols=True, leave=True)


def keep_log(path: str, epochs_done: int) -> None:
  """Keeps the log's records of the epochs a resumed run does not repeat."""
  if not os.path.isfile(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["epoch"] <= epochs_done:
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        continue  # a line cut short by a crash: its epoch is run again
  write_lines(path, [line.rstrip("\n") for line in kept])


def _out_of_fold_pit(config, workdir: str, train: Split, valid: Split, folds: int) -> list:
  """PIT values of every training prompt's samples under a network trained (with the same
  settings, early-stopped on the same validation prompts) on the other folds of the training
  set. Each fold's run lives in <workdir>/recalibration/fold<k> and resumes like any other."""
  if folds <= 0:
    return []
  n = train.hidden.shape[0]
  fold_config = config.copy_and_resolve_references()
  fold_config.predictor.recalibrate = False
  fold = np.random.default_rng([int(config.seed), 7]).permutation(n) % folds
  max_len = int(config.predictor.max_len)
  out = []
  for k in range(folds):
    held, rest = np.nonzero(fold == k)[0], np.nonzero(fold != k)[0]
    result = train_and_evaluate(fold_config, os.path.join(workdir, "recalibration", f"fold{k}"), {
        "train": Split(train.hidden[rest], train.lengths[rest]), "valid": valid})
    raw = load_predictor(result["export"]).predict_pmf(train.hidden[held])
    out.append(pit_values(raw, np.minimum(train.lengths[held], max_len), int(config.seed) + k + 1))
  return out


EXPORT_FORMAT = "lsdist_jax.predictor"


def _export_meta(spec: dict, mean, std, extra=None) -> dict:
  return dict(spec, format=EXPORT_FORMAT, version=1,
              input_mean=np.asarray(mean, np.float32).tolist(),
              input_std=np.asarray(std, np.float32).tolist(), **(extra or {}))


def export_predictor(directory: str, spec: dict, params, mean, std, extra=None) -> None:
  """params (orbax) + predictor.json (spec, input normalisation), the JSON written last."""
  exports.save(directory, params, _export_meta(spec, mean, std, extra), EXPORT_META)


class Predictor:
  """A restored predictor: `predict_pmf(hidden) -> [n, L+1]` or `predict_scalar(hidden) -> [n]`."""

  def __init__(self, meta: dict, params):
    self.meta = meta
    self.kind = meta["kind"]
    self.max_len = int(meta["max_len"])
    self.hidden_dim = int(meta["hidden_dim"])
    self.mean = np.asarray(meta["input_mean"], np.float32)
    self.std = np.asarray(meta["input_std"], np.float32)
    self.model = LengthPredictor(self.kind, self.max_len, tuple(meta["hidden_sizes"]), 0.0)
    self.params = params
    self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x, train=False))

  def _run(self, hidden, batch=1024):
    hidden = np.asarray(hidden, np.float32)
    if hidden.ndim != 2 or hidden.shape[1] != self.hidden_dim:
      raise ValueError(f"predictor expects hidden states [n, {self.hidden_dim}], got "
                       f"{hidden.shape}: were they made by another model or layer?")
    x = (hidden - self.mean) / self.std
    outs = []
    for start in range(0, x.shape[0], batch):
      chunk = x[start:start + batch]
      padded = np.pad(chunk, [(0, batch - chunk.shape[0]), (0, 0)])  # one program, `warm`'s
      outs.append(np.asarray(self._apply(self.params, padded))[:chunk.shape[0]])
    return np.concatenate(outs) if outs else np.zeros((0,))

  def warm(self) -> None:
    """Compiles the network's one program (`_run`'s rows) now, e.g. in a thread while a job
    sets up, so that its prediction does not wait for it."""
    self._run(np.zeros((1, self.hidden_dim), np.float32))

  def predict_pmf(self, hidden, recalibrated: bool = True) -> np.ndarray:
    """[n, D] -> [n, L+1]; with the export's quantile recalibration applied unless
    `recalibrated=False` (the network's softmax as trained)."""
    if self.kind != "distribution":
      raise ValueError(f"this is a {self.kind} predictor; use predict_scalar")
    logits = self._run(hidden).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    pmf = np.exp(logits)
    pmf /= pmf.sum(axis=1, keepdims=True)
    return apply_recalibration(pmf, self.meta.get("recalibration")) if recalibrated else pmf

  def predict_scalar(self, hidden) -> np.ndarray:
    if self.kind != "scalar":
      raise ValueError(f"this is a {self.kind} predictor; use predict_pmf")
    return self._run(hidden).astype(np.float64)


def load_predictor(directory: str, hidden_dim: int | None = None,
                   max_len: int | None = None) -> Predictor:
  """Restores an export; refuses one made for another hidden size or length range."""
  directory = os.path.abspath(directory)
  if not exports.is_export(directory, EXPORT_META):
    raise MissingFileError(f"no predictor export at {directory} (missing {EXPORT_META}); "
                            "train one with launch/train.py")
  meta = exports.read_meta(directory, EXPORT_META, EXPORT_FORMAT, "predictor export")
  if hidden_dim is not None and int(meta["hidden_dim"]) != int(hidden_dim):
    raise ValueError(f"predictor at {directory} takes hidden states of size {meta['hidden_dim']},"
                     f" but this model's are {hidden_dim}: it was trained for another model")
  if max_len is not None and int(meta["max_len"]) != int(max_len):
    raise ValueError(f"predictor at {directory} predicts lengths 0..{meta['max_len']}, but "
                     f"0..{max_len} is needed (predictor.max_len)")
  abstract = jax.eval_shape(lambda: LengthPredictor(
      meta["kind"], int(meta["max_len"]), tuple(meta["hidden_sizes"]), 0.0).init(
          jax.random.key(0), jnp.zeros((2, int(meta["hidden_dim"]))))["params"])
  return Predictor(meta, exports.restore_params(directory, abstract, what="predictor export"))
