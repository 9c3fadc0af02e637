"""Weight loading: GGUF (quantized, permuted q/k), safetensors, orbax export; clear refusals."""

import dataclasses

import gguf
import jax
import numpy as np
import pytest

from conftest import tiny_config
from lsdist_jax.engine import Engine
from lsdist_jax.llama import gguf_file, weights as wts


def _llama_cpp_permute(w, n_heads):
  """What llama.cpp's converter does to HF q/k rows: per head, interleave the two halves."""
  head_dim = w.shape[0] // n_heads
  return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, cfg, params, qtype):
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(cfg.num_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_rope_dimension_count(cfg.head_dim)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  flat = wts.canonical(cfg, params)
  for path_, value in flat.items():
    value = np.asarray(value, np.float32)
    leaf = path_[-1]
    if leaf in ("wq", "wk", "wv"):
      value = value.reshape(value.shape[0], -1).T
      if leaf != "wv":
        value = _llama_cpp_permute(value, cfg.num_heads if leaf == "wq" else cfg.num_kv_heads)
    elif leaf == "wo":
      value = value.reshape(-1, value.shape[-1]).T
    elif leaf in ("w_gate", "w_up", "w_down", "lm_head"):
      value = value.T
    value = np.ascontiguousarray(value)
    kind = qtype if value.ndim == 2 else gguf.GGMLQuantizationType.F32
    data = gguf.quants.quantize(value, kind) if kind != gguf.GGMLQuantizationType.F32 else value
    writer.add_tensor(wts.gguf_tensor_name(path_), data, raw_dtype=kind)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("qtype,tol", [("F32", 0.0), ("F16", 2e-3), ("Q8_0", 0.01),
                                       ("Q4_0", 0.2), ("Q4_1", 0.1)])
def test_gguf_loads_every_quantization_and_undoes_the_qk_permutation(tmp_path, tiny_params, qtype,
                                                                      tol):
  cfg, params = tiny_params
  path = tmp_path / "tiny.gguf"
  _write_gguf(path, cfg, params, getattr(gguf.GGMLQuantizationType, qtype))
  loaded_cfg, loaded = wts.load_gguf(str(path))
  assert (loaded_cfg.num_heads, loaded_cfg.num_kv_heads) == (cfg.num_heads, cfg.num_kv_heads)
  assert not loaded_cfg.tie_word_embeddings
  want, got = wts.canonical(cfg, params), wts.canonical(cfg, loaded)
  assert set(want) == set(got)
  for key in want:
    scale = float(np.abs(np.asarray(want[key])).max())
    err = float(np.abs(np.asarray(want[key]) - got[key]).max())
    assert err <= tol * scale + 1e-7, (key, err, scale)
  # The permutation was undone: the q rows of head 0 come back in HF order.
  wq = got[("layers_0", "attn", "wq")]
  np.testing.assert_allclose(wq[:, 0], want[("layers_0", "attn", "wq")][:, 0],
                             atol=tol * float(np.abs(wq).max()) + 1e-7)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_our_dequantization_is_the_gguf_packages_bit_for_bit(qtype):
  rng = np.random.default_rng(0)
  kind = getattr(gguf.GGMLQuantizationType, qtype)
  values = (rng.standard_normal((48, 64)) * rng.uniform(0.01, 3, (48, 1))).astype(np.float32)
  stored = (values if qtype == "F32" else values.astype(np.float16) if qtype == "F16"
            else gguf.quants.quantize(values, kind))
  raw = np.frombuffer(np.ascontiguousarray(stored).tobytes(), np.uint8).reshape(48, -1)
  theirs = gguf.quants.dequantize(raw, kind).astype(np.float32).reshape(-1)
  mine = gguf_file.dequantize(raw, qtype)
  assert mine.dtype == np.float32 and mine.shape == theirs.shape
  np.testing.assert_array_equal(mine, theirs)
  if qtype != "BF16":  # what was stored comes back (up to the type's rounding)
    assert np.abs(mine - values.reshape(-1)).max() <= 0.2 * np.abs(values).max()
  with pytest.raises(ValueError, match="cannot dequantize GGUF type Q5_K"):
    gguf_file.dequantize(raw, "Q5_K")


def test_the_header_reader_agrees_with_the_gguf_package(tmp_path, tiny_params):
  # load_gguf reads the header itself (the package decodes the whole vocabulary, ~10 s for
  # SmolLM2 on a small CPU); fields, tensors and the loaded params must be the package's.
  cfg, params = tiny_params
  path = tmp_path / "tiny.gguf"
  _write_gguf(path, cfg, params, gguf.GGMLQuantizationType.Q4_1)
  header = gguf_file.read(str(path))
  reader = gguf.GGUFReader(str(path))
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):  # the reader's own entries (version, counts)
      continue
    assert header.fields[key] == pytest.approx(field.contents()), key
  assert set(header.tensors) == {t.name for t in reader.tensors}
  for t in reader.tensors:
    dims, ggml_type, offset, nbytes = header.tensors[t.name]
    assert (dims, ggml_type, nbytes) == (tuple(int(n) for n in t.shape), int(t.tensor_type),
                                         int(t.n_bytes)), t.name
    assert offset == int(t.data_offset), t.name
  mine, theirs = wts.load_gguf(str(path)), wts._load_gguf_with_reader(str(path), None)
  assert mine[0] == theirs[0]
  for a, b in zip(jax.tree.leaves(mine[1]), jax.tree.leaves(theirs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_another_shape_is_refused_naming_the_tensor(tmp_path, tiny_params):
  cfg, params = tiny_params
  wts.save_safetensors_dir(str(tmp_path), cfg, params)
  other = dataclasses.replace(cfg, intermediate_size=96)
  with pytest.raises(wts.CheckpointMismatchError, match=r"mlp\.gate_proj\.weight"):
    wts.load_safetensors_dir(str(tmp_path), other)


def test_missing_tensor_and_missing_files_are_named(tmp_path, tiny_params):
  cfg, params = tiny_params
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    wts.load_safetensors_dir(str(tmp_path / "no_such_dir"))
  with pytest.raises(FileNotFoundError, match="missing.gguf"):
    wts.load_gguf(str(tmp_path / "missing.gguf"))
  with pytest.raises(FileNotFoundError, match="neither a preset"):
    Engine.load(str(tmp_path / "nothing_here"))
  wts.save_safetensors_dir(str(tmp_path / "partial"), cfg, params)
  from safetensors.numpy import load_file, save_file
  file = str(tmp_path / "partial" / "model.safetensors")
  tensors = load_file(file)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, file)
  with pytest.raises(wts.CheckpointMismatchError, match=r"layers\.1\.mlp\.up_proj"):
    wts.load_safetensors_dir(str(tmp_path / "partial"))


def test_orbax_export_round_trips_and_refuses_another_model(tmp_path):
  engine = Engine.load("tiny", dtype="float32")
  engine.export(str(tmp_path / "export"))
  again = Engine.load(str(tmp_path / "export"), dtype="float32")
  for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  prompts = ["hello there", "abc"]
  assert ([r.token_ids for r in engine.generate(prompts, max_new_tokens=8, seed=3)] ==
          [r.token_ids for r in again.generate(prompts, max_new_tokens=8, seed=3)])
  other = dataclasses.replace(tiny_config(), num_layers=3)
  with pytest.raises(wts.CheckpointMismatchError, match="num_layers"):
    wts.load_orbax(str(tmp_path / "export"), other)
  assert not wts.is_orbax_export(str(tmp_path))
