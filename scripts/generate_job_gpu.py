"""The user's job at full speed (issue 18), measured on one GPU:

  python3 scripts/generate_job_gpu.py --config=configs/smollm2_alpaca.py:gpu \
      --model_path=<SmolLM2 GGUF> --predictor=<distribution export> --run=<folder> \
      [--batches=512,1024,2048] [--job_args="--config.schedule.kv_budget_tokens=..."]

(scripts/generate_job_gpu.sh runs it.) Steps, each skipped when <run>/<step>.done is there:
1. prompts: prompts files of prompts the predictor never saw, from the split of the 7,451-prompt
   store (docs/data/smollm2_alpaca_7451; the predictor trains on its train split):
   <run>/prompts_500.jsonl, 500 of its test prompts, and <run>/prompts_8192.jsonl, its valid +
   test prompts (~1,500) cycled in a fixed shuffled order to 8,192 lines;
2. job_500_cold, job_500_warm, job_8192_cold: launch/generate.py in its own process, timed
   whole (process_s), each on a fresh output; a cold run points the persistent compilation cache
   (engine.compilation_cache) at a new empty folder, the warm run at the 500-cold run's;
3. plain_<B> for each --batches B: plain static batching in its own cold process (an empty cache
   folder): engine.generate over the 8,192 lines in file order, B rows a batch, each to
   max_seq_len with the config's sampling settings and the job's request ids, compilation
   included; a B whose KV cache would exceed the auto budget is skipped and said so;
4. report (always): merges docs/results/generate_job.json (rows other scripts put there are
   kept: only rows of the same prompts, strategy and cold are replaced) and prints the table with
   the issue's targets: 8,192 cold over the best plain batching, 500 cold against 30 s.
Logs: <run>/<step>.log; each step's result: <run>/<step>.json.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from job_results import REPO, RESULTS, load_config_file, merge_results, write_lines  # noqa: E402

STORE = os.path.join(REPO, "docs", "data", "smollm2_alpaca_7451")
ORDER_SEED = 18  # the prompt files' fixed shuffled order (issue 18)
COLD_TARGET_S = 30.0  # 500 prompts, cold: the whole process
PLAIN_TARGET = 1.5  # 8,192 prompts, cold: end-to-end samples/s over the best plain batching
STEADY_TARGET = 0.8  # 8,192 prompts, cold: end to end over the same run's steady state
STEP_GROUPS = ("prompts", "jobs", "plain", "report")


class StepFailed(RuntimeError):
  pass


def progress(message: str) -> None:
  print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# ---------------------------------------------------------------------------------- prompts


def unseen_prompts(store_path: str) -> dict[str, list[str]]:
  """{"valid": texts, "test": texts}: the store's prompts outside its train split (the split by
  a seeded hash of each prompt's key, LengthStore.read), in store order, their texts from the
  shipped Alpaca pool matched by prompt key."""
  from lsdist_jax.data import prompt_key, prompt_text, read_pool
  from lsdist_jax.store import LengthStore

  data = LengthStore.open(store_path).read()
  texts = {}
  for record in read_pool():
    text = prompt_text(record)
    texts.setdefault(prompt_key(text), text)
  out = {}
  for split in ("valid", "test"):
    keys = [str(k) for k in data["key"][data["split"] == split]]
    missing = [k for k in keys if k not in texts]
    if missing:
      raise ValueError(f"{len(missing)} {split} prompts of {store_path} are not in the shipped "
                       f"Alpaca pool (first key {missing[0]})")
    out[split] = [texts[k] for k in keys]
  return out


def prompt_files(store_path: str, n_test: int, n_cycled: int,
                 seed: int = ORDER_SEED) -> tuple[list[dict], list[dict], dict]:
  """(file A, file B, what they hold): `n_test` of the store's test prompts, and its valid +
  test prompts in a fixed shuffled order cycled to `n_cycled` lines; lines are
  {"prompt": text}, the generate job's simple format."""
  splits = unseen_prompts(store_path)
  rng = np.random.default_rng(seed)
  test = [splits["test"][i] for i in rng.permutation(len(splits["test"]))]
  if len(test) < n_test:
    raise ValueError(f"{store_path} has {len(test)} test prompts; {n_test} asked")
  unseen = splits["valid"] + splits["test"]
  order = [unseen[i] for i in rng.permutation(len(unseen))]
  a = [{"prompt": text} for text in test[:n_test]]
  b = [{"prompt": order[i % len(order)]} for i in range(n_cycled)]
  about = {"valid": len(splits["valid"]), "test": len(splits["test"]), "file_a": n_test,
           "file_b": n_cycled, "file_b_distinct": len(set(order)),
           "file_b_repeats": f"{n_cycled // len(order)}-{-(-n_cycled // len(order))}"}
  return a, b, about


