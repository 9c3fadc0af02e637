"""Decode attention as one Pallas kernel: a single query token per row against its KV cache,
reading only the cache slots that row has filled, and nothing at all for rows that are done.

The XLA path (`model.Attention`, `decode_impl="dot"`) reads the whole cache bucket of every row on
every step, finished rows included. Here each (row, kv head) program loops over the blocks of
slots [lo, hi) of its row with an online softmax, so a step's cache traffic is the live tokens,
not batch x cache length. Runs on GPUs through Pallas' Triton backend; `interpret=True` runs the
same kernel anywhere (tests, CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

_NEG = -1e30  # running-max start: finite, so a fully masked block gives exp(-inf) = 0, not NaN
_MIN_ROWS = 16  # the matrix units' smallest M: query heads of a group are padded up to this


def _dot(a, b, contract):
  """a . b contracting the given dims, accumulated and returned in float32."""
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def attend_blocks(q, load, lo, hi, block: int, scale: float):
  """Online softmax of q [Gp, Dh] over the positions [lo, hi), block by block: load(i) gives
  block i's keys and values ([block, Dh] each, positions i x block ...). -> [Gp, Dh] float32;
  zeros where no position is live (a done row: nothing downstream reads it)."""
  gp, dh = q.shape

  def step(i, carry):
    run_max, denom, acc = carry
    k, v = load(i)
    scores = _dot(q, k, ((1,), (1,))) * scale  # [Gp, block]
    slots = i * block + jax.lax.broadcasted_iota(jnp.int32, (gp, block), 1)
    scores = jnp.where((slots >= lo) & (slots < hi), scores, -jnp.inf)
    new_max = jnp.maximum(run_max, jnp.max(scores, axis=1))
    probs = jnp.exp(scores - new_max[:, None])
    rescale = jnp.exp(run_max - new_max)
    denom = denom * rescale + jnp.sum(probs, axis=1)
    acc = acc * rescale[:, None] + _dot(probs.astype(v.dtype), v, ((1,), (0,)))
    return new_max, denom, acc

  init = (jnp.full((gp,), _NEG, jnp.float32), jnp.zeros((gp,), jnp.float32),
          jnp.zeros((gp, dh), jnp.float32))
  first = lo // block
  last = jnp.maximum((hi + block - 1) // block, first)
  _, denom, acc = jax.lax.fori_loop(first, last, step, init)
  return acc / jnp.maximum(denom, 1e-30)[:, None]


def _kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, *, block: int, scale: float):
  """One (row, kv head): q_ref [Gp, Dh], k_ref/v_ref [S, Dh], o_ref [Gp, Dh]; slots [lo, hi)."""

  def load(i):
    start = pl.multiple_of(i * block, block)
    return k_ref[pl.ds(start, block), :], v_ref[pl.ds(start, block), :]

  o_ref[...] = attend_blocks(q_ref[...], load, lo_ref[...], hi_ref[...], block,
                             scale).astype(o_ref.dtype)


# (block, num_warps, num_stages) by head_dim; `launch/bench_engine.py --attention_sweep` times
# the alternatives on a GPU (docs/BENCHMARKS.md has the H100 figures behind these).
_TUNING: dict[int, tuple[int, int, int]] = {64: (64, 4, 3), 128: (64, 4, 3)}
_DEFAULT_TUNING = (64, 4, 3)


def tuning() -> dict[int, tuple[int, int, int]]:
  """The kernel's (block, num_warps, num_stages) by head_dim (a copy)."""
  return dict(_TUNING)


def set_tuning(head_dim: int, block: int, num_warps: int, num_stages: int) -> None:
  """Sets the kernel's launch settings for one head_dim (programs compiled after this use it)."""
  _TUNING[int(head_dim)] = (int(block), int(num_warps), int(num_stages))


def block_size(cache_len: int, preferred: int = 64) -> int:
  """The largest power of two <= `preferred` dividing the cache length (loads stay in bounds)."""
  block = preferred
  while block > 1 and cache_len % block:
    block //= 2
  return block


