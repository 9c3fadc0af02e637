"""Prompts: sources (local files, the shipped Alpaca pool and instructions_mix, the hub
fallback), prompt text and key, shuffle/slices, splits by a hash of the text."""

import collections
import hashlib
import json
import logging
import time

import numpy as np
import pytest

from lsdist_jax.config import default_config
from lsdist_jax.data import (Prompt, assign_split, key_hex, key_words, load_prompts, load_records,
                             open_source, parse_slice, prompt_key, prompt_text, read_pool,
                             read_shipped, select)
from lsdist_jax.errors import ConfigError


def data_config(source, datasets=(), slice_=":"):
  config = default_config().data
  config.source = source
  config.datasets = datasets
  config.slice = slice_
  return config


def test_prompt_text_joins_instruction_and_input():
  assert prompt_text({"instruction": "Sum these.", "input": "1, 2"}) == "Sum these.\n1, 2"
  assert prompt_text({"instruction": "Say hi.", "input": ""}) == "Say hi."
  assert prompt_text({"prompt": "plain"}) == "plain"
  with pytest.raises(ValueError, match="needs a string field"):
    prompt_text({"text": "x"})
  # one rule for every reader: a record with both fields is refused, never silently resolved
  with pytest.raises(ValueError, match="both 'prompt' and 'instruction'"):
    prompt_text({"prompt": "a", "instruction": "b"})


def test_shipped_copy_opens_with_alpacas_first_records():
  records = read_shipped()
  assert len(records) == 102
  assert records[0]["instruction"] == "Give three tips for staying healthy."
  assert records[1]["instruction"] == "What are the three primary colors?"
  assert records[2]["instruction"] == "Describe the structure of an atom."


def test_local_alpaca_pool_has_7451_records_with_unique_prompt_texts():
  pool = read_pool()
  assert len(pool) == 7451
  assert pool[:102] == read_shipped("alpaca")
  texts = [prompt_text(r) for r in pool]
  assert len(set(texts)) == 7451
  prompts = open_source(data_config("alpaca_local")).prompts
  assert [p.index for p in prompts] == list(range(7451))
  assert len({p.key for p in prompts}) == 7451
  assert [p.text for p in prompts] == texts


def test_unreachable_hub_falls_back_quickly_to_the_local_pool_with_a_warning(monkeypatch,
                                                                             caplog):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  start = time.perf_counter()
  with caplog.at_level(logging.WARNING):
    records = load_records("alpaca")
  assert time.perf_counter() - start < 60
  assert records == read_pool()
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("tatsu-lab/alpaca" in m and "alpaca_more" in m and "7451" in m for m in warned)
  synonym = open_source(data_config("tatsu-lab/alpaca"))  # the hub name means the same source
  assert [p.key for p in synonym.prompts] == [prompt_key(prompt_text(r)) for r in records]
  assert "not reachable" in synonym.origin


def test_instructions_mix_filters_by_exact_name_and_by_family():
  every = open_source(data_config("instructions_mix")).prompts
  assert len(every) == 5115
  counts = collections.Counter(p.dataset for p in every)
  assert counts["dolly15k"] == 1992 and counts["gsm8k_test"] == 1319 and counts["lima"] == 999
  family = open_source(data_config("instructions_mix", ("alpaca_eval",))).prompts
  assert len(family) == 805 and all(p.dataset.startswith("alpaca_eval/") for p in family)
  assert len({p.dataset for p in family}) == 5
  both = open_source(data_config("instructions_mix", ("dolly15k,alpaca_eval/vicuna",))).prompts
  assert collections.Counter(p.dataset for p in both) == {"dolly15k": 1992,
                                                          "alpaca_eval/vicuna": 80}
  by_index = {p.index: p for p in every}  # a filter keeps each prompt's index in the source
  assert all(by_index[p.index] == p for p in family + both)
  picked = load_prompts(data_config("instructions_mix", ("lima",), "0:20"))
  assert len(picked) == 20 and {p.dataset for p in picked} == {"lima"}


