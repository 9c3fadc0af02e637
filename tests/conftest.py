"""Shared fixtures: CPU only, float32 matmuls at full precision, a tiny model saved as HF files."""

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from lsdist_jax.llama.config import get_preset  # noqa: E402
from lsdist_jax.llama.model import Llama, init_params  # noqa: E402
from lsdist_jax.schedule import Requests  # noqa: E402


def tiny_config(tied: bool = False):
  return dataclasses.replace(get_preset("tiny"), tie_word_embeddings=tied)


@pytest.fixture(scope="session")
def tiny_params():
  """Random float32 params of the tiny model, with enough scale that sampling is not uniform."""
  cfg = tiny_config()
  params = init_params(Llama(cfg, jnp.float32, jnp.float32), seed=0)
  return cfg, jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x, params)


def random_requests(n=300, max_len=256, seed=0, max_seq_len=320):
  """Planner requests with random unimodal length pmfs, a sample of each as its true length."""
  rng = np.random.default_rng(seed)
  mu = rng.lognormal(3.5, 0.8, n).clip(2, max_len - 10)
  lengths = np.arange(max_len + 1)
  pmf = np.exp(-0.5 * ((lengths[None] - mu[:, None]) / (0.3 * mu[:, None] + 3)) ** 2)
  pmf /= pmf.sum(1, keepdims=True)
  true = np.array([rng.choice(max_len + 1, p=p) for p in pmf])
  return Requests(rng.integers(5, 60, n), max_seq_len, pmf, scalar_length=pmf.argmax(1),
                  true_length=true)


@dataclasses.dataclass
class Batch:
  """A static batch for `Runner.run` (members, cap)."""
  members: np.ndarray
  cap: int


@dataclasses.dataclass
class Plan:
  """A static plan for `Runner.run`."""
  batches: list


class RunnerEngine:
  """What a `Runner` needs of an engine: its generator."""

  def __init__(self, generator):
    self.generator = generator