# ------------------------------------------------------------------------------ job runs


def job_command(args, input_path: str, output: str, cache: str, summary: str) -> list[str]:
  command = [sys.executable, os.path.join(REPO, "launch", "generate.py"),
             f"--config={args.config}", f"--input={input_path}", f"--output={output}",
             f"--strategy={args.strategy}", f"--config.engine.compilation_cache={cache}",
             f"--summary={summary}"]
  if args.model_path:
    command.append(f"--config.model.path={args.model_path}")
  if args.predictor:
    command.append(f"--predictor={args.predictor}")
  return command + shlex.split(args.job_args)


def child_env() -> dict:
  """This environment, with the persistent compilation cache left on."""
  env = dict(os.environ)
  env.pop("LSDIST_NO_COMPILE_CACHE", None)
  return env


def remove(path: str) -> str:
  """Removes the file or folder at `path`, if any; returns the path."""
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)
  return path


def fresh_folder(path: str) -> str:
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  return path


def timed_process(command: list[str], log: str) -> float:
  """Runs `command` from the repository root, output to `log`; its wall clock in seconds."""
  started = time.perf_counter()
  with open(log, "w", encoding="utf-8") as f:
    rc = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                        env=child_env()).returncode
  seconds = time.perf_counter() - started
  if rc != 0:
    raise StepFailed(f"exit {rc} after {seconds:.1f} s; see {log}")
  return seconds


def job_run(args, name: str, input_path: str, prompts: int, cache: str, cold: bool) -> dict:
  """One generate-job process on a fresh output; its row of the report."""
  from lsdist_jax.files import read_json

  output = os.path.join(args.run, "out", name + ".jsonl")
  os.makedirs(os.path.dirname(output), exist_ok=True)
  for stale in (output, output + ".parts"):  # never resume: every run generates everything
    remove(stale)
  if cold:
    fresh_folder(cache)
  elif not os.path.isdir(cache) or not os.listdir(cache):
    raise StepFailed(f"the warm run needs the cold run's compilation cache {cache}; it is empty")
  summary_path = remove(os.path.join(args.run, name + ".summary.json"))
  command = job_command(args, input_path, output, cache, summary_path)
  progress(f"{name}: {' '.join(shlex.quote(c) for c in command)}")
  process_s = timed_process(command, os.path.join(args.run, name + ".log"))
  summary = read_json(summary_path, "job summary")
  return {"prompts": prompts, "strategy": args.strategy, "cold": cold,
          "process_s": round(process_s, 2), "job_s": summary.get("seconds"),
          "compile_s": summary.get("compile_seconds"),
          "background_compile_s": summary.get("background_compile_seconds"),
          "samples_per_s": summary.get("samples_per_s"),
          "steady_samples_per_s": summary.get("steady_samples_per_s"),
          "tokens_per_s": summary.get("tokens_per_s"),
          "kv_budget_tokens": summary.get("kv_budget_tokens"),
          **{k: summary[k] for k in ("before_job_s", "setup_seconds", "load_seconds",
                                       "programs_compiled", "slowest_compiles", "runner_split")
             if k in summary}}


def compact_calls(row: dict) -> dict:
  """The row with its runner split's table of calls (one per insert + decode) summed up: the
  insert calls, the rows they inserted, the slots busy as each decode call started (a mean
  weighted by its steps), and the steps of the last call (the final drain)."""
  split = row.get("runner_split")
  if not split or "calls" not in split:
    return row
  calls = [dict(zip(split["calls_columns"], c)) for c in split["calls"]]
  steps = sum(c["decode_steps"] for c in calls)
  brief = {"insert_calls": sum(c["inserted_rows"] > 0 for c in calls),
           "inserted_rows": sum(c["inserted_rows"] for c in calls),
           "busy_slots_at_decode_start": round(
               sum(c["busy_slots"] * c["decode_steps"] for c in calls) / max(steps, 1), 1),
           "last_call_steps": calls[-1]["decode_steps"]}
  split = {k: v for k, v in split.items() if k not in ("calls", "calls_columns")}
  return dict(row, runner_split=dict(split, calls=brief))


