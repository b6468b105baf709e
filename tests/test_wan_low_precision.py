"""Low-precision Wan DiT (jaxinfer/video/low_precision.py): FP8 GEMM / attention numerics against
float64, calibration, and the HLO shape of the FP8 path (E4M3 dot operands, no extra reductions)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models import wan_dit
from jaxinfer.ops import linear
from jaxinfer.video import low_precision as lp

CFG = wan_dit.WanDiTConfig(num_heads=2, head_dim=64, text_dim=64, freq_dim=32, ffn_dim=256,
                           num_layers=2)
GRID = (2, 4, 6)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _attn(q, k, v, quant=None):
  return wan_dit.attention(q, k, v, "xla", quant)


def _ref_attn(q, k, v, quant=None):
  """FP8Attention's math on CPU (cuDNN runs it on GPU)."""
  return _attn(q, k, v) if quant is None else lp.fp8_attention_reference(quant, q, k, v)


def _block_inputs(seed):
  k = jax.random.split(jax.random.key(seed), 3)
  S = int(np.prod(GRID))
  x = jax.random.normal(k[0], (1, S, CFG.dim), jnp.bfloat16)
  ctx = jax.random.normal(k[1], (1, 16, CFG.dim), jnp.bfloat16)
  tproj = 0.1 * jax.random.normal(k[2], (1, 6, CFG.dim), jnp.float32)
  cos, sin = (jnp.asarray(a) for a in wan_dit.rope_3d(CFG, GRID))
  return x, ctx, tproj, cos, sin


def _block_fn(attn):
  return jax.jit(lambda b, *a: wan_dit.block_forward(b, *a, CFG, attn, attn))


@pytest.fixture(scope="module")
def calibrated():
  block = wan_dit.init_params(CFG, jax.random.key(0), jnp.bfloat16)["blocks"][0]
  cal = lp.calibrating(lambda b, *a: wan_dit.block_forward(b, *a, CFG, _attn, _attn))
  # two calibration draws (like two timesteps), neither the one the tests evaluate on
  recs = [cal(lp.observe_block(block), *_block_inputs(s))[1] for s in (11, 12)]
  return block, lp.merge_stats(recs), recs


@pytest.mark.parametrize("static", [True, False])
def test_scaled_fp8_linear_close_to_float64(static):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 24, 96)).astype(np.float32)
  w = (rng.normal(size=(96, 80)) * rng.uniform(0.01, 1.0, size=80) / 10).astype(np.float32)
  W = lp.ScaledFP8Weight.from_dense(w, np.abs(x).max() if static else None)
  assert W.w.dtype == jnp.float8_e4m3fn and W.w.shape == (80, 96) and W.w_scale.shape == (80,)
  out = np.asarray(linear(jnp.asarray(x, jnp.bfloat16), W), np.float64)
  ref = x.astype(np.float64) @ w
  # two E4M3 operands (3 mantissa bits, ~2^-4 relative each, random signs) + bf16 output
  assert np.isfinite(out).all() and _rel(out, ref) < 6e-2, _rel(out, ref)
  # per-output-channel weight scales: a column 100x smaller keeps its relative accuracy
  col = np.argmin(np.abs(w).max(axis=0))
  assert _rel(out[..., col], ref[..., col]) < 8e-2


def test_static_scale_saturates_instead_of_nan():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(8, 64)).astype(np.float32)
  w = (rng.normal(size=(64, 32)) / 8).astype(np.float32)
  W = lp.ScaledFP8Weight.from_dense(w, x_amax=1.0)             # inputs reach ~3: exceed the scale
  out = np.asarray(W.linear(jnp.asarray(x, jnp.bfloat16)), np.float64)
  ref = np.clip(x, -1.0, 1.0).astype(np.float64) @ w            # what saturating E4M3 computes
  assert np.isfinite(out).all() and _rel(out, ref) < 6e-2


def test_calibration_records_every_linear_and_attention(calibrated):
  block, stats, recs = calibrated
  names = {"self_attn.wqkv", "self_attn.wo", "cross_attn.wq", "cross_attn.wkv", "cross_attn.wo",
           "ffn_w1", "ffn_w2", "self_attn", "cross_attn"}
  assert set(stats) == names
  x = _block_inputs(11)[0]
  # the first linear's input is LN(x)·(1+scale)+shift; its amax is recorded per draw, merged by max
  assert stats["ffn_w1"]["amax"] == max(r["ffn_w1"][0]["amax"] for r in recs) > 0
  assert stats["self_attn"]["k_mean"].shape == (CFG.num_heads, CFG.head_dim)
  # the observed block computes the bf16 block (fused projections: bf16 rounding apart)
  out_obs = lp.calibrating(lambda b, *a: wan_dit.block_forward(b, *a, CFG, _attn, _attn))(
      lp.observe_block(block), x, *_block_inputs(11)[1:])[0]
  ref = _block_fn(_attn)(block, x, *_block_inputs(11)[1:])
  assert _rel(out_obs, ref) < 1e-2
  with pytest.raises(RuntimeError, match="outside"):
    lp.observe_block(block)["ffn_w1"].linear(x)


