"""The paged pool's decode step against the slot cache's, on the same rows (`llama/paged.py`):
random weights of a preset's shape (its first --layers blocks), --batch rows of --context
tokens each decoding --steps tokens (EOS forced after them), timed after a warm-up call that
compiles; and, first, the paged decode kernel checked against the gathered attention.

  python launch/bench_paged.py --model=llama-2-7b --layers=8 --batch=64,128 \
      --out=docs/results/paged_step_h200.json
"""

import dataclasses
import time

from absl import flags

from lsdist_jax import cli

flags.DEFINE_string("model", "llama-2-7b", "preset whose shape gets random weights")
flags.DEFINE_integer("layers", 8, "blocks of the preset to keep (times scale with them)")
flags.DEFINE_list("batch", ["64"], "rows decoding together")
flags.DEFINE_integer("context", 448, "context tokens of every row")
flags.DEFINE_integer("steps", 64, "tokens each row generates per timed call")
flags.DEFINE_integer("page", 32, "tokens per page")
flags.DEFINE_integer("cache", 1024, "the slot cache's length per row")
flags.DEFINE_integer("repeats", 3, "timed calls per case (the best is kept)")
flags.DEFINE_string("out", "", "write the JSON here")
FLAGS = flags.FLAGS


def _kernel_check(page: int) -> float:
  """Largest |difference| of the paged kernel from the gathered attention on random data."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lsdist_jax.llama.paged_attention import paged_decode_attention, write_and_attend

  rng = np.random.default_rng(0)
  b, kvh, groups, hd, pages, width = 16, 4, 2, 128, 512, 32
  q = jnp.asarray(rng.normal(size=(b, kvh, groups, hd)), jnp.bfloat16)
  pool = {n: jnp.asarray(rng.normal(size=(kvh, pages, page, hd)), jnp.bfloat16)
          for n in ("k", "v")}
  table = jnp.asarray(rng.permutation(pages)[:b * width].reshape(b, width), jnp.int32)
  hi = jnp.asarray(rng.integers(1, width * page, b), jnp.int32)
  lo = jnp.zeros((b,), jnp.int32)
  new = {n: jnp.asarray(rng.normal(size=(b, kvh, hd)), jnp.bfloat16) for n in ("k", "v")}
  want, written = write_and_attend(q, new["k"], new["v"], pool, hi - 1, lo, hi, table,
                                   impl="dot", dtype=jnp.float32)
  flat = {n: x.reshape(kvh, pages * page, hd) for n, x in written.items()}
  interpret = jax.default_backend() != "gpu"
  got = jax.jit(lambda *a: paged_decode_attention(*a, page=page, interpret=interpret))(
      q, flat["k"], flat["v"], lo, hi, table)
  return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lsdist_jax.files import write_json
  from lsdist_jax.llama.config import get_preset
  from lsdist_jax.llama.generator import Generator
  from lsdist_jax.llama.model import Llama, init_params
  from lsdist_jax.llama.paged import open_paged
  from lsdist_jax.shapes import Buckets

  out = {"device": jax.devices()[0].device_kind, "model": FLAGS.model, "layers": FLAGS.layers,
         "context": FLAGS.context, "steps": FLAGS.steps, "page": FLAGS.page,
         "kernel_max_abs_diff": _kernel_check(FLAGS.page), "rows": []}
  print(f"paged kernel vs gathered attention: max |diff| {out['kernel_max_abs_diff']:.2e}")
  cfg = dataclasses.replace(get_preset(FLAGS.model), num_layers=FLAGS.layers)
  model = Llama(cfg, jnp.bfloat16, jnp.bfloat16, decode_impl="pallas")
  params = jax.jit(lambda: init_params(model))()
  batches = [int(b) for b in FLAGS.batch]
  gen = Generator(model, params, buckets=Buckets(batch=tuple(sorted(set(batches))),
                                                 prompt=64, cache=128))
  rng = np.random.default_rng(0)
  for b in batches:
    contexts = [rng.integers(3, cfg.vocab_size, FLAGS.context).tolist() for _ in range(b)]
    forced = [FLAGS.steps] * b
    row = {"batch": b}
    for kind in ("slots", "paged"):
      best = float("inf")
      for repeat in range(FLAGS.repeats + 1):
        if kind == "slots":
          batch = gen.open_slots(b, FLAGS.cache, max_seq_len=FLAGS.cache)
          batch.insert(list(range(b)), contexts, list(range(b)), [0] * b, forced)
        else:
          pages = b * -(-FLAGS.cache // FLAGS.page)
          batch = open_paged(gen, b, pages, FLAGS.page, max_seq_len=FLAGS.cache)
          batch.insert(list(range(b)), contexts, list(range(b)), [0] * b, list(range(b)),
                       forced)
        jax.block_until_ready(batch.state["tok"])
        start = time.perf_counter()
        steps = batch.decode(b)
        seconds = time.perf_counter() - start
        if repeat:  # the first call compiles
          best = min(best, seconds / max(steps, 1))
      row[f"{kind}_ms_per_step"] = round(best * 1e3, 3)
    row["paged_over_slots"] = round(row["paged_ms_per_step"] / row["slots_ms_per_step"], 3)
    print(row)
    out["rows"].append(row)
  if FLAGS.out:
    write_json(out, FLAGS.out)


if __name__ == "__main__":
  cli.run(main)
