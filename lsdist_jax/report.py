"""Reports: summary text, markdown/JSON tables and matplotlib plots (PNG) for collection and benchmarks.

Pure presentation: it reads results and stores, computes nothing the other modules decide.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def collect_summary_text(summary: dict) -> str:
  keys = ["prompts", "samples", "mean_len", "p50", "p90", "max_len", "share_capped",
          "new_prompts", "new_tokens", "tokens_per_s", "seconds", "compilations", "store"]
  width = max(len(k) for k in keys)
  lines = ["collection summary"]
  for key in keys:
    if key in summary:
      value = summary[key]
      if isinstance(value, float):
        value = f"{value:,.3f}"
      lines.append(f"  {key:<{width}}  {value}")
  return "\n".join(lines)


def plot_collection(store_path: str, out_dir: str, n_prompts: int = 6) -> list[str]:
  """Length histograms of a few prompts and the histogram of per-prompt spread (PNG)."""
  from lsdist_jax.store import LengthStore

  data = LengthStore.open(store_path).read()
  lengths = data["lengths"]
  if lengths.shape[0] == 0:
    return []
  plt = _pyplot()
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  pick = np.linspace(0, lengths.shape[0] - 1, min(n_prompts, lengths.shape[0])).astype(int)
  fig, axes = plt.subplots(1, len(pick), figsize=(3 * len(pick), 2.6), squeeze=False)
  top = int(lengths.max()) + 1
  for ax, i in zip(axes[0], pick):
    ax.hist(lengths[i], bins=np.linspace(0, top, 30), color="tab:blue")
    ax.set_title(f"prompt {int(data['index'][i])}", fontsize=9)
    ax.set_xlabel("response tokens")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "length_distributions.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  spread = np.percentile(lengths, 90, axis=1) - np.percentile(lengths, 10, axis=1)
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.hist(spread, bins=30, color="tab:orange")
  ax.set_xlabel("per-prompt spread of sampled lengths (p90 - p10, tokens)")
  ax.set_ylabel("prompts")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "length_spread.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths


BENCH_COLUMNS = [("strategy", "strategy"), ("samples_per_s", "samples/s"),
                 ("samples_per_s_end_to_end", "samples/s with compile"),
                 ("tokens_per_s", "tokens/s"), ("effective_token_ratio", "effective"),
                 ("speedup", "× vanilla:16"), ("x_vanilla_best", "× vanilla:best"),
                 ("x_oracle", "× oracle"), ("x_oracle_continuous", "× oracle-continuous"),
                 ("seconds", "seconds"),
                 ("expected_seconds", "expected s"), ("seconds_total", "total s"),
                 ("seconds_predict", "predict s"), ("seconds_plan", "plan s"),
                 ("seconds_generate", "generate s"), ("seconds_recover", "recover s"),
                 ("seconds_compile", "compile s"), ("batches", "batches"),
                 ("recovery_batches", "recovery batches"), ("compilations", "compiles"),
                 ("peak_kv_tokens", "peak KV tokens"), ("identical_share", "identical")]


# reference strategy -> the row key of samples/s as a ratio to it
RATIO_REFERENCES = {"vanilla:best": "x_vanilla_best", "oracle": "x_oracle",
                    "oracle-continuous": "x_oracle_continuous"}


def add_ratios(rows: Sequence[dict], references: dict[str, str] = RATIO_REFERENCES) -> None:
  """Each row's samples/s as a ratio to each reference strategy (in place), under the key
  `references` gives it; None where the reference did not run."""
  by_name = {r["strategy"]: r["samples_per_s"] for r in rows}
  for row in rows:
    for ref, key in references.items():
      base = by_name.get(ref)
      row[key] = row["samples_per_s"] / base if base else None


def markdown_table(rows: Sequence[dict], columns=BENCH_COLUMNS) -> str:
  present = [(k, title) for k, title in columns if any(k in r for r in rows)]
  head = "| " + " | ".join(t for _, t in present) + " |"
  sep = "| " + " | ".join("---" if k == "strategy" else "---:" for k, _ in present) + " |"
  body = []
  for row in rows:
    cells = []
    for key, _ in present:
      value = row.get(key, "")
      if value is None:
        value = "—"
      elif isinstance(value, float):
        value = f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
      cells.append(str(value))
    body.append("| " + " | ".join(cells) + " |")
  return "\n".join([head, sep] + body)


def plot_benchmark(rows: Sequence[dict], path: str, title: str = "") -> str:
  plt = _pyplot()
  names = [r["strategy"] for r in rows]
  values = [r["samples_per_s"] for r in rows]
  fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows)), 3.2))
  bars = ax.bar(range(len(rows)), values, color="tab:green")
  for bar, value in zip(bars, values):
    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{value:.1f}", ha="center",
            va="bottom", fontsize=8)
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("samples/s")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
