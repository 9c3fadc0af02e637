"""Sampling: the next token of each row from its logits (greedy, or temperature + nucleus), the
nucleus itself as a mask (`nucleus_mask`, the same rule), and the per-request randomness.

Randomness: the uniform number of request r's t-th generated token depends on (seed, r, t) only.

Settings are per row: temperature [B], top_p [B, 2] (`top_p_setting` per row) and seed [B]; a
scalar temperature / seed or a single top_p (float32 or one `top_p_setting` pair) is broadcast to
every row, with the same result row by row as the per-row arrays holding it.

The rule is transformers' `TemperatureLogitsWarper` then `TopPLogitsWarper` (min_tokens_to_keep 1):
  1. scores = float32 logits * float32(1 / temperature) (how torch divides by a Python float on
     the GPU; XLA rewrites a division by a scalar the same way); probs = softmax(scores).
  2. Tokens are ranked by score, highest first; equal scores rank the higher token id first (the
     order of a stable ascending sort, which is what torch's CUDA sort of a vocabulary row does;
     its CPU sort leaves the order of ties unspecified). -0.0 ties with 0.0, as in torch.
  3. A token's tail mass is the probability of itself and of every token ranked below it (what
     transformers' ascending cumulative sum holds), taken of the distribution divided by its
     own total. The token is kept iff its tail mass, rounded to float32, exceeds
     d = float32(1 - top_p), or it is ranked first. top_p is passed as `top_p_setting(p)`,
     which takes 1 - p in float64 as Python does; a bare float32 top_p gives d = 1 - top_p in
     float32, a few float32 steps off for most p (at 0.9: 2.2e-8).
  4. d <= 0 (top_p >= 1) keeps every token of finite score; temperature <= 0 is greedy (argmax,
     ties to the lower id).
Tail masses are summed almost exactly: each probability is split into a part on the 2^-23 grid,
whose sums are exact in float32 in any order, and a remainder under 2^-24 summed in float32;
the comparison "rounded tail / total > d" is made exactly as "tail > (d + half a float32 step)
* total" (errors ~1e-15, against float32's step of 7e-9 at 0.1). The former rule, a float32
cumulative sum from the top compared with top_p, was off by ~1e-7 and ranked ties the other way.

transformers itself is exact only to its own float32 arithmetic: on the GPU its scan sums in
float32; on the CPU its softmax uses an approximate exp, and its probabilities are off by up to
~1e-5 relative (row sums 1 +- 9e-6). Where a row's boundary tail lies that close to d, the
boundary token may differ. Given an accurate softmax, transformers' set is this rule's on every
row tried (tests/test_sampling.py; 6,912 rows of 49,152 tokens while writing it).

Where the set is found does not change it: among the `top_k_candidates` best-ranked tokens when
the tail after them is <= d (the usual case); otherwise (a wide row) among the tokens scoring
within a few nats of the row's best, once those below hold well under d of the mass (found by
bisection, at most `mid_candidates` of them, ranked by a sort of those alone), and only where
they are more from the row's full ranking. Wide rows are gathered (up to `hard_rows` of them),
or every row is searched when more are wide. The draw is by inverse CDF over the kept tokens in
rank order: u * (their mass) picks the first token whose cumulative mass exceeds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_GRID = float(2 ** 23)  # probabilities on this grid sum exactly in float32 while the sum < 2
# The wide-row search: score thresholds up to this many nats under the row's best, bisected in
# this many steps (to 1/8 nat), the mass below one kept under this share of d.
_SEARCH_NATS, _SEARCH_STEPS, _SEARCH_SHARE = 16.0, 7, 0.99


def request_uniforms(seed: jax.Array, request_ids: jax.Array, steps: jax.Array) -> jax.Array:
  """u ~ U[0, 1) per row, a function of (seed, request_id, step) only. seed: scalar or [B];
  -> [B] float32."""
  seeds = jnp.broadcast_to(jnp.asarray(seed).astype(jnp.uint32), request_ids.shape)

  def one(s, r, t):
    base = jax.random.key(s)
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(base, r), t), (),
                              jnp.float32)

  return jax.vmap(one)(seeds, request_ids.astype(jnp.uint32), steps.astype(jnp.uint32))


def top_p_setting(top_p: float) -> np.ndarray:
  """The top_p argument of the jitted samplers: float32 [top_p, 1 - top_p], the second taken in
  float64 from the Python float first (as transformers compares with 1 - top_p)."""
  return np.array([top_p, 1.0 - float(top_p)], np.float32)


def top_p_settings(top_p) -> np.ndarray:
  """Per-row `top_p_setting`s: [B] top_p floats -> float32 [B, 2]."""
  return np.stack([top_p_setting(float(p)) for p in np.asarray(top_p, np.float64).ravel()]
                  ).reshape(-1, 2)


def drop_mass(top_p, rows: int | None = None) -> jax.Array:
  """d of the rule from a float32 top_p scalar, one `top_p_setting` pair [2] or one pair per row
  [R, 2]. -> scalar, or [R]; with `rows`: broadcast to [rows]."""
  top_p = jnp.asarray(top_p, jnp.float32)
  drop = 1.0 - top_p if top_p.ndim == 0 else top_p[..., 1]
  return drop if rows is None else jnp.broadcast_to(drop, (rows,))


def row_temperature(temperature, rows: int) -> jax.Array:
  """Temperature per row: a scalar broadcast, or [rows] as is. -> [rows] float32."""
  return jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (rows,))


def scores_and_probs(logits: jax.Array, temperature: jax.Array):
  """float32 logits * (1 / temperature) and their softmax. [R, V] -> ([R, V], [R, V]);
  temperature: scalar or [R]. The product by the reciprocal is how torch divides by a Python
  float on the GPU (and what XLA makes of a division by a scalar anyway). -0.0 becomes 0.0:
  sorts rank them apart, torch ties them."""
  inverse = 1.0 / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  scores = logits.astype(jnp.float32) * (inverse[:, None] if inverse.ndim == 1 else inverse)
  scores = jnp.where(scores == 0.0, 0.0, scores)
  return scores, jax.nn.softmax(scores, axis=-1)


def split_mass(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """probs = hi + lo exactly, hi on the 2^-23 grid (so sums of hi are exact), |lo| <= 2^-24."""
  hi = jnp.round(probs * _GRID) / _GRID
  return hi, probs - hi


def total_mass(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The sum of each row's probabilities as (hi, lo) parts. [R, V] -> ([R], [R])."""
  hi, lo = split_mass(probs)
  return jnp.sum(hi, axis=-1), jnp.sum(lo, axis=-1)


