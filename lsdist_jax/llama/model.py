"""Flax LLaMA: RMSNorm, RoPE, grouped-query attention over an explicit KV cache, SwiGLU, tied/untied head.

Every parameter carries logical axis names; `sharding.py` maps them to the mesh. The forward is a
pure function of (params, tokens, cache, write_index, pad_len); it neither samples nor loads files.

Cache layout (one dict per layer): k, v: [batch, kv_heads, cache_len, head_dim]. Prompts are
left-padded, so every row writes slot `write_index + i` for its i-th new token, and row b's
real tokens start at slot pad_len[b]. A token's RoPE position is its slot minus pad_len[b].
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from lsdist_jax import sharding as shd
from lsdist_jax.llama.config import LlamaConfig
from lsdist_jax.llama import decode_attention as pallas_decode
from lsdist_jax.llama import paged_attention

Array = jax.Array
Cache = list  # [{"k": [B, KVH, S, Dh], "v": [B, KVH, S, Dh]}] * num_layers

_MASKED = -1e30
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


def _param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], dtype,
           init=None):
  init = init or nn.initializers.normal(stddev=0.02)
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", (x.shape[-1],), ("norm",), self.param_dtype, nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, HF half-split convention. x: [B, T, H, Dh], positions: [B, T]."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(query_slots: Array, cache_len: int, pad_len: Array) -> Array:
  """[B, T, S] bool: query at slot q (row b) sees key slot s iff pad_len[b] <= s <= q.
  query_slots: [1, T] (every row at the same slots) or [B, T] (per row)."""
  key_slots = jnp.arange(cache_len)[None, None, :]
  return (key_slots <= query_slots[:, :, None]) & (key_slots >= pad_len[:, None, None])


class Attention(nn.Module):
  config: LlamaConfig
  dtype: Any
  param_dtype: Any
  # How a single-token step reads the cache: dot (batched GEMMs over the whole cache), reduce
  # (multiply-and-sum), pallas (decode_attention.py: only each active row's filled slots).
  decode_impl: str = "dot"
  mesh: Any = None  # the pallas kernel runs per device under shard_map on this mesh

  @nn.compact
  def __call__(self, x: Array, positions: Array, mask: Array, layer_cache: dict[str, Array],
               write_index: Array, kv_bounds: tuple[Array, Array] | None = None
               ) -> tuple[Array, dict[str, Array]]:
    cfg = self.config
    d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    groups = h // kvh
    # One projection for q, k and v, grouped by kv head: [D, KVH, G + 2, Dh] holds, for kv head
    # j, its G query heads, then its key, then its value. Splitting kv heads over the mesh's
    # `model` axis therefore keeps each group (and its cache) on one device.
    wqkv = _param(self, "wqkv", (d, kvh, groups + 2, hd), ("embed", "kv_heads", "qkv", "head_dim"),
                  self.param_dtype)
    wo = _param(self, "wo", (h, hd, d), ("heads", "head_dim", "embed"), self.param_dtype)

    x = x.astype(self.dtype)
    qkv = jnp.einsum("btd,dkgh->btkgh", x, wqkv.astype(self.dtype))
    b, t = x.shape[:2]
    q = qkv[:, :, :, :groups].reshape(b, t, h, hd)
    k, v = qkv[:, :, :, groups], qkv[:, :, :, groups + 1]
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)

    # Write the new keys/values into the cache at slots [write_index, write_index + T).
    cache_dtype = layer_cache["k"].dtype
    k_new = k.transpose(0, 2, 1, 3).astype(cache_dtype)  # [B, KVH, T, Dh]
    v_new = v.transpose(0, 2, 1, 3).astype(cache_dtype)
    if kv_bounds is not None and len(kv_bounds) == 3:  # a paged pool (llama/paged.py)
      if t != 1:
        raise ValueError(f"a paged pool takes one token per row, got {t}")
      out, pool = paged_attention.write_and_attend(
          q.reshape(b, kvh, groups, hd), k_new[:, :, 0], v_new[:, :, 0], layer_cache,
          write_index, *kv_bounds, impl=self.decode_impl, dtype=self.dtype)
      return jnp.einsum("bthk,hkd->btd", out.reshape(b, 1, h, hd), wo.astype(self.dtype)), pool
    if jnp.ndim(write_index) == 0:
      zero = jnp.zeros((), jnp.int32)
      start = (zero, zero, write_index.astype(jnp.int32), zero)
      k_cache = jax.lax.dynamic_update_slice(layer_cache["k"], k_new, start)
      v_cache = jax.lax.dynamic_update_slice(layer_cache["v"], v_new, start)
    else:  # one token per row, each at its own slot (slot-refill decoding); beyond S: dropped
      if t != 1:
        raise ValueError(f"a per-row write_index writes one token per row, got {t}")
      # vmapped over rows (a scatter with a batch dimension, not global row indices), so that
      # on a mesh each device writes its own rows without gathering anything
      slot = write_index.astype(jnp.int32)
      write = jax.vmap(lambda cache, new, at: cache.at[:, at].set(new, mode="drop"))
      k_cache = write(layer_cache["k"], k_new[:, :, 0], slot)
      v_cache = write(layer_cache["v"], v_new[:, :, 0], slot)

    q = q.reshape(b, t, kvh, groups, hd)
    if t == 1 and self.decode_impl == "pallas":
      lo, hi = kv_bounds
      # Triton lowering on GPUs; Pallas' interpreter anywhere else (CPU tests)
      out = pallas_decode.decode_attention_on_mesh(
          q[:, 0], k_cache, v_cache, lo, hi, mesh=self.mesh,
          cache_spec=None if self.mesh is None else shd.logical_to_spec(
              CACHE_AXES, k_cache.shape, self.mesh),
          interpret=jax.default_backend() != "gpu")
      out = out.reshape(b, 1, h, hd)
    elif t == 1 and self.decode_impl == "reduce":
      # Multiply-and-sum over the cache: one fused memory-bound pass, no batched GEMM.
      q1 = q[:, 0].astype(jnp.float32)  # [B, KVH, G, Dh]
      scores = jnp.sum(q1[:, :, :, None, :] * k_cache[:, :, None, :, :].astype(jnp.float32),
                       axis=-1) * (hd ** -0.5)  # [B, KVH, G, S]
      scores = jnp.where(mask[:, None, None, 0, :], scores, _MASKED)
      probs = jax.nn.softmax(scores, axis=-1)
      out = jnp.sum(probs[..., None] * v_cache[:, :, None, :, :].astype(jnp.float32), axis=3)
      out = out.astype(self.dtype).reshape(b, 1, h, hd)
    else:
      scores = jnp.einsum("btkgd,bksd->bkgts", q, k_cache.astype(self.dtype),
                          preferred_element_type=jnp.float32) * (hd ** -0.5)
      scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
      probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
      out = jnp.einsum("bkgts,bksd->btkgd", probs, v_cache.astype(self.dtype))
      out = out.reshape(b, t, h, hd)
    y = jnp.einsum("bthk,hkd->btd", out, wo.astype(self.dtype))
    return y, {"k": k_cache, "v": v_cache}


class MLP(nn.Module):
  config: LlamaConfig
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d, f = self.config.hidden_size, self.config.intermediate_size
    w_gate_up = _param(self, "w_gate_up", (d, 2, f), ("embed", "gate_up", "mlp"),
                       self.param_dtype)  # one GEMM for both
    w_down = _param(self, "w_down", (f, d), ("mlp", "embed"), self.param_dtype)
    x = x.astype(self.dtype)
    gate_up = jnp.einsum("btd,dcf->btcf", x, w_gate_up.astype(self.dtype))
    gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(self.dtype)
    return jnp.einsum("btf,fd->btd", hidden, w_down.astype(self.dtype))


class Block(nn.Module):
  config: LlamaConfig
  dtype: Any
  param_dtype: Any
  decode_impl: str = "dot"
  mesh: Any = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, write_index, kv_bounds=None):
    cfg = self.config
    attn_in = RMSNorm(cfg.rms_norm_eps, name="attn_norm")(x)
    attention = Attention(cfg, self.dtype, self.param_dtype, self.decode_impl, self.mesh,
                          name="attn")
    attn_out, layer_cache = attention(attn_in, positions, mask, layer_cache, write_index,
                                      kv_bounds)
    x = x + attn_out
    x = x + MLP(cfg, self.dtype, self.param_dtype, name="mlp")(
        RMSNorm(cfg.rms_norm_eps, name="mlp_norm")(x))
    return x, layer_cache


class Llama(nn.Module):
  """Decoder-only LLaMA.

  __call__(tokens [B, T], cache, write_index (int scalar, or [B] for one token per row each
  at its own slot), pad_len [B]) ->
    (logits [B, T or 1, V] float32, hidden {layer: [B, T or 1, D]}, cache)
  `active` [B] bool (decode steps): rows still generating; with the pallas decode attention a
  row that is not active reads no cache at all (its outputs are then meaningless).
  `logits_at="last"` computes the head only for the last position (prefill and decode);
  `hidden_layers` picks which hidden states to return: k in 0..num_layers-1 is block k's output,
  -1 is the final-norm output (the head's input). `pages` [B, MP]: the cache is a paged pool
  (`paged_attention`), one token per row at write_index [B].
  """
  config: LlamaConfig
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.bfloat16
  decode_impl: str = "dot"
  mesh: Any = None  # where the params and caches live (the pallas decode kernel needs it)
  # decode.py's prefill-only programs (the prediction prefill, the slot insert) run their blocks
  # as one scan (`prefill_scanned`): a fraction of the compile time, a transient weight copy
  scan_prefill: bool = False
  # Applying the model (not initializing it), the blocks run as calls of one jitted block
  # (`_block_call`): traced and lowered once per shape instead of once per layer (a decode
  # loop's lowering is Python, and its threads share the GIL with the job's loading); XLA
  # inlines the calls, so the compiled program is the unrolled one.
  lower_blocks_once: bool = True

  @nn.compact
  def __call__(self, tokens: Array, cache: Cache, write_index: Array, pad_len: Array,
               logits_at: str = "last", hidden_layers: Sequence[int] = (),
               hidden_at: str = "last", active: Array | None = None,
               pages: Array | None = None):
    cfg = self.config
    embedding = _param(self, "embed", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                       self.param_dtype)
    # a paged pool (pages [B, MP]: each row's pages): MP x page logical positions per row
    cache_len = (cache[0]["k"].shape[2] if pages is None
                 else pages.shape[1] * cache[0]["k"].shape[2])
    positions, mask, kv_bounds = _geometry(tokens.shape, cache_len, write_index, pad_len, active)
    if pages is not None:
      kv_bounds = kv_bounds + (pages,)

    def pick(x):
      return x[:, -1:] if hidden_at == "last" else x

    x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
    hidden = {}
    new_cache = []
    once = self.lower_blocks_once and not self.is_initializing()
    spec = (cfg, self.dtype, self.param_dtype, self.decode_impl, self.mesh)
    for i in range(cfg.num_layers):
      if once:
        x, layer_cache = _block_call(spec, self.variables["params"][f"layers_{i}"], x,
                                     positions, mask, cache[i], write_index, kv_bounds)
      else:
        x, layer_cache = Block(*spec, name=f"layers_{i}")(
            x, positions, mask, cache[i], write_index, kv_bounds)
      new_cache.append(layer_cache)
      if i in hidden_layers:
        hidden[i] = pick(x)
    x = RMSNorm(cfg.rms_norm_eps, name="final_norm")(x)
    if -1 in hidden_layers:
      hidden[-1] = pick(x)
    if logits_at == "last":
      x = x[:, -1:]
    head = None if cfg.tie_word_embeddings else _param(
        self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), self.param_dtype)
    return _logits(x, embedding, head, self.dtype), hidden, new_cache


@functools.partial(jax.jit, static_argnums=0)
def _block_call(spec, params, x, positions, mask, layer_cache, write_index, kv_bounds):
  """`Block(*spec)` applied with `params`: jitted, so that inside a program being traced the
  layers' calls (same shapes) share one trace and one lowered function."""
  return Block(*spec).apply({"params": params}, x, positions, mask, layer_cache, write_index,
                            kv_bounds)


def _geometry(shape, cache_len: int, write_index, pad_len, active=None):
  """(positions [B, T], mask [B, T, S], kv_bounds) of T new tokens per row written from
  `write_index` (a scalar, or [B]: one token per row at its own slot) into a cache of S slots."""
  b, t = shape
  # [1, T] (a scalar write_index: every row at the same slots) or [B, T] (one per row)
  query_slots = jnp.reshape(write_index, (-1, 1)) + jnp.arange(t)[None, :]
  positions = jnp.maximum(query_slots - pad_len[:, None], 0)  # [B, T]
  mask = attention_mask(query_slots, cache_len, pad_len)
  # Live cache slots of each row for a decode step: [pad_len, write_index] (nothing if done).
  kv_hi = jnp.broadcast_to(write_index + t, (b,)).astype(jnp.int32)
  if active is not None:
    kv_hi = jnp.where(active, kv_hi, pad_len)
  return positions, mask, (pad_len.astype(jnp.int32), kv_hi)


def _logits(x: Array, embedding: Array, head: Array | None, dtype) -> Array:
  """The head: tied (the embedding) when `head` is None, else [D, V]; float32 logits."""
  if head is None:
    return jnp.einsum("btd,vd->btv", x, embedding.astype(dtype),
                      preferred_element_type=jnp.float32)
  return jnp.einsum("btd,dv->btv", x, head.astype(dtype), preferred_element_type=jnp.float32)


def prefill_scanned(model: Llama, params, tokens: Array, pad_len: Array, *,
                    logits_at: str = "last", hidden_layers: Sequence[int] = (),
                    hidden_at: str = "last"):
  """`model.apply({"params": params}, tokens, init_cache(.., B, T), 0, pad_len, ...)` (a
  prefill into a fresh cache of the prompt's own length) with its blocks as one `lax.scan` over
  the layers' params, stacked inside the program: one block is lowered and compiled instead of
  num_layers (the engine's `scan_prefill`). The stacked copy of the layer weights is transient
  (it costs one read and write of them per call, and their size in memory while it runs).
  Returns the same (logits, hidden, cache), the cache as one dict per layer."""
  cfg = model.config
  b, t = tokens.shape
  positions, mask, kv_bounds = _geometry(tokens.shape, t, jnp.zeros((), jnp.int32), pad_len)
  block = Block(cfg, model.dtype, model.param_dtype, model.decode_impl, model.mesh)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[params[f"layers_{i}"] for i in range(cfg.num_layers)])
  inner = [i for i in hidden_layers if i != -1]
  for i in inner:
    if not 0 <= i < cfg.num_layers:
      raise ValueError(f"hidden layer {i} is not in 0..{cfg.num_layers - 1} or -1")

  def pick(x):
    return x[:, -1:] if hidden_at == "last" else x

  def layer(x, layer_params):
    empty = jnp.zeros((b, cfg.num_kv_heads, t, cfg.head_dim), model.dtype)
    x, new = block.apply({"params": layer_params}, x, positions, mask,
                         {"k": empty, "v": empty}, jnp.zeros((), jnp.int32), kv_bounds)
    return x, (new, pick(x) if inner else None)

  x = jnp.take(params["embed"], tokens, axis=0).astype(model.dtype)
  x, (caches, picked) = jax.lax.scan(layer, x, stacked)
  hidden = {i: picked[i] for i in inner}
  x = RMSNorm(cfg.rms_norm_eps).apply({"params": params["final_norm"]}, x)
  if -1 in hidden_layers:
    hidden[-1] = pick(x)
  if logits_at == "last":
    x = x[:, -1:]
  logits = _logits(x, params["embed"], params.get("lm_head"), model.dtype)
  cache = [{"k": caches["k"][i], "v": caches["v"][i]} for i in range(cfg.num_layers)]
  return logits, hidden, cache


def init_cache(config: LlamaConfig, batch: int, cache_len: int, dtype=jnp.bfloat16) -> Cache:
  shape = (batch, config.num_kv_heads, cache_len, config.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(config.num_layers)]


def abstract_params(model: Llama):
  """Boxed (LogicallyPartitioned) ShapeDtypeStructs of the params, without allocating them."""
  cfg = model.config
  cache = jax.eval_shape(lambda: init_cache(cfg, 1, 8, model.dtype))
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), cache,
                         jnp.zeros((), jnp.int32), jnp.zeros((1,), jnp.int32)))["params"]


def init_params(model: Llama, seed: int = 0):
  """Random params (plain arrays, logical boxes removed)."""
  cfg = model.config
  cache = init_cache(cfg, 1, 8, model.dtype)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32), cache,
                         jnp.zeros((), jnp.int32), jnp.zeros((1,), jnp.int32))
  return nn.meta.unbox(variables["params"])
