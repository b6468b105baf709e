"""kernels/grouped_matmul: ragged_dot-semantics grouped GEMM (bf16 / NVFP4 / FP8), interpret mode.

Interpret mode fills float outputs with NaN first, so finite outputs prove full coverage; rows past
sum(group_sizes) must come back exactly zero, as jax.lax.ragged_dot returns them.
"""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from kernels import grouped_matmul as gk
from kernels.quant import fp8_block, nvfp4

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def np_ragged(x, w_ekn, sizes):
  out = np.zeros((x.shape[0], w_ekn.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = x[start:start + size] @ w_ekn[g]
    start += size
  return out


def check(y, ref, sizes):
  y = f64(y)
  assert np.all(np.isfinite(y)), "unwritten (NaN-poisoned) output"
  total = int(np.sum(sizes))
  assert np.all(y[total:] == 0)
  if total:
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 5e-3


@pytest.mark.parametrize("sizes", [[0, 0], [0, 17, 0, 30, 1, 0, 9, 0]])
def test_schedule_covers_every_row_once(rng, sizes):
  t, bm = 64, 16
  sched = np.asarray(gk.make_schedule(jnp.asarray(sizes, jnp.int32), t, bm))
  ends = np.cumsum(sizes)
  cover = np.zeros(t, int)
  for g, r0, r1 in sched.T:
    if g < 0:
      continue
    assert r0 < r1   # a used tile has rows; it covers [r0, min(r0 + bm, r1))
    rows = np.arange(r0, min(r0 + bm, r1))
    cover[rows] += 1
    if g < len(sizes):
      assert ends[g] - sizes[g] <= r0 and r1 == ends[g]
    else:
      assert r0 >= ends[-1]
  np.testing.assert_array_equal(cover, 1)


def test_grouped_bf16_skewed_and_empty_groups(rng):
  t, e, k, n = 64, 6, 256, 40                          # N not a multiple of the tile
  sizes = [0, 50, 0, 3, 0, 7]                          # sum 60 < T: 4 trailing zero rows
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((e, k, n)), jnp.bfloat16)
  y = gk.grouped_matmul_dense(x, w, jnp.asarray(sizes, jnp.int32),
                              tiling=gk.Tiling(16, 32, 128, 4, 2), interpret=True)
  assert y.shape == (t, n) and y.dtype == jnp.bfloat16
  check(y, np_ragged(f64(x), f64(w), sizes), sizes)


@pytest.mark.parametrize("k,tiling", [
    (256, gk.Tiling(16, 32, 128, 4, 2, x_even_odd=True)),
    (48, gk.Tiling(16, 64, 64, 4, 2)),                  # K % 32 != 0: masked K tail
    # f16 E4M3 route ("asm" interprets as the identical jnp route), weight as the MMA A operand
    (48, gk.Tiling(16, 64, 64, 4, 2, dequant="asm", w_as_a=True)),
    (256, gk.Tiling(16, 32, 128, 4, 2, x_even_odd=True, dequant="e4m3", w_as_a=True)),
    (256, gk.Tiling(16, 64, 128, 4, 2, dequant="asm_f16", w_as_a=True, x_scale=True)),
    (48, gk.Tiling(16, 32, 64, 4, 2, dequant="asm", w_as_a=True, x_scale=True, load_3d=True)),
])
def test_grouped_nvfp4_matches_float64(rng, k, tiling):
  t, e, n = 37, 5, 64
  sizes = [9, 0, 20, 0, 8]
  packed = rng.integers(0, 256, (e, n, k // 2), dtype=np.uint8)
  scale = rng.uniform(0.05, 400, (e, n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  gs = rng.uniform(1e-3, 1e-2, e).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  y = gk.grouped_matmul_nvfp4(x, jnp.asarray(packed), jnp.asarray(scale), jnp.asarray(gs),
                              jnp.asarray(sizes, jnp.int32), tiling=tiling, interpret=True)
  codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(e, n, k)
  w_enk = E2M1[codes] * np.repeat(f64(scale), 16, -1) * gs[:, None, None].astype(np.float64)
  check(y, np_ragged(f64(x), np.swapaxes(w_enk, 1, 2), sizes), sizes)


def test_grouped_fp8_matches_float64(rng):
  t, e, k, n = 40, 3, 256, 192
  sizes = [0, 25, 13]
  w = rng.standard_normal((e, n, k)).astype(ml_dtypes.float8_e4m3fn)
  s = rng.uniform(0.01, 2, (e, 2, 2)).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  y = gk.grouped_matmul_fp8(x, jnp.asarray(w), jnp.asarray(s), jnp.asarray(sizes, jnp.int32),
                            tiling=gk.Tiling(16, 64, 128, 4, 2), interpret=True)
  xq, xs = fp8_block.quantize_activations(x)
  x_deq = f64(xq) * np.repeat(np.asarray(xs, np.float64), 128, 1)
  w_deq = f64(w) * np.repeat(np.repeat(s.astype(np.float64), 128, 1), 128, 2)[:, :n, :k]
  check(y, np_ragged(x_deq, np.swapaxes(w_deq, 1, 2), sizes), sizes)


def test_all_groups_empty_gives_zeros(rng):
  x = jnp.asarray(rng.standard_normal((8, 128)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 128, 64)), jnp.bfloat16)
  y = gk.grouped_matmul_dense(x, w, jnp.zeros((3,), jnp.int32), interpret=True)
  np.testing.assert_array_equal(f64(y), 0)


@pytest.mark.parametrize("make", [
    lambda x, w: gk.grouped_matmul_dense(x, w, jnp.ones((4,), jnp.int32)),         # E mismatch
    lambda x, w: gk.grouped_matmul_dense(x, w, jnp.ones((3,), jnp.float32)),       # float sizes
    lambda x, w: gk.grouped_matmul_dense(x[:, :64], w, jnp.ones((3,), jnp.int32)),  # K mismatch
    lambda x, w: gk.grouped_matmul_dense(x, w[0], jnp.ones((3,), jnp.int32)),      # 2-D weight
    lambda x, w: gk.grouped_matmul_fp8(x, w.astype(jnp.float8_e4m3fn), jnp.ones((3, 1, 1)),
                                       jnp.ones((3,), jnp.int32)),                 # scale dtype
])
def test_bad_inputs_raise_shape_error(rng, make):
  x = jnp.asarray(rng.standard_normal((8, 128)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 128, 64)), jnp.bfloat16)
  with pytest.raises(ShapeError):
    make(x, w)


@pytest.mark.parametrize("tiling", [
    None,
    gk.Tiling(16, 64, 256, 4, 2, dequant="asm", w_as_a=True),
    gk.Tiling(64, 128, 256, 4, 2, dequant="f32"),
    # 2 programs per N tile looping over the used tiles (4 here, incl. the zero-row tile)
    gk.Tiling(16, 64, 512, 4, 2, dequant="asm", programs=2),
])
def test_grouped_nvfp4_kernel_layout_matches_float64(rng, tiling):
  t, e, n, k = 37, 5, 96, 512
  sizes = [9, 0, 20, 0, 5]                                  # empty groups, 3 rows past the total
  packed = rng.integers(0, 256, (e, n, k // 2), dtype=np.uint8)
  scale = rng.uniform(0.05, 400, (e, n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  gs = rng.uniform(1e-3, 1e-2, e).astype(np.float32)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  y = gk.grouped_matmul_nvfp4_kl(x, nvfp4.to_kernel_layout(jnp.asarray(packed)),
                                 jnp.asarray(scale), jnp.asarray(gs),
                                 jnp.asarray(sizes, jnp.int32), tiling=tiling, interpret=True)
  codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(e, n, k)
  w_enk = E2M1[codes] * np.repeat(f64(scale), 16, -1) * gs[:, None, None].astype(np.float64)
  check(y, np_ragged(f64(x), np.swapaxes(w_enk, 1, 2), sizes), sizes)


def _kl_expert_weights(rng, e, n, k):
  packed = rng.integers(0, 256, (e, n, k // 2), dtype=np.uint8)
  scale = rng.uniform(0.05, 400, (e, n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  gs = rng.uniform(1e-3, 1e-2, e).astype(np.float32)
  codes = np.stack([packed & 0xF, packed >> 4], -1).reshape(e, n, k)
  w_ekn = np.swapaxes(E2M1[codes] * np.repeat(f64(scale), 16, -1)
                      * gs[:, None, None].astype(np.float64), 1, 2)
  kl = (nvfp4.to_kernel_layout(jnp.asarray(packed)), jnp.asarray(scale), jnp.asarray(gs))
  return kl, w_ekn


@pytest.mark.parametrize("n,k,sizes,tiling", [
    (96, 512, [9, 0, 20, 0, 5], None),                         # N % bn != 0, 3 rows past total
    (64, 768, [0, 30, 1, 0, 6], gk.Tiling(16, 32, 512, 4, 2)),  # 3 K tiles: tps falls back to 1
    (128, 512, [2, 3, 0, 1, 3], gk.Tiling(16, 64, 512, 4, 3, dequant="f32")),   # bf16 MMA route
    (64, 256, [0, 0, 0, 0, 0], gk.Tiling(16, 64, 256, 4, 2)),  # every group empty: all zeros
    (64, 512, [9, 0, 20, 0, 5], gk.Tiling(16, 64, 512, 4, 2, programs=3)),   # looping programs
    (64, 512, [9, 0, 20, 0, 5], gk.Tiling(16, 64, 512, 4, 2, programs=16)),  # more than tiles
])
def test_grouped_swiglu_kernel_layout_matches_float64(rng, n, k, sizes, tiling):
  t, e = 37, 5
  (gq, gsc, ggs), wg = _kl_expert_weights(rng, e, n, k)
  (uq, usc, ugs), wu = _kl_expert_weights(rng, e, n, k)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  sz = jnp.asarray(sizes, jnp.int32)
  y = gk.grouped_swiglu_nvfp4_kl(x, gq, gsc, ggs, uq, usc, ugs, sz, tiling=tiling,
                                 interpret=True)
  assert y.shape == (t, n) and y.dtype == jnp.bfloat16
  g = np_ragged(f64(x), wg, sizes)
  ref = g / (1 + np.exp(-g)) * np_ragged(f64(x), wu, sizes)
  check(y, ref, sizes)
  # the plain-JAX reference (the CPU fallback's form) agrees with float64 too
  r = gk.grouped_swiglu_nvfp4_kl_reference(x, gq, gsc, ggs, uq, usc, ugs, sz)
  check(r, ref, sizes)


def test_grouped_swiglu_rejects_mismatched_weights(rng):
  (gq, gsc, ggs), _ = _kl_expert_weights(rng, 3, 64, 256)
  (uq, usc, ugs), _ = _kl_expert_weights(rng, 3, 32, 256)
  x = jnp.asarray(rng.standard_normal((8, 256)), jnp.bfloat16)
  with pytest.raises(ShapeError):
    gk.grouped_swiglu_nvfp4_kl(x, gq, gsc, ggs, uq, usc, ugs, jnp.ones((3,), jnp.int32),
                               interpret=True)
  with pytest.raises(ShapeError):    # K not a multiple of the kernel layout's 256
    gk.grouped_swiglu_nvfp4_kl(x[:, :128], gq[..., :64], gsc[..., :8], ggs, gq[..., :64],
                               gsc[..., :8], ggs, jnp.ones((3,), jnp.int32), interpret=True)


def test_kernel_layout_x_cast_outside_is_bit_identical(rng):
  """x_for_kl: x cast to f16 before the call (out_dtype bf16) gives exactly the bf16-x result on
  an f16 route (the kernel casts each x tile the same way), for both kernel-layout kernels; the
  bf16-MMA "f32" route keeps x as is."""
  t, e, n, k = 21, 4, 64, 512
  sizes = jnp.asarray([6, 0, 9, 4], jnp.int32)
  (gq, gsc, ggs), _ = _kl_expert_weights(rng, e, n, k)
  (uq, usc, ugs), _ = _kl_expert_weights(rng, e, n, k)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  tl = gk.Tiling(16, 64, 512, 4, 2, dequant="asm")
  x16 = gk.x_for_kl(x, tl)
  assert x16.dtype == jnp.float16
  assert gk.x_for_kl(x, gk.Tiling(16, 64, 512, 4, 2, dequant="f32")).dtype == jnp.bfloat16
  a = gk.grouped_matmul_nvfp4_kl(x, gq, gsc, ggs, sizes, tiling=tl, interpret=True)
  b = gk.grouped_matmul_nvfp4_kl(x16, gq, gsc, ggs, sizes, tiling=tl, interpret=True,
                                 out_dtype=jnp.bfloat16)
  assert b.dtype == jnp.bfloat16
  np.testing.assert_array_equal(f64(a), f64(b))
  a = gk.grouped_swiglu_nvfp4_kl(x, gq, gsc, ggs, uq, usc, ugs, sizes, tiling=tl, interpret=True)
  b = gk.grouped_swiglu_nvfp4_kl(x16, gq, gsc, ggs, uq, usc, ugs, sizes, tiling=tl,
                                 interpret=True, out_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(f64(a), f64(b))
