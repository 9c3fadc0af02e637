"""Predict -> plan -> run: predictions for requests, planner inputs, static or continuous plans by
planner name, their execution with recovery, and the cost model a stage plans with.

Imports no JAX itself (the engine-free simulator uses it); predictors and engines are passed in.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

from lsdist_jax import paths
from lsdist_jax.schedule import CostModel, Options, Requests as PlannerRequests, make_plan
from lsdist_jax.schedule import plan_recovery, with_engine_shapes
from lsdist_jax.schedule.continuous import final_phase, slot_cache_len, slots_for
from lsdist_jax.schedule.continuous_search import make_continuous_plan
from lsdist_jax.serve.requests import Requests, embed_requests
from lsdist_jax.schedule.paged_search import PAGED_PLANNERS
from lsdist_jax.serve.strategies import is_continuous, is_paged


def load_cost_model(config, workdir: str | None = None, engine=None) -> CostModel:
  """The cost model a stage plans with (`paths.cost_model`: config.schedule.cost_model, else a
  profiled <workdir>/cost_model.json, else a default for this platform), with the engine's
  shape buckets. With `engine`, a model profiled on another device or model shape is named in
  a warning."""
  path = paths.cost_model(config, workdir)
  if path:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"schedule.cost_model={path!r} does not exist; run "
                              "launch/benchmark.py --profile to make one")
    cost = CostModel.load(path)
  else:
    import jax

    cost = CostModel.default_gpu() if jax.default_backend() == "gpu" else CostModel.default_cpu()
  if engine is not None:
    warn_cost_model(cost, engine, path or cost.source)
  return with_engine_shapes(cost, config.engine)


def planner_options(config, engine=None) -> Options:
  """The planners' options of config.schedule, the KV budget resolved: "auto" sizes it from the
  engine's device (logged once), which needs an engine; a number is taken as is."""
  schedule = config.schedule
  setting = schedule.kv_budget_tokens
  if isinstance(setting, str):
    if engine is None:
      from lsdist_jax.errors import ConfigError

      raise ConfigError(f"schedule.kv_budget_tokens={setting!r} is sized from a device; with no "
                        "engine (the simulator) set it to a number of tokens")
    from lsdist_jax.engine import kv_budget_tokens

    tokens, how = kv_budget_tokens(engine, setting, float(schedule.kv_memory_fraction))
    message = f"KV budget {tokens:,} tokens ({how})"
    if message not in _WARNED:
      _WARNED.add(message)
      logging.info("%s", message)
    schedule = dict(schedule.items(), kv_budget_tokens=tokens)
  return Options.from_config(schedule)


_WARNED: set[str] = set()


def warn_cost_model(cost: CostModel, engine, name: str) -> list[str]:
  """Logs (once per process and message) why `cost` may not fit this engine and device; plans
  would then rank shapes by another device's or model's step times. Returns the reasons."""
  from lsdist_jax.engine import device_kind, model_shape

  reasons = cost.mismatches(device_kind(), model_shape(engine))
  for reason in reasons:
    message = (f"cost model {name}: {reason}; plans are ranked by its step times - profile "
               "this device and model (launch/benchmark.py --profile) for real work")
    if message not in _WARNED:
      _WARNED.add(message)
      logging.warning("%s", message)
  return reasons


def load_predictors(dirs: dict, hidden_dim: int, max_len: int, engine=None,
                    own_base: bool = False, config=None) -> dict:
  """{name: predictor} of the exports in `dirs` that exist; each checked against the hidden size
  and length range it will be used with. A LoRA export is loaded on `engine` (its base model)
  where that is its base; with `own_base` (length replay, the simulator) on the base model it
  names, loaded for it (with config.engine's buckets); without either it is left out."""
  from lsdist_jax.predictor import load_predictor

  out = {kind: load_predictor(path, hidden_dim=hidden_dim, max_len=max_len)
         for kind, path in dirs.items()
         if path and os.path.isfile(os.path.join(path, "predictor.json"))}
  for kind, path in dirs.items():
    from lsdist_jax.lora.predict import is_lora_export, load_lora_on

    if path and is_lora_export(path) and (engine is not None or own_base):
      out[kind] = load_lora_on(
          path, engine, own_base=own_base, max_len=max_len,
          batch=int(config.lora.predict_batch) if config is not None else 64,
          engine_config=config.engine if config is not None else None)
  return out


