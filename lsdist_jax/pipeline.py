"""The main job: (collect, or take a committed store of sampled lengths and hidden states) ->
train the distributional predictor and the scalar baselines -> evaluate them on unseen prompts
-> profile this device's cost model -> simulate every strategy on the store's unseen prompts ->
benchmark the strategies for real -> a short summary of measured and simulated ratios.

Each stage resumes from what is already in the workdir (store chunks, checkpoints, results). The
top of the application: it calls every stage, nothing calls it but `launch/pipeline.py`.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from lsdist_jax import paths
from lsdist_jax.config import check_config, default_config
from lsdist_jax.files import write_json, write_text

STAGES = ("collect", "train", "evaluate", "profile", "simulate", "benchmark")
# The claims the summary checks: (strategy, its reference).
CLAIMS = (("ours-continuous", "continuous-vanilla"), ("ours-optimal", "vanilla:best"))


def predictor_config(config, name: str):
  """The config with `predictor.kind` / `scalar_target` of the pipeline's predictor `name`."""
  kind, target = paths.PREDICTORS[name]
  c = config.copy_and_resolve_references()
  c.predictor.kind = kind
  c.predictor.scalar_target = target
  return c


def store_origin(store_path: str) -> str:
  """One line saying where a store's lengths come from (model, dtype, generation, size)."""
  from lsdist_jax.store import LengthStore

  store = LengthStore.open(store_path)
  meta, summary = store.meta, store.summary()
  model = meta.get("model", {})
  gen = meta.get("generation", {})
  return (f"lengths from the store {store_path} ({summary['prompts']} prompts x "
          f"{summary.get('samples_per_prompt', 0)} samples of "
          f"{model.get('model', {}).get('name', model.get('name', '?'))} in "
          f"{model.get('dtype', '?')}, T={gen.get('temperature')}, top-p {gen.get('top_p')}, "
          f"max_seq_len {gen.get('max_seq_len')}; collected {meta.get('created', '?')[:10]}, "
          "not on this machine)")


def capped_store(store_path: str, out_path: str, max_seq_len: int) -> str:
  """A copy of the store whose lengths follow the length convention at another max_seq_len
  (capped at max_seq_len - prompt length, unfinished there): what this run's generation gives
  the same prompts. Rebuilt when the source changes."""
  import shutil

  from lsdist_jax.store import LengthStore

  src = LengthStore.open(store_path)
  data = src.read()
  room = np.maximum(int(max_seq_len) - data["prompt_len"].astype(np.int64), 0)[:, None]
  lengths = np.minimum(data["lengths"], room)
  if os.path.isdir(out_path):
    shutil.rmtree(out_path)
  meta = {k: v for k, v in src.meta.items() if k not in ("hidden_dim", "samples_per_prompt",
                                                         "data_slices")}
  meta["generation"] = dict(meta.get("generation", {}), max_seq_len=int(max_seq_len))
  meta["capped_from"] = store_path
  dst = LengthStore.create_or_open(out_path, meta, hidden_dim=data["hidden"].shape[1],
                                   samples_per_prompt=lengths.shape[1])
  dst.write_chunk("capped", {"index": data["index"], "key": list(data["key"]),
                             "prompt_len": data["prompt_len"], "lengths": lengths,
                             "finished": data["finished"] & (data["lengths"] < room),
                             "hidden": data["hidden"]})
  return out_path


