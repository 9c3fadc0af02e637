"""Benchmark workers: several processes share the list of strategies (each claims the next one
not taken), spread over GPUs; this process starts them, follows their saved results and, when
one fails, lets the others finish before it raises.
"""

from __future__ import annotations

import logging
import os
import subprocess
from typing import Sequence

from lsdist_jax import paths
from lsdist_jax.benchmark.state import clear_claims, saved_strategies
from lsdist_jax.processes import device_env, run_processes


def run_workers(command, workdir: str, out_name: str, workers: int, devices: Sequence[str] = (),
                lock_dir: str = "", profile_command: Sequence[str] | None = None,
                poll_s: float = 2.0, memory_fraction: float = 0.0) -> None:
  """Runs `workers` benchmark processes that share the strategies (`run_benchmark(worker=True)`)
  and waits for them, logging each result as it is saved. A failed worker does not stop the
  others: they run the strategies left, and then this raises naming it (a rerun with the same
  workdir resumes what it had claimed).

  command(lock_path) -> a worker's argv; devices: GPU ids dealt to the workers in turn (each
  sees one, CUDA_VISIBLE_DEVICES), or none (all on the default device); one lock file per
  device, in lock_dir (default: the state folder); workers that share a device, or a lock_dir
  with another benchmark, grow their allocators instead of preallocating. profile_command: run
  first, on the first device (it fits and saves the cost model the workers then load).
  memory_fraction (0: no cap): the share of its GPU's memory each worker's allocator may grow
  to (XLA_PYTHON_CLIENT_MEM_FRACTION), for processes that share a GPU: without a cap,
  allocators that grew in turn can leave a neighbour short mid-run."""
  if not 0.0 <= memory_fraction <= 1.0:
    raise ValueError(f"memory_fraction must be in [0, 1] (0: no cap), got {memory_fraction}")
  devices = list(devices)
  placed = [devices[k % len(devices)] if devices else None for k in range(workers)]
  extra = {}
  if lock_dir or len(set(placed)) < len(placed):
    # Workers that share a GPU (with each other, or with another benchmark: a shared lock_dir)
    # grow their allocators as they need. A worker with a GPU to itself keeps JAX's
    # preallocated pool: grown in pieces, a pool cannot merge them, and strategies that
    # allocate caches of many sizes in turn then run out of memory on a card that holds any
    # one of them (session 19: 42 GiB refused after vanilla:best on an H200).
    extra["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  if memory_fraction:
    extra["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{memory_fraction:g}"

  if profile_command:
    env = device_env(devices[0] if devices else None)
    subprocess.run(list(profile_command), env=env, check=True)
  clear_claims(workdir, out_name)
  directory = paths.benchmark_state(workdir, out_name)
  os.makedirs(lock_dir or directory, exist_ok=True)
  os.makedirs(directory, exist_ok=True)
  locks = [os.path.join(lock_dir or directory, f"device_{d or 'default'}.lock") for d in placed]
  seen = set(saved_strategies(workdir, out_name))

  def report_saved():
    nonlocal seen
    now = set(saved_strategies(workdir, out_name))
    for stem in sorted(now - seen):
      logging.info("done: %s (%d saved)", stem, len(now))
    seen = now

  try:
    run_processes([command(lock) for lock in locks],
                  [device_env(d, **extra) for d in placed],
                  [os.path.join(directory, f"worker{k}.log") for k in range(workers)],
                  what="benchmark worker", on_poll=report_saved, poll_s=poll_s,
                  keep_going=True)  # a failed worker's strategy stays unsaved: a rerun resumes it
  except RuntimeError as e:
    raise RuntimeError(f"{e}. The strategies saved so far are kept in {directory}: rerun the "
                       "same command to run the rest, or --report_only to report them") from e
