"""Evaluate the trained predictors on the store's test split (table as JSON + PNG plots).

  python launch/evaluate.py --config=configs/smollm2_alpaca.py --workdir=runs/smollm2_alpaca
"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "the pipeline's workdir (predictor exports under "
                    "<workdir>/predictor/<name>/export); outputs go here")
flags.DEFINE_string("store", None, "length store (default: config.collect.store or "
                    "<workdir>/store)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  import os
  from lsdist_jax.pipeline import predictor_exports
  from lsdist_jax.predictor.evaluate import evaluate_predictors, table_text

  store = FLAGS.store or FLAGS.config.collect.store or os.path.join(FLAGS.workdir, "store")
  out = evaluate_predictors(FLAGS.config, predictor_exports(FLAGS.workdir), FLAGS.workdir, store)
  print(table_text(out))


if __name__ == "__main__":
  app.run(main)
