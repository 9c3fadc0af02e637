"""The main job on one config: collect (unless config.collect.store names a committed store) ->
train -> evaluate -> profile -> simulate -> benchmark -> summary.

  python launch/pipeline.py --config=configs/smollm2_alpaca.py            # CPU demo, minutes
  python launch/pipeline.py --config=configs/smollm2_alpaca.py:gpu --workdir=runs/gpu
"""

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "output directory (default: config.workdir)")
flags.DEFINE_list("stages", None, "stages to run (default: every stage; without collect when "
                  "config.collect.store names a store, which is then read, never written)")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax.pipeline import STAGES, run_pipeline

  stages = FLAGS.stages or [s for s in STAGES
                            if s != "collect" or not FLAGS.config.collect.store]
  run_pipeline(FLAGS.config, FLAGS.workdir, stages=tuple(stages))


if __name__ == "__main__":
  cli.run(main)
