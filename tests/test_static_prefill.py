"""Static prefill steps: attention.paged_attention(static_prefill=True) runs the gather + prefill
kernel path with no runtime cond (interpret mode here), for mixed batches and even all-decode ones,
against float64 NumPy; the engine's static_prefill_steps hands that forward to steps holding a
prefill chunk only."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.attention import SeqChunk, build_batch, paged_attention
from paged_reference import np_chunk_attention

f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize("block_q", [0, 16])
@pytest.mark.parametrize("chunks", [
    [SeqChunk([3, 1], 20, 11), SeqChunk([5], 0, 1), SeqChunk([2, 7], 16, 1)],   # mixed
    [SeqChunk([3, 1], 30, 1), SeqChunk([5], 7, 1)],                            # all decode rows
])
def test_static_prefill_attention_matches_float64_without_a_cond(chunks, block_q, monkeypatch):
  """(block_q: the mixed-step prefill tiles, attention.MIXED_PREFILL_BLOCK_Q)"""
  import jaxinfer.attention as attention
  monkeypatch.setattr(attention, "MIXED_PREFILL_BLOCK_Q", block_q)
  monkeypatch.setattr(attention, "PAGED_PREFILL", "0")   # the gather + flash_prefill path
  rng = np.random.default_rng(len(chunks))
  H, KV, D, page = 8, 2, 32, 16
  kp = jnp.asarray(rng.standard_normal((8, page, KV, D)), jnp.bfloat16)
  vp = jnp.asarray(rng.standard_normal((8, page, KV, D)), jnp.bfloat16)
  batch = build_batch(chunks, page, num_tokens=16, num_seqs=4, pages_per_seq=2)
  q = jnp.asarray(rng.standard_normal((16, H, D)), jnp.bfloat16)
  fn = lambda static: (lambda q, kp, vp, batch: paged_attention(
      q, kp, vp, batch, scale=D ** -0.5, impl="pallas", static_prefill=static))
  top_conds = lambda f: sum(e.primitive.name == "cond"
                            for e in jax.make_jaxpr(f)(q, kp, vp, batch).jaxpr.eqns)
  assert top_conds(fn(False)) == 1 and top_conds(fn(True)) == 0
  out = f64(fn(True)(q, kp, vp, batch))
  real = sum(c.num_tokens for c in chunks)
  want = np_chunk_attention(f64(q), f64(kp), f64(vp), chunks, page, D ** -0.5)
  np.testing.assert_allclose(out[:real], want[:real], rtol=2e-2, atol=2e-2)
  assert (out[real:] == 0).all()
  np.testing.assert_allclose(out, f64(fn(False)(q, kp, vp, batch)), rtol=1e-2, atol=1e-2)


def test_engine_static_prefill_steps_only_for_steps_with_a_chunk():
  """EngineConfig(static_prefill_steps=True): steps holding a prefill chunk run the forward with
  prefill_step=True (attention's static prefill path), decode-only steps the decode forward;
  greedy outputs as without it."""
  from jaxinfer.engine import EngineConfig, LLMEngine
  from jaxinfer.engine.step import LlamaForward
  from jaxinfer.models import llama
  from jaxinfer.sampling import SamplingParams
  from llama_fixtures import TINY, random_params
  params = random_params(TINY, seed=5)
  prompts = [np.random.default_rng(i).integers(0, TINY.vocab_size, n).tolist()
             for i, n in enumerate((9, 3, 14))]
  outs, seen = {}, []
  for static in (False, True):
    cache = llama.create_cache(TINY, num_pages=64, page_size=4, dtype=jnp.float32)
    cfg = EngineConfig(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                       chunk_size=8, static_prefill_steps=static)
    engine = LLMEngine(params, LlamaForward(TINY), cache, vocab_size=TINY.vocab_size,
                       max_model_len=64, config=cfg)
    if static:
      import jaxinfer.engine.engine as engine_mod
      real = engine_mod.step_jit
      engine_mod.step_jit = lambda *a, forward, **k: seen.append(
          (forward.prefill_step, forward.decode_only)) or real(*a, forward=forward, **k)
    try:
      for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=5), request_id=str(i))
      outs[static] = {k: v.token_ids for k, v in engine.run_to_completion().items()}
    finally:
      if static:
        engine_mod.step_jit = real
  assert outs[True] == outs[False]
  assert (True, False) in seen and (False, True) in seen
  assert all(p != d for p, d in seen), seen          # every step: exactly one of the two
