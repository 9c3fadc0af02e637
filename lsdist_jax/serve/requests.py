"""What is served: one request type (a prompt, its PRNG identity and what the planners and the
predictor read of it) and its builders: over prompts, in length replay, and from a store.

Request r over P prompts is prompt r mod P, copy r div P; copies of a prompt are distinct
samples (their own request ids), so a small prompt set can fill a large benchmark.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

COPY_STRIDE = 1000  # request id = dataset index * COPY_STRIDE + copy + REQUEST_ID_BASE
REQUEST_ID_BASE = 7_000_000


@dataclasses.dataclass
class Requests:
  """n requests over (possibly repeated) prompts."""
  request_ids: np.ndarray  # [n] PRNG identity: copies of one prompt are distinct samples
  dataset_index: np.ndarray  # [n] which prompt
  prompt_len: np.ndarray  # [n] prompt tokens (chat format applied)
  prompt_ids: list[list[int]] | None = None  # [n] token ids (None: engine-free simulation)
  hidden: np.ndarray | None = None  # [n, D] prompt hidden states (filled by `embed_requests`)
  recorded_hidden: np.ndarray | None = None  # [n, D] a store's hidden states (replay, simulation)
  # (the distinct prompts' hidden states [m, D], [n] each request's): `embed_requests`
  distinct_hidden: tuple | None = None
  recorded_length: np.ndarray | None = None  # [n] a recorded response length (replay, simulation)
  texts: list[str] | None = None  # [n] prompt text (a predictor on another model reads it)
  # Per-request settings (an OpenAI batch line's), each [n] or None (the config's for all):
  max_tokens: np.ndarray | None = None  # the most tokens the request may generate
  temperature: np.ndarray | None = None
  top_p: np.ndarray | None = None
  seed: np.ndarray | None = None

  @property
  def n(self) -> int:
    return int(self.request_ids.size)

  def predictor_input(self) -> np.ndarray:
    """The hidden states the predictor reads: recorded ones where there are (the model that
    recorded the lengths), else this engine's."""
    hidden = self.recorded_hidden if self.recorded_hidden is not None else self.hidden
    if hidden is None:
      raise ValueError("these requests have no hidden states yet: embed them first")
    return hidden

  def distinct_predictor_input(self) -> tuple[np.ndarray, np.ndarray]:
    """(distinct hidden states [m, D], [n] each request's): `predictor_input` with each state
    once (a prompt's repeats are predicted once)."""
    if (self.recorded_hidden is None and self.distinct_hidden is not None
        and self.distinct_hidden[1].size == self.n):
      return self.distinct_hidden
    hidden, which = np.unique(self.predictor_input(), axis=0, return_inverse=True)
    return hidden, which.reshape(-1)