def describe_row(row: dict) -> str:
  return (f"process {row['process_s']} s, job {row['job_s']} s, compile {row['compile_s']} s, "
          f"{row['samples_per_s']} samples/s, {row['tokens_per_s']} tokens/s, "
          f"KV budget {row['kv_budget_tokens']}")


# ------------------------------------------------------------------------ plain batching


def static_kv_tokens(engine, ids: list[list[int]], batch: int, max_seq_len: int) -> int:
  """The most KV-cache tokens one static batch of `batch` rows over `ids` (in order, each to
  max_seq_len) holds: its padded rows x its cache length, the shapes Generator.generate runs at
  (the prompt block + the cap, rounded to the engine's buckets)."""
  buckets = engine.generator.buckets
  most = 0
  for start in range(0, len(ids), batch):
    lengths = [len(x) for x in ids[start:start + batch]]
    cap = max_seq_len - min(lengths)
    most = max(most, buckets.batch_size(len(lengths)) * buckets.cache_len(max(lengths), cap))
  return most


def plain_batching(config, input_path: str, batch: int) -> dict:
  """Plain static batching of a prompts file in this process: the engine of `config`, the
  prompts chat-formatted as the job formats them (engine.encode), engine.generate in file order
  `batch` rows at a time, each batch to max_seq_len with the config's temperature, top_p and
  seed and the job's request ids (line numbers). Timed from the first batch to the last,
  compilation included (model load and tokenization left out, as the job's `seconds` leaves
  them out). Skipped (samples_per_s None) when a batch's KV cache exceeds the auto budget."""
  from lsdist_jax.engine import device_kind, kv_budget_tokens, load_engine
  from lsdist_jax.serve.inputs import read_prompts

  prompts, _ = read_prompts(input_path)
  engine = load_engine(config)
  ids = engine.encode([p.text for p in prompts])
  request_ids = [p.line for p in prompts]
  gen = config.generation
  max_seq_len = int(gen.max_seq_len)
  budget, how = kv_budget_tokens(engine, "auto", float(config.schedule.kv_memory_fraction))
  need = static_kv_tokens(engine, ids, batch, max_seq_len)
  out = {"batch": batch, "samples": len(ids), "kv_tokens": need, "kv_budget_tokens": budget,
         "kv_budget": how, "device": device_kind()}
  if need > budget:
    progress(f"plain {batch}: skipped, its KV cache ({need:,} tokens) exceeds the budget "
             f"({budget:,}: {how})")
    return dict(out, samples_per_s=None, tokens_per_s=None,
                skipped=f"KV cache of {need:,} tokens over the auto budget of {budget:,}")
  compiled = getattr(engine.generator, "compile_seconds", None)
  tokens, started = 0, time.perf_counter()
  for start in range(0, len(ids), batch):
    responses = engine.generate(
        ids[start:start + batch], max_new_tokens=max_seq_len, max_seq_len=max_seq_len,
        temperature=float(gen.temperature), top_p=float(gen.top_p), seed=int(gen.seed),
        request_ids=request_ids[start:start + batch], batch_size=batch)
    tokens += sum(len(r.token_ids) for r in responses)
    progress(f"plain {batch}: {start + len(responses):,}/{len(ids):,} samples, "
             f"{time.perf_counter() - started:.1f} s")
  seconds = time.perf_counter() - started
  if compiled is not None:
    compiled = round(engine.generator.compile_seconds - compiled, 2)
  return dict(out, samples_per_s=round(len(ids) / seconds, 3),
              tokens_per_s=round(tokens / seconds, 1), seconds=round(seconds, 2),
              generated_tokens=tokens, compile_s=compiled)


def plain_run(args, batch: int, input_path: str) -> dict:
  """plain_batching in its own process, with an empty compilation cache folder."""
  from lsdist_jax.files import read_json

  name = f"plain_{batch}"
  result = remove(os.path.join(args.run, name + ".worker.json"))
  command = [sys.executable, os.path.abspath(__file__), f"--config={args.config}",
             f"--model_path={args.model_path}", f"--run={args.run}",
             f"--plain_batch={batch}", f"--plain_input={input_path}",
             f"--plain_cache={fresh_folder(os.path.join(args.run, 'cache', name))}",
             f"--plain_out={result}"]
  progress(f"{name}: {' '.join(shlex.quote(c) for c in command)}")
  process_s = timed_process(command, os.path.join(args.run, name + ".log"))
  return dict(read_json(result, "plain batching result"), process_s=round(process_s, 2))


