"""A GGUF file's byte-level BPE tokenizer built straight from its header with `tokenizers`.

transformers converts a GGUF tokenizer through its slow classes (importing it and converting
SmolLM2's 49,152 tokens and 48,900 merges takes ~13 s on a 2-core CPU, ~20 s on a GPU host's
first run); the header holds all it needs: the vocabulary, the merges, each token's type and the
special token ids. `byte_level_tokenizer` builds the same tokenizer in about a second for the
vocabularies it knows (`tokenizer.ggml.model` "gpt2" with the GPT-2 split: SmolLM2's); anything
else is left to transformers (`tokenizer.gguf_hf_tokenizer`). tests/test_tokenizer.py checks
the two agree token for token.
"""

from __future__ import annotations

import functools

from lsdist_jax.llama import gguf_file

# `tokenizer.ggml.pre` values whose text split is GPT-2's own (transformers keeps it for these)
GPT2_SPLIT = ("default", "gpt-2", "gpt2", "smollm")
CONTROL, USER_DEFINED = 3, 4  # `tokenizer.ggml.token_type` values
_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
            "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the other 68
  bytes for the characters from U+0100 on, in byte order."""
  own = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
         *range(ord("\xae"), ord("\xff") + 1)]
  shifted = [b for b in range(256) if b not in own]
  spelled = {b: chr(b) for b in own}
  spelled.update({b: chr(256 + i) for i, b in enumerate(shifted)})
  return spelled


def byte_level_tokenizer(path: str):
  """The transformers fast tokenizer of the GGUF file at `path`, or None where its tokenizer is
  not a byte-level BPE with listed merges and GPT-2's split (transformers converts those)."""
  header = gguf_file.read(path, _ARRAYS)
  fields = header.fields if header is not None else {}
  if (fields.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.merges" not in fields
      or fields.get("tokenizer.ggml.pre", "default") not in GPT2_SPLIT
      or fields.get("tokenizer.ggml.add_space_prefix", False)):
    return None
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tokens = fields["tokenizer.ggml.tokens"]
  types = fields.get("tokenizer.ggml.token_type") or [0] * len(tokens)
  spelled = byte_alphabet()
  alphabet = set(spelled.values())
  # a token outside the byte alphabet is written as its UTF-8 bytes' characters
  vocab = {(t if set(t) <= alphabet else "".join(spelled[b] for b in t.encode("utf-8"))): i
           for i, t in enumerate(tokens)}
  merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
  backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                 continuing_subword_prefix="", end_of_word_suffix="",
                                 fuse_unk=False))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  # control tokens (<|im_start|>) stay whole and are special; a control token outside the byte
  # alphabet is a mislabel and is left out; user-defined ones stay whole, not special
  backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                              for t, k in zip(tokens, types)
                              if k == CONTROL and set(t) <= alphabet])
  backend.add_tokens([AddedToken(t, normalized=False, special=False)
                      for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
  special = {name: tokens[fields[f"tokenizer.ggml.{key}"]] for name, key in _SPECIAL.items()
             if isinstance(fields.get(f"tokenizer.ggml.{key}"), int)
             and fields[f"tokenizer.ggml.{key}"] < len(tokens)}
  return PreTrainedTokenizerFast(tokenizer_object=backend,
                                 chat_template=fields.get("tokenizer.chat_template"), **special)
