"""The embedded default: SmolLM2-135M-Instruct on Alpaca, sized to finish in minutes on a CPU.

  python launch/pipeline.py --config=configs/smollm2_alpaca.py
  python launch/pipeline.py --config=configs/smollm2_alpaca.py:gpu   # the full-size GPU run
"""

from lsdist_jax.config import default_config


def get_config(arg: str = "cpu"):
  c = default_config()
  c.workdir = "runs/smollm2_alpaca"
  c.model.name = "smollm2-135m-instruct"
  c.generation.max_seq_len = 1024
  c.predictor.max_len = 1024
  if arg == "cpu":
    # A demo that a 2-core CPU finishes in minutes: few prompts, few samples, short responses.
    c.generation.max_seq_len = 192
    c.predictor.max_len = 192
    c.data.slice = "0:96"
    c.collect.samples_per_prompt = 4
    c.collect.batch_size = 64
    c.collect.chunk_prompts = 16
    c.predictor.hidden_sizes = (256, 128)
    c.predictor.epochs = 60
    c.predictor.batch_size = 32
    c.predictor.learning_rate = 1e-3
    c.predictor.kde_sigma = 8.0
    c.benchmark.requests = 64
    c.benchmark.slice = "96:102"
    c.schedule.kv_budget_tokens = 16 * 192
  elif arg != "gpu":
    raise ValueError(f"configs/smollm2_alpaca.py takes 'cpu' or 'gpu', got {arg!r}")
  return c
