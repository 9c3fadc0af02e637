"""Evaluate the trained predictors on the store's test split (table as JSON + PNG plots).

  python launch/evaluate.py --config=configs/smollm2_alpaca.py --workdir=runs/smollm2_alpaca
  python launch/evaluate.py ... --cv_folds=5   # also: K-fold evaluation over every prompt
"""

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "the pipeline's workdir (predictor exports under "
                    "<workdir>/predictor/<name>/export); outputs go here")
flags.DEFINE_string("store", None, "length store (default: config.collect.store or "
                    "<workdir>/store)")
flags.DEFINE_integer("cv_folds", 0, "if > 1, also train and score the distribution predictor "
                     "in this many folds over every prompt of the store (<workdir>/cv/)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  import os
  from lsdist_jax import paths
  from lsdist_jax.predictor.evaluate import cross_validate, evaluate_predictors, table_text

  store = FLAGS.store or paths.store(FLAGS.config, FLAGS.workdir)
  out = evaluate_predictors(FLAGS.config, paths.predictor_exports(FLAGS.workdir), FLAGS.workdir,
                            store)
  print(table_text(out))
  if FLAGS.cv_folds > 1:
    cv = cross_validate(FLAGS.config, store, os.path.join(FLAGS.workdir, "cv"), FLAGS.cv_folds)
    print(f"{FLAGS.cv_folds}-fold cross-validation over {cv['prompts']} prompts:")
    print(table_text(cv))


if __name__ == "__main__":
  cli.run(main)