def nucleus_count(ranked_probs: jax.Array, total, drop) -> tuple[jax.Array, jax.Array]:
  """How many of the K best-ranked tokens the rule keeps, and whether the tail after them still
  exceeds d (then the nucleus may reach past K: a wide row). ranked_probs: [R, K] in rank order;
  total: `total_mass` of the whole rows; drop: d, scalar or [R].
  -> (m [R] in 1..K, wide [R] bool)."""
  hi, lo = split_mass(ranked_probs)
  drop = jnp.asarray(drop, jnp.float32)
  drop = drop[:, None] if drop.ndim == 1 else drop  # per row: [R, 1]
  zero = jnp.zeros_like(hi[:, :1])
  head_hi = jnp.concatenate([zero, jnp.cumsum(hi, axis=-1)], axis=-1)  # [R, K + 1], exact
  head_lo = jnp.concatenate([zero, jnp.cumsum(lo, axis=-1)], axis=-1)
  total_hi, total_lo = total[0][:, None], total[1][:, None]
  # The tail of the distribution divided by its total (1 + excess), rounded to float32, exceeds
  # d iff tail > (d + h) * total, h = half of float32's step above d. Near the boundary each
  # difference below is exact or ~1e-15 off, so the sign is right to far under float32's step.
  excess = (total_hi - 1.0) + total_lo
  half_step = (jnp.nextafter(drop, jnp.inf) - drop) / 2
  margin = (((total_hi - head_hi) - drop) - half_step) + (total_lo - head_lo)
  above = margin - (drop * excess + half_step * excess) > 0  # [R, K + 1]
  leading = jnp.sum(jnp.cumprod(above[:, :-1], axis=-1), axis=-1)  # a prefix, even at roundings
  wide = above[:, -1] & (leading == ranked_probs.shape[-1])
  return jnp.maximum(leading, 1).astype(jnp.int32), wide


