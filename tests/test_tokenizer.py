"""A GGUF file's byte-level BPE tokenizer built from its header (`llama/gguf_tokenizer.py`) is
transformers' conversion of the same file, token for token (the real SmolLM2 file: the slow
test in test_smollm2.py)."""

import gguf
import numpy as np
import pytest

from lsdist_jax.llama.gguf_tokenizer import byte_alphabet, byte_level_tokenizer

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Write a poem about the sea, please!",
          "Explain why 12 x 12 = 144.\nThen stop.", "naïve café — déjà vu, 東京 and 😀 too",
          "def f(x):\n    return x ** 2  # squares", "Don't, won't, I'll, we've; they're."] * 3
TEXTS = ["", " ", "  two leading spaces", "tab\there\r\nand windows lines", "émoji 😀 中文 ✓",
         "<|im_start|>user\nhi<|im_end|>", "<|endoftext|><|endoftext|> x", "zzzz" * 40,
         "an unseen word: floccinaucinihilipilification", "\x00 control \x1b bytes"] + CORPUS


@pytest.fixture(scope="module")
def bpe_gguf(tmp_path_factory):
  """A GGUF whose tokenizer is a small byte-level BPE learnt on CORPUS, three control tokens
  and a user-defined one, as llama.cpp writes SmolLM2's."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  learner = Tokenizer(models.BPE())
  learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  learner.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  vocab = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
  tokens = [t for t, _ in vocab] + ["<think>"]
  types = [3 if t in specials else 1 for t, _ in vocab] + [4]
  model = learner.to_str()
  import json

  merges = [m if isinstance(m, str) else " ".join(m)
            for m in json.loads(model)["model"]["merges"]]
  path = tmp_path_factory.mktemp("tok") / "bpe.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_context_length(64)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_head_count_kv(1)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  writer.add_pad_token_id(2)
  writer.add_chat_template(TEMPLATE)
  writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def test_the_header_built_tokenizer_is_transformers_conversion(bpe_gguf):
  import os

  from transformers import AutoTokenizer

  ours = byte_level_tokenizer(bpe_gguf)
  theirs = AutoTokenizer.from_pretrained(os.path.dirname(bpe_gguf),
                                         gguf_file=os.path.basename(bpe_gguf))
  assert ours is not None and len(ours) == len(theirs)
  for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
    assert getattr(ours, name) == getattr(theirs, name), name
  for text in TEXTS:
    chat = [{"role": "user", "content": text}]
    formatted = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(chat, add_generation_prompt=True,
                                    tokenize=False) == formatted
    for x in (text, formatted):
      ids = theirs(x, add_special_tokens=False)["input_ids"]
      assert ours(x, add_special_tokens=False)["input_ids"] == ids, repr(x)
      assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
          ids, skip_special_tokens=True)
  # control tokens stay whole; the user-defined one too
  assert ours("<|im_start|><think>", add_special_tokens=False)["input_ids"] == [1, len(ours) - 1]


def test_prompts_encoded_and_responses_decoded_as_one_batch_equal_one_by_one(bpe_gguf):
  """`Tokenizer.encode_prompts` (one batch call) and `decode_batch` give what encode_prompt and
  decode give text by text, on the header-built tokenizer and on transformers'."""
  import os

  from transformers import AutoTokenizer

  from lsdist_jax.llama.tokenizer import Tokenizer

  theirs = AutoTokenizer.from_pretrained(os.path.dirname(bpe_gguf),
                                         gguf_file=os.path.basename(bpe_gguf))
  for hf in (byte_level_tokenizer(bpe_gguf), theirs):
    for chat_format in ("template", "none"):
      tok = Tokenizer(hf, chat_format, "x", 1)
      batch = tok.encode_prompts(TEXTS)
      assert batch == [tok.encode_prompt(t) for t in TEXTS]
      assert tok.encode_prompts([]) == []
      assert tok.decode_batch(batch) == [tok.decode(ids) for ids in batch]
      assert any(len(ids) > 3 for ids in batch)


def test_the_header_built_tokenizer_never_imports_transformers(bpe_gguf):
  import subprocess
  import sys

  code = ("import sys; from lsdist_jax.llama.tokenizer import Tokenizer, gguf_hf_tokenizer; "
          f"t = Tokenizer(gguf_hf_tokenizer({bpe_gguf!r}), name='x'); "
          "print(t.chat_format, t.encode_prompt('hi there'), 'transformers' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  fmt, *_, imported = out.stdout.split()
  assert fmt == "template" and imported == "False"


def test_the_header_built_tokenizer_saved_is_read_back_by_transformers(bpe_gguf, tmp_path):
  from transformers import AutoTokenizer

  ours = byte_level_tokenizer(bpe_gguf)
  ours.save_pretrained(str(tmp_path / "tok"))
  back = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[3]}]
  assert back.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
      ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  for text in TEXTS:
    ids = ours(text, add_special_tokens=False)["input_ids"]
    assert back(text, add_special_tokens=False)["input_ids"] == ids
    assert back.decode(ids, skip_special_tokens=True) == ours.decode(ids, skip_special_tokens=True)
  assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (
      ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)


def test_a_template_beyond_jinja_is_left_to_transformers(bpe_gguf, monkeypatch):
  from lsdist_jax.llama import gguf_tokenizer

  real = gguf_tokenizer.gguf_file.read

  def with_template(path, arrays=()):
    header = real(path, arrays)
    header.fields["tokenizer.chat_template"] = "{% generation %}{{ x }}{% endgeneration %}"
    return header

  monkeypatch.setattr(gguf_tokenizer.gguf_file, "read", with_template)
  assert byte_level_tokenizer(bpe_gguf) is None


def test_other_vocabularies_are_left_to_transformers(tmp_path):
  path = tmp_path / "spm.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model("llama")
  writer.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  assert byte_level_tokenizer(str(path)) is None


def test_the_byte_alphabet_spells_every_byte_once():
  spelled = byte_alphabet()
  assert sorted(spelled) == list(range(256)) and len(set(spelled.values())) == 256
  assert spelled[ord("A")] == "A" and spelled[ord(" ")] == "\u0120"  # GPT-2's "Ġ"
