"""Export the config's LLM (preset, HF dir or GGUF) as an orbax checkpoint that Engine.load reads.

  python launch/export.py --config=configs/smollm2_alpaca.py --out=exports/smollm2
"""

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("out", None, "export directory")
flags.mark_flags_as_required(["config", "out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax.engine import load_engine

  engine = load_engine(FLAGS.config)
  engine.export(FLAGS.out)
  print(f"exported {engine.source} ({engine.config.num_params / 1e6:.1f}M params) to {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
