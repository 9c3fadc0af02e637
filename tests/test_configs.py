"""Every experiment config loads, passes the schema check, and names files that exist."""

import importlib
import os
import sys

import pytest

from lsdist_jax.config import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the configs/ package sits beside lsdist_jax/
NAMED = {"smollm2_alpaca": ("cpu", "gpu", "eval")}  # configs that take an argument
CONFIGS = [(name, arg) for name in sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs"))
                                          if f.endswith(".py") and f != "__init__.py")
           for arg in NAMED.get(name, (None,))]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_passes_the_schema_and_its_files_exist(name, arg):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(arg) if arg else module.get_config()
  check_config(config)
  if config.schedule.cost_model:
    assert os.path.isfile(os.path.join(ROOT, config.schedule.cost_model))
  assert config.engine.decode_attention in ("auto", "dot", "reduce", "pallas")


def test_a_misspelt_key_is_refused_with_its_name():
  from configs import tiny

  config = tiny.get_config()
  config.predictor.unlock()
  config.predictor.recalibraton_folds = 3
  with pytest.raises(KeyError, match="predictor.recalibraton_folds"):
    check_config(config)


def test_an_experiment_file_states_only_its_changes():
  """Defaults live in lsdist_jax/config.py: a config file that sets a key to its default value
  restates it (it would silently keep an old default when config.py changes)."""
  from lsdist_jax.config import default_config

  for name in ("llama2_7b_chat_alpaca", "tiny"):
    config = importlib.import_module(f"configs.{name}").get_config()
    source = open(os.path.join(ROOT, "configs", f"{name}.py")).read()
    default = default_config()
    for section in config.keys():
      if not hasattr(config[section], "keys"):
        continue
      for key in config[section].keys():
        if f"c.{section}.{key} =" in source:
          assert config[section][key] != default[section][key], f"{name}: {section}.{key}"


def test_a_config_file_loads_by_path_as_the_launchers_load_it(tmp_path):
  """launch/*.py load configs by path (not as a package): files built on another one work."""
  import subprocess

  path = os.path.join(ROOT, "configs", "llama2_7b_replay_h200.py")
  code = ("from ml_collections import config_flags; from absl import flags; import sys; "
          "config_flags.DEFINE_config_file('config'); flags.FLAGS(sys.argv); "
          "print(flags.FLAGS.config.model.name)")
  out = subprocess.run([sys.executable, "-c", code, f"--config={path}"], capture_output=True,
                       text=True, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "random:llama-2-7b"


def test_scan_prefill_auto_scans_small_models_and_unrolls_large_ones():
  """engine.scan_prefill="auto" (the default): a scanned prefill stacks the layer weights on
  every call, so a 7B model (12.6 GiB of them in bf16) unrolls while SmolLM2 scans; an engine
  built from the default config follows it."""
  from lsdist_jax.config import default_config
  from lsdist_jax.engine import Engine
  from lsdist_jax.llama.config import get_preset, resolve_scan_prefill

  assert default_config().engine.scan_prefill == "auto"
  assert resolve_scan_prefill("auto", get_preset("smollm2-135m-instruct"), 2)
  assert not resolve_scan_prefill("auto", get_preset("llama-2-7b"), 2)
  assert not resolve_scan_prefill("auto", get_preset("llama-2-7b"), 4)
  assert resolve_scan_prefill("True", get_preset("llama-2-7b"), 2)
  assert not resolve_scan_prefill(False, get_preset("tiny"), 4)
  with pytest.raises(ValueError, match="engine.scan_prefill='sometimes'"):
    resolve_scan_prefill("sometimes", get_preset("tiny"), 4)
  config = default_config()
  assert Engine.random("tiny", dtype="float32", engine_config=config.engine).model.scan_prefill
  config.engine.scan_prefill = "false"
  assert not Engine.random("tiny", dtype="float32",
                           engine_config=config.engine).model.scan_prefill
