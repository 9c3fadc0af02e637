"""Decode attention over a paged KV pool (`llama/paged.py`): one new token per row, written to
its page, then attention over the row's pages in order.

Pool layout (one dict per layer): k, v: [kv_heads, pages, page, head_dim]. Row b's context
position s lives in page pages[b, s // page] at offset s % page; an entry equal to the pool's
page count means none (writes there are dropped). The `dot` path gathers each row's pages into
a [B, KVH, MP x page, Dh] view (CPU, tests); `pallas` runs a kernel that reads only the pages
of each row's live positions [lo, hi), like `decode_attention`'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lsdist_jax.llama.decode_attention import attend_blocks, launch_parts

_MASKED = -1e30


def write_and_attend(q, k_new, v_new, layer_cache, write_index, lo, hi, pages, *,
                     impl: str, dtype):
  """q [B, KVH, G, Dh]; k_new / v_new [B, KVH, Dh] (the token's key and value, written at
  position write_index [B]); lo / hi [B] live positions; pages [B, MP].
  -> (out [B, KVH, G, Dh] in dtype, the layer's pool)."""
  kvh, num_pages, page, hd = layer_cache["k"].shape
  b = q.shape[0]
  rows = jnp.arange(b)
  w = write_index.astype(jnp.int32)
  at = pages[rows, jnp.minimum(w // page, pages.shape[1] - 1)] * page + w % page  # [B]
  pool = {}
  for name, new in (("k", k_new), ("v", v_new)):
    flat = layer_cache[name].reshape(kvh, num_pages * page, hd)
    pool[name] = flat.at[:, at].set(new.transpose(1, 0, 2).astype(flat.dtype), mode="drop")
  if impl == "pallas":
    out = paged_decode_attention(q, pool["k"], pool["v"], lo, hi, pages, page=page,
                                 interpret=jax.default_backend() != "gpu")
  else:
    idx = jnp.minimum(pages[:, :, None] * page + jnp.arange(page), num_pages * page - 1)
    idx = idx.reshape(b, -1)  # [B, S'] pool positions of each row's logical positions
    k_rows = pool["k"][:, idx].transpose(1, 0, 2, 3).astype(dtype)  # [B, KVH, S', Dh]
    v_rows = pool["v"][:, idx].transpose(1, 0, 2, 3).astype(dtype)
    scores = jnp.einsum("bkgd,bksd->bkgs", q, k_rows,
                        preferred_element_type=jnp.float32) * (hd ** -0.5)
    slots = jnp.arange(idx.shape[1])[None, None, None, :]
    live = (slots >= lo[:, None, None, None]) & (slots < hi[:, None, None, None])
    probs = jax.nn.softmax(jnp.where(live, scores, _MASKED), axis=-1).astype(dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v_rows)
  return out, {name: x.reshape(kvh, num_pages, page, hd) for name, x in pool.items()}


def _kernel(lo_ref, hi_ref, pt_ref, q_ref, k_ref, v_ref, o_ref, *, page: int, scale: float):
  """One (row, kv head): q_ref [Gp, Dh], k_ref / v_ref [T, Dh] (the head's whole pool),
  pt_ref [MP] (the row's pages); logical positions [lo, hi), page by page."""

  def load(i):
    start = pl.multiple_of(pt_ref[i] * page, page)
    return k_ref[pl.ds(start, page), :], v_ref[pl.ds(start, page), :]

  o_ref[...] = attend_blocks(q_ref[...], load, lo_ref[...], hi_ref[...], page,
                             scale).astype(o_ref.dtype)


def paged_decode_attention(q, k_pool, v_pool, lo, hi, pages, *, page: int,
                           interpret: bool = False, num_warps: int = 4,
                           num_stages: int = 2):
  """softmax(q k^T / sqrt(Dh)) v over each row's logical positions [lo, hi), read page by page.
  q [B, KVH, G, Dh]; k_pool / v_pool [KVH, T, Dh] (T = pages x page); pages [B, MP] (every
  page a row's [lo, hi) touches must be one of the pool's). -> [B, KVH, G, Dh] in q's dtype."""
  b, kvh, groups, dh = q.shape
  total = k_pool.shape[1]
  if total % page or dh & (dh - 1):
    raise ValueError(f"the pool ({total} tokens) must hold whole pages of {page}, and head_dim "
                     f"({dh}) be a power of two")
  rows, q_padded, row_spec, head_spec, params = launch_parts(q, k_pool.dtype, interpret,
                                                             num_warps, num_stages)
  table_spec = pl.BlockSpec((None, pages.shape[1]), lambda i, j: (i, 0))
  pool_spec = pl.BlockSpec((None, total, dh), lambda i, j: (j, 0, 0))
  out = pl.pallas_call(
      functools.partial(_kernel, page=page, scale=dh ** -0.5),
      out_shape=jax.ShapeDtypeStruct((b, kvh, rows, dh), q.dtype),
      grid=(b, kvh),
      in_specs=[row_spec, row_spec, table_spec, head_spec, pool_spec, pool_spec],
      out_specs=head_spec,
      interpret=interpret,
      name="paged_decode_attention",
      **params,
  )(lo.astype(jnp.int32), hi.astype(jnp.int32), pages.astype(jnp.int32), q_padded, k_pool,
    v_pool)
  return out[:, :, :groups]