def predict(engine, requests: Requests, predictor, hidden_layer: int, cost=None,
            compile_seconds: float = 0.0):
  """(pmf [n, L+1] or None, scalar [n] or None) for the requests: the prompts' hidden states
  (prefilled once per distinct prompt) through the predictor. In length replay the predictor
  reads the hidden states recorded in the store (its model's), while the prefill still runs
  on this engine so its time is counted. cost, compile_seconds: `embed_requests`'."""
  if predictor.kind == "lora":
    return None, predict_lora(predictor, requests)
  embedded = embed_requests(engine, requests, hidden_layer, cost, compile_seconds)
  started = time.perf_counter()
  hidden, which = requests.distinct_predictor_input()  # a prompt's repeats predicted once
  pmf, scalar = predict_hidden(predictor, hidden)
  logging.info("prediction: %d distinct prompts embedded in %.2f s, %d distinct states "
               "predicted in %.2f s", requests.distinct_hidden[0].shape[0], embedded,
               hidden.shape[0], time.perf_counter() - started)
  return (None if pmf is None else pmf[which]), (None if scalar is None else scalar[which])


def predict_lora(predictor, requests: Requests) -> np.ndarray:
  """[n] lengths the LoRA-tuned LLM answers, one greedy answer per distinct prompt: from the
  requests' token ids where the predictor runs on the serving engine's model, else (length
  replay, the simulator) from their text, encoded by its own base model."""
  _, first, inverse = np.unique(requests.dataset_index, return_index=True, return_inverse=True)
  if predictor.engine_is_serving and requests.prompt_ids is not None:
    answers = predictor.predict_ids([requests.prompt_ids[int(i)] for i in first])
  else:
    if requests.texts is None:
      raise ValueError("the LoRA predictor runs on another model than these requests' token "
                       "ids: it needs their prompt texts")
    answers = predictor.predict_texts([requests.texts[int(i)] for i in first])
  return answers[inverse]


def predict_hidden(predictor, hidden):
  """(pmf [n, L+1], None) from a distribution predictor, (None, scalar [n]) from a scalar one."""
  if predictor.kind == "lora":
    raise ValueError("the LoRA predictor reads prompts, not hidden states: use predict_lora")
  if predictor.kind == "distribution":
    return predictor.predict_pmf(hidden), None
  return None, predictor.predict_scalar(hidden)


def planner_requests(prompt_len, max_seq_len, pmf=None, scalar=None, true_length=None,
                     max_tokens=None):
  """The planners' requests; with `max_tokens` ([n], each request's own limit) every predicted
  pmf is truncated at its request's limit (`schedule.Requests`)."""
  if pmf is not None and pmf.shape[1] > max_seq_len + 1:
    pmf = pmf[:, :max_seq_len + 1]
  return PlannerRequests(np.asarray(prompt_len), int(max_seq_len), pmf, scalar, true_length,
                         max_tokens=max_tokens)


def recovery_fn(planner: str, requests: PlannerRequests, cost: CostModel, options: Options):
  def recover(unfinished, generated):
    return plan_recovery(planner, requests, unfinished, generated, cost, options)
  return recover


def plan_any(planner: str, requests: PlannerRequests, cost: CostModel, options: Options):
  """A static plan (schedule.PLANNERS), a continuous one (schedule.continuous) or a paged one
  (schedule.paged), by name."""
  if is_paged(planner):
    return PAGED_PLANNERS[planner](requests, cost, options)
  if is_continuous(planner):
    return make_continuous_plan(planner, requests, cost, options)
  return make_plan(planner, requests, cost, options)


def run_plan(runner, planner: str, plan, requests: PlannerRequests, cost: CostModel,
             options: Options):
  """Executes `plan` with `runner`: static batches with FCR recovery planned by `planner`, or
  continuous phases with the final-phase rule for rows left at the end, or a paged plan."""
  if is_paged(planner):
    from lsdist_jax.serve.paged_runner import run_paged

    return run_paged(runner, plan, requests, options)
  if is_continuous(planner):
    return runner.run_continuous(plan, lambda contexts, rooms: final_phase(contexts, rooms, cost,
                                                                            options))
  return runner.run(plan, recovery_fn(planner, requests, cost, options))


def make_runner(engine, requests: Requests, config, forced_lengths=None, on_progress=None,
                share_prefill: bool = False):
  from lsdist_jax.serve.runner import Runner

  gen = config.generation

  def setting(own, default):  # the requests' own settings, else the config's
    return default if own is None else own

  return Runner(engine, requests.prompt_ids, requests.request_ids.tolist(),
                temperature=setting(requests.temperature, gen.temperature),
                top_p=setting(requests.top_p, gen.top_p), seed=setting(requests.seed, gen.seed),
                max_seq_len=gen.max_seq_len, forced_lengths=forced_lengths,
                on_progress=on_progress, max_tokens=requests.max_tokens,
                share_prefill=share_prefill)


