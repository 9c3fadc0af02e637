"""Slot-refill (continuous) decoding on the tiny model: a request's response is the same whatever
slot, neighbours, insertion time or cache position it gets, and the same as `generate`'s."""

import jax.numpy as jnp
import numpy as np
import pytest

from lsdist_jax.llama.generator import Generator
from lsdist_jax.shapes import Buckets
from lsdist_jax.llama.model import Llama, init_cache

SAMPLING = dict(temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def generator(tiny_params):
  cfg, params = tiny_params
  return Generator(Llama(cfg, jnp.float32, jnp.float32), params,
                   buckets=Buckets(batch=(1, 2, 4, 8), prompt=8, cache=32))


def _prompts(n, seed=0, lo=3, hi=20):
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(3, 256, size=rng.integers(lo, hi)).tolist() for _ in range(n)]


def _static(generator, prompts, ids, cap=128, max_seq_len=128, forced=None):
  out = generator.generate(prompts, cap=cap, max_seq_len=max_seq_len, request_ids=ids,
                           forced_lengths=forced, **SAMPLING)
  return ([out.tokens[i, :out.num_generated[i]].tolist() for i in range(len(prompts))],
          out.finished.tolist())


def _continuous(generator, prompts, ids, phases, refill, max_seq_len=128, forced=None):
  """Runs the prompts through slot batches `phases` [(slots, cache_len)] in turn, refilling when
  `refill` slots are free; a row that reaches its slot's room moves to the front of the next
  phase's queue, continued from its context. -> (responses, finished, inserts)"""
  made = [[] for _ in prompts]
  finished = [False] * len(prompts)
  queue = list(range(len(prompts)))
  inserts = 0
  for slots, cache_len in phases:
    batch = generator.open_slots(slots, cache_len, max_seq_len=max_seq_len, **SAMPLING)
    occupant = [-1] * batch.slots
    carried = []
    while True:
      free = [j for j in range(batch.slots) if occupant[j] < 0]
      take = queue[:len(free)]
      del queue[:len(take)]
      if take:
        batch.insert(free[:len(take)], [prompts[r] + made[r] for r in take],
                     [ids[r] for r in take], [len(made[r]) for r in take],
                     None if forced is None else [forced[r] for r in take])
        inserts += 1
        for j, r in zip(free, take):
          occupant[j] = r
      if all(o < 0 for o in occupant):
        break
      batch.decode(refill if queue else batch.slots)
      read = batch.read()
      for j, r in enumerate(occupant):
        if r >= 0 and read.done[j]:
          made[r] += read.tokens[j, :read.num_generated[j]].tolist()
          finished[r] = bool(read.finished[j])
          occupant[j] = -1
          if not finished[r] and len(prompts[r]) + len(made[r]) < max_seq_len:
            carried.append(r)
    queue = carried
  assert not queue
  return made, finished, inserts


def test_per_row_write_index_equals_shared_index(tiny_params):
  cfg, params = tiny_params
  model = Llama(cfg, jnp.float32, jnp.float32)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(3, 256, size=(3, 9)))
  pad = jnp.zeros((3,), jnp.int32)
  _, _, cache = model.apply({"params": params}, tokens[:, :8], init_cache(cfg, 3, 16, jnp.float32),
                            jnp.int32(0), pad)
  shared, _, c1 = model.apply({"params": params}, tokens[:, 8:], cache, jnp.int32(8), pad)
  per_row, _, c2 = model.apply({"params": params}, tokens[:, 8:], cache,
                               jnp.full((3,), 8, jnp.int32), pad)
  np.testing.assert_allclose(np.asarray(per_row), np.asarray(shared), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(c2[0]["k"]), np.asarray(c1[0]["k"]))
  # A row at another position writes only its own slot.
  moved, _, c3 = model.apply({"params": params}, tokens[:, 8:], cache,
                             jnp.array([8, 3, 8], jnp.int32), pad)
  assert not np.allclose(np.asarray(c3[0]["k"][1, :, 3]), np.asarray(cache[0]["k"][1, :, 3]))
  np.testing.assert_array_equal(np.asarray(c3[0]["k"][::2]), np.asarray(c1[0]["k"][::2]))
  np.testing.assert_array_equal(np.asarray(c3[0]["k"][1, :, 8]), np.asarray(cache[0]["k"][1, :, 8]))
  np.testing.assert_allclose(np.asarray(moved[::2]), np.asarray(shared[::2]), rtol=1e-6,
                             atol=1e-6)


