"""Child processes of one job (benchmark workers, one collection process per GPU): started with
their own environment and log, watched until all end; the first that fails stops the others.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from typing import Callable, Sequence


# Seconds a thread holding the GIL runs before yielding it to one that asks (Python's default:
# 5 ms). Compile threads tracing in Python would otherwise hold each waiting thread back that
# long at every reacquisition: on 2 CPU cores, reading SmolLM2's GGUF with the gguf package's
# dequantization (thousands of numpy calls, each releasing the GIL) beside two busy threads took
# 458 s instead of 0.6 (2 s at this interval). On an H200 host no clear effect was measured.
GIL_HANDOFF_S = 0.0005


def compile_pool(threads: int):
  """A pool of background compile threads; also shortens the process's GIL switch interval to
  GIL_HANDOFF_S (never lengthens it), so the threads that run beside them wait at most that
  long for the interpreter."""
  import sys
  from concurrent.futures import ThreadPoolExecutor

  if sys.getswitchinterval() > GIL_HANDOFF_S:
    sys.setswitchinterval(GIL_HANDOFF_S)
  return ThreadPoolExecutor(int(threads), thread_name_prefix="precompile")


def process_age_s() -> float | None:
  """Seconds since this process started (interpreter start, imports, flags: what precedes a
  job's own clock), from Linux's /proc; None where there is none."""
  try:
    with open("/proc/self/stat", encoding="ascii") as f:
      started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start, in clock ticks
    with open("/proc/uptime", encoding="ascii") as f:
      uptime = float(f.read().split()[0])
    return round(uptime - started / os.sysconf("SC_CLK_TCK"), 2)
  except (OSError, ValueError, IndexError):
    return None


def device_env(device: str | None, **extra) -> dict:
  """This process's environment with only `device` visible (CUDA_VISIBLE_DEVICES), if given."""
  env = dict(os.environ, **extra)
  if device is not None:
    env["CUDA_VISIBLE_DEVICES"] = str(device)
  return env


def run_processes(commands: Sequence[Sequence[str]], envs: Sequence[dict],
                  log_paths: Sequence[str], what: str = "process",
                  on_poll: Callable[[], None] | None = None, poll_s: float = 2.0,
                  keep_going: bool = False) -> None:
  """Runs the commands side by side (stdout and stderr to their logs) and waits for all;
  `on_poll()` is called every poll. A process that exits non-zero stops the others and raises
  naming its log; with `keep_going` the others run on to their end first (their work is kept:
  a benchmark worker that ran out of memory need not cost the others' strategies), and the
  error names every process that failed."""
  procs, logs = [], []
  try:
    for k, (command, env, path) in enumerate(zip(commands, envs, log_paths)):
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      logs.append(open(path, "w"))
      procs.append(subprocess.Popen(list(command), env=env, stdout=logs[-1],
                                    stderr=subprocess.STDOUT))
      logging.info("%s %d started (log %s)", what, k, path)
    reported = set()
    while True:
      running = any(p.poll() is None for p in procs)
      failed = [k for k, p in enumerate(procs) if p.returncode not in (None, 0)]
      for k in sorted(set(failed) - reported):
        if keep_going and running:
          logging.warning("%s %d failed (exit %d; see %s); the others run on", what, k,
                          procs[k].returncode, log_paths[k])
        reported.add(k)
      if on_poll is not None:
        on_poll()
      if failed and (not keep_going or not running):
        raise RuntimeError("; ".join(f"{what} {k} failed (exit {procs[k].returncode}); see "
                                     f"{log_paths[k]}" for k in failed))
      if not running:
        return
      time.sleep(poll_s)
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
        p.wait()
    for log in logs:
      log.close()
