"""The tiny random model for tests: every stage runs in seconds on a CPU."""

from lsdist_jax.config import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/tiny"
  c.model.name = "tiny"
  c.model.dtype = "float32"
  c.generation.max_seq_len = 256
  c.collect.long_prompts = "skip"
  c.data.source = "alpaca_local"  # the shipped pool: offline, the same prompts everywhere
  c.data.slice = "0:40"
  c.collect.samples_per_prompt = 4
  c.collect.batch_size = 16
  c.collect.chunk_prompts = 4
  c.predictor.max_len = 256
  c.predictor.hidden_sizes = (32,)
  c.predictor.epochs = 3
  c.predictor.batch_size = 8
  c.predictor.kde_sigma = 4.0
  c.engine.batch_buckets = (1, 2, 4, 8, 16)
  c.engine.prompt_bucket = 16
  c.engine.cache_bucket = 32
  c.benchmark.requests = 16
  c.benchmark.slice = "0:40"
  c.benchmark.split = "test"
  c.schedule.kv_budget_tokens = 8 * 256
  c.schedule.max_batch = 16
  return c
