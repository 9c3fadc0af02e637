"""The throughput benchmark: every scheduling strategy on the same requests and seeds, in one run.

Per strategy: predict (prefill hidden + predictor), plan, generate, recover, compile are timed
apart; samples/s counts everything but compilation (shapes are compiled once per program, ahead
of time). Responses are compared across strategies: identical on CPU float32, the identical
share on GPU. Results are saved per strategy as they finish (`state.py`): a rerun resumes.
"""

from __future__ import annotations

import datetime
import logging
import time

import numpy as np

from lsdist_jax import paths
from lsdist_jax.benchmark.report import report_from_state
from lsdist_jax.benchmark.simulate import simulated_split
from lsdist_jax.benchmark.state import ResumeState
from lsdist_jax.serve import plan as serve_plan
from lsdist_jax.serve.requests import build_requests, replay_requests
from lsdist_jax.serve.runner import EngineClock, runner_split
from lsdist_jax.serve.strategies import (NEEDS_TRUE_LENGTHS, STRATEGIES, check_strategies,
                                         strategy_options)


def summarize(strategy: str, result, seconds: dict, n: int, peak_kv: int) -> dict:
  """A strategy's row. samples_per_s is steady state (prediction, planning, generation and
  recovery; compilation left out, as a long job amortises it); samples_per_s_end_to_end adds
  the compilation this strategy's run paid (programs a strategy shares with an earlier one in
  the same process were compiled there)."""
  busy = seconds["predict"] + seconds["plan"] + seconds["generate"] + seconds["recover"]
  return {
      "strategy": strategy,
      "samples_per_s": n / busy,
      "samples_per_s_end_to_end": n / (busy + seconds["compile"]),
      "tokens_per_s": result.generated_tokens / busy,
      "effective_token_ratio": result.effective_token_ratio,
      "seconds_total": busy,
      "seconds_predict": seconds["predict"],
      "seconds_plan": seconds["plan"],
      "seconds_generate": seconds["generate"],
      "seconds_recover": seconds["recover"],
      "seconds_compile": seconds["compile"],
      "batches": sum(b.phase == "main" for b in result.batches),
      "recovery_batches": sum(b.phase == "recovery" for b in result.batches),
      "compilations": int(sum(b.compiled for b in result.batches)),
      "peak_kv_tokens": int(peak_kv),
      "generated_tokens": result.generated_tokens,
      "computed_tokens": result.computed_tokens,
  }


def peak_kv_tokens(result) -> int:
  return max((b.padded_size * b.cache_len if b.kv_tokens is None else b.kv_tokens
              for b in result.batches), default=0)


def log_row(row: dict) -> None:
  logging.info("%-16s %8.2f samples/s %10.1f tok/s  effective %.3f  predict %.2fs plan %.2fs "
               "generate %.2fs recover %.2fs", row["strategy"], row["samples_per_s"],
               row["tokens_per_s"], row["effective_token_ratio"], row["seconds_predict"],
               row["seconds_plan"], row["seconds_generate"], row["seconds_recover"])


