"""The throughput benchmark: every scheduling strategy on the same requests and seeds, in one run.

Per strategy: predict (prefill hidden + predictor), plan, generate, recover, compile are timed
apart; samples/s counts everything but compilation (shapes are compiled once in a warm-up pass).
Responses are compared across strategies: identical on CPU float32, the identical share on GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from typing import Sequence

import numpy as np

from lsdist_jax import report
from lsdist_jax.runner import EngineClock, Runner

DEFAULT_VANILLA_BATCH = 16


@dataclasses.dataclass
class Requests:
  """What the benchmark serves: n requests over (possibly repeated) prompts."""
  prompt_ids: list[list[int]]  # [n] token ids (chat format applied)
  request_ids: np.ndarray  # [n] PRNG identity: copies of one prompt are distinct samples
  dataset_index: np.ndarray  # [n]
  hidden: np.ndarray | None = None  # [n, D] prompt hidden states (filled by `predict`)
  replay_hidden: np.ndarray | None = None  # [n, D] recorded hidden states (length replay)


def build_requests(engine, prompts, n_requests: int, samples_per_prompt_id: int = 1000) -> Requests:
  """Requests over `prompts` (objects with .index and .text); when there are fewer prompts than
  requests, each prompt is requested several times, each copy its own sample (request id)."""
  if not prompts:
    raise ValueError("the benchmark slice holds no prompts")
  ids = engine.encode([p.text for p in prompts])
  prompt_ids, request_ids, index = [], [], []
  for r in range(n_requests):
    k = r % len(prompts)
    copy = r // len(prompts)
    prompt_ids.append(ids[k])
    request_ids.append(int(prompts[k].index) * samples_per_prompt_id + copy + 7_000_000)
    index.append(int(prompts[k].index))
  return Requests(prompt_ids, np.asarray(request_ids, np.int64), np.asarray(index, np.int64))


def embed_requests(engine, requests: Requests, layer: int) -> float:
  """Prefill each distinct prompt once for its hidden state; returns the seconds it took."""
  t0 = time.perf_counter()
  unique, inverse = np.unique(requests.dataset_index, return_inverse=True)
  first = {int(i): k for k, i in reversed(list(enumerate(requests.dataset_index)))}
  prompts = [requests.prompt_ids[first[int(i)]] for i in unique]
  hidden = engine.embed(prompts, layer=layer)
  requests.hidden = hidden[inverse]
  return time.perf_counter() - t0


def _timed(fn, *args, **kwargs):
  t0 = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - t0


def compare_responses(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
  same = sum(list(a) == list(b) for a, b in zip(reference, other))
  return same / max(len(reference), 1)


def summarize(strategy: str, result, seconds: dict, n: int, peak_kv: int) -> dict:
  busy = seconds["predict"] + seconds["plan"] + seconds["generate"] + seconds["recover"]
  return {
      "strategy": strategy,
      "samples_per_s": n / busy,
      "tokens_per_s": result.generated_tokens / busy,
      "effective_token_ratio": result.effective_token_ratio,
      "seconds_total": busy,
      "seconds_predict": seconds["predict"],
      "seconds_plan": seconds["plan"],
      "seconds_generate": seconds["generate"],
      "seconds_recover": seconds["recover"],
      "seconds_compile": seconds["compile"],
      "batches": sum(b.phase == "main" for b in result.batches),
      "recovery_batches": sum(b.phase == "recovery" for b in result.batches),
      "compilations": int(sum(b.compiled for b in result.batches)),
      "peak_kv_tokens": int(peak_kv),
      "generated_tokens": result.generated_tokens,
      "computed_tokens": result.computed_tokens,
  }


def peak_kv_tokens(result) -> int:
  return max((b.padded_size * b.cache_len for b in result.batches), default=0)


def write_outputs(out: dict, workdir: str, name: str = "benchmark") -> dict:
  os.makedirs(workdir, exist_ok=True)
  paths = {"json": report.write_json(out, os.path.join(workdir, f"{name}.json"))}
  md = [f"# {name}", "", f"- device: {out['device']}", f"- date: {out['date']}",
        f"- model: {out['model']}", f"- requests: {out['prompts']}",
        f"- KV budget (tokens): {out['kv_budget_tokens']}", f"- length replay: {out['replay']}",
        "", report.markdown_table(out["rows"])]
  paths["md"] = os.path.join(workdir, f"{name}.md")
  with open(paths["md"], "w") as f:
    f.write("\n".join(md) + "\n")
  paths["png"] = report.plot_benchmark(out["rows"], os.path.join(workdir, f"{name}.png"),
                                       title=f"{out['model']} on {out['device']}")
  return paths


def today() -> str:
  return datetime.date.today().isoformat()


def make_runner(engine, requests: Requests, config, forced_lengths=None) -> Runner:
  gen = config.generation
  return Runner(engine, requests.prompt_ids, requests.request_ids.tolist(),
                temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed,
                max_seq_len=gen.max_seq_len, forced_lengths=forced_lengths)


def log_row(row: dict) -> None:
  logging.info("%-16s %8.2f samples/s %10.1f tok/s  effective %.3f  predict %.2fs plan %.2fs "
               "generate %.2fs recover %.2fs", row["strategy"], row["samples_per_s"],
               row["tokens_per_s"], row["effective_token_ratio"], row["seconds_predict"],
               row["seconds_plan"], row["seconds_generate"], row["seconds_recover"])


# ----------------------------------------------------------------------------- strategies

STRATEGIES = {
    # name: (planner, predictor kind or None, threshold override)
    "vanilla:16": ("vanilla", None),
    "vanilla:best": ("vanilla", None),
    "sorted": ("sorted", "distribution"),
    "ssch-scalar-max": ("ssch", "scalar-max"),
    "ssch-scalar-mean": ("ssch", "scalar-mean"),
    "ours": ("vbs", "distribution"),
    "ours-search": ("search", "distribution"),
    "ours-optimal": ("optimal", "distribution"),
    "oracle": ("oracle", None),
    # continuous (slot-refill) execution, schedule/continuous.py
    "continuous-vanilla": ("continuous-vanilla", None),
    "ours-continuous": ("continuous-search", "distribution"),
    "oracle-continuous": ("continuous-oracle", None),
}
NEEDS_TRUE_LENGTHS = ("oracle", "continuous-oracle")


class _ResumeState:
  """Per-strategy results of a benchmark saved as they finish, so an interrupted benchmark
  resumes where it stopped; refused when the requests or settings differ."""

  def __init__(self, directory: str, identity: dict):
    import hashlib

    self.directory = directory
    os.makedirs(directory, exist_ok=True)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    self.key = digest.hexdigest()[:16]
    marker = os.path.join(directory, "identity.txt")
    if not os.path.exists(marker):  # written whole: workers start together and read it
      report.write_text(marker, self.key)
    with open(marker) as f:
      if f.read().strip() != self.key:
        raise ValueError(f"{directory} holds results of another benchmark (other requests or "
                         "settings); remove it or choose another --name")

  def _paths(self, name, repeat):
    return _saved_paths(self.directory, name, repeat)

  def load(self, name, repeat):
    return _load_saved(self.directory, name, repeat)

  def has(self, name, repeat) -> bool:
    return _is_saved(self.directory, name, repeat)

  def claim(self, name, repeat) -> bool:
    """Atomically takes (name, repeat) for this process (benchmark workers share the list of
    strategies); False if another worker took it."""
    try:
      os.close(os.open(self._paths(name, repeat)[0] + ".claim", os.O_CREAT | os.O_EXCL))
      return True
    except FileExistsError:
      return False

  def wait(self, name, repeat, timeout_s: float = 6 * 3600, poll_s: float = 2.0):
    """Waits for another worker's result of (name, repeat)."""
    deadline = time.monotonic() + timeout_s
    while (saved := self.load(name, repeat)) is None:
      if time.monotonic() > deadline:
        raise TimeoutError(f"no result of {name!r} (repeat {repeat}) after {timeout_s:.0f} s")
      time.sleep(poll_s)
    return saved

  def write_meta(self, meta: dict) -> None:
    """What the report needs besides the rows (device, model, requests, strategy order)."""
    report.write_json(meta, os.path.join(self.directory, "meta.json"))  # workers write it too

  def save(self, name, repeat, row, tokens):
    row_path, tok_path = self._paths(name, repeat)
    flat = np.concatenate([np.asarray(t, np.int32) for t in tokens]) if tokens else np.zeros(0)
    np.savez(tok_path + ".tmp.npz", tokens=flat,
             lengths=np.array([len(t) for t in tokens], np.int64))
    os.replace(tok_path + ".tmp.npz", tok_path)
    report.write_json(row, row_path)


