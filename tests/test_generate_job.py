"""The generate job never loses or mixes a response: resume keyed by what produced each part,
every check done before generating, input read as users write it, user errors as one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import tiny  # noqa: E402
from lsdist_jax.engine import load_engine  # noqa: E402
from lsdist_jax.errors import ConfigError, InputError  # noqa: E402
from lsdist_jax.serve.inputs import MalformedInputError, read_prompts  # noqa: E402
from lsdist_jax.serve.job import assemble, parts_dir, run_generate  # noqa: E402


@pytest.fixture(scope="module")
def engine():
  return load_engine(config())


def config(**generation):
  c = tiny.get_config()
  c.generation.max_seq_len = 96  # short responses: the tests run many jobs
  for key, value in generation.items():
    c.generation[key] = value
  return c


def write_prompts(path, n=12, edit=None):
  lines = [json.dumps({"id": f"q{i}", "prompt": f"Prompt number {i}: say something."})
           for i in range(1, n + 1)]
  if edit is not None:
    lines[edit - 1] = json.dumps({"id": f"q{edit}", "prompt": "An edited prompt, other text."})
  path.write_text("\n".join(lines) + "\n")
  return path


def rows_of(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def job(cfg, src, out, engine, **kw):
  return run_generate(cfg, str(src), str(out), None, engine=engine, show_progress=False, **kw)


def test_a_resume_with_another_chunk_size_neither_drops_nor_duplicates_rows(engine, tmp_path):
  src = write_prompts(tmp_path / "in.jsonl")
  whole = tmp_path / "whole.jsonl"
  job(config(), src, whole, engine, chunk_size=5)
  out = tmp_path / "out.jsonl"
  stopped = job(config(), src, out, engine, chunk_size=2, stop_after_chunks=2)
  assert stopped == {"stopped_after_chunks": 2} and not out.exists()
  assert len(os.listdir(parts_dir(str(out)))) == 2
  summary = job(config(), src, out, engine, chunk_size=5)  # the old parts match no new chunk
  assert summary["served_now"] == 12
  rows = rows_of(out)
  assert [r["line"] for r in rows] == list(range(1, 13))  # every row once, in input order
  assert rows == rows_of(whole)
  assert not os.path.exists(parts_dir(str(out)))
  # the same chunking resumes: only the missing chunks are generated
  again = tmp_path / "again.jsonl"
  job(config(), src, again, engine, chunk_size=4, stop_after_chunks=1)
  assert job(config(), src, again, engine, chunk_size=4)["served_now"] == 8
  assert rows_of(again) == rows


def test_a_response_holding_unicode_line_separators_is_assembled_whole(tmp_path):
  # json.dumps(ensure_ascii=False) leaves U+2028 / U+0085 raw, and str.splitlines() splits on
  # them: the H200 run of an 8,192-line batch file failed on such a response.
  folder = tmp_path / "out.jsonl.parts"
  folder.mkdir()
  rows = [{"line": 0, "response": "a\u2028b\x85c\u2029d"}, {"line": 1, "response": "e"}]
  (folder / "chunk0").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                 encoding="utf-8")
  out = tmp_path / "out.jsonl"
  assemble(str(out), str(folder), ["chunk0"], [[0, 1]], "line")
  with open(out, encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == rows
  assert not folder.exists()


def test_a_resume_on_an_edited_input_redoes_the_stale_chunks(engine, tmp_path):
  src = write_prompts(tmp_path / "in.jsonl")
  out = tmp_path / "out.jsonl"
  job(config(), src, out, engine, chunk_size=3, stop_after_chunks=2)  # lines 1-6 written
  write_prompts(src, edit=2)  # same line count, line 2 changed
  summary = job(config(), src, out, engine, chunk_size=3)
  assert summary["served_now"] == 9  # lines 1-3 again (their chunk changed), 4-6 kept
  fresh = tmp_path / "fresh.jsonl"
  job(config(), src, fresh, engine, chunk_size=12)
  assert rows_of(out) == rows_of(fresh)
  assert rows_of(out)[1]["prompt"] == "An edited prompt, other text."


def test_a_resume_with_other_settings_never_mixes_them(engine, tmp_path):
  src = write_prompts(tmp_path / "in.jsonl")
  out = tmp_path / "out.jsonl"
  job(config(), src, out, engine, chunk_size=4, stop_after_chunks=2)  # T = 0.6
  summary = job(config(temperature=0.0), src, out, engine, chunk_size=4)
  assert summary["served_now"] == 12
  greedy = tmp_path / "greedy.jsonl"
  job(config(temperature=0.0), src, greedy, engine, chunk_size=12)
  assert rows_of(out) == rows_of(greedy)


def test_every_check_runs_before_any_generation(engine, tmp_path):
  src = write_prompts(tmp_path / "in.jsonl", n=5)
  lines = src.read_text().splitlines()
  lines[3] = json.dumps({"prompt": "x" * 400})  # line 4 is longer than max_seq_len = 96
  src.write_text("\n".join(lines) + "\n")
  out = tmp_path / "out.jsonl"
  with pytest.raises(InputError, match="line 4: prompt of 4\\d\\d tokens"):
    job(config(), src, out, engine, chunk_size=1)
  assert not os.path.exists(parts_dir(str(out))) and not out.exists()  # nothing stranded
  summary = job(config(), src, out, engine, chunk_size=1, skip_long=True)
  assert summary["skipped_long"] == 1 and [r["line"] for r in rows_of(out)] == [1, 2, 3, 5]
  with pytest.raises(ConfigError, match="--chunk must be at least 1"):
    job(config(), src, tmp_path / "c.jsonl", engine, chunk_size=0)
  with pytest.raises(InputError, match="is a directory"):
    job(config(), src, tmp_path, engine)
  nested = tmp_path / "new" / "folder" / "out.jsonl"  # a missing folder is created
  assert job(config(), src, nested, engine, skip_long=True)["prompts"] == 4
  with pytest.raises(FileExistsError, match="it is complete"):
    job(config(), src, nested, engine, skip_long=True)


def test_a_predictor_for_another_length_range_is_refused_before_the_model_loads(tmp_path):
  import jax
  import jax.numpy as jnp

  from lsdist_jax.predictor.nets import LengthPredictor
  from lsdist_jax.predictor.train import export_predictor

  model = LengthPredictor("distribution", 128, (8,))
  params = model.init(jax.random.key(0), jnp.zeros((2, 64)))["params"]
  spec = {"kind": "distribution", "hidden_dim": 64, "max_len": 128, "hidden_sizes": [8],
          "dropout": 0.0, "scalar_target": None}
  export_predictor(str(tmp_path / "pred"), spec, params, np.zeros(64), np.ones(64))
  src = write_prompts(tmp_path / "in.jsonl", n=2)
  with pytest.raises(ConfigError, match="0..128.*0..256"):
    run_generate(tiny.get_config(), str(src), str(tmp_path / "o.jsonl"), str(tmp_path / "pred"),
                 engine=object())  # refused before the engine is used


def test_input_lines_as_users_write_them(tmp_path):
  src = tmp_path / "bad.jsonl"
  src.write_text('{"prompt": "ok"}\n{"nope": 1}\nnot json\n{"prompt": "fine"}\n')
  with pytest.raises(MalformedInputError, match=r"bad.jsonl:2.*\n.*bad.jsonl:3"):
    read_prompts(str(src))
  prompts, skipped = read_prompts(str(src), skip_malformed=True)
  assert [p.line for p in prompts] == [1, 4] and len(skipped) == 2
  bom = tmp_path / "bom.jsonl"
  bom.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "one", "id": 7}\r\n{"prompt": "two"}\r\n')
  prompts, skipped = read_prompts(str(bom))
  assert [p.text for p in prompts] == ["one", "two"] and not skipped
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"prompt": "caf\xe9\xff"}\n{"prompt": "fine"}\n')
  with pytest.raises(MalformedInputError, match="bad.jsonl:1: not UTF-8"):
    read_prompts(str(bad))
  prompts, skipped = read_prompts(str(bad), skip_malformed=True)
  assert [p.line for p in prompts] == [2] and len(skipped) == 1


def test_the_users_own_fields_come_back(engine, tmp_path):
  src = tmp_path / "in.jsonl"
  src.write_text(json.dumps({"id": "abc", "meta": {"k": 1}, "prompt": "Hi."}) + "\n")
  out = tmp_path / "out.jsonl"
  job(config(), src, out, engine)
  row = rows_of(out)[0]
  assert row["id"] == "abc" and row["meta"] == {"k": 1} and row["line"] == 1


def launch(args, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "generate.py"),
                         f"--config={os.path.join(REPO, 'configs', 'tiny.py')}"] + args,
                        capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)


def test_launcher_user_errors_are_one_line_and_exit_status_2(tmp_path):
  done = launch([f"--input={tmp_path / 'nope.jsonl'}", f"--output={tmp_path / 'o.jsonl'}"],
                tmp_path)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith("error: prompts file not found")
  assert "Traceback" not in done.stderr
  src = write_prompts(tmp_path / "in.jsonl", n=1)
  typo = launch([f"--input={src}", f"--output={tmp_path / 'o.jsonl'}",
                 "--config.generation.temprature=0.7"], tmp_path)
  assert typo.returncode == 2 and "Traceback" not in typo.stderr
  assert "error: unknown config key" in typo.stderr and "temprature" in typo.stderr


def test_the_launchers_summary_times_the_process_before_the_job(tmp_path):
  src = write_prompts(tmp_path / "in.jsonl", n=2)
  done = launch([f"--input={src}", f"--output={tmp_path / 'o.jsonl'}",
                 f"--summary={tmp_path / 's.json'}", "--config.generation.max_seq_len=48"],
                tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads((tmp_path / "s.json").read_text())
  assert len(rows_of(tmp_path / "o.jsonl")) == 2 and summary["served_now"] == 2
  # interpreter start, imports and flags: more than nothing, less than the test's whole run
  assert 0 < summary["before_job_s"] < 300
  assert {"backend", "read", "place"} <= set(summary["load_seconds"])


def test_the_compilation_cache_is_on_by_default_in_the_users_cache_folder(monkeypatch, tmp_path):
  from lsdist_jax.engine import compilation_cache_dir

  monkeypatch.delenv("LSDIST_NO_COMPILE_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert tiny.get_config().engine.compilation_cache == "user"
  assert compilation_cache_dir("user") == str(tmp_path / "lsdist_jax" / "xla")
  assert compilation_cache_dir("some/dir") == "some/dir" and compilation_cache_dir("") == ""
  monkeypatch.setenv("LSDIST_NO_COMPILE_CACHE", "1")  # what --no_compile_cache sets
  assert compilation_cache_dir("user") == "" and compilation_cache_dir("some/dir") == ""


def test_an_auto_kv_budget_is_sized_from_free_memory(engine):
  from lsdist_jax.engine import kv_budget_tokens, kv_token_bytes
  from lsdist_jax.errors import ConfigError as Refused
  from lsdist_jax.serve.plan import planner_options

  assert kv_budget_tokens(engine, 4096) == (4096, "set in the config")
  assert kv_token_bytes(engine) == 2 * 2 * 4 * 8 * 4  # layers, K and V, kv heads, dim, float32
  tokens, how = kv_budget_tokens(engine, "auto")  # a CPU: a quarter of the free RAM
  available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert how.startswith("auto") and 0.15 * available / 512 < tokens < 0.35 * available / 512
  with pytest.raises(Refused, match="expected a number or 'auto'"):
    kv_budget_tokens(engine, "lots")
  c = config()
  c.schedule.kv_budget_tokens = "auto"
  assert planner_options(c, engine).kv_budget_tokens > 1000
  with pytest.raises(Refused, match="with no engine"):
    planner_options(c)


def test_every_stage_plans_with_a_cost_model_profiled_into_the_workdir(tmp_path):
  """`launch/benchmark.py --profile` saves <workdir>/cost_model.json: the benchmark, the
  simulator and the generate job (whose workdir is config.workdir) all pick it up; an explicit
  schedule.cost_model wins; none at all gives the platform's default."""
  from lsdist_jax import paths
  from lsdist_jax.schedule import CostModel
  from lsdist_jax.serve.plan import load_cost_model

  c = config()
  c.workdir = str(tmp_path)
  assert load_cost_model(c).source == "default-cpu"
  profiled = CostModel(step=(9.0, 0.1, 1e-4, 0.0, 0.0), source="fit")
  profiled.save(paths.profiled_cost_model(str(tmp_path)))
  assert load_cost_model(c).step[0] == 9.0  # the job: config.workdir
  assert load_cost_model(tiny.get_config(), str(tmp_path)).step[0] == 9.0  # benchmark, simulate
  assert load_cost_model(c).batch_buckets == tuple(c.engine.batch_buckets)  # the engine's shapes
  other = tmp_path / "other.json"
  CostModel(step=(3.0, 0.1, 1e-4, 0.0, 0.0), source="fit").save(str(other))
  c.schedule.cost_model = str(other)
  assert load_cost_model(c).step[0] == 3.0


