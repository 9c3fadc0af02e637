"""Generation on the tiny model: KV cache, sampling identity across batches/padding/caps, caps,
length replay, compilation. The sampler alone is tests/test_sampling.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from lsdist_jax.llama.generator import Generator
from lsdist_jax.shapes import Buckets
from lsdist_jax.llama.model import Llama, init_cache

SAMPLING = dict(temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def generator(tiny_params):
  cfg, params = tiny_params
  return Generator(Llama(cfg, jnp.float32, jnp.float32), params,
                   buckets=Buckets(batch=(1, 2, 4, 8, 16), prompt=8, cache=32))


def _prompts(n, seed=0, lo=3, hi=20):
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(3, 256, size=rng.integers(lo, hi)).tolist() for _ in range(n)]


def _responses(result):
  return [result.tokens[i, :result.num_generated[i]].tolist() for i in range(len(result.tokens))]


def test_kv_cache_decode_equals_full_forward(tiny_params):
  cfg, params = tiny_params
  model = Llama(cfg, jnp.float32, jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 256, size=(2, 12)))
  pad = jnp.zeros((2,), jnp.int32)
  full, _, _ = model.apply({"params": params}, tokens, init_cache(cfg, 2, 16, jnp.float32),
                           jnp.int32(0), pad, logits_at="all")
  logits, _, cache = model.apply({"params": params}, tokens[:, :5],
                                 init_cache(cfg, 2, 16, jnp.float32), jnp.int32(0), pad)
  steps = [logits[:, -1]]
  for t in range(5, 12):
    logits, _, cache = model.apply({"params": params}, tokens[:, t:t + 1], cache, jnp.int32(t),
                                   pad)
    steps.append(logits[:, -1])
  np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full[:, 4:]), rtol=1e-5, atol=1e-5)


def test_blocks_lowered_once_compute_what_each_layer_lowered_computes(tiny_params):
  """`Llama.lower_blocks_once` (the default) runs the blocks as calls of one jitted block:
  the same logits, hidden states and cache as each block applied in place, for a prefill and
  a per-row decode step; jitted, its program lowers one block function for all the layers."""
  import re

  import jax

  cfg, params = tiny_params
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, 256, size=(3, 9)))
  pad = jnp.asarray([0, 2, 4], jnp.int32)
  outs = {}
  for once in (True, False):
    model = Llama(cfg, jnp.float32, jnp.float32, lower_blocks_once=once)

    def run(p, model=model):
      logits, hidden, cache = model.apply({"params": p}, tokens, init_cache(cfg, 3, 16,
                                                                           jnp.float32),
                                          jnp.int32(0), pad, hidden_layers=(0, -1))
      step, _, cache = model.apply({"params": p}, tokens[:, -1:], cache,
                                   jnp.asarray([9, 10, 11], jnp.int32), pad)
      return logits, hidden, step, cache

    outs[once] = jax.jit(run)(params)
    text = jax.jit(run).lower(params).as_text()
    defined = re.findall(r"func\.func [a-z ]*@(_block_call\w*)", text)
    called = re.findall(r"call @(_block_call\w*)", text)
    if once:  # one function per shape (the prefill's, the step's), called once per layer
      assert len(defined) == 2 and sorted(called) == sorted(defined * cfg.num_layers)
    else:
      assert defined == called == []
  for a, b in zip(jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_batch_composition_and_padding_do_not_change_a_request(generator):
  prompts = _prompts(6)
  alone = [_responses(generator.generate([p], cap=40, max_seq_len=128, request_ids=[r],
                                         **SAMPLING))[0] for r, p in enumerate(prompts)]
  together = _responses(generator.generate(prompts, cap=40, max_seq_len=128,
                                           request_ids=range(6), **SAMPLING))
  assert together == alone
  # Another order, another batch bucket, more left padding (a long neighbour).
  order = [4, 1, 5]
  mixed = _responses(generator.generate([prompts[i] for i in order] + [[1] + [9] * 30], cap=40,
                                        max_seq_len=128, request_ids=order + [99], **SAMPLING))
  assert mixed[:3] == [alone[i] for i in order]
  assert any(len(r) > 5 for r in alone)


def test_request_id_and_seed_change_the_sample(generator):
  prompt = _prompts(1, seed=3)
  a = _responses(generator.generate(prompt * 2, cap=30, max_seq_len=128, request_ids=[0, 1],
                                    **SAMPLING))
  assert a[0] != a[1]


# Per-row sampling settings: mixed temperatures (greedy included), top-p (1.0 included: every
# token), seeds and max_new_tokens in one batch.
MIXED = dict(temperature=[0.0, 0.7, 1.3, 0.9, 1.0, 0.5], top_p=[0.9, 1.0, 0.5, 0.95, 0.8, 1.0],
             seed=[3, 7, 7, 123456789, 0, 11], max_new_tokens=[40, 5, 40, 17, 40, 1])


def test_per_row_settings_give_each_request_its_run_alone(generator):
  prompts = _prompts(6, seed=12)
  together = _responses(generator.generate(prompts, cap=40, max_seq_len=128,
                                           request_ids=range(6), **MIXED))
  alone = []
  for r, p in enumerate(prompts):
    one = {k: v[r] for k, v in MIXED.items()}
    limit = one.pop("max_new_tokens")
    alone.append(_responses(generator.generate([p], cap=40, max_seq_len=128, request_ids=[r],
                                               max_new_tokens=[limit], **one))[0])
  assert together == alone
  assert len(together[5]) <= 1 and len(together[1]) <= 5 and len(together[3]) <= 17
  # the settings matter: the same rows with one shared setting differ
  uniform = _responses(generator.generate(prompts, cap=40, max_seq_len=128,
                                          request_ids=range(6), **SAMPLING))
  assert uniform != together


def test_uniform_per_row_settings_equal_the_scalar_settings(generator):
  prompts = _prompts(5, seed=13)
  scalar = generator.generate(prompts, cap=30, max_seq_len=128, request_ids=range(5),
                              **SAMPLING)
  rows = generator.generate(prompts, cap=30, max_seq_len=128, request_ids=range(5),
                            **{k: [v] * 5 for k, v in SAMPLING.items()})
  assert _responses(scalar) == _responses(rows)
  with pytest.raises(ValueError, match="one per row"):
    generator.generate(prompts, cap=30, max_seq_len=128, temperature=[0.5, 0.6])


def test_capped_then_continued_equals_uncapped(generator):
  prompts = _prompts(5, seed=4)
  full = generator.generate(prompts, cap=60, max_seq_len=128, request_ids=range(5), **SAMPLING)
  capped = generator.generate(prompts, cap=6, max_seq_len=128, request_ids=range(5), **SAMPLING)
  assert (capped.num_generated <= 6).all()
  unfinished = np.nonzero(~capped.finished)[0]
  assert unfinished.size > 0
  partial = _responses(capped)
  assert all(len(partial[i]) == 6 for i in unfinished)
  cont = generator.generate([prompts[i] + partial[i] for i in unfinished], cap=60 - 6,
                            max_seq_len=128, request_ids=unfinished.tolist(),
                            start_steps=[len(partial[i]) for i in unfinished], **SAMPLING)
  joined = {i: partial[i] + r for i, r in zip(unfinished, _responses(cont))}
  for i, response in enumerate(_responses(full)):
    assert joined.get(i, partial[i]) == response
    finished = cont.finished[list(unfinished).index(i)] if i in joined else capped.finished[i]
    assert bool(finished) == bool(full.finished[i])


def test_row_finishing_exactly_at_the_cap_is_reported_finished(generator):
  prompts = _prompts(8, seed=5)
  full = generator.generate(prompts, cap=60, max_seq_len=128, request_ids=range(8), **SAMPLING)
  i = int(np.argmax(full.finished & (full.num_generated > 0)))
  cap = int(full.num_generated[i])
  capped = generator.generate([prompts[i]], cap=cap, max_seq_len=128, request_ids=[i],
                              **SAMPLING)
  assert capped.finished[0] and capped.num_generated[0] == cap


def test_max_seq_len_stops_rows_unfinished(generator):
  prompt = [[1] + [40] * 9]
  out = generator.generate(prompt, cap=100, max_seq_len=14, temperature=0.0, top_p=1.0)
  assert out.num_generated[0] <= 4
  if out.num_generated[0] == 4:
    assert not out.finished[0]


def test_length_replay_forces_eos_at_recorded_lengths(generator):
  prompts = _prompts(4, seed=6)
  out = generator.generate(prompts, cap=50, max_seq_len=128, forced_lengths=[0, 3, 17, 40],
                           **SAMPLING)
  assert out.num_generated.tolist() == [0, 3, 17, 40]
  assert out.finished.all()


def test_changing_cap_does_not_recompile(generator):
  prompts = _prompts(3, seed=8, lo=3, hi=6)
  generator.generate(prompts, cap=10, max_seq_len=128, **SAMPLING)
  before = generator.compile_count
  generator.generate(prompts, cap=17, max_seq_len=128, cache_len=32, **SAMPLING)
  generator.generate(prompts[:2] + [[1, 2, 3]], cap=5, max_seq_len=128, cache_len=32, **SAMPLING)
  assert generator.compile_count - before <= 1  # cache_len 32 may be a new bucket; once


def test_prompt_longer_than_context_is_refused(generator):
  with pytest.raises(ValueError, match="leaves no room"):
    generator.generate([[1] * 50], cap=10, max_seq_len=50)


def test_compilation_cache_serves_the_next_process(tmp_path):
  """engine.compilation_cache: the first process writes its programs, a second one with the same
  shapes finds every one of them there (writes nothing new)."""
  import os
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = (
      "import sys; sys.path.insert(0, sys.argv[2])\n"
      "from configs import tiny\n"
      "from lsdist_jax.engine import load_engine\n"
      "c = tiny.get_config(); c.engine.compilation_cache = sys.argv[1]\n"
      "e = load_engine(c)\n"
      "out = e.generate(['hello'], max_new_tokens=3, temperature=0.0, top_p=1.0, seed=0)\n"
      "print(out[0].token_ids)\n")
  cache = tmp_path / "xla"
  runs = []
  for _ in range(2):
    done = subprocess.run([sys.executable, "-c", script, str(cache), repo], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-2000:]
    runs.append((done.stdout.strip().splitlines()[-1], sorted(os.listdir(cache))))
  assert runs[0][1] and runs[1][1] == runs[0][1]
  assert runs[1][0] == runs[0][0]
