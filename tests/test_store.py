"""The length store: exact round trip, crash-safe chunks, the mixing guards (configs, prompt keys,
versions), splits from the stored keys, several writers."""

import json
import os

import numpy as np
import pytest

from lsdist_jax import store as store_lib
from lsdist_jax.data import Prompt, assign_split, prompt_key
from lsdist_jax.errors import StateMismatchError
from lsdist_jax.schedule.dist import empirical_pmf
from lsdist_jax.store import LengthStore

META = {"model": {"name": "tiny"}, "generation": {"temperature": 0.6, "top_p": 0.9, "seed": 1,
                                                  "max_seq_len": 96},
        "hidden_layer": -1, "split_seed": 3, "split_fractions": [0.8, 0.1, 0.1],
        "data": {"slice": "0:12"}}


def text(i):
  return f"prompt number {i}"


def _records(indices, n=4, dim=6, seed=0, texts=text):
  rng = np.random.default_rng(seed)
  k = len(indices)
  return {"index": np.asarray(indices), "key": [prompt_key(texts(i)) for i in indices],
          "prompt_len": rng.integers(5, 30, k),
          "lengths": rng.integers(0, 90, (k, n)), "finished": rng.random((k, n)) < 0.8,
          "hidden": rng.normal(size=(k, dim)).astype(np.float32)}


def test_round_trip_is_exact_and_sorted_by_index(tmp_path):
  s = LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=4)
  a, b = _records([7, 3, 9], seed=1), _records([1, 4], seed=2)
  s.write_chunk("p0000-a", a)
  s.write_chunk("p0000-b", b)
  got = LengthStore.open(str(tmp_path)).read()
  order = np.argsort(np.concatenate([a["index"], b["index"]]))
  for key in ("index", "key", "prompt_len", "lengths", "finished", "hidden"):
    want = np.concatenate([a[key], b[key]])[order]
    np.testing.assert_array_equal(got[key], want.astype(got[key].dtype))
  assert got["hidden"].dtype == np.float32 and got["lengths"].dtype == np.int32
  assert s.done_indices() == {1, 3, 4, 7, 9}
  assert s.stored_keys() == {i: prompt_key(text(i)) for i in (1, 3, 4, 7, 9)}
  splits = LengthStore.open(str(tmp_path)).read("train")["index"]
  assert set(splits) <= {1, 3, 4, 7, 9}


def test_interrupted_chunk_is_invisible_and_can_be_rewritten(tmp_path, monkeypatch):
  s = LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=4)
  s.write_chunk("good", _records([0, 1]))
  calls = {"n": 0}
  real = store_lib._write_array

  def crash_on_third(path, array):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("killed mid-chunk")
    real(path, array)

  monkeypatch.setattr(store_lib, "_write_array", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    s.write_chunk("crashed", _records([5, 6]))
  monkeypatch.setattr(store_lib, "_write_array", real)
  reopened = LengthStore.open(str(tmp_path))
  assert reopened.done_indices() == {0, 1}
  assert reopened.read()["index"].tolist() == [0, 1]
  s.write_chunk("crashed", _records([5, 6]))
  assert LengthStore.open(str(tmp_path)).read()["index"].tolist() == [0, 1, 5, 6]
  assert s.clean_partial() == 1


def test_splits_come_from_the_stored_keys_not_the_indices(tmp_path):
  indices = np.arange(300)
  a = LengthStore.create_or_open(str(tmp_path / "a"), META, hidden_dim=6, samples_per_prompt=4)
  a.write_chunk("p0", _records(indices))
  shifted = LengthStore.create_or_open(str(tmp_path / "b"), META, hidden_dim=6,
                                       samples_per_prompt=4)
  shifted.write_chunk("p0", _records(indices + 1000, texts=lambda i: text(i - 1000)))
  got_a, got_b = LengthStore.open(a.path).read(), LengthStore.open(shifted.path).read()
  np.testing.assert_array_equal(got_a["key"], got_b["key"])
  np.testing.assert_array_equal(got_a["split"], got_b["split"])  # the same texts, other indices
  want = assign_split([prompt_key(text(i)) for i in indices], META["split_seed"])
  np.testing.assert_array_equal(got_a["split"], want)
  train = LengthStore.open(a.path).read("train")
  assert set(train["key"]) == {k for k, s in zip(got_a["key"], want) if s == "train"}


def test_another_prompt_at_a_stored_index_is_refused(tmp_path):
  s = LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=4)
  s.write_chunk("p0", _records([0, 1, 2]))
  same = [Prompt(i, text(i)) for i in range(5)]  # the stored three and two new ones
  assert s.check_prompts(same, "file a") == {i: prompt_key(text(i)) for i in range(3)}
  moved = [Prompt(7, text(1))]  # a stored text at a new index: already stored, not a conflict
  s.check_prompts(moved, "file a")
  other = [Prompt(0, text(0)), Prompt(1, "a different prompt")]
  with pytest.raises(StateMismatchError, match="another prompt at index 1.*file b"):
    s.check_prompts(other, "file b")


