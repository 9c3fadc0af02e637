"""Planners and distribution maths (numpy): coverage, caps, budget, E[max], search and DP optimality."""

import dataclasses
import json

import numpy as np
import pytest

from lsdist_jax.schedule import CostModel, Options, Requests, dist, expected_cost, make_plan
from lsdist_jax.schedule.planners import SEARCH_THRESHOLDS, plan_recovery, plan_vbs

from conftest import random_requests  # noqa: E402




COST = CostModel(step=(1.0, 0.01, 1e-4, 0.0), prefill=(1.0, 1e-3), batch_overhead_ms=0.5,
                 batch_buckets=(1, 2, 4, 8, 16, 32, 64), prompt_bucket=16, cache_bucket=32)
OPTIONS = Options(kv_budget_tokens=64 * 160, max_batch=64, fixed_batch=16)
# An engine whose decode attention reads only unfinished rows' live cache (the Pallas kernel).
LIVE_COST = dataclasses.replace(COST, step=(1.0, 0.01, 0.0, 0.0, 2e-4))
ALL = ["vanilla", "sorted", "ssch", "vbs", "search", "optimal", "oracle"]


@pytest.fixture(scope="module")
def requests():
  return random_requests()


@pytest.mark.parametrize("name", ALL)
def test_every_request_in_exactly_one_batch_with_valid_caps(requests, name):
  plan = make_plan(name, requests, COST, OPTIONS)
  members = np.concatenate([b.members for b in plan.batches])
  assert sorted(members.tolist()) == list(range(requests.n))
  for b in plan.batches:
    assert 1 <= b.cap <= requests.room[b.members].max()


@pytest.mark.parametrize("name", ["vbs", "search", "optimal", "oracle", "ssch"])
def test_kv_budget_is_never_exceeded(requests, name):
  plan = make_plan(name, requests, COST, OPTIONS)
  for b in plan.batches:
    kv = int(COST.kv_tokens(len(b.members), requests.prompt_len[b.members].max(), b.cap))
    assert kv <= OPTIONS.kv_budget_tokens and len(b.members) <= OPTIONS.max_batch


def test_expected_batch_max_matches_monte_carlo():
  rng = np.random.default_rng(1)
  pmfs = rng.dirichlet(np.ones(41) * 0.3, size=6)
  draws = np.stack([rng.choice(41, size=200_000, p=p) for p in pmfs])
  for cap in (5, 20, 40):
    mc = np.minimum(draws.max(0), cap).mean()
    assert abs(dist.expected_steps(pmfs, cap) - mc) < 0.05
  np.testing.assert_allclose(dist.batch_max_pmf(pmfs),
                             np.bincount(draws.max(0), minlength=41) / draws.shape[1], atol=4e-3)


def test_tail_work_and_fail_prob_match_monte_carlo():
  rng = np.random.default_rng(2)
  pmf = rng.dirichlet(np.ones(31), size=3)
  draws = np.stack([rng.choice(31, size=100_000, p=p) for p in pmf])
  np.testing.assert_allclose(dist.tail_work(pmf, 12), np.maximum(draws - 12, 0).mean(1),
                             atol=0.05)
  np.testing.assert_allclose(dist.fail_prob(pmf, 12), (draws > 12).mean(1), atol=0.01)


def test_conditional_pmfs_sum_to_one_and_live_above_the_cap():
  rng = np.random.default_rng(3)
  pmf = rng.dirichlet(np.ones(21), size=5)
  pmf[0, 10:] = 0.0  # no predicted tail above 9
  above = np.array([12, 3, 0, 19, 20])
  cond = dist.conditional_above(pmf, above)
  np.testing.assert_allclose(cond.sum(1), 1.0)
  for row, a in enumerate(above):
    assert cond[row, :min(a + 1, 20)].sum() == pytest.approx(0.0) or a >= 20
  remaining = dist.shift_left(cond, above)
  np.testing.assert_allclose(remaining.sum(1), 1.0)


def test_quantiles_are_monotone_in_q(requests):
  qs = [dist.quantile(requests.length_pmf, q) for q in (0.1, 0.5, 0.9, 0.99)]
  assert all((a <= b).all() for a, b in zip(qs, qs[1:]))


def test_search_is_never_worse_than_any_fixed_threshold(requests):
  searched = make_plan("search", requests, COST, OPTIONS)
  for t in SEARCH_THRESHOLDS[::7]:
    fixed = plan_vbs(requests, COST, OPTIONS, threshold=float(t))
    assert searched.expected_cost <= expected_cost(fixed, requests, COST, OPTIONS) + 1e-9


