"""The main job on one config: collect -> train -> evaluate -> benchmark -> report.

  python launch/pipeline.py --config=configs/smollm2_alpaca.py            # CPU demo, minutes
  python launch/pipeline.py --config=configs/smollm2_alpaca.py:gpu --workdir=runs/gpu
"""

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "output directory (default: config.workdir)")
flags.DEFINE_list("stages", ["collect", "train", "evaluate", "benchmark"], "stages to run")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax.pipeline import run_pipeline

  run_pipeline(FLAGS.config, FLAGS.workdir, stages=tuple(FLAGS.stages))


if __name__ == "__main__":
  cli.run(main)
