"""The main job: collect (sampled lengths + hidden states) -> train the distributional predictor and
the scalar baselines -> evaluate them -> benchmark every scheduling strategy -> report.

Each stage resumes from what is already in the workdir (store chunks, checkpoints).
"""

from __future__ import annotations

import json
import logging
import os

from lsdist_jax.config import check_config

STAGES = ("collect", "train", "evaluate", "benchmark")
PREDICTORS = {"distribution": ("distribution", "max"), "scalar-max": ("scalar", "max"),
              "scalar-mean": ("scalar", "mean")}


def predictor_workdir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "predictor", name)


def predictor_exports(workdir: str) -> dict:
  return {name: os.path.join(predictor_workdir(workdir, name), "export") for name in PREDICTORS}


def predictor_config(config, name: str):
  kind, target = PREDICTORS[name]
  c = config.copy_and_resolve_references()
  c.predictor.kind = kind
  c.predictor.scalar_target = target
  return c


def run_pipeline(config, workdir: str | None = None, stages=STAGES, engine=None) -> dict:
  from lsdist_jax import benchmark, collect, report
  from lsdist_jax.predictor import train
  from lsdist_jax.predictor.evaluate import evaluate_predictors, table_text

  check_config(config)
  workdir = workdir or config.workdir
  config = config.copy_and_resolve_references()
  if not config.collect.store:
    config.collect.store = os.path.join(workdir, "store")
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise ValueError(f"unknown pipeline stages {sorted(unknown)}; stages: {STAGES}")
  summary = {}
  if "collect" in stages:
    engine = engine or collect.load_engine(config)
    summary["collect"] = collect.collect(config, workdir, engine=engine)
    print(report.collect_summary_text(summary["collect"]), flush=True)
    report.plot_collection(config.collect.store, workdir)
  if "train" in stages:
    summary["train"] = {}
    for name in PREDICTORS:
      result = train.train_and_evaluate(predictor_config(config, name),
                                        predictor_workdir(workdir, name))
      result.pop("params", None)
      summary["train"][name] = result
      logging.info("trained %s: best epoch %s, valid loss %.5f", name, result["best_epoch"],
                   result["best_valid_loss"])
  if "evaluate" in stages:
    summary["evaluate"] = evaluate_predictors(config, predictor_exports(workdir), workdir)
    print(table_text(summary["evaluate"]), flush=True)
  if "benchmark" in stages:
    engine = engine or collect.load_engine(config)
    out = benchmark.run_benchmark(config, workdir, engine=engine,
                                  predictor_dirs=predictor_exports(workdir))
    summary["benchmark"] = out
    print(report.markdown_table(out["rows"]), flush=True)
  with open(os.path.join(workdir, "pipeline_summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  return summary
