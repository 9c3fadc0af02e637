"""The user's job: a JSONL of prompts (or an OpenAI batch file) -> a JSONL of responses (or
batch output lines) in input order, scheduled by a length predictor, resumable.

Everything that can be checked before generating is checked first (the output path, the chunk
size, the predictor against the config, every prompt's length). Work goes in chunks whose rows
are written whole into `<output>.parts/`; a part's name carries a key of what produced it (the
chunk's input records and line numbers, the generation settings, the model), so a rerun keeps
exactly the parts that still match and redoes the rest: another chunk size, an edited input or
other settings never mix old and new rows or drop any. The output file appears only once every
chunk is there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time

from lsdist_jax.errors import ConfigError, InputError, UserError
from lsdist_jax.files import write_lines, write_text
from lsdist_jax.serve.inputs import read_input
from lsdist_jax.serve.job_items import JobItem, batch_items, chunk_requests, output_row
from lsdist_jax.serve.job_items import prompt_items
from lsdist_jax.serve.openai_batch import duplicate_ids
from lsdist_jax.serve.runner import runner_split
from lsdist_jax.serve.strategies import JOB_PLANNERS, is_continuous

PARTS_FORMAT = 2  # bump when a part's content changes meaning


class OutputExistsError(UserError, FileExistsError):
  pass


def parts_dir(output: str) -> str:
  return output + ".parts"


def settings_key(config, engine) -> dict:
  """What, besides the prompts, decides the responses."""
  gen = config.generation
  return {"format": PARTS_FORMAT, "model": engine.fingerprint(), "decode": engine.decode_impl,
          "generation": {"temperature": float(gen.temperature), "top_p": float(gen.top_p),
                         "seed": int(gen.seed), "max_seq_len": int(gen.max_seq_len)}}


def part_name(chunk: list[JobItem], settings: dict) -> str:
  """<first line>-<lines>-<key>: the key hashes the chunk's line numbers and records and the
  settings, so a part is reused only for exactly the rows it holds."""
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  for p in chunk:
    digest.update(json.dumps([p.line, p.record], sort_keys=True, ensure_ascii=False).encode())
  return f"{chunk[0].line:09d}-{len(chunk)}-{digest.hexdigest()[:20]}.jsonl"


def check_output(output: str) -> None:
  if os.path.isdir(output):
    raise InputError(f"--output {output} is a directory; name a file")
  if os.path.exists(output):
    raise OutputExistsError(f"{output} exists: it is complete; remove it to generate again")
  folder = os.path.dirname(os.path.abspath(output))
  os.makedirs(folder, exist_ok=True)
  if not os.access(folder, os.W_OK):
    raise InputError(f"cannot write in {folder} (the folder of --output)")


def check_predictor(path: str, config, strategy: str = "continuous-search") -> None:
  """Refuses a predictor export made for another length range, or one the strategy cannot plan
  with (ssch plans with a LoRA export, the others with a distribution), before any model
  loads."""
  from lsdist_jax import exports
  from lsdist_jax.lora.predict import is_lora_export, read_lora_meta
  from lsdist_jax.predictor.train import EXPORT_FORMAT, EXPORT_META

  if is_lora_export(path) or strategy == "ssch":
    if strategy != "ssch":
      raise ConfigError(f"predictor at {path} is a LoRA predictor: it plans with --strategy ssch")
    if not is_lora_export(path):
      raise ConfigError(f"--strategy ssch plans with a LoRA predictor export "
                        f"(launch/train_lora.py); {path} is not one")
    read_lora_meta(path)
    return

  meta = exports.read_meta(path, EXPORT_META, EXPORT_FORMAT, "predictor export")
  if int(meta["max_len"]) != int(config.predictor.max_len):
    raise ConfigError(f"predictor at {path} predicts lengths 0..{meta['max_len']}, but this "
                      f"config needs 0..{config.predictor.max_len} (predictor.max_len)")
  if meta["kind"] != "distribution":
    raise ConfigError(f"predictor at {path} is a {meta['kind']} predictor; the generate job "
                      "plans with a distribution predictor")


def long_prompts(prompts, ids, max_seq_len: int) -> list[str]:
  return [f"line {p.line}: prompt of {len(x)} tokens leaves no room in "
          f"generation.max_seq_len={max_seq_len}" for p, x in zip(prompts, ids)
          if len(x) >= max_seq_len]


def run_generate(config, input_path: str, output_path: str, predictor_path: str | None = None,
                 strategy: str = "continuous-search", chunk_size: int = 8192,
                 skip_malformed: bool = False, skip_long: bool = False, engine=None,
                 show_progress: bool = True, stop_after_chunks: int | None = None,
                 ignore_model_field: bool = False) -> dict:
  """Generates a response for every prompt of `input_path` (a prompts file, or an OpenAI batch
  file: every line answered, with a response or its own error line); returns a throughput
  summary. `stop_after_chunks` ends early after generating that many chunks, output
  unassembled (tests simulate an interrupted job)."""
  setup, clock = {}, time.perf_counter()  # the imports and the input's read count as setup
  from lsdist_jax.engine import load_engine
  from lsdist_jax.serve import plan as serve_plan

  if int(chunk_size) < 1:
    raise ConfigError(f"--chunk must be at least 1, got {chunk_size}")
  if strategy not in JOB_PLANNERS:
    raise ConfigError(f"--strategy {strategy!r}; expected one of {JOB_PLANNERS}")
  check_output(output_path)
  kind, entries, malformed = read_input(input_path, skip_malformed)
  if kind == "batch":
    dupes = duplicate_ids(entries)
    if dupes:
      named = "; ".join(f"{k!r} on lines {v}" for k, v in list(dupes.items())[:20])
      raise InputError(f"{input_path}: custom_id must be unique; {len(dupes)} repeat: {named}")
  if predictor_path:
    check_predictor(predictor_path, config, strategy)
  elif strategy == "ssch":
    raise ConfigError("--strategy ssch needs --predictor: a LoRA predictor export")

  def lap(name):  # the setup's timeline, reported in the summary
    nonlocal clock
    now = time.perf_counter()
    setup[name] = round(now - clock, 2)
    clock = now

  lap("read_input")
  early = None
  if engine is None and kind == "prompts" and is_continuous(strategy):
    # a decode loop the job will likely run compiles while the model loads (serve/early.py)
    first = entries[:int(chunk_size)]
    early = start_early(config, [p.text for p in first],
                        int(config.collect.hidden_layer) if predictor_path else None)
    lap("early_start")  # the backend starts here, when it compiles early
  engine = engine or load_engine(config, early.tokenizer if early is not None else None)
  lap("load_engine")
  if early is not None:
    early.join()
  if early is not None and not engine.generator.adopt(early.generator):
    early = None
  compiled_before = len(engine.generator.compile_log)  # an engine may serve several jobs
  lap("early_wait")
  max_seq_len = int(config.generation.max_seq_len)
  too_long = []
  if kind == "batch":
    items = batch_items(entries, engine, max_seq_len, model_names(config, engine),
                        ignore_model_field)
  else:
    ids = (early.ids if early is not None and early.ids is not None
           and len(early.ids) == len(entries) and early.tokenizer.result() is engine.tokenizer
           else engine.encode([p.text for p in entries]))  # tokenized while the model loaded
    too_long = long_prompts(entries, ids, max_seq_len)
    if too_long and not skip_long:
      raise InputError(f"{input_path}: {len(too_long)} prompt(s) too long (pass --skip_long to "
                       "skip them):\n" + "\n".join(too_long[:20]))
    for message in too_long:
      logging.warning("skipped %s", message)
    keep = [i for i, x in enumerate(ids) if len(x) < max_seq_len]
    items = prompt_items([entries[i] for i in keep], [ids[i] for i in keep])
  lap("tokenize")
  predictor = None
  if predictor_path:
    predictor = serve_plan.load_predictors(
        {"job": predictor_path}, engine.config.hidden_size, int(config.predictor.max_len),
        engine=engine, config=config)["job"]
  cost = serve_plan.load_cost_model(config, engine=engine)
  # One KV budget for every chunk ("auto" is sized from the device's free memory once, here)
  options = serve_plan.planner_options(config, engine)
  if early is not None and items:
    # now that the prompts are known: the prediction's prefill, the first fill's and the
    # refills' inserts compile while the rest sets up; plans that run them do not wait for them
    early = compile_ahead(early, engine, items[:int(chunk_size)], config, predictor, cost)
    options = dataclasses.replace(options, compiled=early.programs)
  lap("predictor_and_budget")

  settings = settings_key(config, engine)
  if kind == "batch":
    settings["batch"] = {"ignore_model_field": bool(ignore_model_field),
                         "model_names": model_names(config, engine)}
  chunks = [list(range(s, min(s + int(chunk_size), len(items))))
            for s in range(0, len(items), int(chunk_size))]
  names = [part_name([items[i] for i in c], settings) for c in chunks]
  folder = parts_dir(output_path)
  os.makedirs(folder, exist_ok=True)
  present = set(os.listdir(folder))
  stale = sorted(present - set(names))
  for name in stale:  # another input, chunking or settings made these: their rows are redone
    path = os.path.join(folder, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  if stale:
    logging.warning("generate: %d part(s) in %s came from another input, chunking or settings; "
                    "removed (their prompts are generated again)", len(stale), folder)
  done = [name in present for name in names]
  n_requests = sum(item.choices for item in items)
  logging.info("generate: %d lines (%d requests) in %d chunks, %d already written%s", len(items),
               n_requests, len(chunks), sum(done),
               f", {len(too_long)} too long skipped" if too_long else "")
  bar = _bar(n_requests, show_progress)
  bar(sum(items[i].choices for c, d in zip(chunks, done) if d for i in c))
  started, tokens, served, generated_chunks = time.perf_counter(), 0, 0, 0
  split: dict[str, float] = {}  # the continuous runner's time split, summed over chunks
  model_name = model_names(config, engine)[0]
  for chunk, name, is_done in zip(chunks, names, done):
    if is_done:
      continue
    part = [items[i] for i in chunk]
    outputs = [([], []) for _ in part]  # per item: (tokens, finished) of each choice
    requests, owner = chunk_requests(part, config.generation)
    if requests.n:
      result = serve_plan.schedule_and_run(engine, requests, config, predictor, strategy, cost,
                                           on_progress=bar, options=options)
      for k, toks, fin in zip(owner, result.tokens, result.finished):
        outputs[k][0].append(toks)
        outputs[k][1].append(bool(fin))
      tokens += result.generated_tokens
      served += requests.n
      for key, value in result.seconds.items():
        split[key] = split.get(key, type(value)()) + value  # seconds add up, call rows join
    created = int(time.time())
    plain = [k for k, item in enumerate(part) if item.batch is None and outputs[k][0]]
    texts = dict(zip(plain, engine.tokenizer.decode_batch([outputs[k][0][0] for k in plain])))
    rows = [json.dumps(output_row(item, toks, fins, engine, model_name, created, texts.get(k)),
                       ensure_ascii=False)
            for k, (item, (toks, fins)) in enumerate(zip(part, outputs))]
    write_lines(os.path.join(folder, name), rows)
    generated_chunks += 1
    if stop_after_chunks is not None and generated_chunks >= stop_after_chunks:
      return {"stopped_after_chunks": generated_chunks}
  assemble(output_path, folder, names, [[items[i].key for i in c] for c in chunks],
           "custom_id" if kind == "batch" else "line")
  elapsed = time.perf_counter() - started
  summary = {"format": kind, "prompts": len(items), "served_now": served,
             "skipped_malformed": len(malformed), "skipped_long": len(too_long),
             "seconds": round(elapsed, 2), "samples_per_s": round(served / max(elapsed, 1e-9), 3),
             "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
             # prediction, planning and generation, no compilation: the benchmark's steady
             # state (`benchmark.run.summarize`)
             "steady_samples_per_s": round(served / max(sum(
                 split.get(k, 0.0) for k in ("predict", "plan", "generate", "recover")), 1e-9),
                                           3),
             "output": output_path,
             # compilation the job waited for, and compilation done behind running work
             "compile_seconds": round(engine.generator.compile_seconds, 2),
             "background_compile_seconds": round(engine.generator.background_compile_seconds, 2),
             "kv_budget_tokens": options.kv_budget_tokens, "setup_seconds": setup,
             "load_seconds": getattr(engine, "load_seconds", {}),
             **runner_split(split, calls=True),
             **compile_summary(engine.generator.compile_log[compiled_before:])}
  if kind == "batch":
    summary.update({"requests": n_requests,
                    "error_lines": sum(item.prompt_ids is None for item in items)})
  return summary


def compile_ahead(early, engine, items, config, predictor, cost):
  """`early` with the first chunk's prediction prefill (`precompile_embed_requests`, where a
  hidden-state predictor will run) and its first fill's and refills' inserts
  (`EarlyStart.first_fill`) compiling in the background."""
  from lsdist_jax.serve.requests import precompile_embed_requests

  served = [item for item in items if item.prompt_ids is not None]
  if not served:
    return early
  requests, _ = chunk_requests(served, config.generation)
  if predictor is not None and predictor.kind != "lora" and not early.at_once:
    precompile_embed_requests(engine, requests, int(config.collect.hidden_layer), cost,
                              float(config.schedule.compile_seconds))
    threading.Thread(target=predictor.warm, name="predictor-warm", daemon=True).start()
  return early.first_fill(engine.generator, requests.prompt_len)


def start_early(config, texts: list[str], embed_layer: int | None):
  """`serve.early.start` for these prompts; a failure there only loses the head start
  (logged)."""
  from lsdist_jax.serve import early

  try:
    return early.start(config, len(texts), texts, embed_layer)
  except Exception as e:  # noqa: BLE001 - the job itself reports real problems when it loads
    logging.warning("generate: no early compilation (%s: %s)", type(e).__name__, e)
    return None


def compile_summary(log: list[dict], top: int = 16) -> dict:
  """How many programs the run compiled, and the `top` that took longest (name, seconds of
  compilation, seconds a run waited for it, and for those compiled in the background their
  lowering's seconds and the process age they started at)."""
  slowest = sorted(log, key=lambda e: -e["seconds"])[:top]
  return {"programs_compiled": len(log), "slowest_compiles": slowest}


def model_names(config, engine) -> list[str]:
  """The names a batch line's body.model may give the loaded model (the first is reported)."""
  names = [str(config.model.name), str(config.model.path or ""), str(engine.source or "")]
  return [n for n in names if n]


def assemble(output: str, folder: str, names: list[str], keys: list[list], field: str) -> None:
  """Joins the parts into `output` (whole), checking each holds exactly its lines (by `field`:
  the line number, or a batch line's custom_id), then removes the parts."""
  out = []
  for name, expected in zip(names, keys):
    with open(os.path.join(folder, name), encoding="utf-8") as f:
      # "\n" only: a response may hold U+2028 or U+0085, which splitlines() also splits on
      rows = f.read().split("\n")[:-1]
    got = [json.loads(r)[field] for r in rows]
    if got != expected:
      raise RuntimeError(f"{folder}/{name} holds {field}s {got[:5]}..., expected "
                         f"{expected[:5]}...")
    out.extend(rows)
  write_text(output, "".join(r + "\n" for r in out))
  shutil.rmtree(folder)


def _bar(total: int, enabled: bool):
  """bar(responses, tokens=0): moves as responses finish, with tokens/s (and tqdm's ETA)."""
  if not enabled:
    return lambda n, tokens=0: None
  from tqdm import tqdm

  bar = tqdm(total=total, unit="response", desc="generate", dynamic_ncols=True)
  started, counted = time.perf_counter(), [0]

  def update(n, tokens=0):
    counted[0] += tokens
    bar.update(n)
    bar.set_postfix_str(f"{counted[0] / max(time.perf_counter() - started, 1e-9):,.0f} tok/s",
                        refresh=False)

  return update
