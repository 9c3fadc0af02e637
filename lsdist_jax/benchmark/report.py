"""The benchmark's report, built from its saved per-strategy results with no engine: each
strategy's median repeat, identical shares of responses, ratios to the reference strategies;
written as JSON, markdown and a bar plot.
"""

from __future__ import annotations

import os
from typing import Sequence

from lsdist_jax import paths, report
from lsdist_jax.benchmark.state import load_saved
from lsdist_jax.files import read_json, write_json, write_text


def compare_responses(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
  same = sum(list(a) == list(b) for a, b in zip(reference, other))
  return same / max(len(reference), 1)


def write_outputs(out: dict, workdir: str, name: str = "benchmark") -> dict:
  os.makedirs(workdir, exist_ok=True)
  files = {"json": write_json(out, os.path.join(workdir, f"{name}.json"))}
  md = [f"# {name}", "", f"- device: {out['device']}", f"- date: {out['date']}",
        f"- model: {out['model']}", f"- requests: {out['prompts']}",
        f"- KV budget (tokens): {out['kv_budget_tokens']} ({out.get('kv_budget', '')})",
        f"- length replay: {out['replay']}",
        "", report.markdown_table(out["rows"])]
  files["md"] = write_text(os.path.join(workdir, f"{name}.md"), "\n".join(md) + "\n")
  files["png"] = report.plot_benchmark(out["rows"], os.path.join(workdir, f"{name}.png"),
                                       title=f"{out['model']} on {out['device']}")
  return files


def report_from_state(workdir: str, out_name: str = "benchmark", write: bool = True,
                      allow_missing: bool = False) -> dict:
  """The benchmark's report from its saved per-strategy results, with no engine: each
  strategy's median repeat, identical shares against the first strategy's responses, ratios
  of samples/s to vanilla:16 (`speedup`), vanilla:best and the oracles. Missing results are an
  error unless allow_missing (then listed in "not_run")."""
  directory = paths.benchmark_state(workdir, out_name)
  meta_path = os.path.join(directory, "meta.json")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"no benchmark results in {directory} (missing meta.json)")
  meta = read_json(meta_path, "benchmark meta")
  names, results, missing = meta["strategies"], {}, []
  for repeat in range(int(meta["repeats"])):
    reference = load_saved(directory, names[0], repeat)
    for name in names:
      saved = load_saved(directory, name, repeat)
      if saved is None:
        missing.append(f"{name} (repeat {repeat})")
        continue
      row, tokens = saved
      row["identical_share"] = (compare_responses(reference[1], tokens)
                                if reference is not None else None)
      results.setdefault(name, []).append(row)
  if missing and not allow_missing:
    raise ValueError(f"{directory} has no saved result for {', '.join(missing)}: run the "
                     "benchmark (it resumes) before reporting")
  rows = []
  for name in names:
    if name not in results:
      continue
    runs = results[name]
    row = dict(sorted(runs, key=lambda r: r["samples_per_s"])[len(runs) // 2])  # median repeat
    row["repeats"] = len(runs)
    rows.append(row)
  report.add_ratios(rows, {"vanilla:16": "speedup", **report.RATIO_REFERENCES})
  out = {k: meta[k] for k in ("device", "date", "model", "prompts", "distinct_prompts",
                              "kv_budget_tokens", "replay", "max_seq_len", "cost_model")}
  out["kv_budget"] = meta.get("kv_budget", "")
  out["requests"] = meta["prompts"]  # one request = one prompt with its own seed
  out["warm_start"] = bool(meta.get("warm_start", False))  # calls timed with programs ready
  out["rows"] = rows
  if missing:
    out["not_run"] = missing
  if write:
    out["files"] = write_outputs(out, workdir, out_name)
  return out
