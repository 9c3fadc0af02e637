"""Quantile recalibration of predicted length distributions (Kuleshov et al., 2018): a monotone map
R of the predicted CDF, fitted on held-out prompts so that P(length <= q-quantile) = q.

The map is fitted from probability-integral-transform values u = F(y) of held-out sampled lengths
y (randomised inside a length's own probability mass, since lengths are discrete): R is their
empirical CDF on a grid of knots, and the recalibrated CDF is R(F(t)).
"""

from __future__ import annotations

import numpy as np


def pit_values(pmf: np.ndarray, lengths: np.ndarray, seed: int = 0) -> np.ndarray:
  """Randomised PIT of sampled lengths under their prompt's pmf. pmf: [P, L+1], lengths: [P, N]
  -> [P * N] in [0, 1]; uniform when the samples follow the pmf."""
  cdf = np.cumsum(pmf, axis=1)
  below = cdf - pmf  # F(y - 1)
  y = np.clip(np.asarray(lengths), 0, pmf.shape[1] - 1)
  lo = np.take_along_axis(below, y, axis=1)
  hi = np.take_along_axis(cdf, y, axis=1)
  v = np.random.default_rng(seed).random(y.shape)
  return np.clip(lo + v * (hi - lo), 0.0, 1.0).ravel()


def fit_recalibration(pit: np.ndarray, knots: int = 11) -> dict:
  """R(g) = share of PIT values <= g on `knots` equally spaced g in [0, 1]; R(0) = 0, R(1) = 1.
  Returns {"grid": [...], "value": [...]} (JSON-ready; non-decreasing by construction)."""
  pit = np.asarray(pit, np.float64).ravel()
  if pit.size == 0:
    raise ValueError("recalibration needs held-out samples; got none")
  if knots < 2:
    raise ValueError(f"recalibration needs at least 2 knots, got {knots}")
  grid = np.linspace(0.0, 1.0, knots)
  value = np.searchsorted(np.sort(pit), grid, side="right") / pit.size
  value[0], value[-1] = 0.0, 1.0
  return {"grid": grid.tolist(), "value": np.maximum.accumulate(value).tolist()}


def apply_recalibration(pmf: np.ndarray, recalibration: dict | None) -> np.ndarray:
  """The pmf whose CDF is R(F). [P, L+1] -> [P, L+1], rows summing to 1."""
  if not recalibration:
    return pmf
  cdf = np.interp(np.cumsum(pmf, axis=1), recalibration["grid"], recalibration["value"])
  cdf[:, -1] = 1.0
  out = np.diff(cdf, axis=1, prepend=0.0)
  out = np.maximum(out, 0.0)
  return out / out.sum(axis=1, keepdims=True)