def test_a_job_that_fits_in_one_slot_batch_runs_without_its_predictor():
  """Every request fits at once with its whole room: no plan beats running them all, so the
  job skips the prediction; one row more than the KV budget holds and it plans again."""
  from lsdist_jax.schedule import CostModel, Options
  from lsdist_jax.serve.plan import fits_at_once
  from lsdist_jax.serve.requests import Requests

  def requests(n, prompt=40, max_tokens=None):
    return Requests(np.arange(n), np.arange(n), np.full(n, prompt),
                    max_tokens=None if max_tokens is None else np.full(n, max_tokens))

  cost = CostModel(batch_buckets=(1, 2, 4, 8, 16, 32, 64), cache_bucket=128)
  options = Options(kv_budget_tokens=8 * 256, max_batch=16)
  assert fits_at_once(requests(8), 256, cost, options)  # 8 rows x 256 = the budget
  assert not fits_at_once(requests(9), 256, cost, options)  # one more row exceeds it
  assert not fits_at_once(requests(16, prompt=10), 128, cost, Options(kv_budget_tokens=1 << 20,
                                                                      max_batch=8))
  # each request's own limit (max_tokens) shrinks the cache it needs: 16 rows x 128 fit
  assert fits_at_once(requests(16, max_tokens=50), 256, cost, options)


