"""How every launcher runs: absl's `app.run`, with the user's errors (`errors.UserError`: a
missing or corrupt file, a bad config value, a refused input) printed as one `error: ...` line
and exit status 2 instead of a traceback, including a config override naming an unknown key.
Unexpected errors keep their traceback.
"""

from __future__ import annotations

import ast
import os
import sys

from absl import app, flags

from lsdist_jax.errors import UserError


flags.DEFINE_bool("no_compile_cache", False, "do not keep compiled programs in the persistent "
                  "compilation cache (engine.compilation_cache) for this run")


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_override_error(error: BaseException) -> str | None:
  """The message of an unknown `--config.<key>` override, which ml_collections raises as a
  KeyError or AttributeError while absl parses the flags; None for anything else."""
  if not isinstance(error, (KeyError, AttributeError)):
    return None
  frames = []
  tb = error.__traceback__
  while tb is not None:
    frames.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  if not any("config_flags" in f for f in frames):
    return None
  text = str(error.args[0]) if error.args else str(error)
  for _ in range(2):  # ml_collections nests the repr of the key in its message
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      break
  text = " ".join(part.strip() for part in text.splitlines() if part.strip())
  overrides = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
  return (f"unknown config key in {', '.join(overrides) or 'a --config override'}: "
          f"{text.strip()}")


def run(main) -> None:
  """`app.run(main)`, user errors as one line and exit status 2."""
  def guarded(argv):
    if flags.FLAGS.no_compile_cache:  # read by engine.compilation_cache_dir
      os.environ["LSDIST_NO_COMPILE_CACHE"] = "1"
    try:
      return main(argv)
    except UserError as e:
      fail(str(e))

  try:
    app.run(guarded)
  except (KeyError, AttributeError) as e:
    message = _config_override_error(e)
    if message is None:
      raise
    fail(message)
