"""The generate job's first programs, compiled while the model loads.

A job whose requests all fit in one slot batch runs them at once (`plan.fits_at_once`): one
phase of bucket(n) slots over a cache of max_seq_len, whatever the prompts. Its decode loop is
the job's longest compilation (9 s alone on an H200, more beside others) and depends only on
shapes: the model's (from the file's header), the slots and the cache. `start` builds it on a
shape-only generator (abstract parameters) as soon as the input's line count is known, before
the weights are read and dequantized; `adopt` hands it to the loaded engine's generator, which
then runs it like a program compiled ahead. A guess that turns out wrong (prompts dropped as too
long, a budget that does not hold them) costs only background compilation.

A larger job is planned from its predictions, later; `start` then compiles the decode loop of
the most slots the budget allows over a cache of max_seq_len (the plan that gives every request
its whole room) and the first-token sampler of a refill's rows (such a plan's first fill too is
made of refill-sized inserts: `ServeRunner._run_phase`), and the planner charges those programs
no compilation (`Options.compiled`), so a plan that uses them starts decoding without waiting
for them.

Both also compile what depends on the prompts' lengths: a thread (`ahead`) builds the model
file's tokenizer (the one `Engine.load` then takes instead of building its own), tokenizes the
prompts (the token ids the job then uses) and starts compiling the first fill's insert (for a
larger job: the smallest refill's, at the longest prompt's block) and the prediction's prefill
(`EarlyStart.first_fill`, `Generator.precompile_embed`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from concurrent.futures import Future
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lsdist_jax.llama.config import LlamaConfig, get_preset, resolve_scan_prefill


def header_config(name_or_path: str) -> LlamaConfig | None:
  """The model's config without its weights: a GGUF file's header, the bundled SmolLM2's, or
  the `tiny` preset; None for anything else (nothing is compiled early)."""
  from lsdist_jax.llama import gguf_file
  from lsdist_jax.llama.config import from_gguf_metadata

  if name_or_path == "tiny":
    return get_preset("tiny")
  if name_or_path in ("smollm2-135m-instruct", "smollm2-135m"):
    return get_preset("smollm2-135m-instruct")
  if not (os.path.isfile(name_or_path) and name_or_path.endswith(".gguf")):
    return None
  try:
    header = gguf_file.read(name_or_path)
    if header is None:
      return None
    return from_gguf_metadata(header.fields, "output.weight" in header.tensors,
                              name=os.path.basename(name_or_path))
  except Exception as e:  # the loader names a bad file properly; here it only means "not early"
    logging.debug("no early compilation for %s: %s", name_or_path, e)
    return None


def placed_params(model, dtype: str):
  """The parameters' shapes and dtypes once an `Engine` has placed them (norm scales in float32,
  the rest in the engine's dtype), without making them."""
  from lsdist_jax.engine import placed_dtype
  from lsdist_jax.llama.model import abstract_params

  def cast(path, x):
    return jax.ShapeDtypeStruct(x.shape, placed_dtype(path, dtype))

  boxed = abstract_params(model)
  plain = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, boxed,
                       is_leaf=lambda x: hasattr(x, "unbox"))
  return jax.tree_util.tree_map_with_path(cast, plain)


@dataclasses.dataclass
class EarlyStart:
  generator: Any  # the shape-only `Generator` compiling in the background (`Generator.adopt`)
  programs: frozenset  # what it compiles, as the planner names programs (`Options.compiled`)
  slots: int = 0  # the slot batch it guessed: slots x cache
  cache: int = 0
  # its inserts' rows, as the planner counts them (a batch bucket): all the slots' when every
  # request fits at once, else the smallest refill's (`REFILL_FRACTIONS`)
  rows: int = 0
  at_once: bool = True  # whether every request fits that batch at once (no refills)
  thread: Any = None  # tokenizing the prompts to compile their programs too (`ahead`)
  tokenizer: Any = None  # a Future of the Tokenizer `ahead` builds (`Engine.load`'s)
  ids: list | None = None  # the prompts' token ids, by that tokenizer

  def join(self) -> None:
    """Waits for `ahead` (call before the engine adopts the programs)."""
    if self.thread is not None:
      self.thread.join()

  def first_fill(self, generator, prompt_len) -> "EarlyStart":
    """Once the prompts are tokenized: starts compiling (on `generator`, which adopted this
    one's programs) an insert of `rows` rows at the context block of the longest prompt,
    prefilling every row (it covers any such insert of these prompts), and its sampler: the
    first fill's of all the slots when every request fits at once, else the smallest refill's
    the planner tries, of which its first fill too is made (a plan of one block per phase then
    compiles nothing more). Returns this early start with those among its programs."""
    block = int(generator.buckets.insert_block(int(np.max(prompt_len)), self.cache))
    generator.precompile_slots(self.slots, self.cache, [(self.rows, block)])
    programs = {("insert", self.slots, self.cache, self.rows, block),
                ("first", self.slots, self.cache, self.rows)}
    return dataclasses.replace(self, programs=self.programs | programs)


