"""Copy a length store into few chunks with float16 hidden states (half the size: for committing
a store under docs/data). The same prompts, keys, lengths; hidden states read back as float32.

  python launch/compact_store.py --store=runs/x/store --out=docs/data/smollm2_alpaca_7451
"""

from absl import flags

from lsdist_jax import cli

flags.DEFINE_string("store", None, "the length store to copy")
flags.DEFINE_string("out", None, "where the compact copy goes (must not hold a store)")
flags.DEFINE_enum("hidden_dtype", "float16", ["float16", "float32"], "stored hidden dtype")
flags.mark_flags_as_required(["store", "out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.store import LengthStore

  out = LengthStore.open(FLAGS.store).compact(FLAGS.out, FLAGS.hidden_dtype)
  print(out.summary())


if __name__ == "__main__":
  cli.run(main)
