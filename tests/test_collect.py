"""Collection end to end on the tiny model: lengths, resume after a crash, the guard, two processes."""

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
  real = collect_lib.sample_rows

  def crash_in_second_chunk(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
      raise RuntimeError("simulated crash")
    return real(*args, **kwargs)

  monkeypatch.setattr(collect_lib, "sample_rows", crash_in_second_chunk)
  with pytest.raises(RuntimeError, match="simulated crash"):
    collect(resumed, engine=engine, show_progress=False)
  assert len(LengthStore.open(resumed.collect.store).done_indices()) <= 4
  monkeypatch.setattr(collect_lib, "sample_rows", real)
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


def test_prompt_longer_than_the_context_is_refused(tmp_path, engine):
  config = tiny_config(tmp_path)
  config.collect.long_prompts = "error"
  config.generation.max_seq_len = 8
  with pytest.raises(ValueError, match="max_seq_len=8"):
    collect(config, engine=engine, show_progress=False)


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
