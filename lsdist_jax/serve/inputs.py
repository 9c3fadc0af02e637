"""The generate job's input: a JSONL file of prompts (`{"prompt"}` or Alpaca's `{"instruction",
"input"}`, plus any fields of the user's own), read line by line with errors that name the line.

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


def read_prompts(path: str, skip_malformed: bool = False) -> tuple[list[InputPrompt], list[str]]:
  """(prompts, messages of the malformed lines skipped). A malformed line is an error naming its
  line number, unless `skip_malformed`, which logs and skips it."""
  if not os.path.exists(path):
    raise MissingFileError(f"prompts file not found: {path}")
  if os.path.isdir(path):
    raise InputError(f"prompts file {path} is a directory")
  with open(path, "rb") as f:
    raw = f.read()
  if raw.startswith(BOM):
    raw = raw[len(BOM):]
  prompts, bad = [], []
  for number, line in enumerate(raw.split(b"\n"), start=1):
    line = line.rstrip(b"\r")
    if not line.strip():
      continue
    try:
      record = json.loads(line.decode("utf-8"))
      if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
      prompts.append(InputPrompt(number, prompt_text(record), record))
    except UnicodeDecodeError as e:
      bad.append(f"{path}:{number}: not UTF-8 text (byte {e.start}: {line[e.start:e.start + 1]!r})")
    except ValueError as e:
      bad.append(f"{path}:{number}: {e}")
  if bad and not skip_malformed:
    raise MalformedInputError(f"{len(bad)} malformed line(s) (pass --skip_malformed to skip "
                              "them):\n" + "\n".join(bad[:20]))
  for message in bad:
    logging.warning("skipped %s", message)
  return prompts, bad
