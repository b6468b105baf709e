import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.errors import UnsupportedModelError
from jaxinfer.models import llama
from llama_fixtures import TINY, random_params

PAGE = 4


def _run(cfg, params, cache, chunks, token_lists, num_tokens=32, num_seqs=4, pages_per_seq=8,
         all_logits=False):
  batch = build_batch(chunks, PAGE, num_tokens=num_tokens, num_seqs=num_seqs,
                      pages_per_seq=pages_per_seq)
  flat = np.zeros(num_tokens, np.int32)
  ids = [t for ts in token_lists for t in ts]
  flat[:len(ids)] = ids
  return llama.forward_jit(params, jnp.asarray(flat), cache, batch, cfg=cfg, all_logits=all_logits)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_chunked_prefill_and_decode_match_one_prefill(kv_heads):
  cfg = TINY.__class__(**{**TINY.__dict__, "num_kv_heads": kv_heads})
  params = random_params(cfg, seed=kv_heads)
  rng = np.random.default_rng(kv_heads)
  toks = rng.integers(0, cfg.vocab_size, 13).tolist()
  cache = llama.create_cache(cfg, num_pages=32, page_size=PAGE, dtype=jnp.float32)
  full, _ = _run(cfg, params, cache, [SeqChunk([3, 9, 4, 7], 0, 13)], [toks], all_logits=True)

  # Same tokens in a shuffled page list: a 5-token chunk, a 6-token chunk, then two decode steps.
  pages = [12, 2, 30, 17]
  cache = llama.create_cache(cfg, num_pages=32, page_size=PAGE, dtype=jnp.float32)
  got, start = [], 0
  for n in (5, 6, 1, 1):
    logits, cache = _run(cfg, params, cache, [SeqChunk(pages, start, n)], [toks[start:start + n]])
    got.append(np.asarray(logits[0]))
    start += n
  want = np.asarray(full)[[4, 10, 11, 12]]
  np.testing.assert_allclose(np.stack(got), want, rtol=2e-5, atol=2e-5)


def test_batched_rows_are_independent():
  params = random_params(TINY, seed=7)
  rng = np.random.default_rng(7)
  a, b = rng.integers(0, 256, 9).tolist(), rng.integers(0, 256, 4).tolist()
  cache = llama.create_cache(TINY, num_pages=32, page_size=PAGE, dtype=jnp.float32)
  both, _ = _run(TINY, params, cache, [SeqChunk([1, 2, 3], 0, 9), SeqChunk([5, 6], 0, 4)], [a, b])
  cache = llama.create_cache(TINY, num_pages=32, page_size=PAGE, dtype=jnp.float32)
  only_b, _ = _run(TINY, params, cache, [SeqChunk([8, 9], 0, 4)], [b])
  np.testing.assert_allclose(np.asarray(both[1]), np.asarray(only_b[0]), rtol=2e-5, atol=2e-5)


def test_fp8_kv_cache_close_to_f32():
  params = random_params(TINY, seed=3)
  toks = np.random.default_rng(3).integers(0, 256, 12).tolist()
  outs = []
  for dtype in (jnp.float32, jnp.float8_e4m3fn):
    cache = llama.create_cache(TINY, num_pages=16, page_size=PAGE, dtype=dtype)
    logits, cache = _run(TINY, params, cache, [SeqChunk([1, 2, 3], 0, 12)], [toks], all_logits=True)
    assert cache.k[0].dtype == dtype
    outs.append(np.asarray(logits))
  rel = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
  assert rel < 0.05, rel  # E4M3 keeps 3 mantissa bits: a few percent on K/V, less on logits


