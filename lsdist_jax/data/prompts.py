"""A prompt's text (the one rule), its identity (a hash of that text), the seeded shuffle + "a:b"
slices that pick prompts, and the train/valid/test split by a seeded hash of the prompt's identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re

import numpy as np

from lsdist_jax.errors import ConfigError

SPLITS = ("train", "valid", "test")
KEY_DIGITS = 32  # hex digits of a prompt key: the first 128 bits of the text's sha256
_KEY = re.compile(f"[0-9a-f]{{{KEY_DIGITS}}}")


def prompt_key(text: str) -> str:
  """A prompt's identity: the first 128 bits of the sha256 of its UTF-8 text, as 32 hex digits.
  Stores, splits and resume checks all know a prompt by this key, never by its position."""
  if not isinstance(text, str):
    raise TypeError(f"prompt_key takes the prompt's text (a str), got {type(text).__name__}")
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_DIGITS]


@dataclasses.dataclass(frozen=True)
class Prompt:
  index: int  # position of the record in its source (the PRNG identity of its samples)
  text: str  # the user message; the engine applies the chat format
  dataset: str = ""  # the record's `dataset` field, where the source has one
  key: str = ""  # prompt_key(text); filled in when not given

  def __post_init__(self):
    key = prompt_key(self.text)
    if self.key and self.key != key:
      raise ValueError(f"prompt {self.index}: key {self.key!r} is not prompt_key(text) {key!r}")
    object.__setattr__(self, "key", key)


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
    raise ConfigError(f"data slice {spec!r} must look like 'start:stop'")
  try:
    start, stop = (int(p) if p.strip() else None for p in parts)
  except ValueError:
    raise ConfigError(f"data slice {spec!r} must hold integers, like '12048:20240'") from None
  return slice(start, stop)


def shuffled_order(n: int, seed: int) -> np.ndarray:
  """A permutation of range(n), fixed by the seed."""
  return np.random.default_rng(seed).permutation(n)


def select(n: int, seed: int, spec: str) -> np.ndarray:
  """Positions in a list of n prompts, picked by shuffling range(n) with `seed` and slicing
  with `spec`.

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
    raise ConfigError(f"data slice {spec!r} selects no prompts out of {n} records")
  return picked


def _mix(x: np.ndarray) -> np.ndarray:
  """A 64-bit integer hash (splitmix64 finaliser), vectorised."""
  x = x.astype(np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
  return x


def key_words(keys) -> np.ndarray:
  """Prompt keys (32 hex digits each, from `prompt_key`) as [n, 2] uint64: how stores keep them."""
  keys = list(keys)
  words = np.zeros((len(keys), 2), np.uint64)
  for i, key in enumerate(keys):
    if not isinstance(key, str) or not _KEY.fullmatch(key):
      raise ValueError(f"prompt key {key!r} (position {i}) is not {KEY_DIGITS} lowercase hex "
                       "digits; prompt_key(text) gives one")
    words[i] = (int(key[:16], 16), int(key[16:], 16))
  return words


def key_hex(words) -> np.ndarray:
  """[n, 2] uint64 words back to prompt keys (an array of str)."""
  words = np.asarray(words, np.uint64).reshape(-1, 2)
  return np.asarray([f"{int(hi):016x}{int(lo):016x}" for hi, lo in words], dtype=f"<U{KEY_DIGITS}")


def assign_split(keys, seed: int, fractions=(0.8, 0.1, 0.1)) -> np.ndarray:
  """'train' | 'valid' | 'test' per prompt key (`prompt_key(text)`), by a seeded hash of the key
  alone: a prompt keeps its split whatever its position, its source or the other prompts."""
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (3,) or (fractions < 0).any() or abs(fractions.sum() - 1.0) > 1e-6:
    raise ValueError(f"split fractions must be three non-negative numbers summing to 1, "
                     f"got {tuple(fractions.tolist())}")
  words = key_words(keys)
  salt = _mix(np.asarray([int(seed) % (1 << 64)], np.uint64))[0]
  with np.errstate(over="ignore"):
    mixed = _mix(_mix(words[:, 0] + salt) ^ words[:, 1])
  u = (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
  edges = np.cumsum(fractions)
  which = np.searchsorted(edges[:2], u, side="right")
  return np.asarray(SPLITS, dtype=object)[which].astype(str)
