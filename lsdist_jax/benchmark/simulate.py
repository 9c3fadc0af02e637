"""The benchmark's strategies simulated on a length store: each plan replayed against the store's
recorded lengths under a cost model (`schedule/simulate.py`), with no engine. Adds
`exact-distribution`: the DP planner given each prompt's own sampled-length distribution, the
best a length *distribution* can tell a planner (it cannot say which sample will be long).

Imports no JAX itself: predictions come from the predictor exports (loaded only when a strategy
needs one).
"""

from __future__ import annotations

import numpy as np

from lsdist_jax import report
from lsdist_jax.paths import LORA
from lsdist_jax.schedule import CostModel, dist
from lsdist_jax.schedule.continuous import simulate_continuous
from lsdist_jax.schedule.simulate import simulate
from lsdist_jax.serve import plan as serve_plan
from lsdist_jax.serve.requests import store_requests
from lsdist_jax.schedule.paged import simulate_paged
from lsdist_jax.schedule.paged_search import plan_paged_vanilla, slot_choices
from lsdist_jax.serve.strategies import (NEEDS_TRUE_LENGTHS, STRATEGIES, is_continuous, is_paged,
                                         strategy_options)

EXACT = "exact-distribution"


def split_rows(data: dict, split: str) -> np.ndarray:
  """Store rows of `split` (every row for ""), in store order."""
  rows = np.arange(len(data["index"])) if not split else np.nonzero(data["split"] == split)[0]
  if rows.size == 0:
    raise ValueError(f"the store has no {split!r} prompts")
  return rows


def exact_pmfs(data: dict, rows: np.ndarray, max_len: int) -> np.ndarray:
  """Each row's recorded lengths as a pmf (its exact length distribution). [len(rows), L+1]"""
  return dist.empirical_pmf(np.minimum(np.asarray(data["lengths"])[rows], max_len), max_len)


def simulate_strategies(config, store_path: str, predictor_dirs: dict, cost: CostModel,
                        n_requests: int, strategies=None, paged_sweep: bool = False) -> dict:
  """Simulated samples/s of each strategy (config.benchmark.strategies by default, then
  exact-distribution) on `n_requests` store requests; ratios against vanilla:best and oracle.
  paged_sweep: also paged-vanilla at each batch size it may run (`paged-vanilla@<slots>`)."""
  from lsdist_jax.store import LengthStore

  max_seq_len = int(config.generation.max_seq_len)
  max_len = int(config.predictor.max_len)
  options = serve_plan.planner_options(config)
  data = LengthStore.open(store_path).read()
  rows = split_rows(data, config.benchmark.split)
  reqs = store_requests(data, rows, n_requests, max_len)
  exact = exact_pmfs(data, rows, max_len)[np.arange(n_requests) % rows.size]
  hidden = reqs.predictor_input()
  names = list(strategies or config.benchmark.strategies)
  # The LoRA predictor (ssch-lora) answers from each prompt's text on its own base model, loaded
  # only when a strategy needs it.
  needs_lora = any(STRATEGIES[n][1] == LORA for n in names if n in STRATEGIES)
  predictors = serve_plan.load_predictors(predictor_dirs, hidden.shape[1], max_len,
                                          own_base=needs_lora, config=config)
  if needs_lora:
    from lsdist_jax.lora.data import store_prompts

    texts = store_prompts(config, {"key": np.asarray(data["key"])[rows]})
    reqs.texts = [texts[i % rows.size] for i in range(n_requests)]
  out_rows = []
  for name in names + [EXACT]:
    planner, kind = ("optimal", None) if name == EXACT else STRATEGIES[name]
    pmf = scalar = None
    if name == EXACT:
      pmf = exact
    elif kind is not None:
      if kind not in predictors:
        raise ValueError(f"strategy {name!r} needs a {kind!r} predictor export")
      if kind == LORA:
        scalar = serve_plan.predict_lora(predictors[kind], reqs)
      else:
        pmf, scalar = serve_plan.predict_hidden(predictors[kind], hidden)
    true_length = reqs.recorded_length
    sched = serve_plan.planner_requests(reqs.prompt_len, max_seq_len, pmf, scalar,
                                        true_length if planner in NEEDS_TRUE_LENGTHS else None)
    opts = strategy_options(name, options, cost, reqs.prompt_len, max_seq_len)
    out_rows.append(_row(name, *_plan_and_run(planner, sched, true_length, cost, opts),
                         n_requests))
  if paged_sweep:  # paged-vanilla at every batch size it may run (each chosen in hindsight)
    sched = serve_plan.planner_requests(reqs.prompt_len, max_seq_len, None, None, None)
    for slots in slot_choices(sched, cost, options):
      plan = plan_paged_vanilla(sched, cost, options, slots=slots)
      out_rows.append(_row(f"paged-vanilla@{slots}", plan,
                           simulate_paged(plan, sched, reqs.recorded_length, cost, options),
                           n_requests))
  report.add_ratios(out_rows)
  return {"requests": n_requests, "kv_budget_tokens": int(options.kv_budget_tokens),
          "cost_model": cost.source, "rows": out_rows}


def _plan_and_run(planner: str, sched, true_length, cost: CostModel, opts):
  """(plan, its simulated result) for a static, continuous or paged planner."""
  plan = serve_plan.plan_any(planner, sched, cost, opts)
  return plan, _simulate_plan(planner, plan, sched, true_length, cost, opts)


def _simulate_plan(planner: str, plan, sched, true_length, cost: CostModel, opts):
  if is_paged(planner):
    return simulate_paged(plan, sched, true_length, cost, opts)
  if is_continuous(planner):
    return simulate_continuous(plan, sched, true_length, cost, opts)
  return simulate(plan, sched, true_length, cost,
                  serve_plan.recovery_fn(planner, sched, cost, opts))


def simulated_split(planner: str, plan, sched, lengths, cost: CostModel, opts) -> dict:
  """{"simulated_split": {"seconds", "insert_calls", "decode_calls", "inserts", "decodes",
  "decode_steps"}}: a continuous or paged plan that ran, simulated again on the lengths it
  generated under the cost model that planned it, to set beside the run's `runner_split`
  (where the model misses the engine); {} for a static plan."""
  if not (is_paged(planner) or is_continuous(planner)):
    return {}
  result = _simulate_plan(planner, plan, sched, np.asarray(lengths, np.int64), cost, opts)
  split = _split(result)["split"]
  return {"simulated_split": {"seconds": round(float(result.seconds), 3),
                              **{k: (round(v, 3) if isinstance(v, float) else v)
                                 for k, v in split.items()}}}


def _row(name: str, plan, result, n_requests: int) -> dict:
  return {"strategy": name, "samples_per_s": n_requests / result.seconds,
          "tokens_per_s": result.generated_tokens / result.seconds,
          "seconds": result.seconds, "expected_seconds": plan.expected_cost,
          "effective_token_ratio": result.effective_token_ratio,
          "batches": result.batches, "recovery_batches": result.recovery_batches,
          "generated_tokens": result.generated_tokens, **_split(result)}


def _split(result) -> dict:
  """A continuous or paged run's simulated split, as the runner measures it (`runner_split`):
  seconds in insert calls and in decode calls, and the number of each and of decode steps."""
  if not hasattr(result, "insert_seconds"):
    return {}
  return {"split": {"insert_calls": result.insert_seconds,
                    "decode_calls": result.seconds - result.insert_seconds,
                    "decode_steps": int(result.decode_steps),
                    "inserts": int(result.insert_calls), "decodes": int(result.decode_calls)}}
