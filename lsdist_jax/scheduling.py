"""Glue between predictors, planners and the runner: predictions for requests, planner inputs,
recovery callbacks, cost models, length replay. Used by the benchmark and the generate job.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from lsdist_jax.schedule import CostModel, Options, Requests, make_plan, plan_recovery

PREDICTOR_KINDS = ("distribution", "scalar-max", "scalar-mean")


def load_cost_model(config, engine=None) -> CostModel:
  """config.schedule.cost_model (JSON from launch/profile) or a default for this platform.
  With `engine`, a model profiled on another device or model shape is named in a warning."""
  path = config.schedule.cost_model
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"schedule.cost_model={path!r} does not exist; run "
                              "launch/benchmark.py --profile to make one")
    cost = CostModel.load(path)
  else:
    cost = CostModel.default_gpu() if jax.default_backend() == "gpu" else CostModel.default_cpu()
  if engine is not None:
    warn_cost_model(cost, engine, path or cost.source)
  return cost


def device_kind() -> str:
  device = jax.devices()[0]
  return getattr(device, "device_kind", str(device))


def model_shape(engine) -> str:
  """What a decode step's time depends on: the model's shape and dtype (not its weights)."""
  c = engine.config
  return (f"{c.num_layers} layers, hidden {c.hidden_size}, ffn {c.intermediate_size}, "
          f"heads {c.num_heads}/{c.num_kv_heads}x{c.head_dim}, vocab {c.vocab_size}, "
          f"{engine.dtype}")


_WARNED: set[str] = set()


def warn_cost_model(cost: CostModel, engine, name: str) -> list[str]:
  """Logs (once per process and message) why `cost` may not fit this engine and device; plans
  would then rank shapes by another device's or model's step times. Returns the reasons."""
  reasons = cost.mismatches(device_kind(), model_shape(engine))
  for reason in reasons:
    message = (f"cost model {name}: {reason}; plans are ranked by its step times - profile "
               "this device and model (launch/benchmark.py --profile) for real work")
    if message not in _WARNED:
      _WARNED.add(message)
      logging.warning("%s", message)
  return reasons


def load_predictors(dirs: dict, hidden_dim: int, max_len: int) -> dict:
  from lsdist_jax.predictor import load_predictor

  out = {}
  for kind, path in dirs.items():
    if path and os.path.isfile(os.path.join(path, "predictor.json")):
      out[kind] = load_predictor(path, hidden_dim=hidden_dim, max_len=max_len)
  return out


def load_predictor_or_none(path: str | None):
  from lsdist_jax.predictor import load_predictor

  return load_predictor(path) if path else None


def benchmark_prompts(prompts, config):
  """The benchmark's prompts: all of its slice, or only those of the store's test split."""
  split = config.benchmark.split
  if not split:
    return prompts
  from lsdist_jax.data import assign_split

  names = assign_split([p.index for p in prompts], int(config.data.split_seed),
                       tuple(config.data.split_fractions))
  kept = [p for p, s in zip(prompts, names) if s == split]
  if not kept:
    raise ValueError(f"no prompt of benchmark.slice={config.benchmark.slice!r} is in the "
                     f"{split!r} split")
  return kept


def drop_long_prompts(engine, prompts, max_seq_len: int):
  ids = engine.encode([p.text for p in prompts])
  kept = [p for p, x in zip(prompts, ids) if len(x) < max_seq_len]
  if len(kept) < len(prompts):
    logging.warning("benchmark: %d prompts leave no room in max_seq_len=%d; left out",
                    len(prompts) - len(kept), max_seq_len)
  return kept


def _store(config):
  from lsdist_jax.store import LengthStore

  return LengthStore.open(config.collect.store or os.path.join(config.workdir, "store"))


def replay_requests(config, prompts, n_requests: int, vocab_size: int):
  """Length replay: requests over the prompts' recorded prompt lengths (token ids are filler of
  those lengths) with EOS forced at a length sampled for that prompt in the store."""
  from lsdist_jax.benchmark import Requests as BenchRequests

  data = _store(config).read()
  row = {int(i): k for k, i in enumerate(data["index"])}
  prompts = [p for p in prompts if int(p.index) in row]
  if not prompts:
    raise ValueError("length replay needs the benchmark prompts in the store; none are")
  prompt_ids, request_ids, index, forced = [], [], [], []
  n_samples = data["lengths"].shape[1]
  for r in range(n_requests):
    p = prompts[r % len(prompts)]
    k, copy = row[int(p.index)], r // len(prompts)
    length = int(data["prompt_len"][k])
    prompt_ids.append([1] + [3 + (7 * int(p.index) + j) % (vocab_size - 3)
                             for j in range(length - 1)])
    request_ids.append(int(p.index) * 1000 + copy + 7_000_000)
    index.append(int(p.index))
    forced.append(int(data["lengths"][k, copy % n_samples]))
  requests = BenchRequests(prompt_ids, np.asarray(request_ids, np.int64),
                           np.asarray(index, np.int64))
  requests.replay_hidden = data["hidden"][[row[i] for i in index]]
  return requests, np.asarray(forced)


def predict(engine, requests, predictor, config):
  """(pmf [n, L+1] or None, scalar [n] or None) for the requests: the prompts' hidden states
  (prefilled once per distinct prompt) through the predictor. In length replay the predictor
  reads the hidden states recorded in the store (its model's), while the prefill still runs
  on this engine so its time is counted."""
  from lsdist_jax.benchmark import embed_requests

  embed_requests(engine, requests, int(config.collect.hidden_layer))
  hidden = getattr(requests, "replay_hidden", None)
  return predict_hidden(predictor, requests.hidden if hidden is None else hidden)


def predict_hidden(predictor, hidden):
  """(pmf [n, L+1], None) from a distribution predictor, (None, scalar [n]) from a scalar one."""
  if predictor.kind == "distribution":
    return predictor.predict_pmf(hidden), None
  return None, predictor.predict_scalar(hidden)


def planner_requests(prompt_len, max_seq_len, pmf=None, scalar=None, true_length=None):
  if pmf is not None and pmf.shape[1] > max_seq_len + 1:
    pmf = pmf[:, :max_seq_len + 1]
  return Requests(np.asarray(prompt_len), int(max_seq_len), pmf, scalar, true_length)


def recovery_fn(planner: str, requests: Requests, cost: CostModel, options: Options):
  def recover(unfinished, generated):
    return plan_recovery(planner, requests, unfinished, generated, cost, options)
  return recover


def is_continuous(planner: str) -> bool:
  from lsdist_jax.schedule.continuous import CONTINUOUS_PLANNERS
  return planner in CONTINUOUS_PLANNERS


def plan_any(planner: str, requests: Requests, cost: CostModel, options: Options):
  """A static plan (schedule.PLANNERS) or a continuous one (schedule.continuous), by name."""
  if is_continuous(planner):
    from lsdist_jax.schedule.continuous import make_continuous_plan
    return make_continuous_plan(planner, requests, cost, options)
  return make_plan(planner, requests, cost, options)


def run_plan(runner, planner: str, plan, requests: Requests, cost: CostModel, options: Options):
  """Executes `plan` with `runner`: static batches with FCR recovery planned by `planner`, or
  continuous phases with the final-phase rule for rows left at the end."""
  if is_continuous(planner):
    from lsdist_jax.schedule.continuous import final_phase
    return runner.run_continuous(plan, lambda contexts, rooms: final_phase(contexts, rooms, cost,
                                                                            options))
  return runner.run(plan, recovery_fn(planner, requests, cost, options))


def schedule_and_run(engine, prompt_ids, request_ids, config, predictor, strategy: str):
  """Plans one chunk of a user's prompts with the predictor and runs it (the generate job)."""
  from lsdist_jax.benchmark import Requests as BenchRequests, make_runner
  from lsdist_jax.schedule import with_engine_shapes

  options = Options.from_config(config.schedule)
  cost = with_engine_shapes(load_cost_model(config, engine), config.engine)
  prompt_len = np.array([len(p) for p in prompt_ids])
  requests = BenchRequests([list(p) for p in prompt_ids], np.asarray(request_ids, np.int64),
                           np.arange(len(prompt_ids)))
  pmf = scalar = None
  planner = strategy
  if predictor is None:  # no predictor: dataset order (slots refilled, or fixed batches)
    planner = "continuous-vanilla" if is_continuous(strategy) else "vanilla"
    options = dataclasses.replace(options, fixed_batch=max(1, options.fixed_batch))
  else:
    pmf, scalar = predict(engine, requests, predictor, config)
  sched = planner_requests(prompt_len, config.generation.max_seq_len, pmf, scalar)
  plan = plan_any(planner, sched, cost, options)
  runner = make_runner(engine, requests, config)
  return run_plan(runner, planner, plan, sched, cost, options)


__all__ = ["PREDICTOR_KINDS", "device_kind", "is_continuous", "load_cost_model", "load_predictors",
           "make_plan", "model_shape", "plan_any", "planner_requests", "predict", "predict_hidden",
           "recovery_fn", "replay_requests", "run_plan", "schedule_and_run", "warn_cost_model"]
