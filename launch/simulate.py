"""Simulate every scheduling strategy on a length store under a cost model, without an engine.

  python launch/simulate.py --config=configs/smollm2_alpaca.py:gpu --workdir=runs/x \
      --store=docs/data/smollm2_alpaca_h100 --config.schedule.cost_model=<cost_model.json> \
      --requests=256,2048 --out=simulation.json
"""

import json

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "the pipeline's workdir (predictor exports under "
                    "<workdir>/predictor/<name>/export)")
flags.DEFINE_string("store", None, "length store (default: config.collect.store)")
flags.DEFINE_list("requests", ["2048"], "request counts to simulate")
flags.DEFINE_string("out", "", "write the JSON here")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax import report, scheduling
  from lsdist_jax.pipeline import predictor_exports
  from lsdist_jax.schedule import with_engine_shapes
  from lsdist_jax.simulation import simulate_strategies

  config = FLAGS.config
  store = FLAGS.store or config.collect.store
  cost = with_engine_shapes(scheduling.load_cost_model(config), config.engine)
  runs = []
  for n in FLAGS.requests:
    out = simulate_strategies(config, store, predictor_exports(FLAGS.workdir), cost, int(n))
    out["cost_model_file"] = config.schedule.cost_model
    print(f"\n{n} requests, KV budget {out['kv_budget_tokens']} tokens (simulated)")
    print(report.markdown_table(out["rows"]))
    runs.append(out)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"store": store, "runs": runs}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
