"""The LLaMA-2-7B-shape length replay at paper scale (issues 15 and 17): the 4,096 requests of
configs/llama2_7b_replay_7451.py with Sequence Scheduling's LoRA predictor beside the others, in
one run. The answers come from the SmolLM2 LoRA (<workdir>/predictor/lora), the model that
recorded the replayed lengths, so its prediction time is SmolLM2's, not a 7B's.

vanilla:16 is left out: at this size it alone takes about 20 GPU minutes (simulated 1,465 s),
and vanilla:best is the fixed-batch reference of every target. vanilla:best comes first (the
report's reference for identical responses), then the slowest strategies, so that workers
spread over several GPUs start them at once.

  bash scripts/lora_gpu.sh <SmolLM2 GGUF> <run folder>     # trains everything, then runs this
  bash scripts/replay_7b_gpu.sh <SmolLM2 GGUF> <run folder>  # the same on one host of 4 GPUs
"""

from lsdist_jax.config import config_beside


def get_config():
  c = config_beside(__file__, "llama2_7b_replay_7451")
  c.workdir = "runs/llama2_7b_replay_lora"
  c.benchmark.strategies = ("vanilla:best", "ssch-lora", "ssch-scalar-max", "ours-search",
                            "ours", "ours-optimal", "oracle", "continuous-vanilla",
                            "ours-continuous", "oracle-continuous", "paged-vanilla",
                            "ours-paged", "oracle-paged")
  return c
