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
  # the load says where its time went: the GGUF's read, the tokenizer, the placement
  assert set(engine.load_seconds) == {"backend", "read", "tokenizer_wait", "place"}


def test_tokenizer_kept_after_conversion_is_the_same_tokenizer(gguf_path, tmp_path, monkeypatch):
  from lsdist_jax.llama import gguf_tokenizer
  from lsdist_jax.llama.tokenizer import Tokenizer, tokenizer_cache_dir

  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  header = Tokenizer.from_pretrained(gguf_path, gguf_file=gguf_path, name="smollm2")
  assert isinstance(header.hf, gguf_tokenizer.HeaderTokenizer)  # built, not converted nor kept
  assert not os.path.exists(tmp_path / "lsdist_jax")
  # a file whose tokenizer transformers converts: converted once, then read from the cache
  monkeypatch.setattr(gguf_tokenizer, "byte_level_tokenizer", lambda path: None)
  converted = Tokenizer.from_pretrained(gguf_path, gguf_file=gguf_path, name="smollm2")
  cache = tokenizer_cache_dir(gguf_path)
  assert cache.startswith(str(tmp_path)) and os.path.isfile(os.path.join(cache, "tokenizer.json"))
  kept = Tokenizer.from_pretrained(gguf_path, gguf_file=gguf_path, name="smollm2")
  assert kept.hf.name_or_path == cache  # read from the cache, not converted again
  talk = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]},
          {"role": "assistant", "content": "Red, yellow, blue."},
          {"role": "user", "content": PROMPTS[2]}]
  for t in PROMPTS + ["  spaces\tand\nnewlines  ", "émojis 🙂 and 中文"]:
    assert kept.format(t) == converted.format(t)
    assert kept.encode_prompt(t) == converted.encode_prompt(t)
    assert kept.encode_raw(t) == converted.encode_raw(t)
  assert kept.encode_messages(talk) == converted.encode_messages(talk)
  assert (kept.bos_token_id, kept.hf.eos_token_id) == (converted.bos_token_id,
                                                      converted.hf.eos_token_id)
  ids = converted.encode_prompt(PROMPTS[0])
  assert kept.decode(ids) == converted.decode(ids)
  assert header.encode_messages(talk) == converted.encode_messages(talk)
  assert header.decode(ids) == converted.decode(ids)
  monkeypatch.setenv("LSDIST_NO_TOKENIZER_CACHE", "1")
  assert tokenizer_cache_dir(gguf_path) == ""


def test_the_header_built_tokenizer_is_transformers_on_every_shipped_prompt(gguf_path):
  """SmolLM2's tokenizer built from the GGUF header (llama/gguf_tokenizer.py, what a first load
  uses) against transformers' own conversion, on every shipped Alpaca prompt chat-formatted."""
  from transformers import AutoTokenizer

  from lsdist_jax.data import prompt_text, read_pool
  from lsdist_jax.llama.gguf_tokenizer import byte_level_tokenizer

  ours = byte_level_tokenizer(gguf_path)
  theirs = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                         gguf_file=os.path.basename(gguf_path))
  texts = [prompt_text(r) for r in read_pool()]
  assert len(texts) > 7000
  for text in texts:
    chat = [{"role": "user", "content": text}]
    formatted = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(chat, add_generation_prompt=True,
                                    tokenize=False) == formatted
    assert (ours(formatted, add_special_tokens=False)["input_ids"]
            == theirs(formatted, add_special_tokens=False)["input_ids"]), text


def test_the_early_start_tokenizes_prompts_as_the_loaded_model(gguf_path):
  """The job's early start tokenizes the prompts while the weights load (to compile their
  programs ahead): its token ids are the loaded engine's, by preset name and by file path."""
  from lsdist_jax.config import default_config
  from lsdist_jax.serve import early

  from concurrent.futures import Future

  for name, path in (("smollm2-135m-instruct", ""), ("smollm2-135m-instruct", gguf_path)):
    cfg = default_config()
    cfg.model.name, cfg.model.path = name, path
    engine = Engine.load(path or name, dtype="float32")
    tokenizer = early.gguf_tokenizer(cfg, early.header_config(path or name))
    assert tokenizer.encode_prompts(PROMPTS) == engine.encode(PROMPTS)
    # handed to the loading engine, it is the engine's; a failed one is built again
    ready, failed = Future(), Future()
    ready.set_result(tokenizer)
    failed.set_exception(RuntimeError("no tokenizer"))
    assert Engine.load(path or name, dtype="float32", gguf_tokenizer=ready).tokenizer is tokenizer
    again = Engine.load(path or name, dtype="float32", gguf_tokenizer=failed)
    assert again.encode(PROMPTS) == engine.encode(PROMPTS)
