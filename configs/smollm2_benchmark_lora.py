"""The SmolLM2 benchmark of configs/smollm2_benchmark_7451.py with Sequence Scheduling's LoRA
predictor (issue 17): ssch-lora beside ssch-scalar-max and ours in one run, 2,048 requests over
the 763 unseen test prompts. The LoRA export is <workdir>/predictor/lora (launch/train_lora.py).

  bash scripts/lora_gpu.sh <SmolLM2 GGUF> <run folder>     # trains everything, then runs this
"""

from lsdist_jax.config import config_beside


def get_config():
  c = config_beside(__file__, "smollm2_benchmark_7451")
  c.workdir = "runs/smollm2_benchmark_lora"
  c.benchmark.strategies = ("vanilla:best", "ssch-lora", "ssch-scalar-max", "ours",
                            "ours-search")
  return c
