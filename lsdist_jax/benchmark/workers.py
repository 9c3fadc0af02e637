"""Benchmark workers: several processes share the list of strategies (each claims the next one
not taken), spread over GPUs; this process starts them, follows their saved results and stops
them all when one fails.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from typing import Sequence

from lsdist_jax import paths
from lsdist_jax.benchmark.state import clear_claims, saved_strategies


def run_workers(command, workdir: str, out_name: str, workers: int, devices: Sequence[str] = (),
                lock_dir: str = "", profile_command: Sequence[str] | None = None,
                poll_s: float = 2.0) -> None:
  """Runs `workers` benchmark processes that share the strategies (`run_benchmark(worker=True)`)
  and waits for them, logging each result as it is saved; a failed worker stops the others.

  command(lock_path) -> a worker's argv; devices: GPU ids dealt to the workers in turn (each
  sees one, CUDA_VISIBLE_DEVICES), or none (all on the default device); one lock file per
  device, in lock_dir (default: the state folder). profile_command: run first, on the first
  device (it fits and saves the cost model the workers then load)."""

  devices = list(devices)
  if profile_command:
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": devices[0]} if devices else {}))
    subprocess.run(list(profile_command), env=env, check=True)
  clear_claims(workdir, out_name)
  directory = paths.benchmark_state(workdir, out_name)
  os.makedirs(lock_dir or directory, exist_ok=True)
  os.makedirs(directory, exist_ok=True)
  procs, logs = [], []
  try:
    for k in range(workers):
      device = devices[k % len(devices)] if devices else "default"
      env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # devices are shared
      if devices:
        env["CUDA_VISIBLE_DEVICES"] = device
      logs.append(open(os.path.join(directory, f"worker{k}.log"), "w"))
      lock = os.path.join(lock_dir or directory, f"device_{device}.lock")
      procs.append(subprocess.Popen(list(command(lock)), env=env, stdout=logs[-1],
                                    stderr=subprocess.STDOUT))
      logging.info("worker %d on device %s (log %s)", k, device, logs[-1].name)
    seen = set(saved_strategies(workdir, out_name))
    while True:
      running = any(p.poll() is None for p in procs)
      failed = [k for k, p in enumerate(procs) if p.returncode not in (None, 0)]
      if failed:
        raise RuntimeError(f"benchmark worker {failed[0]} failed (exit "
                           f"{procs[failed[0]].returncode}); see {logs[failed[0]].name}")
      now = set(saved_strategies(workdir, out_name))
      for stem in sorted(now - seen):
        logging.info("done: %s (%d saved)", stem, len(now))
      seen = now
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
