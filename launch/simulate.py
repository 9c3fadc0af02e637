"""Simulate every scheduling strategy on a length store under a cost model, without an engine.

  python launch/simulate.py --config=configs/smollm2_alpaca.py:gpu --workdir=runs/x \
      --store=docs/data/smollm2_alpaca_h100 --config.schedule.cost_model=<cost_model.json> \
      --requests=256,2048 --out=simulation.json
"""

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "the pipeline's workdir (predictor exports under "
                    "<workdir>/predictor/<name>/export)")
flags.DEFINE_string("store", None, "length store (default: config.collect.store or "
                    "<workdir>/store)")
flags.DEFINE_list("requests", ["2048"], "request counts to simulate")
flags.DEFINE_string("out", "", "write the JSON here")
flags.DEFINE_list("strategies", [], "strategies to simulate (default: the config's "
                  "benchmark.strategies); simulation also runs the paged ones")
flags.DEFINE_bool("paged_sweep", False, "also simulate paged-vanilla at every batch size it may "
                  "run (rows paged-vanilla@<slots>)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax import paths, report
  from lsdist_jax.benchmark.simulate import simulate_strategies
  from lsdist_jax.files import write_json
  from lsdist_jax.serve.plan import load_cost_model

  config = FLAGS.config
  store = FLAGS.store or paths.store(config, FLAGS.workdir)
  cost = load_cost_model(config, FLAGS.workdir)
  runs = []
  for n in FLAGS.requests:
    out = simulate_strategies(config, store, paths.predictor_exports(FLAGS.workdir), cost, int(n),
                              strategies=FLAGS.strategies or None,
                              paged_sweep=FLAGS.paged_sweep)
    out["cost_model_file"] = paths.cost_model(config, FLAGS.workdir)
    print(f"\n{n} requests, KV budget {out['kv_budget_tokens']} tokens (simulated)")
    print(report.markdown_table(out["rows"]))
    runs.append(out)
  if FLAGS.out:
    write_json({"store": store, "runs": runs}, FLAGS.out)


if __name__ == "__main__":
  cli.run(main)
