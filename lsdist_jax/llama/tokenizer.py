"""Tokenizer through transformers `AutoTokenizer` (an HF directory, a GGUF file; a byte-level
BPE GGUF through `gguf_tokenizer.HeaderTokenizer`, without transformers) and the chat format.

Chat formats: the tokenizer's own chat template; Llama-2-chat's `[INST] ... [/INST]` with BOS;
or none (raw text, BOS if the model uses one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Sequence

CHAT_FORMATS = ("auto", "template", "llama2", "none")


class Tokenizer:

  def __init__(self, hf_tokenizer, chat_format: str = "auto", name: str = "",
               bos_token_id: int | None = None):
    if chat_format not in CHAT_FORMATS:
      raise ValueError(f"chat_format={chat_format!r}; expected one of {CHAT_FORMATS}")
    self.hf = hf_tokenizer
    if chat_format == "auto":
      if getattr(hf_tokenizer, "chat_template", None):
        chat_format = "template"
      elif "llama-2" in name.lower() and "chat" in name.lower():
        chat_format = "llama2"
      else:
        chat_format = "none"
    self.chat_format = chat_format
    self.bos_token_id = bos_token_id if bos_token_id is not None else hf_tokenizer.bos_token_id

  @classmethod
  def from_pretrained(cls, path: str, gguf_file: str | None = None, chat_format: str = "auto",
                      name: str = "", bos_token_id: int | None = None) -> "Tokenizer":
    if gguf_file:
      hf = gguf_hf_tokenizer(gguf_file)
    else:
      from transformers import AutoTokenizer

      if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
      hf = AutoTokenizer.from_pretrained(path)
    return cls(hf, chat_format, name or path, bos_token_id)

  def format(self, text: str) -> str:
    """The prompt as the model sees it (chat-wrapped), as text."""
    if self.chat_format == "template":
      return self.hf.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=False)
    if self.chat_format == "llama2":
      return f"[INST] {text.strip()} [/INST]"
    return text

  def format_messages(self, messages: Sequence[dict]) -> str:
    """A conversation (chat `messages`: {"role": system | user | assistant, "content": text},
    multi-turn) as the model sees it, ending where the assistant answers next: the tokenizer's
    template with its generation prompt; Llama-2's `[INST]` turns (system in `<<SYS>>`); without
    a chat format, a lone user turn is its text and longer talks a `role: content` transcript."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if self.chat_format == "template":
      return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if self.chat_format == "llama2":
      return _llama2_turns(messages)
    if len(messages) == 1 and messages[0]["role"] == "user":
      return messages[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

  def encode_messages(self, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation (`format_messages`), BOS included where the format has one."""
    return self._encode_formatted(self.format_messages(messages))

  def encode_prompt(self, text: str) -> list[int]:
    """Token ids of the chat-formatted prompt, BOS included where the format has one."""
    return self._encode_formatted(self.format(text))

  def encode_raw(self, text: str) -> list[int]:
    """Token ids of text as it is (no chat format), BOS first where the model uses one."""
    ids = list(self.hf(text, add_special_tokens=False)["input_ids"])
    if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
      ids = [self.bos_token_id] + ids
    return ids

  def _encode_formatted(self, formatted: str) -> list[int]:
    return self._bos_first(self.hf(formatted, add_special_tokens=False)["input_ids"])

  def _bos_first(self, ids) -> list[int]:
    ids = list(ids)
    if self.chat_format in ("llama2", "none") and self.bos_token_id is not None:
      if not ids or ids[0] != self.bos_token_id:
        ids = [self.bos_token_id] + ids
    return ids

  def encode_prompts(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode_prompt` of each text, the formatted prompts encoded as one batch (the backend's
    threads, without the GIL)."""
    formatted = [self.format(t) for t in texts]
    if not formatted:
      return []
    return [self._bos_first(ids)
            for ids in self.hf(formatted, add_special_tokens=False)["input_ids"]]

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=True)

  def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
    """`decode` of each row, in one call (transformers' `batch_decode`; the header-built
    tokenizer's runs in the backend's threads)."""
    return self.hf.batch_decode([list(r) for r in rows], skip_special_tokens=True)

  def save(self, directory: str) -> None:
    self.hf.save_pretrained(directory)


def _llama2_turns(messages: list[dict]) -> str:
  """Llama-2-chat's multi-turn format (BOS of the first turn added at encoding)."""
  system = ""
  if messages and messages[0]["role"] == "system":
    system, messages = messages[0]["content"], messages[1:]
  roles = [m["role"] for m in messages]
  if not roles or roles[-1] != "user" or any(
      r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
    raise ValueError(f"Llama-2 chat needs user/assistant turns alternating from a user turn and "
                     f"ending with one (after an optional system turn); got roles {roles}")
  text = ""
  for i in range(0, len(messages), 2):
    user = messages[i]["content"].strip()
    if i == 0 and system:
      user = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user}"
    text += f"[INST] {user} [/INST]"
    if i + 1 < len(messages):
      text += f" {messages[i + 1]['content'].strip()} </s><s>"
  return text


def tokenizer_cache_dir(gguf_file: str) -> str:
  """Where the tokenizer converted from `gguf_file` is kept (${XDG_CACHE_HOME:-~/.cache}/
  lsdist_jax/tokenizers/<key>), keyed by the file (path, size, modification time) and the
  transformers version that converted it; "" when LSDIST_NO_TOKENIZER_CACHE is set."""
  import transformers

  if os.environ.get("LSDIST_NO_TOKENIZER_CACHE", "") not in ("", "0"):
    return ""
  st = os.stat(gguf_file)
  key = f"{os.path.abspath(gguf_file)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "lsdist_jax", "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:20])


def gguf_hf_tokenizer(gguf_file: str):
  """The tokenizer of a GGUF file: a byte-level BPE vocabulary (SmolLM2's) built from the header
  in about a second without importing transformers (`gguf_tokenizer.byte_level_tokenizer`), any
  other converted by transformers (~10 s for its vocabulary and merges on a CPU core) and saved
  once (`tokenizer_cache_dir`): later loads read that."""
  from lsdist_jax.llama.gguf_tokenizer import byte_level_tokenizer

  hf = byte_level_tokenizer(gguf_file)  # about a second, where the file's kind allows
  if hf is not None:
    return hf
  cache = tokenizer_cache_dir(gguf_file)
  if cache and os.path.isfile(os.path.join(cache, "tokenizer.json")):
    # The kept tokenizer is a fast one (tokenizer.json + its config and chat template): the base
    # class reads it without AutoTokenizer, whose import pulls in torch (seconds per process).
    from transformers import PreTrainedTokenizerFast

    try:
      return PreTrainedTokenizerFast.from_pretrained(cache)
    except (OSError, ValueError) as e:
      logging.warning("tokenizer cache %s unreadable (%s); converting %s again", cache, e,
                      gguf_file)
  from transformers import AutoTokenizer

  hf = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_file)),
                                     gguf_file=os.path.basename(gguf_file))
  if cache:
    try:  # written whole or not at all: a folder renamed into place
      os.makedirs(os.path.dirname(cache), exist_ok=True)
      tmp = tempfile.mkdtemp(dir=os.path.dirname(cache), prefix=".tmp-")
      hf.save_pretrained(tmp)
      try:
        os.replace(tmp, cache)
      except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
      logging.warning("could not keep the tokenizer of %s in %s: %s", gguf_file, cache, e)
  return hf
