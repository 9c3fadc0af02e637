"""The benchmark's strategies simulated on a length store: each plan replayed against the store's
recorded lengths under a cost model (`schedule/simulate.py`), with no engine. Adds
`exact-distribution`: the DP planner given each prompt's own sampled-length distribution, the
best a length *distribution* can tell a planner (it cannot say which sample will be long).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lsdist_jax import report, scheduling
from lsdist_jax.benchmark import NEEDS_TRUE_LENGTHS, STRATEGIES, strategy_options
from lsdist_jax.schedule import CostModel, Options
from lsdist_jax.schedule.continuous import simulate_continuous
from lsdist_jax.schedule.simulate import simulate

EXACT = "exact-distribution"


@dataclasses.dataclass
class StoreRequests:
  prompt_len: np.ndarray  # [n]
  true_length: np.ndarray  # [n] a recorded sample of its prompt
  hidden: np.ndarray  # [n, D] the prompt's hidden state (predictor input)
  exact_pmf: np.ndarray  # [n, max_len + 1] the prompt's recorded lengths as a pmf


def store_requests(store_path: str, n_requests: int, max_len: int, split: str = "test",
                   split_seed: int = 20231113,
                   split_fractions=(0.8, 0.1, 0.1)) -> StoreRequests:
  """Request r is prompt r mod P of the split (in store order), its length the (r div P)-th
  recorded sample of that prompt (cycling), as in the benchmark's length replay."""
  from lsdist_jax.data import assign_split
  from lsdist_jax.store import LengthStore

  data = LengthStore.open(store_path).read()
  names = assign_split([int(i) for i in data["index"]], split_seed, tuple(split_fractions))
  rows = [k for k, name in enumerate(names) if not split or name == split]
  if not rows:
    raise ValueError(f"the store at {store_path} has no {split!r} prompts")
  lengths = np.minimum(data["lengths"], max_len)
  samples = lengths.shape[1]
  pick = np.array([rows[r % len(rows)] for r in range(n_requests)])
  copy = np.arange(n_requests) // len(rows)
  exact = np.zeros((len(rows), max_len + 1))
  for j, k in enumerate(rows):
    np.add.at(exact[j], lengths[k], 1.0 / samples)
  return StoreRequests(np.asarray(data["prompt_len"])[pick], lengths[pick, copy % samples],
                       np.asarray(data["hidden"])[pick],
                       exact[np.arange(n_requests) % len(rows)])


def simulate_strategies(config, store_path: str, predictor_dirs: dict, cost: CostModel,
                        n_requests: int, strategies=None) -> dict:
  """Simulated samples/s of each strategy (config.benchmark.strategies by default, then
  exact-distribution) on `n_requests` store requests; ratios against vanilla:best and oracle."""
  max_seq_len = int(config.generation.max_seq_len)
  options = Options.from_config(config.schedule)
  reqs = store_requests(store_path, n_requests, int(config.predictor.max_len),
                        config.benchmark.split, int(config.data.split_seed),
                        tuple(config.data.split_fractions))
  predictors = scheduling.load_predictors(predictor_dirs, reqs.hidden.shape[1],
                                          int(config.predictor.max_len))
  rows = []
  for name in list(strategies or config.benchmark.strategies) + [EXACT]:
    planner, kind = ("optimal", None) if name == EXACT else STRATEGIES[name]
    pmf = scalar = None
    if name == EXACT:
      pmf = reqs.exact_pmf
    elif kind is not None:
      if kind not in predictors:
        raise ValueError(f"strategy {name!r} needs a {kind!r} predictor export")
      pmf, scalar = scheduling.predict_hidden(predictors[kind], reqs.hidden)
    sched = scheduling.planner_requests(reqs.prompt_len, max_seq_len, pmf, scalar,
                                        reqs.true_length if planner in NEEDS_TRUE_LENGTHS else None)
    opts = strategy_options(name, options, cost, reqs.prompt_len, max_seq_len)
    plan = scheduling.plan_any(planner, sched, cost, opts)
    if scheduling.is_continuous(planner):
      result = simulate_continuous(plan, sched, reqs.true_length, cost, opts)
    else:
      result = simulate(plan, sched, reqs.true_length, cost,
                        scheduling.recovery_fn(planner, sched, cost, opts))
    rows.append({"strategy": name, "samples_per_s": n_requests / result.seconds,
                 "tokens_per_s": result.generated_tokens / result.seconds,
                 "seconds": result.seconds, "expected_seconds": plan.expected_cost,
                 "effective_token_ratio": result.effective_token_ratio,
                 "batches": result.batches, "recovery_batches": result.recovery_batches,
                 "generated_tokens": result.generated_tokens})
  report.add_ratios(rows)
  return {"requests": n_requests, "kv_budget_tokens": int(options.kv_budget_tokens),
          "cost_model": cost.source, "rows": rows}