def pick(ranked_probs: jax.Array, ranked_ids: jax.Array, m: jax.Array, u: jax.Array) -> jax.Array:
  """Inverse-CDF draw among the first m ranked tokens. [R, K] -> [R] token ids."""
  cum = jnp.cumsum(ranked_probs, axis=-1)
  mass = jnp.take_along_axis(cum, (m - 1)[:, None], axis=-1)[:, 0]
  j = jnp.minimum(jnp.sum(cum <= (u * mass)[:, None], axis=-1), m - 1)
  return jnp.take_along_axis(ranked_ids, j[:, None], axis=-1)[:, 0]


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


def ranked_top_k(scores: jax.Array, k: int) -> jax.Array:
  """Ids of the k best-ranked tokens, in rank order (ties: the higher id first). [R, V] -> [R, k].
  On the reversed row, top_k's ties to the lower index are ties to the higher id."""
  _, reversed_ids = top_k(scores[:, ::-1], k)
  return (scores.shape[-1] - 1 - reversed_ids).astype(jnp.int32)


def ranked_all(scores: jax.Array) -> jax.Array:
  """The full ranking of each row (ties: the higher id first). [R, V] -> [R, V] int32."""
  vocab = scores.shape[-1]
  reversed_ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), scores.shape)
  _, order = jax.lax.sort((-scores[:, ::-1], reversed_ids), dimension=-1, num_keys=1,
                          is_stable=True)
  return vocab - 1 - order


def _full_nucleus(scores, probs, total, drop):
  """(ranked ids [R, V], their probs, m [R]) from the full ranking."""
  ids = ranked_all(scores)
  ranked = jnp.take_along_axis(probs, ids, axis=-1)
  m, _ = nucleus_count(ranked, total, drop)
  return ids, ranked, m


def _head_nucleus(scores, probs, total, drop, k):
  """(ranked ids [R, k], their probs, m [R], wide [R]) from the k best-ranked tokens."""
  ids = ranked_top_k(scores, k)
  ranked = jnp.take_along_axis(probs, ids, axis=-1)
  m, wide = nucleus_count(ranked, total, drop)
  return ids, ranked, m, wide


def nucleus_mask(logits: jax.Array, temperature, top_p, top_k_candidates: int = 16) -> jax.Array:
  """The tokens `sample_tokens` may draw, by the same rule: [B, V] bool (transformers' kept
  set: the tokens whose processed logit is not -inf). temperature: scalar or [B]; top_p:
  float32, `top_p_setting(p)` or per row [B, 2]."""
  batch, vocab = logits.shape
  temperature = row_temperature(temperature, batch)
  scores, probs = scores_and_probs(logits, temperature)
  drop = drop_mass(top_p, batch)
  total = total_mass(probs)
  ids, _, m, wide = _head_nucleus(scores, probs, total, drop, min(top_k_candidates, vocab))
  full_ids, _, full_m = _full_nucleus(scores, probs, total, drop)
  ids = jnp.where(wide[:, None], full_ids, jnp.pad(ids, ((0, 0), (0, vocab - ids.shape[1]))))
  m = jnp.where(wide, full_m, m)
  rows = jnp.arange(batch)[:, None]
  nucleus = jnp.zeros((batch, vocab), bool).at[rows, ids].max(
      jnp.arange(vocab)[None, :] < m[:, None])
  greedy = jnp.arange(vocab)[None, :] == jnp.argmax(logits, axis=-1)[:, None]
  every = scores > -jnp.inf
  return jnp.where(temperature[:, None] <= 0.0, greedy,
                   jnp.where(drop[:, None] <= 0.0, every, nucleus))


