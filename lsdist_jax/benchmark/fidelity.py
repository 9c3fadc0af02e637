"""Sampling fidelity against transformers: the response-length distributions of our Engine and of
transformers' `generate` (torch) on the same GGUF, chat-formatted prompt ids and settings.

`run_fidelity` samples both and compares, per prompt, each transformers length with our
empirical length distribution (mid-PIT: ties count half; its mean is 0.5 when the two agree),
the pooled lengths by a two-sample KS test, and the shares at the cap; it also says how
transformers loaded the model and which ids stop each side. With `diagnose_rows`, it replays some
transformers responses through both models (one forward, and token by token over the KV cache
as generation runs) and compares the EOS probability that each gives at every position after
temperature and top-p (the hazard that decides lengths): a difference of the models' numerics
shows there, one of sampling does not. `launch/fidelity.py` is its command
line. Runs on CPU with small sizes; meaningful figures need a GPU.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import time
from typing import Sequence

import numpy as np


# ------------------------------------------------------------------------------- statistics

def mid_pit(reference: Sequence[int], values: Sequence[int]) -> np.ndarray:
  """PIT of each value under the empirical CDF of `reference`, ties counted half:
  (#reference < v + #reference == v / 2) / n. Its mean is 0.5 when values and reference come
  from one distribution (discrete ones too)."""
  ref = np.sort(np.asarray(reference))
  values = np.asarray(values)
  below = np.searchsorted(ref, values, side="left")
  at_or_below = np.searchsorted(ref, values, side="right")
  return (below + at_or_below) / (2.0 * len(ref))


def compare_lengths(ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]],
                    cap: int) -> dict:
  """Per-prompt length samples of ours and of the reference (transformers) -> the figures:
  pit_mean (the reference's lengths under our per-prompt CDFs; > 0.5: theirs are longer) with
  its standard error over prompts, pit_mean_reverse, the KS two-sample p-value of the pooled
  lengths, shares at the cap, mean lengths."""
  from scipy import stats

  if len(ours) != len(theirs) or not len(ours):
    raise ValueError(f"need the same prompts on both sides, got {len(ours)} and {len(theirs)}")
  per_prompt = np.array([mid_pit(o, t).mean() for o, t in zip(ours, theirs)])
  reverse = np.array([mid_pit(t, o).mean() for o, t in zip(ours, theirs)])
  pooled_ours = np.concatenate([np.asarray(o) for o in ours])
  pooled_theirs = np.concatenate([np.asarray(t) for t in theirs])
  se = per_prompt.std(ddof=1) / np.sqrt(len(per_prompt)) if len(per_prompt) > 1 else None
  return {
      "pit_mean": float(per_prompt.mean()),
      "pit_se": None if se is None else float(se),
      "pit_mean_reverse": float(reverse.mean()),
      "ks_pvalue": float(stats.ks_2samp(pooled_ours, pooled_theirs).pvalue),
      "share_at_cap_ours": float(np.mean(pooled_ours >= cap)),
      "share_at_cap_hf": float(np.mean(pooled_theirs >= cap)),
      "mean_length_ours": float(pooled_ours.mean()),
      "mean_length_hf": float(pooled_theirs.mean()),
  }


def first_stop(tokens: Sequence[int], stop_ids) -> int:
  """Tokens before the first stop id (all of them when none occurs)."""
  stop = set(int(t) for t in stop_ids)
  return next((i for i, t in enumerate(tokens) if int(t) in stop), len(tokens))


# ------------------------------------------------------------------------------ the two sides

def our_lengths(engine, prompt_ids, samples, *, temperature, top_p, max_new_tokens, seed,
                batch_size) -> list[list[int]]:
  """Response lengths (EOS excluded) of `samples` draws per prompt; draw j of prompt i is
  request i * samples + j (its own random stream)."""
  flat = [ids for ids in prompt_ids for _ in range(samples)]
  out = engine.generate(flat, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, request_ids=range(len(flat)),
                        batch_size=batch_size)
  lengths = [len(r.token_ids) for r in out]
  return [lengths[i * samples:(i + 1) * samples] for i in range(len(prompt_ids))]


def load_hf(gguf_path: str, dtype: str, device: str):
  """transformers' model of the GGUF as `AutoModelForCausalLM.from_pretrained` gives it."""
  import torch
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(os.path.abspath(gguf_path)), gguf_file=os.path.basename(gguf_path),
      dtype=getattr(torch, dtype))
  return model.to(device).eval()


def hf_stop_ids(model) -> list[int]:
  eos = model.generation_config.eos_token_id
  return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def hf_lengths(model, prompt_ids, samples, *, temperature, top_p, max_new_tokens, seed,
               batch_size, pad_id) -> list[list[int]]:
  """transformers `generate` with sampling (top_k=0: only temperature and top-p), `samples`
  return sequences per prompt, stopped by the model's generation_config EOS ids; lengths exclude
  the EOS. Up to batch_size // samples prompts share a call (left-padded, masked), so a GPU runs
  them at a useful batch; with samples > batch_size, one prompt's samples take several calls."""
  import torch

  device = next(model.parameters()).device
  stop = hf_stop_ids(model)
  per_call = max(1, batch_size // samples)
  lengths: list[list[int]] = [[] for _ in prompt_ids]
  for first in range(0, len(prompt_ids), per_call):
    group = list(range(first, min(first + per_call, len(prompt_ids))))
    width = max(len(prompt_ids[i]) for i in group)
    tokens = torch.full((len(group), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, i in enumerate(group):
      tokens[row, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
      mask[row, width - len(prompt_ids[i]):] = 1
    torch.manual_seed(seed * 1_000_003 + first)
    while len(lengths[group[0]]) < samples:
      n = min(max(1, batch_size // len(group)), samples - len(lengths[group[0]]))
      with torch.no_grad():
        out = model.generate(tokens.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=temperature, top_p=top_p, top_k=0,
                             max_new_tokens=max_new_tokens, num_return_sequences=n,
                             pad_token_id=pad_id)
      for k, seq in enumerate(out):  # rows: each prompt's n sequences together
        lengths[group[k // n]].append(first_stop(seq[width:].tolist(), stop))
  return lengths


def hf_load_facts(model, prompt_ids) -> dict:
  """How transformers runs this model: packed GGUF kernels or dense weights, attention, the
  dtype of the logits that `generate` samples from (it copies them to float32 first)."""
  import torch
  import transformers

  device = next(model.parameters()).device
  with torch.no_grad():
    logits = model(torch.tensor([prompt_ids[0]], device=device)).logits
  return {"transformers": transformers.__version__, "torch": torch.__version__,
          "device": str(device), "param_dtype": str(next(model.parameters()).dtype),
          "packed_gguf_layers": sum(type(m).__name__ == "GgufLinear" for m in model.modules()),
          "attn_implementation": str(model.config._attn_implementation),
          "logits_dtype": str(logits.dtype), "eos_ids": hf_stop_ids(model),
          "pad_id": model.generation_config.pad_token_id}


# ------------------------------------------------------------------------------- diagnosis

def our_logits(engine, sequence, start, path="prefill"):
  """Our next-token logits at positions start-1 .. L-2 of `sequence`: [L - start, V] float32.
  path: "prefill" (one forward over the sequence) or "decode" (the prompt prefilled, then one
  token per step through the engine's decode attention, as generation runs). Shapes are padded
  to a few buckets, so that replaying many sequences compiles few programs."""
  import jax.numpy as jnp
  from lsdist_jax.llama.model import init_cache
  from lsdist_jax.shapes import round_up

  forward = _forward(engine.model)
  length, pad_id = len(sequence), engine.config.pad_token_id
  if path == "prefill":  # right padding: causal attention keeps it out of every position
    padded = round_up(length, 256)
    tokens = jnp.asarray([list(sequence) + [pad_id] * (padded - length)], jnp.int32)
    logits = forward(engine.params, tokens, init_cache(engine.config, 1, padded,
                                                       engine.model.dtype),
                     jnp.zeros((), jnp.int32), jnp.zeros((1,), jnp.int32), "all")[0]
    return np.asarray(logits[0, start - 1:length - 1], np.float32)
  block = round_up(start, 64)  # the prompt left-padded, as generation packs it
  pad = jnp.asarray([block - start], jnp.int32)
  cache = init_cache(engine.config, 1, round_up(block + length - start, 256), engine.model.dtype)
  tokens = jnp.asarray([[pad_id] * (block - start) + list(sequence[:start])], jnp.int32)
  logits, cache = forward(engine.params, tokens, cache, jnp.zeros((), jnp.int32), pad, "last")
  out = [logits[0, -1]]
  for i, token in enumerate(sequence[start:-1]):
    logits, cache = forward(engine.params, jnp.asarray([[token]], jnp.int32), cache,
                            jnp.int32(block + i), pad, "last")
    out.append(logits[0, -1])
  return np.asarray(jnp.stack(out), np.float32)


@functools.lru_cache(maxsize=None)
def _forward(model):
  """model.apply jitted: (params, tokens, cache, write_index, pad_len, logits_at) ->
  (logits, cache)."""
  import jax

  def forward(params, tokens, cache, write_index, pad_len, logits_at):
    logits, _, cache = model.apply({"params": params}, tokens, cache, write_index, pad_len,
                                   logits_at=logits_at)
    return logits, cache

  return jax.jit(forward, static_argnums=5)


def our_eos_hazards(logits, temperature, top_p, eos_ids) -> np.ndarray:
  """Our probability of any EOS id per row of logits [N, V], by sampling.py's rule."""
  import jax.numpy as jnp
  from lsdist_jax.llama import sampling

  logits = jnp.asarray(logits)
  setting = jnp.asarray(sampling.top_p_setting(top_p))
  mask = sampling.nucleus_mask(logits, jnp.float32(temperature), setting)
  _, probs = sampling.scores_and_probs(logits, jnp.float32(temperature))
  kept = jnp.where(mask, probs, 0.0)
  return np.asarray(kept[:, jnp.asarray(eos_ids)].sum(-1) / kept.sum(-1))


def diagnose(engine, model, prompt_ids, rows, *, temperature, top_p, max_new_tokens, seed,
             eos_ours, eos_hf) -> dict:
  """Replays `rows` transformers responses (prompts in turn) through both models, each by a full
  forward (prefill) and token by token over its KV cache (decode, the path generation takes):
  the summed EOS hazard of each (its own stop ids; the expected stops over those positions), the
  ratio ours / transformers per path with a 90% bootstrap interval over rows (> 1: ours stops
  more readily), and the mean total variation between the two decode-path sampling
  distributions (after temperature and top-p)."""
  import torch

  device = next(model.parameters()).device
  sides = ("hf_prefill", "hf_decode", "ours_prefill", "ours_decode")
  per_row = {k: [] for k in sides}
  tv, positions = [], 0
  for r in range(rows):
    ids = prompt_ids[r % len(prompt_ids)]
    torch.manual_seed(seed * 7_919 + r)
    with torch.no_grad():
      out = model.generate(torch.tensor([ids], device=device), do_sample=True,
                           temperature=temperature, top_p=top_p, top_k=0,
                           max_new_tokens=max_new_tokens, pad_token_id=eos_hf[0],
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                     device=device))
    response = out[0, len(ids):].tolist()
    response = response[:first_stop(response, eos_hf) + 1]  # through its EOS, if any
    sequence = list(ids) + response
    for path in ("prefill", "decode"):
      theirs = hf_processed_probs(model, sequence, len(ids), temperature, top_p, path)
      logits = our_logits(engine, sequence, len(ids), path)
      per_row[f"hf_{path}"].append(float(theirs[:, list(eos_hf)].sum()))
      per_row[f"ours_{path}"].append(float(our_eos_hazards(logits, temperature, top_p,
                                                           eos_ours).sum()))
      if path == "decode":
        tv.append(processed_tv(theirs, logits, temperature, top_p))
    positions += len(response)
  out = {"rows": rows, "positions": positions}
  out.update({f"eos_hazard_sum_{k}": round(sum(v), 4) for k, v in per_row.items()})
  rng = np.random.default_rng(0)
  for path in ("prefill", "decode"):
    ours, theirs = np.array(per_row[f"ours_{path}"]), np.array(per_row[f"hf_{path}"])
    out[f"eos_hazard_ratio_{path}"] = float(ours.sum() / theirs.sum()) if theirs.sum() else None
    picks = rng.integers(0, rows, (2000, rows))
    boot = ours[picks].sum(1) / np.maximum(theirs[picks].sum(1), 1e-12)
    out[f"eos_hazard_ratio_{path}_ci90"] = ([float(np.quantile(boot, 0.05)),
                                             float(np.quantile(boot, 0.95))]
                                            if theirs.sum() else None)
  out["tv_hf_ours_decode_mean"] = float(np.concatenate(tv).mean()) if tv else None
  return out


def hf_processed_probs(model, sequence, start, temperature, top_p, path="prefill"):
  """transformers' sampling distribution (after its warpers) at positions start-1 .. L-2:
  [L - start, V] float64. path: "prefill" (one forward) or "decode" (token by token over its
  KV cache, as `generate` runs)."""
  import torch
  from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

  device = next(model.parameters()).device
  with torch.no_grad():
    if path == "prefill":
      scores = model(torch.tensor([sequence], device=device)).logits[0, start - 1:-1]
    else:
      step = model(torch.tensor([sequence[:start]], device=device), use_cache=True)
      rows = [step.logits[0, -1]]
      for token in sequence[start:-1]:
        step = model(torch.tensor([[token]], device=device),
                     past_key_values=step.past_key_values, use_cache=True)
        rows.append(step.logits[0, -1])
      scores = torch.stack(rows)
    scores = scores.to(torch.float32)
    if temperature != 1.0:
      scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_p < 1.0:
      scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1).double().cpu().numpy()


def processed_tv(theirs, logits, temperature, top_p) -> np.ndarray:
  """Total variation between transformers' sampling distribution and ours (after sampling.py's
  rule) per position: the probability mass on which the two draws can differ."""
  import jax.numpy as jnp
  from lsdist_jax.llama import sampling

  logits = jnp.asarray(logits)
  mask = sampling.nucleus_mask(logits, jnp.float32(temperature),
                               jnp.asarray(sampling.top_p_setting(top_p)))
  _, probs = sampling.scores_and_probs(logits, jnp.float32(temperature))
  kept = np.asarray(jnp.where(mask, probs, 0.0), np.float64)
  return 0.5 * np.abs(theirs - kept / kept.sum(-1, keepdims=True)).sum(-1)


# --------------------------------------------------------------------------------- the run

def run_fidelity(gguf_path: str, prompts: Sequence[str], samples_per_prompt: int = 16,
                 temperature: float = 0.6, top_p: float = 0.9, max_new_tokens: int = 512,
                 dtype: str = "bfloat16", seed: int = 0, batch_size: int = 64,
                 hf_batch_size: int = 256, diagnose_rows: int = 0,
                 device: str | None = None) -> dict:
  """Samples `samples_per_prompt` responses per prompt with our Engine and with transformers,
  from the same GGUF, chat-formatted prompt ids and settings, and compares their lengths
  (`compare_lengths`). dtype: both sides' weights and compute ("bfloat16" or "float32").
  device: torch's (default cuda when there is one). Returns a JSON-ready dict."""
  import jax
  import torch
  from lsdist_jax.engine import Engine, device_kind

  if not prompts:
    raise ValueError("no prompts given")
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
  engine = Engine.load(gguf_path, dtype=dtype)
  prompt_ids = engine.encode(list(prompts))
  start = time.perf_counter()
  ours = our_lengths(engine, prompt_ids, samples_per_prompt, batch_size=batch_size, **kw)
  ours_seconds = time.perf_counter() - start
  logging.info("ours: %d samples in %.1f s", len(prompts) * samples_per_prompt, ours_seconds)

  model = load_hf(gguf_path, dtype, device)
  facts = hf_load_facts(model, prompt_ids)
  start = time.perf_counter()
  theirs = hf_lengths(model, prompt_ids, samples_per_prompt, batch_size=hf_batch_size,
                      pad_id=engine.config.pad_token_id, **kw)
  hf_seconds = time.perf_counter() - start
  logging.info("transformers: %d samples in %.1f s", len(prompts) * samples_per_prompt,
               hf_seconds)

  result = {"prompts": len(prompts), "samples_per_prompt": samples_per_prompt}
  result.update(compare_lengths(ours, theirs, max_new_tokens))
  result.update({
      "settings": {"temperature": temperature, "top_p": top_p, "top_k": 0,
                   "max_new_tokens": max_new_tokens, "dtype": dtype, "seed": seed,
                   "gguf": os.path.basename(gguf_path)},
      "device": device_kind(), "jax": jax.__version__, "decode_attention": engine.decode_impl,
      "eos_ids_ours": list(engine.generator.eos_ids), "hf": facts,
      "prompt_tokens_mean": float(np.mean([len(p) for p in prompt_ids])),
      "seconds_ours": round(ours_seconds, 2), "seconds_hf": round(hf_seconds, 2),
      "date": datetime.date.today().isoformat(),
      "lengths_ours": ours, "lengths_hf": theirs})
  if diagnose_rows:
    result["diagnosis"] = diagnose(engine, model, prompt_ids, diagnose_rows,
                                   eos_ours=list(engine.generator.eos_ids),
                                   eos_hf=facts["eos_ids"], **kw)
  return result