def plain_worker(args) -> None:
  config = load_config_file(args.config)
  if args.model_path:
    config.model.path = args.model_path
  config.engine.compilation_cache = args.plain_cache
  from lsdist_jax.files import write_json

  write_json(plain_batching(config, args.plain_input, args.plain_batch), args.plain_out)


def describe_plain(p: dict) -> str:
  if p.get("samples_per_s") is None:
    return f"skipped: {p.get('skipped')}"
  return (f"{p['samples_per_s']} samples/s, {p['tokens_per_s']} tokens/s, {p['seconds']} s "
          f"(compile {p.get('compile_s')} s), KV {p['kv_tokens']:,} of {p['kv_budget_tokens']:,}")


# --------------------------------------------------------------------------------- report


NOTES = [
    "Prompts the predictor never saw: the 7,451-prompt store docs/data/smollm2_alpaca_7451 is "
    "split by a seeded hash of each prompt's key (store meta split_seed) and the predictor "
    "trains on its train split; the 500-prompt file holds 500 of its test prompts, the "
    "8,192-line file its valid + test prompts in a fixed shuffled order, cycled (each {repeats} "
    "times). Every line is its own request: its PRNG identity is its line number (the job's "
    "request id) under the config's seed, so repeated prompts are distinct samples.",
    "cold: the process's persistent compilation cache (engine.compilation_cache) is a new empty "
    "folder; warm: the 500-cold run's folder. The model file may be in the OS page cache after "
    "the first process.",
    "process_s: the whole generate process's wall clock (interpreter start, imports, model and "
    "predictor load, compile, predict, generate, write). job_s, samples_per_s, tokens_per_s, "
    "compile_s (compile time the run waited for), background_compile_s and kv_budget_tokens: "
    "the job's own summary (launch/generate.py --summary); job_s leaves out the model and "
    "predictor load.",
    "plain_batching: engine.generate over the 8,192-line file in file order, static batches of "
    "B rows, each to max_seq_len with the config's temperature, top_p and seed and the job's "
    "request ids, no predictor; each B in its own process with an empty compilation cache; "
    "timed from the first batch to the last, compilation included, model load and tokenization "
    "left out (as job_s). A B whose padded rows x cache length exceed the auto KV budget "
    "(engine.kv_budget_tokens) is skipped.",
]


def best_plain(plain: list[dict]) -> dict | None:
  ran = [p for p in plain if p.get("samples_per_s")]
  return max(ran, key=lambda p: p["samples_per_s"]) if ran else None


def target_lines(rows: list[dict], plain: list[dict], n_test: int, n_cycled: int) -> list[str]:
  """The issue's targets, measured: the 8,192-cold job over the best plain batching (the job's
  samples/s, and prompts over the whole process), the 500-cold process against 30 s."""
  lines = []
  best = best_plain(plain)
  big = next((r for r in rows if r["prompts"] == n_cycled and r["cold"]), None)
  if big and best and big.get("samples_per_s"):
    lines.append(f"{n_cycled:,} prompts cold: the job's {big['samples_per_s']} samples/s is "
                 f"{big['samples_per_s'] / best['samples_per_s']:.2f}x the best plain batching "
                 f"(B={best['batch']}: {best['samples_per_s']} samples/s; target >= "
                 f"{PLAIN_TARGET}x); over the whole process ({n_cycled / big['process_s']:.2f} "
                 f"prompts/s) {n_cycled / big['process_s'] / best['samples_per_s']:.2f}x.")
  if big and big.get("steady_samples_per_s"):
    ratio = big["samples_per_s"] / big["steady_samples_per_s"]
    lines.append(f"{n_cycled:,} prompts cold: end to end {ratio:.2f}x the steady state of the "
                 f"same run ({big['steady_samples_per_s']} samples/s: prediction, planning and "
                 f"generation as the benchmark counts them; target >= {STEADY_TARGET}x; "
                 f"{'met' if ratio >= STEADY_TARGET else 'missed'}).")
  small = next((r for r in rows if r["prompts"] == n_test and r["cold"]), None)
  if small:
    verdict = "met" if small["process_s"] <= COLD_TARGET_S else "missed"
    lines.append(f"{n_test} prompts cold: the process took {small['process_s']} s against the "
                 f"{COLD_TARGET_S:.0f} s target ({small['process_s'] / COLD_TARGET_S:.2f}x; "
                 f"{verdict}).")
  return lines


