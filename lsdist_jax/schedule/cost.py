"""Cost model: seconds of a decode step as a function of (batch, cache length, live cache
tokens), prefill and per-batch overhead, fitted from a profiling run of the engine on this
device, saved as JSON.

Two engines, one formula. XLA's decode attention reads every row's whole cache bucket, finished
rows included (the B x S term); the Pallas kernel reads only the slots unfinished rows have
filled (the live-token term): a row that has finished costs its batch almost nothing.

Profiling rows (from `lsdist_jax.benchmark.profile.profile_cost`): {"batch", "cache_len", "ms_per_step",
"prefill_ms", "prompt_len", "live_tokens"}; or (`profile_slots`, the continuous runner's own
calls) decode rows with "call_ms" and insert rows with "prefill_ms" apart. Also the engine's
shape buckets, so costs and memory use the padded shapes the engine really runs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from lsdist_jax.shapes import Buckets, batch_bucket_array, round_up_array


@dataclasses.dataclass
class CostModel:
  # step_ms = a + b * B + c * B * S + d * S + e * live
  #   B padded batch, S cache length, live: cache tokens of unfinished rows this step
  #   (each row: its prompt + the tokens it generated so far)
  step: tuple[float, ...] = (1.3, 0.002, 2.0e-5, 0.0, 0.0)
  # prefill_ms = e + f * B * P                  (P prompt block length)
  prefill: tuple[float, float] = (2.0, 2.0e-4)
  batch_overhead_ms: float = 1.0  # host-side work per generate call
  # the engine's shape buckets (defaults: config.py's `engine` section)
  batch_buckets: tuple[int, ...] = dataclasses.field(default_factory=lambda: Buckets().batch)
  prompt_bucket: int = dataclasses.field(default_factory=lambda: Buckets().prompt)
  cache_bucket: int = dataclasses.field(default_factory=lambda: Buckets().cache)
  source: str = "default"
  # what the profile ran on ("" where unknown: defaults and models saved before these fields)
  device: str = ""  # jax device kind, e.g. "NVIDIA H100 80GB HBM3"
  model: str = ""  # the model's shape and dtype (step times depend on nothing else)

  # --------------------------------------------------------------------------- shapes

  def padded_batch(self, b):
    return batch_bucket_array(b, self.batch_buckets)

  def prompt_block(self, p):
    return round_up_array(p, self.prompt_bucket)

  def cache_len(self, max_prompt, cap):
    return round_up_array(self.prompt_block(max_prompt) + np.asarray(cap), self.cache_bucket)

  def kv_tokens(self, size, max_prompt, cap):
    """KV-cache tokens a batch holds: padded batch x cache length."""
    return self.padded_batch(size) * self.cache_len(max_prompt, cap)

  # --------------------------------------------------------------------------- times (s)

  def __post_init__(self):
    self.step = tuple(float(v) for v in self.step) + (0.0,) * (5 - len(self.step))
    if len(self.step) != 5:
      raise ValueError(f"cost model step has {len(self.step)} coefficients; expected 4 or 5")

  @property
  def live_coef(self) -> float:
    """ms per live cache token per step (0: the engine reads whole cache buckets)."""
    return self.step[4]

  def step_time(self, batch, cache_len, live_tokens=0.0):
    """Seconds of one decode step; without `live_tokens`, the step's live-token cost is left
    out (add `live_time` of the whole run instead)."""
    a, b, c, d, e = self.step
    bp = self.padded_batch(batch)
    s = np.asarray(cache_len)
    return (a + b * bp + c * bp * s + d * s + e * np.asarray(live_tokens)) * 1e-3

  def live_time(self, live_token_steps):
    """Seconds spent reading live cache tokens, summed over steps and rows."""
    return self.live_coef * np.asarray(live_token_steps) * 1e-3

  def prefill_time(self, batch, prompt_len):
    e, f = self.prefill
    return (e + f * self.padded_batch(batch) * self.prompt_block(prompt_len)) * 1e-3

  def prefill_call_time(self, batch, prompt_len):
    """Seconds of one prefill call (an insert, an embedding): the host's work per call and the
    prefill. A slot runner's profile puts a call's whole fixed cost in batch_overhead_ms, so its
    prefill_time alone would make one row per call look cheapest."""
    return self.batch_overhead_ms * 1e-3 + self.prefill_time(batch, prompt_len)

  def batch_time(self, size, max_prompt, cap, steps, live_token_steps=0.0):
    """Seconds of one generate call that runs `steps` decode iterations, its unfinished rows
    reading `live_token_steps` cache tokens in all (sum over steps of the live tokens)."""
    return (self.prefill_call_time(size, max_prompt)
            + np.asarray(steps) * self.step_time(size, self.cache_len(max_prompt, cap))
            + self.live_time(live_token_steps))

  def mismatches(self, device: str, model: str) -> list[str]:
    """Why this model may not describe a run on `device` with `model`: it was profiled on
    another device or another model shape. Empty where it matches or is not known."""
    out = []
    if self.device and device and self.device != device:
      out.append(f"profiled on {self.device}, this run is on {device}")
    if self.model and model and self.model != model:
      out.append(f"profiled for the model {self.model}, this run's is {model}")
    return out

  # --------------------------------------------------------------------------- fit / io

  @classmethod
  def fit(cls, rows: Sequence[dict], **shapes) -> "CostModel":
    """Least squares (non-negative coefficients) on profiling rows: the step from the rows
    with "ms_per_step", the prefill from those with "prefill_ms" (a static profile's rows
    have both). Where decode rows time whole calls ("call_ms": the slot runner's profile),
    batch_overhead_ms is their median, and the prefill is fitted to what an insert call
    costs beyond it."""
    steps = [r for r in rows if "ms_per_step" in r]
    if len(steps) < 4:
      raise ValueError(f"need at least 4 decode-step profiling rows to fit the cost model, got "
                       f"{len(steps)}")
    b = np.array([r["batch"] for r in steps], np.float64)
    s = np.array([r["cache_len"] for r in steps], np.float64)
    y = np.array([r["ms_per_step"] for r in steps], np.float64)
    live = np.array([r.get("live_tokens", 0.0) for r in steps], np.float64)
    x = np.stack([np.ones_like(b), b, b * s, s, live], axis=1)
    step = _nonneg_lstsq(x, y)
    calls = [float(r["call_ms"]) for r in steps if "call_ms" in r]
    if calls:
      shapes.setdefault("batch_overhead_ms", float(np.median(calls)))
    overhead = float(shapes["batch_overhead_ms"]) if calls else 0.0
    inserts = [r for r in rows if "prefill_ms" in r]
    if len(inserts) < 2:
      raise ValueError(f"need at least 2 prefill profiling rows to fit the cost model, got "
                       f"{len(inserts)}")
    bp = np.array([r["batch"] * r.get("prompt_len", 32) for r in inserts], np.float64)
    yp = np.array([r["prefill_ms"] for r in inserts], np.float64) - overhead
    prefill = _nonneg_lstsq(np.stack([np.ones_like(bp), bp], axis=1), yp)
    return cls(step=tuple(float(v) for v in step), prefill=tuple(float(v) for v in prefill),
               source="fit", **shapes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  def save(self, path: str) -> None:
    from lsdist_jax.files import write_text
    write_text(path, self.to_json())

  @classmethod
  def from_json(cls, text: str) -> "CostModel":
    d = json.loads(text)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown cost-model fields {sorted(unknown)}")
    for key in ("step", "prefill", "batch_buckets"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)

  @classmethod
  def load(cls, path: str) -> "CostModel":
    with open(path) as f:
      return cls.from_json(f.read())

  @classmethod
  def default_cpu(cls) -> "CostModel":
    """Rough CPU figures for the tiny/SmolLM2 models (a decode step of tens of ms)."""
    return cls(step=(20.0, 0.5, 1.0e-3, 0.0, 0.0), prefill=(10.0, 0.02), batch_overhead_ms=5.0,
               source="default-cpu")

  @classmethod
  def default_gpu(cls) -> "CostModel":
    """SmolLM2-135M: the decode step on an H100 with the Pallas decode attention, from
    launch/bench_engine.py's figures (docs/results/engine.json): about 1.13 ms + 2.7 us per row
    + 9.6 ns per live cache token (23 KB at the measured 2.39 TB/s); an insert's prefill and a
    call's fixed cost on an H200 (`launch/bench_compile.py --insert_rows`,
    docs/results/compile_times_h200.json): 6 ms + 1.1 us per prefilled token (64 to 1,024 rows
    at block 256: 24 to 295 ms), a decode call that runs no step 2.9 ms. Profile the device for
    real work."""
    return cls(step=(1.13, 0.0027, 0.0, 0.0, 9.6e-6), prefill=(6.0, 1.1e-3),
               batch_overhead_ms=3.0, source="default-gpu")


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Least squares with coefficients >= 0 (drop negative ones and refit)."""
  active = np.ones(x.shape[1], bool)
  coef = np.zeros(x.shape[1])
  for _ in range(x.shape[1]):
    sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
    if (sol >= 0).all():
      coef[:] = 0.0
      coef[active] = sol
      return coef
    idx = np.nonzero(active)[0]
    active[idx[np.argmin(sol)]] = False
  return coef


def with_engine_shapes(model: CostModel, engine_config) -> CostModel:
  """The cost model with the engine's buckets (so planned memory = real memory)."""
  return dataclasses.replace(model, batch_buckets=tuple(engine_config.batch_buckets),
                             prompt_bucket=int(engine_config.prompt_bucket),
                             cache_bucket=int(engine_config.cache_bucket))
