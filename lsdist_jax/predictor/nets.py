"""Predictor networks (Flax): an MLP backbone from the LLM's hidden state, with a distribution head
(logits over response lengths 0..L) or a scalar head (sigmoid x L).

Bins are response lengths (tokens after the prompt, EOS excluded; see lsdist_jax.config), not
prompt + response as in the paper: the scheduler needs decode steps, and the prompt is known.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn


class Backbone(nn.Module):
  hidden_sizes: Sequence[int]
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, size in enumerate(self.hidden_sizes):
      x = nn.Dense(size, name=f"dense_{i}")(x)
      x = nn.silu(x)
      if i == len(self.hidden_sizes) - 1 and self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x


class LengthPredictor(nn.Module):
  """kind="distribution": logits [B, L+1]; kind="scalar": predicted length [B] in [0, L]."""
  kind: str
  max_len: int
  hidden_sizes: Sequence[int] = (2048, 1024, 512)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, hidden, train: bool = False):
    x = Backbone(tuple(self.hidden_sizes), self.dropout, name="backbone")(hidden, train)
    if self.kind == "distribution":
      return nn.Dense(self.max_len + 1, name="head")(x).astype(jnp.float32)
    if self.kind == "scalar":
      return jax.nn.sigmoid(nn.Dense(1, name="head")(x)[:, 0]).astype(jnp.float32) * self.max_len
    raise ValueError(f"predictor kind {self.kind!r}: expected 'distribution' or 'scalar'")
