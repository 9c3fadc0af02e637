"""Continuous decoding over a paged KV pool: the jitted programs (`paged_insert`,
`paged_decode`; the first token is `decode.slot_first`'s) and `PagedBatch`, the host's handle
(`open_paged`). Rows hold pages of one pool of `pages` x `page` tokens, a page more each time
their context crosses a page boundary; the rules are `schedule/paged.py`'s, which the
simulator follows step for step:

* an insert gives each row ceil(context / page) pages (the host admits only rows that fit);
  its prefill holds rows x context block tokens of KV before paging them in, so a large insert
  runs as several calls, each within a quarter of the pool (`PagedBatch.insert_rows`);
* before each decode step the running rows whose next position starts a page ask for one; if
  the free pages do not cover them, running rows are preempted latest admission (`stamp`)
  first, each freeing its pages, until they do; a preempted row is done (and `preempted`) with
  the tokens it holds, for the host to continue later from its context;
* a row that is done frees its pages before the next step.

State (per slot [B] unless said): cache (per layer k, v [KVH, P, page, Dh]); pt [B, MP] (the
row's pages in order; P: none); held (pages the row holds); free [P] (bool); stamp;
preempted; and `decode.slot_state`'s tok, plen, rid, start, n_gen, cap, limit, forced, done,
finished, out [B, max_seq_len + 1], hidden.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsdist_jax import sharding as shd
from lsdist_jax.llama import decode, sampling
from lsdist_jax.llama.model import Llama
from lsdist_jax.llama.sampling import sampling_rows
from lsdist_jax.llama.slots import pad_rows, take_settings
from lsdist_jax.shapes import batch_bucket, round_up

# An insert call's prefill KV (rows x context block, every layer) stays within this share of
# the pool: 1/4, so that a pool sized at 70% of the free memory (kv_budget_tokens="auto")
# leaves room for it; larger inserts are split (`PagedBatch.insert_rows`).
INSERT_SHARE = 4


def table_width(max_seq_len: int, page: int) -> int:
  """MP: page-table entries per row (a power of two, for the kernel's block)."""
  need = -(-int(max_seq_len) // int(page))
  return 1 << (need - 1).bit_length()


def paged_state(batch: int, pages: int, page: int, max_seq_len: int, *, model: Llama) -> dict:
  cfg = model.config
  shape = (cfg.num_kv_heads, pages, page, cfg.head_dim)
  state = decode.slot_state(batch, max_seq_len, model=model)
  state.update(
      cache=[{"k": jnp.zeros(shape, model.dtype), "v": jnp.zeros(shape, model.dtype)}
             for _ in range(cfg.num_layers)],
      pt=jnp.full((batch, table_width(max_seq_len, page)), pages, jnp.int32),
      held=jnp.zeros((batch,), jnp.int32), free=jnp.ones((pages,), bool),
      stamp=jnp.zeros((batch,), jnp.int32), preempted=jnp.zeros((batch,), bool))
  return state


def _release(state: dict, rows) -> dict:
  """Frees the pages of `rows` ([B] bool)."""
  num_pages = state["free"].shape[0]
  width = state["pt"].shape[1]
  owned = rows[:, None] & (jnp.arange(width)[None, :] < state["held"][:, None])
  gone = jnp.where(owned, state["pt"], num_pages).reshape(-1)
  return dict(state, free=state["free"].at[gone].set(True, mode="drop"),
              pt=jnp.where(rows[:, None], num_pages, state["pt"]),
              held=jnp.where(rows, 0, state["held"]))


def paged_insert(params, state, slots, tokens, pad_len, source, stamps, *, model: Llama,
                 hidden_layer: int = -1):
  """Prefills `tokens` ([u, P] left-padded contexts) and places row i (of k) in slot slots[i]
  (>= B: bucket padding, dropped), with the context of prefilled row source[i], in
  ceil(context / page) pages taken from the free ones in order. -> (state, logits [k, V])."""
  kvh, num_pages, page, hd = state["cache"][0]["k"].shape
  b, width = state["pt"].shape
  p = tokens.shape[1]
  k = slots.shape[0]
  logits, hidden, small = decode._prefill(model, params, tokens, pad_len,
                                          hidden_layers=(hidden_layer,))
  pad_len = pad_len[source]
  real = slots < b
  ctx = jnp.where(real, p - pad_len, 0).astype(jnp.int32)
  need = (ctx + page - 1) // page
  most = k * (-(-p // page))
  free_pages = jnp.nonzero(state["free"], size=most, fill_value=num_pages)[0]
  offset = jnp.cumsum(need) - need
  cols = jnp.arange(width)[None, :]
  taken = cols < need[:, None]
  table = jnp.where(taken, free_pages[jnp.minimum(offset[:, None] + cols, most - 1)], num_pages)
  # context position j of row i -> pool position table[i, j // page] * page + j % page
  j = jnp.arange(p)[None, :]
  at = jnp.where(j < ctx[:, None],
                 table[jnp.arange(k)[:, None], jnp.minimum(j // page, width - 1)] * page
                 + j % page, num_pages * page).reshape(-1)
  src = jnp.minimum(j + pad_len[:, None], p - 1)[:, None, :, None]
  cache = []
  for layer, new in zip(state["cache"], small):
    moved = {}
    for name in ("k", "v"):
      rows = jnp.take_along_axis(new[name][source], src, axis=2)  # [k, KVH, P, Dh]
      flat = layer[name].reshape(kvh, num_pages * page, hd)
      flat = flat.at[:, at].set(rows.transpose(1, 0, 2, 3).reshape(kvh, k * p, hd)
                                .astype(flat.dtype), mode="drop")
      moved[name] = flat.reshape(kvh, num_pages, page, hd)
    cache.append(moved)
  state = dict(state, cache=cache,
               free=state["free"].at[jnp.where(taken, table, num_pages).reshape(-1)].set(
                   False, mode="drop"),
               pt=state["pt"].at[slots].set(table, mode="drop"),
               held=state["held"].at[slots].set(need, mode="drop"),
               stamp=state["stamp"].at[slots].set(stamps, mode="drop"),
               preempted=state["preempted"].at[slots].set(False, mode="drop"),
               plen=state["plen"].at[slots].set(ctx, mode="drop"),
               hidden=state["hidden"].at[slots].set(
                   hidden[hidden_layer][source, -1].astype(jnp.float32), mode="drop"))
  return state, logits[source, -1].astype(jnp.float32)


def _pages_for_step(state: dict) -> dict:
  """Frees the done rows' pages, preempts (latest stamp first) until the running rows that
  start a page now can each have one, and gives them theirs (in slot order)."""
  state = _release(state, state["done"] & (state["held"] > 0))
  num_pages = state["free"].shape[0]
  page = state["cache"][0]["k"].shape[2]
  running = ~state["done"]
  where = state["plen"] + state["n_gen"] - 1  # the position this step writes
  need = running & (where // page >= state["held"])
  short = jnp.sum(need) - jnp.sum(state["free"])
  order = jnp.argsort(jnp.where(running, -state["stamp"], jnp.iinfo(jnp.int32).max))
  gain = jnp.where(running, state["held"] + need, 0)[order]
  cut = jnp.sum(jnp.cumsum(gain) < short) + 1  # rows preempted: the shortest enough prefix
  out = jnp.zeros_like(running).at[order].set(jnp.arange(order.shape[0]) < cut)
  out = out & running & (short > 0)
  state = _release(dict(state, done=state["done"] | out,
                        preempted=state["preempted"] | out), out)
  need = need & ~out
  free_pages = jnp.nonzero(state["free"], size=need.shape[0], fill_value=num_pages)[0]
  given = jnp.where(need, free_pages[jnp.maximum(jnp.cumsum(need) - 1, 0)], num_pages)
  rows = jnp.arange(need.shape[0])
  return dict(state, free=state["free"].at[given].set(False, mode="drop"),
              pt=state["pt"].at[rows, jnp.where(need, state["held"], state["pt"].shape[1])].set(
                  given, mode="drop"),
              held=state["held"] + need.astype(jnp.int32))


def paged_decode(params, state, more, seed, temperature, top_p, *, model: Llama,
                 top_k_candidates: int, eos_ids: tuple[int, ...], filler_id: int):
  """Decode steps until `more` slots more than at the start are done (finished, at their
  limit, or preempted), or every slot is. -> (state, steps)"""
  eos = jnp.asarray(eos_ids, jnp.int32)
  b = state["out"].shape[0]
  pad = jnp.zeros((b,), jnp.int32)
  free_target = jnp.minimum(jnp.sum(state["done"]) + more, b)

  def cond(carry):
    _, st = carry
    return (jnp.sum(st["done"]) < free_target) & jnp.any(~st["done"])

  def body(carry):
    steps, st = carry
    st = _pages_for_step(st)
    done, n_gen = st["done"], st["n_gen"]
    where = jnp.maximum(st["plen"] + n_gen - 1, 0)
    logits, _, cache = model.apply({"params": params}, st["tok"][:, None], st["cache"], where,
                                   pad, logits_at="last", active=~done, pages=st["pt"])
    tok = sampling.choose(logits[:, -1], st["rid"], st["start"] + n_gen, st["forced"], seed,
                          temperature, top_p, ~done, top_k_candidates=top_k_candidates,
                          eos=eos, filler_id=filler_id)
    return steps + 1, decode.take_token(st, tok, cache, eos)

  steps, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
  return _release(state, state["done"] & (state["held"] > 0)), steps


@dataclasses.dataclass
class PagedRead:
  """What the host reads back after a decode call, per slot."""
  tokens: np.ndarray  # [B, max_seq_len + 1] accepted tokens in [:num_generated]
  num_generated: np.ndarray
  done: np.ndarray
  finished: np.ndarray
  preempted: np.ndarray
  free_pages: int


class PagedBatch:
  """Continuous decoding over a paged pool on one engine (no mesh): `insert` requests into free
  slots, `decode` until enough slots are free, `read` them back (`Generator` opens one with
  `open_paged(generator, ...)`)."""

  def __init__(self, generator, state: dict, slots: int, pages: int, page: int, *,
               max_seq_len: int, sampling: tuple, hidden_layer: int = -1):
    self.generator, self.state = generator, state
    self.slots, self.pages, self.page, self.max_seq_len = slots, pages, page, max_seq_len
    self.sampling, self.hidden_layer = sampling, hidden_layer

  def _fn(self, kind: str):
    """The jitted program `kind` (one per generator and hidden layer; each donates the
    state)."""
    gen = self.generator
    key = (kind, self.hidden_layer)
    if key not in gen._fns:
      sampler = dict(top_k_candidates=gen.top_k_candidates, eos_ids=gen.eos_ids,
                     filler_id=gen.filler_id)
      core, kw, donate = {
          "paged_insert": (paged_insert, dict(model=gen.model, hidden_layer=self.hidden_layer),
                           1),
          "paged_first": (decode.slot_first, sampler, 0),
          "paged_decode": (paged_decode, dict(sampler, model=gen.model), 1)}[kind]
      gen._fns[key] = jax.jit(lambda *a: core(*a, **kw), donate_argnums=(donate,))
    return gen._fns[key]

  def insert(self, slot_ids: Sequence[int], contexts: Sequence[Sequence[int]],
             request_ids: Sequence[int], start_steps: Sequence[int], stamps: Sequence[int],
             forced_lengths: Sequence[int] | None = None, min_rows: int = 0,
             max_new_tokens: Sequence[int] | None = None, seed=None, temperature=None,
             top_p=None) -> None:
    """Prefills `contexts` into the given free slots (as `SlotBatch.insert`; `stamps`: each
    row's admission order, which preemption follows). The host must have checked that the
    free pages hold them."""
    gen = self.generator
    n = len(contexts)
    if n == 0 or not len(slot_ids) == len(request_ids) == len(start_steps) == len(stamps) == n:
      raise ValueError("insert needs one slot, request id, start step and stamp per context")
    tokens, pad_len, _, _, p = gen._pack(list(contexts))
    lengths = np.array([len(c) for c in contexts], np.int32)
    if (lengths >= self.max_seq_len).any():
      raise ValueError(f"a context of {int(lengths.max())} tokens leaves no room in "
                       f"max_seq_len={self.max_seq_len}")
    p = gen.buckets.insert_block(p, round_up(self.max_seq_len, gen.buckets.cache))
    k = gen._rows_bucket(max(n, int(min_rows)))
    most = self.insert_rows(p)
    if k > most:  # in calls of `most` rows, in order
      per_row = dict(request_ids=request_ids, start_steps=start_steps, stamps=stamps,
                     forced_lengths=forced_lengths, max_new_tokens=max_new_tokens, seed=seed,
                     temperature=temperature, top_p=top_p)
      for i in range(0, n, most):
        part = {name: value if value is None or np.ndim(value) == 0 else value[i:i + most]
                for name, value in per_row.items()}
        self.insert(slot_ids[i:i + most], contexts[i:i + most], min_rows=most, **part)
      return
    tokens, pad_len = gen._pad_call(tokens, pad_len, k, p)
    slots = jnp.asarray(pad_rows(k, slot_ids, self.slots, np.int32))
    caps = pad_rows(k, self.max_seq_len - lengths, 0, np.int32)  # a row's cap is its room
    limits = caps.copy()
    if max_new_tokens is not None:
      limits[:n] = np.minimum(limits[:n], np.asarray(max_new_tokens, np.int32))
    settings = take_settings(self.sampling, slot_ids, k, seed, temperature, top_p)
    self.state, logits = gen._run(
        self._insert_name(k, p),
        self._fn("paged_insert"), gen.params, self.state, slots, jnp.asarray(tokens),
        jnp.asarray(pad_len), jnp.asarray(np.arange(k, dtype=np.int32)),
        jnp.asarray(pad_rows(k, stamps, 0, np.int32)))
    forced = pad_rows(k, [] if forced_lengths is None else forced_lengths, -1, np.int32)
    rows = [jnp.asarray(x) for x in (pad_rows(k, request_ids, 0, np.uint32),
                                     pad_rows(k, start_steps, 0, np.int32),
                                     caps, limits, forced)]
    self.state = gen._run(self._first_name(k),
                          self._fn("paged_first"), self.state, logits, slots, *rows,
                          *[jnp.asarray(x) for x in settings])

  def precompile(self, inserts: Sequence[tuple[int, int]]) -> int:
    """Starts compiling in the background (`Generator.precompile`) what this batch will run, in
    the order it needs it: the first of `inserts` ((rows as `insert` rounds them, a context
    block as `Buckets.insert_block` pads it)) and its first-token sampler, the decode loop,
    then the other inserts and samplers. Returns how many started."""
    gen = self.generator
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state)
    settings = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self.sampling]
    started, samplers = 0, set()
    for i, (rows, block) in enumerate(dict.fromkeys(
        (min(gen._rows_bucket(int(r)), self.insert_rows(int(b))), int(b)) for r, b in inserts)):
      # [rows] int32: the insert's slots, pad_len, source, stamps; the sampler's slots,
      # start steps, rooms, limits, forced lengths
      ints = [jax.ShapeDtypeStruct((rows,), np.int32)] * 5
      started += gen.precompile(self._insert_name(rows, block), self._fn("paged_insert"),
                                gen.params, state, ints[0],
                                jax.ShapeDtypeStruct((rows, block), np.int32), *ints[1:4])
      if rows not in samplers:
        samplers.add(rows)
        started += gen.precompile(
            self._first_name(rows), self._fn("paged_first"), state,
            jax.ShapeDtypeStruct((rows, gen.config.vocab_size), np.float32), ints[0],
            jax.ShapeDtypeStruct((rows,), np.uint32), *ints[1:],
            *[jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype) for x in settings])
      if i == 0:
        started += gen.precompile(self._decode_name(), self._fn("paged_decode"), gen.params,
                                  state, jax.ShapeDtypeStruct((), np.int32), *settings)
    return started

  def insert_rows(self, block: int) -> int:
    """The most rows one insert call of context block `block` runs at. Its prefill holds every
    layer's KV of rows x block tokens before they are paged in, so an insert of more is made in
    calls of this many rows, each within 1 / INSERT_SHARE of the pool's tokens (the smallest
    batch bucket at least). Rows are prefilled independently: the same tokens either way."""
    limit = self.pages * self.page // INSERT_SHARE
    fits = [b for b in self.generator.buckets.batch if b * int(block) <= limit]
    return max(fits) if fits else min(self.generator.buckets.batch)

  def _insert_name(self, rows: int, block: int) -> str:
    return f"paged_insert/{self.slots}/{self.pages}/{self.page}/{rows}/{block}/{self.hidden_layer}"

  def _first_name(self, rows: int) -> str:
    return f"paged_first/{self.slots}/{self.pages}/{self.page}/{rows}"

  def _decode_name(self) -> str:
    return f"paged_decode/{self.slots}/{self.pages}/{self.page}"

  def decode(self, more: int) -> int:
    """Decode steps until `more` more slots are done (or all are); returns the steps run."""
    gen = self.generator
    settings = [jnp.asarray(x) for x in self.sampling]
    self.state, steps = gen._run(self._decode_name(),
                                 self._fn("paged_decode"), gen.params, self.state,
                                 jnp.int32(more), *settings)
    return int(steps)

  def read(self) -> PagedRead:
    st = shd.to_host({k: self.state[k] for k in ("out", "n_gen", "done", "finished",
                                                 "preempted", "free")})
    return PagedRead(np.asarray(st["out"]), np.asarray(st["n_gen"]), np.asarray(st["done"]),
                     np.asarray(st["finished"]), np.asarray(st["preempted"]),
                     int(np.asarray(st["free"]).sum()))


def open_paged(generator, slots: int, pages: int, page: int, *, max_seq_len: int,
               seed: int = 0, temperature: float = 0.6, top_p: float = 0.9,
               hidden_layer: int = -1) -> PagedBatch:
  """A paged continuous batch of `slots` rows (a batch bucket) over a pool of `pages` pages of
  `page` tokens (one engine; not on a mesh)."""
  if generator.mesh is not None:
    raise ValueError("paged execution runs on one device, not on a mesh")
  if pages * page < max_seq_len:
    raise ValueError(f"a pool of {pages} pages of {page} tokens does not hold one row of "
                     f"max_seq_len={max_seq_len}")
  b = batch_bucket(int(slots), generator.buckets.batch)
  key = ("paged_state", b, int(pages), int(page), int(max_seq_len))
  if key not in generator._fns:
    generator._fns[key] = jax.jit(lambda: paged_state(b, int(pages), int(page),
                                                      int(max_seq_len), model=generator.model))
  return PagedBatch(generator, generator._fns[key](), b, int(pages), int(page),
                    max_seq_len=int(max_seq_len),
                    sampling=sampling_rows(b, b, seed, temperature, top_p),
                    hidden_layer=int(hidden_layer))