def test_refill_equals_generate(generator):
  prompts = _prompts(11, seed=1)
  ids = [100 + i for i in range(11)]
  expected, expected_fin = _static(generator, prompts, ids)
  got, fin, inserts = _continuous(generator, prompts, ids, [(4, 128)], refill=1)
  assert got == expected and fin == expected_fin
  assert inserts > 3  # slots were refilled while others were decoding
  assert len({len(r) for r in expected}) > 3


def test_rows_beyond_the_slot_room_continue_identically(generator):
  prompts = _prompts(6, seed=2)
  ids = list(range(6))
  forced = [5, 40, 70, 12, 90, 33]  # length replay: some outgrow a 64-token slot
  expected, _ = _static(generator, prompts, ids, cap=120, forced=forced)
  assert [len(r) for r in expected] == forced
  got, fin, _ = _continuous(generator, prompts, ids, [(2, 64), (4, 96), (2, 128)],
                              refill=1, forced=forced)
  assert got == expected and all(fin)


def test_max_seq_len_stops_a_row_unfinished(generator):
  prompts = _prompts(3, seed=4)
  forced = [200, 200, 2]
  got, fin, _ = _continuous(generator, prompts, [0, 1, 2], [(2, 64)], refill=2, max_seq_len=48,
                            forced=forced)
  for p, r, f, n in zip(prompts, got, fin, forced):
    assert len(r) == min(n, 48 - len(p)) and f == (n < 48 - len(p))


def test_insert_refuses_bad_input(generator):
  batch = generator.open_slots(2, 32, max_seq_len=128, **SAMPLING)
  with pytest.raises(ValueError, match="no room"):
    batch.insert([0], [[1] * 40], [0], [0])
  with pytest.raises(ValueError, match="distinct"):
    batch.insert([1, 1], [[1, 2], [1, 3]], [0, 1], [0, 0])
  with pytest.raises(ValueError, match="slot ids"):
    batch.insert([5], [[1, 2]], [0], [0])


def test_refill_through_the_pallas_kernel(tiny_params, generator):
  """Each slot reads only its own live slots [0, position] through the kernel (interpreted
  off GPUs): the same responses as the XLA path's `generate`."""
  cfg, params = tiny_params
  pallas = Generator(Llama(cfg, jnp.float32, jnp.float32, decode_impl="pallas"), params,
                     buckets=Buckets(batch=(2, 4), prompt=8, cache=32))
  prompts = _prompts(5, seed=6)
  forced = [3, 30, 12, -1, 20]
  expected, _ = _static(generator, prompts, list(range(5)), forced=forced)
  got, _, _ = _continuous(pallas, prompts, list(range(5)), [(2, 64), (2, 128)], refill=1,
                          forced=forced)
  assert got == expected


def test_padded_inserts_share_one_program_and_keep_hidden_states(generator):
  prompts = _prompts(7, seed=5, lo=3, hi=6)  # one context block
  ids = list(range(7))
  expected, _ = _static(generator, prompts, ids)
  batch = generator.open_slots(8, 128, max_seq_len=128, hidden_layer=-1, **SAMPLING)
  before = len(generator._executables)
  for group in ([0], [1, 2], [3, 4, 5], [6]):  # 1, 2, 3 and 1 rows: buckets 1, 2, 4 unpadded
    batch.insert(group, [prompts[r] for r in group], [ids[r] for r in group], [0] * len(group),
                 min_rows=4)
  assert len(generator._executables) - before == 2  # the insert and its first-token sampling
  np.testing.assert_allclose(batch.hidden(range(7)), generator.embed(prompts), rtol=1e-4,
                             atol=1e-5)
  batch.decode(batch.slots)
  read = batch.read()
  assert [read.tokens[j, :read.num_generated[j]].tolist() for j in range(7)] == expected


