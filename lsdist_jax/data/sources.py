"""Data sources by name (`data.source`): `alpaca` (hub, else the shipped pool), `alpaca_local`,
`instructions_mix` (filtered by `data.datasets`) or a local file; their prompts, picked by a slice.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from lsdist_jax.data import alpaca
from lsdist_jax.data.prompts import Prompt, parse_slice, prompt_text, select
from lsdist_jax.errors import ConfigError, InputError

ALPACA = ("alpaca", alpaca.HUB_NAME)  # the 52,002 records where reachable, else the local pool
ALPACA_LOCAL = "alpaca_local"  # the local pool of 7,451 always (offline, reproducible)
MIX = "instructions_mix"
NAMES = (*ALPACA, ALPACA_LOCAL, MIX)
FILE_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".parquet")


@dataclasses.dataclass(frozen=True)
class Source:
  """The prompts of a data source in source order (each `index` its position in the source, also
  where a `data.datasets` filter or a repeated prompt leaves gaps), and where they came from."""
  name: str  # data.source as configured
  origin: str  # where the records were read: a hub dataset, a shipped set, a file path
  datasets: tuple[str, ...]  # the data.datasets filter (empty: every record)
  prompts: list[Prompt]

  def pick(self, seed: int, spec: str, stratify: bool = False) -> list[Prompt]:
    """The prompts of the seeded shuffle's slice `spec` ("a:b"), in that order. With `stratify`,
    the shuffle is stratified by `dataset`: each dataset's prompts are shuffled apart and
    interleaved evenly, so that every slice from the start holds each dataset in proportion."""
    if not stratify:
      return [self.prompts[int(i)] for i in select(len(self.prompts), int(seed), spec)]
    order = stratified_order([p.dataset for p in self.prompts], int(seed))
    picked = [self.prompts[i] for i in order][parse_slice(spec)]
    if not picked:
      raise ConfigError(f"data slice {spec!r} selects no prompts out of {len(self.prompts)}")
    return picked

  def describe(self) -> dict:
    """What a store's meta.json records about its source."""
    return {"source": self.name, "origin": self.origin, "datasets": list(self.datasets),
            "prompts": len(self.prompts)}


def stratified_order(datasets: list[str], seed: int) -> list[int]:
  """A permutation of range(n) that shuffles each dataset's members (seeded) and interleaves
  them evenly: member r of a dataset of size m sits at (r + 1/2) / m of the way."""
  import numpy as np

  rng = np.random.default_rng(seed)
  where = []
  for name in sorted(set(datasets)):
    members = [i for i, d in enumerate(datasets) if d == name]
    for rank, i in enumerate(rng.permutation(members)):
      where.append(((rank + 0.5) / len(members), name, int(i)))
  return [i for _, _, i in sorted(where)]


def parse_datasets(value) -> tuple[str, ...]:
  """data.datasets as names: a tuple of names, or one string of comma-separated names."""
  items = [value] if isinstance(value, str) else list(value or ())
  names = []
  for item in items:
    if not isinstance(item, str):
      raise ConfigError(f"data.datasets holds {item!r}; expected dataset names (strings)")
    names += [part.strip() for part in item.split(",") if part.strip()]
  return tuple(names)


def read_source(source: str = "alpaca") -> tuple[list[dict], str]:
  """(records in source order, origin) of `source`: a name of NAMES, a local file, or another
  hub dataset name (read with HF `datasets` when reachable or cached)."""
  if source in ALPACA:
    return alpaca.alpaca_records()
  if source == ALPACA_LOCAL:
    records = alpaca.read_pool()
    return records, f"{alpaca.POOL_ORIGIN}, {len(records)} records"
  if source == MIX:
    return alpaca.read_shipped(MIX), "lsdist_jax/data/instructions_mix (shipped)"
  if os.path.exists(source) or source.endswith(FILE_SUFFIXES):
    return alpaca.read_local(source), os.path.abspath(source)
  try:
    return alpaca.from_hub(source)
  except Exception as e:  # noqa: BLE001 - unreachable, not cached, or no such dataset
    raise ConfigError(f"data.source={source!r} is not a local file ({', '.join(FILE_SUFFIXES)}), "
                      f"not one of {', '.join(NAMES)}, and not a hub dataset that is reachable "
                      f"or cached ({type(e).__name__}: {e})") from e


def load_records(source: str = "alpaca") -> list[dict]:
  """The records of `source` in source order (see `read_source`), unfiltered."""
  return read_source(source)[0]


def filter_datasets(records: list[dict], names: tuple[str, ...], source: str) -> list[int]:
  """Positions of the records whose `dataset` is one of `names`: an exact value (`dolly15k`) or
  a family (`alpaca_eval` matches `alpaca_eval/koala`); every position for no names."""
  if not names:
    return list(range(len(records)))
  values = {r.get("dataset") for r in records}
  if None in values or not all(isinstance(v, str) for v in values):
    raise ConfigError(f"data.datasets={list(names)} filters records by their 'dataset' field, "
                      f"which the records of data.source={source!r} lack")
  valid = values | {v.split("/")[0] for v in values}
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise ConfigError(f"data.datasets: unknown dataset(s) {unknown} for data.source={source!r}; "
                      f"valid: {', '.join(sorted(valid))}")
  return [i for i, r in enumerate(records)
          if any(r["dataset"] == n or r["dataset"].startswith(n + "/") for n in names)]


def open_source(data_config) -> Source:
  """Every usable prompt of `data.source` (filtered by `data.datasets`); a prompt text that
  repeats keeps its first record only (a prompt is its text), with a warning."""
  name = str(data_config.source)
  names = parse_datasets(data_config.get("datasets", ()))
  records, origin = read_source(name)
  prompts, seen, repeated = [], set(), 0
  for i in filter_datasets(records, names, name):
    try:
      text = prompt_text(records[i])
    except ValueError as e:
      raise InputError(f"{origin}: record {i}: {e}") from None
    prompt = Prompt(i, text, str(records[i].get("dataset") or ""))
    if prompt.key in seen:
      repeated += 1
      continue
    seen.add(prompt.key)
    prompts.append(prompt)
  if repeated:
    logging.warning("data: %d records of %s repeat an earlier prompt text; each prompt is kept "
                    "once", repeated, origin)
  if not prompts:
    raise ConfigError(f"data.source={name!r} (datasets {list(names)}) holds no prompts")
  return Source(name, origin, names, prompts)


def load_prompts(data_config) -> list[Prompt]:
  """The prompts a config names: `data.source` (and `data.datasets`), shuffled with
  `data.shuffle_seed`, sliced with `data.slice`, in that order."""
  source = open_source(data_config)
  return source.pick(int(data_config.shuffle_seed), data_config.slice,
                     bool(data_config.get("stratify_by_dataset", False)))