def same_row(old: dict, new: dict) -> bool:
  """A row of this script's: the same prompts, strategy and cold (other scripts' rows, which
  have no `cold`, are never replaced)."""
  return ("cold" in old and old.get("prompts") == new["prompts"]
          and old.get("strategy") == new["strategy"] and old.get("cold") == new["cold"])


def device_name(plain: list[dict]) -> str:
  """The device the runs used: what a plain-batching process saw, else asked of JAX."""
  for p in plain:
    if p.get("device"):
      return p["device"]
  env = dict(child_env(), XLA_PYTHON_CLIENT_PREALLOCATE="false")
  done = subprocess.run([sys.executable, "-c", "from lsdist_jax.engine import device_kind; "
                         "print(device_kind())"], cwd=REPO, env=env, capture_output=True,
                        text=True)
  return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout else ""


def command_line(args) -> str:
  extra = f" {args.job_args}" if args.job_args else ""
  return (f"bash scripts/generate_job_gpu.sh <SmolLM2 GGUF> <run> <distribution export>; each "
          f"job: python3 launch/generate.py --config={args.config} --config.model.path=<GGUF> "
          f"--config.engine.compilation_cache=<an empty folder, or the 500-cold run's> "
          f"--input=<prompts file> --output=<a fresh path> --predictor=<export> "
          f"--strategy={args.strategy} --summary=<file>{extra}")


def table(rows: list[dict], plain: list[dict]) -> str:
  def cell(x, width):
    return f"{'-' if x is None else x!s:>{width}}"

  out = [f"{'prompts':>8} {'cold':>5} {'process_s':>10} {'job_s':>8} {'compile_s':>10} "
         f"{'samples/s':>10} {'tokens/s':>10} {'kv_budget':>10}"]
  for r in rows:
    out.append(f"{r['prompts']:>8} {r['cold']!s:>5} {cell(r['process_s'], 10)} "
               f"{cell(r['job_s'], 8)} {cell(r['compile_s'], 10)} "
               f"{cell(r['samples_per_s'], 10)} {cell(r['tokens_per_s'], 10)} "
               f"{cell(r['kv_budget_tokens'], 10)}")
  for p in plain:
    out.append(f"plain batching B={p['batch']}: {describe_plain(p)}")
  return "\n".join(out)


def report(args, about: dict | None, rows: list[dict], plain: list[dict]) -> dict:
  repeats = about["file_b_repeats"] if about else "5-6"
  notes = [NOTES[0].format(repeats=repeats)] + NOTES[1:]
  notes += target_lines(rows, plain, args.test_prompts, args.cycled_prompts)
  if args.job_args:
    notes.append(f"every job run also took {args.job_args}")
  keep = ("batch", "samples_per_s", "tokens_per_s", "seconds", "compile_s", "kv_tokens",
          "kv_budget_tokens", "skipped")
  rows = [compact_calls(r) for r in rows]
  data = merge_results(
      args.results, rows, same_row,
      plain_batching=[{k: p[k] for k in keep if k in p} for p in plain],
      device=device_name(plain), date=time.strftime("%Y-%m-%d"), command=command_line(args),
      notes=notes)
  print(table(rows, plain))
  for line in target_lines(rows, plain, args.test_prompts, args.cycled_prompts):
    print(line)
  print(f"wrote {len(rows)} rows and {len(plain)} plain batching entries to {args.results}",
        flush=True)
  return data


# ---------------------------------------------------------------------------------- steps


def done_result(run: str, name: str):
  """The result of step `name` when it is done (<run>/<name>.done), else None."""
  from lsdist_jax.files import read_json

  result = os.path.join(run, name + ".json")
  if not (os.path.isfile(os.path.join(run, name + ".done")) and os.path.isfile(result)):
    return None
  return read_json(result, f"result of step {name}")


