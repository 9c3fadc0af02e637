"""The length store: per prompt, N sampled response lengths, finished flags, prompt length, hidden
state, source index and key (a hash of the text), as tensorstore (zarr) arrays in crash-safe chunks.

Layout: <path>/meta.json, and one folder per chunk <path>/chunks/<chunk_id>/ holding the arrays
and, written last, MANIFEST.json. A chunk is written in a temporary folder and renamed into place
in one step, so a chunk is either complete or invisible; several processes write their own chunks.
A prompt is known by its key (`lsdist_jax.data.prompt_key`): splits come from the stored keys, and
a run whose source gives another prompt at a stored index is refused (`check_prompts`).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import uuid

import numpy as np

from lsdist_jax.config import LENGTH_CONVENTION
from lsdist_jax.data.prompts import key_hex, key_words
from lsdist_jax.errors import MissingFileError, StateMismatchError
from lsdist_jax.files import read_json, write_json

# 2: every prompt's key (the first 128 bits of the sha256 of its text) is stored, as two uint64.
STORE_VERSION = 2
META = "meta.json"
CHUNKS = "chunks"
MANIFEST = "MANIFEST.json"
FIELDS = {"index": np.int64, "key": np.uint64, "prompt_len": np.int32, "lengths": np.int32,
          "finished": np.bool_, "hidden": np.float32}
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


def _shapes(n: int, n_samples: int, dim: int) -> dict:
  return {"index": (n,), "key": (n, 2), "prompt_len": (n,), "lengths": (n, n_samples),
          "finished": (n, n_samples), "hidden": (n, dim)}


def _check_version(path: str, meta: dict) -> None:
  version = int(meta.get("version", 1))
  if version != STORE_VERSION:
    raise StateMismatchError(
        f"the store at {path} has format version {version}; this code reads and writes version "
        f"{STORE_VERSION} (every prompt keyed by a hash of its text) and does not mix them: "
        "collect into another collect.store path, or add the keys to it with "
        f"launch/upgrade_store.py --store={path}")


def clean_partial(path: str) -> int:
  """Removes the temporary chunk folders (`*.tmp-*` under chunks/) that crashed writers left
  behind; returns how many. Only while no writer runs (collection holds the store's lock)."""
  root = os.path.join(path, CHUNKS)
  stale = [name for name in os.listdir(root) if ".tmp-" in name] if os.path.isdir(root) else []
  for name in stale:
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  return len(stale)


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
    meta.setdefault("version", STORE_VERSION)
    _check_version(f"{path} (this run)", meta)
    meta_path = os.path.join(path, META)
    if os.path.exists(meta_path):
      existing = read_json(meta_path, "length store metadata")
      _check_version(path, existing)
      diff = [k for k in GUARDED if existing.get(k) != meta.get(k)]
      if diff:
        details = "; ".join(f"{k}: store has {existing.get(k)!r}, this run has {meta.get(k)!r}"
                            for k in diff)
        raise StateMismatchError(f"the store at {path} was made with another {', '.join(diff)} and "
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
  def open(cls, path: str, upgrading: bool = False) -> "LengthStore":
    """A store to read (writable only with `upgrading`, which also takes an older version)."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
      raise MissingFileError(f"no length store at {path} (missing {META}); run "
                             "launch/collect.py first")
    meta = read_json(meta_path, "length store metadata")
    if not upgrading:
      _check_version(path, meta)
    return cls(path, meta, writable=upgrading)

  # --------------------------------------------------------------------------- chunks

  def _chunk_dirs(self) -> list[str]:
    root = os.path.join(self.path, CHUNKS)
    if not os.path.isdir(root):
      return []
    return sorted(os.path.join(root, name) for name in os.listdir(root)
                  if ".tmp-" not in name
                  and os.path.isfile(os.path.join(root, name, MANIFEST)))

  def _manifests(self) -> list[dict]:
    return [read_json(os.path.join(chunk, MANIFEST), "chunk manifest")
            for chunk in self._chunk_dirs()]

  def done_indices(self) -> set[int]:
    return {int(i) for m in self._manifests() for i in m["indices"]}

  def stored_keys(self) -> dict[int, str]:
    """{source index: prompt key} of every stored prompt (from the chunk manifests)."""
    stored: dict[int, str] = {}
    for manifest in self._manifests():
      if "keys" not in manifest:
        raise StateMismatchError(f"chunk {manifest.get('chunk')!r} of the store at {self.path} "
                                 "records no prompt keys (an older store version)")
      stored.update(zip((int(i) for i in manifest["indices"]), manifest["keys"]))
    return stored

  def check_prompts(self, prompts, source: str) -> dict[int, str]:
    """Refuses (StateMismatchError) prompts whose index is stored with another key: the store
    was collected from another source (or another version of it), and continuing would mix two
    sources' prompts under one index. Returns `stored_keys()`."""
    stored = self.stored_keys()
    for p in prompts:
      key = stored.get(int(p.index))
      if key is not None and key != p.key:
        sources = "; ".join(str(d.get("origin") or d.get("source"))
                            for d in self.meta.get("data_slices", []) if isinstance(d, dict))
        raise StateMismatchError(
            f"the store at {self.path} holds another prompt at index {p.index} (key {key}) than "
            f"this run's source {source} gives there (key {p.key}: {p.text[:60]!r}); the store "
            f"was collected from: {sources or 'unrecorded'}. Use the same data.source, or "
            "another collect.store path")
    return stored

  def write_chunk(self, chunk_id: str, records: dict) -> None:
    """Writes one chunk; it becomes visible to readers only once complete."""
    if not self.writable:
      raise PermissionError(f"store at {self.path} was opened read-only")
    if "/" in chunk_id or ".tmp-" in chunk_id:
      raise ValueError(f"bad chunk id {chunk_id!r}")
    n = len(records["index"])
    n_samples, dim = int(self.meta["samples_per_prompt"]), int(self.meta["hidden_dim"])
    want = _shapes(n, n_samples, dim)
    arrays = {}
    for name, dtype in FIELDS.items():
      if name not in records:
        raise KeyError(f"chunk {chunk_id!r} lacks {name!r}")
      value = records[name]
      if name == "key" and not (isinstance(value, np.ndarray) and value.dtype == np.uint64):
        value = key_words(value)  # prompt keys as hex strings
      if name == "hidden":
        dtype = self.hidden_dtype
      arrays[name] = np.ascontiguousarray(np.asarray(value, dtype=dtype))
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
    write_json({"chunk": chunk_id, "prompts": n, "indices": arrays["index"].tolist(),
                "keys": key_hex(arrays["key"]).tolist()},
               os.path.join(tmp, MANIFEST), sort_keys=True)
    os.rename(tmp, final)

  def clean_partial(self) -> int:
    """Removes temporary folders that crashed writers left behind; returns how many."""
    return clean_partial(self.path)

  @property
  def hidden_dtype(self):
    """How hidden states are stored: float32, or float16 in a compacted store (read back as
    float32 either way)."""
    return np.dtype(self.meta.get("hidden_dtype", "float32"))

  def compact(self, destination: str, hidden_dtype: str = "float16",
              chunk_prompts: int = 4096) -> "LengthStore":
    """A copy of this store at `destination` in few chunks, hidden states as `hidden_dtype`
    (half the size in float16, for committing a store). The same prompts, keys and lengths."""
    if os.path.exists(os.path.join(destination, META)):
      raise StateMismatchError(f"{destination} already holds a store")
    data = self.read()
    meta = {k: v for k, v in self.meta.items() if k != "data_slices"}
    meta["hidden_dtype"] = np.dtype(hidden_dtype).name
    out = LengthStore.create_or_open(destination, meta, int(self.meta["hidden_dim"]),
                                     int(self.meta["samples_per_prompt"]))
    if "data_slices" in self.meta:  # every slice collected into the source, not only its first
      out.meta["data_slices"] = self.meta["data_slices"]
      write_json(out.meta, os.path.join(destination, META), sort_keys=True)
    for start in range(0, data["index"].size, chunk_prompts):
      part = {name: data[name][start:start + chunk_prompts] for name in FIELDS}
      out.write_chunk(f"c{start // chunk_prompts:04d}-i{int(part['index'][0]):09d}"
                      f"-n{part['index'].size}", part)
    return out

  def add_keys(self, prompts: dict, origin: str, count_tokens=None) -> int:
    """Upgrades an older store (opened with `upgrading=True`) in place: each chunk gets its
    prompts' keys (the array, then its manifest rewritten whole), and the meta its new version,
    last. `prompts` maps every stored index to its `Prompt` in the source the store was collected
    from (`origin` names it). `count_tokens(texts)`, if given, must reproduce each stored
    prompt_len, else nothing is written: a check that the source is the right one. Chunks that
    have their keys are skipped (an interrupted upgrade resumes). Returns the chunks upgraded."""
    if not self.writable:
      raise PermissionError(f"store at {self.path} was opened read-only")
    if int(self.meta.get("version", 1)) == STORE_VERSION:
      return 0
    todo = []
    for chunk in self._chunk_dirs():
      manifest = read_json(os.path.join(chunk, MANIFEST), "chunk manifest")
      if "keys" in manifest:
        continue
      indices = [int(i) for i in manifest["indices"]]
      missing = [i for i in indices if i not in prompts]
      if missing:
        raise StateMismatchError(f"{origin} gives no prompt at index {missing[0]}, which chunk "
                                 f"{manifest['chunk']!r} of the store at {self.path} holds")
      if count_tokens is not None:
        stored = _read_array(os.path.join(chunk, "prompt_len")).tolist()
        counted = list(count_tokens([prompts[i].text for i in indices]))
        wrong = [(i, s, c) for i, s, c in zip(indices, stored, counted) if s != c]
        if wrong:
          i, s, c = wrong[0]
          raise StateMismatchError(
              f"{origin} is not the source of the store at {self.path}: its prompt at index {i} "
              f"has {c} tokens, the store recorded {s} ({len(wrong)} of {len(indices)} differ in "
              f"chunk {manifest['chunk']!r}); nothing was changed")
      todo.append((chunk, manifest, [prompts[i].key for i in indices]))
    for chunk, manifest, hexes in todo:
      key_dir = os.path.join(chunk, "key")
      if os.path.exists(key_dir):
        shutil.rmtree(key_dir)  # from an interrupted upgrade
      _write_array(key_dir, key_words(hexes))
      write_json(dict(manifest, keys=hexes), os.path.join(chunk, MANIFEST), sort_keys=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    self.meta = dict(self.meta, version=STORE_VERSION,
                     keys_added={"from": origin, "date": now, "from_version":
                                 int(self.meta.get("version", 1))})
    write_json(self.meta, os.path.join(self.path, META), sort_keys=True)
    return len(todo)

  # --------------------------------------------------------------------------- reading

  def read(self, split: str | None = None) -> dict:
    """Every complete chunk (any process), sorted by source index; "key" holds each prompt's
    key (hex) and "split" its split, from a seeded hash of the key; `split` keeps one split."""
    from lsdist_jax.data import assign_split

    parts = {name: [] for name in FIELDS}
    for chunk in self._chunk_dirs():
      for name in FIELDS:
        parts[name].append(_read_array(os.path.join(chunk, name)))
    n_samples, dim = int(self.meta["samples_per_prompt"]), int(self.meta["hidden_dim"])
    empty = _shapes(0, n_samples, dim)
    data = {name: (np.concatenate(parts[name]) if parts[name]
                   else np.zeros(empty[name], FIELDS[name])) for name in FIELDS}
    data["hidden"] = data["hidden"].astype(np.float32)  # stored as float16 in compact stores
    order = np.argsort(data["index"], kind="stable")
    data = {k: v[order] for k, v in data.items()}
    data["key"] = key_hex(data["key"])
    if (np.unique(data["index"]).size != data["index"].size
        or np.unique(data["key"]).size != data["key"].size):
      raise StateMismatchError(f"the store at {self.path} holds some prompt twice: it is corrupt")
    data["split"] = assign_split(data["key"], int(self.meta.get("split_seed", 0)),
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
