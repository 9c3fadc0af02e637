"""The strategy registry: each strategy's planner and the predictor it needs, and the planner
options it runs with. Shared by the benchmark, the simulator and the generate job.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lsdist_jax.schedule.continuous_search import CONTINUOUS_PLANNERS
from lsdist_jax.schedule.paged_search import PAGED_PLANNERS

DEFAULT_VANILLA_BATCH = 16  # the paper's fixed batch

# name: (planner, predictor it needs or None)
STRATEGIES = {
    "vanilla:16": ("vanilla", None),
    "vanilla:best": ("vanilla", None),
    "sorted": ("sorted", "distribution"),
    "ssch-scalar-max": ("ssch", "scalar-max"),
    "ssch-scalar-mean": ("ssch", "scalar-mean"),
    "ssch-lora": ("ssch", "lora"),  # the LLM, LoRA-tuned, answers its length bin (lsdist_jax/lora)
    "ours": ("vbs", "distribution"),
    "ours-search": ("search", "distribution"),
    "ours-optimal": ("optimal", "distribution"),
    "oracle": ("oracle", None),
    # continuous (slot-refill) execution, schedule/continuous_search.py
    "continuous-vanilla": ("continuous-vanilla", None),
    "ours-continuous": ("continuous-search", "distribution"),
    "oracle-continuous": ("continuous-oracle", None),
    # paged execution over one KV pool, schedule/paged_search.py
    "paged-vanilla": ("paged-vanilla", None),
    "ours-paged": ("paged-search", "distribution"),
    "oracle-paged": ("paged-oracle", None),
}
# planners given every true length
NEEDS_TRUE_LENGTHS = ("oracle", "continuous-oracle", "paged-oracle")

# The generate job's --strategy: planners that use a distribution predictor, and ssch with a
# LoRA predictor export.
JOB_PLANNERS = ("continuous-search", "paged-search", "vbs", "search", "optimal", "ssch")


def check_strategies(names) -> list[str]:
  """The names, each known; the first must not need true lengths (it gives them)."""
  names = list(names)
  for name in names:
    if name not in STRATEGIES:
      raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
  if names and STRATEGIES[names[0]][0] in NEEDS_TRUE_LENGTHS:
    raise ValueError(f"{names[0]} needs a strategy before it whose run gives the true lengths")
  return names


def is_continuous(planner: str) -> bool:
  return planner in CONTINUOUS_PLANNERS


def is_paged(planner: str) -> bool:
  return planner in PAGED_PLANNERS


def vanilla_best_batch(cost, options, prompt_len: np.ndarray, max_seq_len: int) -> int:
  """The largest fixed batch whose full-length cache fits the KV budget (and max_batch)."""
  size = 1
  for b in sorted(cost.batch_buckets):
    if b <= options.max_batch and int(cost.kv_tokens(b, int(prompt_len.max()),
                                                     max_seq_len)) <= options.kv_budget_tokens:
      size = b
  return size


def strategy_options(name: str, options, cost, prompt_len: np.ndarray, max_seq_len: int):
  """The planner options a strategy runs with: vanilla's fixed batch (16, or the largest that
  fits the KV budget at full length); the config's options otherwise."""
  if name == "vanilla:16":
    return dataclasses.replace(options, fixed_batch=DEFAULT_VANILLA_BATCH)
  if name == "vanilla:best":
    return dataclasses.replace(options, fixed_batch=vanilla_best_batch(cost, options, prompt_len,
                                                                       max_seq_len))
  return options
