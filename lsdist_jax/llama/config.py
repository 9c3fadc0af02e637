"""`LlamaConfig`: the shape of a LLaMA-family model, its presets, and readers for HF/GGUF metadata.

Pure Python: importing this module does not import jax.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from lsdist_jax.errors import BadFileError, MissingFileError
from lsdist_jax.files import read_json


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int = 0  # 0: hidden_size // num_heads
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int = 0
  name: str = "llama"

  def __post_init__(self):
    if self.head_dim == 0:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                         f"{self.num_heads}; set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads "
                       f"{self.num_kv_heads} (grouped-query attention)")
    object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

  @property
  def layer_params(self) -> int:
    """Parameters of one decoder block."""
    d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                       self.num_kv_heads, self.head_dim)
    return d * hd * (h + 2 * kv) + h * hd * d + 3 * d * f + 2 * d

  @property
  def num_params(self) -> int:
    d = self.hidden_size
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.num_layers * self.layer_params + self.vocab_size * d + d + head

  def fingerprint(self) -> dict[str, Any]:
    """The fields that decide whether weights/checkpoints/stores belong to this model."""
    d = dataclasses.asdict(self)
    d["eos_token_ids"] = list(d["eos_token_ids"])
    return d

  def to_json(self) -> str:
    return json.dumps(self.fingerprint(), sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
    d = dict(d)
    if "eos_token_ids" in d:
      d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return cls(**d)


PRESETS: dict[str, LlamaConfig] = {
    # For tests: GQA (8 heads over 4 kv heads) and shapes that a (data=2, model=4) mesh divides.
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=8, num_kv_heads=4, rope_theta=10000.0, rms_norm_eps=1e-6,
                        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1,
                        eos_token_ids=(2,), pad_token_id=0, name="tiny"),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                                rms_norm_eps=1e-5, max_position_embeddings=8192,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                                pad_token_id=2, name="smollm2-135m"),
    "llama-2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                              num_layers=32, num_heads=32, num_kv_heads=32, rope_theta=10000.0,
                              rms_norm_eps=1e-5, max_position_embeddings=4096,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,),
                              pad_token_id=0, name="llama-2-7b"),
}
PRESETS["smollm2-135m-instruct"] = dataclasses.replace(PRESETS["smollm2-135m"],
                                                       name="smollm2-135m-instruct")


def get_preset(name: str) -> LlamaConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}") from None


# HF model types this loader implements (LLaMA naming and maths), with their architectures.
HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")


def from_hf_config(path_or_dict: str | dict[str, Any], name: str = "") -> LlamaConfig:
  """From an HF `config.json` (a path, a directory holding one, or its parsed dict). Refuses,
  naming the file, one that is not JSON, not a LLaMA-family model, or asks for what the model
  does not implement (biases, another activation, RoPE scaling)."""
  if isinstance(path_or_dict, dict):
    hf, source = path_or_dict, "HF config"
  else:
    source = path_or_dict
    if os.path.isdir(source):
      source = os.path.join(source, "config.json")
    if not os.path.exists(source):
      raise MissingFileError(f"no HF config.json at {source}")
    hf = read_json(source, what="HF config")
    if not isinstance(hf, dict):
      raise BadFileError(f"HF config {source} holds a JSON {type(hf).__name__}, not an object")
  _check_hf_family(hf, source)
  missing = [k for k in _HF_REQUIRED if k not in hf]
  if missing:
    raise BadFileError(f"HF config {source} lacks {', '.join(map(repr, missing))}")
  try:
    return _llama_config(hf, name)
  except (TypeError, ValueError, ZeroDivisionError) as e:
    raise BadFileError(f"HF config {source} describes no valid model: {e}") from None


def _llama_config(hf: dict[str, Any], name: str) -> LlamaConfig:
  rope_theta = hf.get("rope_theta")
  if rope_theta is None:
    rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
  eos = hf.get("eos_token_id", 2)
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
  heads = hf["num_attention_heads"]
  max_positions = hf.get("max_position_embeddings", 4096)
  if hf.get("sliding_window"):  # Mistral: exact while every sequence fits in the window
    max_positions = min(max_positions, int(hf["sliding_window"]))
  return LlamaConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rope_theta=float(rope_theta),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
      max_position_embeddings=max_positions,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      bos_token_id=hf.get("bos_token_id", 1),
      eos_token_ids=eos,
      pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else eos[0],
      name=name or hf.get("_name_or_path", "") or "llama",
  )


def _check_hf_family(hf: dict[str, Any], source: str) -> None:
  """Refuses an HF config of a model this loader does not implement, naming what is wrong."""
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  supported = ", ".join(sorted(HF_MODEL_TYPES.values()))
  if model_type is not None and model_type not in HF_MODEL_TYPES:
    raise BadFileError(f"HF config {source}: unsupported model_type {model_type!r}; only "
                       f"LLaMA-family models load ({', '.join(sorted(HF_MODEL_TYPES))})")
  known = set(HF_MODEL_TYPES.values())
  if not isinstance(archs, list) or any(a not in known for a in archs):
    how = "" if model_type else " and no model_type"
    raise BadFileError(f"HF config {source}: unsupported architecture {archs!r}{how}; only "
                       f"LLaMA-family causal LMs load ({supported})")
  unsupported = []
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      unsupported.append(f"{key}=true")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    unsupported.append(f"hidden_act={act!r}")
  for key in ("rope_scaling", "rope_parameters"):
    rope = hf.get(key) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if kind != "default":
      unsupported.append(f"{key} of type {kind!r}")
  if unsupported:
    raise BadFileError(f"HF config {source}: unsupported architecture: {', '.join(unsupported)}"
                       " (this loader implements plain LLaMA: no biases, SiLU, unscaled RoPE)")


def from_gguf_metadata(fields: dict[str, Any], has_output_tensor: bool, name: str = "") -> LlamaConfig:
  """From GGUF key/value metadata (already decoded to Python values)."""
  arch = fields.get("general.architecture", "llama")
  if arch != "llama":
    raise BadFileError(f"unsupported architecture {arch!r} (GGUF general.architecture); only "
                       "'llama' models load")

  def get(key, default=None):
    full = f"{arch}.{key}"
    if full in fields:
      return fields[full]
    if default is None:
      raise ValueError(f"GGUF metadata lacks {full!r}")
    return default

  heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  vocab = fields.get(f"{arch}.vocab_size")
  if vocab is None:
    vocab = len(fields.get("tokenizer.ggml.tokens", []))
  eos = int(fields.get("tokenizer.ggml.eos_token_id", 2))
  return LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")),
      num_layers=int(get("block_count")),
      num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      head_dim=int(get("rope.dimension_count", hidden // heads)),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      max_position_embeddings=int(get("context_length", 4096)),
      tie_word_embeddings=not has_output_tensor,
      bos_token_id=int(fields.get("tokenizer.ggml.bos_token_id", 1)),
      eos_token_ids=(eos,),
      pad_token_id=int(fields.get("tokenizer.ggml.padding_token_id", eos)),
      name=name or str(fields.get("general.name", "llama")),
  )


# `scan_prefill="auto"` scans while the layer weights a scanned prefill stacks on every call
# weigh at most this: an H200 measured the stack of LLaMA-2-7B's 12.6 GiB at ~35 ms of each slot
# insert (docs/BENCHMARKS.md, session 21), SmolLM2-135M's 0.2 GiB at ~1 ms of a prefill.
SCAN_PREFILL_MAX_BYTES = 1 << 30


def resolve_scan_prefill(setting, config: LlamaConfig, itemsize: int) -> bool:
  """engine.scan_prefill (True, False or "auto"; strings "true"/"false" too) -> whether
  prefills run their blocks as one scan: "auto" scans when the layer weights (params of
  `itemsize` bytes) are at most SCAN_PREFILL_MAX_BYTES, where the stack each call makes costs
  little beside the compile time it saves."""
  named = {"auto": None, "true": True, "false": False}  # as a string flag may give them
  if isinstance(setting, str) and setting.lower() in named:
    setting = named[setting.lower()]
  if setting is None:
    return config.num_layers * config.layer_params * int(itemsize) <= SCAN_PREFILL_MAX_BYTES
  if isinstance(setting, bool) or setting in (0, 1):
    return bool(setting)
  raise ValueError(f"engine.scan_prefill={setting!r}; expected True, False or 'auto'")