@pytest.mark.parametrize("seed,cost", [(0, COST), (1, COST), (2, COST), (3, LIVE_COST)])
def test_optimal_is_never_worse_than_search(seed, cost):
  req = random_requests(n=200, seed=seed)
  searched = make_plan("search", req, cost, OPTIONS)
  optimal = make_plan("optimal", req, cost, OPTIONS)
  assert optimal.expected_cost <= searched.expected_cost + 1e-9


def test_expected_live_cache_work_matches_monte_carlo():
  from lsdist_jax.schedule.planners import _Prepared

  rng = np.random.default_rng(4)
  pmfs = rng.dirichlet(np.ones(61) * 0.4, size=5)
  req = Requests(np.array([3, 10, 25, 7, 40]), 200, pmfs)
  prep = _Prepared(req, LIVE_COST, OPTIONS)
  caps = np.array([[1, 7, 30, 60, 61]])
  got = prep.live_work(np.arange(5), caps)
  draws = np.stack([rng.choice(61, size=100_000, p=p) for p in pmfs])  # [5, draws]
  for j, cap in enumerate(caps[0]):
    m = np.minimum(draws, cap)  # steps i = 1..min(L, cap) each read prompt + i cache tokens
    mc = (m * req.prompt_len[:, None] + m * (m + 1) / 2).mean(axis=1)
    np.testing.assert_allclose(got[:, j], mc, rtol=0.02)


def test_live_cost_makes_finished_rows_cheap_so_plans_take_larger_batches(requests):
  """Under a live-token cost a finished row costs its batch only its GEMM row, so the planner
  fills the KV budget with fewer, larger batches than under a whole-cache cost."""
  plain = make_plan("optimal", requests, dataclasses.replace(COST, step=(1.0, 0.01, 4e-4, 0.0)),
                    OPTIONS)
  live = make_plan("optimal", requests, dataclasses.replace(COST, step=(1.0, 0.01, 0.0, 0.0, 4e-4)),
                   OPTIONS)
  assert len(live.batches) < len(plain.batches)
  for b in live.batches:
    assert int(COST.kv_tokens(len(b.members), requests.prompt_len[b.members].max(), b.cap)) \
        <= OPTIONS.kv_budget_tokens


def test_probabilistic_plans_beat_vanilla_in_expected_time(requests):
  costs = {n: make_plan(n, requests, COST, OPTIONS).expected_cost for n in
           ("vanilla", "search", "optimal", "oracle")}
  known = dataclasses.replace(requests, length_pmf=None)
  oracle_true = expected_cost(make_plan("oracle", requests, COST, OPTIONS), known, COST, OPTIONS)
  assert costs["search"] < costs["vanilla"]
  assert oracle_true <= expected_cost(make_plan("vanilla", requests, COST, OPTIONS), known, COST,
                                      OPTIONS)


def test_ssch_table_and_push_to_next_bucket():
  pmf = dist.point_masses(np.r_[np.full(300, 50), np.full(5, 150), np.full(5, 250)], 300)
  req = Requests(np.full(310, 10), 400, pmf)
  plan = make_plan("ssch", req, COST, Options(kv_budget_tokens=10**9, max_batch=512))
  sizes = [len(b.members) for b in plan.batches]
  # Bucket 100 (total 60; batch 256): one full batch, its last 44 rows (< 128) move on; bucket
  # 200 (44 + 5 rows < 128) moves on too; the last bucket, 300 (batch 128), takes all 54.
  assert sizes == [256, 54]
  assert plan.batches[0].cap == 100 + 8 - 10 and plan.batches[1].cap == 300 + 8 - 10


def test_recovery_plans_every_unfinished_row_once_within_the_budget(requests):
  unfinished = np.arange(0, requests.n, 3)
  generated = np.minimum(requests.room[unfinished] - 1, 20)
  known = dataclasses.replace(requests, length_pmf=None)  # the oracle's requests: no pmf
  # 3 * 64 rows: at the full cache (prompt block + room) only a batch that pads to a smaller
  # bucket fits, so the fixed recovery size must account for the padding.
  options = dataclasses.replace(OPTIONS, kv_budget_tokens=3 * 1000)
  for name, reqs in (("search", requests), ("ssch", requests), ("optimal", requests),
                     ("oracle", known)):
    for opts in (OPTIONS, options):
      batches = plan_recovery(name, reqs, unfinished, generated, COST, opts)
      got = np.concatenate([b.members for b in batches])
      assert sorted(got.tolist()) == unfinished.tolist()
      assert all(b.phase == "recovery" and b.cap >= 1 for b in batches)
      for b in batches:
        rows = np.searchsorted(unfinished, b.members)
        prompt = int((reqs.prompt_len[b.members] + generated[rows]).max())
        assert int(COST.kv_tokens(len(b.members), prompt, b.cap)) <= opts.kv_budget_tokens


