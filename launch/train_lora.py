"""Train the LLM (config.model) with LoRA to answer its response-length bin (Sequence Scheduling's
predictor; strategy `ssch-lora`) on the store's train split; optionally score it on the test split.

  python launch/train_lora.py --config=configs/smollm2_alpaca.py --workdir=runs/smollm2_alpaca
  python launch/train_lora.py ... --config.lora.target=median --name=lora-median
  python launch/train_lora.py ... --evaluate=lora,lora-median --out=docs/results/predictor_lora.json

The export goes to <workdir>/predictor/<name>/export (`lora` is what `ssch-lora` plans with).
"""

import datetime
import json

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "the pipeline's workdir: the LoRA run goes to "
                    "<workdir>/predictor/<name>")
flags.DEFINE_string("store", None, "length store (default: config.collect.store or "
                    "<workdir>/store)")
flags.DEFINE_string("name", "lora", "the predictor's folder under <workdir>/predictor/")
flags.DEFINE_bool("train", True, "train (or resume) first")
flags.DEFINE_list("evaluate", [], "LoRA predictors (names under <workdir>/predictor/) to score "
                  "on the test split beside the scalar MLP (scalar-max)")
flags.DEFINE_string("out", None, "with --evaluate: the JSON written (default: "
                    "<workdir>/predictor_lora.json)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  import os

  from lsdist_jax import paths
  from lsdist_jax.engine import device_kind, load_engine
  from lsdist_jax.files import write_json
  from lsdist_jax.lora.evaluate import evaluate_lora
  from lsdist_jax.lora.train import train_lora

  config = FLAGS.config
  if FLAGS.store:
    config.collect.store = FLAGS.store
  elif not config.collect.store:
    config.collect.store = paths.store(config, FLAGS.workdir)
  engine = load_engine(config)
  if FLAGS.train:
    result = train_lora(config, paths.predictor_workdir(FLAGS.workdir, FLAGS.name), engine)
    result.pop("adapters", None)
    print(json.dumps(result))
  if FLAGS.evaluate:
    rows = evaluate_lora(config, FLAGS.workdir, engine, tuple(FLAGS.evaluate))
    out = FLAGS.out or os.path.join(FLAGS.workdir, "predictor_lora.json")
    write_json({"device": device_kind(), "date": datetime.date.today().isoformat(),
                "model": engine.source, "store": config.collect.store,
                "bin_width": int(config.lora.bin_width), "rows": rows}, out)
    for row in rows:
      print(json.dumps(row))


if __name__ == "__main__":
  cli.run(main)