def _mid_nucleus(scores, probs, total, drop, k):
  """(ranked ids [R, k], their probs, m [R], over [R]) from the tokens scoring within a few nats
  of each row's best: the threshold sigma is bisected (unrolled: no device loop) to the highest
  one whose tokens below hold at most _SEARCH_SHARE * d of the mass, so that none of them can be
  kept (each one's tail is at most that mass); the (at most k) tokens at or above sigma are
  gathered in id order and sorted by rank. over: the row had more than k such tokens, or none
  of the thresholds tried holds the rule (then only the full ranking is exact)."""
  rows, vocab = scores.shape
  best = jnp.max(scores, axis=-1)
  limit = _SEARCH_SHARE * jnp.asarray(drop, jnp.float32)

  def holds(nats):  # the mass under best - nats is small enough: [R] bool
    below = jnp.sum(jnp.where(scores < (best - nats)[:, None], probs, 0.0), axis=-1)
    return below <= limit

  lo, hi = jnp.zeros((rows,), jnp.float32), jnp.full((rows,), _SEARCH_NATS, jnp.float32)
  found = holds(hi)
  for _ in range(_SEARCH_STEPS):
    mid = (lo + hi) / 2
    ok = holds(mid)
    lo, hi = jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)
  candidate = scores >= (best - hi)[:, None]  # [R, V], every row's best among them
  at = jnp.cumsum(candidate, axis=-1, dtype=jnp.int32) - 1
  over = (at[:, -1] >= k) | ~found
  ids = jnp.full((rows, k), vocab, jnp.int32).at[
      jnp.arange(rows)[:, None], jnp.where(candidate & (at < k), at, k)].set(
          jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), (rows, vocab)), mode="drop")
  real = ids < vocab
  safe = jnp.minimum(ids, vocab - 1)
  keys = jnp.where(real, -jnp.take_along_axis(scores, safe, axis=-1), jnp.inf)
  # rank order: score descending, ties the higher id first; padding (no token) last
  _, neg_ids = jax.lax.sort((keys, -ids), dimension=-1, num_keys=2)
  ranked_ids = -neg_ids
  real = ranked_ids < vocab
  ranked_ids = jnp.minimum(ranked_ids, vocab - 1)
  ranked = jnp.where(real, jnp.take_along_axis(probs, ranked_ids, axis=-1), 0.0)
  m, _ = nucleus_count(ranked, total, drop)
  return ranked_ids, ranked, m, over


