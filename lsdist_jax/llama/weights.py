"""Weights into a params pytree: HF safetensors directories, GGUF files (dequantized), orbax exports.

Every loader checks each tensor's shape against the `LlamaConfig` and names the tensor it refuses.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable

import numpy as np

from lsdist_jax import exports
from lsdist_jax.errors import BadFileError, MissingFileError
from lsdist_jax.llama import gguf_file
from lsdist_jax.llama.config import LlamaConfig, from_gguf_metadata, from_hf_config

EXPORT_META = "lsdist_model.json"
EXPORT_FORMAT = "lsdist_jax.llama"


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensors or config do not belong to the requested model."""


def canonical_shapes(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Tensor path -> shape in the canonical (unfused) layout that every loader produces:
  wq [D, H, Dh], wk/wv [D, KVH, Dh], wo [H, Dh, D], w_gate/w_up [D, F], w_down [F, D]."""
  d, f, h, kvh, hd, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                         cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
  shapes = {("embed",): (v, d), ("final_norm", "scale"): (d,)}
  if not cfg.tie_word_embeddings:
    shapes[("lm_head",)] = (d, v)
  for i in range(cfg.num_layers):
    layer = f"layers_{i}"
    shapes.update({
        (layer, "attn_norm", "scale"): (d,),
        (layer, "mlp_norm", "scale"): (d,),
        (layer, "attn", "wq"): (d, h, hd),
        (layer, "attn", "wk"): (d, kvh, hd),
        (layer, "attn", "wv"): (d, kvh, hd),
        (layer, "attn", "wo"): (h, hd, d),
        (layer, "mlp", "w_gate"): (d, f),
        (layer, "mlp", "w_up"): (d, f),
        (layer, "mlp", "w_down"): (f, d),
    })
  return shapes


def _nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def fuse(cfg: LlamaConfig, flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  """Canonical tensors -> the params tree of `model.Llama` (q/k/v and gate/up fused)."""
  xp = np
  out = {}
  for path, value in flat.items():
    leaf = path[-1]
    if leaf in ("wk", "wv", "w_up"):
      continue
    if leaf == "wq":
      d, kvh = cfg.hidden_size, cfg.num_kv_heads
      q = value.reshape(d, kvh, cfg.num_heads // kvh, cfg.head_dim)
      k, v = flat[path[:-1] + ("wk",)], flat[path[:-1] + ("wv",)]
      out[path[:-1] + ("wqkv",)] = xp.concatenate([xp.asarray(q), xp.asarray(k)[:, :, None],
                                                   xp.asarray(v)[:, :, None]], axis=2)
    elif leaf == "w_gate":
      out[path[:-1] + ("w_gate_up",)] = xp.stack(
          [xp.asarray(value), xp.asarray(flat[path[:-1] + ("w_up",)])], axis=1)
    else:
      out[path] = value
  return _nest(out)


def canonical(cfg: LlamaConfig, params) -> dict[tuple[str, ...], np.ndarray]:
  """The params tree of `model.Llama` -> canonical tensors (host numpy arrays)."""
  out = {}
  groups = cfg.num_heads // cfg.num_kv_heads
  for path, value in _flatten(params).items():
    value = np.asarray(value)
    leaf = path[-1]
    if leaf == "wqkv":
      d = value.shape[0]
      out[path[:-1] + ("wq",)] = value[:, :, :groups].reshape(d, -1, value.shape[-1])
      out[path[:-1] + ("wk",)] = value[:, :, groups]
      out[path[:-1] + ("wv",)] = value[:, :, groups + 1]
    elif leaf == "w_gate_up":
      out[path[:-1] + ("w_gate",)] = value[:, 0]
      out[path[:-1] + ("w_up",)] = value[:, 1]
    else:
      out[path] = value
  return out


def _assemble(cfg: LlamaConfig, get: Callable[[tuple[str, ...]], tuple[str, np.ndarray]],
              source: str) -> dict[str, Any]:
  """Builds the params tree from `get(path) -> (source tensor name, canonical array)`."""
  flat = {}
  for path, shape in canonical_shapes(cfg).items():
    name, array = get(path)
    if tuple(array.shape) != shape:
      raise CheckpointMismatchError(
          f"{source}: tensor {name!r} has shape {tuple(array.shape)} but model "
          f"{cfg.name!r} needs {shape} for {'/'.join(path)} (is this checkpoint for another model?)")
    flat[path] = array
  return fuse(cfg, flat)


# ---------------------------------------------------------------------------- HF safetensors


def _hf_layout(cfg: LlamaConfig, path: tuple[str, ...], raw: np.ndarray) -> np.ndarray:
  """An HF tensor ([out, in] for linears) in our layout; shapes are checked by the caller."""
  d, h, kvh, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  leaf = path[-1]
  try:
    if leaf == "wq":
      return raw.T.reshape(d, h, hd)
    if leaf in ("wk", "wv"):
      return raw.T.reshape(d, kvh, hd)
    if leaf == "wo":
      return raw.T.reshape(h, hd, d)
    if leaf in ("w_gate", "w_up", "w_down", "lm_head"):
      return raw.T
  except ValueError:
    return raw.T  # wrong size: let the shape check name it
  return raw


# Tensor names of the canonical layout in each file format: whole-model tensors, the per-layer
# pattern, and each per-layer tensor's name within its layer.
_NAMING = {
    "hf": {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
           "lm_head": "lm_head.weight", "layer": "model.layers.{layer}.{name}",
           "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
           "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
           "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
           "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
           "w_down": "mlp.down_proj.weight"},
    "gguf": {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
             "lm_head": "output.weight", "layer": "blk.{layer}.{name}",
             "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight",
             "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
             "wo": "attn_output.weight", "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight",
             "w_down": "ffn_down.weight"},
}


def tensor_name(path: tuple[str, ...], fmt: str) -> str:
  """The name, in file format `fmt` ("hf" | "gguf"), of a canonical tensor path."""
  names = _NAMING[fmt]
  if not path[0].startswith("layers_"):
    return names[path[0]]
  key = path[1] if path[1] in names else path[-1]  # norms by their module, linears by leaf
  return names["layer"].format(layer=int(path[0].split("_")[1]), name=names[key])


def hf_tensor_name(path: tuple[str, ...]) -> str:
  return tensor_name(path, "hf")


def load_safetensors_dir(directory: str, cfg: LlamaConfig | None = None):
  """(cfg, params) from an HF model directory (config.json + *.safetensors)."""
  from safetensors import safe_open

  if not os.path.isdir(directory):
    raise MissingFileError(f"HF model directory not found: {directory}")
  cfg = cfg or from_hf_config(directory, name=os.path.basename(os.path.normpath(directory)))
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise MissingFileError(f"no *.safetensors files in {directory}")
  index = {}
  handles = []
  for file in files:
    try:  # checks the header and that the file covers every tensor's bytes
      handle = safe_open(file, framework="np")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
      raise BadFileError(f"{file} is not a readable safetensors file (truncated or corrupt: "
                         f"{e})") from None
    handles.append(handle)
    for key in handle.keys():
      index[key] = handle

  def get(path):
    name = hf_tensor_name(path)
    if name not in index:
      raise CheckpointMismatchError(f"{directory}: tensor {name!r} is missing (needed for "
                                    f"{'/'.join(path)} of model {cfg.name!r})")
    raw = index[name].get_tensor(name)
    if raw.dtype not in (np.float32, np.float16):
      raw = raw.astype(np.float32)
    return name, _hf_layout(cfg, path, raw)

  return cfg, _assemble(cfg, get, directory)


def save_safetensors_dir(directory: str, cfg: LlamaConfig, params, hf_config: dict | None = None):
  """Writes params in HF naming (used by tests to build a checkpoint both we and torch read)."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  tensors = {}
  for path, value in canonical(cfg, params).items():
    value = np.asarray(value, dtype=np.float32)
    leaf = path[-1]
    if leaf in ("wq", "wk", "wv"):
      value = value.reshape(value.shape[0], -1).T
    elif leaf == "wo":
      value = value.reshape(-1, value.shape[-1]).T
    elif leaf in ("w_gate", "w_up", "w_down", "lm_head"):
      value = value.T
    tensors[hf_tensor_name(path)] = np.ascontiguousarray(value)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  hf = {
      "model_type": "llama", "architectures": ["LlamaForCausalLM"],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
      "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
      "eos_token_id": list(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id,
      "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
  }
  hf.update(hf_config or {})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf, f, indent=1)


# ---------------------------------------------------------------------------- GGUF

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def gguf_tensor_name(path: tuple[str, ...]) -> str:
  return tensor_name(path, "gguf")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's conversion of q/k rows ([out, in]): within each head, llama.cpp stores the
  two rotary halves interleaved (pairs); HF keeps them as two contiguous halves."""
  out_dim = w.shape[0]
  head_dim = out_dim // n_heads
  return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


def gguf_metadata(reader) -> dict[str, Any]:
  """GGUF key/value fields as Python values (token lists left out)."""
  fields = {}
  for key, field in reader.fields.items():
    if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
               "tokenizer.ggml.scores"):
      fields[key] = field.data  # only its length is used
      continue
    try:
      fields[key] = field.contents()
    except Exception:  # noqa: BLE001 - exotic field types are not needed
      continue
  return fields


def load_gguf(path: str, cfg: LlamaConfig | None = None):
  """(cfg, params) from a GGUF file (F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, dequantized to f32).
  The header comes from `gguf_file.read` and each tensor's bytes from a memory map of the file;
  `gguf_file.dequantize` dequantizes (the gguf package reads big-endian files, which `read`
  leaves to it)."""
  import gguf

  header = gguf_file.read(path)  # the magic, the header and every tensor's bytes are in the file
  if header is None:
    return _load_gguf_with_reader(path, cfg)
  data = gguf_file.tensor_bytes(path)

  def tensor(name):
    dims, ggml_type, offset, nbytes = header.tensors[name]
    qtype = gguf.GGMLQuantizationType(ggml_type)
    rows = 1
    for d in dims[1:]:
      rows *= d
    raw = data[offset:offset + nbytes].reshape(rows, nbytes // max(rows, 1))
    return qtype, dims, raw

  return _gguf_params(path, cfg, header.fields, set(header.tensors), tensor,
                      lambda stored, qtype: gguf_file.dequantize(stored, qtype.name))


def _load_gguf_with_reader(path: str, cfg: LlamaConfig | None):
  """load_gguf through the gguf package's reader (big-endian files)."""
  import gguf

  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
    raise BadFileError(f"{path} is a corrupt GGUF file (the gguf reader says: {e})") from None
  tensors = {t.name: t for t in reader.tensors}

  def tensor(name):
    t = tensors[name]
    return t.tensor_type, tuple(int(n) for n in t.shape), t.data

  return _gguf_params(path, cfg, gguf_metadata(reader), set(tensors), tensor,
                      gguf.quants.dequantize)  # the reader's arrays are typed, not bytes


def _gguf_params(path: str, cfg: LlamaConfig | None, fields: dict, names: set, tensor,
                 dequantize):
  """(cfg, params) of a GGUF file from its fields, its tensor names, `tensor(name) -> (ggml
  type, dims in GGUF order, the stored data)` and `dequantize(stored, ggml type)` -> values."""

  try:
    file_cfg = from_gguf_metadata(fields, "output.weight" in names, name=os.path.basename(path))
  except ValueError as e:
    raise BadFileError(f"{path}: {e}") from None
  cfg = cfg or file_cfg

  def get(ours):
    name = gguf_tensor_name(ours)
    if name not in names:
      raise CheckpointMismatchError(f"{path}: tensor {name!r} is missing (needed for "
                                    f"{'/'.join(ours)} of model {cfg.name!r})")
    qtype, dims, stored = tensor(name)
    if qtype.name not in GGUF_TYPES:
      raise BadFileError(f"{path}: tensor {name!r} has type {qtype.name}; supported: "
                         f"{GGUF_TYPES}")
    raw = dequantize(stored, qtype).astype(np.float32, copy=False)
    raw = raw.reshape(tuple(reversed(dims)))  # [out, in] as in HF
    leaf = ours[-1]
    if leaf in ("wq", "wk"):
      heads = cfg.num_heads if leaf == "wq" else cfg.num_kv_heads
      if raw.shape[0] % heads == 0 and (raw.shape[0] // heads) % 2 == 0:
        raw = unpermute_qk(raw, heads)
    return name, _hf_layout(cfg, ours, raw)

  return cfg, _assemble(cfg, get, path)


# ---------------------------------------------------------------------------- orbax export


def export_orbax(directory: str, cfg: LlamaConfig, params, extra: dict | None = None) -> None:
  """Writes params (orbax) + the model config (JSON) so `load_orbax` restores them elsewhere."""
  meta = {"format": EXPORT_FORMAT, "version": 1, "config": cfg.fingerprint()}
  meta.update(extra or {})
  exports.save(directory, params, meta, EXPORT_META)


def is_orbax_export(path: str) -> bool:
  return exports.is_export(path, EXPORT_META)


def load_orbax(directory: str, cfg: LlamaConfig | None = None):
  """(cfg, params, meta) from `export_orbax`; refuses an export of another model shape."""
  directory = os.path.abspath(directory)
  meta = exports.read_meta(directory, EXPORT_META, EXPORT_FORMAT, "lsdist_jax model export")
  saved = LlamaConfig.from_dict(meta["config"])
  if cfg is not None:
    diff = {k: (v, cfg.fingerprint()[k]) for k, v in saved.fingerprint().items()
            if k != "name" and cfg.fingerprint()[k] != v}
    if diff:
      raise CheckpointMismatchError(
          f"{directory} holds a checkpoint of another model: " +
          ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items()))
  cfg = cfg or saved
  restored = exports.restore_params(directory, what="model export")
  flat = canonical(saved, restored)
  params = _assemble(cfg, lambda p: ("/".join(p), flat[p]) if p in flat else _missing(directory, p),
                     directory)
  return cfg, params, meta


def _missing(source, path):
  raise CheckpointMismatchError(f"{source}: tensor {'/'.join(path)!r} is missing")
