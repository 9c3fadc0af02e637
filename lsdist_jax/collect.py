"""Collection: N sampled responses per prompt -> response lengths + the prompt's hidden state,
stored.

Every (prompt, sample) row of this process's share streams through slot refill
(`collect_rows.py`: a finished row's slot takes the next row at once, across chunk boundaries);
a chunk of prompts is written to the store, crash-safe, as soon as all its rows are done, and a
rerun skips prompts already stored. The per-request PRNG makes the lengths the same as static
batches' (`collect.decode=static`) and as an uninterrupted run's. A prompt is known by its key
(a hash of its text): a store refuses a source that gives another prompt at a stored index, and
one run at a time holds a store (`store_lock`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time

import jax
import numpy as np

from lsdist_jax import paths
from lsdist_jax.collect_rows import Row, sample_slots, sample_static
from lsdist_jax.config import LENGTH_CONVENTION, check_config
from lsdist_jax.errors import ConfigError, InputError, LockHeldError
from lsdist_jax.store import STORE_VERSION

LOCK = "collect.lock"  # in the store folder


def store_meta(config, engine, source=None) -> dict:
  """The store's meta.json: model, generation, layout, and the data (with `source`, a
  `data.Source`: where its prompts were read, the datasets filter, how many it holds)."""
  gen = config.generation
  data = source.describe() if source is not None else {"source": config.data.source}
  return {
      "version": STORE_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "model": engine.fingerprint(),
      "generation": {"temperature": float(gen.temperature), "top_p": float(gen.top_p),
                     "seed": int(gen.seed), "max_seq_len": int(gen.max_seq_len)},
      "length_convention": LENGTH_CONVENTION,
      "hidden_layer": int(config.collect.hidden_layer),
      "samples_per_prompt": int(config.collect.samples_per_prompt),
      "data": dict(data, shuffle_seed=int(config.data.shuffle_seed), slice=config.data.slice,
                   stratify_by_dataset=bool(config.data.stratify_by_dataset)),
      "split_seed": int(config.data.split_seed),
      "split_fractions": [float(f) for f in config.data.split_fractions],
  }


def request_id(dataset_index: int, sample: int, samples_per_prompt: int) -> int:
  """The PRNG identity of sample j of a prompt: unique per (prompt, sample)."""
  return int(dataset_index) * int(samples_per_prompt) + int(sample)


@contextlib.contextmanager
def store_lock(path: str):
  """Holds the store's lock (<store>/collect.lock) for a whole collection run, taken without
  waiting: a second run on the same store is refused at once with LockHeldError (one line) rather
  than queued. With the lock held, half-written chunk folders a crashed run left are removed.
  In a multi-process run, process 0 takes it for all (the others learn whether it could) and
  releases it once every process is done. The lock goes with the process (a kill leaves none)."""
  from lsdist_jax.files import held_lock

  what, lock = f"the length store {path}", os.path.join(path, LOCK)
  if jax.process_count() == 1:
    with held_lock(lock, what):
      _clean_partial(path)
      yield
    return
  from jax.experimental import multihost_utils

  with contextlib.ExitStack() as held:
    refused = None
    if jax.process_index() == 0:
      try:
        held.enter_context(held_lock(lock, what))
        _clean_partial(path)
      except LockHeldError as e:
        refused = e
    taken = int(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
    if refused is not None:
      raise refused
    if not taken:
      raise LockHeldError(f"{what} is in use by another run: process 0 of this run could not "
                          f"take its lock {lock}")
    yield
    multihost_utils.sync_global_devices(f"collect into {path}: done")


def _clean_partial(path: str) -> None:
  from lsdist_jax.store import clean_partial

  removed = clean_partial(path)
  if removed:
    logging.warning("collect: removed %d half-written chunk folder(s) a crashed run left in %s",
                    removed, path)


def collect(config, workdir: str | None = None, engine=None, stop_after_chunks: int | None = None,
            show_progress: bool = True) -> dict:
  """Runs (or resumes) collection for this process's share of the prompts; returns the summary.

  The run holds the store's lock throughout (`store_lock`: a second run is refused at once, it
  does not wait). Prompts already stored (by key) are skipped; a source that gives another
  prompt at a stored index is refused. `stop_after_chunks` ends early after that many chunks
  (tests simulate an interrupted job)."""
  from lsdist_jax import sharding as shd

  check_config(config)
  shd.maybe_initialize_distributed(config.mesh)
  path = paths.store(config, workdir or config.workdir)
  with store_lock(path):
    return _collect(config, path, engine, stop_after_chunks, show_progress)


def _collect(config, path: str, engine, stop_after_chunks: int | None, show_progress: bool):
  from lsdist_jax.data import open_source
  from lsdist_jax.engine import load_engine
  from lsdist_jax.store import LengthStore

  long_prompts = config.collect.long_prompts
  if long_prompts not in ("error", "skip"):
    raise ConfigError(f"collect.long_prompts={long_prompts!r}; expected 'error' or 'skip'")
  source = open_source(config.data)
  prompts = source.pick(int(config.data.shuffle_seed), config.data.slice)
  engine = engine or load_engine(config)
  n_samples = int(config.collect.samples_per_prompt)
  max_seq_len = int(config.generation.max_seq_len)
  hidden_dim = engine.config.hidden_size
  store = LengthStore.create_or_open(path, store_meta(config, engine, source),
                                     hidden_dim=hidden_dim, samples_per_prompt=n_samples)
  stored = set(store.check_prompts(prompts, f"{source.name!r} ({source.origin})").values())
  process, n_process = jax.process_index(), jax.process_count()
  share = prompts[process::n_process]
  todo = [p for p in share if p.key not in stored]
  logging.info("collect: %d prompts in slice, %d for process %d/%d, %d already stored, %d to do",
               len(prompts), len(share), process, n_process, len(share) - len(todo), len(todo))
  ids = engine.encode([p.text for p in todo])
  too_long = [i for i, x in enumerate(ids) if len(x) >= max_seq_len]
  if too_long:
    p = todo[too_long[0]]
    message = (f"prompt {p.index} ({p.text[:40]!r}..., key {p.key}) has "
               f"{len(ids[too_long[0]])} tokens, more than generation.max_seq_len={max_seq_len} "
               f"allows (prompt + response); {len(too_long)} such prompt(s)")
    if long_prompts == "error":
      raise InputError(message + "; set collect.long_prompts='skip' to leave them out")
    logging.warning("%s: skipped", message)
    keep = [i for i in range(len(ids)) if len(ids[i]) < max_seq_len]
    todo, ids = [todo[i] for i in keep], [ids[i] for i in keep]

  chunk_size = int(config.collect.chunk_prompts)
  chunks = [list(range(s, min(s + chunk_size, len(todo))))
            for s in range(0, len(todo), chunk_size)]
  if stop_after_chunks is not None:
    chunks = chunks[:stop_after_chunks]  # as if the run had been killed after these
  rows = [[Row(k, j, request_id(todo[k].index, j, n_samples), ids[k]) for j in range(n_samples)]
          for c in chunks for k in c]  # [prompt][sample]
  chunk_of = {k: c for c, members in enumerate(chunks) for k in members}
  left = [len(members) * n_samples for members in chunks]
  bar = _progress_bar(sum(left), show_progress)
  compile_before = engine.generator.compile_seconds
  started = time.perf_counter()
  tally = {"tokens": 0, "chunks": 0, "prompts": 0}

  def write(c: int) -> None:
    """Chunk c's prompts are all done: their lengths and hidden states go to the store."""
    members = chunks[c]
    kept = [rows[k][0].hidden for k in members]
    if any(h is None for h in kept):  # static batches: a prefill of the chunk's prompts
      kept = engine.embed([ids[k] for k in members], layer=int(config.collect.hidden_layer))
    records = {
        "index": np.array([todo[k].index for k in members], np.int64),
        "key": [todo[k].key for k in members],
        "prompt_len": np.array([len(ids[k]) for k in members], np.int32),
        "lengths": np.array([[len(r.generated) for r in rows[k]] for k in members], np.int32),
        "finished": np.array([[r.finished for r in rows[k]] for k in members], bool),
        "hidden": np.asarray(kept, np.float32),
    }
    store.write_chunk(f"p{process:04d}-i{todo[members[0]].index:09d}-n{len(members)}", records)
    tally["chunks"] += 1
    tally["prompts"] += len(members)

  def on_done(row: Row) -> None:
    tally["tokens"] += len(row.generated)
    c = chunk_of[row.prompt]
    left[c] -= 1
    postfix = None
    if left[c] == 0:
      write(c)
      postfix = f"{tally['tokens'] / max(time.perf_counter() - started, 1e-9):,.0f} tok/s"
    bar(1, postfix)

  flat = [row for k_rows in rows for row in k_rows]
  decode = config.collect.decode
  if decode == "slots":
    sample_slots(engine, flat, config, on_done, slots=collection_slots(engine, config))
  elif decode == "static":
    for members in chunks:  # a chunk at a time, as the rounds need all of a chunk's rows
      sample_static(engine, [row for k in members for row in rows[k]], config, on_done)
  else:
    raise ConfigError(f"collect.decode={decode!r}; expected 'slots' or 'static'")
  total_tokens, new_prompts = tally["tokens"], tally["prompts"]
  elapsed = time.perf_counter() - started
  compiling = engine.generator.compile_seconds - compile_before
  summary = dict(store.summary())
  summary.update({"process": process, "processes": n_process, "new_prompts": new_prompts,
                  "new_tokens": total_tokens, "seconds": round(elapsed, 2),
                  "tokens_per_s": round(total_tokens / max(elapsed, 1e-9), 1),
                  "compile_seconds": round(compiling, 2),
                  "tokens_per_s_excluding_compile": round(
                      total_tokens / max(elapsed - compiling, 1e-9), 1),
                  "compilations": engine.compile_count, "store": path,
                  "mesh": dict(engine.mesh.shape) if engine.mesh is not None else None,
                  "skipped_long_prompts": len(too_long)})
  return summary


