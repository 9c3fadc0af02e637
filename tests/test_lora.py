"""The LoRA length predictor on the tiny model: adapters start as the identity and move only
their targets, training changes only adapters and learns a rule, exports round-trip and belong
to one base model, a resumed run equals an uninterrupted one."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from lsdist_jax.engine import Engine, char_tokenizer
from lsdist_jax.llama.config import get_preset
from lsdist_jax.llama.model import Llama, init_params
from lsdist_jax.errors import ConfigError, StateMismatchError
from lsdist_jax.llama import lora
from lsdist_jax.llama.model import init_cache
from lsdist_jax.lora import data as lora_data
from lsdist_jax.lora.predict import load_lora, read_lora_meta
from lsdist_jax.lora.train import LoraTrainer, train_lora

KEYS = "abcdef"  # a prompt made of key k's letter has its response max in bin (k + 1) * 100


def tiny_engine(seed=0):
  """The tiny model with its weights scaled up (as conftest's tiny_params), so that its frozen
  head can give confident answers."""
  cfg = get_preset("tiny")
  params = jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x,
                        init_params(Llama(cfg, jnp.float32, jnp.float32), seed))
  return Engine(cfg, params, char_tokenizer(cfg.vocab_size), dtype="float32",
                engine_config=tiny.get_config().engine, source="tiny")


def lora_config(**lora_overrides):
  c = tiny.get_config()
  c.lora.learning_rate = 1e-2
  c.lora.warmup_fraction = 0.05
  c.lora.batch_size = 8
  c.lora.epochs = 4
  c.lora.targets = ("all",)
  for key, value in lora_overrides.items():
    c.lora[key] = value
  return c


def synthetic(engine, n, seed):
  """(prompt ids, lengths [n, 4]): the prompt repeats one key letter; the max of its sampled
  lengths lies in bin (key + 1) * 100, the others below it."""
  rng = np.random.default_rng(seed)
  key = rng.integers(0, len(KEYS), n)
  texts = [KEYS[k] * int(rng.integers(3, 12)) for k in key]
  top = (key + 1) * 100 - rng.integers(0, 99, n)
  lengths = np.concatenate([top[:, None], rng.integers(0, 1, (n, 3)) + top[:, None] // 2], 1)
  return engine.encode(texts), lengths


def logits_of(engine, params, tokens):
  b, t = tokens.shape
  logits, _, _ = engine.model.apply({"params": params}, tokens, init_cache(engine.config, b, t,
                                                                           jnp.float32),
                                    jnp.zeros((), jnp.int32), jnp.zeros((b,), jnp.int32),
                                    logits_at="all")
  return np.asarray(logits)


@pytest.fixture(scope="module")
def engine():
  return tiny_engine()


@pytest.fixture(scope="module")
def trained(engine, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora"))
  config = lora_config(epochs=8)
  result = train_lora(config, workdir, engine, {"train": synthetic(engine, 96, 0),
                                                "valid": synthetic(engine, 16, 1)})
  return config, workdir, result


def test_untrained_adapters_leave_every_logit_unchanged(engine):
  spec = lora.LoraSpec(targets=("all",))
  adapters = lora.init_adapters(engine.params, spec, seed=3)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)), jnp.int32)
  base = logits_of(engine, engine.params, tokens)
  assert np.array_equal(logits_of(engine, lora.apply(engine.params, adapters, spec), tokens), base)
  assert np.array_equal(logits_of(engine, lora.merge(engine.params, adapters, spec), tokens), base)


def test_an_adapter_moves_only_its_target_and_merge_equals_apply(engine):
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("v", "down"))
  adapters = lora.init_adapters(engine.params, spec)
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # B no longer zero
  applied = lora.apply(engine.params, adapters, spec)
  merged = lora.merge(engine.params, adapters, spec)
  groups = engine.config.num_heads // engine.config.num_kv_heads
  for name in lora.layer_names(engine.params):
    before, after = engine.params[name]["attn"]["wqkv"], applied[name]["attn"]["wqkv"]
    assert np.array_equal(before[:, :, :groups + 1], after[:, :, :groups + 1])  # q, k
    assert not np.allclose(before[:, :, groups + 1], after[:, :, groups + 1])  # v
    delta = spec.scale * adapters[name]["v"]["a"] @ adapters[name]["v"]["b"]
    np.testing.assert_allclose(after[:, :, groups + 1] - before[:, :, groups + 1],
                               np.asarray(delta).reshape(before[:, :, groups + 1].shape),
                               rtol=1e-5, atol=1e-6)
    assert merged[name]["attn"]["wo"] is engine.params[name]["attn"]["wo"]  # not copied
    assert merged[name]["mlp"]["w_gate_up"] is engine.params[name]["mlp"]["w_gate_up"]
    assert not np.allclose(merged[name]["mlp"]["w_down"], engine.params[name]["mlp"]["w_down"])
  assert merged["embed"] is engine.params["embed"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), merged,
               applied)


def test_bad_specs_and_adapters_are_refused(engine):
  with pytest.raises(ConfigError, match="LoRA targets"):
    lora.LoraSpec(targets=("qkv",))
  with pytest.raises(ConfigError, match="rank"):
    lora.LoraSpec(rank=0)
  spec = lora.LoraSpec(rank=4)
  adapters = lora.init_adapters(engine.params, spec)
  with pytest.raises(ConfigError, match="shapes"):
    lora.apply(engine.params, adapters, lora.LoraSpec(rank=2))
  with pytest.raises(ConfigError, match="outside the spec"):
    lora.apply(engine.params, adapters, lora.LoraSpec(rank=4, targets=("q",)))


def test_a_training_step_changes_only_the_adapters(engine):
  config = lora_config()
  examples = lora_data.build_examples(engine.tokenizer, *synthetic(engine, 8, 2), config.lora,
                                      512)
  trainer = LoraTrainer(engine, config.lora, total_steps=10)
  base_before = jax.tree.map(np.array, engine.params)
  state = trainer.init_state(engine.params, 0)
  start = jax.tree.map(np.array, state["adapters"])
  batch = examples.batch(range(8), 16, trainer.window)
  for _ in range(3):
    state, loss = trainer.step(state, engine.params, *batch)
  assert np.isfinite(float(loss))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), base_before,
               engine.params)
  for name, targets in state["adapters"].items():
    for target, ab in targets.items():
      assert not np.allclose(ab["b"], 0.0), (name, target)
      assert not np.allclose(ab["a"], start[name][target]["a"]), (name, target)


def test_the_loss_reads_only_answer_tokens(engine):
  examples = lora_data.build_examples(engine.tokenizer, *synthetic(engine, 3, 4),
                                      lora_config().lora, 512)
  tokens, pad_len, labels, mask = examples.batch(range(3), 16, 6)
  for row in range(3):
    answer = examples.answers[row]
    assert mask[row].sum() == len(answer)
    assert labels[row][mask[row] > 0].tolist() == answer
    assert tokens[row, -len(answer):].tolist() == answer
    assert engine.tokenizer.decode(answer) == str(examples.targets[row])
    assert tokens[row, pad_len[row]:].tolist() == examples.queries[row] + answer


def test_it_learns_the_rule_and_predicts_it_through_the_export(engine, trained):
  config, workdir, result = trained
  predictor = load_lora(result["export"], engine)
  prompt_ids, lengths = synthetic(engine, 60, 9)  # prompts it did not train on
  truth = lora_data.length_targets(lengths, "max", 100)
  predicted = predictor.predict_ids(prompt_ids)
  assert predictor.unparsed == 0
  assert np.mean(predicted == truth) >= 0.9, (predicted[:10], truth[:10])
  log = [json.loads(line) for line in open(os.path.join(workdir, "train_log.jsonl"))]
  assert log[-1]["valid_loss"] < 0.2 * log[0]["valid_loss"]


def test_the_export_names_its_base_bin_rule_and_settings_and_round_trips(engine, trained):
  config, workdir, result = trained
  meta = read_lora_meta(result["export"])
  assert meta["base_model"]["name"] == "tiny" and meta["bin_rule"]["name"] == "max_bin100"
  assert meta["training"]["learning_rate"] == config.lora.learning_rate
  assert meta["training"]["train_examples"] == 96 and meta["lora"]["rank"] == 8
  assert meta["fallback_bin"] in [100, 200, 300, 400, 500, 600]
  restored = load_lora(result["export"], engine)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored.generator.params, lora.merge(engine.params, result["adapters"],
                                                     restored.spec))


def test_adapters_of_another_base_model_are_refused(trained):
  _, _, result = trained
  with pytest.raises(StateMismatchError, match="other weights"):
    load_lora(result["export"], tiny_engine(seed=1))


def test_the_same_weights_under_another_name_are_the_same_base(engine, trained):
  # a GGUF's config is named after its file: a renamed copy must still load the adapters
  renamed = Engine(dataclasses.replace(engine.config, name="renamed.gguf"), engine.params,
                   engine.tokenizer, dtype="float32", engine_config=tiny.get_config().engine,
                   source="renamed.gguf")
  assert load_lora(trained[2]["export"], renamed).predict_ids([[1, 5]]).shape == (1,)
  wider = dataclasses.replace(engine.config, rms_norm_eps=1e-3)
  with pytest.raises(StateMismatchError, match="rms_norm_eps differ"):
    load_lora(trained[2]["export"], Engine(wider, engine.params, engine.tokenizer,
                                           dtype="float32", source="tiny"))


def test_unparsable_answers_fall_back_to_the_training_bin_and_are_counted(engine, trained,
                                                                          monkeypatch):
  predictor = load_lora(trained[2]["export"], engine)
  monkeypatch.setattr(predictor, "answer_texts", lambda ids: ["no idea", "300", "x 120 y"])
  predicted = predictor.predict_ids([[1, 5], [1, 6], [1, 7]])
  assert predicted.tolist() == [predictor.fallback, 300, 200]
  assert predictor.unparsed == 1 and predictor.answers == 3


def test_a_resumed_run_equals_an_uninterrupted_one(engine, tmp_path):
  config = lora_config(epochs=3, batch_size=8)
  data = {"train": synthetic(engine, 16, 5), "valid": synthetic(engine, 8, 6)}
  whole = train_lora(config, str(tmp_path / "whole"), engine, data)
  assert train_lora(config, str(tmp_path / "cut"), engine, data,
                    stop_after_epochs=1) == {"stopped_at_epoch": 1}
  resumed = train_lora(config, str(tmp_path / "cut"), engine, data)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               whole["adapters"], resumed["adapters"])
  assert resumed["best_epoch"] == whole["best_epoch"]
  log = [json.loads(line)["epoch"] for line in open(tmp_path / "cut" / "train_log.jsonl")]
  assert log == [1, 2, 3]


def test_table_scores_measure_error_against_each_prompts_sampled_max():
  from lsdist_jax.lora.evaluate import scores

  lengths = np.array([[80, 10], [260, 150], [0, 0], [120, 30]])
  row = scores("x", [100, 250, 0, 100], lengths, 100, "median")
  assert row["mae_vs_max"] == pytest.approx((20 + 10 + 0 + 20) / 4)
  assert row["right_bin_share_max"] == 0.75  # 100 is not 120's bin (200)
  assert row["right_bin_share_target"] == 1.0  # medians 45, 205, 0, 75 -> 100, 300, 0, 100
  assert row["target"] == "median_bin100"
