"""Where a predictor's training resumes: <workdir>/checkpoints holds `latest` (the two newest
epochs' training state), `best` (the params of the best epoch so far) and run.json (the run's
predictor spec). A newest checkpoint that cannot be read (a crash or a full disk mid-write) is
named in a warning, removed, and the one before it used; epochs are deterministic, so the run
repeats the lost ones exactly.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from lsdist_jax import exports
from lsdist_jax.errors import BadFileError, StateMismatchError, UserError
from lsdist_jax.files import read_json, write_json

RUN_META = "run.json"
KEEP_LATEST = 2  # the newest and the one before it, to fall back on


def managers(workdir: str):
  """(checkpoints folder, `latest` manager, `best` manager)."""
  import orbax.checkpoint as ocp

  root = os.path.abspath(os.path.join(workdir, "checkpoints"))
  latest = ocp.CheckpointManager(os.path.join(root, "latest"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=KEEP_LATEST))
  best = ocp.CheckpointManager(os.path.join(root, "best"),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1))
  return root, latest, best


def _shapes(tree) -> list:
  return [(np.shape(x), np.dtype(getattr(x, "dtype", np.asarray(x).dtype)))
          for x in jax.tree.leaves(tree)]


def _restore(manager, step: int, state):
  """The training state saved at `step`, shaped like `state`; raises on a checkpoint that cannot
  be read or holds other shapes (orbax itself would return the shapes on disk)."""
  import orbax.checkpoint as ocp

  exports.quiet_abandoned_reads()
  restored = manager.restore(step, args=ocp.args.StandardRestore(state))
  if _shapes(restored) != _shapes(state):
    raise ValueError("its arrays have other shapes than this run's predictor")
  return restored


def _read_run_meta(path: str) -> dict | None:
  """The saved run.json, or None (with a warning) when it is missing or unreadable."""
  if not os.path.isfile(path):
    logging.warning("%s is missing; checking the checkpoints against this run's predictor", path)
    return None
  try:
    saved = read_json(path, what="training run record")
  except UserError as e:
    logging.warning("%s; checking the checkpoints against this run's predictor", e)
    return None
  return saved if isinstance(saved, dict) else None


def resume(root: str, latest, best, state, run_meta: dict):
  """The state to continue from: that of the newest readable `latest` checkpoint, or None for a
  fresh run (whose run.json is written here). Refuses checkpoints of another predictor."""
  meta_path = os.path.join(root, RUN_META)
  steps = sorted(latest.all_steps(), reverse=True)
  if not steps:
    write_json(run_meta, meta_path)
    return None
  spec = run_meta["spec"]
  saved = _read_run_meta(meta_path)
  if saved is not None and saved.get("spec") != spec:
    raise StateMismatchError(f"{root} holds a training run of another predictor "
                             f"({saved.get('spec')}); this config asks for {spec}: use another "
                             "--workdir")
  failures = []
  for step in steps:
    try:
      restored = _restore(latest, step, state)
    except Exception as e:  # noqa: BLE001 - orbax raises ValueError, OSError, bare Exception...
      failures.append((step, exports.read_error_text(e)))
      continue
    _drop_unreadable(root, latest, best, step, failures)
    if saved is None:
      logging.warning("rebuilt %s from this run's predictor spec: checkpoint %d restores "
                      "into it", meta_path, step)
      write_json(run_meta, meta_path)
    return restored
  listed = (f"steps {', '.join(str(s) for s, _ in failures)}; step {failures[0][0]}: "
            f"{failures[0][1]}")
  if saved is None:
    raise StateMismatchError(
        f"{root} has checkpoints but no readable {RUN_META}, and none of them restores into "
        f"this config's predictor {spec} (another predictor's run, or corrupt: {listed}); "
        f"delete {root} to train from the start, or use another --workdir")
  raise BadFileError(f"no checkpoint in {os.path.join(root, 'latest')} can be read ({listed}); "
                     f"delete {root} to train this predictor from the start")


def _drop_unreadable(root, latest, best, good: int, failures) -> None:
  """Removes the unreadable checkpoints newer than `good`, and best params saved after it: the
  resumed run repeats those epochs and saves them again."""
  for step, why in failures:
    logging.warning("checkpoint %s cannot be read (%s); removed, resuming from checkpoint %d",
                    os.path.join(root, "latest", str(step)), why, good)
    latest.delete(step)
  for step in best.all_steps():
    if step > good:
      best.delete(step)


def restore_best(root: str, best, params):
  """(epoch, params) of the best checkpoint; a BadFileError naming it when it cannot be read."""
  import orbax.checkpoint as ocp

  step = best.latest_step()
  if step is None:
    raise BadFileError(f"{os.path.join(root, 'best')} holds no checkpoint; delete {root} to "
                       "train this predictor from the start")
  exports.quiet_abandoned_reads()
  try:
    restored = best.restore(step, args=ocp.args.StandardRestore({"params": params}))
    if _shapes(restored["params"]) != _shapes(params):
      raise ValueError("its arrays have other shapes than this run's predictor")
  except Exception as e:  # noqa: BLE001 - orbax raises ValueError, OSError, bare Exception...
    raise BadFileError(f"best checkpoint {os.path.join(root, 'best', str(step))} cannot be read "
                       f"({exports.read_error_text(e)}); delete {root} to train this predictor "
                       "from the start") from e
  return step, restored["params"]
