"""The jitted decode loops: prefill, then one `lax.while_loop` of decode steps (a static batch
with a cap, or slot refill), and the prefill that only reads hidden states. Pure functions of
(params, arrays); `generator.py` compiles and calls them over bucketed shapes.

Length convention (see `lsdist_jax.config`): a row's length is the number of tokens it generated
before EOS (EOS excluded). A call's `cap` bounds the tokens a row may generate in this call; the
sample after the cap is taken only to see whether it is EOS (then the row finished exactly at the
cap); a row that reached the cap otherwise comes back unfinished, to be continued later.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lsdist_jax import sharding as shd
from lsdist_jax.llama.model import CACHE_AXES, Llama, init_cache, prefill_scanned
from lsdist_jax.llama import sampling


@dataclasses.dataclass
class DecodeResult:
  tokens: np.ndarray  # [B, G] int32, row b's generated tokens in [:num_generated[b]]
  num_generated: np.ndarray  # [B] int32 (EOS excluded)
  finished: np.ndarray  # [B] bool: ended with EOS
  hidden: np.ndarray | None  # [B, D] float32: hidden state at the last prompt token
  steps: int  # decode iterations run (model evaluations after prefill)


# On a mesh (`mesh` given): the cache keeps its layout (rows over `data`, kv heads over `model`)
# at every step, and sampling runs through `shard_map` on each device's own rows with the whole
# vocabulary (`sharding.rowwise`), so that a decode step moves only the model's tensor-parallel
# reductions and one gather of the vocab-split logits between devices.

def _keep_cache_layout(cache, mesh):
  """The cache constrained to its mesh layout (CACHE_AXES); unchanged without a mesh."""
  if mesh is None:
    return cache
  return jax.tree.map(
      lambda x: shd.constrain(x, shd.named_sharding(mesh, CACHE_AXES, x.shape)), cache)


def _choose_fn(mesh, batch: int):
  """`sampling.choose` over the batch's rows: on a mesh, per device (see above)."""
  return shd.rowwise(sampling.choose, mesh, batch, num_rows=8)


def generate_core(params, tokens, pad_len, request_ids, start_step, row_limit, active,
                   forced_len, cap, seed, temperature, top_p, *, model: Llama, cache_len: int,
                   hidden_layer: int, top_k_candidates: int, eos_ids: tuple[int, ...],
                   filler_id: int, mesh=None):
  """tokens: [B, P] left-padded prompts; per-row arrays [B] (row_limit: the most tokens the row
  may still generate: its room to max_seq_len or its own max_tokens); a scalar cap; per-row
  sampling settings seed [B] uint32, temperature [B] float32, top_p [B, 2]
  (`sampling.top_p_settings`).

  Returns (out_tokens [B, G], num_generated [B], finished [B], hidden [B, D], steps)."""
  b, p = tokens.shape
  g = cache_len - p
  cache = _keep_cache_layout(init_cache(model.config, b, cache_len, model.dtype), mesh)
  variables = {"params": params}
  logits, hidden, cache = model.apply(variables, tokens, cache, jnp.zeros((), jnp.int32), pad_len,
                                      logits_at="last", hidden_layers=(hidden_layer,))
  hidden_state = hidden[hidden_layer][:, -1].astype(jnp.float32)
  eos = jnp.asarray(eos_ids, jnp.int32)
  cap = jnp.minimum(cap, g)

  sample = _choose_fn(mesh, b)

  def choose(logits_last, i, live):
    return sample(logits_last, request_ids, start_step + i, forced_len, seed, temperature,
                  top_p, live, top_k_candidates=top_k_candidates, eos=eos, filler_id=filler_id)

  def update(state, tok, i):
    out, n_gen, done, finished = state
    is_eos = jnp.isin(tok, eos)
    newly_finished = ~done & is_eos
    accept = ~done & ~is_eos & (i < cap)
    column = jnp.where(accept, tok, 0)
    # Column g is scratch: the sample after the cap is never accepted.
    out = jax.lax.dynamic_update_slice(out, column[:, None], (jnp.zeros((), jnp.int32),
                                                              jnp.minimum(i, g)))
    n_gen = n_gen + accept.astype(jnp.int32)
    finished = finished | newly_finished
    done = done | newly_finished | (n_gen >= row_limit) | (i >= cap)
    return out, n_gen, done, finished

  out = jnp.zeros((b, g + 1), jnp.int32)
  n_gen = jnp.zeros((b,), jnp.int32)
  done = ~active | (row_limit <= 0)
  finished = jnp.zeros((b,), bool)
  tok = choose(logits[:, -1], jnp.zeros((), jnp.int32), ~done)
  state = update((out, n_gen, done, finished), tok, jnp.zeros((), jnp.int32))

  def cond(carry):
    return jnp.any(~carry[3][2])

  def body(carry):
    i, tok, cache, state = carry
    logits, _, cache = model.apply(variables, tok[:, None], cache, p + i - 1, pad_len,
                                   logits_at="last", active=~state[2])
    cache = _keep_cache_layout(cache, mesh)
    tok = choose(logits[:, -1], i, ~state[2])
    state = update(state, tok, i)
    return i + 1, tok, cache, state

  steps, _, _, state = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), tok, cache, state))
  out, n_gen, done, finished = state
  return out[:, :g], n_gen, finished, hidden_state, steps - 1


