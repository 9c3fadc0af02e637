"""Every experiment config loads, passes the schema check, and names files that exist."""

import importlib
import os
import sys

import pytest

from lsdist_jax.config import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the configs/ package sits beside lsdist_jax/
CONFIGS = [("smollm2_alpaca", "cpu"), ("smollm2_alpaca", "gpu"), ("llama2_7b_chat_alpaca", None),
           ("tiny", None)]


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