def launch_parts(q, dtype, interpret: bool, num_warps: int, num_stages: int):
  """What a (row, kv head) grid's launch shares: (Gp: the query heads of a group padded to the
  matrix units' rows, q padded so [B, KVH, Gp, Dh] in `dtype`, the per-row and per-head block
  specs, the Triton settings unless `interpret`)."""
  groups, dh = q.shape[2], q.shape[3]
  rows = max(_MIN_ROWS, 1 << (groups - 1).bit_length())
  q_padded = jnp.pad(q, ((0, 0), (0, 0), (0, rows - groups), (0, 0))).astype(dtype)
  row_spec = pl.BlockSpec((None,), lambda i, j: (i,))
  head_spec = pl.BlockSpec((None, None, rows, dh), lambda i, j: (i, j, 0, 0))
  params = {}
  if not interpret:
    from jax.experimental.pallas import triton as pl_triton
    params["compiler_params"] = pl_triton.CompilerParams(num_warps=num_warps,
                                                         num_stages=num_stages)
  return rows, q_padded, row_spec, head_spec, params


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lo: jax.Array,
                     hi: jax.Array, *, block: int | None = None, interpret: bool = False,
                     num_warps: int | None = None, num_stages: int | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v over each row's cache slots [lo, hi).

  q: [B, KVH, G, Dh] (the G query heads of each kv head), k_cache / v_cache: [B, KVH, S, Dh],
  lo / hi: [B] int32 (hi <= lo: the row reads nothing and gets zeros). -> [B, KVH, G, Dh]
  in q's dtype. S must be a multiple of `block` (a power of two); Dh a power of two.
  """
  b, kvh, groups, dh = q.shape
  s = k_cache.shape[2]
  if k_cache.shape != (b, kvh, s, dh) or v_cache.shape != k_cache.shape:
    raise ValueError(f"cache shapes {k_cache.shape}/{v_cache.shape} do not match q {q.shape}")
  if dh & (dh - 1):
    raise ValueError(f"decode_attention needs a power-of-two head_dim, got {dh}")
  tuned_block, tuned_warps, tuned_stages = _TUNING.get(dh, _DEFAULT_TUNING)
  block = block or block_size(s, tuned_block)
  num_warps = num_warps or tuned_warps
  num_stages = num_stages or tuned_stages
  if s % block:
    raise ValueError(f"cache length {s} is not a multiple of the block {block}")
  rows, q_padded, row_spec, head_spec, params = launch_parts(q, k_cache.dtype, interpret,
                                                             num_warps, num_stages)
  cache_spec = pl.BlockSpec((None, None, s, dh), lambda i, j: (i, j, 0, 0))
  out = pl.pallas_call(
      functools.partial(_kernel, block=block, scale=dh ** -0.5),
      out_shape=jax.ShapeDtypeStruct((b, kvh, rows, dh), q.dtype),
      grid=(b, kvh),
      in_specs=[row_spec, row_spec, head_spec, cache_spec, cache_spec],
      out_specs=head_spec,
      interpret=interpret,
      name="decode_attention",
      **params,
  )(lo.astype(jnp.int32), hi.astype(jnp.int32), q_padded, k_cache, v_cache)
  return out[:, :, :groups]


def decode_attention_on_mesh(q, k_cache, v_cache, lo, hi, *, mesh=None, cache_spec=None,
                             **kwargs) -> jax.Array:
  """`decode_attention` on a mesh: under `shard_map`, each device runs the kernel on its own rows
  and kv heads (the cache's layout `cache_spec`, e.g. P('data', 'model', None, None)); no data
  moves between devices. Without a mesh: `decode_attention` itself. Shapes as there."""
  if mesh is None:
    return decode_attention(q, k_cache, v_cache, lo, hi, **kwargs)
  rows, heads = tuple(cache_spec)[:2]
  per_head = P(rows, heads, None, None)
  per_row = P(rows)
  return jax.shard_map(functools.partial(decode_attention, **kwargs), mesh=mesh,
                       in_specs=(per_head, per_head, per_head, per_row, per_row),
                       out_specs=per_head, check_vma=False)(q, k_cache, v_cache, lo, hi)


def reference(q, k_cache, v_cache, lo, hi):
  """The same function in plain jnp (float32), for tests."""
  dh = q.shape[-1]
  scores = jnp.einsum("bkgd,bksd->bkgs", q.astype(jnp.float32),
                      k_cache.astype(jnp.float32)) * dh ** -0.5
  slots = jnp.arange(k_cache.shape[2])[None, None, None, :]
  live = (slots >= lo[:, None, None, None]) & (slots < hi[:, None, None, None])
  probs = jax.nn.softmax(jnp.where(live, scores, -jnp.inf), axis=-1)
  probs = jnp.where(live.any(-1, keepdims=True), probs, 0.0)
  return jnp.einsum("bkgs,bksd->bkgd", probs, v_cache.astype(jnp.float32))
