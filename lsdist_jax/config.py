"""The experiment config schema: every key a launcher or library call may read, with defaults.

Experiment files in `configs/` start from `default_config()` and override a few fields; a key
that is not in this schema is refused (`check_config`) with the dotted name that was wrong.
"""

from __future__ import annotations

import functools
import types

import ml_collections
from ml_collections import config_dict

# The length convention, stated once (here, and in the README): a response's length is the number
# of tokens the model generated after the prompt, EOS excluded, capped at max_seq_len - prompt_len.
# A response that reached that cap without EOS is "unfinished". Predictor bins are response
# lengths 0..max_seq_len.
LENGTH_CONVENTION = "response_tokens_eos_excluded_capped_at_max_seq_len_minus_prompt"

# The reference code's predictor (REFERENCE.md) as `predictor.recipe = "seed"`: an MLP of
# 4096 -> 8192 -> 4096 -> 2048 -> bins on a 4096-dim hidden state, i.e. widths of 2, 1 and 0.5
# times the hidden size; KDE sigma 32, input noise 1.0, Adam 1e-5, batch 1024, 300 epochs.
PREDICTOR_RECIPES = {
    "seed": {"width_factors": (2.0, 1.0, 0.5), "dropout": 0.5, "kde_sigma": 32.0,
             "input_noise_std": 1.0, "loss": "kl", "optimizer": "adam", "learning_rate": 1e-5,
             "weight_decay": 0.0, "schedule": "constant", "batch_size": 1024, "epochs": 300},
}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/default"

  # The LLM. `name` is a preset (`smollm2-135m-instruct`, `tiny`, `llama-2-7b`), an HF directory,
  # a .gguf file or an exported orbax checkpoint; `path` overrides where its weights are read.
  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"
  c.model.path = ""
  c.model.dtype = "bfloat16"  # params and activations; norms and softmax run in float32
  c.model.chat_format = "auto"  # auto | template | llama2 | none

  # Device mesh: data-parallel x tensor-parallel. data=-1 takes every device not used by model.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1
  c.mesh.distributed = False  # call jax.distributed.initialize() (multi-host / multi-process)
  c.mesh.coordinator_address = ""
  c.mesh.num_processes = 0
  c.mesh.process_id = -1
  # local: the mesh spans this process's devices (each process serves its own requests, as
  # collection does); global: one mesh over every process's devices (after jax.distributed),
  # every process making the same calls on the same inputs and getting the same results.
  c.mesh.span = "local"

  # The engine's shape buckets: every compiled program uses one of these sizes.
  c.engine = ml_collections.ConfigDict()
  c.engine.batch_buckets = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
  c.engine.prompt_bucket = 32  # prompt block lengths are rounded up to a multiple of this
  c.engine.cache_bucket = 128  # KV-cache lengths are rounded up to a multiple of this
  # How a decode step reads the KV cache: auto (the Pallas kernel, which reads only the live
  # slots of unfinished rows, on GPUs in bf16 (on a mesh: per device under shard_map); XLA
  # elsewhere) | pallas | dot | reduce.
  c.engine.decode_attention = "auto"
  # The prefill-only programs (the prediction prefill, each slot insert's prefill) run their
  # blocks as one lax.scan, lowered and compiled once instead of once per layer; it stacks the
  # layer weights inside each such program (a transient copy of them, on every call). Measured
  # on an H200: SmolLM2's programs compile 2.6x faster, and a 64 x 128 prediction prefill runs
  # in 9.7 ms against 8.4 ms unrolled (docs/results/compile_times_h200.json); a LLaMA-2-7B slot
  # insert of 8 rows took 65 ms scanned against 27 ms unrolled. True | False | "auto": scan
  # while the layer weights are at most 1 GiB (`llama.config.resolve_scan_prefill`).
  c.engine.scan_prefill = "auto"
  # Programs a run knows it will need (the prediction prefill's, a continuous plan's phases)
  # compile ahead in this many background threads while earlier work runs; 0: each compiles
  # when first run. Off on a mesh.
  c.engine.compile_threads = 4
  # JAX's persistent compilation cache: compiled programs outlive the process, so the next job
  # (or a resumed one) loads them instead of compiling again (a 7B program takes ~20 s).
  # "user": ${XDG_CACHE_HOME:-~/.cache}/lsdist_jax/xla; a directory; "" off. Launchers'
  # --no_compile_cache (or LSDIST_NO_COMPILE_CACHE=1) turns it off for one run.
  c.engine.compilation_cache = "user"
  # XLA flags for this process (space separated), added to $XLA_FLAGS before the backend starts
  # (`engine.apply_xla_flags`; a flag $XLA_FLAGS names already keeps the user's value).
  c.engine.xla_flags = ""

  # Sampling, shared by collection, benchmark and generate (the paper: T=0.6, top-p 0.9, 1024).
  c.generation = ml_collections.ConfigDict()
  c.generation.temperature = 0.6
  c.generation.top_p = 0.9
  c.generation.seed = 20231005
  c.generation.max_seq_len = 1024  # prompt + response

  # Prompts: a source, shuffled with a seed, sliced "a:b"; split by a seeded hash of the text.
  # source: alpaca (the 52,002 records of tatsu-lab/alpaca where the hub is reachable or cached,
  # else the 7,451 shipped in lsdist_jax/data, with a warning) | alpaca_local (those 7,451
  # always) | instructions_mix (5,115 non-Alpaca prompts) | a .json/.jsonl[.gz]/.parquet path.
  c.data = ml_collections.ConfigDict()
  c.data.source = "alpaca"
  # Keep only records whose `dataset` field is one of these (empty: all): an exact name such as
  # "dolly15k" or a family such as "alpaca_eval" (alpaca_eval/*); a comma list also works.
  c.data.datasets = ()
  c.data.shuffle_seed = 20231005
  c.data.slice = "0:10000"
  # shuffle each `dataset` apart and interleave them, so that a slice holds every dataset in
  # proportion (instructions_mix)
  c.data.stratify_by_dataset = False
  c.data.split_seed = 20231113
  c.data.split_fractions = (0.8, 0.1, 0.1)  # train / valid / test, by prompt

  # Collection: N sampled responses per prompt + the prompt's hidden state.
  c.collect = ml_collections.ConfigDict()
  c.collect.store = ""  # default: <workdir>/store
  c.collect.samples_per_prompt = 60
  c.collect.batch_size = 256  # rows (prompt x sample) decoded at once (slots, or a static batch)
  # slots: rows stream through slot refill (a finished row's slot takes the next at once);
  # static: batches of batch_size rows, capped in rounds (the same lengths, slower)
  c.collect.decode = "slots"
  c.collect.refill_fraction = 0.125  # slot refill: insert new rows once this share is free
  c.collect.chunk_prompts = 64  # prompts per crash-safe chunk
  c.collect.hidden_layer = -1  # which layer's output at the last prompt token (-1: final norm)
  c.collect.long_prompts = "error"  # error | skip: a prompt that leaves no room in max_seq_len

  # Predictors.
  c.predictor = ml_collections.ConfigDict()
  c.predictor.kind = "distribution"  # distribution | scalar
  c.predictor.scalar_target = "max"  # max | mean | a quantile such as "0.9"
  c.predictor.hidden_sizes = (2048, 1024, 512)
  c.predictor.dropout = 0.5
  c.predictor.max_len = 1024  # bins are response lengths 0..max_len
  c.predictor.kde_sigma = 32.0
  c.predictor.loss = "kl"  # kl | mse
  c.predictor.input_noise_std = 1.0
  # Quantile recalibration of the distribution predictor, fitted on the validation prompts
  # (predictor/calibration.py); the export applies it to every predicted pmf.
  c.predictor.recalibrate = True
  c.predictor.recalibration_knots = 11  # chosen by 5-fold CV on the SmolLM2 store (BENCHMARKS.md)
  # > 0: the map is also fitted on out-of-fold predictions of the training prompts (K extra
  # trainings, each without one fold), not only on the few validation prompts. 5 was chosen by
  # nested 5-fold CV on the SmolLM2 store (coverage error <= 0.01 vs <= 0.04 with 0; BENCHMARKS.md).
  c.predictor.recalibration_folds = 5
  c.predictor.optimizer = "adam"  # adam | adamw
  c.predictor.learning_rate = 1e-4
  c.predictor.weight_decay = 0.0
  c.predictor.schedule = "constant"  # constant | cosine
  c.predictor.batch_size = 256
  c.predictor.epochs = 100
  c.predictor.checkpoint_every = 10  # epochs between orbax saves (latest, and best if improved)
  # current: the settings above | seed: the reference code's recipe (PREDICTOR_RECIPES), which
  # replaces them, its widths scaled to the hidden size.
  c.predictor.recipe = "current"

  # The predictor evaluation (launch/evaluate.py --train): candidates of the distribution
  # predictor (recipes, chosen by validation CRPS), the scalar baselines, the out-of-domain tables.
  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.recipes = ("current",)
  c.evaluate.scalar_targets = ("max", "mean", "0.9")  # max | mean | a quantile of the samples
  c.evaluate.bootstrap_draws = 2000  # 95% intervals of coverage, prompts resampled
  c.evaluate.mix_store = ""  # a store of instructions_mix prompts: tables per `dataset`
  # The out-of-domain recalibration row: a quantile map fitted on this many mix prompts (of the
  # mix store's train split), every table then scored on the other mix prompts; 0: no such row.
  c.evaluate.mix_recalibration_prompts = 300

  # The LLM as its own length predictor (Sequence Scheduling, Zheng et al. 2023): LoRA-tuned to
  # answer, for a prompt, the bin of its response length (lsdist_jax/lora, launch/train_lora.py).
  c.lora = ml_collections.ConfigDict()
  c.lora.target = "max"  # max | median: of each training prompt's sampled lengths
  c.lora.bin_width = 100  # the answer is the target rounded up to a multiple of this (max_bin100)
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = ("q", "v")  # some of q, k, v, o, gate, up, down, or ("all",)
  c.lora.learning_rate = 1e-4
  c.lora.warmup_fraction = 0.03  # linear warm-up over this share of the steps, then cosine
  c.lora.weight_decay = 0.0
  c.lora.epochs = 3
  c.lora.batch_size = 16
  c.lora.compute_dtype = "float32"  # the training forward (adapted weights are kept exact)
  c.lora.answer_tokens = 6  # greedy tokens generated for an answer (digits + EOS)
  c.lora.max_prompt_tokens = 512  # longer training prompts are cut to their last tokens
  c.lora.checkpoint_every = 1  # epochs between orbax saves (latest, and best by valid loss)
  c.lora.predict_batch = 64  # prompts per batched greedy prediction

  # Scheduling.
  c.schedule = ml_collections.ConfigDict()
  c.schedule.threshold = 0.6
  # KV-cache tokens the planners may hold at once: "auto" sizes it from the accelerator's free
  # memory after the weights, with a margin for the workspace (engine.kv_budget_tokens, logged
  # at start); a number emulates memory pressure (the benchmarks set one and report it).
  c.schedule.kv_budget_tokens = config_dict.FieldReference("auto", field_type=object)
  c.schedule.kv_memory_fraction = 0.7  # "auto": the share of free accelerator memory for KV
  c.schedule.max_batch = 256
  c.schedule.fixed_batch = 16
  c.schedule.ssch_cell = 100
  c.schedule.fcr_slack = 8
  # Failure collection and recovery (the paper's FCR): a static batch stops at its cap and its
  # unfinished rows are recovered later; False runs every batch to its full length.
  c.schedule.fcr = True
  c.schedule.recovery_threshold = 0.9  # the quantile recovery batches are planned at
  c.schedule.cost_model = ""  # JSON from a profiling run; empty: the built-in default
  # What one more compiled program costs a run, in seconds: the continuous planners' searches
  # charge it per distinct program a plan compiles (decode loops, inserts, samplers), so that a
  # job weighs a shape's compilation against the decode time it saves. 0: plans ignore
  # compilation (the steady-state benchmarks). The GPU config sets what an H200 measured.
  c.schedule.compile_seconds = 0.0

  # Benchmark.
  c.benchmark = ml_collections.ConfigDict()
  c.benchmark.strategies = (
      "vanilla:16",
      "vanilla:best",
      "ssch-scalar-max",
      "ours",
      "ours-search",
      "ours-optimal",
      "oracle",
      "continuous-vanilla",
      "ours-continuous",
      "oracle-continuous",
      "paged-vanilla",
      "ours-paged",
      "oracle-paged",
  )
  c.benchmark.requests = 2048
  c.benchmark.repeats = 1
  # Each continuous or paged strategy waits for the programs its plan compiles ahead before its
  # first call (the wait counted as compilation, left out of samples/s as all compilation is):
  # its calls then run as in a steady state, none padded to a larger ready program or run
  # beside a compilation (`Runner.warm_start`). samples_per_s_end_to_end keeps the wait.
  c.benchmark.warm_start = False
  c.benchmark.replay = False  # force EOS at recorded lengths (length-replay mode)
  c.benchmark.slice = "12048:20240"
  c.benchmark.split = ""  # "test": keep only prompts of the store's test split (unseen in training)
  return c


def config_beside(this_file: str, name: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of configs/<name>.py found beside `this_file`: how an experiment file
  starts from another one (it works whether configs/ is loaded as a package or by path)."""
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


@functools.lru_cache(maxsize=None)
def defaults(section: str) -> types.MappingProxyType:
  """The default values of one section of the schema (read-only), for the library's own
  dataclasses (planner options, shape buckets), so that defaults live in this file only."""
  return types.MappingProxyType(default_config()[section].to_dict())


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raise a clear error naming any key of `config` that the schema does not know."""
  reference = default_config()

  def walk(cfg, ref, prefix):
    for key in cfg.keys():
      name = f"{prefix}{key}"
      if key not in ref:
        raise KeyError(f"unknown config key {name!r}; known keys here: {sorted(ref.keys())}")
      if isinstance(ref[key], ml_collections.ConfigDict):
        if not isinstance(cfg[key], ml_collections.ConfigDict):
          raise TypeError(f"config key {name!r} must be a section, got {cfg[key]!r}")
        walk(cfg[key], ref[key], name + ".")

  walk(config, reference, "")
  return config
