"""Benchmark every scheduling strategy of config.benchmark.strategies on the same requests.

  python launch/benchmark.py --config=configs/smollm2_alpaca.py --workdir=runs/smollm2_alpaca
  python launch/benchmark.py --config=... --profile   # fit the cost model on this device first
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "the pipeline's workdir (store, predictor exports)")
flags.DEFINE_bool("profile", False, "profile the engine, fit and save the cost model "
                  "(<workdir>/cost_model.json) and use it")
flags.DEFINE_list("profile_batches", ["8", "64", "256"], "batch sizes the profile times")
flags.DEFINE_list("profile_cache", ["256", "1024"], "cache lengths the profile times")
flags.DEFINE_list("profile_prompts", ["32"], "prompt lengths the profile times (several give "
                  "the prefill's per-token cost)")
flags.DEFINE_bool("profile_only", False, "profile, save the cost model, and stop")
flags.DEFINE_string("name", "benchmark", "output file stem")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax import benchmark, collect, report, runner
  from lsdist_jax.pipeline import predictor_exports
  from lsdist_jax.schedule import CostModel

  config = FLAGS.config
  workdir = FLAGS.workdir
  if not config.collect.store:
    config.collect.store = os.path.join(workdir, "store")
  engine = collect.load_engine(config)
  cost = None
  if FLAGS.profile:
    rows = runner.profile_cost(engine, [int(b) for b in FLAGS.profile_batches],
                               [int(s) for s in FLAGS.profile_cache],
                               prompt_len=[int(p) for p in FLAGS.profile_prompts])
    cost = CostModel.fit(rows)
    path = os.path.join(workdir, "cost_model.json")
    os.makedirs(workdir, exist_ok=True)
    cost.save(path)
    with open(os.path.join(workdir, "cost_profile.json"), "w") as f:
      json.dump(rows, f, indent=1)
    logging.info("cost model saved to %s", path)
    if FLAGS.profile_only:
      print(cost.to_json())
      return
  elif config.schedule.cost_model == "" and os.path.isfile(os.path.join(workdir,
                                                                        "cost_model.json")):
    cost = CostModel.load(os.path.join(workdir, "cost_model.json"))
  out = benchmark.run_benchmark(config, workdir, engine=engine,
                                predictor_dirs=predictor_exports(workdir), cost=cost,
                                out_name=FLAGS.name)
  print(report.markdown_table(out["rows"]))


if __name__ == "__main__":
  app.run(main)