def test_decode_step_hlo_has_no_per_layer_weight_copy():
  """Layers are separate arrays in a Python loop: the compiled decode step must not copy (or loop
  over slices of) any weight. BASELINES.md: a scan over stacked weights copied each layer."""
  cfg = TINY.__class__(**{**TINY.__dict__, "num_layers": 4})
  params = llama.init_params(cfg, jax.random.key(0), jnp.bfloat16)
  cache = llama.create_cache(cfg, num_pages=16, page_size=PAGE)
  batch = build_batch([SeqChunk([1, 2], 3, 1)] * 4, PAGE, num_tokens=4, num_seqs=4, pages_per_seq=2)
  hlo = llama.forward_jit.lower(params, jnp.zeros(4, jnp.int32), cache, batch,
                                cfg=cfg).compile().as_text()
  weight_shapes = {",".join(map(str, w.shape)) for w in jax.tree.leaves(params) if w.ndim == 2}
  copies = re.findall(r"= \w+\[([\d,]+)\]\{[^}]*\} copy\(", hlo)
  assert not [c for c in copies if c in weight_shapes], copies
  assert " while(" not in hlo


def test_config_from_hf_and_errors():
  hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
  cfg = llama.LlamaConfig.from_hf(hf)
  assert cfg.head_dim == 16 and cfg.rope_scaling.factor == 8.0 and cfg.num_kv_heads == 2
  with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
    llama.LlamaConfig.from_hf({**hf, "architectures": ["MistralForCausalLM"], "model_type": "mistral"})
  with pytest.raises(UnsupportedModelError, match="multiple of num_kv_heads"):
    llama.LlamaConfig.from_hf({**hf, "num_key_value_heads": 3})
  with pytest.raises(UnsupportedModelError, match="rope scaling"):
    llama.LlamaConfig.from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_fused_projections_forward_equals_unfused():
  """wqkv / w_gate_up (one GEMM each) give the unfused model's logits, prefill and decode; the
  transform round-trips exactly, and leaves already-fused layers alone."""
  params = random_params(TINY, seed=11)
  fused = llama.fuse_projections(params)
  layer = fused["layers"][0]
  nq, nkv = TINY.num_heads * TINY.head_dim, TINY.num_kv_heads * TINY.head_dim
  assert set(layer) == {"attn_norm", "mlp_norm", "wqkv", "wo", "w_gate_up", "w_down"}
  assert layer["wqkv"].shape == (TINY.hidden_size, nq + 2 * nkv)
  assert layer["w_gate_up"].shape == (TINY.hidden_size, 2 * TINY.intermediate_size)
  assert "wq" in params["layers"][0]                       # the input is not modified
  back = llama.unfuse_projections(fused, TINY)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)
  assert llama.fuse_projections(fused)["layers"][0].keys() == layer.keys()

  toks = np.random.default_rng(11).integers(0, TINY.vocab_size, 9).tolist()
  outs = []
  for p in (params, fused):
    cache = llama.create_cache(TINY, num_pages=16, page_size=PAGE, dtype=jnp.float32)
    prefill, cache = _run(TINY, p, cache, [SeqChunk([3, 5, 7], 0, 8)], [toks[:8]], all_logits=True)
    decode, _ = _run(TINY, p, cache, [SeqChunk([3, 5, 7], 8, 1)], [toks[8:]])
    outs.append((np.asarray(prefill), np.asarray(decode[0])))
  for a, b in zip(*outs):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_fuse_projections_skips_quantized_weights_and_sharded_params():
  params = random_params(TINY, seed=12)
  layers = [dict(l) for l in params["layers"]]
  layers[0]["wk"] = llama.FP8Weight.from_dense(layers[0]["wk"])
  fused = llama.fuse_projections({**params, "layers": layers})
  assert "wqkv" not in fused["layers"][0] and "w_gate_up" in fused["layers"][0]
  assert "wqkv" in fused["layers"][1]
  assert llama.can_fuse_projections(params)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))
  spread = jax.device_put(params["layers"][0]["wq"],
                          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tp")))
  layers = [dict(l) for l in params["layers"]]
  layers[0]["wq"] = spread
  assert not llama.can_fuse_projections({**params, "layers": layers})


def test_fp8_projections_close_to_bf16_forward():
  """W8A8 FP8 layer projections (per-channel weight scales, per-row activation scales): logits
  within a few percent of the unquantized model's, fused or not."""
  params = random_params(TINY, seed=13)
  toks = np.random.default_rng(13).integers(0, TINY.vocab_size, 10).tolist()
  outs = []
  for p in (params, llama.quantize_projections_fp8(params),
            llama.quantize_projections_fp8(llama.fuse_projections(params))):
    cache = llama.create_cache(TINY, num_pages=16, page_size=PAGE, dtype=jnp.float32)
    logits, _ = _run(TINY, p, cache, [SeqChunk([1, 2, 3], 0, 10)], [toks], all_logits=True)
    outs.append(np.asarray(logits, np.float64))
  q = llama.quantize_projections_fp8(params)["layers"][0]
  assert q["wq"].w.dtype == jnp.float8_e4m3fn and q["attn_norm"].dtype == jnp.float32
  for got in outs[1:]:
    rel = np.linalg.norm(got - outs[0]) / np.linalg.norm(outs[0])
    assert rel < 0.08, rel


@pytest.mark.parametrize("fuse,scale_in_norm", [(False, False), (True, False), (True, True)])
def test_fp8_quant_in_norm_gives_the_same_logits(fuse, scale_in_norm):
  """forward(fp8_quant_in_norm=True): the norms before FP8 wqkv / w_gate_up (or wq/wk/wv, w_gate /
  w_up) hand over E4M3 rows (ops.FP8Rows) instead of each projection quantizing its input: the
  same quantization, so the same logits; bf16 weights ignore the option."""
  params = random_params(TINY, seed=14)
  params = llama.fuse_projections(params) if fuse else params
  q = llama.quantize_projections_fp8(params)
  toks = np.random.default_rng(14).integers(0, TINY.vocab_size, 9).tolist()
  chunks = [SeqChunk([1, 2, 3], 0, 9)]
  batch = build_batch(chunks, PAGE, num_tokens=16, num_seqs=4, pages_per_seq=8)
  flat = jnp.asarray(toks + [0] * 7, jnp.int32)
  for p in (q, params):
    outs = []
    for on in (False, True):
      cache = llama.create_cache(TINY, num_pages=16, page_size=PAGE, dtype=jnp.float32)
      logits, _ = llama.forward_jit(p, flat, cache, batch, cfg=TINY, all_logits=True,
                                    fp8_quant_in_norm=on, fp8_scale_in_norm=on and scale_in_norm)
      outs.append(np.asarray(logits))
    np.testing.assert_array_equal(outs[1], outs[0])
  # which projections were handed pre-quantized rows: all after a residual norm (the first
  # layer's q/k/v follow the embedding's plain norm), none of wo / w_down
  from jaxinfer import ops
  # (and with scale_in_norm, wo and w_down hand their unscaled products to the norm)
  seen, deferred = [], []
  real = ops.FP8Weight.linear_deferred

  def spy(self, x):
    seen.append(isinstance(x, ops.FP8Rows))
    return real(self, x)

  real_norm = ops.add_rms_norm

  def spy_norm(x, y, *args):
    deferred.append(isinstance(y, ops.ScaledRows))
    return real_norm(x, y, *args)

  ops.FP8Weight.linear_deferred, ops.add_rms_norm = spy, spy_norm
  llama.add_rms_norm = spy_norm
  try:
    cache = llama.create_cache(TINY, num_pages=16, page_size=PAGE, dtype=jnp.float32)
    llama.forward(q, flat, cache, batch, TINY, fp8_quant_in_norm=True,
                  fp8_scale_in_norm=scale_in_norm)
  finally:
    ops.FP8Weight.linear_deferred, ops.add_rms_norm = real, real_norm
    llama.add_rms_norm = real_norm
  # the norms through ops.add_rms_norm: each layer's two (the one before the LM head is last);
  # add_rms_norm_fp8 calls it too, so every norm shows up once
  assert deferred == [scale_in_norm] * (2 * TINY.num_layers), deferred
  n_qkv, n_up = (1, 1) if fuse else (3, 2)
  first = [False] * n_qkv + [False] + [True] * n_up + [False]    # qkv, wo, gate/up, down
  later = [True] * n_qkv + [False] + [True] * n_up + [False]
  assert seen == first + later * (TINY.num_layers - 1), seen