def test_the_summary_says_where_the_time_went(engine, tmp_path):
  summary = job(config(), write_prompts(tmp_path / "in.jsonl", n=4), tmp_path / "out.jsonl",
                engine)
  # an engine given: no early start; its load's parts are the engine's own
  assert set(summary["setup_seconds"]) == {"read_input", "load_engine", "early_wait",
                                           "tokenize", "predictor_and_budget"}
  assert {"backend", "read", "place"} <= set(summary["load_seconds"])
  assert all(v >= 0 for v in summary["load_seconds"].values())
  split = summary["runner_split"]
  assert split["decode_steps"] > 0 and split["ms_per_decode_step"] > 0
  assert split["decode_calls"] <= summary["seconds"]
  # a row per insert + decode call: their rows, steps and seconds add up to the totals
  calls = [dict(zip(split["calls_columns"], c)) for c in split["calls"]]
  assert sum(c["inserted_rows"] for c in calls) == 4
  assert sum(c["decode_steps"] for c in calls) == split["decode_steps"]
  assert abs(sum(c["decode_s"] for c in calls) - split["decode_calls"]) < 0.01
  assert all(0 < c["busy_slots"] and c["insert_compile_wait_s"] <= c["insert_s"] for c in calls)
  # the same job again on this engine compiles nothing more, and says so
  again = job(config(), tmp_path / "in.jsonl", tmp_path / "again.jsonl", engine)
  assert again["programs_compiled"] == 0 and again["slowest_compiles"] == []
  assert len(summary["slowest_compiles"]) == min(5, summary["programs_compiled"])


