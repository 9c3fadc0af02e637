"""Batched generation: prefill, then one jitted `lax.while_loop` decode with per-request PRNG.

Sampling is temperature + nucleus (top-p) or greedy (temperature 0). The random number for
request r's t-th generated token depends on (seed, r, t) only, so a response is the same in any
batch, with any padding, and after a cap followed by a continuation from prompt + partial response.

Length convention (see `lsdist_jax.config`): a row's length is the number of tokens it generated
before EOS (EOS excluded). A call's `cap` bounds the tokens a row may generate in this call; the
sample after the cap is taken only to see whether it is EOS (then the row finished exactly at the
cap); a row that reached the cap otherwise comes back unfinished, to be continued later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lsdist_jax.llama.model import CACHE_AXES, Llama, init_cache
from lsdist_jax import sharding as shd

# ----------------------------------------------------------------------------------- sampling


def request_uniforms(seed: jax.Array, request_ids: jax.Array, steps: jax.Array) -> jax.Array:
  """u ~ U[0, 1) per row, a function of (seed, request_id, step) only. [B] float32."""
  base = jax.random.key(seed)

  def one(r, t):
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(base, r), t), (),
                              jnp.float32)

  return jax.vmap(one)(request_ids.astype(jnp.uint32), steps.astype(jnp.uint32))


def nucleus_size(sorted_probs: jax.Array, top_p: jax.Array) -> jax.Array:
  """Smallest m with sum(sorted_probs[:m]) >= top_p. sorted_probs: [B, K] descending -> [B].

  Returns K + 1 where the K given probabilities do not reach top_p."""
  return _nucleus_count(jnp.cumsum(sorted_probs, axis=-1), top_p)


def _nucleus_count(cum: jax.Array, top_p: jax.Array) -> jax.Array:
  """nucleus_size from the cumulative sums of the descending probabilities."""
  return 1 + jnp.sum(cum < top_p, axis=-1)


def _pick_in_nucleus(sorted_probs, sorted_ids, top_p, u, cum=None):
  """Inverse-CDF pick inside the nucleus of descending probabilities. [B, K] -> [B] token ids.
  `cum`: their cumulative sums, if already computed."""
  k = sorted_probs.shape[-1]
  cum = jnp.cumsum(sorted_probs, axis=-1) if cum is None else cum
  m = jnp.minimum(_nucleus_count(cum, top_p), k)
  mass = jnp.take_along_axis(cum, (m - 1)[:, None], axis=-1)[:, 0]
  target = u * mass
  j = jnp.minimum(jnp.sum(cum < target[:, None], axis=-1), m - 1)
  return jnp.take_along_axis(sorted_ids, j[:, None], axis=-1)[:, 0]


def top_k(values: jax.Array, k: int, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
  """jax.lax.top_k over the last axis (the same values and indices, ties to the lower index),
  in two cheap passes for wide rows: the k chunks of `chunk` entries with the largest maxima hold
  every one of the top k, so only they are gathered and searched. [R, V] -> ([R, k], [R, k])."""
  rows, width = values.shape
  if width < 4 * k * chunk:
    return jax.lax.top_k(values, k)
  n_chunks = -(-width // chunk)
  padded = jnp.pad(values, ((0, 0), (0, n_chunks * chunk - width)), constant_values=-jnp.inf)
  blocks = padded.reshape(rows, n_chunks, chunk)
  _, best_chunks = jax.lax.top_k(jnp.max(blocks, axis=-1), k)  # [R, k]
  # ascending chunk order keeps candidates in index order, so ties still go to the lower index
  best_chunks = jnp.sort(best_chunks, axis=-1)
  candidates = jnp.take_along_axis(blocks, best_chunks[:, :, None], axis=1).reshape(rows, -1)
  ids = (best_chunks[:, :, None] * chunk + jnp.arange(chunk)[None, None, :]).reshape(rows, -1)
  top_values, where = jax.lax.top_k(candidates, k)
  return top_values, jnp.take_along_axis(ids, where, axis=-1).astype(jnp.int32)


def _sorted_desc(probs):
  """probs sorted descending, ties by lower token id. [R, V] -> ([R, V], [R, V] int32)."""
  ids = jnp.broadcast_to(jnp.arange(probs.shape[-1], dtype=jnp.int32), probs.shape)
  neg_sorted, sorted_ids = jax.lax.sort((-probs, ids), dimension=-1, num_keys=1, is_stable=True)
  return -neg_sorted, sorted_ids


def sample_tokens(logits: jax.Array, u: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  top_k_candidates: int = 16, hard_rows: int = 32) -> jax.Array:
  """One token per row. logits: [B, V] float32, u: [B] -> [B] int32.

  temperature <= 0 is greedy. top_p < 1 keeps exactly the smallest set of most probable tokens
  whose mass reaches top_p (ties broken by lower token id) and draws from it by inverse CDF in
  descending-probability order. Where that set is found does not change the draw: among the
  `top_k_candidates` most probable tokens for most rows; rows whose set is larger (up to
  `hard_rows` of them) are gathered and fully sorted; a batch with more such rows sorts all."""
  logits = logits.astype(jnp.float32)
  batch, vocab = logits.shape
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6), axis=-1)
  k = min(top_k_candidates, vocab)
  hard_rows = min(hard_rows, batch)

  def sort_all(_):
    return _pick_in_nucleus(*_sorted_desc(probs), top_p, u)

  def nucleus(_):
    top_probs, top_ids = top_k(probs, k)
    top_cum = jnp.cumsum(top_probs, axis=-1)
    easy = _pick_in_nucleus(top_probs, top_ids.astype(jnp.int32), top_p, u, top_cum)
    hard = _nucleus_count(top_cum, top_p) > k  # [B]

    def sort_hard_rows(_):
      rows = jnp.nonzero(hard, size=hard_rows, fill_value=0)[0]
      picked = _pick_in_nucleus(*_sorted_desc(probs[rows]), top_p, u[rows])
      return easy.at[rows].set(jnp.where(hard[rows], picked, easy[rows]))

    n_hard = jnp.sum(hard)
    return jax.lax.switch(jnp.where(n_hard == 0, 0, jnp.where(n_hard <= hard_rows, 1, 2)),
                          [lambda _: easy, sort_hard_rows, sort_all], None)

  def plain(_):
    # top_p >= 1: every token is a candidate; inverse CDF in token order needs no sort.
    cum = jnp.cumsum(probs, axis=-1)
    j = jnp.sum(cum < (u * cum[:, -1])[:, None], axis=-1)
    return jnp.minimum(j, vocab - 1).astype(jnp.int32)

  sampled = jax.lax.cond(top_p >= 1.0, plain, nucleus, None)
  return jnp.where(temperature <= 0.0, greedy, sampled)


# ----------------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class DecodeResult:
  tokens: np.ndarray  # [B, G] int32, row b's generated tokens in [:num_generated[b]]
  num_generated: np.ndarray  # [B] int32 (EOS excluded)
  finished: np.ndarray  # [B] bool: ended with EOS
  hidden: np.ndarray | None  # [B, D] float32: hidden state at the last prompt token
  steps: int  # decode iterations run (model evaluations after prefill)


def _choose(logits_last, request_ids, steps, forced_len, seed, temperature, top_p, *,
            top_k_candidates, eos, filler_id):
  """The token of each row at its token index `steps` (with length replay)."""
  u = request_uniforms(seed, request_ids, steps)
  tok = sample_tokens(logits_last, u, temperature, top_p, top_k_candidates)
  # Length replay: EOS exactly at the recorded length, never before it.
  replay = forced_len >= 0
  tok = jnp.where(replay & (steps >= forced_len), eos[0], tok)
  return jnp.where(replay & (steps < forced_len) & jnp.isin(tok, eos), filler_id, tok)


def _generate_core(params, tokens, pad_len, request_ids, start_step, row_limit, active,
                   forced_len, cap, seed, temperature, top_p, *, model: Llama, cache_len: int,
                   hidden_layer: int, top_k_candidates: int, eos_ids: tuple[int, ...],
                   filler_id: int, cache_sharding=None):
  """tokens: [B, P] left-padded prompts; per-row int arrays [B]; scalars cap/seed/temperature/top_p.

  Returns (out_tokens [B, G], num_generated [B], finished [B], hidden [B, D], steps)."""
  b, p = tokens.shape
  g = cache_len - p
  cache = init_cache(model.config, b, cache_len, model.dtype)
  if cache_sharding is not None:
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
  variables = {"params": params}
  logits, hidden, cache = model.apply(variables, tokens, cache, jnp.zeros((), jnp.int32), pad_len,
                                      logits_at="last", hidden_layers=(hidden_layer,))
  hidden_state = hidden[hidden_layer][:, -1].astype(jnp.float32)
  eos = jnp.asarray(eos_ids, jnp.int32)
  cap = jnp.minimum(cap, g)

  def choose(logits_last, i):
    return _choose(logits_last, request_ids, start_step + i, forced_len, seed, temperature, top_p,
                   top_k_candidates=top_k_candidates, eos=eos, filler_id=filler_id)

  def update(state, tok, i):
    out, n_gen, done, finished = state
    is_eos = jnp.isin(tok, eos)
    newly_finished = ~done & is_eos
    accept = ~done & ~is_eos & (i < cap)
    column = jnp.where(accept, tok, 0)
    # Column g is scratch: the sample after the cap is never accepted.
    out = jax.lax.dynamic_update_slice(out, column[:, None], (jnp.zeros((), jnp.int32),
                                                              jnp.minimum(i, g)))
    n_gen = n_gen + accept.astype(jnp.int32)
    finished = finished | newly_finished
    done = done | newly_finished | (n_gen >= row_limit) | (i >= cap)
    return out, n_gen, done, finished

  out = jnp.zeros((b, g + 1), jnp.int32)
  n_gen = jnp.zeros((b,), jnp.int32)
  done = ~active | (row_limit <= 0)
  finished = jnp.zeros((b,), bool)
  tok = choose(logits[:, -1], jnp.zeros((), jnp.int32))
  state = update((out, n_gen, done, finished), tok, jnp.zeros((), jnp.int32))

  def cond(carry):
    return jnp.any(~carry[3][2])

  def body(carry):
    i, tok, cache, state = carry
    logits, _, cache = model.apply(variables, tok[:, None], cache, p + i - 1, pad_len,
                                   logits_at="last", active=~state[2])
    tok = choose(logits[:, -1], i)
    state = update(state, tok, i)
    return i + 1, tok, cache, state

  steps, _, _, state = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), tok, cache, state))
  out, n_gen, done, finished = state
  return out[:, :g], n_gen, finished, hidden_state, steps - 1


# ----------------------------------------------------------------------------------- slot refill
#
# Continuous decoding: B slots over one KV cache of S tokens per row. A request is *inserted*
# into a free slot (its prompt prefilled and its cache moved to the slot's start), then every
# decode step advances each unfinished slot by one token at its own cache position; when enough
# slots are free the host inserts the next requests. Sampling is keyed by (seed, request id,
# token index) as above, so a response is the same as from `_generate_core`.
#
# State (a dict of device arrays, per slot [B]): cache; tok (the token to feed next); plen (the
# context length at insertion); rid, start (PRNG identity and tokens generated before this
# insertion); n_gen (accepted tokens in this slot); cap; limit (room to max_seq_len); forced
# (length replay, -1 off); done; finished (EOS); out [B, S + 1] (accepted tokens).


def _slot_state(batch: int, cache_len: int, *, model: Llama) -> dict:
  zeros = jnp.zeros((batch,), jnp.int32)
  return {"cache": init_cache(model.config, batch, cache_len, model.dtype), "tok": zeros,
          "plen": jnp.ones((batch,), jnp.int32), "rid": jnp.zeros((batch,), jnp.uint32),
          "start": zeros, "n_gen": zeros, "cap": zeros, "limit": zeros,
          "forced": jnp.full((batch,), -1, jnp.int32), "done": jnp.ones((batch,), bool),
          "finished": jnp.zeros((batch,), bool),
          "out": jnp.zeros((batch, cache_len + 1), jnp.int32)}


def _slot_insert(params, state, slots, tokens, pad_len, request_ids, start_steps, caps, limits,
                 forced_len, seed, temperature, top_p, *, model: Llama, top_k_candidates: int,
                 eos_ids: tuple[int, ...], filler_id: int):
  """Prefills `tokens` ([k, P] left-padded contexts) and places row i in slot slots[i] (a slot
  index >= B drops the row: bucket padding). Its cache moves to the slot's start, so the slot
  holds context position j at cache slot j; its first token is sampled here."""
  k, p = tokens.shape
  s_len = state["out"].shape[1] - 1
  small = init_cache(model.config, k, p, model.dtype)
  logits, _, small = model.apply({"params": params}, tokens, small, jnp.zeros((), jnp.int32),
                                 pad_len, logits_at="last")
  eos = jnp.asarray(eos_ids, jnp.int32)
  tok = _choose(logits[:, -1], request_ids, start_steps, forced_len, seed, temperature, top_p,
                top_k_candidates=top_k_candidates, eos=eos, filler_id=filler_id)
  # Row i's context sits at [pad_len[i], P): gather it to [0, P - pad_len[i]).
  src = jnp.minimum(jnp.arange(p)[None, :] + pad_len[:, None], p - 1)[:, None, :, None]
  cols = jnp.arange(p)[None, :]
  cache = []
  for layer, new in zip(state["cache"], small):
    moved = {}
    for name in ("k", "v"):
      rows = jnp.take_along_axis(new[name], src, axis=2).transpose(0, 2, 1, 3)  # [k, P, KVH, Dh]
      moved[name] = layer[name].at[slots[:, None], :, cols].set(rows, mode="drop")
    cache.append(moved)
  plen = (p - pad_len).astype(jnp.int32)
  is_eos = jnp.isin(tok, eos)
  accept = ~is_eos & (caps > 0) & (limits > 0)
  n_gen = accept.astype(jnp.int32)
  done = is_eos | (n_gen >= limits) | (caps <= 0)
  out_rows = jnp.zeros((k, s_len + 1), jnp.int32).at[:, 0].set(jnp.where(accept, tok, 0))

  def put(x, value):
    return x.at[slots].set(value.astype(x.dtype), mode="drop")

  return {"cache": cache, "tok": put(state["tok"], tok), "plen": put(state["plen"], plen),
          "rid": put(state["rid"], request_ids), "start": put(state["start"], start_steps),
          "n_gen": put(state["n_gen"], n_gen), "cap": put(state["cap"], caps),
          "limit": put(state["limit"], limits), "forced": put(state["forced"], forced_len),
          "done": put(state["done"], done), "finished": put(state["finished"], is_eos),
          "out": put(state["out"], out_rows)}


def _slot_decode(params, state, free_target, seed, temperature, top_p, *, model: Llama,
                 top_k_candidates: int, eos_ids: tuple[int, ...], filler_id: int):
  """Decode steps until at least `free_target` slots are done (or all are). -> (state, steps)"""
  eos = jnp.asarray(eos_ids, jnp.int32)
  b, width = state["out"].shape
  rows = jnp.arange(b)
  pad = jnp.zeros((b,), jnp.int32)

  def cond(carry):
    _, st = carry
    return (jnp.sum(st["done"]) < free_target) & jnp.any(~st["done"])

  def body(carry):
    steps, st = carry
    done, n_gen = st["done"], st["n_gen"]
    # The token fed now is the row's token n_gen - 1, at cache slot plen + n_gen - 1.
    where = jnp.maximum(st["plen"] + n_gen - 1, 0)
    logits, _, cache = model.apply({"params": params}, st["tok"][:, None], st["cache"], where, pad,
                                   logits_at="last", active=~done)
    tok = _choose(logits[:, -1], st["rid"], st["start"] + n_gen, st["forced"], seed,
                  temperature, top_p, top_k_candidates=top_k_candidates, eos=eos,
                  filler_id=filler_id)
    is_eos = jnp.isin(tok, eos)
    newly_finished = ~done & is_eos
    accept = ~done & ~is_eos & (n_gen < st["cap"])
    col = jnp.minimum(n_gen, width - 1)
    out = st["out"].at[rows, col].set(jnp.where(accept, tok, st["out"][rows, col]))
    new_n = n_gen + accept.astype(jnp.int32)
    new_done = done | newly_finished | (new_n >= st["limit"]) | (n_gen >= st["cap"])
    st = dict(st, cache=cache, tok=jnp.where(done, st["tok"], tok), n_gen=new_n, out=out,
              done=new_done, finished=st["finished"] | newly_finished)
    return steps + 1, st

  steps, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
  return state, steps


def _prefill_hidden(params, tokens, pad_len, *, model: Llama, hidden_layer: int):
  b, p = tokens.shape
  cache = init_cache(model.config, b, p, model.dtype)
  _, hidden, _ = model.apply({"params": params}, tokens, cache, jnp.zeros((), jnp.int32), pad_len,
                             logits_at="last", hidden_layers=(hidden_layer,))
  return hidden[hidden_layer][:, -1].astype(jnp.float32)


# ----------------------------------------------------------------------------------- buckets


def round_up(x: int, multiple: int) -> int:
  return max(multiple, int(math.ceil(x / multiple)) * multiple)


def batch_bucket(n: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if b >= n:
      return b
  return round_up(n, max(buckets))


@dataclasses.dataclass
class Buckets:
  batch: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
  prompt: int = 32
  cache: int = 128

  @classmethod
  def from_config(cls, engine_config) -> "Buckets":
    return cls(tuple(engine_config.batch_buckets), int(engine_config.prompt_bucket),
               int(engine_config.cache_bucket))


class Generator:
  """Runs `_generate_core` over bucketed shapes, counts compilations, places data on the mesh."""

  def __init__(self, model: Llama, params, *, mesh: Mesh | None = None,
               buckets: Buckets | None = None, pad_id: int = 0, top_k_candidates: int = 16):
    self.model = model
    self.config = model.config
    self.mesh = mesh
    self.buckets = buckets or Buckets()
    self.pad_id = pad_id
    self.top_k_candidates = top_k_candidates
    self.eos_ids = tuple(self.config.eos_token_ids)
    self.filler_id = next(t for t in range(self.config.vocab_size) if t not in self.eos_ids)
    self.params = params
    self._fns: dict = {}
    self._executables: dict = {}
    self.compile_seconds = 0.0  # time spent compiling, kept apart from running
    # Several processes sharing one device (benchmark workers): each call runs under this file
    # lock and is synced before it is released; the time spent waiting for it is counted here.
    self.device_lock: str | None = None
    self.wait_seconds = 0.0

  @property
  def compile_count(self) -> int:
    """Programs compiled so far (each new bucketed shape compiles once)."""
    return len(self._executables)

  def _run(self, name: str, jitted, *args):
    """Runs `jitted` through an ahead-of-time compiled executable per input shape, so that
    compilation happens (and is timed) apart from execution."""
    leaves = jax.tree.leaves(args)
    key = (name,) + tuple((tuple(x.shape), str(x.dtype)) for x in leaves[-12:])
    key += (len(leaves),)
    exe = self._executables.get(key)
    if exe is None:
      start = time.perf_counter()
      exe = jitted.lower(*args).compile()
      self.compile_seconds += time.perf_counter() - start
      self._executables[key] = exe
    if self.device_lock is None:
      return exe(*args)
    with _exclusive(self.device_lock) as waited:
      self.wait_seconds += waited
      return jax.block_until_ready(exe(*args))

  def _batch_sharding(self, batch: int, ndim: int) -> NamedSharding:
    spec = shd.logical_to_spec(("batch",) + (None,) * (ndim - 1), (batch,) + (1,) * (ndim - 1),
                               self.mesh)
    return NamedSharding(self.mesh, spec)

  def _param_shardings(self):
    return jax.tree.map(lambda x: x.sharding, self.params)

  def _place(self, x: np.ndarray):
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, self._batch_sharding(x.shape[0], x.ndim))

  def _generate_fn(self, batch: int, cache_len: int, hidden_layer: int):
    key = ("generate", cache_len, hidden_layer) + ((batch,) if self.mesh is not None else ())
    if key not in self._fns:
      cache_sharding = None
      if self.mesh is not None:
        cache_shape = (batch, self.config.num_kv_heads, cache_len, self.config.head_dim)
        cs = shd.named_sharding(self.mesh, CACHE_AXES, cache_shape)
        cache_sharding = [{"k": cs, "v": cs}] * self.config.num_layers

      def traced(*args):
        return _generate_core(*args, model=self.model, cache_len=cache_len,
                              hidden_layer=hidden_layer,
                              top_k_candidates=self.top_k_candidates, eos_ids=self.eos_ids,
                              filler_id=self.filler_id, cache_sharding=cache_sharding)

      if self.mesh is None:
        self._fns[key] = jax.jit(traced)
      else:  # params stay where they are; batch arrays split over `data`; scalars replicated
        rows, rows2 = self._batch_sharding(batch, 1), self._batch_sharding(batch, 2)
        rep = NamedSharding(self.mesh, P())
        self._fns[key] = jax.jit(
            traced, in_shardings=(self._param_shardings(), rows2) + (rows,) * 6 + (rep,) * 4,
            out_shardings=(rows2, rows, rows, rows2, rep))
    return self._fns[key]

  def _prefill_fn(self, hidden_layer: int):
    key = ("prefill", hidden_layer)
    if key not in self._fns:

      def traced(params, tokens, pad_len):
        return _prefill_hidden(params, tokens, pad_len, model=self.model,
                               hidden_layer=hidden_layer)

      self._fns[key] = jax.jit(traced)  # shardings follow the placed inputs
    return self._fns[key]

  def _pack(self, prompts: Sequence[Sequence[int]]):
    """Left-pads prompts into [B, P] with B, P rounded up to buckets. Padding rows are inert."""
    n = len(prompts)
    if n == 0:
      raise ValueError("no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() < 1:
      raise ValueError(f"prompt {int(lengths.argmin())} is empty")
    b = batch_bucket(n, self.buckets.batch)
    if self.mesh is not None:
      b = round_up(b, self.mesh.shape["data"])
    p = round_up(int(lengths.max()), self.buckets.prompt)
    tokens = np.full((b, p), self.pad_id, np.int32)
    pad_len = np.full((b,), p, np.int32)
    for i, prompt in enumerate(prompts):
      tokens[i, p - len(prompt):] = prompt
      pad_len[i] = p - len(prompt)
    return tokens, pad_len, lengths, b, p

  def generate(self, prompts: Sequence[Sequence[int]], *, cap: int, max_seq_len: int,
               seed: int = 0, temperature: float = 0.6, top_p: float = 0.9,
               request_ids: Sequence[int] | None = None,
               start_steps: Sequence[int] | None = None,
               forced_lengths: Sequence[int] | None = None,
               hidden_layer: int = -1, cache_len: int | None = None) -> DecodeResult:
    """Generates for one batch of token-id prompts.

    cap: the most tokens any row may generate in this call (a traced value: changing it does
      not recompile). max_seq_len: prompt + response limit; a row whose prompt (here: the
      original prompt plus any partial response being continued) leaves no room is refused.
    request_ids / start_steps: the PRNG identity of each row and how many tokens it already
      generated in earlier calls (continuation), so that sampling continues identically.
    forced_lengths: length replay; row r emits EOS at exactly that many generated tokens.
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
    active = np.zeros((b,), bool)
    active[:n] = True
    forced = per_row(forced_lengths, -1, np.int32)
    if forced_lengths is not None:
      forced[:n] = np.where(forced[:n] >= 0, forced[:n], -1)

    fn = self._generate_fn(b, s, hidden_layer)
    args = [self._place(x) for x in (tokens, pad_len, rid, start, limit, active, forced)]
    out, n_gen, finished, hidden, steps = self._run(
        f"generate/{s}/{hidden_layer}", fn, self.params, *args, jnp.int32(cap), jnp.uint32(seed),
        jnp.float32(temperature), jnp.float32(top_p))
    out, n_gen, finished, hidden = jax.device_get((out, n_gen, finished, hidden))
    return DecodeResult(tokens=np.asarray(out)[:n], num_generated=np.asarray(n_gen)[:n],
                        finished=np.asarray(finished)[:n], hidden=np.asarray(hidden)[:n],
                        steps=int(steps))

  def embed(self, prompts: Sequence[Sequence[int]], hidden_layer: int = -1,
            max_batch: int = 64) -> np.ndarray:
    """The hidden state of each prompt's last token at `hidden_layer`. -> [n, D] float32."""
    out = []
    for start in range(0, len(prompts), max_batch):
      chunk = prompts[start:start + max_batch]
      tokens, pad_len, _, _, _ = self._pack(chunk)
      if tokens.shape[1] > self.config.max_position_embeddings:
        raise ValueError(f"prompt of {tokens.shape[1]} tokens exceeds the model's context "
                         f"({self.config.max_position_embeddings})")
      hidden = self._run(f"prefill/{hidden_layer}", self._prefill_fn(hidden_layer), self.params,
                         self._place(tokens), self._place(pad_len))
      out.append(np.asarray(jax.device_get(hidden))[:len(chunk)])
    return np.concatenate(out, axis=0)

  # ------------------------------------------------------------------------- slot refill

  def open_slots(self, slots: int, cache_len: int, *, max_seq_len: int, seed: int = 0,
                 temperature: float = 0.6, top_p: float = 0.9) -> "SlotBatch":
    """A continuous batch of `slots` rows (rounded up to a batch bucket, and to a multiple of
    the mesh's data axis) over `cache_len` KV slots per row, with fixed sampling settings. On a
    mesh the slots are split over `data` and the cache's kv heads over `model`. See
    `SlotBatch`."""
    b = batch_bucket(int(slots), self.buckets.batch)
    if self.mesh is not None:
      b = round_up(b, self.mesh.shape["data"])
    s = round_up(int(cache_len), self.buckets.cache)
    key = ("slot_state", b, s)
    if key not in self._fns:
      self._fns[key] = jax.jit(lambda: _slot_state(b, s, model=self.model),
                               out_shardings=self._slot_shardings(b, s))
    return SlotBatch(self, self._fns[key](), b, s, max_seq_len=int(max_seq_len),
                     sampling=(jnp.uint32(seed), jnp.float32(temperature), jnp.float32(top_p)))

  def _slot_shardings(self, batch: int, cache_len: int):
    """Shardings of a slot state on the mesh (None without one)."""
    if self.mesh is None:
      return None
    cache_shape = (batch, self.config.num_kv_heads, cache_len, self.config.head_dim)
    cs = shd.named_sharding(self.mesh, CACHE_AXES, cache_shape)
    rows, rows2 = self._batch_sharding(batch, 1), self._batch_sharding(batch, 2)
    state = {name: rows for name in ("tok", "plen", "rid", "start", "n_gen", "cap", "limit",
                                     "forced", "done", "finished")}
    return dict(state, cache=[{"k": cs, "v": cs}] * self.config.num_layers, out=rows2)

  def _slot_fn(self, kind: str, batch: int, cache_len: int):
    key = (kind,) + ((batch, cache_len) if self.mesh is not None else ())
    if key not in self._fns:
      core = _slot_insert if kind == "slot_insert" else _slot_decode
      kw = dict(model=self.model, top_k_candidates=self.top_k_candidates, eos_ids=self.eos_ids,
                filler_id=self.filler_id)
      if self.mesh is None:
        self._fns[key] = jax.jit(lambda *a: core(*a, **kw), donate_argnums=(1,))
      else:  # the state keeps its shardings from call to call; the other inputs are replicated
        state = self._slot_shardings(batch, cache_len)
        rep = NamedSharding(self.mesh, P())
        extra = 8 if kind == "slot_insert" else 1
        self._fns[key] = jax.jit(
            lambda *a: core(*a, **kw), donate_argnums=(1,),
            in_shardings=(self._param_shardings(), state) + (rep,) * (extra + 3),
            out_shardings=state if kind == "slot_insert" else (state, rep))
    return self._fns[key]


