"""Evaluation of length predictors against each prompt's sampled lengths: KL, Wasserstein-1, CRPS,
calibration of quantiles, MAE of the median and of the max; the marginal baseline; plots.

KL is KL(KDE target || predicted) with the training sigma. The predicted max is the 0.99 quantile.
A scalar prediction is a point mass: W1 and CRPS apply (both become mean |y - s|), KL and
quantile coverage do not (null).
"""

from __future__ import annotations

import numpy as np

from lsdist_jax.predictor.losses import kde_target
from lsdist_jax.schedule.dist import cdf, empirical_pmf, quantile

COVERAGE_QS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_Q = 0.99


def kl(target: np.ndarray, pred: np.ndarray) -> float:
  pred = np.maximum(pred, 1e-12)
  pos = target > 0
  return float(np.mean(np.sum(np.where(pos, target * (np.log(np.where(pos, target, 1.0))
                                                        - np.log(pred)), 0.0), axis=1)))


def wasserstein1(pred: np.ndarray, lengths: np.ndarray) -> float:
  """Mean over prompts of sum_t |F_pred(t) - F_samples(t)|."""
  emp = empirical_pmf(lengths, pred.shape[1] - 1)
  return float(np.mean(np.abs(cdf(pred) - cdf(emp)).sum(axis=1)))


def crps(pred: np.ndarray, lengths: np.ndarray) -> float:
  """Mean over prompts and samples of sum_t (F_pred(t) - 1[y <= t])^2."""
  f = cdf(pred)  # [P, L+1]
  t = np.arange(pred.shape[1])
  total = 0.0
  for j in range(lengths.shape[1]):
    step = (t[None, :] >= np.minimum(lengths[:, j], pred.shape[1] - 1)[:, None])
    total += np.sum((f - step) ** 2, axis=1)
  return float(np.mean(total / lengths.shape[1]))


def coverage(pred: np.ndarray, lengths: np.ndarray, qs=COVERAGE_QS) -> dict[str, float]:
  """For each q: the share of sampled lengths at or below the predicted q-quantile."""
  return {f"{q:.1f}": float(np.mean(lengths <= quantile(pred, q)[:, None])) for q in qs}


def coverage_interval(pred: np.ndarray, lengths: np.ndarray, qs=(0.5, 0.8, 0.9),
                      draws: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
  """A bootstrap interval of each coverage figure over prompts (prompts resampled with
  replacement, each with all its samples): how much the figure owes to which prompts were held
  out. With few test prompts it is wide. {q: [lo, hi]}."""
  if draws < 1:
    raise ValueError(f"the bootstrap needs at least one draw, got {draws}")
  rng = np.random.default_rng(seed)
  n = pred.shape[0]
  per_prompt = np.stack([np.mean(lengths <= quantile(pred, q)[:, None], axis=1)
                         for q in qs])  # [len(qs), P]
  boot = np.concatenate([per_prompt[:, rng.integers(0, n, size=(min(256, draws - d), n))]
                         .mean(axis=2) for d in range(0, draws, 256)], axis=1)  # [len(qs), draws]
  out = {}
  for q, q_boot in zip(qs, boot):
    lo, hi = np.quantile(q_boot, [(1 - level) / 2, (1 + level) / 2])
    out[f"{q:.1f}"] = [round(float(lo), 4), round(float(hi), 4)]
  return out


def evaluate_pmf(name: str, pred: np.ndarray, lengths: np.ndarray, sigma: float,
                 draws: int = 2000) -> dict:
  """One table row of a predicted pmf [P, L+1] against each prompt's samples lengths [P, N]."""
  if pred.shape[0] != lengths.shape[0] or pred.shape[0] == 0:
    raise ValueError(f"{name}: {pred.shape[0]} predictions for {lengths.shape[0]} prompts; "
                     "expected one per prompt, and at least one")
  max_len = pred.shape[1] - 1
  target = kde_target(lengths, max_len, sigma)
  cov = coverage(pred, lengths)
  return {"model": name, "kl": kl(target, pred), "w1": wasserstein1(pred, lengths),
          "crps": crps(pred, lengths), "coverage": {k: cov[k] for k in ("0.5", "0.8", "0.9")},
          "coverage_all": cov, "coverage_ci": coverage_interval(pred, lengths, draws=draws),
          "mae_median": float(np.mean(np.abs(quantile(pred, 0.5)
                                             - np.median(lengths, axis=1)))),
          "mae_max": float(np.mean(np.abs(quantile(pred, MAX_Q) - lengths.max(axis=1))))}


def evaluate_scalar(name: str, pred: np.ndarray, lengths: np.ndarray) -> dict:
  err = np.abs(lengths - pred[:, None])
  return {"model": name, "kl": None, "w1": float(err.mean()), "crps": float(err.mean()),
          "coverage": {"0.5": None, "0.8": None, "0.9": None}, "coverage_all": None,
          "coverage_ci": None,
          "mae_median": float(np.mean(np.abs(pred - np.median(lengths, axis=1)))),
          "mae_max": float(np.mean(np.abs(pred - lengths.max(axis=1))))}


def marginal_pmf(train_lengths: np.ndarray, max_len: int) -> np.ndarray:
  """The training set's pooled length distribution: the trivial baseline for every prompt."""
  return empirical_pmf(train_lengths.reshape(1, -1), max_len)[0]


def reliability_plot(rows: list[dict], path: str) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(4, 4))
  ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
  for row in rows:
    if row.get("coverage_all"):
      qs = sorted(float(q) for q in row["coverage_all"])
      ax.plot(qs, [row["coverage_all"][f"{q:.1f}"] for q in qs], "o-", label=row["model"])
  ax.set_xlabel("predicted quantile q")
  ax.set_ylabel("share of samples <= predicted q-quantile")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def example_plot(pred: np.ndarray, lengths: np.ndarray, path: str, n: int = 6) -> str:
  """Predicted pmfs against the sampled histograms of a few test prompts."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = np.linspace(0, pred.shape[0] - 1, min(n, pred.shape[0])).astype(int)
  fig, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 2.6), squeeze=False)
  bins = np.arange(pred.shape[1])
  for ax, r in zip(axes[0], rows):
    ax.hist(lengths[r], bins=30, density=True, alpha=0.5, label="samples")
    ax.plot(bins, pred[r], label="predicted")
    ax.set_xlim(0, max(int(lengths[r].max() * 1.5), 10))
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