def test_the_decode_loop_compiles_while_the_model_loads(tmp_path, monkeypatch):
  """A job that fits at once compiles its decode loop and first-token sampler on a shape-only
  generator before the weights load; the loaded engine runs those programs (adopted, not
  compiled again) and the responses are those of a job without the head start."""
  from lsdist_jax.llama.generator import Generator
  from lsdist_jax.serve import early

  cfg = config()
  cfg.engine.compile_threads = 2
  adopted = []
  real_adopt = Generator.adopt
  monkeypatch.setattr(Generator, "adopt",
                      lambda self, other: adopted.append(real_adopt(self, other)) or adopted[-1])
  src = write_prompts(tmp_path / "in.jsonl", n=4)
  summary = run_generate(cfg, str(src), str(tmp_path / "early.jsonl"), None, show_progress=False)
  assert adopted == [2] and summary["served_now"] == 4  # the decode loop and the sampler
  plain = config()
  plain.engine.compile_threads = 0  # no early start, nothing compiled ahead
  run_generate(plain, str(src), str(tmp_path / "plain.jsonl"), None, show_progress=False)
  assert rows_of(tmp_path / "early.jsonl") == rows_of(tmp_path / "plain.jsonl")
  # a guess that cannot hold: no early start; a generator of another dtype is not adopted
  tight = config()
  tight.engine.compile_threads = 2
  from lsdist_jax.serve.plan import load_cost_model
  from lsdist_jax.shapes import round_up

  cache = round_up(int(cfg.generation.max_seq_len), load_cost_model(cfg).cache_bucket)
  tight.schedule.kv_budget_tokens = cache - 1  # not one row
  assert early.start(tight, 4) is None
  shapes_only = early.start(cfg, 4)
  four = int(load_cost_model(cfg).padded_batch(4))
  assert shapes_only.programs == {("decode", 4, cache), ("first", 4, cache, four)}
  other = config()
  other.model.dtype = "bfloat16" if cfg.model.dtype == "float32" else "float32"
  assert load_engine(other).generator.adopt(shapes_only.generator) == 0
  # more requests than fit at once: the loop of the most slots the budget holds
  two_rows = config()
  two_rows.engine.compile_threads = 2
  two_rows.schedule.kv_budget_tokens = 2 * cache
  guess = early.start(two_rows, 4)
  # its first fill, too, is made of the smallest refill's inserts (1 row of 2 slots)
  rows = int(load_cost_model(cfg).padded_batch(1))
  assert guess.programs == {("decode", 2, cache), ("first", 2, cache, rows)}
  assert sorted(key[0].split("/")[0] for key in guess.generator._pending) == [
      "slot_decode", "slot_first"]
  # once the prompts are tokenized: that insert at the longest prompt's block
  block = int(guess.generator.buckets.insert_block(20, cache))
  filled = guess.first_fill(guess.generator, [5, 20, 3])
  assert filled.programs == guess.programs | {("insert", 2, cache, rows, block)}
  assert f"slot_insert/2/{cache}/{rows}/{block}/-1" in guess.generator.program_states()


