"""The main job: collect (sampled lengths + hidden states) -> train the distributional predictor and
the scalar baselines -> evaluate them -> benchmark every scheduling strategy -> report.

Each stage resumes from what is already in the workdir (store chunks, checkpoints). The top of
the application: it calls every stage, nothing calls it but `launch/pipeline.py`.
"""

from __future__ import annotations

import logging
import os

from lsdist_jax import paths
from lsdist_jax.config import check_config
from lsdist_jax.files import write_json

STAGES = ("collect", "train", "evaluate", "benchmark")


def predictor_config(config, name: str):
  """The config with `predictor.kind` / `scalar_target` of the pipeline's predictor `name`."""
  kind, target = paths.PREDICTORS[name]
  c = config.copy_and_resolve_references()
  c.predictor.kind = kind
  c.predictor.scalar_target = target
  return c


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
  summary = {}
  if "collect" in stages:
    engine = engine or load_engine(config)
    summary["collect"] = collect.collect(config, workdir, engine=engine)
    print(report.collect_summary_text(summary["collect"]), flush=True)
    report.plot_collection(config.collect.store, workdir)
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
    print(table_text(summary["evaluate"]), flush=True)
  if "benchmark" in stages:
    engine = engine or load_engine(config)
    out = run_benchmark(config, workdir, engine=engine,
                        predictor_dirs=paths.predictor_exports(workdir))
    summary["benchmark"] = out
    print(report.markdown_table(out["rows"]), flush=True)
  os.makedirs(workdir, exist_ok=True)
  write_json(summary, os.path.join(workdir, "pipeline_summary.json"))
  return summary
