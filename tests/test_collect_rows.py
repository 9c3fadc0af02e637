"""Collection through slot refill gives exactly the store of static capped batches."""

import os
import sys

import numpy as np
import pytest

from lsdist_jax.collect import collect
from lsdist_jax.collect_rows import Row, sample_slots, sample_static
from lsdist_jax.engine import load_engine
from lsdist_jax.store import LengthStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import tiny  # noqa: E402


@pytest.fixture(scope="module")
def engine():
  return load_engine(tiny.get_config())


def test_slot_collection_equals_static_collection_exactly(tmp_path, engine):
  stores = {}
  for decode in ("static", "slots"):
    config = tiny.get_config()
    config.collect.store = str(tmp_path / decode)
    config.collect.decode = decode
    config.collect.batch_size = 8  # fewer slots than rows: refills across chunk boundaries
    config.data.slice = "0:10"
    collect(config, engine=engine, show_progress=False)
    stores[decode] = LengthStore.open(config.collect.store).read()
  a, b = stores["static"], stores["slots"]
  assert a["index"].size >= 8
  for key in ("index", "prompt_len", "lengths", "finished"):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Slot collection keeps the hidden state its insert prefill computed (another program, at
  # another padded length, than the static path's separate prefill): equal to float error.
  np.testing.assert_allclose(a["hidden"], b["hidden"], rtol=1e-4, atol=1e-5)
  assert np.abs(b["hidden"]).sum(axis=1).min() > 0  # every prompt's state was kept
  assert 0 < a["finished"].mean() < 1  # some rows reach max_seq_len without EOS


def test_every_row_is_reported_once_in_both_samplers(engine):
  config = tiny.get_config()
  config.generation.max_seq_len = 64
  config.collect.batch_size = 4
  prompts = engine.encode([f"prompt {i}" for i in range(5)])
  for sampler in (sample_slots, sample_static):
    rows = [Row(k, j, 100 * k + j, prompts[k]) for k in range(5) for j in range(3)]
    seen = []
    tokens = sampler(engine, rows, config, seen.append)
    assert sorted(id(r) for r in seen) == sorted(id(r) for r in rows)
    assert tokens == sum(len(r.generated) for r in rows)
    assert all(r.done and (r.finished or len(r.prompt_ids) + len(r.generated) == 64)
               for r in rows)


@pytest.mark.slow  # two processes
def test_one_process_per_device_gives_the_store_of_one_process(tmp_path, engine):
  """launch/collect.py --devices=0,1: one process per device in one jax.distributed job
  (CPU processes here; on a GPU host each sees its own GPU), the same store as one process."""
  import json
  import subprocess

  single = tiny.get_config()
  single.collect.store = str(tmp_path / "single")
  single.data.slice = "0:8"
  collect(single, engine=engine, show_progress=False)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "collect.py"),
       f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", "--config.data.slice=0:8",
       f"--config.collect.store={tmp_path / 'multi'}", f"--workdir={tmp_path / 'work'}",
       "--devices=0,1", "--noplots"], env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((tmp_path / "work" / "collect_summary.json").read_text())
  assert summary["processes"] == 2 and len(summary["per_process"]) == 2
  a = LengthStore.open(single.collect.store).read()
  b = LengthStore.open(str(tmp_path / "multi")).read()
  assert summary["new_prompts"] == a["index"].size
  for key in ("index", "prompt_len", "lengths", "finished"):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  np.testing.assert_allclose(a["hidden"], b["hidden"], rtol=1e-4, atol=1e-5)  # other batches


@pytest.mark.slow  # a subprocess with 2 fake devices
def test_collection_on_a_data_parallel_mesh_of_fake_devices_gives_the_same_store(tmp_path, engine):
  """One process, a (data=2) mesh of 2 fake CPU devices: slots split over `data`; the store
  equals one device's."""
  import subprocess

  single = tiny.get_config()
  single.collect.store = str(tmp_path / "single")
  single.data.slice = "0:6"
  collect(single, engine=engine, show_progress=False)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "collect.py"),
       f"--config={os.path.join(REPO, 'configs', 'tiny.py')}", "--config.data.slice=0:6",
       "--config.mesh.data=2", f"--config.collect.store={tmp_path / 'mesh'}",
       f"--workdir={tmp_path / 'work'}", "--noplots"],
      env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  import json
  summary = json.loads((tmp_path / "work" / "collect_summary.json").read_text())
  assert summary["mesh"] == {"data": 2, "model": 1}
  a = LengthStore.open(single.collect.store).read()
  b = LengthStore.open(str(tmp_path / "mesh")).read()
  for key in ("index", "prompt_len", "lengths", "finished"):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  np.testing.assert_allclose(a["hidden"], b["hidden"], rtol=1e-4, atol=1e-5)