def start(config, n_requests: int, texts=(), embed_layer: int | None = None
          ) -> EarlyStart | None:
  """A shape-only Generator compiling, in the background, the decode loop of the one-phase plan
  `n_requests` requests run when they all fit at once, or, when they do not, of the most slots
  over a cache of max_seq_len, and its first fill's sampler; None when the model's shape is not
  known without loading it, on a mesh, with compile_threads 0, or when not even one row fits
  the KV budget. With the requests' prompt `texts`, a thread (`ahead`) tokenizes them as the
  loaded model will and starts compiling their first fill's and refills' inserts, and with
  `embed_layer` the prediction's prefill at that layer, all while the weights load."""
  from lsdist_jax import engine as eng
  from lsdist_jax.llama.generator import Generator
  from lsdist_jax.llama.model import Llama
  from lsdist_jax.schedule import Options
  from lsdist_jax.schedule.continuous import refill_for, slots_for
  from lsdist_jax.schedule.continuous_search import REFILL_FRACTIONS
  from lsdist_jax.serve.plan import load_cost_model, slots_at_once
  from lsdist_jax.shapes import Buckets, round_up

  threads = int(config.engine.get("compile_threads", 0))
  cfg = header_config(config.model.path or config.model.name)
  if cfg is None or threads < 1 or n_requests < 1 or eng.engine_mesh(config.mesh) is not None:
    return None
  eng.prepare_compilation(config)
  dtype = config.model.dtype
  impl = eng.resolve_decode_impl(config.engine.get("decode_attention", "auto"), dtype, None,
                                 cfg.head_dim)
  model = Llama(cfg, dtype=eng.DTYPES[dtype], param_dtype=eng.DTYPES[dtype], decode_impl=impl,
                scan_prefill=resolve_scan_prefill(config.engine.get("scan_prefill", "auto"), cfg,
                                                  jnp.dtype(eng.DTYPES[dtype]).itemsize))
  setting = config.schedule.kv_budget_tokens
  if isinstance(setting, str):
    budget, _ = eng.free_memory_tokens(eng.kv_bytes_per_token(cfg, dtype),
                                       float(config.schedule.kv_memory_fraction))
  else:
    budget = int(setting)
  cost = load_cost_model(config)
  cache = round_up(int(config.generation.max_seq_len), int(cost.cache_bucket))
  options = Options.from_config(dict(config.schedule.items(), kv_budget_tokens=budget))
  slots = slots_at_once(n_requests, cache, cost, options)
  at_once = slots > 0
  if not at_once:  # the most slots, if one row fits at all
    if options.kv_budget_tokens < cache:
      return None
    slots = slots_for(cache, cost, options)
  gen = Generator(model, placed_params(model, dtype), buckets=Buckets.from_config(config.engine),
                  pad_id=cfg.pad_token_id, compile_threads=threads)
  programs = {("decode", slots, cache)}
  # and the first-token sampler of its inserts (a sampler does not depend on the block; the
  # insert's waits for the prompts' lengths: `EarlyStart.first_fill`)
  rows = int(cost.padded_batch(slots if at_once else refill_for(slots, min(REFILL_FRACTIONS))))
  gen.precompile_slots(slots, cache, [], samplers_for=[rows])
  programs.add(("first", slots, cache, rows))
  early = EarlyStart(gen, frozenset(programs), slots, cache, rows, at_once)
  if len(texts):
    early.tokenizer = Future()
    early.thread = threading.Thread(target=ahead, name="early-tokenize", daemon=True,
                                    args=(early, config, cfg, list(texts), cost, embed_layer))
    early.thread.start()
  return early


def ahead(early: EarlyStart, config, cfg: LlamaConfig, texts, cost, embed_layer) -> None:
  """`early`'s programs that need the prompts' lengths, compiling on its generator: the model
  file's tokenizer built as the engine builds it (and handed to it: `early.tokenizer`), the
  prompts tokenized (`early.ids`), then `EarlyStart.first_fill` and, with `embed_layer` and
  refills to plan, the prediction's prefill of the distinct prompts
  (`Generator.precompile_embed`, as `serve.requests.embed_requests` will run it). Only a head
  start: anything amiss is logged and left to the job."""
  try:
    tokenizer = gguf_tokenizer(config, cfg)
    early.tokenizer.set_result(tokenizer)
    if tokenizer is None:
      return
    ids = early.ids = tokenizer.encode_prompts(texts)
    if embed_layer is not None and not early.at_once:  # first: the prediction runs first
      distinct = [list(x) for x in dict.fromkeys(tuple(x) for x in ids)]
      early.generator.precompile_embed(distinct, int(embed_layer),
                                       prefill_seconds=cost.prefill_call_time,
                                       compile_seconds=float(config.schedule.compile_seconds))
    early.first_fill(early.generator, [len(x) for x in ids])
  except Exception as e:  # noqa: BLE001 - the job tokenizes and compiles what it needs itself
    logging.warning("generate: no early compilation of the prompts' programs (%s: %s)",
                    type(e).__name__, e)
  finally:
    if not early.tokenizer.done():
      early.tokenizer.set_result(None)  # the engine builds its own


def gguf_tokenizer(config, cfg: LlamaConfig):
  """The Tokenizer `Engine.load` builds for config.model where it is a GGUF file (or the
  bundled SmolLM2's); None otherwise."""
  from lsdist_jax.engine import find_smollm2_gguf
  from lsdist_jax.llama.tokenizer import Tokenizer, gguf_hf_tokenizer

  name = config.model.path or config.model.name
  if name in ("smollm2-135m-instruct", "smollm2-135m"):
    path, label = find_smollm2_gguf(), name
  elif os.path.isfile(name) and name.endswith(".gguf"):
    path, label = name, cfg.name
  else:
    return None
  return Tokenizer(gguf_hf_tokenizer(path), config.model.chat_format, label, cfg.bos_token_id)