def test_a_job_too_large_for_one_batch_compiles_its_prediction_and_refills_early(tmp_path,
                                                                                monkeypatch):
  """Once its prompts are tokenized, a job that cannot run at once starts compiling the
  prediction's prefill and the first fill's and refills' inserts (before the predictor runs);
  the planner is charged nothing for them, and the responses are those of a job that compiles
  every program on first use."""
  import jax
  import jax.numpy as jnp

  from lsdist_jax.llama.generator import Generator
  from lsdist_jax.predictor.nets import LengthPredictor
  from lsdist_jax.predictor.train import export_predictor

  cfg = config()
  max_len = int(cfg.predictor.max_len)
  model = LengthPredictor("distribution", max_len, (8,))
  params = model.init(jax.random.key(0), jnp.zeros((2, 64)))["params"]
  spec = {"kind": "distribution", "hidden_dim": 64, "max_len": max_len, "hidden_sizes": [8],
          "dropout": 0.0, "scalar_target": None}
  export_predictor(str(tmp_path / "pred"), spec, params, np.zeros(64), np.ones(64))
  calls = []
  real = Generator.precompile_embed
  monkeypatch.setattr(Generator, "precompile_embed",
                      lambda self, *a, **k: calls.append(len(a[0])) or real(self, *a, **k))
  src = write_prompts(tmp_path / "in.jsonl", n=12)

  def run(threads, out):
    c = config()
    c.engine.compile_threads = threads
    c.schedule.kv_budget_tokens = 4 * 128  # 4 rows of the whole room: refills
    return run_generate(c, str(src), str(tmp_path / out), str(tmp_path / "pred"),
                        strategy="continuous-search", show_progress=False)

  early = run(2, "early.jsonl")
  assert calls == [12, 12]  # ahead (the 12 distinct prompts), then by the prediction itself
  assert early["served_now"] == 12
  # the steady state (prediction, planning, generation) leaves compilation and writing out
  split = early["runner_split"]
  assert split["predict"] > 0 and split["plan"] > 0
  assert early["steady_samples_per_s"] >= early["samples_per_s"]
  plain = run(0, "plain.jsonl")
  assert rows_of(tmp_path / "early.jsonl") == rows_of(tmp_path / "plain.jsonl")
  assert plain["served_now"] == 12