def test_unknown_dataset_name_is_refused_listing_the_valid_ones():
  with pytest.raises(ConfigError, match="unknown dataset.*'dolly'.*alpaca_eval.*dolly15k"):
    open_source(data_config("instructions_mix", ("dolly",)))
  with pytest.raises(ConfigError, match="'dataset' field"):
    open_source(data_config("alpaca_local", ("lima",)))


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


def test_prompt_key_is_a_short_sha256_of_the_utf8_text():
  text = "Résumé de l'article.\nIl était une fois"
  assert prompt_key(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
  assert prompt_key(text) != prompt_key(text + " ")
  keys = [prompt_key(f"question {i}") for i in range(50)]
  assert key_hex(key_words(keys)).tolist() == keys
  assert Prompt(3, text).key == prompt_key(text)
  with pytest.raises(ValueError, match="not prompt_key"):
    Prompt(3, text, key=prompt_key("another text"))


def test_split_is_deterministic_and_stable_when_prompts_are_added():
  keys = [prompt_key(f"prompt number {i}") for i in range(20000)]
  small = assign_split(keys[:2000], seed=20231113)
  large = assign_split(keys, seed=20231113)
  assert np.array_equal(small, large[:2000])  # adding prompts moves none
  assert np.array_equal(small, assign_split(keys[:2000], seed=20231113))
  assert not np.array_equal(small, assign_split(keys[:2000], seed=7))
  shares = {s: (large == s).mean() for s in ("train", "valid", "test")}
  assert abs(shares["train"] - 0.8) < 0.02 and abs(shares["test"] - 0.1) < 0.02
  with pytest.raises(ValueError, match="sum"):
    assign_split(keys[:3], 0, (0.5, 0.1, 0.1))
  with pytest.raises(ValueError, match="prompt_key"):  # indices are no longer an identity
    assign_split(np.arange(3), 0)


def test_splits_depend_only_on_the_prompt_text(tmp_path):
  pool = read_pool()
  forward, backward = tmp_path / "forward.jsonl", tmp_path / "backward.jsonl"
  forward.write_text("".join(json.dumps(r) + "\n" for r in pool))
  backward.write_text("".join(json.dumps(r) + "\n" for r in reversed(pool)))
  split_of = []
  for path in (forward, backward):
    prompts = open_source(data_config(str(path))).prompts
    names = assign_split([p.key for p in prompts], seed=20231113)
    split_of.append({p.text: (s, p.index) for p, s in zip(prompts, names)})
  assert split_of[0].keys() == split_of[1].keys()
  moved = [t for t in split_of[0] if split_of[0][t][0] != split_of[1][t][0]]
  assert not moved  # reversing the file moves no prompt between splits...
  assert sum(split_of[0][t][1] != split_of[1][t][1] for t in split_of[0]) >= 7450  # ...or index
  shares = collections.Counter(s for s, _ in split_of[0].values())
  assert abs(shares["train"] / 7451 - 0.8) < 0.02
  assert abs(shares["valid"] / 7451 - 0.1) < 0.015 and abs(shares["test"] / 7451 - 0.1) < 0.015


def test_a_stratified_slice_holds_every_dataset_in_proportion():
  from collections import Counter

  from lsdist_jax.config import default_config

  config = default_config().data
  config.source, config.slice, config.stratify_by_dataset = "instructions_mix", "0:2000", True
  picked = load_prompts(config)
  config.slice = ":"
  every = load_prompts(config)
  assert len(picked) == 2000 and len({p.key for p in picked}) == 2000
  share = Counter(p.dataset for p in every)
  got = Counter(p.dataset for p in picked)
  for name, count in share.items():  # within one prompt of its proportional count
    assert abs(got[name] - 2000 * count / len(every)) <= 1.0, name
  assert picked == every[:2000]  # a longer slice extends a shorter one