def test_a_store_of_another_version_is_refused_and_can_be_upgraded(tmp_path):
  s = LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=4)
  s.write_chunk("p0", _records([4, 2]))
  # Make it look like a version-1 store: no keys in the meta, the manifest or the chunk.
  meta_path, chunk = tmp_path / "meta.json", tmp_path / "chunks" / "p0"
  meta = json.loads(meta_path.read_text())
  meta_path.write_text(json.dumps(dict(meta, version=1)))
  manifest = json.loads((chunk / "MANIFEST.json").read_text())
  del manifest["keys"]
  (chunk / "MANIFEST.json").write_text(json.dumps(manifest))
  store_lib.shutil.rmtree(chunk / "key")
  with pytest.raises(StateMismatchError, match="version 1.*version 2.*upgrade_store"):
    LengthStore.open(str(tmp_path))
  with pytest.raises(StateMismatchError, match="version 1"):
    LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=4)
  old = LengthStore.open(str(tmp_path), upgrading=True)
  source = {i: Prompt(i, text(i)) for i in range(6)}
  with pytest.raises(StateMismatchError, match="no prompt at index 4"):
    old.add_keys({2: source[2]}, "a short source")
  stored_len = dict(zip([4, 2], _records([4, 2])["prompt_len"].tolist()))

  def count_tokens(texts, off_by=0):  # what a tokenizer gives for the stored prompts' texts
    return [stored_len[int(t.split()[-1])] + off_by for t in texts]

  with pytest.raises(StateMismatchError, match="not the source.*nothing was changed"):
    old.add_keys(source, "another source", count_tokens=lambda t: count_tokens(t, off_by=1))
  assert not (chunk / "key").exists()
  assert old.add_keys(source, "the source", count_tokens=count_tokens) == 1
  got = LengthStore.open(str(tmp_path)).read()
  assert got["key"].tolist() == [prompt_key(text(2)), prompt_key(text(4))]
  assert json.loads(meta_path.read_text())["keys_added"]["from"] == "the source"


def test_another_generation_config_is_refused(tmp_path):
  LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=4)
  other = dict(META, generation=dict(META["generation"], temperature=1.0))
  with pytest.raises(ValueError, match="generation"):
    LengthStore.create_or_open(str(tmp_path), other, hidden_dim=6, samples_per_prompt=4)
  with pytest.raises(ValueError, match="samples_per_prompt"):
    LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=8)
  more = dict(META, data={"slice": "12:24"})  # more prompts of the same run: allowed
  s = LengthStore.create_or_open(str(tmp_path), more, hidden_dim=6, samples_per_prompt=4)
  assert len(s.meta["data_slices"]) == 2


def test_chunks_of_two_processes_read_as_their_union(tmp_path):
  first = LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=4)
  second = LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=4)
  first.write_chunk("p0000-i0", _records([0, 2, 4]))
  second.write_chunk("p0001-i1", _records([1, 3, 5]))
  assert LengthStore.open(str(tmp_path)).read()["index"].tolist() == [0, 1, 2, 3, 4, 5]


def test_bad_input_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no length store"):
    LengthStore.open(str(tmp_path / "none"))
  s = LengthStore.create_or_open(str(tmp_path), META, hidden_dim=6, samples_per_prompt=4)
  bad = _records([0, 1])
  bad["hidden"] = bad["hidden"][:, :5]
  with pytest.raises(ValueError, match="hidden has shape"):
    s.write_chunk("bad", bad)


def test_empirical_pmf_sums_to_one():
  pmf = empirical_pmf(np.array([[0, 3, 3, 9], [5, 5, 5, 5]]), max_len=6)
  np.testing.assert_allclose(pmf.sum(1), 1.0)
  assert pmf[0, 3] == 0.5 and pmf[0, 6] == 0.25 and pmf[1, 5] == 1.0


def test_a_compacted_store_holds_the_same_prompts_in_half_the_bytes(tmp_path):
  from lsdist_jax.data import prompt_key
  from lsdist_jax.errors import StateMismatchError

  meta = {"model": {"name": "m"}, "generation": {"temperature": 0.6}, "split_seed": 3,
          "split_fractions": [0.8, 0.1, 0.1], "data": {"slice": "0:4"}}
  store = LengthStore.create_or_open(str(tmp_path / "big"), meta, hidden_dim=8,
                                     samples_per_prompt=3)
  store = LengthStore.create_or_open(str(tmp_path / "big"), dict(meta, data={"slice": ":"}),
                                     hidden_dim=8, samples_per_prompt=3)  # a second run
  rng = np.random.default_rng(0)
  for c in range(3):
    idx = np.arange(4 * c, 4 * c + 4)
    store.write_chunk(f"p{c}", {"index": idx, "key": [prompt_key(f"p{i}") for i in idx],
                                "prompt_len": idx + 5, "lengths": rng.integers(0, 99, (4, 3)),
                                "finished": rng.random((4, 3)) < 0.5,
                                "hidden": rng.normal(size=(4, 8))})
  small = store.compact(str(tmp_path / "small"))
  a, b = store.read(), LengthStore.open(str(tmp_path / "small")).read()
  for name in ("index", "key", "prompt_len", "lengths", "finished", "split"):
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert b["hidden"].dtype == np.float32
  np.testing.assert_allclose(a["hidden"], b["hidden"], rtol=1e-3, atol=1e-3)  # float16
  assert not np.array_equal(a["hidden"], b["hidden"])
  assert len(os.listdir(tmp_path / "small" / "chunks")) == 1
  assert [d["slice"] for d in LengthStore.open(str(tmp_path / "small")).meta["data_slices"]] == [
      "0:4", ":"]
  with pytest.raises(StateMismatchError, match="already holds a store"):
    store.compact(str(tmp_path / "small"))
