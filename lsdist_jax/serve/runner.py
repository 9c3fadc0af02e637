"""The runner: executes a plan with the engine's `generate`, recovers capped rows, times each
phase.

It never decides anything: batch members, caps and recovery batches come from the planner. Every
request comes back exactly once, finished (EOS) or at max_seq_len.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from lsdist_jax.shapes import round_up


@dataclasses.dataclass
class BatchRecord:
  phase: str  # "main" | "recovery" (static batches; for continuous plans one decode call)
  size: int  # real rows
  padded_size: int  # rows after the batch bucket
  cap: int
  cache_len: int
  steps: int  # decode iterations the batch ran
  generated: int  # tokens kept from this batch
  seconds: float
  compiled: bool  # this call compiled a new program
  computed: int | None = None  # row-steps computed, where not padded_size * (steps + 1)
  kv_tokens: int | None = None  # KV-cache tokens held, where not padded_size * cache_len


@dataclasses.dataclass
class RunResult:
  tokens: list[list[int]]  # per request: its response (EOS excluded)
  finished: np.ndarray  # [n] bool: ended with EOS (else stopped at max_seq_len)
  batches: list[BatchRecord]
  seconds: dict[str, float]  # generate, recover, compile (time of calls that compiled)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. a paged run's calls

  @property
  def generated_tokens(self) -> int:
    return int(sum(len(t) for t in self.tokens))

  @property
  def computed_tokens(self) -> int:
    """Row-steps the device computed (padding rows and finished rows included)."""
    return int(sum(b.padded_size * (b.steps + 1) if b.computed is None else b.computed
                   for b in self.batches))

  @property
  def effective_token_ratio(self) -> float:
    return self.generated_tokens / max(self.computed_tokens, 1)


class Runner:
  """Runs plans on one engine.

  prompt_ids: [n] token-id prompts; request_ids: the PRNG identity of each request;
  temperature / top_p / seed: one value for all requests or one per request ([n]);
  max_tokens: [n] each request's own limit on generated tokens (it ends there unfinished, like
  at max_seq_len), or None;
  forced_lengths: length replay (EOS forced at recorded lengths), or None;
  on_progress(requests, tokens): called as requests complete (how many just did, and the tokens
  kept since the last call), e.g. to move a progress bar;
  share_prefill: in continuous execution, requests inserted together whose prompts are equal
  (an OpenAI batch line's n choices) share one prefill (`SlotBatch.insert`).
  Attribute warm_start: a continuous or paged run waits for the programs it compiles ahead
  before its first call (the wait counted as compile time), so that its calls run as in a
  steady state: no call pads to a larger ready program, none runs beside a compilation.
  """
  warm_start = False

  def __init__(self, engine, prompt_ids: Sequence[Sequence[int]], request_ids: Sequence[int], *,
               temperature, top_p, seed, max_seq_len: int,
               forced_lengths: Sequence[int] | None = None,
               on_progress: Callable[[int, int], None] | None = None,
               max_tokens: Sequence[int] | None = None, share_prefill: bool = False):
    if len(prompt_ids) != len(request_ids):
      raise ValueError(f"{len(prompt_ids)} prompts but {len(request_ids)} request ids")
    self.engine = engine
    self.share_prefill = bool(share_prefill)
    self.prompt_ids = [list(p) for p in prompt_ids]
    self.request_ids = [int(r) for r in request_ids]
    self.prompt_len = np.array([len(p) for p in self.prompt_ids], np.int32)
    n = len(self.prompt_ids)
    self.sampling = {}
    for name, value, dtype in (("temperature", temperature, np.float64),
                               ("top_p", top_p, np.float64), ("seed", seed, np.int64)):
      value = np.asarray(value, dtype)
      if value.ndim and value.shape != (n,):
        raise ValueError(f"{name}: one value or {n} (one per request), got {value.shape}")
      self.sampling[name] = np.broadcast_to(value, (n,))
    self.max_tokens = None if max_tokens is None else np.asarray(max_tokens, np.int64)
    if self.max_tokens is not None and (self.max_tokens.shape != (n,)
                                        or (self.max_tokens < 1).any()):
      raise ValueError(f"max_tokens: one limit >= 1 per request ({n})")
    self.max_seq_len = int(max_seq_len)
    self.forced = None if forced_lengths is None else np.asarray(forced_lengths, np.int64)
    self.on_progress = on_progress or (lambda requests, tokens: None)
    too_long = np.nonzero(self.prompt_len >= self.max_seq_len)[0]
    if too_long.size:
      raise ValueError(f"request {int(too_long[0])}: prompt of {self.prompt_len[too_long[0]]} "
                       f"tokens leaves no room in max_seq_len={self.max_seq_len}")

  def _settings(self, rows) -> dict:
    """The sampling settings of these requests, one per row."""
    return {name: value[np.asarray(rows, np.int64)].tolist()
            for name, value in self.sampling.items()}

  def _left(self, rows, generated) -> list[int] | None:
    """Tokens each of these requests may still generate under its own max_tokens (None: no
    such limit)."""
    if self.max_tokens is None:
      return None
    return [int(self.max_tokens[r]) - len(generated[r]) for r in rows]

  def _ended(self, r: int, generated, finished) -> bool:
    """Whether request r is complete: EOS, max_seq_len or its own max_tokens."""
    n = len(generated[r])
    return bool(finished[r] or self.prompt_len[r] + n >= self.max_seq_len
                or (self.max_tokens is not None and n >= self.max_tokens[r]))

  def _run_batch(self, members: np.ndarray, cap: int, phase: str, generated, finished, done,
                 records, seconds):
    if len(members) == 0:
      return
    gen = self.engine.generator
    prompts = [self.prompt_ids[m] + generated[m] for m in members]
    start_steps = [len(generated[m]) for m in members]
    cap = int(max(1, min(cap, self.max_seq_len - min(len(p) for p in prompts))))
    forced = None
    if self.forced is not None:
      forced = [int(self.forced[m]) for m in members]
    clock = EngineClock(gen)
    result = gen.generate(prompts, cap=cap, max_seq_len=self.max_seq_len,
                          request_ids=[self.request_ids[m] for m in members],
                          start_steps=start_steps, forced_lengths=forced,
                          max_new_tokens=self._left(members, generated),
                          **self._settings(members))
    compiling, elapsed = clock.split()
    kept = 0
    for i, m in enumerate(members):
      new = result.tokens[i, :result.num_generated[i]].tolist()
      generated[m] += new
      kept += len(new)
      finished[m] = bool(result.finished[i])
      done[m] = self._ended(m, generated, finished)
    self.on_progress(int(done[members].sum()), kept)
    cache_len = gen.buckets.cache_len(max(len(x) for x in prompts), cap)
    records.append(BatchRecord(phase, len(members), gen.buckets.batch_size(len(members)), cap,
                               cache_len, result.steps, kept, elapsed, clock.compiled))
    seconds["compile"] += compiling
    seconds["recover" if phase == "recovery" else "generate"] += elapsed

  def run(self, plan, recover: Callable[[np.ndarray, np.ndarray], Sequence] | None = None,
          max_recovery_rounds: int = 16) -> RunResult:
    """Runs `plan.batches` (each with `.members` and `.cap`), then, while rows remain unfinished
    below max_seq_len, the batches `recover(unfinished_ids, generated_so_far)` returns."""
    n = len(self.prompt_ids)
    generated: list[list[int]] = [[] for _ in range(n)]
    finished = np.zeros(n, bool)
    done = np.zeros(n, bool)
    records: list[BatchRecord] = []
    seconds = {"generate": 0.0, "recover": 0.0, "compile": 0.0}
    _check_each_once(n, plan.batches)
    for batch in plan.batches:
      self._run_batch(np.asarray(batch.members, np.int64), int(batch.cap), "main", generated,
                      finished, done, records, seconds)
    for round_ in range(max_recovery_rounds + 1):
      pending = np.nonzero(~done)[0]
      if pending.size == 0:
        break
      if round_ == max_recovery_rounds:
        raise RuntimeError(f"{pending.size} requests still unfinished after "
                           f"{max_recovery_rounds} recovery rounds")
      so_far = np.array([len(generated[m]) for m in pending], np.int64)
      if recover is None:
        batches = [_Batch(pending, self.max_seq_len)]
      else:
        batches = recover(pending, so_far)
      covered = np.concatenate([np.asarray(b.members, np.int64) for b in batches])
      if sorted(covered.tolist()) != sorted(pending.tolist()):
        raise ValueError("recovery plan must hold every unfinished request exactly once")
      for batch in batches:
        self._run_batch(np.asarray(batch.members, np.int64), int(batch.cap), "recovery",
                        generated, finished, done, records, seconds)
    return RunResult(generated, finished, records, seconds)

  # ------------------------------------------------------------------------ continuous plans

  def run_continuous(self, plan, final_phase: Callable | None = None,
                     max_extra_phases: int = 16) -> RunResult:
    """Runs a continuous plan (`schedule/continuous.py`): phase by phase, `phase.slots` rows
    decode over `phase.cache_len` cache slots each; whenever `phase.refill` slots are free the
    next queued requests are inserted. A row that reaches its slot's room (or does not fit it)
    moves to the front of the next phase's queue, continued from its context, and so do the
    rows still running when a phase with `drain` ends (its queue empty, at most `drain` rows
    running: the slots' tail would run at low occupancy); rows left after
    the last phase run in phases `final_phase(contexts, rooms)` returns (their queue), each
    with the first-fill choice (`split_first`) of the phase before it."""
    n = len(self.prompt_ids)
    _check_each_once(n, plan.phases)
    generated: list[list[int]] = [[] for _ in range(n)]
    finished = np.zeros(n, bool)
    records: list[BatchRecord] = []
    # generate / recover / compile, and (`_run_phase`) where a continuous run's wall clock goes,
    # compilation the calls waited for included: insert calls (dispatch), decode calls (they
    # wait for the device), reading the slots back, decode steps
    seconds = {"generate": 0.0, "recover": 0.0, "compile": 0.0}
    carried: list[int] = []
    phases = list(plan.phases)
    self._precompile(phases)
    self.settle(seconds)
    k = extra = 0
    while k < len(phases) or carried:
      if k < len(phases):
        phase, name = phases[k], "main"
      else:
        if extra == max_extra_phases or final_phase is None:
          raise RuntimeError(f"{len(carried)} requests still unfinished after the plan's phases "
                             f"and {extra} more")
        rows = np.asarray(carried, np.int64)
        contexts = self.prompt_len[rows] + np.array([len(generated[r]) for r in rows])
        rooms = self.max_seq_len - contexts
        if self.max_tokens is not None:
          rooms = np.minimum(rooms, np.asarray(self._left(rows, generated)))
        # with the first-fill choice of the phase before it (its plan's)
        phase, name = dataclasses.replace(final_phase(contexts, rooms),
                                          split_first=phase.split_first), "recovery"
        extra += 1
      queue = carried + [int(m) for m in phase.members]
      carried = self._run_phase(phase, queue, name, generated, finished, records, seconds)
      k += 1
    self.engine.generator.drop_precompiles()
    return RunResult(generated, finished, records, seconds)

  def settle(self, seconds: dict) -> None:
    """With warm_start, waits for the programs compiling ahead; adds the wait to "compile"."""
    gen = self.engine.generator
    if self.warm_start:
      before = gen.compile_seconds
      gen.wait_precompiles()
      seconds["compile"] += gen.compile_seconds - before

  def _precompile(self, phases) -> None:
    """Starts compiling every phase's programs in the background (the engine's
    compile_threads), in the order the run needs them, while the first phase runs: the first
    insert (of all its first fill's rows where they fit its slots at once or the phase does
    not split its first fill, else a refill's rows at the block of the first fill's first
    insert) and its sampler, the decode loop, then a refill's rows at each context block of
    the phase's prompts; none for refills the first phase never makes (its prompts all fit its
    first fill). A later phase's queue starts with the rows carried in from earlier phases:
    a row that filled an earlier phase's cache comes with that many tokens, so its inserts
    are compiled at that context's block too (the first fill's of all the slots where it is
    one insert). Rows that left a draining phase early may bring other blocks; those, and the
    final phases planned at run time, compile when first run."""
    gen = self.engine.generator
    if gen.compile_threads < 1:
      return
    buckets = gen.buckets
    before: list[int] = []  # the cache lengths of the phases before
    for k, phase in enumerate(phases):
      members = np.asarray(phase.members, np.int64)
      s = round_up(int(phase.cache_len), buckets.cache)
      floor = int(phase.block)
      carried = sorted({max(int(buckets.insert_block(c, s)), floor) for c in before if c < s})
      before.append(s)
      members = members[self.prompt_len[members] < s]
      if members.size == 0 and not carried:
        continue
      slots = buckets.batch_size(int(phase.slots))
      first = members[:slots]
      blocks = np.maximum(buckets.insert_block(self.prompt_len[members], s), floor)
      first_block = max(carried + blocks[:len(first)].tolist())  # (the two are not both empty)
      inserts = []
      if members.size == len(first) or not phase.split_first:  # a first fill of one insert
        inserts.append((slots if carried else len(first), first_block))
      if k > 0 or members.size > len(first):  # it refills (a later phase may take carried rows)
        # every later insert a refill's rows, a split first fill's too (`_run_phase`): its
        # first insert's block first
        refill = max(1, min(int(phase.refill), slots))
        chunk = buckets.batch_size(refill)
        head = carried[-1:] if carried else [int(blocks[:chunk].max())]
        inserts += [(refill, int(b)) for b in dict.fromkeys(
            head + carried + sorted(np.unique(blocks).tolist()))]
      gen.precompile_slots(int(phase.slots), int(phase.cache_len), inserts,
                           share_prefill=self.share_prefill)

  def _run_phase(self, phase, queue: list[int], name: str, generated, finished, records,
                 seconds) -> list[int]:
    """One phase of a continuous plan; returns the rows to continue in the next phase."""
    gen = self.engine.generator
    batch = gen.open_slots(int(phase.slots), int(phase.cache_len), max_seq_len=self.max_seq_len)
    occupant = [-1] * batch.slots
    # Rows whose context does not fit this phase's slots go straight on to the next phase.
    fits = [batch.room(int(self.prompt_len[r]) + len(generated[r])) >= 1 for r in queue]
    carried = [r for r, ok in zip(queue, fits) if not ok]
    pending = [r for r, ok in zip(queue, fits) if ok]
    refill = max(1, min(int(phase.refill), batch.slots))
    drain = int(phase.drain)
    # After the first fill every insert is one program per context block: at most a refill's
    # bucket of rows, padded to it (slots freed beyond it wait for the next refill). A phase
    # that refills makes its first fill too of such inserts, one after another (`split_first`),
    # so that no insert or sampler of all its slots' rows is compiled; otherwise the first fill
    # is one call. (`schedule.continuous` simulates this rule.)
    most, min_rows, bucket = batch.slots, 0, gen.buckets.batch_size(refill)
    while True:
      clock = EngineClock(gen)
      free = [j for j, r in enumerate(occupant) if r < 0]
      take = pending[:min(len(free), most)]
      del pending[:len(take)]
      if pending and phase.split_first:
        min_rows = refill
      step = bucket if min_rows else max(len(take), 1)
      calls = [(free[c:min(c + step, len(take))], take[c:c + step])
               for c in range(0, len(take), step)]
      inserted = sum(gen.buckets.batch_size(max(len(rows), min_rows)) for _, rows in calls)
      started, compiled0 = time.perf_counter(), gen.compile_seconds
      for into, rows in calls:
        batch.insert(into, [self.prompt_ids[r] + generated[r] for r in rows],
                     [self.request_ids[r] for r in rows], [len(generated[r]) for r in rows],
                     None if self.forced is None else [int(self.forced[r]) for r in rows],
                     max_new_tokens=self._left(rows, generated), min_rows=min_rows,
                     share_prefill=self.share_prefill, min_block=int(phase.block),
                     **self._settings(rows))
      if take:
        most, min_rows = bucket, refill
        for j, r in zip(free, take):
          occupant[j] = r
      busy = sum(r >= 0 for r in occupant)
      if busy == 0:
        break
      inserted_at, compiled1 = time.perf_counter(), gen.compile_seconds
      steps = batch.decode(refill if pending else batch.slots - drain)
      decoded_at = time.perf_counter()
      read = batch.read()
      for key, value in (("insert_calls", inserted_at - started),
                         ("decode_calls", decoded_at - inserted_at),
                         ("reads", time.perf_counter() - decoded_at), ("decode_steps", steps)):
        seconds[key] = seconds.get(key, 0.0) + value
      # one row per insert + decode: what each waited for compilation, and the slots' use
      seconds.setdefault("calls", []).append(
          (len(take), round(inserted_at - started, 4), round(compiled1 - compiled0, 4), busy,
           steps, round(decoded_at - inserted_at, 4),
           round(gen.compile_seconds - compiled1, 4)))
      # A draining phase ends here: its rows still running leave with what they generated.
      ending = not pending and drain > 0
      kept = completed = 0
      for j, r in enumerate(occupant):
        if r >= 0 and (read.done[j] or ending):
          new = read.tokens[j, :read.num_generated[j]].tolist()
          generated[r] += new
          kept += len(new)
          finished[r] = bool(read.finished[j])
          occupant[j] = -1
          if not self._ended(r, generated, finished):
            carried.append(r)
          else:
            completed += 1
      self.on_progress(completed, kept)
      compiling, elapsed = clock.split()
      # cap -1: each slot's row has its own (the room its context leaves in the slot)
      records.append(BatchRecord(name, busy, batch.slots, -1, batch.cache_len, steps, kept,
                                 elapsed, clock.compiled,
                                 computed=batch.slots * steps + inserted))
      seconds["compile"] += compiling
      seconds["recover" if name == "recovery" else "generate"] += elapsed
    return carried


def runner_split(seconds: dict, calls: bool = False) -> dict:
  """{"runner_split": ...}: where a continuous or paged run's time went (insert, decode and
  read calls, decode steps, milliseconds per decode step; the prediction and planning before
  it where timed; for a continuous run, the compile waits those calls' seconds hold and the
  decode calls made), from its RunResult.seconds; {} for static runs. calls: also a row per
  insert and decode call (`CALL_COLUMNS`)."""
  if "decode_calls" not in seconds:
    return {}
  out = {k: round(float(seconds[k]), 3) for k in ("insert_calls", "decode_calls", "reads")}
  steps = int(seconds["decode_steps"])
  out.update(decode_steps=steps,
             ms_per_decode_step=round(1e3 * seconds["decode_calls"] / max(steps, 1), 3))
  out.update({k: round(float(seconds[k]), 3) for k in ("predict", "plan") if k in seconds})
  if seconds.get("calls"):  # the compile waits inside the insert and decode calls' seconds
    rows = np.asarray(seconds["calls"], np.float64)
    waited = lambda column: round(float(rows[:, CALL_COLUMNS.index(column)].sum()), 3)
    out.update(insert_compile_wait=waited("insert_compile_wait_s"),
               decode_compile_wait=waited("decode_compile_wait_s"), decodes=len(rows))
  if calls and seconds.get("calls"):
    out["calls_columns"] = CALL_COLUMNS
    out["calls"] = [list(c) for c in seconds["calls"]]
  return {"runner_split": out}


# A continuous run's calls, one row per insert and the decode call after it (`runner_split`)
CALL_COLUMNS = ("inserted_rows", "insert_s", "insert_compile_wait_s", "busy_slots",
                "decode_steps", "decode_s", "decode_compile_wait_s")


class EngineClock:
  """Times a generator's calls from its creation: `split()` -> (compile seconds, run seconds),
  the run excluding compilation and any wait for a device shared with other processes;
  `compiled`: whether those calls compiled a new program."""

  def __init__(self, gen):
    self.gen = gen
    self.start = time.perf_counter()
    self.compile0, self.count0 = gen.compile_seconds, gen.compile_count
    self.wait0 = gen.wait_seconds

  @property
  def compiled(self) -> bool:
    return self.gen.compile_count > self.count0

  def split(self) -> tuple[float, float]:
    compiling = self.gen.compile_seconds - self.compile0
    waiting = self.gen.wait_seconds - self.wait0
    return compiling, time.perf_counter() - self.start - compiling - waiting

  def excluded(self) -> float:
    """Seconds of compilation and device waits since the start (what `split` leaves out)."""
    return (self.gen.compile_seconds - self.compile0) + (self.gen.wait_seconds - self.wait0)


def _check_each_once(n: int, groups) -> None:
  """Every request of 0..n-1 in exactly one of `groups` (batches or phases, with .members)."""
  seen = np.zeros(n, np.int64)
  for group in groups:
    np.add.at(seen, np.asarray(group.members, np.int64), 1)
  if (seen != 1).any():
    bad = np.nonzero(seen != 1)[0][:5].tolist()
    raise ValueError(f"plan does not hold every request exactly once (e.g. requests {bad})")


@dataclasses.dataclass
class _Batch:
  members: np.ndarray
  cap: int
