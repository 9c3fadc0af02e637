"""Shape buckets: the batch sizes, prompt blocks and cache lengths that compiled programs use.

Every place that pads a shape rounds here: the engine (what it compiles), the cost model and the
planners (what a batch costs and holds in memory) and the runner (what it records).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np


def round_up(x: int, multiple: int) -> int:
  """x rounded up to a multiple of `multiple`, at least `multiple`."""
  return max(int(multiple), -(-int(x) // int(multiple)) * int(multiple))


def round_up_array(x, multiple: int) -> np.ndarray:
  """`round_up`, elementwise."""
  return np.maximum(multiple, np.ceil(np.asarray(x) / multiple).astype(np.int64) * multiple)


def batch_bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket holding n rows; beyond the largest, a multiple of it."""
  for b in sorted(buckets):
    if b >= n:
      return int(b)
  return round_up(n, max(buckets))


def batch_bucket_array(n, buckets: Sequence[int]) -> np.ndarray:
  """`batch_bucket`, elementwise."""
  n = np.asarray(n, np.int64)
  sizes = np.asarray(sorted(buckets), np.int64)
  idx = np.searchsorted(sizes, n)
  return np.where(idx < sizes.size, sizes[np.minimum(idx, sizes.size - 1)],
                  round_up_array(n, int(sizes[-1])))


def context_block(block, prompt_bucket: int, cache_len: int):
  """The length an insert call prefills a packed context block of `block` tokens (a multiple of
  prompt_bucket) at: prompt_bucket x 2^i, where that fits the cache. Continued rows bring long
  contexts of any length, and every block length is a program to compile. Elementwise over an
  array of blocks; an int for an int."""
  blocks = np.asarray(block, np.int64)
  pb = int(prompt_bucket)
  pow2 = pb * 2 ** np.ceil(np.log2(np.maximum(blocks, pb) / pb)).astype(np.int64)
  out = np.where(pow2 <= int(cache_len), pow2, blocks)
  return int(out) if out.ndim == 0 else out


def merge_blocks(calls: Sequence[int], rows: int, prefill_seconds, compile_seconds: float
                 ) -> dict[int, int]:
  """The context block each block level of a run of prefill calls runs at (one program per
  level): adjacent levels merge upward, the cheapest merge first, while the merge's extra
  prefill time (each of the lower level's calls padded to the next block,
  `prefill_seconds(rows, block)`) stays under `compile_seconds`, the compilation one program
  fewer saves. calls: each call's block. -> {block: the block it runs at}."""
  count = collections.Counter(int(b) for b in calls)
  levels = sorted(count)
  target = {b: b for b in levels}
  while len(levels) > 1:
    def extra(i):
      low, high = levels[i], levels[i + 1]
      return count[low] * (float(prefill_seconds(rows, high)) - float(prefill_seconds(rows, low)))

    i = min(range(len(levels) - 1), key=extra)
    if extra(i) >= compile_seconds:
      break
    low, high = levels[i], levels[i + 1]
    count[high] += count.pop(low)
    for b, t in target.items():
      if t == low:
        target[b] = high
    levels.pop(i)
  return target


def embed_rows(n: int, sizes: Sequence[int], block: int, prefill_seconds=None) -> int:
  """The rows each call of a prefill of n prompts runs at, of `sizes` (row counts the engine
  runs, ascending; the largest is the most per call): with `prefill_seconds(rows, block)`, the
  size whose calls (ceil(n / rows) of them, each padded to `rows`, at context block `block`)
  take the least time, ties to the larger; without, the largest (24 prompts: one call of 64
  rows, or where a call's fixed cost is small two of 16)."""
  sizes = sorted(int(r) for r in sizes)
  if prefill_seconds is None or len(sizes) == 1:
    return sizes[-1]
  return min(sizes, key=lambda r: (-(-int(n) // r) * float(prefill_seconds(r, block)), -r))


def _engine_defaults():
  from lsdist_jax.config import defaults

  return defaults("engine")


@dataclasses.dataclass
class Buckets:
  """The engine's shape buckets (defaults: config.py's `engine` section)."""
  batch: tuple[int, ...] = dataclasses.field(
      default_factory=lambda: tuple(_engine_defaults()["batch_buckets"]))
  prompt: int = dataclasses.field(default_factory=lambda: int(_engine_defaults()["prompt_bucket"]))
  cache: int = dataclasses.field(default_factory=lambda: int(_engine_defaults()["cache_bucket"]))

  @classmethod
  def from_config(cls, engine_config) -> "Buckets":
    return cls(tuple(int(b) for b in engine_config.batch_buckets),
               int(engine_config.prompt_bucket), int(engine_config.cache_bucket))

  def batch_size(self, n: int) -> int:
    return batch_bucket(n, self.batch)

  def prompt_block(self, longest: int) -> int:
    return round_up(longest, self.prompt)

  def insert_block(self, longest, cache_len: int):
    """The length a prefill of contexts whose longest has `longest` tokens runs at: its prompt
    block, rounded up to prompt bucket x 2^i where that fits `cache_len` (`context_block`).
    Elementwise over an array of longest lengths; an int for an int."""
    return context_block(round_up_array(longest, self.prompt) if np.ndim(longest)
                         else self.prompt_block(longest), self.prompt, cache_len)

  def cache_len(self, longest_prompt: int, cap: int) -> int:
    """The cache a batch needs: its prompt block plus `cap` tokens, rounded to the bucket."""
    return round_up(self.prompt_block(longest_prompt) + int(cap), self.cache)
