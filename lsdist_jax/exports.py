"""The export protocol shared by model and predictor exports: the params (orbax) in
<dir>/params, then a JSON meta written last and whole, whose presence marks a complete export;
read back with errors that name the export and what is wrong with it.
"""

from __future__ import annotations

import logging
import os
import sys

from lsdist_jax.errors import BadFileError, MissingFileError
from lsdist_jax.files import read_json, write_json

PARAMS = "params"


def save(directory: str, params, meta: dict, meta_name: str) -> str:
  """Writes `params` with orbax, then `meta` (with its "format") as <directory>/<meta_name>."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, meta_name)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # the export is incomplete until the params are rewritten
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS), params, force=True)
  write_json(meta, meta_path)
  return directory


def is_export(directory: str, meta_name: str) -> bool:
  return os.path.isfile(os.path.join(directory, meta_name))


def read_meta(directory: str, meta_name: str, fmt: str, what: str) -> dict:
  """The meta of a complete export of format `fmt`; a clear error otherwise."""
  path = os.path.join(os.path.abspath(directory), meta_name)
  if not os.path.isfile(path):
    raise MissingFileError(f"no {what} at {directory} (missing {meta_name})")
  meta = read_json(path, what=f"{what} meta")
  if not isinstance(meta, dict) or meta.get("format") != fmt:
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise BadFileError(f"{path} is not a {what} meta (format {found!r}, expected {fmt!r})")
  return meta


def restore_params(directory: str, target=None, what: str = "export"):
  """The params of an export (shaped like `target` where given); a truncated or corrupt export
  is a BadFileError naming it."""
  import orbax.checkpoint as ocp

  path = os.path.join(os.path.abspath(directory), PARAMS)
  if not os.path.isdir(path):
    raise BadFileError(f"{what} at {directory} has no {PARAMS}/ folder: incomplete or corrupt")
  quiet_abandoned_reads()
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, target) if target is not None else ckptr.restore(path)
  except Exception as e:  # noqa: BLE001 - orbax wraps some tensorstore read errors in Exception
    raise BadFileError(f"{what} at {directory} cannot be read (truncated or corrupt params: "
                       f"{read_error_text(e)})") from e


def read_error_text(error: BaseException) -> str:
  """The first line of the innermost cause of a failed read (orbax wraps tensorstore's error,
  which names the file and what is wrong with it, in one that names neither)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip()
  return (text.splitlines()[0] if text else type(error).__name__)[:300]


_quieted = False


def quiet_abandoned_reads() -> None:
  """When a restore fails, orbax closes its event loop while tensorstore still finishes the
  reads it had started: each then reports "Event loop is closed" on stderr (and asyncio the
  read errors nobody retrieved), burying the one error that matters. Hides those reports
  (installed once per process, before a restore); anything else still reaches stderr."""
  global _quieted
  if _quieted:
    return
  _quieted = True
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_not_an_abandoned_read)


def _not_an_abandoned_read(record: logging.LogRecord) -> bool:
  """False for asyncio's report of an orbax read's error that nobody awaited any more."""
  text = record.getMessage()
  return not ("exception was never retrieved" in text
              and ("OCDBT" in text or "orbax" in text or "tensorstore" in text))
