"""Mosaic GPU prefill attention (kernels/flash_attention_mgpu.py) in the Mosaic GPU interpreter vs
float64 NumPy, plus a CPU-side lowering check of the compiled-only code paths.

The interpreter fills buffers (the kernel output included) with NaN before the kernel runs, so an
unwritten output row shows up as NaN: every check asserts the output is finite. Shapes are small
(S = 256: two CTAs of 128 query rows per head, 2-4 key steps each) so the causal diagonal, the
unmasked steps below it and the pipeline's slot reuse are all exercised.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

from jaxinfer.errors import ShapeError
from kernels import flash_attention
from kernels.flash_attention_mgpu import (MgpuTiles, _p_to_fp8_operand, flash_prefill,
                                          flash_prefill_dense, prepare_v_fp8)

F8 = jnp.float8_e4m3fn


def np_causal(q, k, v):
  """float64 causal attention, q [B,S,H,D], k/v [B,S,KV,D] (already dequantized)."""
  B, S, H, D = q.shape
  G = H // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
  s = np.where(np.tril(np.ones((S, S), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def f64(x, scale=None):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  return x if scale is None else x * np.asarray(scale, np.float64)[:, None]


def rel_err(out, ref):
  out = f64(out)
  assert np.isfinite(out).all(), "unwritten (NaN) output rows"
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def inputs(seed, B, S, H, KV, D):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32)
          for shape in ((B, S, H, D), (B, S, KV, D), (B, S, KV, D))]


@pytest.mark.parametrize("S,H,KV,D,tiles", [
    (256, 2, 2, 64, MgpuTiles(block_kv=128, stages=2)),           # MHA, serial ping-pong
    # MQA, intra-WG overlap without ping-pong; the two warpgroups need 3 vs 4 steps
    (256, 2, 1, 64, MgpuTiles(block_kv=64, stages=3, overlap=True, pingpong=False)),
    (512, 1, 1, 64, MgpuTiles(block_kv=256)),                     # half-width diagonal steps
    # persistent: 8 work items on 3 CTAs, the pipeline's slots carried across items
    (512, 2, 1, 64, MgpuTiles(stages=3, persistent=3)),
])
def test_bf16_matches_float64(S, H, KV, D, tiles):
  q, k, v = inputs(H + D, 1, S, H, KV, D)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  params = plgpu.InterpretGPUParams(detect_races=True)
  out = flash_prefill_dense(q, k, v, scale=D ** -0.5, tiles=tiles, interpret=params)
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  assert rel_err(out, np_causal(f64(q), f64(k), f64(v))) < 1e-2
  assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("S,tiles", [
    (256, MgpuTiles(overlap=True)),                         # overlapped loop
    (256, MgpuTiles()),                                     # serial, row sums by P.ones wgmma
    (256, MgpuTiles(rowsum_mma=False)),                     # serial, row sums on the FP32 units
    # 256-key tiles: diagonal steps of full and of half width (warpgroups at 64 * (0..7))
    (512, MgpuTiles(block_kv=256)),
    (512, MgpuTiles(block_kv=256, persistent=3)),           # persistent, 8 items on 3 CTAs
])
def test_fp8_matches_float64(S, tiles):
  """E4M3 q/k/v with per-head scales, P in E4M3, GQA 2, D 128."""
  B, H, KV, D = 1, 2, 1, 128
  q, k, v = inputs(7, B, S, H, KV, D)
  qs = np.array([0.5, 1.5], np.float32)
  ks, vs = np.array([0.7], np.float32), np.array([2.0], np.float32)
  q8 = jnp.asarray(q / qs[:, None], F8)
  k8, v8 = jnp.asarray(k / ks[:, None], F8), jnp.asarray(v / vs[:, None], F8)
  out = flash_prefill_dense(q8, k8, v8, scale=D ** -0.5, q_scale=qs, k_scale=ks, v_scale=vs,
                            tiles=tiles, interpret=True)
  assert out.dtype == jnp.bfloat16
  # vs the dequantized FP8 inputs: only P's E4M3 rounding and bf16 output remain
  assert rel_err(out, np_causal(f64(q8, qs), f64(k8, ks), f64(v8, vs))) < 2e-2
  # vs the unquantized inputs: each E4M3 operand adds <= 2^-4 relative rounding
  assert rel_err(out, np_causal(q.astype(np.float64), k.astype(np.float64),
                                v.astype(np.float64))) < 6e-2


def test_p_relabel_matches_v_permutation():
  """The register relabelling of P (columns 8h+2t+l -> 4t+2h+l in each 16-group) and the key
  permutation of prepare_v_fp8 cancel in the P.V contraction."""
  rng = np.random.default_rng(3)
  p = jnp.asarray(rng.uniform(0, 1, (64, 128)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, 128, 1, 32)), jnp.float32)
  p_op = _p_to_fp8_operand(p, interpret=True)
  vt = prepare_v_fp8(v.astype(F8))[0, 0]                    # [D, S], keys permuted
  np.testing.assert_array_equal(f64(prepare_v_fp8(v.astype(F8), two_pass=True)[0, 0]), f64(vt))
  got = f64(p_op) @ f64(vt).T
  want = f64(p.astype(F8)) @ f64(v.astype(F8))[0, :, 0]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  assert not np.allclose(f64(p_op), f64(p.astype(F8)))     # it really is a permutation


def test_lowers_for_hopper_on_cpu():
  """The compiled-only paths (P kept in registers and relabelled into the FP8 wgmma operand layout,
  the O accumulator carried across the loop) lower to Mosaic GPU without a GPU."""
  for dt, tiles in ((jnp.bfloat16, MgpuTiles(overlap=True)), (F8, MgpuTiles(overlap=True)),
                    (F8, MgpuTiles(rowsum_mma=True)), (F8, MgpuTiles(block_kv=256)),
                    (F8, MgpuTiles(block_kv=256, persistent=132))):
    q = jax.ShapeDtypeStruct((1, 512, 4, 128), dt)
    kv = jax.ShapeDtypeStruct((1, 512, 2, 128), dt)
    fn = lambda q, k, v, tiles=tiles: flash_prefill_dense(q, k, v, scale=0.1, tiles=tiles)
    text = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_packed_op_dispatch():
  """The packed-layout op runs the Mosaic GPU kernel on a dense batch and the Triton kernel on a
  ragged one (told apart by bitwise equality with each kernel's own output)."""
  B, S, H, KV, D = 2, 128, 2, 1, 64
  q, k, v = inputs(11, B, S, H, KV, D)
  q = jnp.asarray(q.reshape(B * S, H, D), jnp.bfloat16)
  k, v = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
  dense_qs, dense_lens = jnp.asarray([0, S, 2 * S], jnp.int32), jnp.asarray([S, S], jnp.int32)
  out = flash_prefill(q, k, v, dense_qs, dense_lens, scale=D ** -0.5, interpret=True)
  mosaic = flash_prefill_dense(q.reshape(B, S, H, D), k, v, scale=D ** -0.5,
                               tiles=MgpuTiles(), interpret=True)
  np.testing.assert_array_equal(f64(out), f64(mosaic.reshape(B * S, H, D)))
  ref = np_causal(f64(q).reshape(B, S, H, D), f64(k), f64(v)).reshape(B * S, H, D)
  assert rel_err(out, ref) < 1e-2
  ragged_qs, ragged_lens = jnp.asarray([0, 100, 200], jnp.int32), jnp.asarray([S, 100], jnp.int32)
  out = flash_prefill(q, k, v, ragged_qs, ragged_lens, scale=D ** -0.5, interpret=True)
  triton = flash_attention.flash_prefill(q, k, v, ragged_qs, ragged_lens, scale=D ** -0.5,
                                         interpret=True)
  np.testing.assert_array_equal(f64(out), f64(triton))
  assert np.isfinite(f64(out)).all()


def test_shape_errors():
  x = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
  kv = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  with pytest.raises(ShapeError, match="multiple"):
    flash_prefill_dense(x[:, :200], kv[:, :200], kv[:, :200], scale=0.1)
  with pytest.raises(ShapeError, match="head dim"):
    flash_prefill_dense(x[..., :32], kv[..., :32], kv[..., :32], scale=0.1)
  with pytest.raises(ShapeError, match="KV heads"):
    flash_prefill_dense(x[:, :, :3], kv, kv, scale=0.1)
  with pytest.raises(ShapeError, match="FP8"):
    flash_prefill_dense(x.astype(F8), kv, kv, scale=0.1)
  with pytest.raises(ShapeError, match="disagree"):
    flash_prefill_dense(x, kv, kv[:, :128], scale=0.1)
  with pytest.raises(ValueError, match="block_q"):
    MgpuTiles(block_q=128)