def benchmark_prompts(prompts, config):
  """The benchmark's prompts: all of its slice, or only those of `benchmark.split` (the store's
  split of the same prompt texts, from the same seeded hash of each prompt's key)."""
  split = config.benchmark.split
  if not split:
    return prompts
  from lsdist_jax.data import assign_split

  names = assign_split([p.key for p in prompts], int(config.data.split_seed),
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


def run_benchmark(config, workdir: str, engine=None, predictor_dirs: dict | None = None,
                  cost=None, out_name: str = "benchmark", worker: bool = False) -> dict:
  """Every strategy of config.benchmark.strategies on the same requests and seeds.

  predictor_dirs: {"distribution": export dir, "scalar-max": export dir, ...} (default: the
  workdir's). With config.benchmark.replay, every request's EOS is forced at a length sampled
  for its prompt in the store (length replay), so any model runs with real length statistics.
  worker=True: one of several processes sharing the list (`launch/benchmark.py --workers`):
  it runs the strategies it claims first and reports only what is done; identical shares and
  the true lengths (oracles) come from the first strategy's result, whichever worker runs it."""
  from lsdist_jax.data import load_prompts
  from lsdist_jax.engine import device_kind, load_engine

  bench = config.benchmark
  names = check_strategies(bench.strategies)
  engine = engine or load_engine(config)
  options = serve_plan.planner_options(config, engine)
  if cost is None:
    cost = serve_plan.load_cost_model(config, workdir, engine)
  else:
    serve_plan.warn_cost_model(cost, engine, cost.source)
  data_config = config.data.copy_and_resolve_references()
  data_config.slice = bench.slice
  prompts = benchmark_prompts(load_prompts(data_config), config)
  if bench.replay:
    from lsdist_jax.store import LengthStore

    data = LengthStore.open(paths.store(config, workdir)).read()
    requests = replay_requests(data, prompts, int(bench.requests), engine.config.vocab_size)
  else:
    prompts = drop_long_prompts(engine, prompts, config.generation.max_seq_len)
    requests = build_requests(engine, prompts, int(bench.requests))
  forced = requests.recorded_length
  prompt_len = requests.prompt_len
  state = ResumeState(paths.benchmark_state(workdir, out_name), {
      "requests": [int(x) for x in requests.request_ids], "prompt_len": prompt_len.tolist(),
      "forced": None if forced is None else [int(x) for x in forced],
      "kv_budget_tokens": int(options.kv_budget_tokens), "repeats": int(bench.repeats),
      "generation": dict(config.generation), "model": engine.source,
      **({"warm_start": True} if bench.warm_start else {}),  # (older states: none)
      # the plans follow the cost model: strategies planned with another are not mixed in
      "cost_model": cost.to_json()})
  repeats = range(int(bench.repeats))
  state.write_meta({
      "device": device_kind(), "date": datetime.date.today().isoformat(),
      "model": engine.source, "prompts": len(prompt_len),
      "distinct_prompts": int(np.unique(requests.dataset_index).size),
      "kv_budget_tokens": int(options.kv_budget_tokens),
      "kv_budget": ("sized from the device's free memory"
                    if isinstance(config.schedule.kv_budget_tokens, str)
                    else "set in the config: emulates memory pressure"),
      "replay": bool(bench.replay),
      "max_seq_len": int(config.generation.max_seq_len),
      "cost_model": cost.source + (f" (profiled on {cost.device})" if cost.device else ""),
      "strategies": names, "repeats": int(bench.repeats), "warm_start": bool(bench.warm_start)})
  to_run = [(n, r) for r in repeats for n in names if not state.has(n, r)]
  hidden_layer = int(config.collect.hidden_layer)
  runner = predictors = None
  if to_run:
    # In length replay the predictors read the store's hidden states (of the model that
    # recorded the lengths), whatever this engine's width.
    hidden_dim = (requests.recorded_hidden.shape[1] if requests.recorded_hidden is not None
                  else engine.config.hidden_size)
    if predictor_dirs is None:
      predictor_dirs = paths.predictor_exports(workdir)
    predictors = serve_plan.load_predictors(predictor_dirs, hidden_dim,
                                            int(config.predictor.max_len), engine=engine,
                                            own_base=bool(bench.replay), config=config)
    runner = serve_plan.make_runner(engine, requests, config, forced)
    runner.warm_start = bool(bench.warm_start)
    logging.info("benchmark: %d requests over %d prompts, KV budget %d tokens, replay=%s",
                 len(prompt_len), int(np.unique(requests.dataset_index).size),
                 options.kv_budget_tokens, bool(bench.replay))
    # Compilation is timed apart by the engine (ahead-of-time per shape) and left out of
    # samples/s; the prefill for hidden states and each predictor are compiled here, first.
    for predictor in predictors.values():
      serve_plan.predict(engine, requests, predictor, hidden_layer, cost)

  def run_one(name, true_length):
    planner, kind = STRATEGIES[name]
    seconds = {"predict": 0.0, "plan": 0.0, "generate": 0.0, "recover": 0.0, "compile": 0.0}
    sched_options = strategy_options(name, options, cost, prompt_len,
                                     config.generation.max_seq_len)
    pmf = scalar = None
    if kind is not None:
      if kind not in predictors:
        raise ValueError(f"strategy {name!r} needs a {kind!r} predictor export")
      clock = EngineClock(engine.generator)  # leaves out any wait for a shared device
      # a predictor with its own generator (LoRA): its compilation and waits are left out too
      own = getattr(predictors[kind], "generator", None)
      own_clock = EngineClock(own) if own is not None and own is not engine.generator else None
      pmf, scalar = serve_plan.predict(engine, requests, predictors[kind], hidden_layer, cost)
      _, seconds["predict"] = clock.split()
      if own_clock is not None:
        seconds["predict"] -= own_clock.excluded()
    sched = serve_plan.planner_requests(prompt_len, config.generation.max_seq_len, pmf, scalar,
                                        true_length)
    t0 = time.perf_counter()
    plan = serve_plan.plan_any(planner, sched, cost, sched_options)
    seconds["plan"] = time.perf_counter() - t0
    result = serve_plan.run_plan(runner, planner, plan, sched, cost, sched_options)
    for key in ("generate", "recover", "compile"):
      seconds[key] += result.seconds[key]
    row = summarize(name, result, seconds, len(prompt_len), peak_kv_tokens(result))
    row.update(runner_split(result.seconds))
    row.update(simulated_split(planner, plan, sched, [len(t) for t in result.tokens], cost,
                               sched_options))
    row["threshold"] = plan.threshold
    row["expected_seconds"] = plan.expected_cost
    return row, result.tokens

  for repeat in repeats:
    first = None  # the first strategy's (row, tokens): the oracles' true lengths
    for name in names:
      if state.has(name, repeat) or (worker and not state.claim(name, repeat)):
        continue
      true_length = None
      if STRATEGIES[name][0] in NEEDS_TRUE_LENGTHS:
        first = first or state.load(names[0], repeat) or state.wait(names[0], repeat)
        true_length = np.array([len(t) for t in first[1]])
      row, tokens = run_one(name, true_length)
      state.save(name, repeat, row, tokens)
      log_row(row)
  # Workers leave the report to the process that started them.
  return report_from_state(workdir, out_name, write=not worker, allow_missing=worker)
