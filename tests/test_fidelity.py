"""The fidelity benchmark's statistics (benchmark/fidelity.py): the mid-PIT of one sample under
another's empirical distribution, and the length comparison built on it. The tiny model has no
transformers twin, so the sampling sides run only on the GPU (launch/fidelity.py)."""

import numpy as np
import pytest

from lsdist_jax.benchmark.fidelity import compare_lengths, first_stop, mid_pit


MEANS = np.random.default_rng(1).uniform(40, 300, 300)  # one length scale per prompt


def _lengths(seed, scale=1.0, samples=16, cap=512):
  """Per-prompt samples of capped, discrete lengths (ties everywhere, many at the cap)."""
  rng = np.random.default_rng(seed)
  return [np.minimum(rng.geometric(1.0 / (m * scale), samples), cap).tolist() for m in MEANS]


def test_mid_pit_counts_ties_half():
  ref = [1, 2, 2, 3]
  np.testing.assert_allclose(mid_pit(ref, [0, 1, 2, 3, 4]), [0.0, 0.125, 0.5, 0.875, 1.0])


def test_pit_of_a_sample_under_its_own_distribution_averages_one_half():
  out = compare_lengths(_lengths(2), _lengths(3), cap=512)
  assert abs(out["pit_mean"] - 0.5) < 3 * out["pit_se"] and abs(out["pit_mean"] - 0.5) < 0.02
  assert abs(out["pit_mean"] + out["pit_mean_reverse"] - 1.0) < 1e-9
  assert out["ks_pvalue"] > 0.01
  assert 0.02 < out["share_at_cap_ours"] < 0.2
  assert abs(out["share_at_cap_ours"] - out["share_at_cap_hf"]) < 0.03


def test_longer_reference_lengths_move_the_pit_mean_above_one_half():
  ours, longer = _lengths(4), _lengths(5, scale=1.3)
  out = compare_lengths(ours, longer, cap=512)
  assert out["pit_mean"] > 0.5 + 5 * out["pit_se"] and out["pit_mean"] > 0.54
  assert out["ks_pvalue"] < 1e-6
  assert out["mean_length_hf"] > out["mean_length_ours"]
  assert out["share_at_cap_hf"] > out["share_at_cap_ours"]
  assert compare_lengths(longer, ours, cap=512)["pit_mean"] < 0.46


def test_compare_lengths_refuses_mismatched_prompts():
  with pytest.raises(ValueError, match="same prompts"):
    compare_lengths([[1, 2]], [[1], [2]], cap=10)


def test_first_stop_is_the_length_before_any_stop_id():
  assert first_stop([5, 6, 2, 7, 2], [2]) == 2
  assert first_stop([5, 6, 7], [2, 0]) == 3
  assert first_stop([0, 6], [2, 0]) == 0


def test_replayed_logits_agree_between_prefill_decode_and_generation():
  """The diagnosis replays a response through our model in one forward and token by token:
  both give the logits generation saw (float32 tiny model, padded buckets and all)."""
  from lsdist_jax.benchmark.fidelity import our_eos_hazards, our_logits
  from lsdist_jax.engine import Engine

  engine = Engine.load("tiny", dtype="float32")
  prompt = [1] + list(range(40, 70))
  sequence = prompt + list(range(100, 140))
  prefill = our_logits(engine, sequence, len(prompt), "prefill")
  decode = our_logits(engine, sequence, len(prompt), "decode")
  assert prefill.shape == decode.shape == (40, 256)
  np.testing.assert_allclose(decode, prefill, rtol=2e-4, atol=2e-4)
  last = np.asarray(engine.generator.last_logits([sequence[:len(prompt) + 7]]))[0]
  np.testing.assert_allclose(prefill[7], last, rtol=2e-4, atol=2e-4)
  hazards = our_eos_hazards(prefill, 1.0, 1.0, [2])
  assert hazards.shape == (40,) and ((hazards > 0) & (hazards < 1)).all()
  assert (our_eos_hazards(prefill, 0.6, 0.5, [2]) <= 1).all()


class _FakeHF:
  """generate(): each prompt's row repeated n times, then a response whose length is the
  prompt's last token id plus its sample number, ended by EOS (2) and padded (0)."""

  class generation_config:
    eos_token_id = 2

  def parameters(self):
    import torch
    yield torch.zeros(1)

  def generate(self, tokens, attention_mask, num_return_sequences, max_new_tokens, **_):
    import torch
    rows = []
    for row, mask in zip(tokens.tolist(), attention_mask.tolist()):
      assert mask == [0] * mask.count(0) + [1] * mask.count(1)  # left padding, masked
      for j in range(num_return_sequences):
        n = min(row[-1] + j, max_new_tokens)
        rows.append(row + [7] * n + [2] * (n < max_new_tokens))
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def test_hf_lengths_batches_prompts_and_returns_each_prompt_its_own_samples():
  pytest.importorskip("torch")
  from lsdist_jax.benchmark.fidelity import hf_lengths

  prompts = [[1, 5, 10], [1, 20], [1, 3, 4, 30], [1, 40], [1, 50]]
  got = hf_lengths(_FakeHF(), prompts, 3, temperature=0.6, top_p=0.9, max_new_tokens=45,
                   seed=0, batch_size=6, pad_id=0)  # 2 prompts x 3 samples a call
  assert got == [[10, 11, 12], [20, 21, 22], [30, 31, 32], [40, 41, 42], [45, 45, 45]]
  # more samples than a call holds: one prompt's samples over several calls
  assert hf_lengths(_FakeHF(), prompts[:1], 5, temperature=0.6, top_p=0.9, max_new_tokens=45,
                    seed=0, batch_size=2, pad_id=0) == [[10, 11, 10, 11, 10]]
