"""`SlotBatch`: continuous (slot-refill) decoding on one engine: requests inserted into free
slots of one KV cache as others finish (`Generator.open_slots` makes one)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from lsdist_jax import sharding as shd
from lsdist_jax.llama.sampling import sampling_rows


@dataclasses.dataclass
class SlotRead:
  """What the host reads back after a decode call, per slot."""
  tokens: np.ndarray  # [B, S + 1] accepted tokens in [:num_generated]
  num_generated: np.ndarray  # [B] in this slot
  done: np.ndarray  # [B]
  finished: np.ndarray  # [B] ended with EOS



COVER_PADDING = 4  # an insert may run a compiled program of up to this many times its tokens


class SlotBatch:
  """Continuous decoding on one engine (one device or a mesh): `insert` requests into free
  slots, `decode` until enough slots are free, `read` the slots back. A slot's row may generate
  at most min(cache_len - context, max_seq_len - context) tokens; one that reaches it comes back
  done but not finished (continue it elsewhere from context + its tokens, like a capped row)."""

  def __init__(self, generator, state: dict, slots: int, cache_len: int, *,
               max_seq_len: int, sampling: tuple, hidden_layer: int = -1):
    self.generator, self.state = generator, state  # the `Generator` that opened it
    self.slots, self.cache_len, self.max_seq_len = slots, cache_len, max_seq_len
    self.sampling, self.hidden_layer = sampling, hidden_layer
    self.steps = 0  # decode steps run so far
    self.prefilled_rows = 0  # rows the inserts prefilled, bucket padding included

  def room(self, context_len):
    """Tokens a context of this length may generate in a slot (<= 0: it does not fit).
    Elementwise."""
    return np.minimum(self.cache_len - context_len, self.max_seq_len - context_len)

  def insert(self, slot_ids: Sequence[int], contexts: Sequence[Sequence[int]],
             request_ids: Sequence[int], start_steps: Sequence[int],
             forced_lengths: Sequence[int] | None = None, min_rows: int = 0,
             max_new_tokens: Sequence[int] | None = None, seed=None, temperature=None,
             top_p=None, share_prefill: bool = False, min_block: int = 0) -> None:
    """Prefills `contexts` (prompt + any tokens generated earlier) into the given free slots.
    The call's row count is the batch bucket of max(len(contexts), min_rows): a caller that
    inserts up to m rows at a time passes min_rows=m, and every insert of one context block
    length is then the same program. max_new_tokens: per row, the most tokens it may generate
    here (its own max_tokens less what it generated before). seed / temperature / top_p: the
    rows' sampling settings (one value or one per row; None: the batch's defaults), kept by
    their slots until the next insert there. share_prefill: contexts that are equal are
    prefilled once and their cache copied to each of their slots (an OpenAI batch line's n
    choices). When the distinct contexts fit in half the rows, the prefill runs at that half
    (`shared_rows`): one more program per (rows, context block), never more, as each costs a
    compilation; otherwise at the full rows. The tokens are those of separate prefills.
    min_block: the context block is at least this (a plan's one block per phase)."""
    gen = self.generator
    n = len(contexts)
    if n == 0 or len(slot_ids) != n or len(request_ids) != n or len(start_steps) != n:
      raise ValueError(f"insert needs one slot, request id and start step per context "
                       f"({len(slot_ids)}, {len(request_ids)}, {len(start_steps)} for {n})")
    if len(set(int(s) for s in slot_ids)) != n or min(slot_ids) < 0 or max(slot_ids) >= self.slots:
      raise ValueError(f"slot ids must be distinct and in [0, {self.slots}): {list(slot_ids)}")
    distinct, source = list(contexts), list(range(n))
    if share_prefill:  # each distinct context once, in order of first appearance
      first = {}
      source = [first.setdefault(tuple(int(t) for t in c), len(first)) for c in contexts]
      distinct = list(first)
    tokens, pad_len, _, _, p = gen._pack(distinct)
    lengths = np.array([len(c) for c in contexts], np.int32)
    k = gen._rows_bucket(max(n, int(min_rows)))
    u = shared_rows(gen, k) if share_prefill else k
    u = u if len(distinct) <= u else k
    p = max(gen.buckets.insert_block(p, self.cache_len), int(min_block))
    k, p, u = self._covering(k, p, u)
    tokens, pad_len = gen._pad_call(tokens, pad_len, u, p)
    room = self.room(lengths)
    if (room < 1).any():
      i = int(np.argmin(room))
      raise ValueError(f"context {i} of {int(lengths[i])} tokens leaves no room in this slot "
                       f"batch (cache_len={self.cache_len}, max_seq_len={self.max_seq_len})")
    if p > self.cache_len:
      raise ValueError(f"a context block of {p} tokens exceeds cache_len={self.cache_len}")

    slots = pad_rows(k, slot_ids, self.slots, np.int32)  # bucket padding rows: dropped
    forced = pad_rows(k, [] if forced_lengths is None else forced_lengths, -1, np.int32)
    caps = pad_rows(k, room, 0, np.int32)
    limits = pad_rows(k, self.max_seq_len - lengths, 0, np.int32)
    if max_new_tokens is not None:
      limits[:n] = np.minimum(limits[:n], np.asarray(max_new_tokens, np.int32))
    settings = take_settings(self.sampling, slot_ids, k, seed, temperature, top_p)
    slots = jnp.asarray(slots)
    self.state, logits = gen._run(
        insert_name(self.slots, self.cache_len, k, p, self.hidden_layer, u),
        gen._slot_fn("slot_insert", self.slots, self.cache_len, self.hidden_layer), gen.params,
        self.state, slots, jnp.asarray(tokens), jnp.asarray(pad_len),
        jnp.asarray(pad_rows(k, source, 0, np.int32)))
    rows = [jnp.asarray(x) for x in (pad_rows(k, request_ids, 0, np.uint32),
                                     pad_rows(k, start_steps, 0, np.int32), caps, limits,
                                     forced)]
    self.state = gen._run(first_name(self.slots, self.cache_len, k),
                          gen._slot_fn("slot_first", self.slots, self.cache_len),
                          self.state, logits, slots, *rows,
                          *[jnp.asarray(x) for x in settings])
    self.prefilled_rows += u

  def _covering(self, k: int, p: int, u: int) -> tuple[int, int, int]:
    """(rows, block, prefill rows) an insert runs at: its own (k, p, u), unless its programs are
    still compiling in the background while an insert program of at least its rows and block
    (prefilling every row), at most COVER_PADDING times its tokens, and that program's sampler
    can run now: then that one, padded, rather than wait (e.g. a shared prefill's twin that
    prefills every row). A much larger one would cost more on each refill than the wait."""
    gen, s, c, h = self.generator, self.slots, self.cache_len, self.hidden_layer
    states = gen.program_states()
    own = (insert_name(s, c, k, p, h, u), first_name(s, c, k))
    if not any(states.get(name) is False for name in own):  # none of them is compiling
      return k, p, u
    prefix = f"slot_insert/{s}/{c}/"
    best = None
    for name, ready in states.items():
      parts = name[len(prefix):].split("/") if name.startswith(prefix) else []
      if not ready or len(parts) != 3 or parts[2] != str(h):
        continue  # not ready, or a shared prefill, or another hidden layer's
      k2, p2 = int(parts[0]), int(parts[1])
      if (k2 >= k and p2 >= p and k2 * p2 <= COVER_PADDING * k * p
          and states.get(first_name(s, c, k2), False)):
        if best is None or k2 * p2 < best[0] * best[1]:
          best = (k2, p2)
    return (best[0], best[1], best[0]) if best else (k, p, u)

  def decode(self, free_target: int) -> int:
    """Runs decode steps until at least `free_target` slots are done (or all are); returns the
    steps run."""
    gen = self.generator
    settings = [jnp.asarray(x) for x in self.sampling]  # each slot's: [B], [B], [B, 2]
    self.state, steps = gen._run(f"slot_decode/{self.slots}/{self.cache_len}",
                                 gen._slot_fn("slot_decode", self.slots, self.cache_len),
                                 gen.params, self.state, jnp.int32(free_target), *settings)
    steps = int(steps)
    self.steps += steps
    return steps

  def hidden(self, slot_ids: Sequence[int]) -> np.ndarray:
    """The hidden states the last insert into each of these slots computed (at the batch's
    hidden_layer, at the last context token). -> [n, D] float32."""
    return np.asarray(shd.to_host(self.state["hidden"]))[np.asarray(slot_ids, np.int64)]

  def read(self) -> SlotRead:
    st = shd.to_host({k: self.state[k] for k in ("out", "n_gen", "done", "finished")})
    return SlotRead(np.asarray(st["out"]), np.asarray(st["n_gen"]), np.asarray(st["done"]),
                    np.asarray(st["finished"]))


def pad_rows(rows: int, values, fill, dtype) -> np.ndarray:
  """`values` (one per inserted row) padded with `fill` to an insert's `rows` (its bucket)."""
  values = np.asarray(values, dtype)
  return np.concatenate([values, np.full((rows - values.size,), fill, dtype)])


def take_settings(held: tuple, slot_ids: Sequence[int], rows: int, seed=None, temperature=None,
                  top_p=None) -> list[np.ndarray]:
  """The sampling settings of an insert of len(slot_ids) rows padded to `rows`: `held` (the
  batch's per-slot seed, temperature, top_p arrays) takes each given setting (one value or one
  per row; None: the slot keeps the batch's default) at these slots; -> each setting's values
  for the inserted rows, [rows] (padding rows: the last row's)."""
  index = np.asarray(slot_ids, np.int64)
  n = index.size
  given = (seed, temperature, top_p)
  fresh = sampling_rows(n, n, *[0 if g is None else g for g in given])
  for values, value, new in zip(held, given, fresh):
    if value is not None:
      values[index] = new
  return [np.concatenate([x[index], np.repeat(x[index[-1:]], rows - n, axis=0)]) for x in held]


def shared_rows(generator, rows: int) -> int:
  """The row count an insert of `rows` rows prefills at when its distinct contexts fit there
  (`SlotBatch.insert(share_prefill=True)`): the batch bucket of half the rows."""
  return min(rows, generator._rows_bucket(max(1, rows // 2)))


def insert_name(slots: int, cache_len: int, rows: int, block: int, hidden_layer: int,
                prefill_rows: int) -> str:
  """The program name of an insert of `rows` rows (`prefill_rows` of them prefilled) at context
  block `block` into a slot batch (`SlotBatch.insert`, `Generator.precompile_slots`)."""
  shared = "" if prefill_rows == rows else f"/shared{prefill_rows}"
  return f"slot_insert/{slots}/{cache_len}/{rows}/{block}/{hidden_layer}{shared}"


def first_name(slots: int, cache_len: int, rows: int) -> str:
  """The program name of the first-token sampling after an insert of `rows` rows
  (`decode.slot_first`): one per rows, whatever the context block."""
  return f"slot_first/{slots}/{cache_len}/{rows}"
