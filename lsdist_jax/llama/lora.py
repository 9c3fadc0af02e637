"""LoRA adapters for the LLaMA params tree of `model.py`: low-rank A [in, r] @ B [r, out] per
chosen projection and layer, applied as a param transform (W + alpha / r * A @ B) or merged.

Why a transform of the params tree: the model is linen with an explicit params dict, so adding
scale * A @ B to the weights it reads (`apply`, inside the caller's jitted function) needs no
change to `model.py` and no LoRA-aware modules. Qwix (a maintained JAX LoRA library) rewrites
Flax modules by path; here a dozen lines over the tree do the same job more simply.

Layout: attention keeps q, k and v fused in `wqkv` [D, KVH, G + 2, Dh] (for kv head j: its G
query heads, then its key, then its value), so target `q` adapts the [D, KVH * G * Dh] slice
[:, :, :G], `k` the slice [:, :, G], `v` [:, :, G + 1]; `o` is `wo` [H, Dh, D] read as
[H * Dh, D]; `gate` / `up` are `w_gate_up` [D, 2, F] at [:, 0] / [:, 1]; `down` is `w_down`.
A delta of the right shape is added where its target sits; the other entries get zeros.

Inference merges (`merge`): W + scale * A @ B is computed once and the engine's own jitted
decode loops run over the merged tree unchanged, so a step costs exactly what the base model's
does; on-the-fly adapters would add two thin GEMMs per target and layer to every decode step.
Weights no adapter targets are the base arrays themselves in the merged tree (no copy).

Base weights are never written: `apply` and `merge` return new trees. B starts at zero, so an
untrained adapter leaves every weight, and every logit, exactly as it was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lsdist_jax.errors import ConfigError

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION = ("q", "k", "v")
# target -> (module, param) in each layers_<i> of the params tree
_WHERE = {"q": ("attn", "wqkv"), "k": ("attn", "wqkv"), "v": ("attn", "wqkv"),
          "o": ("attn", "wo"), "gate": ("mlp", "w_gate_up"), "up": ("mlp", "w_gate_up"),
          "down": ("mlp", "w_down")}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    targets = tuple(self.targets)
    if targets == ("all",):
      targets = TARGETS
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
      raise ConfigError(f"LoRA targets {list(self.targets)}: expected some of {TARGETS} "
                       "(or 'all')")
    if int(self.rank) < 1:
      raise ConfigError(f"LoRA rank {self.rank}: expected a positive integer")
    if not float(self.alpha) > 0:
      raise ConfigError(f"LoRA alpha {self.alpha}: expected a positive number")
    object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))
    object.__setattr__(self, "rank", int(self.rank))
    object.__setattr__(self, "alpha", float(self.alpha))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict:
    return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def layer_names(params) -> list[str]:
  names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
  if not names:
    raise ValueError("these params hold no layers_<i>: not a params tree of llama/model.py")
  return names


def target_shape(layer: dict, target: str) -> tuple[int, int]:
  """(in, out) of a target's matrix in one layer's params (arrays or shape structs)."""
  module, name = _WHERE[target]
  shape = tuple(layer[module][name].shape)
  if target in ATTENTION:
    d, kvh, slots, hd = shape
    return d, kvh * (slots - 2 if target == "q" else 1) * hd
  if target == "o":
    h, hd, d = shape
    return h * hd, d
  if target in ("gate", "up"):
    d, _, f = shape
    return d, f
  return shape[0], shape[1]


def init_adapters(params, spec: LoraSpec, seed: int = 0) -> dict:
  """{layers_<i>: {target: {"a": [in, r], "b": [r, out]}}} in float32: A ~ N(0, 1 / in), B = 0.
  `params` may be arrays or shape structs (only shapes are read)."""
  key = jax.random.key(seed)
  out = {}
  for i, name in enumerate(layer_names(params)):
    out[name] = {}
    for target in spec.targets:
      n_in, n_out = target_shape(params[name], target)
      k = jax.random.fold_in(key, i * len(TARGETS) + TARGETS.index(target))
      out[name][target] = {
          "a": jax.random.normal(k, (n_in, spec.rank), jnp.float32) / math.sqrt(n_in),
          "b": jnp.zeros((spec.rank, n_out), jnp.float32)}
  return out


def _delta(adapter: dict, scale: float) -> jax.Array:
  return scale * jnp.matmul(adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)


def _layer(layer: dict, adapters: dict, scale: float, dtype=None) -> dict:
  """One layer's params with its adapters added (new dicts; untouched leaves shared); adapted
  weights in `dtype` (None: each weight's own)."""
  layer = {k: dict(v) if isinstance(v, Mapping) else v for k, v in layer.items()}
  for module, name in sorted(set(_WHERE[t] for t in adapters)):
    w = layer[module][name]
    w32 = w.astype(jnp.float32)
    if name == "wqkv":
      d, kvh, slots, hd = w.shape
      groups = slots - 2
      parts = []
      for target, width in (("q", groups), ("k", 1), ("v", 1)):
        if target in adapters:
          parts.append(_delta(adapters[target], scale).reshape(d, kvh, width, hd))
        else:
          parts.append(jnp.zeros((d, kvh, width, hd), jnp.float32))
      delta = jnp.concatenate(parts, axis=2)
    elif name == "w_gate_up":
      d, _, f = w.shape
      delta = jnp.stack([_delta(adapters[t], scale) if t in adapters
                         else jnp.zeros((d, f), jnp.float32) for t in ("gate", "up")], axis=1)
    else:
      target = "o" if name == "wo" else "down"
      delta = _delta(adapters[target], scale).reshape(w.shape)
    layer[module][name] = (w32 + delta).astype(dtype or w.dtype)
  return layer


def check(params, adapters: dict, spec: LoraSpec) -> None:
  """Refuses adapters that do not fit these params: unknown layers, targets outside the spec,
  or A / B of other shapes than the layer's matrices and the spec's rank."""
  layers = set(layer_names(params))
  unknown = set(adapters) - layers
  if unknown:
    raise ConfigError(f"adapters for layers {sorted(unknown)} that these params lack "
                      f"({len(layers)} layers)")
  for name, layer_adapters in adapters.items():
    bad = set(layer_adapters) - set(spec.targets)
    if bad:
      raise ConfigError(f"adapters of {name} hold targets {sorted(bad)} outside the spec's "
                        f"{list(spec.targets)}")
    for target, ab in layer_adapters.items():
      n_in, n_out = target_shape(params[name], target)
      want = {"a": (n_in, spec.rank), "b": (spec.rank, n_out)}
      got = {k: tuple(ab[k].shape) for k in ("a", "b")}
      if got != want:
        raise ConfigError(f"adapter {name}/{target} has shapes {got}; these params and rank "
                          f"{spec.rank} need {want}")


def apply(params, adapters: dict, spec: LoraSpec, dtype=None):
  """The params with every adapter added (W + scale * A @ B, in float32, then cast to `dtype`,
  default W's own). Pure and traceable: call it inside the jitted function that uses the params,
  so that gradients reach the adapters and the base weights stay as they are. Training passes
  dtype=float32 so that a small update is not rounded away by a bfloat16 weight."""
  check(params, adapters, spec)
  out = dict(params)
  for name, layer_adapters in adapters.items():
    out[name] = _layer(params[name], layer_adapters, spec.scale, dtype)
  return out


@jax.jit
def _merged_weights(weights: dict, adapters: dict, scale) -> dict:
  """{layer: {module: {param: W + scale * A @ B}}} for the adapted weights only (a jitted
  function returning an untouched input would still copy it)."""
  out = {}
  for name, layer_adapters in adapters.items():
    layer = _layer(weights[name], layer_adapters, scale)
    out[name] = {}
    for module, param in set(_WHERE[t] for t in layer_adapters):
      out[name].setdefault(module, {})[param] = layer[module][param]
  return out


def merge(params, adapters: dict, spec: LoraSpec):
  """Plain params for inference (the engine's Generator): W + scale * A @ B once, jitted, on
  the params' devices, cast back to W's dtype; every weight no adapter targets is the base
  array itself (no copy)."""
  check(params, adapters, spec)
  merged = _merged_weights({k: params[k] for k in adapters}, adapters, jnp.float32(spec.scale))
  out = dict(params)
  for name, modules in merged.items():
    out[name] = dict(params[name])
    for module, weights in modules.items():
      out[name][module] = dict(params[name][module], **weights)
  return out


def count(adapters: dict) -> int:
  """Trainable numbers in the adapters."""
  return int(sum(x.size for x in jax.tree.leaves(adapters)))
