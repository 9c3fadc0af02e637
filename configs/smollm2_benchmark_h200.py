"""The SmolLM2 scheduling benchmark of docs/BENCHMARKS.md ("Session 5"): every strategy on 2,048
requests over the committed store's test prompts, KV budget 65,536 tokens, the H100 cost model.

  python launch/benchmark.py --config=configs/smollm2_benchmark_h200.py \
      --config.model.path=<SmolLM2 GGUF> --workdir=runs/smol --workers=4 --devices=0,1
"""

from lsdist_jax.config import config_beside


def get_config():
  c = config_beside(__file__, "smollm2_alpaca", "gpu")
  c.collect.store = "docs/data/smollm2_alpaca_h100"
  c.schedule.cost_model = "docs/results/cost_model_smollm2_pallas_h100.json"
  # Memory pressure emulated: a KV budget that binds (1.5 GB of SmolLM2 cache), at most 256 rows.
  c.schedule.kv_budget_tokens = 64 * 1024
  c.schedule.max_batch = 256
  c.schedule.compile_seconds = 0.0  # steady state: plans leave compilation out
  c.benchmark.strategies = ("vanilla:best", "ours-search", "ssch-scalar-max", "ours-optimal",
                            "oracle", "ours-continuous", "oracle-continuous",
                            "continuous-vanilla", "ours", "vanilla:16",
                            # one pool of KV pages instead of slots of a cache length each
                            "paged-vanilla", "ours-paged", "oracle-paged")
  return c
