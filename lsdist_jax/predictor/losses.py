"""Training targets and losses: the KDE-smoothed histogram of sampled lengths, KL(target || model),
MSE, and the scalar targets (max, mean or a quantile of a prompt's samples).

Edge handling: each sample's Gaussian kernel is truncated to 0..L and renormalised, so every
target sums to 1 (the paper's code lets mass beyond the edges go missing; we keep it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lsdist_jax.schedule.dist import empirical_pmf


def kernel_matrix(max_len: int, sigma: float) -> np.ndarray:
  """Row i: a Gaussian of std `sigma` centred at length i over 0..max_len, summing to 1.
  sigma <= 0 gives the identity (no smoothing). [L+1, L+1]."""
  if sigma <= 0:
    return np.eye(max_len + 1)
  lengths = np.arange(max_len + 1, dtype=np.float64)
  k = np.exp(-0.5 * ((lengths[None, :] - lengths[:, None]) / sigma) ** 2)
  return k / k.sum(axis=1, keepdims=True)


def kde_target(lengths: np.ndarray, max_len: int, sigma: float) -> np.ndarray:
  """Per prompt: the sampled lengths' histogram smoothed by a Gaussian kernel. [P, N] -> [P, L+1]."""
  return (empirical_pmf(lengths, max_len) @ kernel_matrix(max_len, sigma)).astype(np.float32)


def scalar_target(lengths: np.ndarray, which: str) -> np.ndarray:
  """max | mean | a quantile such as "0.9" of each prompt's samples. [P, N] -> [P]."""
  lengths = np.asarray(lengths, np.float64)
  if which == "max":
    return lengths.max(axis=1).astype(np.float32)
  if which == "mean":
    return lengths.mean(axis=1).astype(np.float32)
  try:
    q = float(which)
  except ValueError:
    raise ValueError(f"scalar_target {which!r}: expected 'max', 'mean' or a quantile") from None
  if not 0.0 <= q <= 1.0:
    raise ValueError(f"scalar_target quantile {q} is outside [0, 1]")
  return np.quantile(lengths, q, axis=1).astype(np.float32)


def kl_per_example(logits: jax.Array, target: jax.Array) -> jax.Array:
  """KL(target || softmax(logits)) of each example, summed over bins. [B, L+1] -> [B]."""
  log_q = jax.nn.log_softmax(logits, axis=-1)
  log_p = jnp.log(jnp.maximum(target, 1e-30))
  return jnp.sum(jnp.where(target > 0, target * (log_p - log_q), 0.0), axis=-1)


def pmf_mse_per_example(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Squared error of softmax(logits) against the target, summed over bins. -> [B]."""
  return jnp.sum((jax.nn.softmax(logits, axis=-1) - target) ** 2, axis=-1)


def scalar_mse_per_example(pred: jax.Array, target: jax.Array, max_len: int) -> jax.Array:
  """Squared error of a predicted length, in units of max_len. [B] -> [B]."""
  return (pred - target) ** 2 / float(max_len) ** 2


def per_example_loss(kind: str, loss: str, out: jax.Array, target: jax.Array,
                     max_len: int) -> jax.Array:
  """The training loss of each example for a predictor `kind` (distribution | scalar) and a
  distribution `loss` (kl | mse). -> [B]."""
  if kind == "scalar":
    return scalar_mse_per_example(out, target, max_len)
  if loss == "kl":
    return kl_per_example(out, target)
  if loss == "mse":
    return pmf_mse_per_example(out, target)
  raise ValueError(f"predictor.loss {loss!r}: expected 'kl' or 'mse'")