def describe_plan(planner: str, plan, options: Options) -> str:
  """One line on a plan: its strategy, batches or phases (slots, cache), the KV budget."""
  if is_paged(planner):
    shape = (f"{plan.slots} slots over pages of {plan.page} tokens, {plan.admission} admission, "
             f"refilled {plan.refill} at a time")
  elif is_continuous(planner):
    phases = ", ".join(f"{p.slots} slots x {p.cache_len} refilled {p.refill} at a time"
                       + (f", inserts at block {p.block}" if p.block else "")
                       + (f", drains at {p.drain} rows" if p.drain else "")
                       for p in plan.phases)
    shape = f"{len(plan.phases)} phase(s): {phases}"
  else:
    sizes = [len(b.members) for b in plan.batches]
    shape = f"{len(sizes)} batches of {min(sizes, default=0)}-{max(sizes, default=0)} rows"
  return f"plan {planner}: {shape}; KV budget {options.kv_budget_tokens:,} tokens"


def fits_at_once(requests: Requests, max_seq_len: int, cost: CostModel,
                 options: Options) -> bool:
  """Whether one slot batch holds every request at once, each with a cache for its whole room
  (prompt to max_seq_len), under the KV budget and max_batch: then no plan can do better than
  running them all together."""
  sched = planner_requests(requests.prompt_len, max_seq_len, max_tokens=requests.max_tokens)
  cache_len = int(slot_cache_len(sched.prompt_len, sched.room, cost).max())
  return slots_at_once(requests.n, cache_len, cost, options) > 0


def slots_at_once(n: int, cache_len: int, cost: CostModel, options: Options) -> int:
  """The slots of one phase that holds n rows of `cache_len` cache tokens at once, under the KV
  budget and max_batch (`slots_for`); 0 where they do not fit."""
  if cache_len * n > options.kv_budget_tokens:
    return 0
  slots = slots_for(cache_len, cost, options, rows=n)
  return slots if slots >= n else 0


def schedule_and_run(engine, requests: Requests, config, predictor, planner: str, cost: CostModel,
                     on_progress=None, options: Options | None = None):
  """Plans the requests of one chunk of a user's prompts with the predictor and runs them (the
  generate job); the plan is logged in one line. No predictor: dataset order (slots refilled,
  pages, or fixed batches). `options`: the planners' options, resolved once for a job's chunks
  (by default from the config now)."""
  from lsdist_jax.serve.runner import EngineClock

  options = options or planner_options(config, engine)
  pmf = scalar = None
  started, clock = time.perf_counter(), EngineClock(engine.generator)
  if is_continuous(planner) and fits_at_once(requests, config.generation.max_seq_len, cost,
                                             options):
    # every request runs from its first token to its last in one slot batch: there is nothing
    # to schedule, so no prediction (its prefill and compilation would only cost time)
    logging.info("all %d requests fit in one slot batch with their whole room under the KV "
                 "budget: nothing to schedule, the predictor is not run", requests.n)
    planner, predictor = "continuous-vanilla", None
  if predictor is None:
    planner = ("continuous-vanilla" if is_continuous(planner) else
               "paged-vanilla" if is_paged(planner) else "vanilla")
    options = dataclasses.replace(options, fixed_batch=max(1, options.fixed_batch))
  else:
    pmf, scalar = predict(engine, requests, predictor, int(config.collect.hidden_layer), cost,
                          options.compile_seconds)
  sched = planner_requests(requests.prompt_len, config.generation.max_seq_len, pmf, scalar,
                          max_tokens=requests.max_tokens)
  predicted, waited = time.perf_counter(), clock.excluded()  # waited: for compilation
  plan = plan_any(planner, sched, cost, options)
  planned = time.perf_counter()
  logging.info("%s", describe_plan(planner, plan, options))
  # a job's equal prompts (n choices of a batch line, repeated lines) share their prefill
  runner = make_runner(engine, requests, config, on_progress=on_progress, share_prefill=True)
  result = run_plan(runner, planner, plan, sched, cost, options)
  # as the benchmark counts them: the prediction's compilation apart from its seconds
  result.seconds.update(predict=predicted - started - waited, plan=planned - predicted,
                        compile=result.seconds["compile"] + waited)
  return result
