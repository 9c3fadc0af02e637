"""Shared fixtures: CPU only, float32 matmuls at full precision, a tiny model saved as HF files."""

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from lsdist_jax.llama.config import get_preset  # noqa: E402
from lsdist_jax.llama.model import Llama, init_params  # noqa: E402


def tiny_config(tied: bool = False):
  return dataclasses.replace(get_preset("tiny"), tie_word_embeddings=tied)


@pytest.fixture(scope="session")
def tiny_params():
  """Random float32 params of the tiny model, with enough scale that sampling is not uniform."""
  cfg = tiny_config()
  params = init_params(Llama(cfg, jnp.float32, jnp.float32), seed=0)
  return cfg, jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, params)
