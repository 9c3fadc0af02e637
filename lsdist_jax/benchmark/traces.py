"""Reading jax.profiler Perfetto traces (`jax.profiler.trace(..., create_perfetto_trace=True)`):
the busiest event names, each device stream's busy time against its span, and a traced decode
call split per step by event kind (`launch/bench_compile.py --step_trace`,
`launch/bench_multigpu.py --trace`). Standard library only.
"""

from __future__ import annotations


def _trace_events(trace_dir: str):
  """(timed events, lane name by pid, every event) of the newest Perfetto trace under
  `trace_dir`: the timed events are its complete ones, of device lanes (a process named for a GPU
  or TPU) only where the trace has any."""
  import glob
  import gzip
  import json

  found = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
  if not found:
    raise FileNotFoundError(f"no Perfetto trace (*.trace.json.gz) under {trace_dir}")
  with gzip.open(found[-1], "rt") as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  lanes = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in lanes.items() if "GPU" in name or "TPU" in name}
  # complete events, on device lanes only where the trace has any
  spans = [e for e in events if e.get("ph") == "X" and (not device or e.get("pid") in device)]
  return spans, lanes, events


def trace_summary(trace_dir: str, top: int = 25, parsed=None) -> list[dict]:
  """The `top` event names of a jax.profiler Perfetto trace under `trace_dir` by total time:
  [{"name", "ms", "count", "lane"}], device lanes (a process named for a GPU or TPU) only where
  the trace has any, else every lane. parsed: `_trace_events(trace_dir)`, if read already."""
  spans, lanes, _ = parsed or _trace_events(trace_dir)
  totals: dict[tuple, list] = {}
  for e in spans:
    key = (e.get("name", ""), lanes.get(e.get("pid"), ""))
    entry = totals.setdefault(key, [0.0, 0])
    entry[0] += float(e.get("dur", 0.0)) / 1e3
    entry[1] += 1
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
  return [{"name": name, "lane": lane, "ms": round(ms, 3), "count": n}
          for (name, lane), (ms, n) in ranked]


def trace_streams(trace_dir: str, parsed=None) -> list[dict]:
  """Per device stream (lane and thread) of the trace: its events, the time they cover (busy_ms,
  overlaps counted once) and the span from the first start to the last end (span_ms). A stream
  busy for much less than its span waits on the host (launches, copies, the loop's condition):
  [{"lane", "thread", "events", "busy_ms", "span_ms"}], busiest first. parsed: as
  `trace_summary`'s."""
  spans, lanes, events = parsed or _trace_events(trace_dir)
  threads = {(e.get("pid"), e.get("tid")): e.get("args", {}).get("name", "")
             for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
  streams: dict[tuple, list] = {}
  for e in spans:
    start = float(e.get("ts", 0.0))
    streams.setdefault((e.get("pid"), e.get("tid")), []).append(
        (start, start + float(e.get("dur", 0.0))))
  out = []
  for key, intervals in streams.items():
    intervals.sort()
    busy, reach = 0.0, -float("inf")
    for start, end in intervals:  # the union of the intervals
      busy += max(0.0, end - max(start, reach))
      reach = max(reach, end)
    out.append({"lane": lanes.get(key[0], ""), "thread": threads.get(key, str(key[1])),
                "events": len(intervals), "busy_ms": round(busy / 1e3, 3),
                "span_ms": round((reach - intervals[0][0]) / 1e3, 3)})
  return sorted(out, key=lambda row: -row["busy_ms"])


# What a device event of a decode step is, by its name (first match).
EVENT_KINDS = (("collective", ("all-reduce", "all_reduce", "allreduce", "all-gather",
                               "all_gather", "reduce-scatter", "nccl", "collective-permute")),
               ("attention kernel", ("decode_attention", "paged_decode_attention", "pallas")),
               ("matmul", ("gemm", "nvjet", "cublas", "cutlass", "xmma", "matmul", "dot")),
               ("copy", ("memcpy", "memset", "copy")))


def event_kind(name: str) -> str:
  low = name.lower()
  for kind, keys in EVENT_KINDS:
    if any(key in low for key in keys):
      return kind
  return "other"


def step_trace(trace_dir: str, steps: int, top: int = 30) -> dict:
  """A traced decode call per step: each device stream's busy ms and span ms (a stream busy for
  much less than its span waits on the host or on another device), the device ms by event
  kind (`event_kind`), and the `top` busiest event names."""
  per = lambda ms: round(ms / steps, 4)
  parsed = _trace_events(trace_dir)  # read once for both summaries
  streams = [dict(s, busy_ms=per(s["busy_ms"]), span_ms=per(s["span_ms"]))
             for s in trace_streams(trace_dir, parsed)]
  events = trace_summary(trace_dir, top=10 ** 6, parsed=parsed)
  kinds: dict[str, float] = {}
  for e in events:
    kind = event_kind(e["name"])
    kinds[kind] = kinds.get(kind, 0.0) + e["ms"]
  return {"steps": steps, "per_step": True, "streams": streams,
          "kinds_ms": {k: per(v) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
          "top": [dict(e, ms=per(e["ms"]), kind=event_kind(e["name"])) for e in events[:top]]}
