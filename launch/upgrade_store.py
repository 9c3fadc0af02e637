"""Add prompt keys (a hash of each prompt's text) to a length store of an older version, in place.

  python launch/upgrade_store.py --config=configs/smollm2_alpaca.py:gpu \
      --config.data.source=alpaca_local --store=docs/data/smollm2_alpaca_h100

The keys come from the config's data source (`data.source`, `data.datasets`), which must be the
one the store was collected from: its prompt at each stored index is the stored prompt. With
--check (the default) the config's model must count each prompt's tokens as the store recorded
them, else nothing is written (the model loads for its tokenizer only).
"""

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("store", None, "length store (default: config.collect.store or "
                    "<config.workdir>/store)")
flags.DEFINE_bool("check", True, "refuse unless the model's token counts of the source's prompts "
                  "equal the stored prompt lengths")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax import paths
  from lsdist_jax.data import open_source
  from lsdist_jax.store import STORE_VERSION, LengthStore

  config = FLAGS.config
  path = FLAGS.store or paths.store(config)
  store = LengthStore.open(path, upgrading=True)
  if int(store.meta.get("version", 1)) == STORE_VERSION:
    print(f"{path}: already version {STORE_VERSION}; nothing to do")
    return
  source = open_source(config.data)
  count_tokens = None
  if FLAGS.check:
    from lsdist_jax.engine import load_engine

    engine = load_engine(config)
    count_tokens = lambda texts: [len(ids) for ids in engine.encode(texts)]  # noqa: E731
  origin = f"data.source {source.name!r} ({source.origin})"
  chunks = store.add_keys({p.index: p for p in source.prompts}, origin, count_tokens)
  print(f"{path}: version {STORE_VERSION}, keys added to {chunks} chunk(s) from {origin}")


if __name__ == "__main__":
  cli.run(main)
