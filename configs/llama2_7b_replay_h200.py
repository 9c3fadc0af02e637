"""The LLaMA-2-7B-shape length replay of docs/BENCHMARKS.md ("Session 6"): random bf16 weights of
the 7B shape, every request's EOS forced at a length recorded in the SmolLM2 store, all ten
strategies on 2,048 requests.

  python launch/benchmark.py --config=configs/llama2_7b_replay_h200.py --workdir=runs/replay7b \
      --name=benchmark_replay_7b --workers=2 --devices=0,1
"""

from lsdist_jax.config import config_beside


def get_config():
  c = config_beside(__file__, "smollm2_alpaca", "gpu")
  c.model.name = "random:llama-2-7b"
  c.collect.store = "docs/data/smollm2_alpaca_h100"
  c.benchmark.replay = True
  c.engine.batch_buckets = (8, 16, 32, 48, 64, 128, 256)
  c.engine.cache_bucket = 256
  # Unrolled 7B programs take ~20-40 s each to compile: a plan's calls wait for those it
  # compiles ahead, rather than run padded to a ready one or beside the compilation.
  c.benchmark.warm_start = True
  c.schedule.cost_model = "docs/results/cost_model_7b_pallas_h100.json"
  # Memory pressure emulated as in the SmolLM2 benchmark: 65,536 KV tokens, at most 256 rows.
  c.schedule.kv_budget_tokens = 64 * 1024
  c.schedule.max_batch = 256
  c.schedule.compile_seconds = 0.0  # steady state: plans leave compilation out
  c.benchmark.strategies = ("vanilla:best", "vanilla:16", "ours-continuous", "oracle-continuous",
                            "ssch-scalar-max", "ours-search", "ours-optimal", "oracle",
                            "continuous-vanilla", "ours",
                            # one pool of KV pages instead of slots of a cache length each
                            "paged-vanilla", "ours-paged", "oracle-paged")
  return c
