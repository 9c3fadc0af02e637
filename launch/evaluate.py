"""Evaluate the trained predictors on the store's test split (table as JSON + PNG plots).

  python launch/evaluate.py --config=configs/smollm2_alpaca.py --workdir=runs/smollm2_alpaca
  python launch/evaluate.py ... --cv_folds=5   # also: K-fold evaluation over every prompt
  # train every predictor (recipes chosen on validation), the test table and the out-of-domain
  # tables per dataset of a mix store, into one JSON:
  python launch/evaluate.py --config=configs/smollm2_alpaca.py:eval --train \
      --store=<alpaca store> --mix_store=<instructions_mix store> --workdir=runs/predictor_eval \
      --out=docs/results/predictor.json
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
flags.DEFINE_bool("train", False, "train (or resume) every predictor of config.evaluate on the "
                  "store's train split first, choose the distribution recipe on validation, and "
                  "report the test table (and --mix_store's tables) in --out")
flags.DEFINE_string("mix_store", None, "with --train: an instructions_mix store for the "
                    "out-of-domain tables (default: config.evaluate.mix_store)")
flags.DEFINE_string("out", None, "with --train: the JSON written (default: <workdir>/predictor.json)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  import os
  from lsdist_jax import paths
  from lsdist_jax.predictor.evaluate import (cross_validate, evaluate_predictors, report_text,
                                             table_text, train_and_report)

  store = FLAGS.store or paths.store(FLAGS.config, FLAGS.workdir)
  if FLAGS.train:
    out = train_and_report(FLAGS.config, store, FLAGS.workdir, FLAGS.mix_store or "", FLAGS.out)
    print(report_text(out))
    return
  if FLAGS.mix_store or FLAGS.out:
    from lsdist_jax.errors import ConfigError

    raise ConfigError("--mix_store and --out go with --train")
  out = evaluate_predictors(FLAGS.config, paths.predictor_exports(FLAGS.workdir), FLAGS.workdir,
                            store)
  print(table_text(out))
  if FLAGS.cv_folds > 1:
    cv = cross_validate(FLAGS.config, store, os.path.join(FLAGS.workdir, "cv"), FLAGS.cv_folds)
    print(f"{FLAGS.cv_folds}-fold cross-validation over {cv['prompts']} prompts:")
    print(table_text(cv))


if __name__ == "__main__":
  cli.run(main)
