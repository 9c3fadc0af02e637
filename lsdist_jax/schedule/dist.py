"""Length-distribution maths for planning: CDFs, quantiles, conditional tails, and the expected
decode steps of a batch from the product of its members' CDFs. numpy only.

Steps convention: a row of response length L needs L decode iterations after prefill (the last
one samples EOS); a batch runs until its longest member ends, or `cap` iterations at most, so its
steps are min(max_i L_i, cap) and E[steps] = sum_{t < cap} (1 - prod_i F_i(t)).
"""

from __future__ import annotations

import numpy as np

_TINY = 1e-300


def normalize(pmf: np.ndarray) -> np.ndarray:
  """Rows scaled to sum to 1 (negative entries clipped). pmf: [n, M+1]."""
  pmf = np.clip(np.asarray(pmf, np.float64), 0.0, None)
  total = pmf.sum(axis=-1, keepdims=True)
  if (total <= 0).any():
    raise ValueError("a length pmf has no mass")
  return pmf / total


def truncate(pmf: np.ndarray, caps) -> np.ndarray:
  """The pmf of min(L, cap) per row: mass beyond each row's cap moved onto the cap (caps past the
  last bin change nothing). pmf: [n, M+1], caps: [n] -> [n, M+1]."""
  pmf = np.asarray(pmf)
  bins = pmf.shape[1]
  caps = np.minimum(np.broadcast_to(np.asarray(caps, np.int64), pmf.shape[:1]), bins - 1)
  over = np.arange(bins)[None, :] >= caps[:, None]
  folded = np.where(over, 0.0, pmf)
  folded[np.arange(pmf.shape[0]), caps] = np.where(over, pmf, 0.0).sum(axis=1)
  return folded


def cdf(pmf: np.ndarray) -> np.ndarray:
  """F(t) = P(L <= t). [n, M+1] -> [n, M+1], last column 1."""
  out = np.cumsum(pmf, axis=-1)
  out[..., -1] = 1.0
  return np.minimum(out, 1.0)


def survival(pmf: np.ndarray) -> np.ndarray:
  """P(L > t). [n, M+1]."""
  return 1.0 - cdf(pmf)


def quantile(pmf: np.ndarray, q) -> np.ndarray:
  """Smallest length whose CDF reaches q (scalar or [n]). -> [n] int."""
  return quantile_of_cdf(cdf(pmf), q)


def quantile_of_cdf(f: np.ndarray, q) -> np.ndarray:
  """`quantile` from the CDF (`cdf(pmf)`), for many quantiles of one pmf."""
  q = np.broadcast_to(np.asarray(q, np.float64), f.shape[:-1])
  return np.minimum((f < q[..., None] - 1e-12).sum(axis=-1), f.shape[-1] - 1)


def mean(pmf: np.ndarray) -> np.ndarray:
  return pmf @ np.arange(pmf.shape[-1], dtype=np.float64)


def conditional_above(pmf: np.ndarray, above: np.ndarray) -> np.ndarray:
  """The pmf of L given L > above[i], renormalised; rows sum to 1. Where the predicted tail is
  empty (the row outlived its prediction), the mass goes to above + 1 (or M)."""
  pmf = np.asarray(pmf, np.float64)
  n, bins = pmf.shape
  above = np.asarray(above, np.int64).reshape(n)
  keep = np.arange(bins)[None, :] > above[:, None]
  out = np.where(keep, pmf, 0.0)
  mass = out.sum(axis=-1)
  empty = mass <= 1e-12
  if empty.any():
    rows = np.nonzero(empty)[0]
    out[rows] = 0.0
    out[rows, np.minimum(above[rows] + 1, bins - 1)] = 1.0
    mass = out.sum(axis=-1)
  return out / mass[:, None]


def shift_left(pmf: np.ndarray, by: np.ndarray) -> np.ndarray:
  """pmf of L - by[i] (what remains after `by` tokens), mass below 0 folded into 0."""
  n, bins = pmf.shape
  idx = np.arange(bins)[None, :] + np.asarray(by, np.int64)[:, None]
  shifted = np.where(idx < bins, np.take_along_axis(pmf, np.minimum(idx, bins - 1), axis=1), 0.0)
  below = np.where(np.arange(bins)[None, :] < np.asarray(by)[:, None], pmf, 0.0).sum(axis=1)
  shifted[:, 0] += below
  return shifted


def log_cdf(pmf: np.ndarray) -> np.ndarray:
  return np.log(np.maximum(cdf(pmf), _TINY))


def batch_max_cdf(pmfs: np.ndarray) -> np.ndarray:
  """CDF of the longest member's length: prod_i F_i(t). [k, M+1] -> [M+1]."""
  return np.exp(log_cdf(pmfs).sum(axis=0))


def batch_max_pmf(pmfs: np.ndarray) -> np.ndarray:
  f = batch_max_cdf(pmfs)
  return np.diff(f, prepend=0.0)


def expected_steps(pmfs: np.ndarray, cap: int) -> float:
  """E[min(max_i L_i, cap)] = sum_{t < cap} (1 - prod_i F_i(t))."""
  f = batch_max_cdf(pmfs)
  cap = int(min(cap, f.shape[0]))
  return float(np.sum(1.0 - f[:cap]))


def tail_work(pmf: np.ndarray, cap: np.ndarray | int) -> np.ndarray:
  """Per row E[(L - cap)^+]: tokens left for recovery. [n, M+1] -> [n]."""
  s = survival(pmf)
  c = np.broadcast_to(np.asarray(cap, np.int64), pmf.shape[:-1])
  csum = np.concatenate([np.zeros(pmf.shape[:-1] + (1,)), np.cumsum(s, axis=-1)], axis=-1)
  total = csum[..., -1]
  return total - np.take_along_axis(csum, np.minimum(c, pmf.shape[-1])[..., None], -1)[..., 0]


def fail_prob(pmf: np.ndarray, cap: np.ndarray | int) -> np.ndarray:
  """P(L > cap) per row. [n]."""
  s = survival(pmf)
  c = np.broadcast_to(np.asarray(cap, np.int64), pmf.shape[:-1])
  return np.where(c >= pmf.shape[-1] - 1, 0.0,
                  np.take_along_axis(s, np.minimum(c, pmf.shape[-1] - 1)[..., None], -1)[..., 0])


def empirical_pmf(lengths: np.ndarray, max_len: int) -> np.ndarray:
  """Per-prompt histogram of sampled lengths, normalised. lengths: [P, N] -> [P, max_len + 1]
  (lengths above max_len count in the last bin)."""
  lengths = np.clip(np.asarray(lengths, np.int64), 0, max_len)
  p, n = lengths.shape
  pmf = np.zeros((p, max_len + 1), np.float64)
  np.add.at(pmf, (np.repeat(np.arange(p), n), lengths.reshape(-1)), 1.0)
  return pmf / max(n, 1)


def point_masses(lengths: np.ndarray, max_len: int) -> np.ndarray:
  """One-hot pmfs of known lengths. [n] -> [n, max_len + 1]."""
  lengths = np.clip(np.asarray(lengths, np.int64), 0, max_len)
  out = np.zeros((lengths.size, max_len + 1))
  out[np.arange(lengths.size), lengths] = 1.0
  return out
