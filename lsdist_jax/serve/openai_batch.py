"""OpenAI Batch API files: whether an input file is one, each line's request (chat `messages` or a
completion `prompt`, and its sampling settings) checked field by field into a per-line error, and
the batch output lines (a response, or an error, per input line; stop strings cut on the host).

A file is a batch file when its first JSON object has `custom_id` and `body` (the rest of the
file is then read as batch lines); otherwise it is the plain prompt format (`serve/inputs.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Callable, Sequence

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
ROLES = ("system", "user", "assistant")
MAX_CHOICES = 128  # n per line (request ids are line * MAX_CHOICES + choice)
MAX_STOPS = 4  # as the OpenAI API allows
# Body fields read here; any other is ignored, except these, which would change the answer in a
# way this engine does not do (refused per line rather than silently answered otherwise).
UNSUPPORTED = {"stream": False, "logprobs": False, "presence_penalty": 0,
               "frequency_penalty": 0, "logit_bias": None, "tools": None, "functions": None,
               "response_format": None, "echo": False, "best_of": 1, "suffix": None}


class LineError(ValueError):
  """Why one batch line cannot be served: an OpenAI-style error code and a message."""

  def __init__(self, code: str, message: str):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass
class BatchLine:
  """One line of a batch file. `error` set: the line is answered with an error line only."""
  line: int  # 1-based line number in the file
  custom_id: str
  record: dict  # the whole line, as read
  url: str = CHAT_URL
  messages: list[dict] | None = None  # chat
  prompt: str | None = None  # completion (raw text)
  max_tokens: int | None = None  # None: up to max_seq_len
  temperature: float | None = None  # None: the config's
  top_p: float | None = None
  n: int = 1
  seed: int | None = None  # None: the config's
  stop: list[str] = dataclasses.field(default_factory=list)
  model: str | None = None
  error: LineError | None = None

  @property
  def is_chat(self) -> bool:
    return self.url == CHAT_URL


def is_batch_record(record) -> bool:
  """Whether a JSON line is in the OpenAI batch format (decides the format of its file)."""
  return isinstance(record, dict) and "custom_id" in record and "body" in record


def parse_line(record: dict, line: int) -> BatchLine:
  """A batch line, its fields checked; a bad field gives `error` (the line's own error line).
  A line without a string `custom_id` cannot be answered by id: ValueError (malformed)."""
  custom_id = record.get("custom_id")
  if not isinstance(custom_id, str) or not custom_id:
    raise ValueError("a batch line needs a non-empty string 'custom_id'")
  out = BatchLine(line, custom_id, record)
  try:
    _read_fields(out, record)
  except LineError as e:
    out.error = e
  return out


def _read_fields(out: BatchLine, record: dict) -> None:
  method = record.get("method", "POST")
  if method != "POST":
    raise LineError("invalid_method", f"method {method!r}; batch lines are 'POST'")
  url = record.get("url", CHAT_URL)
  if url not in URLS:
    raise LineError("invalid_url", f"url {url!r} is not served; expected one of {list(URLS)}")
  out.url = url
  body = record.get("body")
  if not isinstance(body, dict):
    raise LineError("invalid_request", "'body' must be a JSON object")
  for name, neutral in UNSUPPORTED.items():
    if name in body and body[name] not in (neutral, None):
      raise LineError("unsupported_parameter", f"body.{name}={body[name]!r} is not supported")
  if url == CHAT_URL:
    out.messages = _messages(body.get("messages"))
  else:
    out.prompt = _prompt(body.get("prompt"))
  limit = body.get("max_completion_tokens", body.get("max_tokens"))
  if limit is not None:
    out.max_tokens = _integer(limit, "max_tokens", 1, None)
  if body.get("temperature") is not None:
    out.temperature = _number(body["temperature"], "temperature", 0.0, 2.0)
  if body.get("top_p") is not None:
    out.top_p = _number(body["top_p"], "top_p", 0.0, 1.0)
    if out.top_p <= 0.0:
      raise LineError("invalid_value", "body.top_p must be > 0")
  if body.get("n") is not None:
    out.n = _integer(body["n"], "n", 1, MAX_CHOICES)
  if body.get("seed") is not None:
    out.seed = _integer(body["seed"], "seed", None, None) % 2 ** 32
  out.stop = _stops(body.get("stop"))
  model = body.get("model")
  if model is not None and not isinstance(model, str):
    raise LineError("invalid_type", "body.model must be a string")
  out.model = model


def _messages(messages) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise LineError("invalid_request", "a chat line needs a non-empty list body.messages")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise LineError("invalid_value", f"body.messages[{i}] needs a role in {list(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                 for p in content):
        raise LineError("invalid_value", f"body.messages[{i}].content: only text parts are "
                        "served")
      content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
      raise LineError("invalid_type", f"body.messages[{i}].content must be a string")
    out.append({"role": m["role"], "content": content})
  return out


def _prompt(prompt) -> str:
  if isinstance(prompt, list) and len(prompt) == 1:
    prompt = prompt[0]
  if not isinstance(prompt, str) or not prompt:
    raise LineError("invalid_type", "a completion line needs a non-empty string body.prompt")
  return prompt


def _integer(value, name: str, low: int | None, high: int | None) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise LineError("invalid_type", f"body.{name} must be an integer, got {value!r}")
  if (low is not None and value < low) or (high is not None and value > high):
    raise LineError("invalid_value", f"body.{name}={value} is outside [{low}, {high}]")
  return int(value)


def _number(value, name: str, low: float, high: float) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise LineError("invalid_type", f"body.{name} must be a number, got {value!r}")
  if not low <= value <= high:
    raise LineError("invalid_value", f"body.{name}={value} is outside [{low}, {high}]")
  return float(value)


def _stops(stop) -> list[str]:
  if stop is None:
    return []
  stops = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stops, list) or len(stops) > MAX_STOPS
      or not all(isinstance(s, str) and s for s in stops)):
    raise LineError("invalid_value", f"body.stop must be a non-empty string or a list of at "
                    f"most {MAX_STOPS} of them, got {stop!r}")
  return stops


def duplicate_ids(lines: Sequence[BatchLine]) -> dict[str, list[int]]:
  """{custom_id: its line numbers} for every custom_id on more than one line."""
  seen: dict[str, list[int]] = {}
  for b in lines:
    seen.setdefault(b.custom_id, []).append(b.line)
  return {k: v for k, v in seen.items() if len(v) > 1}


def model_matches(requested: str | None, served: Sequence[str]) -> bool:
  """Whether a line's body.model names the loaded model (its name, path or the path's base
  name, case-insensitive); a line without one matches."""
  if requested is None:
    return True
  names = {str(s).lower() for s in served if s}
  names |= {os.path.basename(str(s).rstrip("/")).lower() for s in served if s}
  return requested.lower() in names


# ------------------------------------------------------------------------------------- output

def cut_at_stop(tokens: Sequence[int], decode: Callable[[Sequence[int]], str],
                stops: Sequence[str]) -> tuple[str, int, bool]:
  """The response text cut before the first stop string, the tokens it took to produce it
  (the shortest prefix whose text reaches the stop), and whether a stop was hit."""
  text = decode(tokens)
  hits = [i for i in (text.find(s) for s in stops) if i >= 0]
  if not hits:
    return text, len(tokens), False
  low, high = 1, len(tokens)  # the shortest prefix whose text holds a stop string
  while low < high:
    mid = (low + high) // 2
    part = decode(tokens[:mid])
    if any(s in part for s in stops):
      high = mid
    else:
      low = mid + 1
  return text[:min(hits)], high, True


def _ids(b: BatchLine) -> str:
  return hashlib.sha256(f"{b.line}\0{b.custom_id}".encode()).hexdigest()[:24]


def response_line(b: BatchLine, choices: list[dict], prompt_tokens: int, model: str,
                  created: int) -> dict:
  """The output line of a served batch line. choices: [{"text", "tokens", "finish_reason"}]
  in choice order."""
  digest = _ids(b)
  body_choices = []
  for index, c in enumerate(choices):
    item = {"index": index}
    if b.is_chat:
      item["message"] = {"role": "assistant", "content": c["text"]}
    else:
      item["text"] = c["text"]
    item["logprobs"] = None
    item["finish_reason"] = c["finish_reason"]
    body_choices.append(item)
  completion = int(sum(c["tokens"] for c in choices))
  body = {"id": ("chatcmpl-" if b.is_chat else "cmpl-") + digest,
          "object": "chat.completion" if b.is_chat else "text_completion", "created": created,
          "model": b.model or model, "choices": body_choices,
          "usage": {"prompt_tokens": int(prompt_tokens), "completion_tokens": completion,
                    "total_tokens": int(prompt_tokens) + completion}}
  return {"id": f"batch_req_{digest}", "custom_id": b.custom_id,
          "response": {"status_code": 200, "request_id": f"req_{digest}", "body": body},
          "error": None}


def error_line(b: BatchLine, code: str, message: str) -> dict:
  """The output line of a batch line that is not served."""
  return {"id": f"batch_req_{_ids(b)}", "custom_id": b.custom_id, "response": None,
          "error": {"code": code, "message": message}}