# ----------------------------------------------------------------------------------- slot refill
#
# Continuous decoding: B slots over one KV cache of S tokens per row. A request is *inserted*
# into a free slot (its prompt prefilled and its cache moved to the slot's start), then every
# decode step advances each unfinished slot by one token at its own cache position; when enough
# slots are free the host inserts the next requests. Sampling is keyed by (seed, request id,
# token index) as above, so a response is the same as from `generate_core`. An insert is two
# programs: `slot_insert` (prefill, cache move) and `slot_first` (the first token's sampling),
# so that the sampler is not compiled again into every (rows, context block) insert.
#
# State (a dict of device arrays, per slot [B]): cache; tok (the token to feed next); plen (the
# context length at insertion); rid, start (PRNG identity and tokens generated before this
# insertion); n_gen (accepted tokens in this slot); cap; limit (room to max_seq_len); forced
# (length replay, -1 off); done; finished (EOS); out [B, S + 1] (accepted tokens).


def slot_state(batch: int, cache_len: int, *, model: Llama) -> dict:
  zeros = jnp.zeros((batch,), jnp.int32)
  return {"cache": init_cache(model.config, batch, cache_len, model.dtype), "tok": zeros,
          "plen": jnp.ones((batch,), jnp.int32), "rid": jnp.zeros((batch,), jnp.uint32),
          "start": zeros, "n_gen": zeros, "cap": zeros, "limit": zeros,
          "forced": jnp.full((batch,), -1, jnp.int32), "done": jnp.ones((batch,), bool),
          "finished": jnp.zeros((batch,), bool),
          "out": jnp.zeros((batch, cache_len + 1), jnp.int32),
          "hidden": jnp.zeros((batch, model.config.hidden_size), jnp.float32)}


def slot_insert(params, state, slots, tokens, pad_len, source, *, model: Llama,
                hidden_layer: int = -1):
  """Prefills `tokens` ([u, P] left-padded contexts) and places row i (of k) in slot slots[i]
  (a slot index >= B drops the row: bucket padding), with the context of prefilled row
  source[i]: rows that share a context share its prefill (u <= k). Its cache moves to the
  slot's start, so the slot holds context position j at cache slot j. The hidden state of its
  last context token at `hidden_layer` goes to the slot's `hidden`. -> (state, logits [k, V]
  float32 after each inserted row's context), for `slot_first` to sample from: the sampler is
  a program of its own, so the many inserts (one per rows, context block and prefill rows)
  do not each compile it."""
  u, p = tokens.shape
  logits, hidden, small = _prefill(model, params, tokens, pad_len, hidden_layers=(hidden_layer,))
  pad_len = pad_len[source]  # [k]: each inserted row's
  # Row i's context sits at [pad_len[i], P): gather it to [0, P - pad_len[i]).
  src = jnp.minimum(jnp.arange(p)[None, :] + pad_len[:, None], p - 1)[:, None, :, None]
  cols = jnp.arange(p)[None, :]
  cache = []
  for layer, new in zip(state["cache"], small):
    moved = {}
    for name in ("k", "v"):
      # [k, P, KVH, Dh]: each inserted row's prefilled context
      rows = jnp.take_along_axis(new[name][source], src, axis=2).transpose(0, 2, 1, 3)
      moved[name] = layer[name].at[slots[:, None], :, cols].set(rows, mode="drop")
    cache.append(moved)
  plen = (p - pad_len).astype(jnp.int32)
  state = dict(state, cache=cache,
               plen=state["plen"].at[slots].set(plen, mode="drop"),
               hidden=state["hidden"].at[slots].set(
                   hidden[hidden_layer][source, -1].astype(jnp.float32), mode="drop"))
  return state, logits[source, -1].astype(jnp.float32)


