"""Decoding on a mesh of fake CPU devices moves only what it must: the compiled decode step's
collectives are the tensor-parallel reductions and one gather of the logits (none at all over
`data`); the Pallas kernel runs per device under shard_map and gives the unsharded tokens;
random params are made already sharded."""

import os
import subprocess
import sys
import textwrap

import pytest

from lsdist_jax.engine import resolve_decode_impl
from lsdist_jax.sharding import collective_counts

PRELUDE = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    jax.config.update("jax_default_matmul_precision", "highest")
    from lsdist_jax import sharding as shd
    from lsdist_jax.llama import sampling
    from lsdist_jax.llama.config import get_preset
    from lsdist_jax.llama.generator import Generator
    from lsdist_jax.llama.model import Llama, abstract_params, init_params
    from lsdist_jax.shapes import Buckets
    assert len(jax.devices()) == 4
    cfg = get_preset("tiny")  # 2 layers, 8 heads over 4 kv heads, vocab 256
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim > 1 else x,
                          init_params(Llama(cfg, jnp.float32, jnp.float32), 0))
    buckets = Buckets(batch=(4, 8), prompt=8, cache=32)

    def generator(data, model, impl="dot"):
      mesh = None
      if data * model > 1:
        mesh = shd.make_mesh(ml_collections.ConfigDict({"data": data, "model": model}),
                             devices=jax.devices()[:data * model])
      llama = Llama(cfg, jnp.float32, jnp.float32, decode_impl=impl, mesh=mesh)
      placed = (jax.device_put(params, jax.devices()[0]) if mesh is None else
                jax.device_put(params, shd.param_shardings(abstract_params(llama), mesh)))
      return Generator(llama, placed, mesh=mesh, buckets=buckets)
""")

COLLECTIVES = PRELUDE + textwrap.dedent("""
    import json
    prompts = [[1, 5 + i, 7, 9] for i in range(8)]

    def program(gen, name):  # the compiled program the calls ran (one per name here)
      texts = [exe.as_text() for key, exe in gen._executables.items() if key[0].startswith(name)]
      assert len(texts) == 1, (name, list(gen._executables))
      return shd.collective_counts(texts[0])

    out = {}
    for data, model in ((1, 2), (2, 1), (2, 2)):
      gen = generator(data, model)
      gen.generate(prompts, cap=4, max_seq_len=64, cache_len=64)
      slots = gen.open_slots(8, 64, max_seq_len=64)
      slots.insert([0, 5], prompts[:2], [0, 1], [0, 0])
      slots.decode(1)
      out[f"{data}x{model}"] = {"static": program(gen, "generate"),
                                "slots": program(gen, "slot_decode")}
    print("COUNTS" + json.dumps(out))
""")

PALLAS = PRELUDE + textwrap.dedent("""
    rng = np.random.default_rng(5)
    prompts = [[1] + rng.integers(3, 256, size=rng.integers(3, 15)).tolist() for _ in range(6)]
    kw = dict(cap=40, max_seq_len=128, request_ids=range(6), temperature=0.8, top_p=0.9, seed=3,
              forced_lengths=[3, 40, 12, -1, 25, -1])  # rows finish at different steps
    def tokens(out):
      return [out.tokens[i, :out.num_generated[i]].tolist() for i in range(6)]
    want = tokens(generator(1, 1, "dot").generate(prompts, **kw))
    for data, model in ((2, 2), (1, 2), (2, 1)):
      got = tokens(generator(data, model, "pallas").generate(prompts, **kw))
      assert got == want, (data, model, got, want)
    # continuous slots through the kernel on the (2, 2) mesh
    gen = generator(2, 2, "pallas")
    slots = gen.open_slots(4, 64, max_seq_len=128, seed=3, temperature=0.8, top_p=0.9)
    slots.insert([1, 2], prompts[:2], [0, 1], [0, 0], forced_lengths=[3, 40])
    while not slots.read().done[[1, 2]].all():
      slots.decode(4)
    r = slots.read()
    assert [r.tokens[i, :r.num_generated[i]].tolist() for i in (1, 2)] == want[:2]
    print("PALLAS_OK", [len(t) for t in want])
