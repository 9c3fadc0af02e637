"""Record files: local JSON/JSONL/parquet files, the sets shipped in this package (the Alpaca pool,
instructions_mix), and Alpaca's 52,002 records from the hub via HF `datasets` (or its cache).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import urllib.parse

from lsdist_jax.errors import BadFileError, MissingFileError

HERE = os.path.dirname(__file__)
SHIPPED = {
    "alpaca": os.path.join(HERE, "alpaca", "alpaca.jsonl.gz"),  # the first 102 (cleaned variant)
    "alpaca_more": os.path.join(HERE, "alpaca_more", "alpaca_more.jsonl.gz"),  # 7,349 more
    "instructions_mix": os.path.join(HERE, "instructions_mix", "instructions_mix.jsonl.gz"),
}
HUB_NAME = "tatsu-lab/alpaca"
POOL = ("alpaca", "alpaca_more")  # the local Alpaca pool: these files, in this order
POOL_ORIGIN = "the Alpaca pool shipped in lsdist_jax/data (alpaca + alpaca_more)"


def _read_jsonl(path: str) -> list[dict]:
  opener = gzip.open if path.endswith(".gz") else open
  records = []
  with opener(path, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise BadFileError(f"{path}:{number}: not valid JSON ({e})") from None
  return records


def read_local(path: str) -> list[dict]:
  """Records of a local .json (a list), .jsonl[.gz] or .parquet file."""
  if not os.path.isfile(path):
    raise MissingFileError(f"data file not found: {path}")
  if path.endswith((".jsonl", ".jsonl.gz")):
    return _read_jsonl(path)
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if not isinstance(data, list):
      raise BadFileError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
  raise BadFileError(f"{path}: unknown data format (expected .json, .jsonl, .jsonl.gz or "
                     ".parquet)")


def read_shipped(name: str = "alpaca") -> list[dict]:
  """The records of one set shipped in this package (a key of SHIPPED)."""
  if name not in SHIPPED:
    raise ValueError(f"no shipped data set {name!r}; shipped: {sorted(SHIPPED)}")
  return _read_jsonl(SHIPPED[name])


def read_pool() -> list[dict]:
  """The local Alpaca pool: the 102 shipped records, then the 7,349 of alpaca_more (7,451)."""
  return [record for name in POOL for record in read_shipped(name)]


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


def from_hub(name: str) -> tuple[list[dict], str]:
  """(records, origin) of a hub dataset's train split, online when the hub answers, else from
  the local HF cache only (no retries); raises when neither has it."""
  import datasets

  online = hub_reachable()
  previous = datasets.config.HF_HUB_OFFLINE
  datasets.config.HF_HUB_OFFLINE = not online
  try:
    records = datasets.load_dataset(name, split="train").to_list()
  finally:
    datasets.config.HF_HUB_OFFLINE = previous
  origin = f"hub dataset {name}" + ("" if online else " (local HF cache)")
  logging.info("data: %d records from the %s", len(records), origin)
  return records, origin


def alpaca_records() -> tuple[list[dict], str]:
  """(records, origin): the full 52,002 records from the hub or its cache; else, with a warning
  naming the fallback, the local pool of 7,451."""
  try:
    return from_hub(HUB_NAME)
  except Exception as e:  # noqa: BLE001 - unreachable, not cached, or no `datasets`
    records = read_pool()
    logging.warning("data: %s is neither reachable nor in the HF cache (%s); falling back to %s: "
                    "%d of its 52,002 records (see their PROVENANCE.md)", HUB_NAME,
                    type(e).__name__, POOL_ORIGIN, len(records))
    return records, f"{POOL_ORIGIN}, {len(records)} records ({HUB_NAME} not reachable or cached)"
