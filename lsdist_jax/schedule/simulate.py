"""A plan replayed against known response lengths under the cost model: the seconds the runner
would spend, without an engine (numpy only). For planner research, and to size a GPU run first.

It follows the runner's rules: a batch runs until its longest member ends or `cap` steps (a row
of r tokens runs r steps, the last sampling its EOS; r - 1 where r reaches its room: it is done
as it takes its last token); a row that reaches the cap is continued by recovery batches from
prompt + what it generated; at step i an unfinished row reads its prompt + i cache tokens (the
live-token term of the cost model).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from lsdist_jax.schedule.cost import CostModel
from lsdist_jax.schedule.types import Batch, Plan, Requests


@dataclasses.dataclass
class SimResult:
  seconds: float
  batches: int  # main batches
  recovery_batches: int
  generated_tokens: int  # sum of the true lengths (each generated once)
  computed_tokens: int  # padded rows x (steps + 1), as the runner counts them

  @property
  def effective_token_ratio(self) -> float:
    return self.generated_tokens / max(self.computed_tokens, 1)


def ends_at_room(rest, room_left, cap=None):
  """1 where a row with `rest` tokens still to generate takes the last token of its room
  (`room_left`: the request's room less what it has) within `cap`, else 0: the engines mark
  such a row done as they accept that token, so it runs one decode step fewer than a row of
  that length that ends at EOS (whose last step samples the EOS). Elementwise; the rule every
  simulator here counts steps by."""
  rest = np.asarray(rest)
  hit = (rest > 0) & (rest == np.asarray(room_left))
  return (hit if cap is None else hit & (rest <= np.asarray(cap))).astype(np.int64)


def simulate(plan: Plan, requests: Requests, true_length: np.ndarray, cost: CostModel,
             recover: Callable[[np.ndarray, np.ndarray], Sequence[Batch]] | None = None,
             max_recovery_rounds: int = 16) -> SimResult:
  """Seconds of `plan` (then its recovery rounds) when request r generates true_length[r]
  tokens (at most its room); `recover(unfinished, generated)` plans each recovery round."""
  true_length = np.minimum(np.asarray(true_length, np.int64), requests.room)
  generated = np.zeros(requests.n, np.int64)
  done = np.zeros(requests.n, bool)
  totals = {"seconds": 0.0, "computed": 0, "main": 0, "recovery": 0}

  def run(members: np.ndarray, cap: int, phase: str) -> None:
    prompt = requests.prompt_len[members] + generated[members]
    cap = int(max(1, min(cap, requests.max_seq_len - int(prompt.min()))))
    rest = true_length[members] - generated[members]
    tokens_row = np.minimum(rest, cap)  # [m]
    steps_row = tokens_row - ends_at_room(rest, requests.room[members] - generated[members], cap)
    steps = int(steps_row.max())
    live = float((steps_row * prompt + steps_row * (steps_row + 1) / 2).sum())
    totals["seconds"] += float(cost.batch_time(len(members), int(prompt.max()), cap, steps, live))
    totals["computed"] += int(cost.padded_batch(len(members))) * (steps + 1)
    totals[phase] += 1
    generated[members] += tokens_row
    done[members] = generated[members] >= true_length[members]

  for batch in plan.batches:
    run(np.asarray(batch.members, np.int64), int(batch.cap), "main")
  for round_ in range(max_recovery_rounds + 1):
    pending = np.nonzero(~done)[0]
    if pending.size == 0:
      break
    if round_ == max_recovery_rounds or recover is None:
      raise RuntimeError(f"{pending.size} requests unfinished after {round_} recovery rounds")
    for batch in recover(pending, generated[pending]):
      run(np.asarray(batch.members, np.int64), int(batch.cap), "recovery")
  return SimResult(totals["seconds"], totals["main"], totals["recovery"],
                   int(true_length.sum()), totals["computed"])
