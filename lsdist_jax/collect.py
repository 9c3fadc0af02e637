"""Collection: N sampled responses per prompt -> response lengths + the prompt's hidden state, stored.

Work goes in crash-safe chunks of prompts; a rerun skips prompts already stored. Many prompts x
samples share each batch; rows are capped in rounds and unfinished ones continued later (the
per-request PRNG makes that identical to uncapped sampling), so one long response does not hold
a whole batch.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from typing import Sequence

import jax
import numpy as np

from lsdist_jax import paths
from lsdist_jax.config import LENGTH_CONVENTION, check_config

STORE_VERSION = 1


@dataclasses.dataclass
class Row:
  prompt: int  # position in the chunk
  sample: int
  request_id: int
  prompt_ids: list[int]
  generated: list[int] = dataclasses.field(default_factory=list)
  finished: bool = False
  done: bool = False


def store_meta(config, engine) -> dict:
  gen = config.generation
  return {
      "version": STORE_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "model": engine.fingerprint(),
      "generation": {"temperature": float(gen.temperature), "top_p": float(gen.top_p),
                     "seed": int(gen.seed), "max_seq_len": int(gen.max_seq_len)},
      "length_convention": LENGTH_CONVENTION,
      "hidden_layer": int(config.collect.hidden_layer),
      "samples_per_prompt": int(config.collect.samples_per_prompt),
      "data": {"source": config.data.source, "shuffle_seed": int(config.data.shuffle_seed),
               "slice": config.data.slice},
      "split_seed": int(config.data.split_seed),
      "split_fractions": [float(f) for f in config.data.split_fractions],
  }


def request_id(dataset_index: int, sample: int, samples_per_prompt: int) -> int:
  """The PRNG identity of sample j of a prompt: unique per (prompt, sample)."""
  return int(dataset_index) * int(samples_per_prompt) + int(sample)


def cap_rounds(max_new: int, first: int = 128) -> list[int]:
  """Caps of the successive rounds: 128, 512, ... up to max_new (each round continues the rows
  the previous one left unfinished)."""
  caps, cap = [], first
  while cap < max_new:
    caps.append(cap)
    cap *= 4
  return caps + [max_new]


def sample_rows(engine, rows: Sequence[Row], config) -> dict:
  """Generates every row to EOS or max_seq_len, batch by batch, capped in rounds.

  Returns {"hidden": {prompt position: [D]}, "tokens": tokens generated}."""
  gen_cfg = config.generation
  batch_size = int(config.collect.batch_size)
  max_seq_len = int(gen_cfg.max_seq_len)
  hidden: dict[int, np.ndarray] = {}
  tokens = 0
  pending = list(rows)
  for cap in cap_rounds(max_seq_len):
    # Rows of similar prompt length together: less padding, fewer prompt buckets.
    pending.sort(key=lambda r: len(r.prompt_ids) + len(r.generated))
    for start in range(0, len(pending), batch_size):
      batch = pending[start:start + batch_size]
      result = engine.generator.generate(
          [r.prompt_ids + r.generated for r in batch], cap=cap, max_seq_len=max_seq_len,
          seed=int(gen_cfg.seed), temperature=float(gen_cfg.temperature),
          top_p=float(gen_cfg.top_p), request_ids=[r.request_id for r in batch],
          start_steps=[len(r.generated) for r in batch],
          hidden_layer=int(config.collect.hidden_layer))
      for i, row in enumerate(batch):
        new = result.tokens[i, :result.num_generated[i]].tolist()
        if not row.generated and row.prompt not in hidden:
          hidden[row.prompt] = result.hidden[i]
        row.generated += new
        tokens += len(new)
        row.finished = bool(result.finished[i])
        at_limit = len(row.prompt_ids) + len(row.generated) >= max_seq_len
        row.done = row.finished or at_limit
    pending = [r for r in pending if not r.done]
    if not pending:
      break
  if pending:
    raise RuntimeError(f"{len(pending)} rows neither finished nor reached max_seq_len")
  return {"hidden": hidden, "tokens": tokens}


def collect(config, workdir: str | None = None, engine=None, stop_after_chunks: int | None = None,
            show_progress: bool = True) -> dict:
  """Runs (or resumes) collection for this process's share of the prompts; returns the summary.

  `stop_after_chunks` ends early after that many chunks (tests simulate an interrupted job)."""
  from lsdist_jax import sharding as shd
  from lsdist_jax.data import load_prompts
  from lsdist_jax.store import LengthStore

  check_config(config)
  shd.maybe_initialize_distributed(config.mesh)
  workdir = workdir or config.workdir
  path = paths.store(config, workdir)
  from lsdist_jax.engine import load_engine

  engine = engine or load_engine(config)
  n_samples = int(config.collect.samples_per_prompt)
  max_seq_len = int(config.generation.max_seq_len)
  hidden_dim = engine.config.hidden_size
  store = LengthStore.create_or_open(path, store_meta(config, engine), hidden_dim=hidden_dim,
                                     samples_per_prompt=n_samples)
  prompts = load_prompts(config.data)
  process, n_process = jax.process_index(), jax.process_count()
  share = prompts[process::n_process]
  done = store.done_indices()
  todo = [p for p in share if p.index not in done]
  logging.info("collect: %d prompts in slice, %d for process %d/%d, %d already stored, %d to do",
               len(prompts), len(share), process, n_process, len(share) - len(todo), len(todo))
  ids = engine.encode([p.text for p in todo])
  too_long = [i for i, x in enumerate(ids) if len(x) >= max_seq_len]
  if too_long:
    p = todo[too_long[0]]
    message = (f"prompt {p.index} has {len(ids[too_long[0]])} tokens, more than "
               f"generation.max_seq_len={max_seq_len} allows (prompt + response); "
               f"{len(too_long)} such prompt(s)")
    if config.collect.long_prompts != "skip":
      raise ValueError(message + "; set collect.long_prompts='skip' to leave them out")
    logging.warning("%s: skipped", message)
    keep = [i for i in range(len(ids)) if len(ids[i]) < max_seq_len]
    todo, ids = [todo[i] for i in keep], [ids[i] for i in keep]

  chunk_size = int(config.collect.chunk_prompts)
  bar = _progress_bar(len(todo) * n_samples, show_progress)
  compile_before = engine.generator.compile_seconds
  started = time.perf_counter()
  total_tokens = 0
  chunks = new_prompts = 0
  for start in range(0, len(todo), chunk_size):
    chunk = todo[start:start + chunk_size]
    chunk_ids = ids[start:start + chunk_size]
    rows = [Row(i, j, request_id(p.index, j, n_samples), chunk_ids[i])
            for i, p in enumerate(chunk) for j in range(n_samples)]
    out = sample_rows(engine, rows, config)
    total_tokens += out["tokens"]
    lengths = np.zeros((len(chunk), n_samples), np.int32)
    finished = np.zeros((len(chunk), n_samples), bool)
    for row in rows:
      lengths[row.prompt, row.sample] = len(row.generated)
      finished[row.prompt, row.sample] = row.finished
    records = {
        "index": np.array([p.index for p in chunk], np.int64),
        "prompt_len": np.array([len(x) for x in chunk_ids], np.int32),
        "lengths": lengths,
        "finished": finished,
        "hidden": np.stack([out["hidden"][i] for i in range(len(chunk))]).astype(np.float32),
    }
    store.write_chunk(f"p{process:04d}-i{chunk[0].index:09d}-n{len(chunk)}", records)
    chunks += 1
    new_prompts += len(chunk)
    elapsed = time.perf_counter() - started
    bar(len(rows), f"{total_tokens / max(elapsed, 1e-9):,.0f} tok/s")
    if stop_after_chunks is not None and chunks >= stop_after_chunks:
      break
  elapsed = time.perf_counter() - started
  compiling = engine.generator.compile_seconds - compile_before
  summary = dict(store.summary())
  summary.update({"process": process, "processes": n_process, "new_prompts": new_prompts,
                  "new_tokens": total_tokens, "seconds": round(elapsed, 2),
                  "tokens_per_s": round(total_tokens / max(elapsed, 1e-9), 1),
                  "compile_seconds": round(compiling, 2),
                  "tokens_per_s_excluding_compile": round(
                      total_tokens / max(elapsed - compiling, 1e-9), 1),
                  "compilations": engine.compile_count, "store": path})
  return summary


def _progress_bar(total: int, enabled: bool):
  """A tqdm bar over samples with tokens/s in its postfix; a no-op when disabled."""
  if not enabled or total == 0:
    return lambda n, postfix: None
  from tqdm import tqdm

  bar = tqdm(total=total, unit="sample", dynamic_ncols=True, desc="collect")

  def update(n, postfix):
    bar.update(n)
    bar.set_postfix_str(postfix)
    if bar.n >= total:
      bar.close()

  return update