def profile_cpu(engine, config, workdir: str):
  """This device's cost model, profiled once into <workdir>/cost_model.json on the engine's
  smallest batch buckets and the cache lengths this run uses (few steps: a CPU is slow)."""
  from lsdist_jax.benchmark.profile import profile_cost
  from lsdist_jax.engine import device_kind, model_shape
  from lsdist_jax.schedule import CostModel

  path = paths.profiled_cost_model(workdir)
  if os.path.isfile(path):
    return CostModel.load(path)
  buckets = [int(b) for b in config.engine.batch_buckets]
  cache = int(config.engine.cache_bucket)
  caches = sorted({cache, cache * -(-int(config.generation.max_seq_len) // cache)})
  # greedy: the profile's synthetic prompts would give the nucleus flatter logits than real
  # prompts do (on a CPU, steps several times dearer than the runs pay)
  rows = profile_cost(engine, buckets[-2:], caches, steps=8, prompt_len=32, repeats=2)
  cost = CostModel.fit(rows, device=device_kind(), model=model_shape(engine))
  os.makedirs(workdir, exist_ok=True)
  cost.save(path)
  write_json(rows, os.path.join(workdir, "cost_profile.json"))
  return cost


def claims_text(measured: list[dict] | None, simulated: list[dict] | None) -> list[str]:
  """For each claim: the measured and the simulated ratio, and whether this run shows it."""
  lines = []
  for ours, ref in CLAIMS:
    parts = []
    for label, rows in (("measured", measured), ("simulated", simulated)):
      by = {r["strategy"]: r["samples_per_s"] for r in rows or []}
      if ours in by and ref in by:
        ratio = by[ours] / by[ref]
        parts.append(f"{label} {ratio:.2f}x ({'beats' if ratio > 1 else 'does NOT beat'})")
    lines.append(f"{ours} vs {ref}: " + ("; ".join(parts) or "not run"))
  return lines


def summary_table(measured: list[dict] | None, simulated: list[dict] | None) -> str:
  by_m = {r["strategy"]: r for r in measured or []}
  by_s = {r["strategy"]: r for r in simulated or []}
  names = list(by_m) + [n for n in by_s if n not in by_m]
  fmt = lambda v: "-" if v is None else f"{v:.2f}"
  lines = ["| strategy | measured samples/s | x vanilla:best | simulated samples/s | "
           "x vanilla:best (sim) |", "| --- | ---: | ---: | ---: | ---: |"]
  for n in names:
    m, s = by_m.get(n, {}), by_s.get(n, {})
    lines.append(f"| {n} | {fmt(m.get('samples_per_s'))} | {fmt(m.get('x_vanilla_best'))} | "
                 f"{fmt(s.get('samples_per_s'))} | {fmt(s.get('x_vanilla_best'))} |")
  return "\n".join(lines)


def run_pipeline(config, workdir: str | None = None, stages=STAGES, engine=None) -> dict:
  from lsdist_jax import collect, report
  from lsdist_jax.benchmark.run import run_benchmark
  from lsdist_jax.engine import load_engine
  from lsdist_jax.predictor import train
  from lsdist_jax.predictor.evaluate import evaluate_predictors, table_text

  check_config(config)
  workdir = workdir or config.workdir
  config = config.copy_and_resolve_references()
  config.collect.store = paths.store(config, workdir)
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise ValueError(f"unknown pipeline stages {sorted(unknown)}; stages: {STAGES}")
  summary, plots = {}, []
  if "collect" in stages:
    engine = engine or load_engine(config)
    summary["collect"] = collect.collect(config, workdir, engine=engine)
    print(report.collect_summary_text(summary["collect"]), flush=True)
    plots += report.plot_collection(config.collect.store, workdir)
  summary["store"] = store_origin(config.collect.store)
  print(f"predictor training data: {summary['store']}", flush=True)
  if "train" in stages:
    summary["train"] = {}
    for name in paths.PREDICTORS:
      result = train.train_and_evaluate(predictor_config(config, name),
                                        paths.predictor_workdir(workdir, name))
      result.pop("params", None)
      summary["train"][name] = result
      logging.info("trained %s: best epoch %s, valid loss %.5f", name, result["best_epoch"],
                   result["best_valid_loss"])
  if "evaluate" in stages:
    summary["evaluate"] = evaluate_predictors(config, paths.predictor_exports(workdir), workdir)
    print(f"predictors on the store's {summary['evaluate']['test_prompts']} unseen test prompts "
          f"(x {summary['evaluate']['samples_per_prompt']} sampled lengths each):", flush=True)
    print(table_text(summary["evaluate"]), flush=True)
    plots += [os.path.join(workdir, "reliability.png"), os.path.join(workdir, "examples.png")]
  cost = None
  if "profile" in stages:
    engine = engine or load_engine(config)
    cost = profile_cpu(engine, config, workdir)
    summary["cost_model"] = paths.profiled_cost_model(workdir)
  simulated = None
  if "simulate" in stages:
    from lsdist_jax.benchmark.simulate import simulate_strategies
    from lsdist_jax.serve.plan import load_cost_model

    cost = load_cost_model(config, workdir)
    sim_config = config.copy_and_resolve_references()
    sim_config.benchmark.strategies = default_config().benchmark.strategies
    capped = capped_store(config.collect.store, os.path.join(workdir, "store_capped"),
                          int(config.generation.max_seq_len))
    sim = simulate_strategies(sim_config, capped, paths.predictor_exports(workdir), cost,
                              int(config.benchmark.requests))
    sim["store"] = capped
    summary["simulate"] = sim
    simulated = sim["rows"]
    write_json(sim, os.path.join(workdir, "simulation.json"))
    plots.append(report.plot_benchmark(simulated, os.path.join(workdir, "simulation.png"),
                                       title=f"simulated under {cost.source}"))
  measured = None
  if "benchmark" in stages:
    engine = engine or load_engine(config)
    out = run_benchmark(config, workdir, engine=engine,
                        predictor_dirs=paths.predictor_exports(workdir))
    summary["benchmark"] = out
    measured = out["rows"]
    plots.append(os.path.join(workdir, "benchmark.png"))
  summary["claims"] = claims_text(measured, simulated)
  summary["plots"] = [p for p in plots if os.path.isfile(p)]
  os.makedirs(workdir, exist_ok=True)
  write_json(summary, os.path.join(workdir, "pipeline_summary.json"))
  text = final_text(summary, measured, simulated, workdir)
  write_text(os.path.join(workdir, "summary.md"), text + "\n")
  print(text, flush=True)
  return summary


def final_text(summary: dict, measured, simulated, workdir: str) -> str:
  lines = ["", "== summary ==", f"predictor trained on {summary['store']}"]
  if "evaluate" in summary:
    rows = {r["model"]: r for r in summary["evaluate"]["rows"]}
    if "distribution" in rows and "marginal" in rows:
      d, m = rows["distribution"], rows["marginal"]
      lines.append(f"unseen test prompts: {summary['evaluate']['test_prompts']}; CRPS "
                   f"{d['crps']:.1f} vs marginal {m['crps']:.1f} tokens; coverage at 0.5/0.8/0.9 "
                   + "/".join(f"{d['coverage'][q]:.2f}" for q in ("0.5", "0.8", "0.9")))
  if measured or simulated:
    lines.append(summary_table(measured, simulated))
    if simulated:
      lines.append(f"simulated: {summary['simulate']['requests']} requests over the store's "
                   "unseen test prompts, lengths capped at this run's max_seq_len, under the "
                   f"cost model {summary['simulate']['cost_model']}")
    lines += summary["claims"]
    if measured and any("does NOT beat" in c.split(";")[0] for c in summary["claims"]):
      lines.append("this CPU run is too small to show every claim in measured samples/s; the "
                   "simulated ratios above use the cost model measured on this CPU")
  lines.append("plots: " + ", ".join(summary["plots"]))
  lines.append(f"everything else: {workdir}/")
  return "\n".join(lines)