@pytest.mark.parametrize("step", [(1.2, 0.004, 3e-5, 0.001, 0.0), (1.2, 0.004, 0.0, 0.0, 2e-5),
                                  (0.9, 0.002, 1e-5, 0.0, 3e-5)])
def test_cost_model_fit_recovers_coefficients_and_round_trips(tmp_path, step):
  truth = CostModel(step=step, prefill=(3.0, 2e-4))
  rows = [{"batch": b, "cache_len": s, "prompt_len": 32, "live_tokens": b * s * share,
           "ms_per_step": float(truth.step_time(b, s, b * s * share) * 1e3),
           "prefill_ms": float(truth.prefill_time(b, 32) * 1e3)}
          for b in (1, 8, 32, 128) for s in (128, 512, 1024) for share in (0.25, 0.75)]
  fitted = CostModel.fit(rows)
  np.testing.assert_allclose(fitted.step, truth.step, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(fitted.prefill, truth.prefill, rtol=1e-6)
  path = tmp_path / "cost.json"
  fitted.save(str(path))
  assert CostModel.load(str(path)) == fitted
  with pytest.raises(ValueError, match="unknown cost-model fields"):
    CostModel.from_json(json.dumps({"nope": 1}))


def test_cost_model_fit_from_the_slot_runners_calls_recovers_its_call_overhead():
  """Rows of `profile_slots`: decode rows time whole calls (call_ms), insert rows the whole
  insert call; the fit takes the calls' fixed cost as batch_overhead_ms and the prefill as what
  an insert costs beyond it, so that the simulator's insert (overhead + prefill) is the call."""
  truth = CostModel(step=(1.2, 0.004, 0.0, 0.0, 2e-5), prefill=(3.0, 2e-4),
                    batch_overhead_ms=7.5)
  decode = [{"batch": b, "cache_len": s, "live_tokens": b * s * share, "call_ms": 7.5,
             "ms_per_step": float(truth.step_time(b, s, b * s * share) * 1e3)}
            for b in (8, 32, 128) for s in (256, 1024) for share in (0.25, 1.0)]
  inserts = [{"batch": k, "prompt_len": p, "slots": 128, "cache_len": 1024,
              "prefill_ms": 7.5 + float(truth.prefill_time(k, p) * 1e3)}
             for k in (8, 32) for p in (128, 512)]
  fitted = CostModel.fit(decode + inserts)
  assert fitted.batch_overhead_ms == pytest.approx(7.5)
  np.testing.assert_allclose(fitted.step, truth.step, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(fitted.prefill, truth.prefill, rtol=1e-6)
  with pytest.raises(ValueError, match="at least 2 prefill"):
    CostModel.fit(decode)
  with pytest.raises(ValueError, match="at least 4 decode-step"):
    CostModel.fit(decode[:3] + inserts)
  # a model saved before the live-token term loads with that term at 0
  assert CostModel.from_json(json.dumps({"step": [1.0, 0.1, 1e-3, 0.0]})).step[4] == 0.0


def test_a_cost_model_from_another_device_or_model_is_named_in_a_warning(tmp_path, caplog):
  import logging
  import types

  from lsdist_jax.config import default_config
  from lsdist_jax.engine import device_kind, model_shape
  from lsdist_jax.serve.plan import load_cost_model

  from conftest import tiny_config

  engine = types.SimpleNamespace(config=tiny_config(), dtype="float32")
  here, shape = device_kind(), model_shape(engine)
  config = default_config()
  cases = [(here, shape, []), ("", "", []),  # "": unknown (models saved before these fields)
           ("Some Other GPU", shape, ["Some Other GPU"]),
           (here, "32 layers, hidden 4096", ["32 layers, hidden 4096"]),
           ("Some Other GPU", "another", ["Some Other GPU", "another"])]
  for i, (device, model, expected) in enumerate(cases):
    path = tmp_path / f"cost{i}.json"
    dataclasses.replace(COST, device=device, model=model).save(str(path))
    config.schedule.cost_model = str(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      cost = load_cost_model(config, engine=engine)
    assert (cost.device, cost.model) == (device, model)  # round-trips through the JSON
    reasons = cost.mismatches(here, shape)
    assert len(reasons) == len(expected)
    for reason, name in zip(reasons, expected):
      assert name in reason
    warned = [r.getMessage() for r in caplog.records if "cost model" in r.getMessage()]
    assert len(warned) == len(expected) and all(str(path) in w for w in warned)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # once per process: no second warning
      load_cost_model(config, engine=engine)
    assert not [r for r in caplog.records if "cost model" in r.getMessage()]


def test_bad_requests_are_named():
  with pytest.raises(ValueError, match="leaves no room"):
    Requests(np.array([5, 400]), 400)
  with pytest.raises(ValueError, match="unknown planner"):
    make_plan("fastest", random_requests(n=4), COST, OPTIONS)
  with pytest.raises(ValueError, match="oracle needs"):
    make_plan("oracle", Requests(np.array([5]), 100, np.ones((1, 11))), COST, OPTIONS)


def _capped(requests, caps):
  return Requests(requests.prompt_len, requests.max_seq_len, requests.length_pmf,
                  requests.scalar_length, requests.true_length, max_tokens=caps)


def test_max_tokens_truncates_each_pmf_at_its_own_cap(requests):
  caps = np.where(np.arange(requests.n) % 3 == 0, 8, 10_000)
  capped = _capped(requests, caps)
  pmf = requests.length_pmf
  for r in (0, 3, 1):
    c = min(caps[r], pmf.shape[1] - 1)
    want = np.concatenate([pmf[r, :c], [pmf[r, c:].sum()], np.zeros(pmf.shape[1] - c - 1)])
    np.testing.assert_allclose(capped.length_pmf[r], want, atol=1e-12)
  for q in (0.3, 0.6, 0.9):  # quantiles of min(L, cap) are the untruncated ones, capped
    assert (dist.quantile(capped.length_pmf, q)
            == np.minimum(dist.quantile(pmf, q), caps)).all()
  assert (capped.room == np.minimum(requests.room, caps)).all()
  assert (capped.true_length <= caps).all() and (capped.scalar_length <= caps).all()
  # E[steps] of a batch under the truncated pmfs: the untruncated one's with each row's cap
  # applied: E[min(max_i min(L_i, c_i), cap)], estimated from samples of the untruncated pmfs
  batch = np.arange(6)
  draws = np.stack([np.random.default_rng(r).choice(pmf.shape[1], 20000, p=pmf[r])
                    for r in batch])
  sampled = np.minimum(np.minimum(draws, caps[batch, None]).max(axis=0), 200).mean()
  assert abs(dist.expected_steps(capped.length_pmf[batch], 200) - sampled) < 0.02 * sampled + 0.5
  assert dist.expected_steps(capped.length_pmf[batch], 200) < dist.expected_steps(pmf[batch], 200)


@pytest.mark.parametrize("name", ALL)
def test_caps_past_every_length_change_no_plan_and_short_caps_plan_short(requests, name):
  loose = make_plan(name, _capped(requests, np.full(requests.n, 10_000)), COST, OPTIONS)
  plain = make_plan(name, requests, COST, OPTIONS)
  assert [b.members.tolist() for b in loose.batches] == [b.members.tolist() for b in plain.batches]
  assert [b.cap for b in loose.batches] == [b.cap for b in plain.batches]
  caps = np.where(np.arange(requests.n) % 3 == 0, 8, 10_000)
  capped = _capped(requests, caps)
  plan = make_plan(name, capped, COST, OPTIONS)
  assert sorted(plan.members().tolist()) == list(range(requests.n))
  for b in plan.batches:  # no batch is planned longer than its longest-allowed member
    assert 1 <= b.cap <= capped.room[b.members].max()
  if name in ("vbs", "search", "optimal", "sorted"):
    short = caps == 8
    cap_of = {int(m): b.cap for b in plan.batches for m in b.members}
    plain_cap_of = {int(m): b.cap for b in plain.batches for m in b.members}
    at = np.nonzero(short)[0]
    assert (np.mean([cap_of[m] for m in at]) < 0.5 * np.mean([plain_cap_of[m] for m in at]))
    assert (expected_cost(plan, capped, COST, OPTIONS)
            < expected_cost(plain, requests, COST, OPTIONS))


def test_the_plan_line_names_each_phase_its_refill_block_and_drain():
  from lsdist_jax.schedule.continuous import ContinuousPlan, Phase
  from lsdist_jax.serve.plan import describe_plan

  plan = ContinuousPlan([Phase([0, 1, 2], 256, 64, 8, drain=16),
                         Phase([3], 1024, 16, 2, block=64)], "continuous-search")
  line = describe_plan("continuous-search", plan, Options(kv_budget_tokens=65536))
  assert line == ("plan continuous-search: 2 phase(s): 64 slots x 256 refilled 8 at a time, "
                  "drains at 16 rows, 16 slots x 1024 refilled 2 at a time, inserts at block 64; "
                  "KV budget 65,536 tokens")
