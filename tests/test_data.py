"""Prompts: loading (local files, shipped fallback), prompt text, shuffle/slices, splits."""

import json
import time

import numpy as np
import pytest

from lsdist_jax.config import default_config
from lsdist_jax.data import (assign_split, load_prompts, load_records, parse_slice, prompt_text,
                             read_shipped, select)


def test_prompt_text_joins_instruction_and_input():
  assert prompt_text({"instruction": "Sum these.", "input": "1, 2"}) == "Sum these.\n1, 2"
  assert prompt_text({"instruction": "Say hi.", "input": ""}) == "Say hi."
  assert prompt_text({"prompt": "plain"}) == "plain"
  with pytest.raises(ValueError, match="needs a string field"):
    prompt_text({"text": "x"})
  # one rule for every reader: a record with both fields is refused, never silently resolved
  with pytest.raises(ValueError, match="both 'prompt' and 'instruction'"):
    prompt_text({"prompt": "a", "instruction": "b"})


def test_shipped_copy_is_the_original_opening_records():
  records = read_shipped()
  assert len(records) >= 102
  assert records[0]["instruction"] == "Give three tips for staying healthy."
  assert records[1]["instruction"] == "What are the three primary colors?"
  assert records[2]["instruction"] == "Describe the structure of an atom."


def test_unreachable_hub_falls_back_quickly_to_the_shipped_copy(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  start = time.perf_counter()
  records = load_records("tatsu-lab/alpaca")
  assert time.perf_counter() - start < 60
  assert records == read_shipped()


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "prompt-jsonl"])
def test_local_files_load(tmp_path, fmt):
  rows = [{"instruction": f"task {i}", "input": "x" if i % 2 else "", "output": "y"}
          for i in range(7)]
  if fmt == "jsonl":
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  elif fmt == "json":
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
  elif fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
  else:
    rows = [{"prompt": f"question {i}"} for i in range(7)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
  config = default_config().data
  config.source = str(path)
  config.slice = ":"
  prompts = load_prompts(config)
  assert sorted(p.index for p in prompts) == list(range(7))
  assert {p.text for p in prompts} == {prompt_text(r) for r in rows}


def test_missing_and_malformed_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    load_records(str(tmp_path / "nope.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ok"}\n{not json\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    load_records(str(bad))


def test_shuffle_and_slices_are_deterministic_and_disjoint():
  a = select(1000, 20231005, "10:110")
  assert np.array_equal(a, select(1000, 20231005, "10:110"))
  assert not np.array_equal(a, select(1000, 1, "10:110"))
  b = select(1000, 20231005, "110:300")
  assert len(a) == 100 and len(b) == 190 and not set(a) & set(b)
  assert parse_slice(":") == slice(None, None)
  with pytest.raises(ValueError, match="start:stop"):
    parse_slice("1:2:3")
  with pytest.raises(ValueError, match="selects no prompts"):
    select(10, 0, "20:30")


def test_split_is_deterministic_disjoint_and_stable_when_prompts_are_added():
  small = assign_split(np.arange(2000), seed=20231113)
  large = assign_split(np.arange(20000), seed=20231113)
  assert np.array_equal(small, large[:2000])  # adding prompts moves none
  assert np.array_equal(small, assign_split(np.arange(2000), seed=20231113))
  assert not np.array_equal(small, assign_split(np.arange(2000), seed=7))
  shares = {s: (large == s).mean() for s in ("train", "valid", "test")}
  assert abs(shares["train"] - 0.8) < 0.02 and abs(shares["test"] - 0.1) < 0.02
  with pytest.raises(ValueError, match="sum"):
    assign_split(np.arange(3), 0, (0.5, 0.1, 0.1))
