"""Prompt text as the paper builds it, the seeded shuffle + "a:b" slices that pick prompts, and the
train/valid/test split by prompt (a seeded hash of the dataset index: adding prompts moves none).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Prompt:
  index: int  # position of the record in the original dataset
  text: str  # the user message; the engine applies the chat format


def prompt_text(record: dict) -> str:
  """The prompt of a record, the one rule everywhere (collection, benchmark, generate job): a
  string `prompt`, or Alpaca's string `instruction` plus "\\n" + `input` when input is not
  empty. A record with both fields is refused (which one is meant is not ours to guess)."""
  has_prompt, has_instruction = "prompt" in record, "instruction" in record
  if has_prompt and has_instruction:
    raise ValueError("has both 'prompt' and 'instruction'; keep one")
  if has_instruction:
    extra = record.get("input") or ""
    if not isinstance(record["instruction"], str) or not isinstance(extra, str):
      raise ValueError("'instruction' and 'input' must be strings")
    return record["instruction"] + ("\n" + extra if extra else "")
  if has_prompt:
    if not isinstance(record["prompt"], str):
      raise ValueError("'prompt' must be a string")
    return record["prompt"]
  raise ValueError("needs a string field 'prompt' or 'instruction'")


def parse_slice(spec: str) -> slice:
  """"12048:20240", ":100", "5:", ":" -> slice (steps are not allowed)."""
  parts = spec.split(":")
  if len(parts) != 2:
    raise ValueError(f"data slice {spec!r} must look like 'start:stop'")
  try:
    start, stop = (int(p) if p.strip() else None for p in parts)
  except ValueError:
    raise ValueError(f"data slice {spec!r} must hold integers, like '12048:20240'") from None
  return slice(start, stop)


def shuffled_order(n: int, seed: int) -> np.ndarray:
  """A permutation of range(n), fixed by the seed."""
  return np.random.default_rng(seed).permutation(n)


def select(n: int, seed: int, spec: str) -> np.ndarray:
  """Dataset indices picked by shuffling range(n) with `seed` and slicing with `spec`.

  A slice reaching past the data is clamped with a warning (the shipped copy is small); a slice
  that selects nothing is an error."""
  sl = parse_slice(spec)
  order = shuffled_order(n, seed)
  start = sl.start if sl.start is not None else 0
  stop = sl.stop if sl.stop is not None else n
  if start >= 0 and stop > n:
    logging.warning("data slice %r reaches past the %d records available; clamped", spec, n)
  picked = order[sl]
  if picked.size == 0:
    raise ValueError(f"data slice {spec!r} selects no prompts out of {n} records")
  return picked


def _mix(x: np.ndarray) -> np.ndarray:
  """A 64-bit integer hash (splitmix64 finaliser), vectorised."""
  x = x.astype(np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
  return x


def assign_split(indices, seed: int, fractions=(0.8, 0.1, 0.1)) -> np.ndarray:
  """'train' | 'valid' | 'test' per dataset index, by a seeded hash of the index alone."""
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (3,) or (fractions < 0).any() or abs(fractions.sum() - 1.0) > 1e-6:
    raise ValueError(f"split fractions must be three non-negative numbers summing to 1, "
                     f"got {tuple(fractions.tolist())}")
  indices = np.asarray(indices, np.int64)
  with np.errstate(over="ignore"):
    key = _mix(indices.astype(np.uint64) + _mix(np.asarray([seed], np.uint64))[0])
  u = (key >> np.uint64(11)).astype(np.float64) / float(1 << 53)
  edges = np.cumsum(fractions)
  which = np.searchsorted(edges[:2], u, side="right")
  return np.asarray(SPLITS, dtype=object)[which].astype(str)


def load_prompts(data_config) -> list[Prompt]:
  """The prompts a config names: records from `data.source`, shuffled with `data.shuffle_seed`,
  sliced with `data.slice`, in that order."""
  from lsdist_jax.data.alpaca import load_records

  records = load_records(data_config.source)
  picked = select(len(records), int(data_config.shuffle_seed), data_config.slice)
  return [Prompt(int(i), prompt_text(records[int(i)])) for i in picked]