def cycle(n_requests: int, n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
  """(prompt position, copy) of each of n requests over n_prompts prompts."""
  if n_prompts <= 0:
    raise ValueError("there are no prompts to build requests from")
  r = np.arange(int(n_requests))
  return r % n_prompts, r // n_prompts


def request_id(dataset_index, copy) -> np.ndarray:
  return (np.asarray(dataset_index, np.int64) * COPY_STRIDE + np.asarray(copy, np.int64)
          + REQUEST_ID_BASE)


def build_requests(engine, prompts, n_requests: int) -> Requests:
  """Requests over `prompts` (objects with .index and .text), tokenized by the engine."""
  if not prompts:
    raise ValueError("the benchmark slice holds no prompts")
  ids = engine.encode([p.text for p in prompts])
  pick, copy = cycle(n_requests, len(prompts))
  index = np.array([int(prompts[k].index) for k in pick], np.int64)
  prompt_ids = [ids[k] for k in pick]
  return Requests(request_id(index, copy), index, np.array([len(p) for p in prompt_ids]),
                  prompt_ids=prompt_ids, texts=[prompts[k].text for k in pick])


def replay_requests(data: dict, prompts, n_requests: int, vocab_size: int) -> Requests:
  """Length replay over a store's `data` (from `LengthStore.read`): requests over those of
  `prompts` the store holds (the same text, matched by prompt key), with filler token ids of
  each prompt's recorded length, the store's hidden states, and a recorded length each (EOS is
  forced there)."""
  row = {str(key): k for k, key in enumerate(data["key"])}
  prompts = [p for p in prompts if p.key in row]
  if not prompts:
    raise ValueError("length replay needs the benchmark prompts in the store; none are")
  pick, copy = cycle(n_requests, len(prompts))
  index = np.array([int(prompts[k].index) for k in pick], np.int64)
  rows = np.array([row[prompts[k].key] for k in pick], np.int64)
  n_samples = data["lengths"].shape[1]
  prompt_len = np.asarray(data["prompt_len"])[rows].astype(np.int64)
  prompt_ids = [[1] + [3 + (7 * int(i) + j) % (vocab_size - 3) for j in range(int(length) - 1)]
                for i, length in zip(index, prompt_len)]
  return Requests(request_id(index, copy), index, prompt_len, prompt_ids=prompt_ids,
                  recorded_hidden=np.asarray(data["hidden"])[rows],
                  recorded_length=np.asarray(data["lengths"])[rows, copy % n_samples],
                  texts=[prompts[k].text for k in pick])


def store_requests(data: dict, rows, n_requests: int, max_len: int) -> Requests:
  """Engine-free requests over the store rows `rows` (in that order): prompt lengths, hidden
  states and a recorded length each (clipped to max_len), as in length replay."""
  rows = np.asarray(rows, np.int64)
  pick, copy = cycle(n_requests, rows.size)
  k = rows[pick]
  lengths = np.minimum(np.asarray(data["lengths"]), max_len)
  index = np.asarray(data["index"], np.int64)[k]
  return Requests(request_id(index, copy), index, np.asarray(data["prompt_len"])[k],
                  recorded_hidden=np.asarray(data["hidden"])[k],
                  recorded_length=lengths[k, copy % lengths.shape[1]])


def distinct_prompts(requests: Requests) -> tuple[list, np.ndarray]:
  """(each distinct prompt's token ids, once, [n] the distinct prompt of each request): by
  dataset index, and equal token ids on different lines of a job share one too."""
  _, first, inverse = np.unique(requests.dataset_index, return_index=True, return_inverse=True)
  keys: dict[tuple, int] = {}
  where = np.array([keys.setdefault(tuple(requests.prompt_ids[int(i)]), len(keys))
                    for i in first], np.int64)
  return [list(k) for k in keys], where[inverse]


def embed_requests(engine, requests: Requests, layer: int, cost=None,
                   compile_seconds: float = 0.0) -> float:
  """Prefills each distinct prompt once for its hidden state; returns the seconds it took.
  With a cost model and compile_seconds, prompt blocks merge where padding costs less than a
  compilation (`Generator.embed`, whose programs `precompile_embed_requests` starts early)."""
  t0 = time.perf_counter()
  prompts, which = distinct_prompts(requests)
  hidden = engine.embed(prompts, layer=layer, **_merge(cost, compile_seconds))
  requests.hidden = hidden[which]
  requests.distinct_hidden = (hidden, which)
  return time.perf_counter() - t0


def precompile_embed_requests(engine, requests: Requests, layer: int, cost=None,
                              compile_seconds: float = 0.0) -> None:
  """Starts compiling the prefill programs `embed_requests` with these arguments runs."""
  engine.generator.precompile_embed(engine._as_ids(distinct_prompts(requests)[0]), layer,
                                    **_merge(cost, compile_seconds))


def _merge(cost, compile_seconds: float) -> dict:
  return {} if cost is None else dict(prefill_seconds=cost.prefill_call_time,
                                      compile_seconds=float(compile_seconds))
