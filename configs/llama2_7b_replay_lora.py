"""The LLaMA-2-7B-shape length replay of configs/llama2_7b_replay_7451.py with Sequence
Scheduling's LoRA predictor (issue 17): ssch-lora beside ssch-scalar-max and ours in one run.
The answers come from the SmolLM2 LoRA (<workdir>/predictor/lora), the model that recorded the
replayed lengths, so its prediction time is SmolLM2's, not a 7B's; config.model is SmolLM2's.

  bash scripts/lora_gpu.sh <SmolLM2 GGUF> <run folder>     # trains everything, then runs this
"""

from lsdist_jax.config import config_beside


def get_config():
  c = config_beside(__file__, "llama2_7b_replay_7451")
  c.workdir = "runs/llama2_7b_replay_lora"
  # the strategies of the SmolLM2 run, so both compare the same ones
  c.benchmark.strategies = config_beside(__file__, "smollm2_benchmark_lora").benchmark.strategies
  return c
