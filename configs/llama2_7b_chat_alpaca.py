"""The paper's setting: LLaMA-2-7B-chat on Alpaca, on one or more GPUs/TPUs.

  python launch/pipeline.py --config=configs/llama2_7b_chat_alpaca.py \
      --config.model.path=/models/Llama-2-7b-chat-hf   # an HF directory (safetensors + tokenizer)
"""

from lsdist_jax.config import default_config


def get_config():
  c = default_config()  # T 0.6, top-p 0.9, max_seq_len 1024, KDE sigma 32: the paper's already
  c.workdir = "runs/llama2_7b_chat_alpaca"
  c.model.name = "llama-2-7b"
  c.model.chat_format = "llama2"
  c.collect.batch_size = 240
  c.predictor.hidden_sizes = (8192, 4096, 2048)  # the paper's MLP
  c.predictor.learning_rate = 1e-5
  c.predictor.batch_size = 1024
  c.predictor.epochs = 300
  c.benchmark.requests = 8192
  c.schedule.kv_budget_tokens = 48 * 1024
  # Step costs of this model shape with the Pallas decode attention, profiled on an H100
  # (docs/BENCHMARKS.md); on another device run `launch/benchmark.py --profile` and point here.
  c.schedule.cost_model = "docs/results/cost_model_7b_pallas_h100.json"
  return c
