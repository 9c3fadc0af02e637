"""Collection end to end on the tiny model: lengths, resume after a crash, the guards (config,
source, lock), stale chunk folders, long prompts, two processes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lsdist_jax import collect as collect_lib
from lsdist_jax.collect import collect, request_id
from lsdist_jax.engine import load_engine
from lsdist_jax.data import load_prompts
from lsdist_jax.errors import InputError, LockHeldError, StateMismatchError
from lsdist_jax.files import held_lock
from lsdist_jax.store import LengthStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, name="store"):
  sys.path.insert(0, REPO)
  from configs import tiny

  config = tiny.get_config()
  config.collect.store = str(tmp_path / name)
  config.collect.chunk_prompts = 4
  config.collect.batch_size = 16
  config.data.slice = "0:12"
  return config


def file_config(tmp_path, texts, file="prompts.jsonl"):
  """The tiny config over a local file of these prompts: all of them, 2 samples each."""
  path = tmp_path / file
  path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
  config = tiny_config(tmp_path)
  config.data.source = str(path)
  config.data.slice = ":"
  config.collect.samples_per_prompt = 2
  config.collect.chunk_prompts = 2
  return config


@pytest.fixture(scope="module")
def engine():
  sys.path.insert(0, REPO)
  from configs import tiny

  return load_engine(tiny.get_config())


def test_collected_lengths_equal_direct_generation_and_round_trip(tmp_path, engine):
  config = tiny_config(tmp_path)
  summary = collect(config, engine=engine, show_progress=False)
  data = LengthStore.open(config.collect.store).read()
  prompts = {p.index: p for p in load_prompts(config.data)
             if len(engine.encode([p.text])[0]) < config.generation.max_seq_len}
  assert sorted(prompts) == data["index"].tolist()
  assert data["key"].tolist() == [prompts[i].key for i in data["index"]]
  assert summary["prompts"] == len(prompts) >= 10 and summary["samples"] == 4 * len(prompts)
  n = config.collect.samples_per_prompt
  for row, index in enumerate(data["index"]):
    ids = engine.encode([prompts[index].text])[0]
    direct = engine.generator.generate(
        [ids] * n, cap=config.generation.max_seq_len, max_seq_len=config.generation.max_seq_len,
        seed=config.generation.seed, temperature=config.generation.temperature,
        top_p=config.generation.top_p, request_ids=[request_id(index, j, n) for j in range(n)])
    assert data["lengths"][row].tolist() == direct.num_generated.tolist()
    assert data["finished"][row].tolist() == direct.finished.tolist()
    assert data["prompt_len"][row] == len(ids)
    np.testing.assert_allclose(data["hidden"][row], engine.embed([ids])[0], rtol=1e-4,
                               atol=1e-5)
  assert 0 < data["finished"].mean() < 1  # some rows hit max_seq_len: capped rounds exercised


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, engine, monkeypatch):
  whole = tiny_config(tmp_path, "whole")
  collect(whole, engine=engine, show_progress=False)
  resumed = tiny_config(tmp_path, "resumed")
  calls = {"n": 0}
  real = LengthStore.write_chunk

  def crash_in_second_chunk(self, *args, **kwargs):  # the job dies as its 2nd chunk is written
    calls["n"] += 1
    if calls["n"] == 2:
      raise RuntimeError("simulated crash")
    return real(self, *args, **kwargs)

  monkeypatch.setattr(LengthStore, "write_chunk", crash_in_second_chunk)
  with pytest.raises(RuntimeError, match="simulated crash"):
    collect(resumed, engine=engine, show_progress=False)
  assert len(LengthStore.open(resumed.collect.store).done_indices()) <= 4
  monkeypatch.setattr(LengthStore, "write_chunk", real)
  collect(resumed, engine=engine, show_progress=False)
  a = LengthStore.open(whole.collect.store).read()
  b = LengthStore.open(resumed.collect.store).read()
  for key in ("index", "prompt_len", "lengths", "finished", "hidden"):
    np.testing.assert_array_equal(a[key], b[key])


def test_reopening_with_another_generation_config_is_refused(tmp_path, engine):
  config = tiny_config(tmp_path)
  collect(config, engine=engine, show_progress=False, stop_after_chunks=1)
  config.generation.temperature = 1.0
  with pytest.raises(ValueError, match="generation"):
    collect(config, engine=engine, show_progress=False)


def test_prompt_longer_than_the_context_is_refused_naming_it(tmp_path, engine):
  config = tiny_config(tmp_path)
  config.collect.long_prompts = "error"
  config.generation.max_seq_len = 8
  with pytest.raises(InputError, match=r"prompt \d+ \(.*key [0-9a-f]{32}\) has .*max_seq_len=8"):
    collect(config, engine=engine, show_progress=False)


def test_long_prompt_is_skipped_and_counted_with_skip(tmp_path, engine):
  config = file_config(tmp_path, ["Name a colour.", "word " * 400, "Count to three."])
  config.collect.long_prompts = "skip"
  summary = collect(config, engine=engine, show_progress=False)
  assert summary["skipped_long_prompts"] == 1 and summary["prompts"] == 2
  assert sorted(LengthStore.open(config.collect.store).read()["index"].tolist()) == [0, 2]


def test_resuming_with_a_source_that_has_other_prompts_at_stored_indices_is_refused(tmp_path,
                                                                                    engine):
  first = file_config(tmp_path, ["Name a colour.", "Count to three."], file="a.jsonl")
  collect(first, engine=engine, show_progress=False)
  before = LengthStore.open(first.collect.store).read()
  with open(os.path.join(first.collect.store, "meta.json")) as f:
    assert json.load(f)["data"]["origin"] == str(tmp_path / "a.jsonl")  # the source is recorded
  other = file_config(tmp_path, ["Name a colour.", "Spell the word cat."], file="b.jsonl")
  with pytest.raises(StateMismatchError, match="another prompt at index 1") as e:
    collect(other, engine=engine, show_progress=False)
  assert "a.jsonl" in str(e.value) and "b.jsonl" in str(e.value)
  after = LengthStore.open(first.collect.store).read()
  for key in ("index", "key", "lengths"):
    np.testing.assert_array_equal(before[key], after[key])  # nothing of b.jsonl was mixed in


def test_a_second_collect_on_a_locked_store_is_refused_in_one_line(tmp_path, engine):
  store = tmp_path / "store"
  config = tiny_config(tmp_path)
  with held_lock(str(store / collect_lib.LOCK), "the first run"):
    with pytest.raises(LockHeldError) as e:
      collect(config, engine=engine, show_progress=False)
    launcher = subprocess.run(
        [sys.executable, "launch/collect.py", "--config=configs/tiny.py",
         f"--config.collect.store={store}", f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
  assert "\n" not in str(e.value) and str(store) in str(e.value)
  assert launcher.returncode == 2, launcher.stderr[-2000:]
  last = launcher.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: the length store {store} is in use by another process")
  assert not (store / "meta.json").exists()  # refused before it touched the store
  collect(file_config(tmp_path, ["Name a colour."]), engine=engine, show_progress=False)


def test_a_stale_tmp_chunk_folder_is_removed_when_collection_starts(tmp_path, engine):
  config = file_config(tmp_path, ["Name a colour.", "Count to three."])
  stale = tmp_path / "store" / "chunks" / "p0000-i000000000-n2.tmp-0123abcd"
  stale.mkdir(parents=True)
  (stale / "lengths").write_text("half a chunk")
  summary = collect(config, engine=engine, show_progress=False)
  assert not stale.exists()
  chunks = os.listdir(tmp_path / "store" / "chunks")
  assert len(chunks) == 1 and ".tmp-" not in chunks[0]
  assert summary["prompts"] == 2


WORKER = textwrap.dedent("""
    import sys, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.path.insert(0, {repo!r})
    from configs import tiny
    from lsdist_jax.collect import collect
    config = tiny.get_config()
    config.collect.store = {store!r}
    config.collect.chunk_prompts = 4
    config.data.slice = "0:12"
    config.mesh.distributed = True
    config.mesh.coordinator_address = "127.0.0.1:{port}"
    config.mesh.num_processes = 2
    config.mesh.process_id = int(sys.argv[1])
    summary = collect(config, show_progress=False)
    assert jax.process_count() == 2
    print("DONE", jax.process_index(), summary["new_prompts"])
""")


def test_two_processes_collect_disjoint_shares_equal_to_one_process(tmp_path, engine):
  single = tiny_config(tmp_path, "single")
  collect(single, engine=engine, show_progress=False)
  store = str(tmp_path / "multi")
  port = 20000 + os.getpid() % 20000
  script = WORKER.format(repo=REPO, store=store, port=port)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert sum(int(o.split()[-1]) for o, _ in outs) == LengthStore.open(store).summary()["prompts"]
  chunks = os.listdir(os.path.join(store, "chunks"))
  assert {c[:5] for c in chunks} == {"p0000", "p0001"}
  a, b = LengthStore.open(single.collect.store).read(), LengthStore.open(store).read()
  for key in ("index", "prompt_len", "lengths", "finished"):
    np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_allclose(a["hidden"], b["hidden"], rtol=1e-4, atol=1e-5)
  with open(os.path.join(store, "meta.json")) as f:
    assert json.load(f)["samples_per_prompt"] == 4
