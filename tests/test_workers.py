"""Benchmark workers' orchestration (`benchmark.run_workers`) with stand-in worker commands."""

import os
import sys

import pytest

from lsdist_jax.benchmark.workers import run_workers
from lsdist_jax.paths import benchmark_state as state_dir


def _command(out_dir, code=0, env="CUDA_VISIBLE_DEVICES"):
  """A stand-in worker: records its lock path and the variable `env`, then exits with `code`."""
  script = ("import os, sys; open(os.path.join(sys.argv[1], str(os.getpid())), 'w').write("
            "sys.argv[2] + ' ' + os.environ.get(%r, '-')); sys.exit(%d)" % (env, code))
  return lambda lock: [sys.executable, "-c", script, str(out_dir), lock]


def test_workers_are_dealt_devices_with_one_lock_each(tmp_path):
  out = tmp_path / "seen"
  out.mkdir()
  workdir = tmp_path / "work"
  run_workers(_command(out), str(workdir), "bench", 3, devices=["4", "7"], poll_s=0.05)
  seen = sorted(p.read_text() for p in out.iterdir())
  locks = os.path.join(state_dir(str(workdir), "bench"), "device_%s.lock")
  assert seen == sorted([f"{locks % '4'} 4", f"{locks % '7'} 7", f"{locks % '4'} 4"])
  assert all((tmp_path / "work" / "bench_state" / f"worker{k}.log").exists() for k in range(3))


def test_memory_fraction_caps_each_worker_and_is_checked(tmp_path, monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  for fraction, expected in ((0.3, "0.3"), (0.0, "-")):
    out = tmp_path / f"seen{fraction}"
    out.mkdir()
    run_workers(_command(out, env="XLA_PYTHON_CLIENT_MEM_FRACTION"), str(tmp_path / "work"),
                "bench", 2, poll_s=0.05, memory_fraction=fraction)
    assert sorted(p.read_text().split()[1] for p in out.iterdir()) == [expected, expected]
  with pytest.raises(ValueError, match="memory_fraction"):
    run_workers(_command(tmp_path), str(tmp_path / "work"), "bench", 1, memory_fraction=1.5)


def test_only_workers_that_share_a_device_grow_their_allocators(tmp_path, monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  for k, (devices, locks, expected) in enumerate((
      (["0", "1"], "", ["-", "-"]), (["0"], "", ["false", "false"]),
      ([], "", ["false", "false"]), (["0", "1"], str(tmp_path / "locks"), ["false", "false"]))):
    out = tmp_path / f"seen{k}"
    out.mkdir()
    run_workers(_command(out, env="XLA_PYTHON_CLIENT_PREALLOCATE"), str(tmp_path / "work"),
                "bench", 2, devices=devices, lock_dir=locks, poll_s=0.05)
    assert sorted(p.read_text().split()[1] for p in out.iterdir()) == expected


def test_a_failed_worker_is_reported_with_its_log(tmp_path):
  with pytest.raises(RuntimeError, match=r"worker 0 failed \(exit 3\).*worker0.log"):
    run_workers(_command(tmp_path, code=3), str(tmp_path / "work"), "bench", 1, poll_s=0.05)


def test_the_other_workers_finish_before_a_failure_is_raised(tmp_path):
  slow = ("import os, sys, time; time.sleep(1.0); "
          "open(os.path.join(sys.argv[1], 'finished'), 'w').close()")
  fail = "import sys; sys.exit(5)"
  commands = iter([[sys.executable, "-c", fail, str(tmp_path)],
                   [sys.executable, "-c", slow, str(tmp_path)]])
  with pytest.raises(RuntimeError, match=r"worker 0 failed \(exit 5\).*rerun the same command"):
    run_workers(lambda lock: next(commands), str(tmp_path / "work"), "bench", 2, poll_s=0.05)
  assert (tmp_path / "finished").exists()  # worker 1 was not stopped: it ran to its end


def test_claims_of_an_interrupted_run_are_dropped(tmp_path):
  directory = state_dir(str(tmp_path), "bench")
  os.makedirs(directory)
  open(os.path.join(directory, "ours.r0.json.claim"), "w").close()
  run_workers(_command(tmp_path), str(tmp_path), "bench", 1, lock_dir=str(tmp_path / "locks"),
              poll_s=0.05)
  assert not os.path.exists(os.path.join(directory, "ours.r0.json.claim"))
  assert (tmp_path / "locks").is_dir()


def test_state_of_another_benchmark_is_refused_and_workers_starting_together_agree(tmp_path):
  import threading

  from lsdist_jax.benchmark.state import ResumeState as _ResumeState

  for attempt in range(5):
    directory = str(tmp_path / f"state{attempt}")
    errors, start = [], threading.Barrier(12)

    def open_state():
      start.wait()
      try:
        _ResumeState(directory, {"requests": [1, 2, 3]})
      except ValueError as e:
        errors.append(e)

    threads = [threading.Thread(target=open_state) for _ in range(12)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert not errors  # never a half-written identity
  with pytest.raises(ValueError, match="another benchmark"):
    _ResumeState(directory, {"requests": [1, 2, 4]})