def collection_slots(engine, config) -> int:
  """Slots of slot-refill collection: collect.batch_size, or fewer where the device's free
  memory (`engine.kv_budget_tokens("auto")`) cannot hold that many max_seq_len caches."""
  from lsdist_jax.engine import kv_budget_tokens
  from lsdist_jax.shapes import round_up

  tokens, how = kv_budget_tokens(engine, "auto", float(config.schedule.kv_memory_fraction))
  cache = round_up(int(config.generation.max_seq_len), engine.generator.buckets.cache)
  slots = max(1, min(int(config.collect.batch_size), tokens // cache))
  logging.info("collect: %d slots of %d cache tokens (KV budget %s tokens, %s)", slots, cache,
               f"{tokens:,}", how)
  return slots


def combine_summaries(parts: list[dict], wall_seconds: float) -> dict:
  """One summary of several collection processes that ran side by side (one per GPU): the
  store's figures from the last, tokens summed, tokens/s over `wall_seconds` (the processes'
  start to the last one's end: model loading and compilation included)."""
  tokens = sum(int(p["new_tokens"]) for p in parts)
  out = dict(parts[-1])
  out.update({"processes": len(parts), "new_prompts": sum(int(p["new_prompts"]) for p in parts),
              "new_tokens": tokens, "seconds": round(wall_seconds, 2),
              "tokens_per_s": round(tokens / max(wall_seconds, 1e-9), 1),
              "compile_seconds": max(float(p["compile_seconds"]) for p in parts),
              "per_process": [{k: p[k] for k in ("process", "new_prompts", "new_tokens",
                                                 "seconds", "tokens_per_s")} for p in parts]})
  out.pop("tokens_per_s_excluding_compile", None)
  return out


def _progress_bar(total: int, enabled: bool):
  """A tqdm bar over samples with tokens/s in its postfix; a no-op when disabled."""
  if not enabled or total == 0:
    return lambda n, postfix=None: None
  from tqdm import tqdm

  bar = tqdm(total=total, unit="sample", dynamic_ncols=True, desc="collect")

  def update(n, postfix=None):
    bar.update(n)
    if postfix:
      bar.set_postfix_str(postfix)
    if bar.n >= total:
      bar.close()

  return update
