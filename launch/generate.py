"""Your prompts -> responses, scheduled by a trained length predictor (resumable).

  python launch/generate.py --config=configs/smollm2_alpaca.py --input=prompts.jsonl \
      --output=responses.jsonl --predictor=runs/smollm2_alpaca/predictor/distribution/export

Input: JSONL with `prompt`, or Alpaca's `instruction` (+ `input`), and any fields of your own.
Output: JSONL in input order: your fields plus `line`, `prompt`, `response`, `response_tokens`,
`finished`. A malformed input line, or a prompt too long for generation.max_seq_len, is an error
naming its line, unless --skip_malformed / --skip_long (then skipped and counted). An
interrupted run resumes from `<output>.parts/`, redoing only what no longer matches.

Or an OpenAI Batch API file (detected: its first line has `custom_id` and `body`): chat or
completion lines with their own max_tokens, temperature, top_p, n, seed and stop; the output is
one batch output line per input line, in order, a line that cannot be served getting its own
error line (README: "From an OpenAI batch file").
"""

import os

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli
from lsdist_jax.serve.strategies import JOB_PLANNERS

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("input", None, "prompts JSONL")
flags.DEFINE_string("output", None, "responses JSONL (written when every chunk is done)")
flags.DEFINE_string("predictor", None, "a distributional predictor export (none: vanilla "
                    "fixed batches, or plain slot refill / paging for continuous-search / "
                    "paged-search)")
flags.DEFINE_enum("strategy", "continuous-search", list(JOB_PLANNERS),
                  "planner: continuous-search refills finished rows' slots (the fastest "
                  "measured on docs/BENCHMARKS.md's runs); paged-search grows rows a page at a "
                  "time in one KV pool (one device; simulated faster, not yet measured); the "
                  "others run static batches with FCR")
flags.DEFINE_integer("chunk", 8192, "prompts planned together (the planner sees their whole length "
                     "distribution; one chunk's tail runs at low occupancy) and written per "
                     "resumable part")
flags.DEFINE_bool("skip_malformed", False, "skip malformed input lines instead of failing")
flags.DEFINE_bool("skip_long", False, "skip prompts too long for generation.max_seq_len "
                  "instead of failing")
flags.DEFINE_bool("ignore_model_field", False, "serve OpenAI batch lines whose body.model names "
                  "another model (default: such a line gets an error line)")
flags.DEFINE_string("summary", None, "also write the run's summary (seconds, samples_per_s, "
                    "tokens_per_s, ...) to this file as a JSON object")
flags.mark_flags_as_required(["config", "input", "output"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.processes import process_age_s

  before_job = process_age_s()  # interpreter start, imports and flags, before the job's clock
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax.serve.job import run_generate

  summary = run_generate(FLAGS.config, FLAGS.input, FLAGS.output, FLAGS.predictor,
                         FLAGS.strategy, FLAGS.chunk, FLAGS.skip_malformed, FLAGS.skip_long,
                         ignore_model_field=FLAGS.ignore_model_field)
  summary["before_job_s"] = before_job
  print(summary)
  if FLAGS.summary:
    from lsdist_jax.files import write_json

    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.summary)), exist_ok=True)
    write_json(summary, FLAGS.summary)


if __name__ == "__main__":
  cli.run(main)
