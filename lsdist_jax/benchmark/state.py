"""The benchmark's resume state: each strategy's row and responses saved as it finishes, keyed by
an identity of the requests and settings, so an interrupted benchmark resumes where it stopped and
several worker processes share the list of strategies.

Layout of <workdir>/<name>_state/: identity.txt, meta.json (what the report needs besides the
rows), <strategy>.r<repeat>.json (row) and .npz (responses), .claim files of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from lsdist_jax import paths
from lsdist_jax.files import write_json, write_text


def saved_paths(directory: str, name: str, repeat: int) -> tuple[str, str]:
  stem = os.path.join(directory, f"{name.replace(':', '_')}.r{repeat}")
  return stem + ".json", stem + ".npz"


def is_saved(directory: str, name: str, repeat: int) -> bool:
  return all(os.path.exists(p) for p in saved_paths(directory, name, repeat))


def load_saved(directory: str, name: str, repeat: int):
  """(row, responses) saved for (strategy, repeat), or None."""
  if not is_saved(directory, name, repeat):
    return None
  row_path, tok_path = saved_paths(directory, name, repeat)
  with open(row_path) as f:
    row = json.load(f)
  data = np.load(tok_path)
  bounds = np.cumsum(np.concatenate([[0], data["lengths"]]))
  return row, [data["tokens"][a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


class ResumeState:
  """Per-strategy results of a benchmark saved as they finish; refused when the requests or
  settings differ from those it was made with."""

  def __init__(self, directory: str, identity: dict):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    self.key = digest.hexdigest()[:16]
    marker = os.path.join(directory, "identity.txt")
    if not os.path.exists(marker):  # written whole: workers start together and read it
      write_text(marker, self.key)
    with open(marker) as f:
      if f.read().strip() != self.key:
        raise ValueError(f"{directory} holds results of another benchmark (other requests or "
                         "settings); remove it or choose another --name")

  def load(self, name, repeat):
    return load_saved(self.directory, name, repeat)

  def has(self, name, repeat) -> bool:
    return is_saved(self.directory, name, repeat)

  def claim(self, name, repeat) -> bool:
    """Atomically takes (name, repeat) for this process (benchmark workers share the list of
    strategies); False if another worker took it."""
    try:
      os.close(os.open(saved_paths(self.directory, name, repeat)[0] + ".claim",
                       os.O_CREAT | os.O_EXCL))
      return True
    except FileExistsError:
      return False

  def wait(self, name, repeat, timeout_s: float = 6 * 3600, poll_s: float = 2.0):
    """Waits for another worker's result of (name, repeat)."""
    deadline = time.monotonic() + timeout_s
    while (saved := self.load(name, repeat)) is None:
      if time.monotonic() > deadline:
        raise TimeoutError(f"no result of {name!r} (repeat {repeat}) after {timeout_s:.0f} s")
      time.sleep(poll_s)
    return saved

  def write_meta(self, meta: dict) -> None:
    """What the report needs besides the rows (device, model, requests, strategy order)."""
    write_json(meta, os.path.join(self.directory, "meta.json"))  # workers write it too

  def save(self, name, repeat, row, tokens):
    row_path, tok_path = saved_paths(self.directory, name, repeat)
    flat = np.concatenate([np.asarray(t, np.int32) for t in tokens]) if tokens else np.zeros(0)
    np.savez(tok_path + ".tmp.npz", tokens=flat,
             lengths=np.array([len(t) for t in tokens], np.int64))
    os.replace(tok_path + ".tmp.npz", tok_path)
    write_json(row, row_path)


def clear_claims(workdir: str, out_name: str = "benchmark") -> None:
  """Drops the claims of workers that are gone (an interrupted run): their strategies run
  again; finished strategies keep their saved results."""
  directory = paths.benchmark_state(workdir, out_name)
  if os.path.isdir(directory):
    for entry in os.listdir(directory):
      if entry.endswith(".claim"):
        os.remove(os.path.join(directory, entry))


def saved_strategies(workdir: str, out_name: str = "benchmark") -> list[str]:
  """Stems (strategy.r<repeat>) of the results saved so far."""
  directory = paths.benchmark_state(workdir, out_name)
  if not os.path.isdir(directory):
    return []
  return sorted(e[:-len(".npz")] for e in os.listdir(directory)
                if e.endswith(".npz") and not e.endswith(".tmp.npz"))
