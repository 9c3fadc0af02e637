"""OpenAI Batch API files through the generate job on the tiny model: the output format, per-line
settings (each response is the engine's run of that request alone), error lines for every
line that cannot be served, unique custom_ids, chat formatting equal to transformers' template,
and resume."""

import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import tiny  # noqa: E402
from lsdist_jax.engine import char_tokenizer, load_engine  # noqa: E402
from lsdist_jax.errors import InputError  # noqa: E402
from lsdist_jax.llama.tokenizer import Tokenizer  # noqa: E402
from lsdist_jax.serve import openai_batch  # noqa: E402
from lsdist_jax.serve.inputs import read_input  # noqa: E402
from lsdist_jax.serve.job import parts_dir, run_generate  # noqa: E402

# ChatML, as SmolLM2's template writes it (with its default system turn)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def engine():
  return load_engine(config())


def config(**generation):
  c = tiny.get_config()
  c.generation.max_seq_len = 160
  for key, value in generation.items():
    c.generation[key] = value
  return c


def chat(custom_id, messages, **body):
  return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
          "body": {"model": "tiny", "messages": messages, **body}}


def completion(custom_id, prompt, **body):
  return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
          "body": {"model": "tiny", "prompt": prompt, **body}}


def mixed_lines():
  return [
      chat("a", [{"role": "user", "content": "Say hi."}], max_tokens=20, temperature=0.9,
           top_p=0.8, seed=5),
      completion("b", "Once upon a time", max_tokens=40, temperature=0.0),
      chat("c", [{"role": "system", "content": "Be short."},
                 {"role": "user", "content": "Name a color."},
                 {"role": "assistant", "content": "Red."},
                 {"role": "user", "content": "Another?"}], n=3, max_completion_tokens=12),
      completion("d", "List: 1.", max_tokens=64, temperature=1.2, top_p=1.0, seed=99,
                 stop=["e", "a"]),
      chat("e", [{"role": "user", "content": [{"type": "text", "text": "Parts "},
                                              {"type": "text", "text": "joined."}]}]),
  ]


def write(path, lines):
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  return path


