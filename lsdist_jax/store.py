"""The length store: per prompt, N sampled response lengths, finished flags, prompt length, hidden
state and dataset index, as tensorstore (zarr) arrays in crash-safe chunks, with JSON metadata.

Layout: <path>/meta.json, and one folder per chunk <path>/chunks/<chunk_id>/ holding the arrays
and, written last, MANIFEST.json. A chunk is written in a temporary folder and renamed into place
in one step, so a chunk is either complete or invisible; several processes write their own chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import numpy as np

from lsdist_jax.config import LENGTH_CONVENTION
from lsdist_jax.files import write_json

META = "meta.json"
CHUNKS = "chunks"
MANIFEST = "MANIFEST.json"
FIELDS = {"index": np.int64, "prompt_len": np.int32, "lengths": np.int32, "finished": np.bool_,
          "hidden": np.float32}
# Meta keys that must agree for two runs to share a store; anything else may differ.
GUARDED = ("model", "generation", "length_convention", "hidden_layer", "samples_per_prompt",
           "hidden_dim")


def _write_array(path: str, array: np.ndarray) -> None:
  import tensorstore as ts

  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
  store = ts.open(spec, create=True, dtype=ts.dtype(array.dtype.name), shape=array.shape).result()
  if array.size:
    store.write(array).result()


def _read_array(path: str) -> np.ndarray:
  import tensorstore as ts

  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
  return np.asarray(ts.open(spec, open=True).result().read().result())


def _normalise(obj):
  return json.loads(json.dumps(obj, sort_keys=True))


class LengthStore:

  def __init__(self, path: str, meta: dict, writable: bool):
    self.path = path
    self.meta = meta
    self.writable = writable

  @classmethod
  def create_or_open(cls, path: str, meta: dict, hidden_dim: int,
                     samples_per_prompt: int) -> "LengthStore":
    """A new store, or an existing one made with the same model and generation config."""
    meta = _normalise(dict(meta, hidden_dim=int(hidden_dim),
                           samples_per_prompt=int(samples_per_prompt)))
    meta.setdefault("length_convention", LENGTH_CONVENTION)
    meta_path = os.path.join(path, META)
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        existing = json.load(f)
      diff = [k for k in GUARDED if existing.get(k) != meta.get(k)]
      if diff:
        details = "; ".join(f"{k}: store has {existing.get(k)!r}, this run has {meta.get(k)!r}"
                            for k in diff)
        raise ValueError(f"the store at {path} was made with another {', '.join(diff)} and "
                         f"cannot be mixed with this run ({details}); use another "
                         "collect.store path")
      slices = existing.get("data_slices", [existing.get("data")])
      if meta.get("data") not in slices:
        existing["data_slices"] = slices + [meta.get("data")]
        write_json(existing, meta_path, sort_keys=True)
      return cls(path, existing, writable=True)
    os.makedirs(os.path.join(path, CHUNKS), exist_ok=True)
    meta["data_slices"] = [meta.get("data")]
    write_json(meta, meta_path, sort_keys=True)
    return cls(path, meta, writable=True)

  @classmethod
  def open(cls, path: str) -> "LengthStore":
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"no length store at {path} (missing {META}); run "
                              "launch/collect.py first")
    with open(meta_path) as f:
      return cls(path, json.load(f), writable=False)

  # --------------------------------------------------------------------------- chunks

  def _chunk_dirs(self) -> list[str]:
    root = os.path.join(self.path, CHUNKS)
    if not os.path.isdir(root):
      return []
    return sorted(os.path.join(root, name) for name in os.listdir(root)
                  if ".tmp-" not in name
                  and os.path.isfile(os.path.join(root, name, MANIFEST)))

  def done_indices(self) -> set[int]:
    done: set[int] = set()
    for chunk in self._chunk_dirs():
      with open(os.path.join(chunk, MANIFEST)) as f:
        done.update(json.load(f)["indices"])
    return done

  def write_chunk(self, chunk_id: str, records: dict) -> None:
    """Writes one chunk; it becomes visible to readers only once complete."""
    if not self.writable:
      raise PermissionError(f"store at {self.path} was opened read-only")
    if "/" in chunk_id or ".tmp-" in chunk_id:
      raise ValueError(f"bad chunk id {chunk_id!r}")
    n = len(records["index"])
    n_samples, dim = int(self.meta["samples_per_prompt"]), int(self.meta["hidden_dim"])
    want = {"index": (n,), "prompt_len": (n,), "lengths": (n, n_samples),
            "finished": (n, n_samples), "hidden": (n, dim)}
    arrays = {}
    for name, dtype in FIELDS.items():
      if name not in records:
        raise KeyError(f"chunk {chunk_id!r} lacks {name!r}")
      arrays[name] = np.ascontiguousarray(np.asarray(records[name], dtype=dtype))
      if arrays[name].shape != want[name]:
        raise ValueError(f"chunk {chunk_id!r}: {name} has shape {arrays[name].shape}, "
                         f"expected {want[name]}")
    root = os.path.join(self.path, CHUNKS)
    final = os.path.join(root, chunk_id)
    if os.path.isfile(os.path.join(final, MANIFEST)):
      return  # written by an earlier run
    if os.path.exists(final):
      shutil.rmtree(final)  # a folder without its manifest is not a chunk
    tmp = os.path.join(root, f"{chunk_id}.tmp-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    for name, array in arrays.items():
      _write_array(os.path.join(tmp, name), array)
    write_json({"chunk": chunk_id, "prompts": n, "indices": arrays["index"].tolist()},
               os.path.join(tmp, MANIFEST), sort_keys=True)
    os.rename(tmp, final)

  def clean_partial(self) -> int:
    """Removes temporary folders that crashed writers left behind; returns how many."""
    root = os.path.join(self.path, CHUNKS)
    stale = [name for name in os.listdir(root) if ".tmp-" in name] if os.path.isdir(root) else []
    for name in stale:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return len(stale)

  # --------------------------------------------------------------------------- reading

  def read(self, split: str | None = None) -> dict:
    """Every complete chunk (any process), sorted by dataset index; `split` filters by prompt."""
    from lsdist_jax.data import assign_split

    parts = {name: [] for name in FIELDS}
    for chunk in self._chunk_dirs():
      for name in FIELDS:
        parts[name].append(_read_array(os.path.join(chunk, name)))
    n_samples, dim = int(self.meta["samples_per_prompt"]), int(self.meta["hidden_dim"])
    empty = {"index": (0,), "prompt_len": (0,), "lengths": (0, n_samples),
             "finished": (0, n_samples), "hidden": (0, dim)}
    data = {name: (np.concatenate(parts[name]) if parts[name]
                   else np.zeros(empty[name], FIELDS[name])) for name in FIELDS}
    order = np.argsort(data["index"], kind="stable")
    data = {k: v[order] for k, v in data.items()}
    if np.unique(data["index"]).size != data["index"].size:
      raise ValueError(f"store at {self.path} holds some prompt twice: it is corrupt")
    data["split"] = assign_split(data["index"], int(self.meta.get("split_seed", 0)),
                                 tuple(self.meta.get("split_fractions", (0.8, 0.1, 0.1))))
    if split is not None:
      if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
      keep = data["split"] == split
      data = {k: v[keep] for k, v in data.items()}
    return data

  def summary(self) -> dict:
    data = self.read()
    lengths = data["lengths"]
    if lengths.size == 0:
      return {"prompts": 0, "samples": 0}
    return {"prompts": int(lengths.shape[0]), "samples": int(lengths.size),
            "samples_per_prompt": int(lengths.shape[1]),
            "mean_len": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)), "max_len": int(lengths.max()),
            "share_capped": float(1.0 - data["finished"].mean()),
            "mean_prompt_len": float(data["prompt_len"].mean())}
