"""The LLaMA-2-7B-shape length replay at scale (issue 15): random bf16 weights of the 7B shape,
every request's EOS forced at a length recorded in the 7,451-prompt SmolLM2 store, 4,096
requests over its 763 unseen test prompts (recorded samples, no prompt more than 6 times), all
strategies; predictors trained on the store's train split (exports in the workdir).

  python launch/benchmark.py --config=configs/llama2_7b_replay_7451.py --workdir=runs/replay7451 \
      --name=benchmark_replay_7b --workers=2 --devices=0,1
"""

from lsdist_jax.config import config_beside


def get_config():
  c = config_beside(__file__, "llama2_7b_replay_h200")
  c.workdir = "runs/llama2_7b_replay_7451"
  c.collect.store = "docs/data/smollm2_alpaca_7451"
  c.benchmark.requests = 4096
  c.predictor.epochs = 60  # the predictors of configs/smollm2_benchmark_7451.py
  c.predictor.batch_size = 128
  c.predictor.recalibration_folds = 0
  return c
