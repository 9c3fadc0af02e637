"""Instruction data for the LoRA length predictor: each prompt (chat-formatted, as the engine
serves it) followed by an instruction asking for the length, and the answer: the max (or median)
of the prompt's sampled response lengths rounded up to a bin (`max_bin100`), as text, then EOS.

The instruction follows the prompt's token ids instead of going inside the user message, so the
predictor reads exactly the ids every request already has (also token-id inputs of the generate
job). Sequences are left-padded like the engine's prompts, so every answer ends the row.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from lsdist_jax.errors import ConfigError, StateMismatchError

INSTRUCTION = ("\n[Predict the length of your response in tokens, rounded up to a multiple of "
               "{width}; reply with the number only.]\n")
TARGETS = ("max", "median")
_NUMBER = re.compile(r"\d+")


def bin_up(lengths, width: int) -> np.ndarray:
  """Lengths rounded up to a multiple of `width` (0 stays 0): the bin an answer names."""
  if int(width) < 1:
    raise ConfigError(f"lora.bin_width={width}: expected a positive number of tokens")
  return (np.ceil(np.asarray(lengths, np.float64) / int(width)) * int(width)).astype(np.int64)


def length_targets(lengths: np.ndarray, target: str, width: int) -> np.ndarray:
  """The answer of each prompt: `target` (max | median) of its sampled lengths [P, N], binned."""
  lengths = np.asarray(lengths)
  if lengths.ndim != 2 or lengths.shape[1] == 0:
    raise ValueError(f"expected sampled lengths [prompts, samples], got shape {lengths.shape}")
  if target == "max":
    value = lengths.max(axis=1)
  elif target == "median":
    value = np.median(lengths, axis=1)
  else:
    raise ConfigError(f"lora.target={target!r}: expected one of {TARGETS}")
  return bin_up(value, width)


def parse_answer(text: str) -> int | None:
  """The first whole number in a generated answer, or None when there is none."""
  found = _NUMBER.search(text)
  return int(found.group()) if found else None


def instruction_ids(tokenizer, width: int) -> list[int]:
  return list(tokenizer.hf(INSTRUCTION.format(width=int(width)),
                           add_special_tokens=False)["input_ids"])


def answer_ids(tokenizer, value: int) -> list[int]:
  """The answer's tokens: the number as text, then the model's (first) EOS."""
  eos = tokenizer.hf.eos_token_id
  if eos is None:
    raise ConfigError("the tokenizer has no EOS token: an answer could not end")
  return list(tokenizer.hf(str(int(value)), add_special_tokens=False)["input_ids"]) + [int(eos)]


def query_ids(prompt_ids, instruction: list[int], max_prompt_tokens: int) -> list[int]:
  """A served prompt's ids + the instruction; a prompt over `max_prompt_tokens` keeps its first
  token (BOS or the chat header) and its last max_prompt_tokens - 1."""
  prompt_ids = list(map(int, prompt_ids))
  if len(prompt_ids) > max_prompt_tokens:
    prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - max_prompt_tokens + 1:]
  return prompt_ids + instruction


def prompt_budget(max_prompt_tokens: int, instruction: list[int], answer_tokens: int,
                  context: int) -> int:
  """The prompt tokens a query keeps: lora.max_prompt_tokens, less where the instruction and
  the answer would not fit the model's context."""
  budget = min(int(max_prompt_tokens), int(context) - len(instruction) - int(answer_tokens))
  if budget < 2:
    raise ConfigError(f"the model's context of {context} tokens leaves no room for a prompt "
                      f"beside the {len(instruction)}-token instruction and a "
                      f"{answer_tokens}-token answer")
  return budget


@dataclasses.dataclass
class Examples:
  """Training rows: query + answer, left-padded to `width` tokens (the answer ends each row)."""
  queries: list[list[int]]
  answers: list[list[int]]
  targets: np.ndarray  # [n] the answered bin

  @property
  def n(self) -> int:
    return len(self.queries)

  def batch(self, rows, bucket: int, window: int):
    """(tokens [B, T], pad_len [B], labels [B, window], mask [B, window]) of `rows`; T is rounded
    up to `bucket`. labels[:, j] is the token at T - window + j, predicted from the position
    before it; mask marks the answer's tokens."""
    rows = list(rows)
    longest = max(len(self.queries[r]) + len(self.answers[r]) for r in rows)
    width = -(-max(longest, window + 1) // bucket) * bucket
    tokens = np.zeros((len(rows), width), np.int32)
    pad_len = np.zeros((len(rows),), np.int32)
    labels = np.zeros((len(rows), window), np.int32)
    mask = np.zeros((len(rows), window), np.float32)
    for i, r in enumerate(rows):
      answer = self.answers[r]
      if len(answer) > window:
        raise ConfigError(f"an answer of {len(answer)} tokens does not fit lora.answer_tokens="
                          f"{window}")
      seq = self.queries[r] + answer
      tokens[i, width - len(seq):] = seq
      pad_len[i] = width - len(seq)
      labels[i] = tokens[i, width - window:]
      mask[i, window - len(answer):] = 1.0
    return tokens, pad_len, labels, mask


def build_examples(tokenizer, prompt_ids, lengths: np.ndarray, lora_config,
                   context: int) -> Examples:
  """Examples of prompts (served token ids) and their sampled lengths [P, N] (config.lora), for
  a model of `context` positions."""
  if len(prompt_ids) != len(lengths):
    raise ValueError(f"{len(prompt_ids)} prompts but {len(lengths)} rows of lengths")
  width = int(lora_config.bin_width)
  targets = length_targets(lengths, str(lora_config.target), width)
  instruction = instruction_ids(tokenizer, width)
  keep = prompt_budget(lora_config.max_prompt_tokens, instruction, lora_config.answer_tokens,
                       context)
  queries = [query_ids(p, instruction, keep) for p in prompt_ids]
  return Examples(queries, [answer_ids(tokenizer, t) for t in targets], targets)


def store_prompts(config, data: dict) -> list[str]:
  """The text of each prompt of a store read (`LengthStore.read`), found by its key among the
  prompts of config.data (the collection's config)."""
  from lsdist_jax.data import load_prompts

  text = {p.key: p.text for p in load_prompts(config.data)}
  keys = [str(k) for k in data["key"]]
  missing = [k for k in keys if k not in text]
  if missing:
    raise StateMismatchError(f"{len(missing)} of the store's {len(keys)} prompts are not among "
                             f"config.data's (source {config.data.source!r}, slice "
                             f"{config.data.slice!r}), e.g. key {missing[0]}: pass the config "
                             "the store was collected with")
  return [text[k] for k in keys]
