"""The Pallas decode-attention kernel (run in interpret mode on the CPU) against plain jnp, and
generation through it against generation through XLA's batched GEMMs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsdist_jax.engine import resolve_decode_impl
from lsdist_jax.llama.decode_attention import block_size, decode_attention, reference
from lsdist_jax.llama.generator import Generator
from lsdist_jax.shapes import Buckets
from lsdist_jax.llama.model import Llama


@pytest.mark.parametrize("groups,head_dim,cache_len,block", [(3, 64, 96, 32), (1, 16, 64, 16),
                                                             (2, 8, 128, 64)])
def test_kernel_matches_softmax_attention_over_each_rows_live_slots(groups, head_dim, cache_len,
                                                                     block):
  rng = np.random.default_rng(groups + head_dim)
  b, kvh = 6, 2
  q = jnp.asarray(rng.normal(size=(b, kvh, groups, head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, kvh, cache_len, head_dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, kvh, cache_len, head_dim)), jnp.float32)
  # whole cache; a window starting and ending inside blocks; one slot; empty (a finished row);
  # a window crossing one block boundary; hi before lo (also empty)
  lo = jnp.array([0, 5, 40, 10, block - 3, 20])
  hi = jnp.array([cache_len, cache_len - 7, 41, 10, block + 2, 4])
  out = decode_attention(q, k, v, lo, hi, block=block, interpret=True)
  want = reference(q, k, v, lo, hi)
  assert out.shape == (b, kvh, groups, head_dim)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out)[[3, 5]] == 0.0)  # rows with no live slot read nothing
  assert np.abs(np.asarray(out)[[0, 1, 2, 4]]).min(axis=(1, 2, 3)).max() > 0.0


def test_kernel_ignores_what_lies_outside_the_live_slots():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(2, 1, 4, 16)), jnp.float32)
  k = rng.normal(size=(2, 1, 64, 16)).astype(np.float32)
  v = rng.normal(size=(2, 1, 64, 16)).astype(np.float32)
  lo, hi = jnp.array([8, 0]), jnp.array([30, 17])
  first = decode_attention(q, jnp.asarray(k), jnp.asarray(v), lo, hi, interpret=True)
  k[0, :, :8], k[0, :, 30:], v[1, :, 17:] = 1e4, -1e4, 1e6
  second = decode_attention(q, jnp.asarray(k), jnp.asarray(v), lo, hi, interpret=True)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_block_size_divides_the_cache_and_bad_shapes_are_refused():
  assert block_size(320) == 64 and block_size(96) == 32 and block_size(1536, 128) == 128
  q = jnp.zeros((1, 1, 1, 12))
  with pytest.raises(ValueError, match="power-of-two head_dim"):
    decode_attention(q, jnp.zeros((1, 1, 32, 12)), jnp.zeros((1, 1, 32, 12)), jnp.array([0]),
                     jnp.array([1]), interpret=True)
  with pytest.raises(ValueError, match="cache shapes"):
    decode_attention(jnp.zeros((1, 1, 1, 16)), jnp.zeros((1, 2, 32, 16)),
                     jnp.zeros((1, 2, 32, 16)), jnp.array([0]), jnp.array([1]), interpret=True)


def test_generation_through_the_kernel_equals_generation_through_xla(tiny_params):
  cfg, params = tiny_params
  buckets = Buckets(batch=(4, 8), prompt=8, cache=32)
  rng = np.random.default_rng(5)
  prompts = [[1] + rng.integers(3, 256, size=rng.integers(3, 15)).tolist() for _ in range(5)]
  results = {}
  for impl in ("dot", "pallas"):
    gen = Generator(Llama(cfg, jnp.float32, jnp.float32, decode_impl=impl), params,
                    buckets=buckets)
    kw = dict(cap=40, max_seq_len=128, request_ids=range(5), temperature=0.8, top_p=0.9, seed=3)
    # forced lengths make rows finish at different steps: finished rows must not disturb others
    out = gen.generate(prompts, forced_lengths=[3, 40, 12, -1, 25], **kw)
    results[impl] = ([out.tokens[i, :out.num_generated[i]].tolist() for i in range(5)],
                     out.num_generated.tolist(), out.steps)
  assert results["pallas"] == results["dot"]
  assert results["dot"][1][:3] == [3, 40, 12]


def test_auto_picks_the_kernel_only_on_gpus_in_16_bit():
  on_gpu = jax.default_backend() == "gpu"
  assert resolve_decode_impl("auto", "float32", None, 64) == "dot"
  assert resolve_decode_impl("auto", "bfloat16", None, 64) == ("pallas" if on_gpu else "dot")
  # on a mesh too: each device runs the kernel on its rows and kv heads (tests/test_mesh_decode.py)
  assert resolve_decode_impl("auto", "bfloat16", object(), 64) == ("pallas" if on_gpu else "dot")
  assert resolve_decode_impl("auto", "bfloat16", None, 96) == "dot"
  assert resolve_decode_impl("pallas", "float32", None, 64) == "pallas"
  with pytest.raises(ValueError, match="decode attention 'flash'"):
    resolve_decode_impl("flash", "bfloat16", None, 64)
