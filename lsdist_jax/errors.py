"""Errors that are the user's to fix (a missing or corrupt file, a bad config value, a refused
input line): launchers print them as one `error: ...` line and exit with status 2, without a
traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem with what the user gave, described in a message that names it."""


class MissingFileError(UserError, FileNotFoundError):
  pass


class BadFileError(UserError, ValueError):
  """A file that exists but is not what it claims to be (truncated, not JSON, wrong format)."""


class ConfigError(UserError, ValueError):
  """A config value or flag that cannot work."""


class InputError(UserError, ValueError):
  """Input lines that are refused (malformed, too long for the context)."""


class LockHeldError(UserError, RuntimeError):
  """Another process holds a lock this one needs."""


class StateMismatchError(UserError, ValueError):
  """Resumable state made with other inputs or settings than this run's."""
