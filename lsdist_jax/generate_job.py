"""The user's job: a JSONL of prompts -> a JSONL of responses in input order, scheduled by a predictor.

Work goes in chunks whose results are written atomically beside the output; a rerun skips the
chunks already written, and the output file appears only once every chunk is there.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import time



@dataclasses.dataclass
class InputPrompt:
  line: int  # 1-based line number in the input file
  text: str
  record: dict


class MalformedInputError(ValueError):
  pass


def prompt_text(record: dict) -> str:
  """`prompt`, or Alpaca's instruction (+ "\\n" + input when input is not empty)."""
  if isinstance(record.get("prompt"), str):
    return record["prompt"]
  if isinstance(record.get("instruction"), str):
    extra = record.get("input") or ""
    return record["instruction"] + ("\n" + extra if extra else "")
  raise KeyError("needs a string field 'prompt' or 'instruction'")


def read_prompts(path: str, skip_malformed: bool = False) -> list[InputPrompt]:
  """Prompts of a JSONL file. A malformed line is an error naming its line number, unless
  `skip_malformed`, which logs and skips it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file not found: {path}")
  prompts, bad = [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        prompts.append(InputPrompt(number, prompt_text(record), record))
      except (ValueError, KeyError) as e:
        bad.append(f"{path}:{number}: {e}")
  if bad and not skip_malformed:
    raise MalformedInputError(f"{len(bad)} malformed line(s) (pass --skip_malformed to skip "
                              "them):\n" + "\n".join(bad[:20]))
  for message in bad:
    logging.warning("skipped %s", message)
  return prompts


def part_path(output: str, chunk: int) -> str:
  return f"{output}.part{chunk:05d}"


def write_part(output: str, chunk: int, rows: list[dict]) -> None:
  path = part_path(output, chunk)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def assemble(output: str, n_chunks: int) -> None:
  """Joins the parts into `output` (atomically) and removes them."""
  tmp = output + ".tmp"
  with open(tmp, "w", encoding="utf-8") as out:
    for chunk in range(n_chunks):
      with open(part_path(output, chunk), encoding="utf-8") as f:
        out.write(f.read())
  os.replace(tmp, output)
  for path in glob.glob(output + ".part*"):
    os.remove(path)


def done_chunks(output: str, n_chunks: int) -> set[int]:
  return {c for c in range(n_chunks) if os.path.isfile(part_path(output, c))}


def run_generate(config, input_path: str, output_path: str, predictor_path: str | None = None,
                 strategy: str = "continuous-search", chunk_size: int = 512,
                 skip_malformed: bool = False, engine=None, show_progress: bool = True) -> dict:
  """Generates a response for every prompt of `input_path`; returns a throughput summary."""
  from lsdist_jax import scheduling
  from lsdist_jax.collect import load_engine

  prompts = read_prompts(input_path, skip_malformed)
  if os.path.exists(output_path):
    raise FileExistsError(f"{output_path} exists: it is complete; remove it to generate again")
  engine = engine or load_engine(config)
  predictor = scheduling.load_predictor_or_none(predictor_path)
  n_chunks = -(-len(prompts) // chunk_size)
  done = done_chunks(output_path, n_chunks)
  logging.info("generate: %d prompts in %d chunks, %d already written", len(prompts), n_chunks,
               len(done))
  bar = _bar(len(prompts), show_progress)
  bar(sum(min(chunk_size, len(prompts) - c * chunk_size) for c in done))
  started, tokens, served = time.perf_counter(), 0, 0
  gen = config.generation
  for chunk in range(n_chunks):
    if chunk in done:
      continue
    part = prompts[chunk * chunk_size:(chunk + 1) * chunk_size]
    ids = engine.encode([p.text for p in part])
    for p, x in zip(part, ids):
      if len(x) >= gen.max_seq_len:
        raise ValueError(f"{input_path}:{p.line}: prompt of {len(x)} tokens leaves no room in "
                         f"generation.max_seq_len={gen.max_seq_len}")
    request_ids = [p.line for p in part]
    result = scheduling.schedule_and_run(engine, ids, request_ids, config, predictor, strategy)
    rows = []
    for p, toks, fin in zip(part, result.tokens, result.finished):
      rows.append({"line": p.line, "prompt": p.text, "response": engine.tokenizer.decode(toks),
                   "response_tokens": len(toks), "finished": bool(fin)})
    write_part(output_path, chunk, rows)
    tokens += result.generated_tokens
    served += len(part)
    bar(len(part))
  assemble(output_path, n_chunks)
  elapsed = time.perf_counter() - started
  return {"prompts": len(prompts), "served_now": served, "seconds": round(elapsed, 2),
          "samples_per_s": round(served / max(elapsed, 1e-9), 3),
          "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1), "output": output_path}


def _bar(total: int, enabled: bool):
  if not enabled:
    return lambda n: None
  from tqdm import tqdm

  bar = tqdm(total=total, unit="prompt", desc="generate", dynamic_ncols=True)
  return bar.update
