"""Sharded equals unsharded: 8 fake CPU devices, a (data=2, model=4) mesh, the tiny model
(static batches and continuous slots)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    jax.config.update("jax_default_matmul_precision", "highest")
    from lsdist_jax.engine import Engine
    from lsdist_jax.llama.generator import Generator
    assert len(jax.devices()) == 8
    mesh_config = ml_collections.ConfigDict({"data": 2, "model": 4})
    sharded = Engine.load("tiny", dtype="float32", mesh_config=mesh_config)
    assert dict(sharded.mesh.shape) == {"data": 2, "model": 4}
    wqkv = sharded.params["layers_0"]["attn"]["wqkv"]
    assert wqkv.sharding.spec[1] == "model", wqkv.sharding.spec  # kv-head groups over model
    assert sharded.params["layers_0"]["mlp"]["w_down"].sharding.spec[0] == "model"
    assert len({d for d in wqkv.sharding.device_set}) == 8
    host_params = jax.device_get(sharded.params)
    plain = Generator(sharded.model, jax.device_put(host_params, jax.devices()[0]))
    prompts = sharded.encode(["hello world", "abc", "the quick brown fox", "xyz"])
    kw = dict(cap=24, max_seq_len=128, seed=5, temperature=0.9, top_p=0.95,
              request_ids=[0, 1, 2, 3])
    a = sharded.generator.generate(prompts, **kw)
    b = plain.generate(prompts, **kw)
    assert (a.num_generated == b.num_generated).all(), (a.num_generated, b.num_generated)
    assert (a.tokens == b.tokens).all()
    np.testing.assert_allclose(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded.embed(prompts), plain.embed(prompts), rtol=1e-5, atol=1e-5)
    # continuous decoding on the mesh: slots over `data`, the cache's kv heads over `model`
    full = dict(kw, cap=128)
    c = plain.generate(prompts, **full)
    slots = sharded.generator.open_slots(4, 128, max_seq_len=128, seed=5, temperature=0.9,
                                         top_p=0.95)
    assert slots.state["cache"][0]["k"].sharding.spec[:2] == ("data", "model")
    slots.insert([2, 0], prompts[:2], [0, 1], [0, 0])
    slots.decode(3)  # until one of the two is done: then refill
    slots.insert([1, 3], prompts[2:], [2, 3], [0, 0])
    got = {}
    while len(got) < 4:
      slots.decode(4)
      r = slots.read()
      for slot, req in ((2, 0), (0, 1), (1, 2), (3, 3)):
        if r.done[slot] and req not in got:
          got[req] = r.tokens[slot, :r.num_generated[slot]].tolist()
    assert [got[i] for i in range(4)] == [c.tokens[i, :c.num_generated[i]].tolist()
                                          for i in range(4)]
    print("SHARDED_OK", a.num_generated.tolist())
""")


@pytest.mark.slow  # a subprocess with 8 fake devices
def test_sharded_generation_equals_unsharded_on_8_fake_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "SHARDED_OK" in proc.stdout


def test_llama2_chat_format_wraps_the_prompt_with_inst_and_bos():
  from lsdist_jax.engine import char_tokenizer
  from lsdist_jax.llama.tokenizer import Tokenizer

  tok = Tokenizer(char_tokenizer().hf, chat_format="llama2", bos_token_id=1)
  assert tok.format("  Say hi. ") == "[INST] Say hi. [/INST]"
  ids = tok.encode_prompt("Say hi.")
  assert ids[0] == 1 and tok.decode(ids[1:]) == "[INST] Say hi. [/INST]"
  auto = Tokenizer(char_tokenizer().hf, chat_format="auto", name="Llama-2-7b-chat-hf")
  assert auto.chat_format == "llama2"