@contextlib.contextmanager
def _exclusive(path: str):
  """Holds an exclusive lock on `path` (created if missing); yields the seconds spent waiting
  for it."""
  import fcntl

  start = time.perf_counter()
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    waited = time.perf_counter() - start
    try:
      yield waited
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass
class SlotRead:
  """What the host reads back after a decode call, per slot."""
  tokens: np.ndarray  # [B, S + 1] accepted tokens in [:num_generated]
  num_generated: np.ndarray  # [B] in this slot
  done: np.ndarray  # [B]
  finished: np.ndarray  # [B] ended with EOS


def context_block(block: int, prompt_bucket: int, cache_len: int) -> int:
  """The length an insert call prefills a packed context block of `block` tokens (a multiple of
  prompt_bucket) at: prompt_bucket x 2^i, where that fits the cache. Continued rows bring long
  contexts of any length, and every block length is a program to compile."""
  pow2 = prompt_bucket * 2 ** max(0, math.ceil(math.log2(block / prompt_bucket)))
  return pow2 if block < pow2 <= cache_len else block


class SlotBatch:
  """Continuous decoding on one engine (one device or a mesh): `insert` requests into free
  slots, `decode` until enough slots are free, `read` the slots back. A slot's row may generate
  at most min(cache_len - context, max_seq_len - context) tokens; one that reaches it comes back
  done but not finished (continue it elsewhere from context + its tokens, like a capped row)."""

  def __init__(self, generator: Generator, state: dict, slots: int, cache_len: int, *,
               max_seq_len: int, sampling: tuple):
    self.generator, self.state = generator, state
    self.slots, self.cache_len, self.max_seq_len = slots, cache_len, max_seq_len
    self.sampling = sampling
    self.steps = 0  # decode steps run so far

  def room(self, context_len):
    """Tokens a context of this length may generate in a slot (<= 0: it does not fit).
    Elementwise."""
    return np.minimum(self.cache_len - context_len, self.max_seq_len - context_len)

  def insert(self, slot_ids: Sequence[int], contexts: Sequence[Sequence[int]],
             request_ids: Sequence[int], start_steps: Sequence[int],
             forced_lengths: Sequence[int] | None = None) -> None:
    """Prefills `contexts` (prompt + any tokens generated earlier) into the given free slots."""
    gen = self.generator
    n = len(contexts)
    if n == 0 or len(slot_ids) != n or len(request_ids) != n or len(start_steps) != n:
      raise ValueError(f"insert needs one slot, request id and start step per context "
                       f"({len(slot_ids)}, {len(request_ids)}, {len(start_steps)} for {n})")
    if len(set(int(s) for s in slot_ids)) != n or min(slot_ids) < 0 or max(slot_ids) >= self.slots:
      raise ValueError(f"slot ids must be distinct and in [0, {self.slots}): {list(slot_ids)}")
    tokens, pad_len, lengths, k, p = gen._pack(contexts)
    block = context_block(p, gen.buckets.prompt, self.cache_len)
    if block > p:
      tokens = np.pad(tokens, ((0, 0), (block - p, 0)), constant_values=gen.pad_id)
      pad_len, p = pad_len + (block - p), block
    room = self.room(lengths)
    if (room < 1).any():
      i = int(np.argmin(room))
      raise ValueError(f"context {i} of {int(lengths[i])} tokens leaves no room in this slot "
                       f"batch (cache_len={self.cache_len}, max_seq_len={self.max_seq_len})")
    if p > self.cache_len:
      raise ValueError(f"a context block of {p} tokens exceeds cache_len={self.cache_len}")

    def per_row(values, fill, dtype):
      arr = np.full((k,), fill, dtype)
      arr[:n] = np.asarray(values, dtype)
      return arr

    slots = per_row(slot_ids, self.slots, np.int32)  # bucket padding rows: dropped
    forced = per_row(forced_lengths if forced_lengths is not None else [-1] * n, -1, np.int32)
    caps = per_row(room, 0, np.int32)
    limits = per_row(self.max_seq_len - lengths, 0, np.int32)
    args = [jnp.asarray(x) for x in (slots, tokens, pad_len,
                                     per_row(request_ids, 0, np.uint32),
                                     per_row(start_steps, 0, np.int32), caps, limits, forced)]
    self.state = gen._run(f"slot_insert/{self.slots}/{self.cache_len}/{k}/{p}",
                          gen._slot_fn("slot_insert", self.slots, self.cache_len), gen.params,
                          self.state, *args, *self.sampling)

  def decode(self, free_target: int) -> int:
    """Runs decode steps until at least `free_target` slots are done (or all are); returns the
    steps run."""
    gen = self.generator
    self.state, steps = gen._run(f"slot_decode/{self.slots}/{self.cache_len}",
                                 gen._slot_fn("slot_decode", self.slots, self.cache_len),
                                 gen.params, self.state,
                                 jnp.int32(free_target), *self.sampling)
    steps = int(steps)
    self.steps += steps
    return steps

  def read(self) -> SlotRead:
    st = jax.device_get({k: self.state[k] for k in ("out", "n_gen", "done", "finished")})
    return SlotRead(np.asarray(st["out"]), np.asarray(st["n_gen"]), np.asarray(st["done"]),
                    np.asarray(st["finished"]))
