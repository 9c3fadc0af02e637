"""What planners take and give: the requests (prompt lengths and predicted length pmfs, scalars
or true lengths), the planner options, and a plan of batches. numpy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lsdist_jax.schedule import dist


@dataclasses.dataclass
class Batch:
  members: np.ndarray  # request indices
  cap: int  # the most tokens a member may generate in this batch
  phase: str = "main"


@dataclasses.dataclass
class Plan:
  batches: list[Batch]
  strategy: str
  threshold: float | None = None
  expected_cost: float | None = None  # seconds, from the cost model and the pmfs
  notes: dict = dataclasses.field(default_factory=dict)

  def members(self) -> np.ndarray:
    return np.concatenate([b.members for b in self.batches]) if self.batches else np.zeros(0, int)


@dataclasses.dataclass
class Requests:
  prompt_len: np.ndarray  # [n]
  max_seq_len: int
  length_pmf: np.ndarray | None = None  # [n, M+1] predicted pmf of the response length
  scalar_length: np.ndarray | None = None  # [n] a scalar prediction (baselines)
  true_length: np.ndarray | None = None  # [n] known lengths (oracle)
  # [n] each request's own limit on generated tokens (an OpenAI batch line's max_tokens), or
  # None: max_seq_len - prompt only. The pmf's mass beyond it is moved onto it, scalar and true
  # lengths are clipped to it, and it bounds `room`: a short-capped request is planned short.
  max_tokens: np.ndarray | None = None

  def __post_init__(self):
    self.prompt_len = np.asarray(self.prompt_len, np.int64)
    n = self.prompt_len.size
    if self.max_tokens is not None:
      self.max_tokens = np.asarray(self.max_tokens, np.int64).reshape(-1)
      if self.max_tokens.size != n or (self.max_tokens < 1).any():
        raise ValueError(f"max_tokens must hold one limit >= 1 per request ({n}); got "
                         f"{self.max_tokens.size} values, min {self.max_tokens.min(initial=1)}")
    if (self.prompt_len >= self.max_seq_len).any():
      i = int(np.argmax(self.prompt_len >= self.max_seq_len))
      raise ValueError(f"request {i}: prompt of {self.prompt_len[i]} tokens leaves no room in "
                       f"max_seq_len={self.max_seq_len}")
    for name in ("length_pmf", "scalar_length", "true_length"):
      value = getattr(self, name)
      if value is not None and len(value) != n:
        raise ValueError(f"{name} has {len(value)} rows for {n} requests")
    if self.length_pmf is not None:
      self.length_pmf = dist.normalize(self.length_pmf)
    if self.max_tokens is not None:
      if self.length_pmf is not None:
        self.length_pmf = dist.truncate(self.length_pmf, self.max_tokens)
      for name in ("scalar_length", "true_length"):
        value = getattr(self, name)
        if value is not None:
          setattr(self, name, np.minimum(np.asarray(value), self.max_tokens))

  @property
  def n(self) -> int:
    return int(self.prompt_len.size)

  @property
  def room(self) -> np.ndarray:
    """The most tokens each request can generate (max_seq_len - prompt, and its max_tokens)."""
    room = self.max_seq_len - self.prompt_len
    return room if self.max_tokens is None else np.minimum(room, self.max_tokens)

  def length_cdf(self) -> np.ndarray:
    """dist.cdf(length_pmf), computed once per pmf (the searches ask for many quantiles)."""
    cached = self.__dict__.get("_length_cdf")
    if cached is None or cached[0] is not self.length_pmf:
      cached = (self.length_pmf, dist.cdf(self.length_pmf))
      self.__dict__["_length_cdf"] = cached
    return cached[1]

  def pmf_within_room(self) -> np.ndarray:
    """The predicted pmf with mass beyond each request's room folded onto the room."""
    return dist.truncate(self.length_pmf, self.room)


def _schedule_default(key: str):
  """A field whose default is config.py's `schedule.<key>` (defaults live there only)."""
  from lsdist_jax.config import defaults
  return dataclasses.field(default_factory=lambda: defaults("schedule")[key])


@dataclasses.dataclass
class Options:
  """The planners' settings: config.py's `schedule` section (`from_config`)."""
  threshold: float = _schedule_default("threshold")
  kv_budget_tokens: int = _schedule_default("kv_budget_tokens")
  max_batch: int = _schedule_default("max_batch")
  fixed_batch: int = _schedule_default("fixed_batch")
  ssch_cell: int = _schedule_default("ssch_cell")
  fcr_slack: int = _schedule_default("fcr_slack")
  fcr: bool = _schedule_default("fcr")
  recovery_threshold: float = _schedule_default("recovery_threshold")
  compile_seconds: float = _schedule_default("compile_seconds")
  # programs compiled or compiling already (keys as `continuous.programs` makes them, e.g. the
  # decode loop the generate job starts compiling while its model loads): no compile_seconds
  compiled: frozenset = frozenset()

  def __post_init__(self):
    if isinstance(self.kv_budget_tokens, str):
      raise ValueError(f"kv_budget_tokens={self.kv_budget_tokens!r}: resolve it to a number of "
                       "tokens before planning (serve.plan.planner_options sizes 'auto' from "
                       "the device)")
    self.kv_budget_tokens = int(self.kv_budget_tokens)

  @classmethod
  def from_config(cls, schedule_config) -> "Options":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: schedule_config[k] for k in schedule_config.keys() if k in fields})
