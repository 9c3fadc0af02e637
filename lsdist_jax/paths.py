"""Where each stage's files live in a workdir: the length store, the predictors' workdirs and
exports, the evaluation, the cost model, the benchmark's state. Every stage resolves them here.
"""

from __future__ import annotations

import os

# The predictors the pipeline trains: name -> (predictor.kind, predictor.scalar_target).
PREDICTORS = {"distribution": ("distribution", "max"), "scalar-max": ("scalar", "max"),
              "scalar-mean": ("scalar", "mean")}
COST_MODEL = "cost_model.json"


def workdir_of(config, workdir: str | None = None) -> str:
  return workdir or config.workdir


def store(config, workdir: str | None = None) -> str:
  """config.collect.store, else <workdir>/store."""
  return config.collect.store or os.path.join(workdir_of(config, workdir), "store")


def predictor_workdir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "predictor", name)


def predictor_export(workdir: str, name: str) -> str:
  return os.path.join(predictor_workdir(workdir, name), "export")


# The LLM itself LoRA-tuned to answer its length bin (launch/train_lora.py), beside them.
LORA = "lora"


def predictor_exports(workdir: str) -> dict[str, str]:
  """{predictor name: its export folder} for every predictor the pipeline trains, and the LoRA
  predictor's (used where it exists)."""
  out = {name: predictor_export(workdir, name) for name in PREDICTORS}
  out[LORA] = predictor_export(workdir, LORA)
  return out


def profiled_cost_model(workdir: str) -> str:
  """Where `launch/benchmark.py --profile` saves the cost model it fits."""
  return os.path.join(workdir, COST_MODEL)


def cost_model(config, workdir: str | None = None) -> str:
  """The cost model a stage plans with: config.schedule.cost_model, else the one profiled into
  <workdir>/cost_model.json if there is one, else "" (the built-in default)."""
  if config.schedule.cost_model:
    return config.schedule.cost_model
  profiled = profiled_cost_model(workdir_of(config, workdir))
  return profiled if os.path.isfile(profiled) else ""


def benchmark_state(workdir: str, name: str = "benchmark") -> str:
  return os.path.join(workdir, f"{name}_state")
