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
    u = request_uniforms(seed, request_ids, start_step + i)
    tok = sample_tokens(logits_last, u, temperature, top_p, top_k_candidates)
    # Length replay: EOS exactly at the recorded length, never before it.
    step = start_step + i
    replay = forced_len >= 0
    tok = jnp.where(replay & (step >= forced_len), eos[0], tok)
    tok = jnp.where(replay & (step < forced_len) & jnp.isin(tok, eos), filler_id, tok)
    return tok

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
    return exe(*args)

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