def test_per_slot_settings_give_each_request_its_static_run(generator):
  """Each insert gives its rows their own temperature, top-p, seed and max_new_tokens; a slot
  keeps them while its neighbours are refilled with others."""
  prompts = _prompts(6, seed=21)
  settings = dict(temperature=[0.0, 0.7, 1.3, 0.9, 1.0, 0.5],
                  top_p=[0.9, 1.0, 0.5, 0.95, 0.8, 1.0], seed=[3, 7, 7, 99, 0, 11])
  limits = [40, 5, 40, 17, 40, 2]
  want = []
  for r, p in enumerate(prompts):
    out = generator.generate([p], cap=60, max_seq_len=128, request_ids=[r],
                             max_new_tokens=[limits[r]], **{k: v[r] for k, v in settings.items()})
    want.append(out.tokens[0, :out.num_generated[0]].tolist())
  batch = generator.open_slots(2, 128, max_seq_len=128, **SAMPLING)
  made = [None] * 6
  queue, occupant = list(range(6)), [-1, -1]
  while queue or any(o >= 0 for o in occupant):
    free = [j for j in range(2) if occupant[j] < 0]
    take = queue[:len(free)]
    del queue[:len(take)]
    if take:
      batch.insert(free[:len(take)], [prompts[r] for r in take], take, [0] * len(take),
                   max_new_tokens=[limits[r] for r in take],
                   **{k: [v[r] for r in take] for k, v in settings.items()})
      for j, r in zip(free, take):
        occupant[j] = r
    batch.decode(1 if queue else batch.slots)  # free slots count as done
    read = batch.read()
    for j, r in enumerate(occupant):
      if r >= 0 and read.done[j]:
        made[r] = read.tokens[j, :read.num_generated[j]].tolist()
        occupant[j] = -1
  assert made == want
  assert len(made[5]) <= 2 and len(made[1]) <= 5


def test_equal_contexts_share_one_prefill_and_give_each_requests_own_tokens(generator):
  """n choices of one prompt inserted together are prefilled once (at the bucket of the distinct
  contexts) and their caches copied; each still samples with its own request id, and gets the
  tokens a separate run of it gets, its hidden state too."""
  two = _prompts(2, seed=31)
  prompts = [two[0]] * 3 + [two[1]] * 3 + [two[0]]  # 7 rows, 2 distinct contexts
  ids = list(range(7))
  expected, _ = _static(generator, prompts, ids)
  assert len({tuple(t) for t in expected[:3]}) > 1  # the choices differ: their own PRNG
  got = {}
  for share in (False, True):
    batch = generator.open_slots(8, 128, max_seq_len=128, **SAMPLING)
    before = set(generator._executables)
    batch.insert(list(range(7)), prompts, ids, [0] * 7, share_prefill=share)
    names = [key[0] for key in set(generator._executables) - before]
    batch.decode(batch.slots)
    read = batch.read()
    got[share] = ([read.tokens[j, :read.num_generated[j]].tolist() for j in range(7)],
                  batch.hidden(range(7)), batch.prefilled_rows, names)
  assert got[True][0] == got[False][0] == expected
  np.testing.assert_allclose(got[True][1], got[False][1], rtol=1e-5, atol=1e-6)
  assert (got[False][2], got[True][2]) == (8, 4)  # rows prefilled: 8, then half of them
  assert any(name.endswith("/shared4") for name in got[True][3]), got[True][3]


def test_scanned_prefill_equals_the_unrolled_one(tiny_params):
  from lsdist_jax.llama.model import prefill_scanned

  cfg, params = tiny_params
  model = Llama(cfg, jnp.float32, jnp.float32)
  rng = np.random.default_rng(4)
  tokens = jnp.asarray(rng.integers(3, 256, size=(3, 12)))
  pad = jnp.array([0, 4, 9], jnp.int32)
  layers = (0, cfg.num_layers - 1, -1)
  for at in ("last", "all"):
    want = model.apply({"params": params}, tokens, init_cache(cfg, 3, 12, jnp.float32),
                       jnp.int32(0), pad, logits_at=at, hidden_layers=layers, hidden_at=at)
    got = prefill_scanned(model, params, tokens, pad, logits_at=at, hidden_layers=layers,
                          hidden_at=at)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert sorted(got[1]) == sorted(want[1])
    for k in layers:
      np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-5, atol=1e-5)
    assert len(got[2]) == cfg.num_layers
    for a, b in zip(got[2], want[2]):
      np.testing.assert_allclose(a["k"], b["k"], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(a["v"], b["v"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="hidden layer"):
    prefill_scanned(model, params, tokens, pad, hidden_layers=(cfg.num_layers,))


def test_refill_with_scanned_prefills_gives_the_same_responses(tiny_params, generator):
  cfg, params = tiny_params
  scanned = Generator(Llama(cfg, jnp.float32, jnp.float32, scan_prefill=True), params,
                      buckets=Buckets(batch=(1, 2, 4, 8), prompt=8, cache=32))
  prompts = _prompts(9, seed=6)
  ids = [300 + i for i in range(9)]
  expected, expected_fin = _continuous(generator, prompts, ids, [(4, 128)], refill=2)[:2]
  got, fin, _ = _continuous(scanned, prompts, ids, [(4, 128)], refill=2)
  assert got == expected and fin == expected_fin
  np.testing.assert_allclose(scanned.embed(prompts), generator.embed(prompts), rtol=1e-4,
                             atol=1e-5)
