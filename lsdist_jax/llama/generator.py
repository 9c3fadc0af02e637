"""`Generator`: compiles the decode loops over bucketed shapes (one program per shape, counted and
timed apart from running), places batches on the mesh, and runs static batches (`generate`,
`embed`) or continuous slot-refill batches (`SlotBatch`, llama/slots.py).
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future, wait
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lsdist_jax import sharding as shd
from lsdist_jax.files import exclusive
from lsdist_jax.llama import decode
from lsdist_jax.llama.decode import DecodeResult
from lsdist_jax.llama.model import CACHE_AXES, Llama
from lsdist_jax.llama.sampling import sampling_rows
from lsdist_jax.llama.slots import SlotBatch, first_name, insert_name, shared_rows
from lsdist_jax.processes import compile_pool, process_age_s
from lsdist_jax.shapes import Buckets, batch_bucket, embed_rows, merge_blocks, round_up


def _abstract(x: np.ndarray) -> jax.ShapeDtypeStruct:
  """The shape and dtype a host array has once placed (what `Generator.precompile` takes)."""
  return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


class Generator:
  """Runs the decode loops (`decode.py`) over bucketed shapes, counts compilations, places data
  on the mesh."""

  def __init__(self, model: Llama, params, *, mesh: Mesh | None = None,
               buckets: Buckets | None = None, pad_id: int = 0, top_k_candidates: int = 16,
               compile_threads: int = 0):
    self.model, self.config, self.mesh = model, model.config, mesh
    self.buckets = buckets or Buckets()
    self.pad_id, self.top_k_candidates = pad_id, top_k_candidates
    self.eos_ids = tuple(self.config.eos_token_ids)
    self.filler_id = next(t for t in range(self.config.vocab_size) if t not in self.eos_ids)
    self.params = params
    self._fns, self._executables = {}, {}  # jitted functions; compiled programs by shapes
    self.compile_seconds = 0.0  # time spent compiling, kept apart from running
    # processes sharing a device (benchmark workers) run each call under this lock, waits counted
    self.device_lock: str | None = None
    self.wait_seconds = 0.0
    # `precompile` threads (0: a program compiles when first run), their compile time counted in
    # background_compile_seconds; compile_seconds holds only the time a run waited for one
    self.compile_threads = int(compile_threads)
    self.background_compile_seconds = 0.0
    self.precompiled_runs = 0  # executables first run that had compiled in the background
    # per program compiled: {"name", "seconds" (its compilation), "waited" (what a run waited)}
    self.compile_log: list[dict] = []
    self._pending: dict[tuple, Future] = {}
    self._lock, self._pool = threading.Lock(), None  # the pool: `compile_pool`, when first used

  @property
  def compile_count(self) -> int:
    """Programs compiled so far and run (each new bucketed shape compiles once)."""
    return len(self._executables)

  @staticmethod
  def _key(name: str, args) -> tuple:
    """An executable's key: its name and the shapes and dtypes of its last inputs (arrays or
    jax.ShapeDtypeStructs alike)."""
    leaves = jax.tree.leaves(args)
    key = (name,) + tuple((tuple(x.shape), str(x.dtype)) for x in leaves[-12:])
    return key + (len(leaves),)

  def _run(self, name: str, jitted, *args):
    """Runs `jitted` through an ahead-of-time compiled executable per input shape, so that
    compilation happens (and is timed) apart from execution. An executable compiling in the
    background (`precompile`) is waited for; the wait is compile time on the critical path."""
    key = self._key(name, args)
    exe = self._executables.get(key)
    if exe is None:
      start = time.perf_counter()
      with self._lock:
        future = self._pending.pop(key, None)
      exe, seconds, *timing = (future.result() if future is not None
                               else (jitted.lower(*args).compile(), None))
      self.precompiled_runs += future is not None
      waited = time.perf_counter() - start
      self.compile_seconds += waited
      self._executables[key] = exe
      seconds = round(waited if seconds is None else seconds, 3)
      self.compile_log.append({"name": name, "seconds": seconds, "waited": round(waited, 3),
                               **(timing[0] if timing else {})})  # and `_compile_behind`'s
    if self.device_lock is None:
      return exe(*args)
    with exclusive(self.device_lock) as waited:
      self.wait_seconds += waited
      return jax.block_until_ready(exe(*args))

  def program_states(self) -> dict[str, bool]:
    """{name: whether it can run now} of every program compiled or compiling, any shapes."""
    with self._lock:
      out = {key[0]: future.done() and not future.cancelled() and future.exception() is None
             for key, future in self._pending.items()}
    out.update({key[0]: True for key in list(self._executables)})
    return out

  def precompile(self, name: str, jitted, *args) -> bool:
    """Starts compiling `jitted` for these inputs (arrays or jax.ShapeDtypeStructs of the shapes
    `_run` will get under `name`) in a background thread, unless it is compiled or compiling
    already; a later `_run` of the same key takes the executable. Off on a mesh (its inputs'
    shardings are placed, not abstract) and with compile_threads 0. -> whether it started"""
    if self.compile_threads < 1 or self.mesh is not None:
      return False
    key = self._key(name, args)
    with self._lock:
      if key in self._executables or key in self._pending:
        return False
      if self._pool is None:
        self._pool = compile_pool(self.compile_threads)  # and a short GIL switch interval
      self._pending[key] = self._pool.submit(self._compile_behind, jitted, args)
    return True

  def adopt(self, other: "Generator") -> int:
    """Takes over the programs `other` compiled or is compiling in the background (a shape-only
    generator, `serve/early.py`), where its parameters have this one's structure, shapes and
    dtypes (else none: they would not run on these); returns how many it took."""
    def shapes(params):
      leaves, tree = jax.tree.flatten(params)
      return tree, [(tuple(x.shape), str(x.dtype)) for x in leaves]

    def program(gen):  # what, besides the inputs' shapes, makes the compiled programs
      m = gen.model
      return (m.config, m.dtype, m.param_dtype, m.decode_impl, m.scan_prefill,
              m.lower_blocks_once, gen.mesh, gen.top_k_candidates, gen.eos_ids, gen.filler_id)

    if program(other) != program(self) or shapes(other.params) != shapes(self.params):
      return 0
    with other._lock:
      offered = dict(other._pending)
      other._pending.clear()
    taken = 0
    with self._lock:
      for key, future in offered.items():
        if key in self._executables or key in self._pending:
          continue
        self._pending[key] = future
        taken += 1
    for future in offered.values():  # its compile time counts as this generator's, in the back
      future.add_done_callback(self._count_adopted)
    return taken

  def _count_adopted(self, future) -> None:
    if not future.cancelled() and future.exception() is None:
      with self._lock:
        self.background_compile_seconds += future.result()[1]

  def drop_precompiles(self) -> int:
    """Cancels the background compilations not yet started (a run that ended needs them no more,
    and a process waits for its threads' queue at exit); those under way finish. -> how many"""
    with self._lock:
      cancelled = [k for k, f in self._pending.items() if f.cancel()]
      for k in cancelled:
        del self._pending[k]
    return len(cancelled)

  def wait_precompiles(self) -> None:
    """Waits for the background compilations queued or under way (a steady-state benchmark
    times a run with its programs ready); the wait counts as compile time."""
    start = time.perf_counter()
    with self._lock:
      futures = list(self._pending.values())
    wait(futures)
    self.compile_seconds += time.perf_counter() - start

  def _compile_behind(self, jitted, args):
    """(executable, seconds, {"lower": seconds of them lowering, "started": process age})."""
    start, started = time.perf_counter(), process_age_s()
    lowered = jitted.lower(*args)
    lower = time.perf_counter() - start
    exe = lowered.compile()
    seconds = time.perf_counter() - start
    with self._lock:
      self.background_compile_seconds += seconds
    return exe, seconds, {"lower": round(lower, 3), "started": started}

  def _batch_sharding(self, batch: int, ndim: int) -> NamedSharding:
    spec = shd.logical_to_spec(("batch",) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1),
                               self.mesh)
    return NamedSharding(self.mesh, spec)

  def _param_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.params)

  def _place(self, x: np.ndarray):
    return (jnp.asarray(x) if self.mesh is None
            else jax.device_put(x, self._batch_sharding(x.shape[0], x.ndim)))

  def _generate_fn(self, batch: int, cache_len: int, hidden_layer: int):
    key = ("generate", cache_len, hidden_layer) + ((batch,) if self.mesh is not None else ())
    if key not in self._fns:

      def traced(*args):
        return decode.generate_core(*args, model=self.model, cache_len=cache_len,
                              hidden_layer=hidden_layer,
                              top_k_candidates=self.top_k_candidates, eos_ids=self.eos_ids,
                              filler_id=self.filler_id, mesh=self.mesh)

      if self.mesh is None:
        self._fns[key] = jax.jit(traced)
      else:  # params stay where they are; batch arrays split over `data`; scalars replicated
        rows, rows2 = self._batch_sharding(batch, 1), self._batch_sharding(batch, 2)
        rep = NamedSharding(self.mesh, P())
        self._fns[key] = jax.jit(  # the sampling settings per row: seed, temperature, top_p
            traced, in_shardings=(self._param_shardings(), rows2) + (rows,) * 6
            + (rep, rows, rows, rows2),
            out_shardings=(rows2, rows, rows, rows2, rep))
    return self._fns[key]

  def _prefill_fn(self, hidden_layer: int):
    key = ("prefill", hidden_layer)
    if key not in self._fns:  # (params, tokens, pad_len); shardings follow the placed inputs
      self._fns[key] = jax.jit(functools.partial(decode.prefill_hidden, model=self.model,
                                                 hidden_layer=hidden_layer))
    return self._fns[key]

  def _rows_bucket(self, n: int) -> int:
    """The row count a call of n rows runs at: its batch bucket, a multiple of the mesh's data
    axis."""
    b = batch_bucket(n, self.buckets.batch)
    return round_up(b, self.mesh.shape["data"]) if self.mesh is not None else b

  def _pack(self, prompts: Sequence[Sequence[int]]):
    """Left-pads prompts into [B, P] with B, P rounded up to buckets. Padding rows are inert."""
    n = len(prompts)
    if n == 0:
      raise ValueError("no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
      raise ValueError(f"prompt {int(lengths.argmin())} is empty")
    b = self._rows_bucket(n)
    p = round_up(int(lengths.max()), self.buckets.prompt)
    tokens = np.full((b, p), self.pad_id, np.int32)
    pad_len = np.full((b,), p, np.int32)
    for i, prompt in enumerate(prompts):
      tokens[i, p - len(prompt):] = prompt
      pad_len[i] = p - len(prompt)
    return tokens, pad_len, lengths, b, p

  def generate(self, prompts: Sequence[Sequence[int]], *, cap: int, max_seq_len: int,
               seed=0, temperature=0.6, top_p=0.9,
               request_ids: Sequence[int] | None = None,
               start_steps: Sequence[int] | None = None,
               forced_lengths: Sequence[int] | None = None,
               max_new_tokens: Sequence[int] | None = None,
               hidden_layer: int = -1, cache_len: int | None = None) -> DecodeResult:
    """Generates for one batch of token-id prompts.

    cap: the most tokens any row may generate in this call (a traced value: changing it does
      not recompile). max_seq_len: prompt + response limit; a row whose prompt (here: the
      original prompt plus any partial response being continued) leaves no room is refused.
    request_ids / start_steps: the PRNG identity of each row and how many tokens it already
      generated in earlier calls (continuation), so that sampling continues identically.
    forced_lengths: length replay; row r emits EOS at exactly that many generated tokens.
    seed / temperature / top_p: one value for every row, or one per row (`sampling_rows`).
    max_new_tokens: per row, the most tokens it may still generate (a request's own max_tokens
      less what it generated before); it ends there unfinished, like at max_seq_len.
    cache_len: the KV-cache length; default prompt block + cap rounded up to the cache bucket.
    """
    n = len(prompts)
    tokens, pad_len, lengths, b, p = self._pack(prompts)
    too_long = np.nonzero(lengths >= max_seq_len)[0]
    if too_long.size:
      i = int(too_long[0])
      raise ValueError(f"prompt {i} has {int(lengths[i])} tokens, which leaves no room in "
                       f"max_seq_len={max_seq_len} (prompt + response)")
    if self.config.max_position_embeddings and max_seq_len > self.config.max_position_embeddings:
      raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context "
                       f"({self.config.max_position_embeddings} positions)")
    cap = int(min(cap, max_seq_len - int(lengths.min())))
    if cap < 1:
      raise ValueError(f"cap must be >= 1, got {cap}")
    s = cache_len or round_up(p + cap, self.buckets.cache)
    if s < p + cap:
      raise ValueError(f"cache_len={s} is smaller than prompt block {p} + cap {cap}")

    def per_row(values, default, dtype):
      arr = np.full((b,), default, dtype)
      if values is not None:
        if len(values) != n:
          raise ValueError(f"expected {n} per-row values, got {len(values)}")
        arr[:n] = np.asarray(values, dtype)
      return arr

    rid = per_row(request_ids if request_ids is not None else range(n), 0, np.uint32)
    start = per_row(start_steps, 0, np.int32)
    limit = np.zeros((b,), np.int32)
    limit[:n] = max_seq_len - lengths
    if max_new_tokens is not None:
      limit[:n] = np.minimum(limit[:n], per_row(max_new_tokens, 0, np.int32)[:n])
    active = np.zeros((b,), bool)
    active[:n] = True
    forced = per_row(forced_lengths, -1, np.int32)
    if forced_lengths is not None:
      forced[:n] = np.where(forced[:n] >= 0, forced[:n], -1)

    fn = self._generate_fn(b, s, hidden_layer)
    args = [self._place(x) for x in (tokens, pad_len, rid, start, limit, active, forced)]
    settings = [self._place(x) for x in sampling_rows(n, b, seed, temperature, top_p)]
    out, n_gen, finished, hidden, steps = self._run(
        f"generate/{s}/{hidden_layer}", fn, self.params, *args, jnp.int32(cap), *settings)
    out, n_gen, finished, hidden = shd.to_host((out, n_gen, finished, hidden))
    return DecodeResult(tokens=np.asarray(out)[:n], num_generated=np.asarray(n_gen)[:n],
                        finished=np.asarray(finished)[:n], hidden=np.asarray(hidden)[:n],
                        steps=int(steps))

  def embed(self, prompts: Sequence[Sequence[int]], hidden_layer: int = -1,
            max_batch: int = 64, prefill_seconds=None, compile_seconds: float = 0.0
            ) -> np.ndarray:
    """The hidden state of each prompt's last token at `hidden_layer`. -> [n, D] float32.
    Prompts run longest first in calls of at most max_batch rows, every call at one row count
    and its prompts padded to a context block (prompt bucket x 2^i), so a call compiles at most
    one program per block length (ahead, in parallel, with compile_threads). With
    `prefill_seconds(rows, block)` (a cost model's) the rows of least padded time
    (`shapes.embed_rows`), and blocks merge where padding costs less than `compile_seconds`."""
    order, calls, name, fn, rows = self.precompile_embed(prompts, hidden_layer, max_batch,
                                                         prefill_seconds, compile_seconds)
    hidden = np.empty((len(prompts), self.config.hidden_size), np.float32)
    for start, (tokens, pad_len) in zip(range(0, len(prompts), rows), calls):
      rows_here = order[start:start + rows]
      out = self._run(name, fn, self.params, self._place(tokens), self._place(pad_len))
      hidden[rows_here] = np.asarray(shd.to_host(out))[:len(rows_here)]
    return hidden

  def precompile_embed(self, prompts: Sequence[Sequence[int]], hidden_layer: int = -1,
                       max_batch: int = 64, prefill_seconds=None, compile_seconds: float = 0.0):
    """Starts compiling the prefill programs `embed` with these arguments runs (a job calls it
    once its prompts are tokenized). -> (prompt order, (tokens, pad_len) per call, name, fn,
    rows per call), for embed."""
    if len(prompts) == 0:
      raise ValueError("no prompts given")
    order = np.argsort([-len(x) for x in prompts], kind="stable")
    top = self._rows_bucket(min(int(max_batch), len(prompts)))
    limit = self.config.max_position_embeddings or 1 << 30
    sizes = {self._rows_bucket(b) for b in self.buckets.batch if b <= top} | {top}
    rows = embed_rows(len(prompts), sizes, self.buckets.insert_block(
        max(len(x) for x in prompts), limit), prefill_seconds)
    calls = []
    for start in range(0, len(prompts), rows):
      tokens, pad_len, _, _, p = self._pack([prompts[i] for i in order[start:start + rows]])
      if p > limit:
        raise ValueError(f"prompt of {p} tokens exceeds the model's context ({limit})")
      calls.append((tokens, pad_len, self.buckets.insert_block(p, limit)))
    blocks = ({b: b for *_, b in calls} if prefill_seconds is None else
              merge_blocks([b for *_, b in calls], rows, prefill_seconds, compile_seconds))
    calls = [self._pad_call(tokens, pad_len, rows, blocks[b]) for tokens, pad_len, b in calls]
    name, fn = f"prefill/{hidden_layer}", self._prefill_fn(hidden_layer)
    for tokens, pad_len in calls:
      self.precompile(name, fn, self.params, _abstract(tokens), _abstract(pad_len))
    return order, calls, name, fn, rows

  def _pad_call(self, tokens: np.ndarray, pad_len: np.ndarray, rows: int, block: int):
    """[k, p] packed prompts -> [rows, block]: inert padding rows (all padding) below, more
    left padding before. rows >= k, block >= p."""
    k, p = tokens.shape
    if rows > k:
      tokens = np.pad(tokens, ((0, rows - k), (0, 0)), constant_values=self.pad_id)
      pad_len = np.pad(pad_len, (0, rows - k), constant_values=p)
    if block > p:
      tokens = np.pad(tokens, ((0, 0), (block - p, 0)), constant_values=self.pad_id)
      pad_len = pad_len + (block - p)
    return tokens, pad_len

  def last_logits(self, prompts: Sequence[Sequence[int]]) -> jax.Array:
    """The next-token logits after each prompt, on the device. -> [n, V] float32."""
    key = ("logits",)
    if key not in self._fns:
      self._fns[key] = jax.jit(lambda params, tokens, pad_len: decode.prefill_logits(
          params, tokens, pad_len, model=self.model))
    tokens, pad_len, _, _, _ = self._pack(prompts)
    logits = self._run("logits", self._fns[key], self.params, self._place(tokens),
                       self._place(pad_len))
    return logits[:len(prompts)]

  # ------------------------------------------------------------------------- slot refill

  def open_slots(self, slots: int, cache_len: int, *, max_seq_len: int, seed: int = 0,
                 temperature: float = 0.6, top_p: float = 0.9,
                 hidden_layer: int = -1) -> SlotBatch:
    """A continuous batch of `slots` rows (rounded up to a batch bucket, and to a multiple of
    the mesh's data axis) over `cache_len` KV slots per row, with default sampling settings (an
    insert may give its rows their own: `SlotBatch.insert`); each
    insert keeps its rows' hidden states at `hidden_layer` (`SlotBatch.hidden`). On a mesh the
    slots are split over `data` and the cache's kv heads over `model`. See `SlotBatch`."""
    b = batch_bucket(int(slots), self.buckets.batch)
    if self.mesh is not None:
      b = round_up(b, self.mesh.shape["data"])
    s = round_up(int(cache_len), self.buckets.cache)
    key = ("slot_state", b, s)
    if key not in self._fns:
      self._fns[key] = jax.jit(lambda: decode.slot_state(b, s, model=self.model),
                               out_shardings=self._slot_shardings(b, s))
    return SlotBatch(self, self._fns[key](), b, s, max_seq_len=int(max_seq_len),
                     sampling=sampling_rows(b, b, seed, temperature, top_p),
                     hidden_layer=int(hidden_layer))

  def precompile_slots(self, slots: int, cache_len: int, inserts: Sequence[tuple[int, int]], *,
                       hidden_layer: int = -1, share_prefill: bool = False,
                       samplers_for: Sequence[int] = ()) -> int:
    """Starts compiling, in the background (`precompile`), the programs a slot batch of
    `open_slots(slots, cache_len, hidden_layer=...)` will run, in the order it needs them: the
    first of `inserts` (rows as `SlotBatch.insert` rounds them, a context block as
    `Buckets.insert_block`) and its first-token sampling, the decode loop, then each further
    insert and sampler; with `share_prefill` each insert's shared-prefill twin
    (`slots.shared_rows`) too; then the first-token sampler of inserts of each of
    `samplers_for` rows (it does not depend on the context block). A short queue of compile
    threads thus builds what the first fill waits for first. Returns how many started."""
    b = batch_bucket(int(slots), self.buckets.batch)
    s = round_up(int(cache_len), self.buckets.cache)
    state = jax.eval_shape(lambda: decode.slot_state(b, s, model=self.model))
    insert_fn = self._slot_fn("slot_insert", b, s, hidden_layer)
    first_fn = self._slot_fn("slot_first", b, s)
    fitting = list(dict.fromkeys((self._rows_bucket(int(r)), int(b_)) for r, b_ in inserts
                                 if b_ <= s))  # in the order given, each once
    started, samplers = 0, set()

    def decode_loop():
      return int(self.precompile(f"slot_decode/{b}/{s}", self._slot_fn("slot_decode", b, s),
                                 self.params, state, _abstract(np.int32(0)),
                                 *map(_abstract, sampling_rows(b, b, 0, 0.6, 0.9))))

    def sampler(rows):  # one per rows, whatever the block
      if rows in samplers:
        return 0
      samplers.add(rows)
      ints = [jax.ShapeDtypeStruct((rows,), np.int32)] * 4  # starts, caps, limits, forced
      return int(self.precompile(  # logits, slots, request ids, then `ints`, then settings
          first_name(b, s, rows), first_fn, state,
          jax.ShapeDtypeStruct((rows, self.config.vocab_size), np.float32),
          jax.ShapeDtypeStruct((rows,), np.int32), jax.ShapeDtypeStruct((rows,), np.uint32),
          *ints, *map(_abstract, sampling_rows(rows, rows, 0, 0.6, 0.9))))

    for k, (rows, block) in enumerate(fitting):
      for u in sorted({rows, shared_rows(self, rows) if share_prefill else rows}):
        started += self.precompile(  # slots, tokens [u, block], pad_len [u], source
            insert_name(b, s, rows, block, hidden_layer, u), insert_fn, self.params, state,
            jax.ShapeDtypeStruct((rows,), np.int32), jax.ShapeDtypeStruct((u, block), np.int32),
            jax.ShapeDtypeStruct((u,), np.int32), jax.ShapeDtypeStruct((rows,), np.int32))
      started += sampler(rows)
      if k == 0:
        started += decode_loop()
    if not fitting:
      started += decode_loop()
    for rows in samplers_for:
      started += sampler(self._rows_bucket(int(rows)))
    return started

  def _slot_shardings(self, batch: int, cache_len: int):
    """Shardings of a slot state on the mesh (None without one)."""
    if self.mesh is None:
      return None
    cache_shape = (batch, self.config.num_kv_heads, cache_len, self.config.head_dim)
    cs = shd.named_sharding(self.mesh, CACHE_AXES, cache_shape)
    rows, rows2 = self._batch_sharding(batch, 1), self._batch_sharding(batch, 2)
    state = {name: rows for name in ("tok", "plen", "rid", "start", "n_gen", "cap", "limit",
                                     "forced", "done", "finished")}
    return dict(state, cache=[{"k": cs, "v": cs}] * self.config.num_layers, out=rows2,
                hidden=rows2)

  def _slot_fn(self, kind: str, batch: int, cache_len: int, hidden_layer: int = -1):
    """The jitted slot program `kind`: slot_insert (params, state, slots, tokens, pad_len,
    source) -> (state, logits); slot_first (state, logits, slots and eight more per-row
    arrays) -> state; slot_decode (params, state, free_target, seed, temperature, top_p) ->
    (state, steps). Each donates the state."""
    key = (kind, hidden_layer) + ((batch, cache_len) if self.mesh is not None else ())
    if key in self._fns:
      return self._fns[key]
    sampler = dict(top_k_candidates=self.top_k_candidates, eos_ids=self.eos_ids,
                   filler_id=self.filler_id, mesh=self.mesh)
    core, kw, donate = {
        "slot_insert": (decode.slot_insert, dict(model=self.model, hidden_layer=hidden_layer), 1),
        "slot_first": (decode.slot_first, sampler, 0),
        "slot_decode": (decode.slot_decode, dict(sampler, model=self.model), 1)}[kind]
    if self.mesh is None:
      self._fns[key] = jax.jit(lambda *a: core(*a, **kw), donate_argnums=(donate,))
      return self._fns[key]
    # on a mesh the state keeps its shardings from call to call; the inserted rows (and their
    # logits) are replicated; a decode's per-slot sampling settings split like the slots
    state = self._slot_shardings(batch, cache_len)
    rep = NamedSharding(self.mesh, P())
    rows, rows2 = self._batch_sharding(batch, 1), self._batch_sharding(batch, 2)
    ins, outs = {
        "slot_insert": ((self._param_shardings(), state) + (rep,) * 4, (state, rep)),
        "slot_first": ((state,) + (rep,) * 10, state),
        "slot_decode": ((self._param_shardings(), state, rep, rows, rows, rows2), (state, rep)),
    }[kind]
    self._fns[key] = jax.jit(lambda *a: core(*a, **kw), donate_argnums=(donate,),
                             in_shardings=ins, out_shardings=outs)
    return self._fns[key]
