"""Logging setup for the launchers: our progress lines stay, libraries' chatter goes."""

import logging

_NOISY = ("orbax", "etils", "jax/_src", "absl/")


class _DropNoisy(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(n in record.pathname for n in _NOISY)


def quiet_libraries() -> None:
  """Hide INFO records that libraries (orbax checkpointing, jax) send through absl logging."""
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_DropNoisy())
  logging.getLogger("absl").addFilter(_DropNoisy())