def test_fp8_block_close_to_float32_block(calibrated):
  block, stats, _ = calibrated
  inputs = _block_inputs(7)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), block)
  ref = _block_fn(_attn)(f32, *(a.astype(jnp.float32) for a in inputs))
  bf16 = _block_fn(_attn)(block, *inputs)
  fp8 = _block_fn(_attn)(lp.quantize_block(block, "fp8", stats), *inputs)
  fp8_tok = _block_fn(_attn)(lp.quantize_block(block, "fp8"), *inputs)
  fp8_all = _block_fn(_ref_attn)(lp.with_fp8_attention(lp.quantize_block(block, "fp8", stats), stats),
                                 *inputs)
  e_bf16, e_fp8, e_tok, e_all = (_rel(o, ref) for o in (bf16, fp8, fp8_tok, fp8_all))
  assert e_bf16 < 1e-2, e_bf16
  assert 1.5 * e_bf16 < e_fp8 < 4e-2, (e_bf16, e_fp8)        # FP8 is lossier than bf16, but bounded
  assert e_tok < 4e-2 and e_all < 5e-2, (e_tok, e_all)


def test_fp8_attention_smoothing_and_error(calibrated):
  rng = np.random.default_rng(5)
  q, k, v = (rng.normal(size=(1, 64, 2, 32)).astype(np.float32) for _ in range(3))
  k = k + 4.0 * rng.normal(size=(1, 1, 2, 32)).astype(np.float32)     # large shared K offset
  ref = np.asarray(jax.nn.dot_product_attention(*(jnp.asarray(a) for a in (q, k, v))), np.float64)
  qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
  km = k.mean(axis=(0, 1))
  stats = {"q_amax": np.abs(q).max(), "v_amax": np.abs(v).max()}
  smoothed = lp.FP8Attention.from_stats(dict(stats, k_amax=np.abs(k - km).max(), k_mean=km))
  plain = lp.FP8Attention.from_stats(dict(stats, k_amax=np.abs(k).max(), k_mean=np.zeros_like(km)))
  e_s = _rel(lp.fp8_attention_reference(smoothed, qb, kb, vb), ref)
  e_p = _rel(lp.fp8_attention_reference(plain, qb, kb, vb), ref)
  assert e_s < 7e-2 and e_s < 0.7 * e_p, (e_s, e_p)         # subtracting K's mean is exact and helps


def test_fp8_dot_takes_e4m3_operands_and_adds_no_reduction(calibrated):
  block, stats, _ = calibrated
  inputs = _block_inputs(7)
  fn = _block_fn(_attn)
  module = fn.lower(lp.quantize_block(block, "fp8", stats), *inputs).as_text()   # StableHLO
  dots = [l for l in module.splitlines() if "stablehlo.dot_general" in l]
  f8_dots = [l for l in dots if re.search(r"\(tensor<\S+xf8E4M3FN>, tensor<\S+xf8E4M3FN>\)", l)]
  # fused q/k/v and cross k/v: 7 GEMMs per block, every one on two E4M3 operands
  assert len(f8_dots) == 7, f8_dots
  # before XLA's CPU float-normalization: the dot itself reads the E4M3 values (cuBLASLt FP8 on GPU)
  n_reduce = lambda b: fn.lower(b, *inputs).compile().as_text().count(" reduce(")
  base = n_reduce(block)
  assert n_reduce(lp.quantize_block(block, "fp8", stats)) == base   # static scales: no amax pass
  assert n_reduce(lp.quantize_block(block, "fp8xla")) > base        # the old path: one per linear


def test_fused_projections_and_stacked_blocks_match():
  cfg = wan_dit.WanDiTConfig(num_heads=2, head_dim=12, in_channels=4, out_channels=4, text_dim=8,
                             freq_dim=8, ffn_dim=16, num_layers=3)
  params = wan_dit.init_params(cfg, jax.random.key(0), jnp.float32)
  lat = jax.random.normal(jax.random.key(1), (1, 2, 4, 4, 4))
  text = jax.random.normal(jax.random.key(2), (1, 3, 8))
  fwd = jax.jit(lambda p, t: wan_dit.forward(p, lat, t, text, cfg, dtype=jnp.float32,
                                             return_cache=True))
  t = jnp.array([500.0])
  ref, ref_cache = fwd(params, t)
  fused = dict(params, blocks=[wan_dit.fuse_projections(b) for b in params["blocks"]])
  stacked = wan_dit.stack_blocks(fused)
  assert jax.tree.leaves(stacked["blocks"])[0].shape[0] == 3
  for p in (fused, stacked):
    out, cache = fwd(p, t)
    assert _rel(out, ref) < 1e-5 and _rel(cache.residual, ref_cache.residual) < 1e-5
  cached = wan_dit.forward(stacked, lat, t, text, cfg, dtype=jnp.float32, cache=ref_cache)
  assert _rel(cached, ref) < 1e-5


def test_nvfp4_w4a4_block_uses_calibrated_input_scale(calibrated):
  block, stats, _ = calibrated
  qb = lp.quantize_block(block, "nvfp4a4", stats)
  w = qb["ffn_w1"]
  assert isinstance(w, lp.NVFP4W4A4Weight) and "wqkv" in qb["self_attn"]
  np.testing.assert_allclose(float(w.w.input_scale), stats["ffn_w1"]["amax"] / (6 * 448), rtol=1e-6)
  inputs = _block_inputs(7)
  f32 = jax.tree.map(lambda a: a.astype(jnp.float32), block)
  ref = _block_fn(_attn)(f32, *(a.astype(jnp.float32) for a in inputs))
  e_w4a16 = _rel(_block_fn(_attn)(lp.quantize_block(block, "nvfp4"), *inputs), ref)
  e_w4a4 = _rel(_block_fn(_attn)(qb, *inputs), ref)
  # 4-bit activations too: lossier than weight-only NVFP4, still bounded
  assert e_w4a16 < e_w4a4 < 0.15, (e_w4a16, e_w4a4)
