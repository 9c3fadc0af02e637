"""The generate job's unit of work: one input line (a prompt, or an OpenAI batch line with its
own settings and n choices, or a line answered with an error), the requests a chunk of them makes,
and the output line each gives back.

PRNG identity: a prompt line's request id is its line number (as before batch files); a batch
line's choice c is request line * MAX_CHOICES + c, with the line's seed (or the config's).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lsdist_jax.serve import openai_batch
from lsdist_jax.serve.inputs import InputPrompt
from lsdist_jax.serve.openai_batch import MAX_CHOICES, BatchLine, LineError
from lsdist_jax.serve.requests import Requests


@dataclasses.dataclass
class JobItem:
  line: int  # input line number
  key: int | str  # what its output line is checked by at assembly: the line, or custom_id
  record: dict  # the input line as read (part keys hash it)
  prompt_ids: list[int] | None  # None: not served (answered with `error`)
  prompt: InputPrompt | None = None  # prompts format
  batch: BatchLine | None = None  # batch format
  error: LineError | None = None

  @property
  def choices(self) -> int:
    return 0 if self.prompt_ids is None else (self.batch.n if self.batch is not None else 1)


def prompt_items(prompts: list[InputPrompt], ids: list[list[int]]) -> list[JobItem]:
  return [JobItem(p.line, p.line, p.record, x, prompt=p) for p, x in zip(prompts, ids)]


def batch_items(lines: list[BatchLine], engine, max_seq_len: int, served_names,
                ignore_model_field: bool = False) -> list[JobItem]:
  """Items of a batch file: each line tokenized (chat messages through the tokenizer's chat
  format, completion prompts as raw text), or given its error line: a bad field, a model it
  does not name (unless `ignore_model_field`), a prompt that leaves no room in max_seq_len."""
  items = []
  for b in lines:
    item = JobItem(b.line, b.custom_id, b.record, None, batch=b, error=b.error)
    items.append(item)
    if item.error is not None:
      continue
    if not ignore_model_field and not openai_batch.model_matches(b.model, served_names):
      item.error = LineError("model_not_found", f"body.model {b.model!r} is not the loaded "
                             f"model ({served_names[0]}); pass --ignore_model_field to serve it")
      continue
    try:
      ids = (engine.tokenizer.encode_messages(b.messages) if b.is_chat
             else engine.tokenizer.encode_raw(b.prompt))
    except Exception as e:  # the chat template refuses the conversation  # noqa: BLE001
      item.error = LineError("invalid_request", f"body.messages cannot be formatted: {e}")
      continue
    if len(ids) >= max_seq_len:
      item.error = LineError("context_length_exceeded", f"the prompt has {len(ids)} tokens, "
                             f"which leaves no room in generation.max_seq_len={max_seq_len}")
      continue
    item.prompt_ids = ids
  return items


def chunk_requests(items: list[JobItem], generation) -> tuple[Requests, list[int]]:
  """The requests of a chunk's served items (n per batch line) with their own settings (where
  a batch line leaves one out: the config's `generation`), and the item of each request."""
  owner, ids, rids = [], [], []
  for k, item in enumerate(items):
    for c in range(item.choices):
      owner.append(k)
      ids.append(item.prompt_ids)
      rids.append(item.line if item.batch is None else item.line * MAX_CHOICES + c)
  lines = np.array([items[k].line for k in owner], np.int64)
  requests = Requests(np.array(rids, np.int64), lines, np.array([len(x) for x in ids]),
                      prompt_ids=ids)
  batch = [items[k].batch for k in owner]
  if batch and all(b is not None for b in batch):

    def own(name, default, dtype):
      return np.array([default if getattr(b, name) is None else getattr(b, name) for b in batch],
                      dtype)

    room = int(generation.max_seq_len) - requests.prompt_len
    requests.max_tokens = np.minimum(own("max_tokens", int(generation.max_seq_len), np.int64),
                                     room)
    requests.temperature = own("temperature", float(generation.temperature), np.float64)
    requests.top_p = own("top_p", float(generation.top_p), np.float64)
    requests.seed = own("seed", int(generation.seed), np.int64)
  return requests, owner


def output_row(item: JobItem, tokens: list[list[int]], finished: list[bool], engine,
               model_name: str, created: int, text: str | None = None) -> dict:
  """The output line of an item given its choices' tokens and whether each ended with EOS
  (`text`: a prompts line's response decoded already)."""
  decode = engine.tokenizer.decode
  if item.batch is None:
    row = dict(item.record)  # the user's own fields come back
    row.update({"line": item.line, "prompt": item.prompt.text,
                "response": decode(tokens[0]) if text is None else text,
                "response_tokens": len(tokens[0]), "finished": bool(finished[0])})
    return row
  if item.error is not None:
    return openai_batch.error_line(item.batch, item.error.code, str(item.error))
  choices = []
  for toks, fin in zip(tokens, finished):
    text, used, stopped = openai_batch.cut_at_stop(toks, decode, item.batch.stop)
    choices.append({"text": text, "tokens": used,
                    "finish_reason": "stop" if stopped or fin else "length"})
  return openai_batch.response_line(item.batch, choices, len(item.prompt_ids), model_name,
                                    created)
