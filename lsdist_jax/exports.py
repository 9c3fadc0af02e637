"""The export protocol shared by model and predictor exports: the params (orbax) in
<dir>/params, then a JSON meta written last and whole, whose presence marks a complete export;
read back with errors that name the export and what is wrong with it.
"""

from __future__ import annotations

import os

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
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, target) if target is not None else ckptr.restore(path)
  except (ValueError, OSError, KeyError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise BadFileError(f"{what} at {directory} cannot be read (truncated or corrupt params: "
                       f"{first[:300]})") from e
