"""Multi-GPU decode rows (issue 16): one row per call, or --merge the rows into the report.

  python launch/bench_multigpu.py --model=llama-2-7b --data=1 --tensor=2 --batch=48 \
      --cache=1024 --decode_attention=pallas --row_out=rows/tp2.json
  python launch/bench_multigpu.py --merge=rows --out=docs/results/multigpu.json
  python launch/bench_multigpu.py ... --trace=<dir>   # where a step's time goes, in the row
scripts/multigpu_gpu.sh runs the whole session (one GPU, tensor and data parallel, two
processes on one global mesh, one process per GPU).
"""

import glob
import json
import os

from absl import flags

from lsdist_jax import cli

flags.DEFINE_string("model", "llama-2-7b", "preset whose shape gets random weights")
flags.DEFINE_integer("data", 1, "data-parallel mesh axis")
flags.DEFINE_integer("tensor", 1, "tensor-parallel (model) mesh axis")
flags.DEFINE_integer("batch", 48, "rows in all (split over data)")
flags.DEFINE_integer("cache", 1024, "KV-cache length")
flags.DEFINE_string("decode_attention", "pallas", "auto | pallas | dot | reduce")
flags.DEFINE_integer("steps", 256, "decode steps every row runs")
flags.DEFINE_integer("repeats", 3, "timed repeats (median)")
flags.DEFINE_string("row_out", "", "write this row's JSON here")
flags.DEFINE_string("group", "", "tag rows of independent processes run side by side (merged)")
flags.DEFINE_string("coordinator", "", "jax.distributed coordinator host:port (one global mesh "
                    "over every process's devices)")
flags.DEFINE_integer("num_processes", 1, "processes of the jax.distributed job")
flags.DEFINE_integer("process_id", 0, "this process's index in the job")
flags.DEFINE_string("trace", "", "also trace a half-length call with jax.profiler into this "
                    "folder and summarize it in the row (\"trace\": per step, device streams' "
                    "busy time against their span, device time by event kind, busiest events)")
flags.DEFINE_string("merge", "", "folder of row JSON files to merge into --out")
flags.DEFINE_string("out", "docs/results/multigpu.json", "the report (--merge)")
flags.DEFINE_string("command", "bash scripts/multigpu_gpu.sh", "the command recorded in --out")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.benchmark.engine import measure_mesh_row, merge_mesh_rows
  from lsdist_jax.files import write_json

  if FLAGS.merge:
    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(FLAGS.merge, "*.json")))]
    write_json(merge_mesh_rows(rows, FLAGS.command), FLAGS.out)
    return
  span = "local"
  if FLAGS.coordinator:
    import ml_collections
    from lsdist_jax import sharding as shd

    shd.maybe_initialize_distributed(ml_collections.ConfigDict({
        "distributed": True, "coordinator_address": FLAGS.coordinator,
        "num_processes": FLAGS.num_processes, "process_id": FLAGS.process_id}))
    span = "global"
  row = measure_mesh_row(FLAGS.model, FLAGS.data, FLAGS.tensor, FLAGS.batch, FLAGS.cache,
                         FLAGS.decode_attention, steps=FLAGS.steps, repeats=FLAGS.repeats,
                         span=span, trace_dir=FLAGS.trace)
  if FLAGS.group:
    row["group"] = FLAGS.group
  if FLAGS.row_out and FLAGS.process_id == 0:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.row_out)), exist_ok=True)
    write_json(row, FLAGS.row_out)


if __name__ == "__main__":
  cli.run(main)
