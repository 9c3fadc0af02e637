"""Parity with transformers' LlamaForCausalLM (torch, CPU, float32) on the same safetensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import tiny_config
from lsdist_jax.llama import weights as wts
from lsdist_jax.llama.generator import Generator
from lsdist_jax.llama.model import Llama, init_cache, init_params


def _torch_model(directory):
  from transformers import LlamaForCausalLM

  model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
  return model.eval()


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def checkpoint(request, tmp_path):
  cfg = tiny_config(tied=request.param)
  params = init_params(Llama(cfg, jnp.float32, jnp.float32), seed=3)
  params = jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x + 0.1 * np.arange(x.shape[0]) / x.shape[0], params)
  wts.save_safetensors_dir(str(tmp_path), cfg, params)
  loaded_cfg, loaded = wts.load_safetensors_dir(str(tmp_path))
  assert loaded_cfg.num_kv_heads < loaded_cfg.num_heads  # GQA
  assert loaded_cfg.tie_word_embeddings == request.param
  return str(tmp_path), loaded_cfg, loaded


def test_logits_match_transformers(checkpoint):
  directory, cfg, params = checkpoint
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, size=(3, 17))
  model = Llama(cfg, jnp.float32, jnp.float32)
  cache = init_cache(cfg, 3, 17, jnp.float32)
  ours, _, _ = model.apply({"params": params}, jnp.asarray(tokens), cache, jnp.int32(0),
                           jnp.zeros((3,), jnp.int32), logits_at="all")
  with torch.no_grad():
    theirs = _torch_model(directory)(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=2e-4, atol=2e-4)


def test_greedy_generation_matches_transformers_for_32_steps(checkpoint):
  directory, cfg, params = checkpoint
  prompts = [[1, 5, 9, 77, 31, 8], [1, 200, 13]]
  gen = Generator(Llama(cfg, jnp.float32, jnp.float32), params)
  # No EOS stop on either side: compare 32 raw greedy steps.
  gen.eos_ids = (-1,)
  ours = gen.generate(prompts, cap=32, max_seq_len=256, temperature=0.0)
  torch_model = _torch_model(directory)
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, min_new_tokens=32)
    theirs = out[0, len(prompt):].tolist()
    assert ours.num_generated[row] == 32
    assert ours.tokens[row, :32].tolist() == theirs
