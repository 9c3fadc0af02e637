"""The generate job's input: a JSONL file of prompts (`{"prompt"}` or Alpaca's `{"instruction",
"input"}`, plus any fields of the user's own) or an OpenAI batch file (`serve/openai_batch.py`),
detected per file, read line by line with errors that name the line.

A UTF-8 byte-order mark and CRLF line ends are accepted; a line that is not UTF-8 or not a JSON
object with a prompt is malformed (an error, or skipped and counted with `skip_malformed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from lsdist_jax.data import prompt_text
from lsdist_jax.errors import InputError, MissingFileError

BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass
class InputPrompt:
  line: int  # 1-based line number in the input file
  text: str
  record: dict


class MalformedInputError(InputError):
  pass


def _json_lines(path: str):
  """(line number, record) per non-empty line; a line that is not UTF-8 JSON gives (number,
  message) with the message a str."""
  if not os.path.exists(path):
    raise MissingFileError(f"prompts file not found: {path}")
  if os.path.isdir(path):
    raise InputError(f"prompts file {path} is a directory")
  with open(path, "rb") as f:
    raw = f.read()
  if raw.startswith(BOM):
    raw = raw[len(BOM):]
  for number, line in enumerate(raw.split(b"\n"), start=1):
    line = line.rstrip(b"\r")
    if not line.strip():
      continue
    try:
      yield number, json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
      yield number, f"not UTF-8 text (byte {e.start}: {line[e.start:e.start + 1]!r})"
    except ValueError as e:
      yield number, str(e)


def read_input(path: str, skip_malformed: bool = False) -> tuple[str, list, list[str]]:
  """(format, entries, messages of the malformed lines skipped): "batch" (the OpenAI Batch API
  format, when the first JSON object has `custom_id` and `body`; entries are
  `openai_batch.BatchLine`s, a bad field making that line's error) or "prompts" (entries are
  `InputPrompt`s). A malformed line is an error naming its line number, unless
  `skip_malformed`, which logs and skips it."""
  from lsdist_jax.serve import openai_batch

  lines = list(_json_lines(path))
  first = next((r for _, r in lines if isinstance(r, dict)), None)
  kind = "batch" if openai_batch.is_batch_record(first) else "prompts"
  entries, bad = [], []
  for number, record in lines:
    try:
      if isinstance(record, str):
        raise ValueError(record)
      if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
      if kind == "batch":
        entries.append(openai_batch.parse_line(record, number))
      else:
        entries.append(InputPrompt(number, prompt_text(record), record))
    except ValueError as e:
      bad.append(f"{path}:{number}: {e}")
  if bad and not skip_malformed:
    raise MalformedInputError(f"{len(bad)} malformed line(s) (pass --skip_malformed to skip "
                              "them):\n" + "\n".join(bad[:20]))
  for message in bad:
    logging.warning("skipped %s", message)
  return kind, entries, bad


def read_prompts(path: str, skip_malformed: bool = False) -> tuple[list[InputPrompt], list[str]]:
  """(prompts, messages of the malformed lines skipped) of a prompts file (`read_input`)."""
  kind, entries, bad = read_input(path, skip_malformed)
  if kind != "prompts":
    raise InputError(f"{path} is an OpenAI batch file, not a prompts file")
  return entries, bad
