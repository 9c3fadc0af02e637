"""Collection's decoding: (prompt, sample) rows generated to EOS or max_seq_len, either streamed
through slot refill (`sample_slots`: rows enter free slots of one `SlotBatch` as others finish)
or in static batches capped in rounds (`sample_static`). Both keep each row's PRNG identity
(seed, request id, token index), so they give the very same lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass
class Row:
  prompt: int  # position of its prompt in the run's list
  sample: int
  request_id: int
  prompt_ids: list[int]
  generated: list[int] = dataclasses.field(default_factory=list)
  finished: bool = False  # ended with EOS
  done: bool = False  # finished, or reached max_seq_len
  hidden: np.ndarray | None = None  # the prompt's hidden state, kept on sample 0 by sample_slots


def cap_rounds(max_new: int, first: int = 128) -> list[int]:
  """Caps of the static rounds: 128, 512, ... up to max_new (each round continues the rows the
  previous one left unfinished)."""
  caps, cap = [], first
  while cap < max_new:
    caps.append(cap)
    cap *= 4
  return caps + [max_new]


def _sampling(config) -> dict:
  gen = config.generation
  return dict(seed=int(gen.seed), temperature=float(gen.temperature), top_p=float(gen.top_p))


def sample_static(engine, rows: Sequence[Row], config,
                  on_done: Callable[[Row], None] = lambda row: None) -> int:
  """Every row to EOS or max_seq_len, `collect.batch_size` rows a batch, capped in rounds;
  `on_done(row)` as each row completes. Returns the tokens generated."""
  batch_size = int(config.collect.batch_size)
  max_seq_len = int(config.generation.max_seq_len)
  tokens = 0
  pending = list(rows)
  for cap in cap_rounds(max_seq_len):
    # Rows of similar prompt length together: less padding, fewer prompt buckets.
    pending.sort(key=lambda r: len(r.prompt_ids) + len(r.generated))
    for start in range(0, len(pending), batch_size):
      batch = pending[start:start + batch_size]
      result = engine.generator.generate(
          [r.prompt_ids + r.generated for r in batch], cap=cap, max_seq_len=max_seq_len,
          request_ids=[r.request_id for r in batch],
          start_steps=[len(r.generated) for r in batch], **_sampling(config))
      for i, row in enumerate(batch):
        new = result.tokens[i, :result.num_generated[i]].tolist()
        row.generated += new
        tokens += len(new)
        row.finished = bool(result.finished[i])
        row.done = row.finished or len(row.prompt_ids) + len(row.generated) >= max_seq_len
        if row.done:
          on_done(row)
    pending = [r for r in pending if not r.done]
    if not pending:
      break
  if pending:
    raise RuntimeError(f"{len(pending)} rows neither finished nor reached max_seq_len")
  return tokens


def sample_slots(engine, rows: Sequence[Row], config,
                 on_done: Callable[[Row], None] = lambda row: None,
                 slots: int | None = None) -> int:
  """Every row to EOS or max_seq_len through slot refill: `slots` (default
  `collect.batch_size`) slots whose cache holds max_seq_len tokens (so no row is ever capped);
  whenever `collect.refill_fraction` of the slots are free, the next rows (in the given order)
  are prefilled into them, always as calls of `refill` rows (so one program per context block
  length). The prefill's hidden state at `collect.hidden_layer` is kept on each prompt's sample-0
  row (`Row.hidden`). `on_done(row)` as each row completes. Returns the tokens generated."""
  max_seq_len = int(config.generation.max_seq_len)
  batch = engine.generator.open_slots(int(slots or config.collect.batch_size), max_seq_len,
                                      max_seq_len=max_seq_len, **_sampling(config),
                                      hidden_layer=int(config.collect.hidden_layer))
  refill = int(max(1, min(batch.slots, round(float(config.collect.refill_fraction)
                                             * batch.slots))))
  queue = list(rows)
  head = 0
  occupant: list[Row | None] = [None] * batch.slots
  tokens = 0
  while True:
    free = [j for j, row in enumerate(occupant) if row is None]
    # Inserts of `refill` rows at a time: few distinct insert shapes, so few programs to compile.
    for start in range(0, len(free), refill):
      take = queue[head:head + min(refill, len(free) - start)]
      if not take:
        break
      head += len(take)
      slots = free[start:start + len(take)]
      batch.insert(slots, [r.prompt_ids for r in take], [r.request_id for r in take],
                   [0] * len(take), min_rows=refill)
      firsts = [i for i, r in enumerate(take) if r.sample == 0]
      if firsts:
        for i, h in zip(firsts, batch.hidden([slots[i] for i in firsts])):
          take[i].hidden = h
      for j, row in zip(slots, take):
        occupant[j] = row
    if all(row is None for row in occupant):
      return tokens
    batch.decode(refill if head < len(queue) else batch.slots)
    read = batch.read()
    for j in np.nonzero(read.done)[0]:
      row = occupant[j]
      if row is None:
        continue
      row.generated = read.tokens[j, :read.num_generated[j]].tolist()
      tokens += len(row.generated)
      row.finished = bool(read.finished[j])
      row.done = True
      if not row.finished and len(row.prompt_ids) + len(row.generated) < max_seq_len:
        raise RuntimeError(f"row {row.request_id} stopped at {len(row.generated)} tokens "
                           "without EOS before max_seq_len")
      occupant[j] = None
      on_done(row)


SAMPLERS = {"slots": sample_slots, "static": sample_static}
