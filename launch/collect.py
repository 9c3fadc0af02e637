"""Collect sampled response lengths and prompt hidden states into the store (resumable).

  python launch/collect.py --config=configs/smollm2_alpaca.py --workdir=runs/smollm2
  python launch/collect.py --config=configs/smollm2_alpaca.py:gpu --config.data.slice=0:2000
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "output directory (default: config.workdir)")
flags.DEFINE_bool("plots", True, "write length-distribution plots (PNG) beside the summary")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax import collect, report
  from lsdist_jax.files import write_json

  config = FLAGS.config
  workdir = FLAGS.workdir or config.workdir
  summary = collect.collect(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  write_json(summary, os.path.join(workdir, "collect_summary.json"))
  print(report.collect_summary_text(summary))
  if FLAGS.plots:
    paths = report.plot_collection(summary["store"], workdir)
    logging.info("plots: %s", paths)


if __name__ == "__main__":
  cli.run(main)
