"""The out-of-domain store: SmolLM2 on 2,000 prompts of the instructions mix (AlpacaEval, Dolly,
LIMA, GSM8K), stratified by dataset, 16 samples each; the same generation as the Alpaca store.

  python launch/collect.py --config=configs/smollm2_mix_gpu.py --config.model.path=<GGUF> \
      --workdir=runs/smollm2_mix --devices=0,1
"""

from lsdist_jax.config import config_beside


def get_config():
  c = config_beside(__file__, "smollm2_alpaca", "gpu")
  c.workdir = "runs/smollm2_mix_gpu"
  c.data.source = "instructions_mix"
  c.data.stratify_by_dataset = True
  c.data.slice = "0:2000"
  c.collect.samples_per_prompt = 16
  c.collect.long_prompts = "skip"  # some LIMA prompts exceed 10k characters
  return c
