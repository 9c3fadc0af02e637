"""The sampler alone (llama/sampling.py): per-request uniforms, top-k, greedy, the nucleus rule
and its equality with transformers' temperature + top-p warpers, and the tiered draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from lsdist_jax.llama import sampling
from lsdist_jax.llama.sampling import nucleus_mask, nucleus_size, sample_tokens, top_p_setting

TEMPERATURES = (0.6, 1.0, 1.3)
TOP_PS = (0.5, 0.9, 0.95, 1.0)


def test_request_uniforms_depend_on_seed_request_and_step_only():
  rids, steps = np.array([3, 9, 3, 5], np.uint32), np.array([0, 4, 0, 7], np.int32)
  u = np.asarray(sampling.request_uniforms(jnp.uint32(11), jnp.asarray(rids), jnp.asarray(steps)))
  assert u[0] == u[2]  # same (seed, request, step) in another row of the batch
  alone = sampling.request_uniforms(jnp.uint32(11), jnp.asarray(rids[1:2]), jnp.asarray(steps[1:2]))
  assert float(alone[0]) == u[1]
  other_seed = sampling.request_uniforms(jnp.uint32(12), jnp.asarray(rids), jnp.asarray(steps))
  other_step = sampling.request_uniforms(jnp.uint32(11), jnp.asarray(rids), jnp.asarray(steps + 1))
  assert (np.asarray(other_seed) != u).all() and (np.asarray(other_step) != u).all()
  assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 3


def _reference_nucleus_pick(probs, top_p, u):
  order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
  cum, keep = 0.0, []
  for i in order:
    keep.append(i)
    cum += probs[i]
    if cum >= top_p:
      break
  mass = sum(probs[i] for i in keep)
  acc = 0.0
  for i in keep:
    acc += probs[i]
    if acc >= u * mass:
      return i, set(keep)
  return keep[-1], set(keep)


@pytest.mark.parametrize("top_k_candidates,hard_rows", [(4, 2), (4, 64), (16, 64), (64, 64)],
                         ids=["rounds", "gather-hard-rows", "mixed", "top-k-only"])
def test_top_p_keeps_exactly_the_smallest_set_reaching_p(top_k_candidates, hard_rows):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 50)).astype(np.float32) * 2.0
  u = rng.uniform(size=64).astype(np.float32)
  top_p = 0.8
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float64)
  got = np.asarray(sample_tokens(jnp.asarray(logits), jnp.asarray(u), jnp.float32(1.0),
                                 jnp.float32(top_p), top_k_candidates, hard_rows))
  for row in range(64):
    want, keep = _reference_nucleus_pick(probs[row].tolist(), top_p, float(u[row]))
    assert got[row] in keep
    assert got[row] == want
    # The set is the smallest: dropping its least likely member falls below p.
    kept = sorted(probs[row][list(keep)], reverse=True)
    assert sum(kept) >= top_p - 1e-6 and sum(kept[:-1]) < top_p + 1e-6
  sizes = np.asarray(nucleus_size(jnp.asarray(-np.sort(-probs, -1), jnp.float32), top_p))
  assert all(sizes[r] == len(_reference_nucleus_pick(probs[r].tolist(), top_p, 0.5)[1])
             for r in range(64))


def test_greedy_is_argmax():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(5, 30)), jnp.float32)
  got = sample_tokens(logits, jnp.full((5,), 0.3), jnp.float32(0.0), jnp.float32(0.9))
  assert np.array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("levels", [None, 3], ids=["distinct", "many-ties"])
def test_chunked_top_k_equals_lax_top_k(levels):
  from lsdist_jax.llama.sampling import top_k

  rng = np.random.default_rng(9)
  values = rng.normal(size=(16, 5000)).astype(np.float32)
  if levels:  # heavy ties across chunks: the lower index must still win
    values = np.floor(values * levels) / levels
  values[3, 4990:] = 50.0  # the top of one row sits in the last, partial chunk
  want_v, want_i = jax.lax.top_k(jnp.asarray(values), 16)
  got_v, got_i = top_k(jnp.asarray(values), 16, chunk=64)
  np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
  np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))


# ------------------------------------------------------------------ equality with transformers

def _stable_sort(*args, **kwargs):
  kwargs["stable"] = True
  return _TORCH_SORT(*args, **kwargs)


_TORCH_SORT = torch.sort
_TORCH_SOFTMAX = torch.Tensor.softmax


def _float64_softmax(self, dim=-1, *args, **kwargs):
  return _TORCH_SOFTMAX(self.double(), dim).float()


def hf_kept(logits, temperature, top_p, stable=True, accurate_softmax=False):
  """transformers' kept set on float32 logits: the warpers `generate` adds for these settings.
  stable: torch's sort made stable (the order CUDA gives ties; CPU leaves it unspecified).
  accurate_softmax: the warper's float32 softmax taken in float64 (torch's CPU softmax uses an
  approximate exp)."""
  scores = torch.from_numpy(np.asarray(logits, np.float32))
  saved = torch.sort, torch.Tensor.softmax
  if stable:
    torch.sort = _stable_sort
  if accurate_softmax:
    torch.Tensor.softmax = _float64_softmax
  try:
    if temperature != 1.0:
      scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
      scores = TopPLogitsWarper(top_p)(None, scores)
  finally:
    torch.sort, torch.Tensor.softmax = saved
  return np.isfinite(scores.numpy())


_mask = jax.jit(nucleus_mask, static_argnums=3)
_sample = jax.jit(sample_tokens, static_argnums=(4, 5, 6))
_sample_active = jax.jit(lambda *a, active: sample_tokens(*a, active=active),
                         static_argnums=(4, 5, 6))


def ours_kept(logits, temperature, top_p, top_k_candidates=16):
  return np.asarray(_mask(jnp.asarray(logits), jnp.float32(temperature),
                          jnp.asarray(top_p_setting(top_p)), top_k_candidates))


def _random_logits(rng, rows, vocab, scale, ties):
  logits = (rng.normal(size=(rows, vocab)) * scale).astype(np.float32)
  if ties:  # exact ties everywhere, -0.0 beside 0.0 included
    logits = (np.round(logits * 2) / 2).astype(np.float32)
  return logits


@pytest.mark.parametrize("vocab", [50, 1000])
def test_nucleus_is_the_set_transformers_warpers_keep(vocab):
  """Every row, every setting: the same kept set as transformers' warpers (ties ordered as
  torch's stable sort orders them). Without the stable sort the sets still hold the same
  probabilities: only which of equal tokens is kept may differ."""
  rng = np.random.default_rng(vocab)
  checked = 0
  for scale in (1.0, 3.0, 8.0):
    for ties in (False, True):
      logits = _random_logits(rng, 64, vocab, scale, ties)
      for t in TEMPERATURES:
        for p in TOP_PS:
          ours = ours_kept(logits, t, p)
          hf = hf_kept(logits, t, p)
          differ = np.nonzero((ours != hf).any(-1))[0]
          assert differ.size == 0, (scale, ties, t, p, differ[:5])
          unstable = hf_kept(logits, t, p, stable=False)
          for row in range(0, 64, 7):
            np.testing.assert_array_equal(np.sort(logits[row][ours[row]]),
                                          np.sort(logits[row][unstable[row]]))
          checked += 64
          if p < 1.0:
            assert ours.sum(-1).min() >= 1 and (ours.sum(-1) < vocab).any()
  assert checked == 3 * 2 * len(TEMPERATURES) * len(TOP_PS) * 64


def test_wide_vocabulary_nucleus_is_transformers_set_to_float32_rounding():
  """SmolLM2's vocabulary width, flat rows (nuclei of thousands of tokens): the boundary tail is
  summed exactly enough that the set is transformers' on every row, given the warper an accurate
  softmax. A float32 running sum from the top (the former rule) missed on such rows."""
  rng = np.random.default_rng(7)
  vocab = 49152
  for scale, ties in ((1.0, False), (1.0, True), (3.0, False)):
    logits = _random_logits(rng, 8, vocab, scale, ties)
    for t in TEMPERATURES:
      for p in TOP_PS[:3]:
        ours = ours_kept(logits, t, p)
        hf = hf_kept(logits, t, p, accurate_softmax=True)
        assert (ours == hf).all(), (scale, ties, t, p, ours.sum(-1) - hf.sum(-1))
        assert ours.sum(-1).max() > 1000 or scale > 1.0


def test_top_p_setting_is_transformers_threshold_not_float32_complement():
  """transformers drops a token when its tail mass <= 1 - top_p taken in float64, then compared
  in float32: at top_p 0.9 that is float32(0.1), 2.2e-8 under 1 - float32(0.9). A two-token row
  whose small probability lies between the two is kept whole by transformers."""
  assert top_p_setting(0.9)[1] == np.float32(0.1) != np.float32(1) - np.float32(0.9)
  small = 0.1000000125
  logits = np.array([[np.log(1 - small), np.log(small)]], np.float32)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))[0]
  assert np.float32(0.1) < probs[1] <= np.float32(1) - np.float32(0.9)
  assert hf_kept(logits, 1.0, 0.9).all()
  assert ours_kept(logits, 1.0, 0.9).all()
  bare = np.asarray(nucleus_mask(jnp.asarray(logits), jnp.float32(1.0), jnp.float32(0.9)))
  assert bare.tolist() == [[True, False]]


def test_nucleus_keeps_the_top_token_and_greedy_keeps_only_the_argmax():
  logits = _random_logits(np.random.default_rng(3), 16, 300, 1.0, ties=True)
  tiny_p = ours_kept(logits, 1.0, 1e-6)
  assert (tiny_p.sum(-1) == 1).all() and (tiny_p == hf_kept(logits, 1.0, 1e-6)).all()
  greedy = np.asarray(nucleus_mask(jnp.asarray(logits), jnp.float32(0.0),
                                   jnp.asarray(top_p_setting(0.9))))
  assert (greedy.sum(-1) == 1).all() and (greedy.argmax(-1) == logits.argmax(-1)).all()
  logits[:, :5] = -np.inf
  assert not ours_kept(logits, 1.0, 1.0)[:, :5].any() and ours_kept(logits, 1.0, 1.0)[:, 5:].all()


@pytest.mark.parametrize("vocab", [1000, 5000])
def test_draws_lie_in_the_nucleus_and_tiers_agree_with_a_full_sort(vocab):
  """Rows of every width (peaked to flat, with ties) drawn at many uniforms: each token is in the
  rule's mask, and the tiered sampler (top-k candidates, wide rows gathered in one round or
  several) draws the very token of a full sort (k = vocab)."""
  rng = np.random.default_rng(vocab + 1)
  rows, draws = 24, 16
  scale = np.geomspace(0.3, 12.0, rows).astype(np.float32)[:, None]
  logits = (rng.normal(size=(rows, vocab)).astype(np.float32) * scale)
  logits[::3] = np.round(logits[::3] * 2) / 2
  tiled = jnp.asarray(np.repeat(logits, draws, axis=0))
  u = jnp.asarray(rng.uniform(size=rows * draws).astype(np.float32))
  for t, p in ((0.6, 0.9), (1.3, 0.5), (1.0, 0.95), (1.0, 1.0), (0.0, 0.9)):
    setting = jnp.asarray(top_p_setting(p))
    full = np.asarray(_sample(tiled, u, jnp.float32(t), setting, vocab, rows * draws))
    mask = np.repeat(np.asarray(_mask(jnp.asarray(logits), jnp.float32(t), setting, 16)),
                     draws, axis=0)
    assert mask[np.arange(rows * draws), full].all(), (t, p)
    # wide rows gathered in one round or several; searched among at most `mid` tokens, the
    # rest sorted
    # (mid 0: no search, every wide row sorted, the CPU's default); the small vocabulary takes
    # the search past its few candidates, the large one the search as accelerators run it
    combos = {1000: ((4, 8, 8), (4, 1000, 24), (16, 64, 0)),
              5000: ((4, 8, 1024), (4, 1000, 1024))}[vocab]
    for k, hard, mid in combos:
      tiered = np.asarray(_sample(tiled, u, jnp.float32(t), setting, k, hard, mid))
      np.testing.assert_array_equal(tiered, full,
                                    err_msg=f"T={t} p={p} k={k} hard={hard} mid={mid}")
    if 0 < p < 1 and t > 0:  # both tiers were exercised: narrow rows and rows past 16 tokens
      sizes = mask[::draws].sum(-1)
      assert sizes.min() <= 4 and sizes.max() > 16
      assert len(set(full.tolist())) > rows


@pytest.mark.parametrize("top_k_candidates,hard_rows", [(4, 2), (16, 64)],
                         ids=["rounds", "mixed"])
def test_per_row_settings_equal_each_row_drawn_with_its_own(top_k_candidates, hard_rows):
  """Temperature and top-p per row ([B], [B, 2]): every row, greedy and top-p 1.0 rows among
  nucleus ones, draws what it draws alone with its scalar settings; the kept sets too."""
  rng = np.random.default_rng(31)
  logits = _random_logits(rng, 12, 300, 2.0, ties=False)
  u = rng.uniform(size=12).astype(np.float32)
  temperature = np.array([0.0, 0.6, 1.0, 1.3] * 3, np.float32)
  top_p = [1.0, 0.5, 0.9, 0.95, 1.0, 0.3, 0.99, 1.0, 0.8, 0.9, 1.0, 0.7]
  pairs = jnp.asarray(sampling.top_p_settings(top_p))
  got = np.asarray(_sample(jnp.asarray(logits), jnp.asarray(u), jnp.asarray(temperature), pairs,
                           top_k_candidates, hard_rows))
  kept = np.asarray(_mask(jnp.asarray(logits), jnp.asarray(temperature), pairs, 16))
  for row in range(12):
    alone = _sample(jnp.asarray(logits[row:row + 1]), jnp.asarray(u[row:row + 1]),
                    jnp.float32(temperature[row]), jnp.asarray(top_p_setting(top_p[row])),
                    top_k_candidates, hard_rows)
    assert got[row] == int(alone[0]), row
    assert (kept[row] == ours_kept(logits[row:row + 1], float(temperature[row]),
                                   top_p[row])[0]).all()
  # every row of d <= 0 alone, and none: the single-kind branches agree with the mixed one
  every = [r for r in range(12) if top_p[r] >= 1.0]
  only = np.asarray(_sample(jnp.asarray(logits[every]), jnp.asarray(u[every]),
                            jnp.asarray(temperature[every]), pairs[np.array(every)],
                            top_k_candidates, hard_rows))
  assert (only == got[every]).all()


def test_inactive_rows_are_never_searched_and_leave_active_rows_unchanged():
  """Rows marked inactive (finished rows of a decode loop, whose logits may be flat) do not
  count as wide: with more flat inactive rows than the gathered tier holds, the active rows
  still draw exactly what they draw alone, whichever tier the call takes."""
  rng = np.random.default_rng(7)
  rows, vocab = 16, 400
  logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3.0
  logits[8:] = rng.normal(size=(8, vocab)).astype(np.float32) * 0.01  # flat: all wide
  u = jnp.asarray(rng.uniform(size=rows).astype(np.float32))
  setting = jnp.asarray(top_p_setting(0.9))
  active = np.arange(rows) < 8
  got = np.asarray(_sample_active(jnp.asarray(logits), u, jnp.float32(0.7), setting, 4, 2, 0,
                                  active=jnp.asarray(active)))
  alone = np.asarray(_sample(jnp.asarray(logits[:8]), u[:8], jnp.float32(0.7), setting, 4, 2, 0))
  full = np.asarray(_sample(jnp.asarray(logits), u, jnp.float32(0.7), setting, vocab, rows, 0))
  np.testing.assert_array_equal(got[:8], alone)
  np.testing.assert_array_equal(got[:8], full[:8])
  assert ((got >= 0) & (got < vocab)).all()