""")

RANDOM = textwrap.dedent("""
    import jax, ml_collections, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lsdist_jax.engine import Engine, random_leaf_fn, random_params
    from lsdist_jax.llama.config import get_preset
    cfg = get_preset("tiny")
    mesh_config = ml_collections.ConfigDict({"data": 2, "model": 2})
    engine = Engine.random("tiny", dtype="float32", mesh_config=mesh_config)
    params = engine.params
    programs = random_leaf_fn.cache_info().currsize
    want = {("layers_0", "attn", "wqkv"): P(None, "model"), ("layers_0", "attn", "wo"): P("model"),
            ("layers_1", "mlp", "w_gate_up"): P(None, None, "model"),
            ("layers_1", "mlp", "w_down"): P("model"), ("embed",): P("model"),
            ("lm_head",): P(None, "model"), ("final_norm", "scale"): P()}
    for path, spec in want.items():
      leaf = params
      for key in path:
        leaf = leaf[key]
      assert isinstance(leaf.sharding, NamedSharding), (path, leaf.sharding)
      assert leaf.sharding.mesh is engine.mesh, path
      assert leaf.sharding.spec == spec or tuple(leaf.sharding.spec) + (None,) * (
          len(leaf.shape) - len(leaf.sharding.spec)) == tuple(spec) + (None,) * (
          len(leaf.shape) - len(spec)), (path, leaf.sharding.spec, spec)
    wqkv = params["layers_0"]["attn"]["wqkv"]
    assert {s.data.shape for s in wqkv.addressable_shards} == {
        (cfg.hidden_size, cfg.num_kv_heads // 2) + wqkv.shape[2:]}
    # Each param's program makes its shards where they live: per device it outputs only its
    # shards and needs far less scratch than making the whole array would; the values are those
    # of the unsharded call.
    sharded = random_leaf_fn(wqkv.shape, "float32", wqkv.sharding).lower(
        jax.random.key(0)).compile()
    whole = random_leaf_fn(wqkv.shape, "float32", None).lower(jax.random.key(0)).compile()
    m, w = sharded.memory_analysis(), whole.memory_analysis()
    per_device = wqkv.addressable_shards[0].data.nbytes
    assert abs(m.output_size_in_bytes - per_device) < 0.01 * per_device, (  # buffer alignment
        m.output_size_in_bytes, per_device)
    assert m.output_size_in_bytes < 0.6 * w.output_size_in_bytes
    assert m.temp_size_in_bytes < 0.6 * w.temp_size_in_bytes or w.temp_size_in_bytes == 0, (
        m.temp_size_in_bytes, w.temp_size_in_bytes)
    alone = random_params(cfg, "float32", 0, None)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(alone)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # one program per distinct (shape, sharding): the layers share theirs
    distinct = {(leaf.shape, leaf.sharding) for leaf in jax.tree.leaves(params)}
    assert programs == len(distinct) < len(jax.tree.leaves(params)), (programs, len(distinct))
    print("RANDOM_OK", m.output_size_in_bytes, w.output_size_in_bytes, m.temp_size_in_bytes,
          w.temp_size_in_bytes, random_leaf_fn.cache_info().currsize)
""")

PROCESSES = textwrap.dedent("""
    import sys, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.config.update("jax_default_matmul_precision", "highest")
    import ml_collections
    from lsdist_jax import sharding as shd
    from lsdist_jax.engine import Engine
    from lsdist_jax.llama.generator import Generator
    port, process = sys.argv[1], int(sys.argv[2])
    mesh_config = ml_collections.ConfigDict({
        "data": 2, "model": 2, "span": "global", "distributed": True, "num_processes": 2,
        "coordinator_address": f"127.0.0.1:{port}", "process_id": process})
    shd.maybe_initialize_distributed(mesh_config)
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    engine = Engine.load("tiny", dtype="float32", mesh_config=mesh_config)
    # one global mesh: model within a process, data across the two
    assert {d.process_index for d in engine.mesh.devices[process]} == {process}
    prompts = engine.encode(["hello world", "abc", "the quick brown fox", "xyz", "q"])
    kw = dict(cap=24, max_seq_len=128, seed=5, temperature=0.9, top_p=0.95, request_ids=range(5))
    shared = engine.generator.generate(prompts, **kw)
    alone = Generator(engine.model.clone(mesh=None),
                      jax.device_put(shd.to_host(engine.params), jax.local_devices()[0]))
    want = alone.generate(prompts, **kw)
    assert (shared.num_generated == want.num_generated).all()
    assert (shared.tokens == want.tokens).all()
    print("PROCESS_OK", process, shared.tokens[:, :4].tolist(), flush=True)
""")


def run_on_fake_devices(script: str, marker: str, devices: int = 4) -> str:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith(marker))
  return line[len(marker):]


def test_a_decode_step_moves_only_the_tensor_parallel_reductions():
  """Per step (the while loop's body) of static and slot decoding, for the 2-layer tiny model:
  over `model`, one all-reduce after attention and one after the MLP per layer, one after the
  vocab-split embedding lookup, and one all-gather of the [rows, vocab] logits for sampling;
  over `data`, nothing. The loop's condition may reduce one flag (any row left?)."""
  import json

  counts = json.loads(run_on_fake_devices(COLLECTIVES, "COUNTS"))
  layers = 2
  tensor_parallel = {"all-reduce": 2 * layers + 1, "all-gather": 1}
  for program in ("static", "slots"):
    assert counts["1x2"][program]["body"] == tensor_parallel, (program, counts["1x2"])
    assert counts["2x2"][program]["body"] == tensor_parallel, (program, counts["2x2"])
    assert counts["2x1"][program]["body"] == {}, (program, counts["2x1"])
    for mesh in counts:
      assert sum(counts[mesh][program]["cond"].values()) <= 2, (mesh, program, counts[mesh])


@pytest.mark.slow  # Pallas' interpreter in every decode step, on 4 fake devices
def test_pallas_kernel_on_a_mesh_gives_the_unsharded_tokens():
  assert run_on_fake_devices(PALLAS, "PALLAS_OK")


def test_random_params_are_made_sharded_on_the_mesh():
  assert run_on_fake_devices(RANDOM, "RANDOM_OK")


def test_collective_counts_reads_where_each_collective_runs():
  hlo = "\n".join([
      '  %a = f32[8]{0} all-reduce(%x), to_apply=%add, metadata={op_name="jit(f)/while/body/dot"}',
      '  %b = f32[8,4]{1,0} all-gather(%y), metadata={op_name="jit(f)/while/body/cond/x"}',
      '  %c = pred[] all-reduce(%z), metadata={op_name="jit(f)/while/cond/reduce_or"}',
      '  %d = (f32[4]) all-gather-start(%w), metadata={op_name="jit(f)/squeeze"}',
      '  %e = f32[4] all-gather-done(%d)',
      '  %f = f32[4] add(%x, %y), metadata={op_name="jit(f)/while/body/add"}'])
  assert collective_counts(hlo) == {"body": {"all-reduce": 1, "all-gather": 1},
                                    "cond": {"all-reduce": 1}, "outside": {"all-gather": 1}}


def test_pallas_is_allowed_on_a_mesh():
  assert resolve_decode_impl("pallas", "bfloat16", object(), 64) == "pallas"


@pytest.mark.slow  # two processes
def test_two_processes_on_one_global_mesh_generate_what_one_process_does():
  """jax.distributed on localhost, 2 processes x 2 fake CPU devices, one (data 2, model 2) mesh
  over all four: both processes get the tokens one process alone generates."""
  import socket

  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", PROCESSES, str(port), str(k)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for k in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  lines = [next(l for l in out.splitlines() if l.startswith("PROCESS_OK")) for out, _ in outputs]
  assert lines[0].split(" ", 2)[2] == lines[1].split(" ", 2)[2]  # the same tokens in both


def test_rows_of_independent_processes_merge_into_one_row():
  from lsdist_jax.benchmark.engine import merge_mesh_rows

  base = {"model": "llama-2-7b", "mesh": {"data": 1, "model": 1}, "processes": 1, "batch": 48,
          "cache": 1024, "decode_attention": "pallas", "device": "GPU x 1"}
  rows = [dict(base, device="GPU x 2", mesh={"data": 1, "model": 2}, ms_per_step=4.0,
               tokens_per_s=12000.0, build_s=5.0, first_call_s=30.0),
          dict(base, group="7b_2proc", ms_per_step=7.0, tokens_per_s=6857.1, build_s=4.0,
               first_call_s=20.0),
          dict(base, group="7b_2proc", ms_per_step=7.2, tokens_per_s=6666.7, build_s=4.5,
               first_call_s=19.0)]
  report = merge_mesh_rows(rows, "bash scripts/multigpu_gpu.sh")
  assert report["device"] == "GPU x 2" and len(report["rows"]) == 2
  pair = report["rows"][1]
  assert pair["processes"] == 2 and pair["batch"] == 96 and "group" not in pair
  assert pair["tokens_per_s"] == 13523.8 and pair["ms_per_step"] == 7.2
  assert pair["build_s"] == 4.5 and pair["first_call_s"] == 20.0


def test_a_mesh_row_records_the_collective_settings_it_ran_with():
  from lsdist_jax.benchmark.engine import collective_settings

  env = {"NCCL_PROTO": "LL", "NCCL_NVLS_ENABLE": "0", "NCCL_VERSION": "2.28.3-1",
         "XLA_FLAGS": "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true",
         "CUDA_VISIBLE_DEVICES": "0,1", "HOME": "/root"}
  assert collective_settings(env) == {
      "NCCL_PROTO": "LL",
      "XLA_FLAGS": "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"}
  assert collective_settings({"NCCL_NVLS_ENABLE": "0", "PATH": "/bin"}) == {}


def test_a_traced_mesh_row_splits_each_step_by_event_kind(tmp_path):
  import gzip
  import json

  from lsdist_jax.benchmark.traces import event_kind, step_trace

  assert [event_kind(n) for n in ("all-reduce-start.3", "ncclDevKernel_AllReduce", "gemm_fusion",
                                  "paged_decode_attention", "triton_gemm_dot", "loop_add_fusion")
          ] == ["collective", "collective", "matmul", "attention kernel", "matmul", "other"]
  events = [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "compute"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 2, "args": {"name": "nccl"}}]
  for step in range(4):  # each step: 3 ms of matmuls, 1 ms of all-reduce, then 2 ms idle
    t = 6000.0 * step
    events += [{"ph": "X", "pid": 2, "tid": 1, "name": "gemm_fusion", "ts": t, "dur": 3000.0},
               {"ph": "X", "pid": 2, "tid": 2, "name": "all-reduce.1", "ts": t + 3000,
                "dur": 1000.0}]
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  with gzip.open(folder / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  got = step_trace(str(tmp_path), steps=4)
  assert got["kinds_ms"] == {"matmul": 3.0, "collective": 1.0}
  assert got["streams"][0] == {"lane": "/device:GPU:0", "thread": "compute", "events": 4,
                               "busy_ms": 3.0, "span_ms": 5.25}
  assert [e["kind"] for e in got["top"]] == ["matmul", "collective"]
