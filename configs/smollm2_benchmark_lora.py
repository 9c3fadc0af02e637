"""The SmolLM2 benchmark of configs/smollm2_benchmark_7451.py with Sequence Scheduling's LoRA
predictor (issue 17): every strategy of that run plus ssch-lora, in one run, 2,048 requests over
the 763 unseen test prompts. The LoRA export is <workdir>/predictor/lora (launch/train_lora.py).

  bash scripts/lora_gpu.sh <SmolLM2 GGUF> <run folder>     # trains everything, then runs this
"""

from lsdist_jax.config import config_beside


def get_config():
  c = config_beside(__file__, "smollm2_benchmark_7451")
  c.workdir = "runs/smollm2_benchmark_lora"
  plain = c.benchmark.strategies
  # ssch-lora second, after the identical-responses reference, so that a worker starts it at
  # once: it is the slowest
  c.benchmark.strategies = (plain[0], "ssch-lora") + plain[1:]
  return c
