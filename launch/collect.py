"""Collect sampled response lengths and prompt hidden states into the store (resumable).

  python launch/collect.py --config=configs/smollm2_alpaca.py --workdir=runs/smollm2
  python launch/collect.py --config=configs/smollm2_alpaca.py:gpu --devices=0,1   # 1 process/GPU

--devices=0,1,... runs one collection process per GPU on this host (each sees one GPU; they join
one `jax.distributed` job on localhost and split the prompts), then writes the combined summary.
Across hosts, run this launcher on every host with --config.mesh.distributed=True instead.
"""

import os
import socket
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "output directory (default: config.workdir)")
flags.DEFINE_bool("plots", True, "write length-distribution plots (PNG) beside the summary")
flags.DEFINE_list("devices", [], "GPU ids: one collection process per GPU (empty: this process "
                  "on all of its devices)")
flags.DEFINE_string("summary", "collect_summary", "summary file stem in the workdir")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _per_device(workdir: str) -> dict:
  """Runs this command once per --devices GPU, each a process of one jax.distributed job."""
  from lsdist_jax.collect import combine_summaries
  from lsdist_jax.files import read_json
  from lsdist_jax.processes import device_env, run_processes

  devices, port = FLAGS.devices, _free_port()
  own = ("--devices", "--summary", "--plots")
  base = [a for a in sys.argv[1:] if not a.split("=", 1)[0].startswith(own)]
  commands = [[sys.executable, os.path.abspath(sys.argv[0])] + base + [
      f"--workdir={workdir}", f"--summary={FLAGS.summary}.p{k}", "--noplots",
      "--config.mesh.distributed=True", f"--config.mesh.coordinator_address=127.0.0.1:{port}",
      f"--config.mesh.num_processes={len(devices)}", f"--config.mesh.process_id={k}"]
      for k in range(len(devices))]
  started = time.perf_counter()
  run_processes(commands, [device_env(d) for d in devices],
                [os.path.join(workdir, f"{FLAGS.summary}.p{k}.log") for k in range(len(devices))],
                what="collection process")
  parts = [read_json(os.path.join(workdir, f"{FLAGS.summary}.p{k}.json"))
           for k in range(len(devices))]
  return combine_summaries(parts, time.perf_counter() - started)


def main(argv):
  del argv
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax import report
  from lsdist_jax.files import write_json

  config = FLAGS.config
  workdir = FLAGS.workdir or config.workdir
  os.makedirs(workdir, exist_ok=True)
  if len(FLAGS.devices) == 1:  # before JAX starts: this process sees that GPU only
    os.environ["CUDA_VISIBLE_DEVICES"] = FLAGS.devices[0]
  if len(FLAGS.devices) > 1:
    summary = _per_device(workdir)
  else:
    from lsdist_jax.collect import collect

    summary = collect(config, workdir)
  write_json(summary, os.path.join(workdir, f"{FLAGS.summary}.json"))
  print(report.collect_summary_text(summary))
  if FLAGS.plots:
    paths = report.plot_collection(summary["store"], workdir)
    logging.info("plots: %s", paths)


if __name__ == "__main__":
  cli.run(main)
