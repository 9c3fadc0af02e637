"""Sampling: temperature + nucleus (top-p) or greedy on logits, with per-request randomness.

The random number for request r's t-th generated token depends on (seed, r, t) only. The nucleus
kept is exactly the smallest set of most probable tokens whose mass reaches top_p (ties broken by
lower token id), the token set transformers' temperature and top-p warpers keep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
  return nucleus_count(jnp.cumsum(sorted_probs, axis=-1), top_p)


def nucleus_count(cum: jax.Array, top_p: jax.Array) -> jax.Array:
  """nucleus_size from the cumulative sums of the descending probabilities."""
  return 1 + jnp.sum(cum < top_p, axis=-1)


def pick_in_nucleus(sorted_probs, sorted_ids, top_p, u, cum=None):
  """Inverse-CDF pick inside the nucleus of descending probabilities. [B, K] -> [B] token ids.
  `cum`: their cumulative sums, if already computed."""
  k = sorted_probs.shape[-1]
  cum = jnp.cumsum(sorted_probs, axis=-1) if cum is None else cum
  m = jnp.minimum(nucleus_count(cum, top_p), k)
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


def sorted_desc(probs):
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
    return pick_in_nucleus(*sorted_desc(probs), top_p, u)

  def nucleus(_):
    top_probs, top_ids = top_k(probs, k)
    top_cum = jnp.cumsum(top_probs, axis=-1)
    easy = pick_in_nucleus(top_probs, top_ids.astype(jnp.int32), top_p, u, top_cum)
    hard = nucleus_count(top_cum, top_p) > k  # [B]

    def sort_hard_rows(_):
      rows = jnp.nonzero(hard, size=hard_rows, fill_value=0)[0]
      picked = pick_in_nucleus(*sorted_desc(probs[rows]), top_p, u[rows])
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



def choose(logits_last, request_ids, steps, forced_len, seed, temperature, top_p, *,
            top_k_candidates, eos, filler_id):
  """The token of each row at its token index `steps` (with length replay)."""
  u = request_uniforms(seed, request_ids, steps)
  tok = sample_tokens(logits_last, u, temperature, top_p, top_k_candidates)
  # Length replay: EOS exactly at the recorded length, never before it.
  replay = forced_len >= 0
  tok = jnp.where(replay & (steps >= forced_len), eos[0], tok)
  return jnp.where(replay & (steps < forced_len) & jnp.isin(tok, eos), filler_id, tok)

