"""The real embedded model: SmolLM2-135M-Instruct's GGUF read by us and by transformers."""

import os

import numpy as np
import pytest
import torch

from lsdist_jax.engine import Engine, find_smollm2_gguf

pytestmark = pytest.mark.slow  # the real 98 MB model, checked against transformers

PROMPTS = ["Give three tips for staying healthy.", "What are the three primary colors?",
           "Describe the structure of an atom."]


@pytest.fixture(scope="module")
def gguf_path():
  try:
    return find_smollm2_gguf()
  except FileNotFoundError as e:
    pytest.fail(f"the embedded model must be installed for this test: {e}")


def test_greedy_tokens_match_transformers_for_16_steps(gguf_path):
  from transformers import AutoModelForCausalLM

  engine = Engine.load("smollm2-135m-instruct", dtype="float32")
  ids = engine.encode(PROMPTS)
  engine.generator.eos_ids = (-1,)  # compare 16 raw steps, no EOS stop
  ours = engine.generator.generate(ids, cap=16, max_seq_len=2048, temperature=0.0)
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path),
                                            gguf_file=os.path.basename(gguf_path),
                                            dtype=torch.float32).eval()
  for row, prompt in enumerate(ids):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                        min_new_tokens=16, eos_token_id=None, pad_token_id=2)
    assert ours.tokens[row, :16].tolist() == out[0, len(prompt):].tolist()


def test_chat_format_and_tokenizer_of_the_embedded_model(gguf_path):
  engine = Engine.load("smollm2-135m-instruct", dtype="float32")
  text = engine.tokenizer.format(PROMPTS[0])
  assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
  ids = engine.encode(PROMPTS[:1])[0]
  assert ids[0] == 1 and engine.tokenizer.decode(ids).count(PROMPTS[0]) == 1
  assert engine.config.tie_word_embeddings and engine.config.num_kv_heads == 3
  hidden = engine.embed(PROMPTS)
  assert hidden.shape == (3, 576) and np.isfinite(hidden).all()
