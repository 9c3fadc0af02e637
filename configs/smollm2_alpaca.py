"""The embedded default: SmolLM2-135M-Instruct on Alpaca, sized to finish in minutes on a CPU.

  python launch/pipeline.py --config=configs/smollm2_alpaca.py
  python launch/pipeline.py --config=configs/smollm2_alpaca.py:gpu   # the full-size GPU run
  python launch/evaluate.py --config=configs/smollm2_alpaca.py:eval --train ...   # predictors
"""

from lsdist_jax.config import default_config


def get_config(arg: str = "cpu"):
  c = default_config()
  c.workdir = "runs/smollm2_alpaca"
  c.model.name = "smollm2-135m-instruct"
  c.generation.max_seq_len = 1024
  c.predictor.max_len = 1024
  if arg == "cpu":
    # A demo that a 2-core CPU finishes in minutes. No collection: the predictor learns from the
    # committed GPU store (SmolLM2 on an H200: 7,451 prompts x 32, the same generation settings,
    # lengths 0..1024), and is evaluated on that store's ~760 unseen test prompts; the CPU then
    # serves requests of other unseen (test-split) prompts for real, responses capped at 256
    # tokens with the prompt.
    c.collect.store = "docs/data/smollm2_alpaca_7451"
    c.model.dtype = "float32"  # exact on a CPU: every strategy gives the very same responses
    c.generation.max_seq_len = 256
    c.data.source = "alpaca_local"  # the shipped pool: offline, the same prompts everywhere
    c.engine.batch_buckets = (4, 16, 64)
    c.engine.prompt_bucket = 64  # Alpaca prompts average 48 tokens
    c.engine.cache_bucket = 256
    c.predictor.hidden_sizes = (1024, 512)
    c.predictor.dropout = 0.3
    c.predictor.epochs = 40  # ~6,000 training prompts: ~1 s an epoch on 2 cores
    c.predictor.batch_size = 128
    c.predictor.learning_rate = 3e-4
    c.predictor.recalibration_folds = 0  # ~750 validation prompts fit the map alone
    c.benchmark.strategies = ("vanilla:best", "ours-optimal", "continuous-vanilla",
                              "ours-continuous")
    c.benchmark.requests = 24  # the whole job in about 20 minutes on 2 cores
    c.benchmark.slice = "0:320"  # its test-split prompts: about 32, none seen in training
    c.benchmark.split = "test"
    c.schedule.kv_budget_tokens = 16 * 256
    c.schedule.max_batch = 64
  elif arg == "gpu":
    # GPUs: every Alpaca prompt (the hub's 52,002, else the shipped 7,451) x 32 samples, 1,024
    # slots refilled as rows finish; the benchmark serves 2,048 requests over the test-split
    # prompts (unseen in training) under a KV budget that binds.
    c.workdir = "runs/smollm2_alpaca_gpu"
    c.data.slice = ":"
    c.collect.samples_per_prompt = 32
    c.collect.batch_size = 1024
    c.collect.chunk_prompts = 64
    c.engine.prompt_bucket = 64
    c.engine.cache_bucket = 256
    c.predictor.hidden_sizes = (1024, 512)
    c.predictor.dropout = 0.3
    c.predictor.epochs = 300
    c.predictor.batch_size = 32
    c.predictor.learning_rate = 3e-4
    c.benchmark.slice = ":"
    c.benchmark.split = "test"
    c.benchmark.requests = 2048
    # The generate job and collection size the KV cache from the card (the default "auto");
    # up to 1,024 rows at once, as collection runs. The scheduling benchmarks set a budget that
    # binds (configs/smollm2_benchmark_*.py).
    c.schedule.kv_budget_tokens = "auto"
    c.schedule.max_batch = 1024
    # A program's compilation on an H200 (SmolLM2, 4 compiling at once): 4-15 s; plans weigh
    # it against the decode time a shape saves (the benchmarks' steady state sets 0).
    c.schedule.compile_seconds = 4.0
  elif arg == "eval":
    # The predictor evaluation at scale on a CPU (launch/evaluate.py --train): the GPU store's
    # bins (0..1024), today's net at a batch that trains ~6,000 prompts in minutes on 2 cores,
    # against the reference code's recipe; the choice is made on the validation split. The ~700
    # validation prompts fit the recalibration map alone (no out-of-fold trainings).
    c.workdir = "runs/predictor_eval"
    c.data.source = "alpaca_local"
    c.predictor.hidden_sizes = (1024, 512)
    c.predictor.dropout = 0.3
    c.predictor.epochs = 60
    c.predictor.batch_size = 128
    c.predictor.learning_rate = 3e-4
    c.predictor.recalibration_folds = 0
    c.evaluate.recipes = ("current", "seed")
  else:
    raise ValueError(f"configs/smollm2_alpaca.py takes 'cpu', 'gpu' or 'eval', got {arg!r}")
  return c