def slot_first(state, logits, slots, request_ids, start_steps, caps, limits, forced_len, seed,
               temperature, top_p, *, top_k_candidates: int, eos_ids: tuple[int, ...],
               filler_id: int, mesh=None):
  """The first token of each row `slot_insert` placed (k rows, from its logits [k, V]), sampled
  with the row's own PRNG identity, and the rest of each slot's state: request id, start step,
  cap, limit, forced length, done, finished, accepted tokens. seed [k], temperature [k],
  top_p [k, 2]: the inserted rows' sampling settings."""
  k = slots.shape[0]
  s_len = state["out"].shape[1] - 1
  eos = jnp.asarray(eos_ids, jnp.int32)
  tok = _choose_fn(mesh, k)(logits, request_ids, start_steps, forced_len, seed, temperature,
                            top_p, jnp.ones((k,), bool), top_k_candidates=top_k_candidates,
                            eos=eos, filler_id=filler_id)
  is_eos = jnp.isin(tok, eos)
  accept = ~is_eos & (caps > 0) & (limits > 0)
  n_gen = accept.astype(jnp.int32)
  done = is_eos | (n_gen >= limits) | (caps <= 0)
  out_rows = jnp.zeros((k, s_len + 1), jnp.int32).at[:, 0].set(jnp.where(accept, tok, 0))

  def put(x, value):
    return x.at[slots].set(value.astype(x.dtype), mode="drop")

  return dict(state, tok=put(state["tok"], tok), rid=put(state["rid"], request_ids),
              start=put(state["start"], start_steps), n_gen=put(state["n_gen"], n_gen),
              cap=put(state["cap"], caps), limit=put(state["limit"], limits),
              forced=put(state["forced"], forced_len), done=put(state["done"], done),
              finished=put(state["finished"], is_eos), out=put(state["out"], out_rows))


def slot_decode(params, state, free_target, seed, temperature, top_p, *, model: Llama,
                 top_k_candidates: int, eos_ids: tuple[int, ...], filler_id: int, mesh=None):
  """Decode steps until at least `free_target` slots are done (or all are). seed [B],
  temperature [B], top_p [B, 2]: each slot's sampling settings. -> (state, steps)"""
  eos = jnp.asarray(eos_ids, jnp.int32)
  b = state["out"].shape[0]
  pad = jnp.zeros((b,), jnp.int32)
  sample = _choose_fn(mesh, b)

  def cond(carry):
    _, st = carry
    return (jnp.sum(st["done"]) < free_target) & jnp.any(~st["done"])

  def body(carry):
    steps, st = carry
    done, n_gen = st["done"], st["n_gen"]
    # The token fed now is the row's token n_gen - 1, at cache slot plen + n_gen - 1.
    where = jnp.maximum(st["plen"] + n_gen - 1, 0)
    logits, _, cache = model.apply({"params": params}, st["tok"][:, None], st["cache"], where, pad,
                                   logits_at="last", active=~done)
    cache = _keep_cache_layout(cache, mesh)
    tok = sample(logits[:, -1], st["rid"], st["start"] + n_gen, st["forced"], seed,
                 temperature, top_p, ~done, top_k_candidates=top_k_candidates, eos=eos,
                 filler_id=filler_id)
    return steps + 1, take_token(st, tok, cache, eos)

  steps, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
  return state, steps


def take_token(st: dict, tok, cache, eos) -> dict:
  """A decode step's tokens `tok` [B] into a slot state (with the step's `cache`): accepted
  where the row runs, is not at its cap and `tok` is not EOS; the row is done at EOS, its cap
  or its limit."""
  done, n_gen = st["done"], st["n_gen"]
  is_eos = jnp.isin(tok, eos)
  newly_finished = ~done & is_eos
  accept = ~done & ~is_eos & (n_gen < st["cap"])
  col = jnp.minimum(n_gen, st["out"].shape[1] - 1)
  # per row through vmap (no global row indices: each device writes its own rows on a mesh)
  out = jax.vmap(lambda row, at, ok, new: row.at[at].set(jnp.where(ok, new, row[at])))(
      st["out"], col, accept, tok)
  new_n = n_gen + accept.astype(jnp.int32)
  new_done = done | newly_finished | (new_n >= st["limit"]) | (n_gen >= st["cap"])
  return dict(st, cache=cache, tok=jnp.where(done, st["tok"], tok), n_gen=new_n, out=out,
              done=new_done, finished=st["finished"] | newly_finished)


def _prefill(model: Llama, params, tokens, pad_len, hidden_layers=()):
  """(logits at the last position, hidden, cache) of `tokens` prefilled into a fresh cache of
  their own length: the blocks unrolled, or as one scan with `model.scan_prefill`."""
  if model.scan_prefill:
    return prefill_scanned(model, params, tokens, pad_len, hidden_layers=hidden_layers)
  cache = init_cache(model.config, tokens.shape[0], tokens.shape[1], model.dtype)
  return model.apply({"params": params}, tokens, cache, jnp.zeros((), jnp.int32), pad_len,
                     logits_at="last", hidden_layers=hidden_layers)


def prefill_hidden(params, tokens, pad_len, *, model: Llama, hidden_layer: int):
  _, hidden, _ = _prefill(model, params, tokens, pad_len, hidden_layers=(hidden_layer,))
  return hidden[hidden_layer][:, -1].astype(jnp.float32)


def prefill_logits(params, tokens, pad_len, *, model: Llama):
  """The next-token logits after each prompt. tokens: [B, P] left-padded -> [B, V] float32."""
  logits, _, _ = _prefill(model, params, tokens, pad_len)
  return logits[:, -1].astype(jnp.float32)