def sample_tokens(logits: jax.Array, u: jax.Array, temperature: jax.Array, top_p,
                  top_k_candidates: int = 16, hard_rows: int | None = None,
                  mid_candidates: int | None = None, active: jax.Array | None = None
                  ) -> jax.Array:
  """One token per row by the module's rule. logits: [B, V], u: [B] -> [B] int32.
  temperature: scalar or [B]; top_p: float32 scalar, `top_p_setting(p)` (exact 1 - p) or per
  row [B, 2]. Rows with d <= 0 draw from every token, the others from their nucleus; which
  branches run is chosen per call from the rows (all of one kind: only that one). hard_rows:
  how many wide rows are gathered and searched at a time, in rounds until none is left (None:
  max(32, B / 8)); every branch is lowered once (a call's program compiles in a fraction of
  the time of one with a branch per count of wide rows);
  mid_candidates: the most tokens a wide row's search ranks before its full sort (0: no search;
  None: 1,024 on accelerators, none on the CPU, whose sorts are cheap at its batch sizes and
  whose compilation the search would only lengthen; the tokens are the same). active: [B]
  bool, the rows whose token is used (None: all); any other row gets some token of its head
  candidates and is never searched or sorted (finished rows of a decode loop, whose logits are
  often flat, would otherwise send every step to the sort of all rows)."""
  batch, vocab = logits.shape
  temperature = row_temperature(temperature, batch)
  scores, probs = scores_and_probs(logits, temperature)
  drop = drop_mass(top_p, batch)
  every = drop <= 0.0  # [B] rows whose candidates are every token
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  k = min(top_k_candidates, vocab)
  hard_rows = min(max(32, batch // 8) if hard_rows is None else hard_rows, batch)
  if mid_candidates is None:
    mid_candidates = 0 if jax.default_backend() == "cpu" else 1024
  mid = min(mid_candidates, vocab)

  def nucleus(_):
    total = total_mass(probs)
    ids, ranked, m, wide = _head_nucleus(scores, probs, total, drop, k)
    wide = wide & ~every  # a d <= 0 row is drawn by `plain`, never sorted
    if active is not None:
      wide = wide & active
    easy = pick(ranked, ids, m, u)

    def wide_rows(rows):
      part = (scores[rows], probs[rows], (total[0][rows], total[1][rows]), drop[rows])

      def sorted_pick():  # the draw from each row's full ranking
        full_ids, full_ranked, full_m = _full_nucleus(*part)
        return pick(full_ranked, full_ids, full_m, u[rows])

      if mid < 1:  # no search
        return jnp.where(wide[rows], sorted_pick(), easy[rows])
      mid_ids, mid_ranked, mid_m, over = _mid_nucleus(*part, mid)
      searched = pick(mid_ranked, mid_ids, mid_m, u[rows])

      def sort_over(_):  # rows the search could not settle
        return jnp.where(over, sorted_pick(), searched)

      over = over & wide[rows]
      picked = jax.lax.cond(jnp.any(over), sort_over, lambda _: searched, None)
      return jnp.where(wide[rows], picked, easy[rows])

    n_wide = jnp.sum(wide, dtype=jnp.int32)

    def gathered(_):  # the wide rows, hard_rows at a time (one program whatever their count)
      # their ids first, then `batch` (padding: its draws are dropped)
      order = jnp.nonzero(wide, size=-(-batch // hard_rows) * hard_rows, fill_value=batch)[0]

      def one_round(carry):
        i, out = carry
        rows = jax.lax.dynamic_slice_in_dim(order, i * hard_rows, hard_rows)
        got = wide_rows(jnp.minimum(rows, batch - 1))
        return i + 1, out.at[rows].set(got, mode="drop")

      return jax.lax.while_loop(lambda carry: carry[0] * hard_rows < n_wide, one_round,
                                (jnp.zeros((), jnp.int32), easy))[1]

    return jax.lax.cond(n_wide > 0, gathered, lambda _: easy, None)

  def plain(_):
    # d <= 0: every token is a candidate; inverse CDF in token order needs no sort.
    cum = jnp.cumsum(probs, axis=-1)
    j = jnp.sum(cum <= (u * cum[:, -1])[:, None], axis=-1)
    return jnp.minimum(j, vocab - 1).astype(jnp.int32)

  # each kind of row by its own rule, each rule run only where some row needs it (lowered
  # once); a rule skipped stands in with the greedy tokens (no row takes them)
  drawn = jax.lax.cond(jnp.all(every), lambda _: greedy, nucleus, None)
  sampled = jnp.where(every, jax.lax.cond(jnp.any(every), plain, lambda _: greedy, None), drawn)
  return jnp.where(temperature <= 0.0, greedy, sampled)


# Descending-probability helpers on a whole distribution (benchmarks and tests).

def sorted_desc(probs):
  """probs in rank order (ties: the higher id first). [R, V] -> ([R, V], [R, V] int32)."""
  ids = ranked_all(probs)
  return jnp.take_along_axis(probs, ids, axis=-1), ids


def nucleus_size(sorted_probs: jax.Array, top_p) -> jax.Array:
  """The rule's kept count for whole distributions given in rank order. [R, V] -> [R]."""
  return nucleus_count(sorted_probs, total_mass(sorted_probs),
                       drop_mass(top_p, sorted_probs.shape[0]))[0]


def pick_in_nucleus(sorted_probs, sorted_ids, top_p, u):
  """The rule's draw from whole distributions given in rank order. [R, V] -> [R] token ids."""
  return pick(sorted_probs, sorted_ids, nucleus_size(sorted_probs, top_p), u)


def choose(logits_last, request_ids, steps, forced_len, seed, temperature, top_p, active, *,
           top_k_candidates, eos, filler_id):
  """The token of each row at its token index `steps` (with length replay). Per row [B]:
  request_ids, steps, forced_len, seed, temperature, active (rows whose token is used: the
  others are never searched, `sample_tokens`); top_p [B, 2]."""
  u = request_uniforms(seed, request_ids, steps)
  tok = sample_tokens(logits_last, u, temperature, top_p, top_k_candidates, active=active)
  # Length replay: EOS exactly at the recorded length, never before it.
  replay = forced_len >= 0
  tok = jnp.where(replay & (steps >= forced_len), eos[0], tok)
  return jnp.where(replay & (steps < forced_len) & jnp.isin(tok, eos), filler_id, tok)


def sampling_rows(n: int, rows: int, seed, temperature, top_p):
  """The sampling settings of n rows padded to `rows`: (seed [rows] uint32, temperature [rows]
  float32, top_p [rows, 2] float32 `top_p_setting`s). Each setting is one value for every row or
  a sequence of n values; padding rows repeat the last row's."""

  def per_row(value, name):
    arr = np.asarray(value, np.float64)
    if arr.ndim == 0:
      return np.full((rows,), arr)
    if arr.shape != (n,):
      raise ValueError(f"{name}: expected one value or {n} (one per row), got shape {arr.shape}")
    return np.concatenate([arr, np.full((rows - n,), arr[-1])])

  seeds = per_row(seed, "seed")
  if (seeds < 0).any() or (seeds >= 2 ** 32).any() or (seeds != np.round(seeds)).any():
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed}")
  return (seeds.astype(np.uint32), per_row(temperature, "temperature").astype(np.float32),
          top_p_settings(per_row(top_p, "top_p")))
