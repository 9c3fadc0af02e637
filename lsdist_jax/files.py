"""Files written whole (a reader sees the old file or the new one, never half of one), JSON read
with errors that name the file, and an exclusive lock across processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

from lsdist_jax.errors import BadFileError, LockHeldError, MissingFileError


def write_text(path: str, text: str) -> str:
  """Writes `path` whole: a temporary file beside it, flushed to disk, then renamed over it."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                             prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  return path


def write_json(obj, path: str, sort_keys: bool = False) -> str:
  return write_text(path, json.dumps(obj, indent=1, sort_keys=sort_keys, default=str) + "\n")


def write_lines(path: str, lines) -> str:
  """Writes text lines (each without its newline) whole."""
  return write_text(path, "".join(line + "\n" for line in lines))


def read_json(path: str, what: str = "file"):
  """The JSON value in `path`; a missing file is FileNotFoundError, anything unreadable a
  BadFileError naming the file."""
  if not os.path.isfile(path):
    raise MissingFileError(f"{what} not found: {path}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadFileError(f"{what} {path} is not valid JSON ({e}): truncated or corrupt?") from None


@contextlib.contextmanager
def exclusive(path: str):
  """Holds an exclusive lock on `path` (created if missing) for the block; yields the seconds
  spent waiting for it."""
  import fcntl

  start = time.perf_counter()
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    waited = time.perf_counter() - start
    try:
      yield waited
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def held_lock(path: str, what: str):
  """An exclusive lock on `path` for the block, taken without waiting; LockHeldError naming
  `what` when another process holds it. The lock goes with the process (a killed run leaves
  none behind)."""
  import fcntl

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise LockHeldError(f"{what} is in use by another process (lock {path}); wait for it to "
                          "finish or use another folder") from None
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
