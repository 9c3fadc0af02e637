"""What the generate job's GPU measurement scripts share (scripts/openai_batch_gpu.py,
scripts/generate_job_gpu.py): an experiment config read as --config=path:arg reads it, JSONL
records written whole, and docs/results/generate_job.json merged rather than overwritten.

generate_job.json is one object (issue 18): {"device", "date", "command", "rows": [...],
"plain_batching": [...], "notes"}. Each script replaces only the rows it produces and keeps the
others'; an older file that is a bare list of rows is read as those rows.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
RESULTS = os.path.join(REPO, "docs", "results", "generate_job.json")
TOP_FIELDS = ("device", "date", "command", "rows", "plain_batching", "notes")  # in this order


def load_config_file(spec: str):
  """An experiment config from `path[:arg]`, as --config=path:arg reads it."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def write_lines(path: str, records: Sequence[dict]) -> None:
  """`records` as JSONL (one JSON object a line, UTF-8 as is), written whole."""
  from lsdist_jax.files import write_lines as write_text_lines

  write_text_lines(path, [json.dumps(x, ensure_ascii=False) for x in records])


def read_results(path: str) -> dict:
  """The results object at `path` ({"rows": []} when there is none yet)."""
  if not os.path.isfile(path):
    return {"rows": []}
  from lsdist_jax.files import read_json

  data = read_json(path, "results file")
  return {"rows": data} if isinstance(data, list) else dict(data)


def merge_results(path: str, rows: Sequence[dict] = (),
                  same_row: Callable[[dict, dict], bool] | None = None,
                  plain_batching: Sequence[dict] | None = None, **fields) -> dict:
  """Writes `rows` into the results object at `path` and returns it: an old row for which
  `same_row(old, new)` holds for some new row is replaced (none: every row is appended);
  `plain_batching` entries replace those of the same `batch`; `fields` (device, date, command,
  notes, ...) are set at the top. Everything else already there is kept."""
  from lsdist_jax.files import write_json

  data = read_results(path)
  old = [r for r in data.get("rows", [])
         if same_row is None or not any(same_row(r, new) for new in rows)]
  data["rows"] = old + list(rows)
  if plain_batching is not None:
    batches = {int(p["batch"]) for p in plain_batching}
    kept = [p for p in data.get("plain_batching", []) if int(p.get("batch", -1)) not in batches]
    data["plain_batching"] = sorted(kept + list(plain_batching), key=lambda p: int(p["batch"]))
  data.update(fields)
  order = [k for k in TOP_FIELDS if k in data] + [k for k in data if k not in TOP_FIELDS]
  data = {k: data[k] for k in order}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_json(data, path)
  return data
