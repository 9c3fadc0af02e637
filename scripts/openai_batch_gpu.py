"""The OpenAI batch-file measurement of README "From an OpenAI batch file" (issue 19):

  python3 scripts/openai_batch_gpu.py --config=configs/smollm2_alpaca.py:gpu \
      --predictor=<distribution export> --run=<folder> [--requests=8192] [--model_path=<gguf>]

1. writes <run>/batch.jsonl: `requests` chat lines over the shipped Alpaca pool, max_tokens
   cycling 64 / 256 / 1,024, temperatures 0.0 / 0.6 / 1.0, top_p 0.9 / 1.0, a seed per line;
   and <run>/batch_global.jsonl: the same prompts with every per-request setting removed (each
   line runs to max_seq_len at the config's temperature: "settings ignored");
2. runs the generate job three times, each on a fresh output: ours (continuous-search planned
   from the predictor, per-request settings and max_tokens-truncated distributions), the same
   on batch_global.jsonl, and plain static batching (fixed batches, no predictor, per-request
   settings kept);
   One process and one engine serve the three runs in this order, so the first pays the cold
   compilation of programs the later ones reuse (each row's compile_seconds is its own);
3. appends one row per run to docs/results/generate_job.json (samples/s end to end, tokens/s,
   the device), keeping the rows and fields already there (scripts/job_results.py).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from job_results import RESULTS, load_config_file, merge_results, write_lines  # noqa: E402

MAX_TOKENS = (64, 256, 1024)
TEMPERATURES = (0.0, 0.6, 1.0)
TOP_PS = (0.9, 1.0)


def batch_lines(n: int, model: str, per_request: bool = True) -> list[dict]:
  from lsdist_jax.data import prompt_text
  from lsdist_jax.data.alpaca import read_pool

  pool = [prompt_text(r) for r in read_pool()]
  lines = []
  for i in range(n):
    body = {"model": model, "messages": [{"role": "user", "content": pool[i % len(pool)]}]}
    if per_request:
      body.update(max_tokens=MAX_TOKENS[i % 3], temperature=TEMPERATURES[(i // 3) % 3],
                  top_p=TOP_PS[(i // 9) % 2], seed=i)
    lines.append({"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": body})
  return lines


def main():
  from lsdist_jax.engine import device_kind, load_engine
  from lsdist_jax.serve.job import run_generate

  parser = argparse.ArgumentParser()
  parser.add_argument("--config", required=True)
  parser.add_argument("--predictor", required=True)
  parser.add_argument("--run", required=True)
  parser.add_argument("--requests", type=int, default=8192)
  parser.add_argument("--model_path", default="")
  parser.add_argument("--results", default=RESULTS)
  args = parser.parse_args()
  os.makedirs(args.run, exist_ok=True)
  config = load_config_file(args.config)
  if args.model_path:
    config.model.path = args.model_path
  model = str(config.model.name)
  mixed, plain = os.path.join(args.run, "batch.jsonl"), os.path.join(args.run, "batch_global.jsonl")
  write_lines(mixed, batch_lines(args.requests, model))
  write_lines(plain, batch_lines(args.requests, model, per_request=False))
  engine = load_engine(config)
  runs = [("openai-batch ours-continuous (per-request settings)", mixed, args.predictor,
           "continuous-search"),
          ("openai-batch ours-continuous (settings ignored: global max)", plain, args.predictor,
           "continuous-search"),
          ("openai-batch static batching (no predictor)", mixed, None, "vbs")]
  rows = []
  for name, src, predictor, strategy in runs:
    out = os.path.join(args.run, name.split(" (")[0].replace(" ", "_") +
                       ("_global" if src == plain else "") + ".jsonl")
    for stale in (out, out + ".parts"):
      if os.path.isfile(stale):
        os.remove(stale)
    started = time.perf_counter()
    compiled = (engine.generator.compile_seconds, engine.generator.background_compile_seconds)
    summary = run_generate(config, src, out, predictor, strategy, chunk_size=args.requests,
                           engine=engine, show_progress=False)
    # the engine's counters are cumulative over the runs of this process: each row its own
    summary["compile_seconds"] = round(engine.generator.compile_seconds - compiled[0], 2)
    summary["background_compile_seconds"] = round(
        engine.generator.background_compile_seconds - compiled[1], 2)
    summary["wall_seconds_with_setup"] = round(time.perf_counter() - started, 2)
    rows.append({"name": name, "input": os.path.basename(src), "strategy": strategy,
                 "requests": args.requests, "device": device_kind(),
                 "date": time.strftime("%Y-%m-%d"), **summary})
    print(json.dumps(rows[-1]), flush=True)
  merge_results(args.results, rows)  # appended; the other rows and fields are kept
  print(f"wrote {len(rows)} rows to {args.results}")


if __name__ == "__main__":
  main()
