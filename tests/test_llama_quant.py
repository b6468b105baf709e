"""Quantized Llama layouts for serving: NVFP4 layer projections, the decode-NVFP4 / prefill-FP8 split
(ops.RowSplitWeight) and the FP8 LM head, each against a plain-JAX reference on CPU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import ops
from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.models import llama
from kernels.quant.weights import NVFP4Weight
from llama_fixtures import TINY, random_params

PAGE = 4
# K = 256 for every projection but w_down (K = intermediate = 512): all in the kernel layout.
WIDE = dataclasses.replace(TINY, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                           intermediate_size=512)


def _logits(cfg, params, toks, num_tokens, **kw):
  batch = build_batch([SeqChunk([1, 2, 3, 4], 0, len(toks))], PAGE, num_tokens=num_tokens,
                      num_seqs=2, pages_per_seq=8)
  flat = jnp.asarray(list(toks) + [0] * (num_tokens - len(toks)), jnp.int32)
  cache = llama.create_cache(cfg, num_pages=16, page_size=PAGE, dtype=jnp.float32)
  logits, _ = llama.forward_jit(params, flat, cache, batch, cfg=cfg, all_logits=True, **kw)
  return np.asarray(logits, np.float64)[:len(toks)]


def _dequantized(params):
  """Each quantized projection replaced by its dense [K, N] float32 dequantization."""
  is_q = lambda w: hasattr(w, "dequantize")
  return jax.tree.map(lambda w: w.dequantize(jnp.float32) if is_q(w) else w, params, is_leaf=is_q)


@pytest.mark.parametrize("fuse", [False, True])
def test_nvfp4_forward_equals_dequantized_reference(fuse):
  """NVFP4 layer projections (W4A16: activations unquantized) compute the same logits as the
  dense forward over the dequantized weights; kernel layout where K % 256 == 0."""
  params = random_params(WIDE, seed=21)
  params = llama.fuse_projections(params) if fuse else params
  q = llama.quantize_projections_nvfp4(params)
  layer = q["layers"][0]
  names = ("wqkv", "wo", "w_gate_up", "w_down") if fuse else ("wq", "wk", "wv", "wo", "w_gate",
                                                              "w_up", "w_down")
  for name in names:
    assert isinstance(layer[name], NVFP4Weight) and layer[name].layout == "kernel", name
  assert q["embed"] is params["embed"] and q["lm_head"] is params["lm_head"]
  assert layer["attn_norm"] is params["layers"][0]["attn_norm"]
  toks = np.random.default_rng(21).integers(0, WIDE.vocab_size, 11).tolist()
  got = _logits(WIDE, q, toks, 16)
  want = _logits(WIDE, _dequantized(q), toks, 16)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  # and each weight is the dense one up to 4-bit rounding (E2M1 with E4M3 scales per 16: ~10%)
  for name in names:
    dense = np.asarray(params["layers"][0][name], np.float64)
    deq = np.asarray(layer[name].dequantize(jnp.float32), np.float64)
    rel = np.linalg.norm(deq - dense) / np.linalg.norm(dense)
    assert 0 < rel < 0.15, (name, rel)


def test_nvfp4_modelopt_layout_when_k_is_not_a_multiple_of_256():
  q = llama.quantize_projections_nvfp4(random_params(TINY, seed=22))["layers"][0]
  assert q["wq"].layout == "modelopt" and q["w_down"].layout == "modelopt"


def test_row_split_weight_picks_by_rows():
  rng = np.random.default_rng(23)
  a, b = (jnp.asarray(rng.standard_normal((32, 24)), jnp.float32) for _ in range(2))
  w = ops.RowSplitWeight(a, b, max_rows=8)
  for shape, ref in (((8, 32), a), ((2, 4, 32), a), ((9, 32), b), ((3, 4, 32), b)):
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    want = np.einsum("...k,kn->...n", np.asarray(x, np.float64), np.asarray(ref, np.float64))
    np.testing.assert_allclose(np.asarray(ops.linear(x, w), np.float64), want, rtol=1e-5,
                               atol=1e-5)
  # a pytree: jit / tree.map see both forms, max_rows is static
  leaves, treedef = jax.tree.flatten(w)
  assert len(leaves) == 2 and jax.tree.unflatten(treedef, leaves).max_rows == 8


def test_nvfp4_decode_fp8_prefill_steps():
  """quantize_projections_nvfp4(prefill_fp8=True): a step of <= max_decode_rows tokens runs the
  NVFP4 form (the logits of the NVFP4-only model, bit for bit), a larger one the FP8 form (those
  of quantize_projections_fp8)."""
  params = llama.fuse_projections(random_params(WIDE, seed=24))
  split = llama.quantize_projections_nvfp4(params, prefill_fp8=True, max_decode_rows=8)
  w = split["layers"][1]["w_gate_up"]
  assert isinstance(w, ops.RowSplitWeight) and w.max_rows == 8
  assert isinstance(w.small, NVFP4Weight) and isinstance(w.large, ops.FP8Weight)
  nvfp4_only = llama.quantize_projections_nvfp4(params)
  fp8_only = llama.quantize_projections_fp8(params)
  toks = np.random.default_rng(24).integers(0, WIDE.vocab_size, 6).tolist()
  np.testing.assert_array_equal(_logits(WIDE, split, toks, 8), _logits(WIDE, nvfp4_only, toks, 8))
  np.testing.assert_array_equal(_logits(WIDE, split, toks, 16), _logits(WIDE, fp8_only, toks, 16))
  assert not np.array_equal(_logits(WIDE, nvfp4_only, toks, 8), _logits(WIDE, fp8_only, toks, 8))


def test_fp8_lm_head():
  """quantize_projections_fp8(lm_head=True): an untied LM head becomes an FP8Weight whose logits
  stay within a few percent of the dense head's (the layers FP8 in both); a tied head (the
  embedding) is left alone."""
  params = random_params(TINY, seed=25)
  q = llama.quantize_projections_fp8(params, lm_head=True)
  assert isinstance(q["lm_head"], ops.FP8Weight) and q["embed"] is params["embed"]
  assert not isinstance(llama.quantize_projections_fp8(params)["lm_head"], ops.FP8Weight)
  toks = np.random.default_rng(25).integers(0, TINY.vocab_size, 9).tolist()
  got = _logits(TINY, q, toks, 16)
  want = _logits(TINY, {**q, "lm_head": params["lm_head"]}, toks, 16)
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert 0 < rel < 0.05, rel
  tied_cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
  tied = {k: v for k, v in params.items() if k != "lm_head"}
  tq = llama.quantize_projections_fp8(tied, lm_head=True)
  assert "lm_head" not in tq
  np.testing.assert_array_equal(_logits(tied_cfg, tq, toks, 16),
                                _logits(tied_cfg, llama.quantize_projections_fp8(tied), toks, 16))


def test_llama_forward_scale_in_norm_only_from_min_tokens(monkeypatch):
  """LlamaForward(fp8_scale_in_norm=True, fp8_scale_in_norm_min_tokens=16): the option reaches
  llama.forward only in steps of >= 16 tokens (prefill steps)."""
  from jaxinfer.engine.step import LlamaForward
  seen = []
  real = llama.forward
  monkeypatch.setattr(llama, "forward", lambda *a, **k: seen.append(k["fp8_scale_in_norm"]) or
                      real(*a, **k))
  params = llama.quantize_projections_fp8(llama.fuse_projections(
      random_params(TINY, seed=26, dtype=jnp.bfloat16)))
  fwd = LlamaForward(TINY, fused_add_norm=False, fp8_scale_in_norm=True,
                     fp8_scale_in_norm_min_tokens=16)
  toks = np.random.default_rng(26).integers(0, TINY.vocab_size, 6).tolist()
  for n in (8, 16):
    batch = build_batch([SeqChunk([1, 2, 3, 4], 0, 6)], PAGE, num_tokens=n, num_seqs=2,
                        pages_per_seq=8)
    cache = llama.create_cache(TINY, num_pages=16, page_size=PAGE, dtype=jnp.bfloat16)
    fwd(params, jnp.asarray(toks + [0] * (n - 6), jnp.int32), cache, batch)
  assert seen == [False, True]