def _saved_paths(directory: str, name: str, repeat: int) -> tuple[str, str]:
  stem = os.path.join(directory, f"{name.replace(':', '_')}.r{repeat}")
  return stem + ".json", stem + ".npz"


def _is_saved(directory: str, name: str, repeat: int) -> bool:
  return all(os.path.exists(p) for p in _saved_paths(directory, name, repeat))


def _load_saved(directory: str, name: str, repeat: int):
  """(row, responses) saved for (strategy, repeat), or None."""
  if not _is_saved(directory, name, repeat):
    return None
  row_path, tok_path = _saved_paths(directory, name, repeat)
  with open(row_path) as f:
    row = json.load(f)
  data = np.load(tok_path)
  bounds = np.cumsum(np.concatenate([[0], data["lengths"]]))
  return row, [data["tokens"][a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


def state_dir(workdir: str, out_name: str = "benchmark") -> str:
  return os.path.join(workdir, f"{out_name}_state")


def clear_claims(workdir: str, out_name: str = "benchmark") -> None:
  """Drops the claims of workers that are gone (an interrupted run): their strategies run
  again; finished strategies keep their saved results."""
  directory = state_dir(workdir, out_name)
  if os.path.isdir(directory):
    for entry in os.listdir(directory):
      if entry.endswith(".claim"):
        os.remove(os.path.join(directory, entry))


def saved_strategies(workdir: str, out_name: str = "benchmark") -> list[str]:
  """Stems (strategy.r<repeat>) of the results saved so far."""
  directory = state_dir(workdir, out_name)
  if not os.path.isdir(directory):
    return []
  return sorted(e[:-len(".npz")] for e in os.listdir(directory)
                if e.endswith(".npz") and not e.endswith(".tmp.npz"))


def run_workers(command, workdir: str, out_name: str, workers: int, devices: Sequence[str] = (),
                lock_dir: str = "", profile_command: Sequence[str] | None = None,
                poll_s: float = 2.0) -> None:
  """Runs `workers` benchmark processes that share the strategies (`run_benchmark(worker=True)`)
  and waits for them, logging each result as it is saved; a failed worker stops the others.

  command(lock_path) -> a worker's argv; devices: GPU ids dealt to the workers in turn (each
  sees one, CUDA_VISIBLE_DEVICES), or none (all on the default device); one lock file per
  device, in lock_dir (default: the state folder). profile_command: run first, on the first
  device (it fits and saves the cost model the workers then load)."""
  import subprocess

  devices = list(devices)
  if profile_command:
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": devices[0]} if devices else {}))
    subprocess.run(list(profile_command), env=env, check=True)
  clear_claims(workdir, out_name)
  directory = state_dir(workdir, out_name)
  os.makedirs(lock_dir or directory, exist_ok=True)
  os.makedirs(directory, exist_ok=True)
  procs, logs = [], []
  try:
    for k in range(workers):
      device = devices[k % len(devices)] if devices else "default"
      env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # devices are shared
      if devices:
        env["CUDA_VISIBLE_DEVICES"] = device
      logs.append(open(os.path.join(directory, f"worker{k}.log"), "w"))
      lock = os.path.join(lock_dir or directory, f"device_{device}.lock")
      procs.append(subprocess.Popen(list(command(lock)), env=env, stdout=logs[-1],
                                    stderr=subprocess.STDOUT))
      logging.info("worker %d on device %s (log %s)", k, device, logs[-1].name)
    seen = set(saved_strategies(workdir, out_name))
    while True:
      running = any(p.poll() is None for p in procs)
      failed = [k for k, p in enumerate(procs) if p.returncode not in (None, 0)]
      if failed:
        raise RuntimeError(f"benchmark worker {failed[0]} failed (exit "
                           f"{procs[failed[0]].returncode}); see {logs[failed[0]].name}")
      now = set(saved_strategies(workdir, out_name))
      for stem in sorted(now - seen):
        logging.info("done: %s (%d saved)", stem, len(now))
      seen = now
      if not running:
        return
      time.sleep(poll_s)
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
        p.wait()
    for log in logs:
      log.close()


def vanilla_best_batch(cost, options, prompt_len: np.ndarray, max_seq_len: int) -> int:
  """The largest fixed batch whose full-length cache fits the KV budget (and max_batch)."""
  size = 1
  for b in sorted(cost.batch_buckets):
    if b <= options.max_batch and int(cost.kv_tokens(b, int(prompt_len.max()),
                                                     max_seq_len)) <= options.kv_budget_tokens:
      size = b
  return size


def strategy_options(name: str, options, cost, prompt_len: np.ndarray, max_seq_len: int):
  """The planner options a strategy runs with: vanilla's fixed batch (16, or the largest that
  fits the KV budget at full length), FCR for `ours`; the config's options otherwise."""
  if name == "vanilla:16":
    return dataclasses.replace(options, fixed_batch=DEFAULT_VANILLA_BATCH)
  if name == "vanilla:best":
    return dataclasses.replace(options, fixed_batch=vanilla_best_batch(cost, options, prompt_len,
                                                                       max_seq_len))
  if name == "ours":
    return dataclasses.replace(options, fcr=True)
  return options


def run_benchmark(config, workdir: str, engine=None, predictor_dirs: dict | None = None,
                  cost=None, out_name: str = "benchmark",
                  worker: bool = False) -> dict:
  """Every strategy of config.benchmark.strategies on the same requests and seeds.

  predictor_dirs: {"distribution": export dir, "scalar-max": export dir, ...}.
  With config.benchmark.replay, every request's EOS is forced at a length sampled for its prompt
  in the store (length replay), so any model runs with real length statistics.
  Results are saved per strategy as they finish (`<workdir>/<out_name>_state`): a rerun resumes.
  worker=True: one of several processes sharing the list (`launch/benchmark.py --workers`):
  it runs the strategies it claims first and reports only what is done; identical shares and
  the true lengths (oracles) come from the first strategy's result, whichever worker runs it."""
  from lsdist_jax import scheduling
  from lsdist_jax.collect import load_engine
  from lsdist_jax.data import load_prompts
  from lsdist_jax.schedule import Options, with_engine_shapes

  bench = config.benchmark
  engine = engine or load_engine(config)
  options = Options.from_config(config.schedule)
  if cost is None:
    cost = scheduling.load_cost_model(config, engine)
  else:
    scheduling.warn_cost_model(cost, engine, cost.source)
  cost = with_engine_shapes(cost, config.engine)
  data_config = config.data.copy_and_resolve_references()
  data_config.slice = bench.slice
  prompts = scheduling.benchmark_prompts(load_prompts(data_config), config)
  forced = None
  if bench.replay:
    requests, forced = scheduling.replay_requests(config, prompts, int(bench.requests),
                                                  engine.config.vocab_size)
  else:
    prompts = scheduling.drop_long_prompts(engine, prompts, config.generation.max_seq_len)
    requests = build_requests(engine, prompts, int(bench.requests))
  names = list(bench.strategies)
  for name in names:
    if name not in STRATEGIES:
      raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
  if names and STRATEGIES[names[0]][0] in NEEDS_TRUE_LENGTHS:
    raise ValueError(f"{names[0]} needs a strategy before it whose run gives the true lengths")
  prompt_len = np.array([len(p) for p in requests.prompt_ids])
  state = _ResumeState(state_dir(workdir, out_name), {
      "requests": [int(x) for x in requests.request_ids], "prompt_len": prompt_len.tolist(),
      "forced": None if forced is None else [int(x) for x in forced],
      "kv_budget_tokens": int(options.kv_budget_tokens), "repeats": int(bench.repeats),
      "generation": dict(config.generation), "model": engine.source})
  repeats = range(int(bench.repeats))
  state.write_meta({
      "device": scheduling.device_kind(), "date": today(), "model": engine.source,
      "prompts": len(prompt_len), "distinct_prompts": len(prompts),
      "kv_budget_tokens": int(options.kv_budget_tokens), "replay": bool(bench.replay),
      "max_seq_len": int(config.generation.max_seq_len),
      "cost_model": cost.source + (f" (profiled on {cost.device})" if cost.device else ""),
      "strategies": names, "repeats": int(bench.repeats)})
  to_run = [(n, r) for r in repeats for n in names if not state.has(n, r)]
  runner = predictors = None
  if to_run:
    # In length replay the predictors read the store's hidden states (of the model that
    # recorded the lengths), whatever this engine's width.
    hidden_dim = (requests.replay_hidden.shape[1] if requests.replay_hidden is not None
                  else engine.config.hidden_size)
    predictors = scheduling.load_predictors(predictor_dirs or {}, hidden_dim,
                                            int(config.predictor.max_len))
    runner = make_runner(engine, requests, config, forced)
    logging.info("benchmark: %d requests over %d prompts, KV budget %d tokens, replay=%s",
                 len(prompt_len), len(prompts), options.kv_budget_tokens, bool(bench.replay))
    # Compilation is timed apart by the engine (ahead-of-time per shape) and left out of
    # samples/s; the prefill for hidden states and each predictor are compiled here, first.
    for predictor in predictors.values():
      scheduling.predict(engine, requests, predictor, config)

  def run_one(name, true_length):
    planner, kind = STRATEGIES[name]
    seconds = {"predict": 0.0, "plan": 0.0, "generate": 0.0, "recover": 0.0, "compile": 0.0}
    sched_options = strategy_options(name, options, cost, prompt_len,
                                     config.generation.max_seq_len)
    pmf = scalar = None
    if kind is not None:
      if kind not in predictors:
        raise ValueError(f"strategy {name!r} needs a {kind!r} predictor export")
      clock = EngineClock(engine.generator)  # leaves out any wait for a shared device
      pmf, scalar = scheduling.predict(engine, requests, predictors[kind], config)
      _, seconds["predict"] = clock.split()
    sched_requests = scheduling.planner_requests(prompt_len, config.generation.max_seq_len,
                                                 pmf, scalar, true_length)
    plan, seconds["plan"] = _timed(scheduling.plan_any, planner, sched_requests, cost,
                                   sched_options)
    result = scheduling.run_plan(runner, planner, plan, sched_requests, cost, sched_options)
    for key in ("generate", "recover", "compile"):
      seconds[key] += result.seconds[key]
    row = summarize(name, result, seconds, len(prompt_len), peak_kv_tokens(result))
    row["threshold"] = plan.threshold
    row["expected_seconds"] = plan.expected_cost
    return row, result.tokens

  for repeat in repeats:
    first = None  # the first strategy's (row, tokens): the oracles' true lengths
    for name in names:
      if state.has(name, repeat) or (worker and not state.claim(name, repeat)):
        continue
      true_length = None
      if STRATEGIES[name][0] in NEEDS_TRUE_LENGTHS:
        first = first or state.load(names[0], repeat) or state.wait(names[0], repeat)
        true_length = np.array([len(t) for t in first[1]])
      row, tokens = run_one(name, true_length)
      state.save(name, repeat, row, tokens)
      log_row(row)
  # Workers leave the report to the process that started them.
  return report_from_state(workdir, out_name, write=not worker, allow_missing=worker)


def report_from_state(workdir: str, out_name: str = "benchmark", write: bool = True,
                      allow_missing: bool = False) -> dict:
  """The benchmark's report from its saved per-strategy results, with no engine: each
  strategy's median repeat, identical shares against the first strategy's responses, ratios
  of samples/s to vanilla:16 (`speedup`), vanilla:best and the oracles. Missing results are an
  error unless allow_missing (then listed in "not_run")."""
  directory = state_dir(workdir, out_name)
  meta_path = os.path.join(directory, "meta.json")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"no benchmark results in {directory} (missing meta.json)")
  with open(meta_path) as f:
    meta = json.load(f)
  names, results, missing = meta["strategies"], {}, []
  for repeat in range(int(meta["repeats"])):
    reference = _load_saved(directory, names[0], repeat)
    for name in names:
      saved = _load_saved(directory, name, repeat)
      if saved is None:
        missing.append(f"{name} (repeat {repeat})")
        continue
      row, tokens = saved
      row["identical_share"] = (compare_responses(reference[1], tokens)
                                if reference is not None else None)
      results.setdefault(name, []).append(row)
  if missing and not allow_missing:
    raise ValueError(f"{directory} has no saved result for {', '.join(missing)}: run the "
                     "benchmark (it resumes) before reporting")
  rows = []
  for name in names:
    if name not in results:
      continue
    runs = results[name]
    row = dict(sorted(runs, key=lambda r: r["samples_per_s"])[len(runs) // 2])  # median repeat
    row["repeats"] = len(runs)
    rows.append(row)
  report.add_ratios(rows, {"vanilla:16": "speedup", **report.RATIO_REFERENCES})
  out = {k: meta[k] for k in ("device", "date", "model", "prompts", "distinct_prompts",
                              "kv_budget_tokens", "replay", "max_seq_len", "cost_model")}
  out["rows"] = rows
  if missing:
    out["not_run"] = missing
  if write:
    out["files"] = write_outputs(out, workdir, out_name)
  return out
