"""Alpaca records: from the hub name via HF `datasets`, a local JSON/JSONL/parquet file, or the copy
shipped in this package (used, with a warning, when the hub is neither reachable nor cached).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import urllib.parse

SHIPPED = os.path.join(os.path.dirname(__file__), "alpaca", "alpaca.jsonl.gz")
HUB_NAME = "tatsu-lab/alpaca"


def _read_jsonl(path: str) -> list[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  records = []
  with opener(path, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
  return records


def read_local(path: str) -> list[dict]:
  """Records of a local .json (a list), .jsonl[.gz] or .parquet file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file not found: {path}")
  if path.endswith((".jsonl", ".jsonl.gz")):
    return _read_jsonl(path)
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if not isinstance(data, list):
      raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
  raise ValueError(f"{path}: unknown data format (expected .json, .jsonl, .jsonl.gz or .parquet)")


def read_shipped() -> list[dict]:
  return _read_jsonl(SHIPPED)


def hub_reachable(timeout: float = 3.0) -> bool:
  """Whether the HF hub endpoint answers a TCP connect within `timeout` seconds."""
  if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
    return False
  try:
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    with socket.create_connection((host, 443), timeout=timeout):
      return True
  except Exception:  # noqa: BLE001 - any failure means "not reachable"
    return False


def _from_hub(name: str, online: bool) -> list[dict]:
  import datasets

  previous = datasets.config.HF_HUB_OFFLINE
  datasets.config.HF_HUB_OFFLINE = not online  # offline: the local cache only, no retries
  try:
    return datasets.load_dataset(name, split="train").to_list()
  finally:
    datasets.config.HF_HUB_OFFLINE = previous


def load_records(source: str = HUB_NAME) -> list[dict]:
  """Records in dataset order. `source` is a local file path or a hub dataset name."""
  if os.path.exists(source) or source.endswith((".json", ".jsonl", ".jsonl.gz", ".parquet")):
    return read_local(source)
  online = hub_reachable()
  try:
    records = _from_hub(source, online)
    logging.info("data: %d records of %s from the hub%s", len(records), source,
                 "" if online else " cache")
    return records
  except Exception as e:  # noqa: BLE001 - unreachable, not cached, or no such dataset
    if source != HUB_NAME:
      raise ValueError(f"could not load dataset {source!r} from the hub or its cache: {e}") from e
    records = read_shipped()
    logging.warning("data: %s is not reachable or cached (%s); using the copy shipped in "
                    "lsdist_jax/data/alpaca (%d records, see its PROVENANCE.md)", source,
                    type(e).__name__, len(records))
    return records
