"""Compile times of the generate job's programs, the prefill's blocks unrolled and scanned
(issue 18; `lsdist_jax/benchmark/compile_times.py`), and the two prefills' run times:

  python launch/bench_compile.py --model=smollm2-135m --out=docs/results/compile_times_cpu.json

With --step_batch it also times a decode step of the static and the slot loop on the same rows;
--gguf runs them on the real model and the shipped prompts, --step_trace profiles one slot run:

  python launch/bench_compile.py --gguf=<SmolLM2 GGUF> --step_batch=1024 --step_trace=<dir>

--insert_rows times a slot batch's insert calls (and a read and an empty decode call), what a
refill costs beside its decode steps:

  python launch/bench_compile.py --gguf=<SmolLM2 GGUF> --slots=1024 --cache=1024 --block=256 \
      --insert_rows=64,128,512,1024 --noprograms

On a GPU it times the GPU backend's compilation (the job's bottleneck there).
"""

import sys

from absl import flags

from lsdist_jax import cli

flags.DEFINE_string("model", "smollm2-135m", "preset whose shape gets random weights")
flags.DEFINE_integer("slots", 256, "slot batch rows")
flags.DEFINE_integer("cache", 256, "slot batch cache length")
flags.DEFINE_integer("rows", 64, "inserted / prefilled rows")
flags.DEFINE_integer("block", 64, "context block (prompt tokens)")
flags.DEFINE_integer("step_batch", 0, "also time a decode step, static and slot loops, at this "
                     "batch (0: not)")
flags.DEFINE_integer("step_prompt", 128, "prompt tokens of the decode-step rows")
flags.DEFINE_integer("step_steps", 256, "steps each decode-step row runs")
flags.DEFINE_list("step_caches", ["512", "1024"], "slot batch cache lengths of the step rows")
flags.DEFINE_list("step_loops", ["static", "slots"], "which decode loops the step rows time")
flags.DEFINE_string("gguf", "", "time this model file's real weights (the step rows then run "
                    "the shipped Alpaca prompts, chat-formatted) instead of random ones")
flags.DEFINE_string("step_trace", "", "also trace one slot run of the step rows with "
                    "jax.profiler into this folder and print its busiest device events")
flags.DEFINE_bool("programs", True, "time the job's programs' compilation and the prefills' "
                  "runs (--noprograms: the decode-step rows alone)")
flags.DEFINE_integer("trace_top", 25, "event names the trace summary lists")
flags.DEFINE_list("insert_rows", [], "also time insert calls of these rows (and a read and an "
                  "empty decode call) into a slot batch of --slots x --cache at --block")
flags.DEFINE_bool("lower_blocks_once", True, "the decode-step and insert rows' model lowers one "
                  "block for all layers (--nolower_blocks_once: each layer's own)")
flags.DEFINE_string("out", "", "write the JSON here")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from lsdist_jax.benchmark.compile_times import (decode_step_rows, insert_call_rows,
                                                  prefill_run_rows, program_rows)
  from lsdist_jax.benchmark.traces import trace_streams, trace_summary
  from lsdist_jax.engine import Engine
  from lsdist_jax.files import write_json

  engine = Engine.load(FLAGS.gguf) if FLAGS.gguf else Engine.random(FLAGS.model)
  engine.model = engine.generator.model = engine.model.clone(
      lower_blocks_once=FLAGS.lower_blocks_once)
  prompts = None
  if FLAGS.gguf and FLAGS.step_batch:
    from lsdist_jax.data import prompt_text, read_pool

    texts = [prompt_text(r) for r in read_pool()][:FLAGS.step_batch]
    prompts = [ids[-FLAGS.step_prompt:] for ids in engine.encode(texts)]
  shape = dict(slots=FLAGS.slots, cache_len=FLAGS.cache, rows=FLAGS.rows, block=FLAGS.block)
  rows = []
  if FLAGS.programs:
    rows = program_rows(engine, **shape) + prefill_run_rows(engine, rows=FLAGS.rows,
                                                            block=FLAGS.block)
  if FLAGS.insert_rows:
    texts_ids = prompts
    if FLAGS.gguf and texts_ids is None:
      from lsdist_jax.data import prompt_text, read_pool

      texts_ids = engine.encode([prompt_text(r) for r in read_pool()[:2048]])
    rows += insert_call_rows(engine, slots=FLAGS.slots, cache_len=FLAGS.cache,
                             rows_list=[int(r) for r in FLAGS.insert_rows], block=FLAGS.block,
                             prompts=texts_ids)
  if FLAGS.step_batch:
    rows += decode_step_rows(engine, batch=FLAGS.step_batch, prompt_len=FLAGS.step_prompt,
                             steps=FLAGS.step_steps,
                             cache_lens=[int(c) for c in FLAGS.step_caches], prompts=prompts,
                             trace_dir=FLAGS.step_trace, loops=FLAGS.step_loops)
    if FLAGS.step_trace:
      rows.append({"program": "decode step trace (busiest events)",
                   "events": trace_summary(FLAGS.step_trace, FLAGS.trace_top),
                   "streams": trace_streams(FLAGS.step_trace)})
  for row in rows:
    print(row)
  if FLAGS.out:
    device = jax.devices()[0]
    write_json({"device": f"{device.platform}: {device.device_kind}",
                "model": FLAGS.gguf or FLAGS.model,
                "shape": shape, "command": " ".join(["python", "launch/bench_compile.py"]
                                                     + sys.argv[1:]),
                "rows": rows}, FLAGS.out)


if __name__ == "__main__":
  cli.run(main)
