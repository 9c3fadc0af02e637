"""The SmolLM2 scheduling benchmark at scale (issue 15): every strategy on 2,048 requests over
the 7,451-prompt store's unseen test prompts (763 prompts, none more than 3 times), KV budget
65,536 tokens, the H100 cost model; predictors trained on the store's train split
(`launch/evaluate.py --config=configs/smollm2_alpaca.py:eval --train`, exports in the workdir).

  python launch/benchmark.py --config=configs/smollm2_benchmark_7451.py \
      --config.model.path=<SmolLM2 GGUF> --workdir=runs/smol7451 --workers=4 --devices=0,1
"""

from lsdist_jax.config import config_beside


def get_config():
  c = config_beside(__file__, "smollm2_benchmark_h200")
  c.workdir = "runs/smollm2_benchmark_7451"
  c.collect.store = "docs/data/smollm2_alpaca_7451"
  # The predictors of docs/results/predictor.json (configs/smollm2_alpaca.py:eval): minutes to
  # train on ~6,000 prompts, the map fitted on the ~750 validation prompts alone.
  c.predictor.epochs = 60
  c.predictor.batch_size = 128
  c.predictor.recalibration_folds = 0
  return c
