"""Benchmark every scheduling strategy of config.benchmark.strategies on the same requests.

  python launch/benchmark.py --config=configs/smollm2_alpaca.py --workdir=runs/smollm2_alpaca
  python launch/benchmark.py --config=... --profile   # fit the cost model on this device first
  python launch/benchmark.py --config=... --workers=4 --devices=0,1   # see below

--workers=N runs N processes that share the list of strategies (each takes the next one not
taken), spread over --devices (GPU ids; each worker sees one) or all on the default device. Each
device call runs under a per-device lock and is synced before the lock is released, and the
time waiting for it is left out: one worker's timed work never overlaps another's on the same
device, while the others compile, plan and prepare. Compilation, which dominates short
benchmarks, so overlaps the runs. The process that starts the workers writes the report from
their saved results (the same requests, seeds and settings for every strategy). Worker logs:
<workdir>/<name>_state/worker<k>.log. Workers on one device share its memory (none preallocates):
choose --workers so that their models and KV budgets fit. --report_only writes the report from whatever results are
saved (e.g. after an interrupted run), with no engine.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from lsdist_jax import cli

config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "the pipeline's workdir (store, predictor exports)")
flags.DEFINE_bool("profile", False, "profile the engine, fit and save the cost model "
                  "(<workdir>/cost_model.json) and use it")
flags.DEFINE_list("profile_batches", ["8", "64", "256"], "batch sizes the profile times")
flags.DEFINE_list("profile_cache", ["256", "1024"], "cache lengths the profile times")
flags.DEFINE_list("profile_prompts", ["32"], "prompt lengths the profile times (several give "
                  "the prefill's per-token cost)")
flags.DEFINE_bool("profile_only", False, "profile, save the cost model, and stop")
flags.DEFINE_enum("profile_runner", "static", ["static", "slots"], "what the profile times: "
                  "'static' a batch's generate; 'slots' the continuous runner's own calls (its "
                  "inserts and decode calls, each call's fixed cost included), for plans of "
                  "the continuous and paged strategies")
flags.DEFINE_list("profile_inserts", ["8", "32"], "with --profile_runner=slots: the rows of the "
                  "inserts it times (each at most the slot batch's size)")
flags.DEFINE_enum("profile_sampling", "greedy", ["greedy", "config"], "how the profiled "
                  "rows sample: 'greedy', or 'config' (config.generation's temperature and top_p, "
                  "as the runs do). Its synthetic prompts give a real model flatter logits than "
                  "real prompts do, and so dearer nucleus steps than the runs pay; a model of "
                  "random weights (length replay) has them flat in the runs too: use 'config'")
flags.DEFINE_string("name", "benchmark", "output file stem")
flags.DEFINE_integer("workers", 1, "processes sharing the strategies (see the module doc)")
flags.DEFINE_list("devices", [], "GPU ids the workers are spread over (CUDA_VISIBLE_DEVICES); "
                  "empty: all workers on the default device")
flags.DEFINE_string("lock_dir", "", "where the per-device lock files live (default: the "
                    "benchmark's state folder); benchmarks run side by side on the same GPUs "
                    "pass the same folder, so their timed calls never overlap either")
flags.DEFINE_float("memory_fraction", 0.0, "with --workers: the share of its GPU's memory each "
                   "worker may use (0: no cap); set it when processes share a GPU, e.g. two "
                   "benchmarks run side by side")
flags.DEFINE_bool("report_only", False, "write the report from the results saved so far "
                  "(<workdir>/<name>_state), with no engine; missing strategies are listed")
flags.DEFINE_bool("worker", False, "internal: run as one of --workers")
flags.DEFINE_string("device_lock", "", "internal: the lock file of this worker's device")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


_PARENT_ONLY = ("--workers", "--devices", "--profile", "--worker", "--device_lock", "--lock_dir",
                "--memory_fraction")


def _child_argv(extra):
  """This command line for a child process: the parent's own flags dropped, `extra` added."""
  argv = [a for a in sys.argv[1:] if not a.split("=", 1)[0].startswith(_PARENT_ONLY)]
  return [sys.executable, os.path.abspath(sys.argv[0])] + argv + extra


def main(argv):
  del argv
  from lsdist_jax import report
  from lsdist_jax.benchmark.report import report_from_state
  from lsdist_jax.errors import ConfigError

  if FLAGS.report_only:
    out = report_from_state(FLAGS.workdir, FLAGS.name, allow_missing=True)
    print(report.markdown_table(out["rows"]))
    if out.get("not_run"):
      print("not run:", ", ".join(out["not_run"]))
    return
  if FLAGS.config is None:
    raise ConfigError("--config is required (except with --report_only)")
  if FLAGS.workers > 1 and not FLAGS.worker:
    from lsdist_jax.benchmark.workers import run_workers

    profile = None
    if FLAGS.profile:
      profile = _child_argv(["--profile", "--profile_only",
                             f"--profile_runner={FLAGS.profile_runner}",
                             f"--profile_sampling={FLAGS.profile_sampling}"] + [
          f"--profile_{k}={','.join(getattr(FLAGS, 'profile_' + k))}"
          for k in ("batches", "cache", "prompts", "inserts")])
    run_workers(lambda lock: _child_argv(["--worker", f"--device_lock={lock}"]), FLAGS.workdir,
                FLAGS.name, FLAGS.workers, FLAGS.devices, lock_dir=FLAGS.lock_dir,
                profile_command=profile, memory_fraction=FLAGS.memory_fraction)
    # then the report below, every result loaded
  from lsdist_jax.logs import quiet_libraries

  quiet_libraries()
  from lsdist_jax import paths
  from lsdist_jax.benchmark.profile import profile_and_save
  from lsdist_jax.benchmark.run import run_benchmark
  from lsdist_jax.engine import load_engine

  config = FLAGS.config
  workdir = FLAGS.workdir
  config.collect.store = paths.store(config, workdir)
  engine = load_engine(config)
  if FLAGS.worker:
    engine.generator.device_lock = FLAGS.device_lock or None
  cost = None
  if FLAGS.profile and FLAGS.workers <= 1:
    ints = lambda values: [int(v) for v in values]
    cost = profile_and_save(engine, workdir, ints(FLAGS.profile_batches),
                            ints(FLAGS.profile_cache), ints(FLAGS.profile_prompts),
                            runner=FLAGS.profile_runner,
                            insert_rows=ints(FLAGS.profile_inserts),
                            sampling=((config.generation.temperature, config.generation.top_p)
                                      if FLAGS.profile_sampling == "config" else (0.0, 1.0)))
    if FLAGS.profile_only:
      print(cost.to_json())
      return
  out = run_benchmark(config, workdir, engine=engine,
                      predictor_dirs=paths.predictor_exports(workdir), cost=cost,
                      out_name=FLAGS.name, worker=FLAGS.worker)
  if not FLAGS.worker:
    print(report.markdown_table(out["rows"]))


if __name__ == "__main__":
  cli.run(main)
