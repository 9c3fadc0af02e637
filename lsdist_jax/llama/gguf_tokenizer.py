"""A GGUF file's byte-level BPE tokenizer built straight from its header with `tokenizers`.

transformers converts a GGUF tokenizer through its slow classes (importing it and converting
SmolLM2's 49,152 tokens and 48,900 merges takes ~13 s on a 2-core CPU, ~20 s on a GPU host's
first run); the header holds all it needs: the vocabulary, the merges, each token's type and the
special token ids. `byte_level_tokenizer` builds the same tokenizer in about a second for the
vocabularies it knows (`tokenizer.ggml.model` "gpt2" with the GPT-2 split: SmolLM2's); anything
else is left to transformers (`tokenizer.gguf_hf_tokenizer`). tests/test_tokenizer.py checks
the two agree token for token.

It is a `HeaderTokenizer`: the `tokenizers` backend with transformers' calls that `Tokenizer`
uses (encode, decode, the chat template, save), without importing transformers. That import
takes 1-6 s of a process's start (6 s on a GPU host that compiles its sources anew), all of it
holding the GIL the weights' read needs beside it.
"""

from __future__ import annotations

import functools
import json
import os

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
  """The tokenizer of the GGUF file at `path` (a `HeaderTokenizer`), or None where it is not a
  byte-level BPE with listed merges and GPT-2's split, or its chat template needs more than
  jinja (transformers converts those)."""
  header = gguf_file.read(path, _ARRAYS)
  fields = header.fields if header is not None else {}
  if (fields.get("tokenizer.ggml.model") != "gpt2" or "tokenizer.ggml.merges" not in fields
      or fields.get("tokenizer.ggml.pre", "default") not in GPT2_SPLIT
      or fields.get("tokenizer.ggml.add_space_prefix", False)):
    return None
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

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
  try:
    return HeaderTokenizer(backend, fields.get("tokenizer.chat_template"), special, path)
  except ImportError:  # a template tag beyond jinja's (transformers has its own)
    return None


class HeaderTokenizer:
  """A `tokenizers` tokenizer with the calls of a transformers fast tokenizer that `Tokenizer`
  makes: `tok(text)["input_ids"]`, `decode`, `batch_decode`, `apply_chat_template` (the
  template rendered as transformers renders it: a sandboxed jinja with its `raise_exception`,
  `tojson` and `strftime_now`), `save_pretrained` (a folder transformers' AutoTokenizer reads),
  the special tokens and their ids."""

  def __init__(self, backend, chat_template: str | None, special: dict[str, str],
               name_or_path: str = ""):
    self.backend = backend
    self.chat_template = chat_template
    self.special_tokens_map = dict(special)
    self.name_or_path = name_or_path
    self._template = _compile_template(chat_template) if chat_template else None

  def __getattr__(self, name):  # bos_token, bos_token_id, eos_token, ... (None when unset)
    if name.endswith("_token_id") and name[:-3] in _SPECIAL:
      token = self.special_tokens_map.get(name[:-3])
      return None if token is None else self.backend.token_to_id(token)
    if name in _SPECIAL:
      return self.special_tokens_map.get(name)
    raise AttributeError(name)

  def __len__(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def __call__(self, text, add_special_tokens: bool = True) -> dict:
    """{"input_ids": ids} of a text, or of each of a list of texts (encoded as one batch)."""
    if isinstance(text, (list, tuple)):
      return {"input_ids": [e.ids for e in self.backend.encode_batch(
          list(text), add_special_tokens=add_special_tokens)]}
    return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
    return self.backend.decode_batch([list(r) for r in rows],
                                     skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, add_generation_prompt: bool = False,
                          tokenize: bool = True, **kwargs):
    if self._template is None:
      raise ValueError(f"{self.name_or_path or 'this tokenizer'} has no chat template")
    text = self._template.render(messages=list(messages), add_generation_prompt=bool(
        add_generation_prompt), **{**self.special_tokens_map, **kwargs})
    return self(text, add_special_tokens=False)["input_ids"] if tokenize else text

  def save_pretrained(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self.backend.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens_map,
              "chat_template": self.chat_template, "clean_up_tokenization_spaces": False}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in config.items() if v is not None}, f, ensure_ascii=False,
                indent=2)


def _compile_template(source: str):
  """A chat template compiled as transformers compiles it (ImportError: a tag jinja lacks)."""
  from datetime import datetime

  import jinja2
  from jinja2.ext import loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[loopcontrols])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception,
                     strftime_now=lambda fmt: datetime.now().strftime(fmt))
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ImportError(f"the chat template needs more than jinja: {e}") from e