def rows_of(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def without_time(rows):
  for r in rows:
    if r["response"] is not None:
      r["response"]["body"].pop("created")
  return rows


def job(cfg, src, out, engine, **kw):
  return run_generate(cfg, str(src), str(out), None, engine=engine, show_progress=False, **kw)


def test_batch_file_round_trip(engine, tmp_path):
  src = write(tmp_path / "in.jsonl", mixed_lines())
  assert read_input(str(src))[0] == "batch"
  out = tmp_path / "out.jsonl"
  summary = job(config(), src, out, engine, chunk_size=2)
  assert summary["format"] == "batch" and summary["requests"] == 7
  assert summary["error_lines"] == 0 and summary["served_now"] == 7
  rows = rows_of(out)
  assert [r["custom_id"] for r in rows] == ["a", "b", "c", "d", "e"]
  for r, line in zip(rows, mixed_lines()):
    assert r["error"] is None and r["id"].startswith("batch_req_")
    resp = r["response"]
    assert resp["status_code"] == 200 and resp["request_id"].startswith("req_")
    body = resp["body"]
    is_chat = line["url"] == "/v1/chat/completions"
    assert body["object"] == ("chat.completion" if is_chat else "text_completion")
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    assert len(body["choices"]) == line["body"].get("n", 1)
    limit = line["body"].get("max_tokens", line["body"].get("max_completion_tokens", 10 ** 6))
    for index, choice in enumerate(body["choices"]):
      assert choice["index"] == index and choice["finish_reason"] in ("stop", "length")
      text = choice["message"]["content"] if is_chat else choice["text"]
      assert isinstance(text, str)
      if is_chat:
        assert choice["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= limit * len(body["choices"])
  # prompt tokens: a completion prompt is raw text (BOS + characters)
  assert rows[1]["response"]["body"]["usage"]["prompt_tokens"] == 1 + len("Once upon a time")
  # n = 3: three distinct samples of one prompt
  texts = [c["message"]["content"] for c in rows[2]["response"]["body"]["choices"]]
  assert len(set(texts)) > 1
  # the stop strings cut the text before them
  d = rows[3]["response"]["body"]["choices"][0]
  assert "e" not in d["text"] and "a" not in d["text"]
  # the same file in another chunking / strategy: the same answers (no batch dependence)
  other = tmp_path / "other.jsonl"
  job(config(), src, other, engine, chunk_size=5, strategy="vbs")
  assert without_time(rows_of(other)) == without_time(rows)


def test_each_response_is_its_request_run_alone_with_its_own_settings(engine, tmp_path):
  src = write(tmp_path / "in.jsonl", mixed_lines())
  out = tmp_path / "out.jsonl"
  job(config(), src, out, engine)
  rows = rows_of(out)
  cfg = config()
  tok = engine.tokenizer
  for line_no, (line, row) in enumerate(zip(mixed_lines(), rows), start=1):
    body = line["body"]
    parsed = openai_batch.parse_line(line, line_no)  # text parts joined
    ids = (tok.encode_messages(parsed.messages) if "messages" in body
           else tok.encode_raw(body["prompt"]))
    limit = body.get("max_tokens", body.get("max_completion_tokens", 10 ** 6))
    for c, choice in enumerate(row["response"]["body"]["choices"]):
      alone = engine.generator.generate(
          [ids], cap=160, max_seq_len=160, request_ids=[line_no * openai_batch.MAX_CHOICES + c],
          max_new_tokens=[min(limit, 160 - len(ids))],
          seed=body.get("seed", cfg.generation.seed),
          temperature=body.get("temperature", cfg.generation.temperature),
          top_p=body.get("top_p", cfg.generation.top_p))
      text = tok.decode(alone.tokens[0, :alone.num_generated[0]].tolist())
      got = choice["message"]["content"] if "messages" in body else choice["text"]
      cut, _, stopped = openai_batch.cut_at_stop(
          alone.tokens[0, :alone.num_generated[0]].tolist(), tok.decode, body.get("stop") or [])
      assert got == cut and (stopped or got == text)
      reason = "stop" if stopped or alone.finished[0] else "length"
      assert choice["finish_reason"] == reason


def test_the_choices_of_a_line_share_their_prefill(engine, tmp_path, monkeypatch):
  from lsdist_jax.llama.slots import SlotBatch

  inserts = []
  insert = SlotBatch.insert

  def spy(self, slot_ids, contexts, *args, **kw):
    inserts.append((kw.get("share_prefill"), [tuple(c) for c in contexts], self.prefilled_rows))
    insert(self, slot_ids, contexts, *args, **kw)
    inserts[-1] = inserts[-1][:2] + (self.prefilled_rows - inserts[-1][2],)

  monkeypatch.setattr(SlotBatch, "insert", spy)
  lines = [chat("a", [{"role": "user", "content": "Say hi."}], n=5, max_tokens=20),
           completion("b", "Once upon a time", max_tokens=20)]
  job(config(), write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl", engine)
  assert inserts and all(share for share, _, _ in inserts)
  # the insert holding line a's five choices prefilled fewer rows than it inserted (rows are
  # prefilled at half the rows when the distinct contexts fit there: 4 here, against 8)
  shared = [(len(set(c)), len(c), rows) for _, c, rows in inserts if len(set(c)) < len(c)]
  assert shared and all(rows < n for _, n, rows in shared), inserts


def test_every_line_that_cannot_be_served_gets_its_own_error_line(engine, tmp_path):
  lines = [
      {"custom_id": "url", "method": "POST", "url": "/v1/embeddings",
       "body": {"model": "tiny", "input": "x"}},
      completion("long", "x" * 400),
      chat("temp", [{"role": "user", "content": "hi"}], temperature="hot"),
      completion("n0", "hi", n=0),
      completion("stops", "hi", stop=["a", "b", "c", "d", "e"]),
      chat("role", [{"role": "wizard", "content": "hi"}]),
      completion("stream", "hi", stream=True),
      completion("model", "hi", model="gpt-4o"),
      completion("ok", "Fine.", max_tokens=8),
  ]
  src = write(tmp_path / "in.jsonl", lines)
  out = tmp_path / "out.jsonl"
  summary = job(config(), src, out, engine)
  assert summary["error_lines"] == 8 and summary["requests"] == 1
  rows = {r["custom_id"]: r for r in rows_of(out)}
  assert list(rows) == [x["custom_id"] for x in lines]
  codes = {k: r["error"]["code"] for k, r in rows.items() if r["error"] is not None}
  assert codes == {"url": "invalid_url", "long": "context_length_exceeded",
                   "temp": "invalid_type", "n0": "invalid_value", "stops": "invalid_value",
                   "role": "invalid_value", "stream": "unsupported_parameter",
                   "model": "model_not_found"}
  for k in codes:
    assert rows[k]["response"] is None and rows[k]["error"]["message"]
  assert "400" not in rows["url"]["error"]["message"]
  assert "/v1/embeddings" in rows["url"]["error"]["message"]
  assert rows["ok"]["error"] is None and rows["ok"]["response"]["status_code"] == 200
  # --ignore_model_field serves the line naming another model (and keys other parts)
  served = tmp_path / "served.jsonl"
  summary = job(config(), src, served, engine, ignore_model_field=True)
  assert summary["error_lines"] == 7
  model_row = [r for r in rows_of(served) if r["custom_id"] == "model"][0]
  assert model_row["error"] is None and model_row["response"]["body"]["model"] == "gpt-4o"


def test_duplicate_custom_ids_are_refused_naming_them(engine, tmp_path):
  lines = mixed_lines() + [completion("b", "again"), completion("a", "and again")]
  src = write(tmp_path / "in.jsonl", lines)
  with pytest.raises(InputError, match=r"'b' on lines \[2, 6\].*'a' on lines \[1, 7\]|"
                                       r"'a' on lines \[1, 7\].*'b' on lines \[2, 6\]"):
    job(config(), src, tmp_path / "out.jsonl", engine)


def test_a_line_without_custom_id_is_malformed(engine, tmp_path):
  src = write(tmp_path / "in.jsonl", mixed_lines()[:2] + [{"url": "/v1/completions",
                                                           "body": {"prompt": "x"}}])
  with pytest.raises(InputError, match="in.jsonl:3: .*custom_id"):
    job(config(), src, tmp_path / "out.jsonl", engine)
  summary = job(config(), src, tmp_path / "out.jsonl", engine, skip_malformed=True)
  assert summary["skipped_malformed"] == 1 and summary["prompts"] == 2


def test_a_batch_file_resumes_keyed_by_its_lines_and_settings(engine, tmp_path):
  src = write(tmp_path / "in.jsonl", mixed_lines())
  whole = tmp_path / "whole.jsonl"
  job(config(), src, whole, engine, chunk_size=2)
  out = tmp_path / "out.jsonl"
  assert job(config(), src, out, engine, chunk_size=2,
             stop_after_chunks=2) == {"stopped_after_chunks": 2}
  assert len(os.listdir(parts_dir(str(out)))) == 2 and not out.exists()
  summary = job(config(), src, out, engine, chunk_size=2)
  assert summary["served_now"] == 1  # only line e (chunk 3) was left
  assert without_time(rows_of(out)) == without_time(rows_of(whole))
  # an edited line redoes its chunk only
  again = tmp_path / "again.jsonl"
  job(config(), src, again, engine, chunk_size=2, stop_after_chunks=2)  # a, b | c, d written
  edited = mixed_lines()
  edited[0]["body"]["temperature"] = 0.0
  write(src, edited)
  summary = job(config(), src, again, engine, chunk_size=2)
  assert summary["served_now"] == 3  # a, b (their chunk changed) and e; c, d (n=3) kept
  fresh = tmp_path / "fresh.jsonl"
  job(config(), src, fresh, engine, chunk_size=5)
  assert without_time(rows_of(again)) == without_time(rows_of(fresh))
  # other settings never mix: everything is generated again
  other = tmp_path / "other.jsonl"
  job(config(), src, other, engine, chunk_size=2, stop_after_chunks=2)
  assert job(config(seed=1), src, other, engine, chunk_size=2)["served_now"] == 7


def test_chat_messages_are_formatted_as_transformers_apply_chat_template():
  """Multi-turn chat through our tokenizer wrapper: the ids transformers' apply_chat_template
  gives, on an in-memory tokenizer with a ChatML template and on SmolLM2's own (its GGUF)."""
  talk = [{"role": "system", "content": "You answer briefly."},
          {"role": "user", "content": "Name a color."},
          {"role": "assistant", "content": "Blue."},
          {"role": "user", "content": "And another?"}]
  hf = char_tokenizer(256).hf
  hf.chat_template = CHATML
  ours = Tokenizer(hf, chat_format="template", bos_token_id=1)
  for messages in (talk, talk[1:], talk[1:2]):
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"]) if hasattr(want, "keys") else list(want)
    assert ours.encode_messages(messages) == want
    assert ours.format_messages(messages).endswith("<|im_start|>assistant\n")
  assert "Be brief." in ours.format_messages(talk[1:]) and "Be brief." not in \
      ours.format_messages(talk)
  from lsdist_jax.engine import find_smollm2_gguf
  from transformers import AutoTokenizer

  path = find_smollm2_gguf()
  smol = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  wrapped = Tokenizer(smol, chat_format="auto", name="smollm2-135m-instruct")
  for messages in (talk, talk[1:]):
    want = smol.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"]) if hasattr(want, "keys") else list(want)
    assert wrapped.encode_messages(messages) == want
  # one user turn is the single-prompt format the plain prompts file uses
  assert wrapped.encode_messages(talk[1:2]) == wrapped.encode_prompt("Name a color.")


def test_llama2_multi_turn_and_no_format_transcript():
  plain = Tokenizer(char_tokenizer(256).hf, chat_format="llama2", bos_token_id=1)
  talk = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
  assert plain.format_messages(talk) == ("[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>"
                                         "[INST] U2 [/INST]")
  with pytest.raises(ValueError, match="alternating"):
    plain.format_messages(talk[:3])
  none = Tokenizer(char_tokenizer(256).hf, chat_format="none", bos_token_id=1)
  assert none.format_messages(talk[1:2]) == "U1"
  assert none.format_messages(talk).endswith("user: U2\nassistant:")


def test_stop_strings_cut_the_text_and_count_the_tokens_that_made_it():
  decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
  toks = [ord(c) for c in "hello world. bye"]
  assert openai_batch.cut_at_stop(toks, decode, ["."]) == ("hello world", 12, True)
  assert openai_batch.cut_at_stop(toks, decode, ["bye", "lo"]) == ("hel", 5, True)
  assert openai_batch.cut_at_stop(toks, decode, ["zz"]) == ("hello world. bye", 16, False)
  assert np.all([openai_batch.model_matches(m, ["tiny", "/x/y/model.gguf"])
                 for m in ("tiny", "TINY", "model.gguf", None)])
  assert not openai_batch.model_matches("gpt-4o", ["tiny"])
