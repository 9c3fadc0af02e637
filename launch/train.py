"""Train a length predictor (config.predictor.kind) on the store's train split.

  python launch/train.py --config=configs/smollm2_alpaca.py --workdir=runs/smollm2/predictor/dist
  python launch/train.py --config=configs/smollm2_alpaca.py --config.predictor.kind=scalar \
      --config.predictor.scalar_target=max --workdir=runs/smollm2/predictor/scalar-max
"""

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, logs and the export go here")
flags.DEFINE_string("store", None, "length store (default: config.collect.store or "
                    "<config.workdir>/store)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax.predictor import train

  config = FLAGS.config
  data = train.load_splits(FLAGS.store) if FLAGS.store else None
  result = train.train_and_evaluate(config, FLAGS.workdir, data)
  result.pop("params", None)
  print(result)


if __name__ == "__main__":
  cli.run(main)