def step(run: str, name: str, fn, describe=str):
  """fn()'s result, kept in <run>/<name>.json beside <run>/<name>.done; a step done before is
  read back instead of run. None when it failed (StepFailed: said on stdout)."""
  from lsdist_jax.files import write_json

  value = done_result(run, name)
  if value is not None:
    progress(f"{name}: done before: {describe(value)}")
    return value
  progress(f"{name}: start")
  try:
    value = fn()
  except StepFailed as e:
    progress(f"{name}: FAILED: {e}")
    return None
  write_json(value, os.path.join(run, name + ".json"))
  with open(os.path.join(run, name + ".done"), "w"):
    pass
  progress(f"{name}: {describe(value)}")
  return value


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/smollm2_alpaca.py:gpu")
  parser.add_argument("--model_path", default="", help="the model file (config.model.path)")
  parser.add_argument("--predictor", default="", help="a distribution predictor export")
  parser.add_argument("--run", required=True, help="the run folder (resumable)")
  parser.add_argument("--store", default=STORE, help="the store whose split picks the prompts")
  parser.add_argument("--test_prompts", type=int, default=500)
  parser.add_argument("--cycled_prompts", type=int, default=8192)
  parser.add_argument("--batches", default="512,1024,2048", help="plain batching's batch sizes")
  parser.add_argument("--strategy", default="continuous-search")
  parser.add_argument("--job_args", default="", help="more flags for every job process")
  parser.add_argument("--steps", default=",".join(STEP_GROUPS),
                      help=f"which of {', '.join(STEP_GROUPS)} to run (prompts always; the "
                      "report reads every step done so far)")
  parser.add_argument("--results", default=RESULTS)
  # one plain-batching process (the driver starts it: plain_run)
  parser.add_argument("--plain_batch", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--plain_input", default="", help=argparse.SUPPRESS)
  parser.add_argument("--plain_cache", default="", help=argparse.SUPPRESS)
  parser.add_argument("--plain_out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.plain_batch:
    plain_worker(args)
    return
  steps = {s.strip() for s in args.steps.split(",") if s.strip()}
  if steps - set(STEP_GROUPS):
    parser.error(f"--steps: unknown {sorted(steps - set(STEP_GROUPS))}; known: {STEP_GROUPS}")
  if "jobs" in steps and not args.predictor:
    progress("no --predictor: the job runs without one (plain slot refill), not the issue's job")
  run = args.run = os.path.abspath(args.run)
  os.makedirs(run, exist_ok=True)
  n_test, n_cycled = args.test_prompts, args.cycled_prompts
  file_a = os.path.join(run, f"prompts_{n_test}.jsonl")
  file_b = os.path.join(run, f"prompts_{n_cycled}.jsonl")
  if not (os.path.isfile(file_a) and os.path.isfile(file_b)):  # gone: written again
    remove(os.path.join(run, "prompts.done"))

  def write_prompts():
    a, b, about = prompt_files(args.store, n_test, n_cycled)
    write_lines(file_a, a)
    write_lines(file_b, b)
    return about

  about = step(run, "prompts", write_prompts, json.dumps)  # the other steps need it: always
  failed = about is None
  cache = os.path.join(run, "cache")
  cold_a = f"job_{n_test}_cold"
  jobs = [(cold_a, file_a, n_test, cold_a, True),  # (step, prompts, lines, cache folder, cold)
          (f"job_{n_test}_warm", file_a, n_test, cold_a, False),
          (f"job_{n_cycled}_cold", file_b, n_cycled, f"job_{n_cycled}_cold", True)]
  batches = [int(b) for b in args.batches.split(",") if b.strip()]
  if "jobs" in steps and about is not None:
    for name, path, n, cache_name, cold in jobs:
      if not cold and done_result(run, cache_name) is None:
        progress(f"{name}: not run: it needs {cache_name} done (its compilation cache)")
        failed = True
        continue
      row = step(run, name,
                 lambda: job_run(args, name, path, n, os.path.join(cache, cache_name), cold),
                 describe_row)
      failed |= row is None
  if "plain" in steps and about is not None:
    for batch in batches:
      p = step(run, f"plain_{batch}", lambda: plain_run(args, batch, file_b), describe_plain)
      failed |= p is None
  if "report" in steps:
    rows = [r for r in (done_result(run, j[0]) for j in jobs) if r is not None]
    plain = [p for p in (done_result(run, f"plain_{b}") for b in batches) if p is not None]
    report(args, about, rows, plain)
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
