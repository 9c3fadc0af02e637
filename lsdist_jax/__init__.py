"""lsdist_jax: predict each prompt's response-length distribution and schedule LLM batch generation."""

__version__ = "0.1.0"


def __getattr__(name):
  # `lsdist_jax.Engine` without importing jax at package import time.
  if name == "Engine":
    from lsdist_jax.engine import Engine
    return Engine
  raise AttributeError(name)
