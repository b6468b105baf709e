"""kernels.add_rms_norm (interpret mode) against a float64 NumPy reference, and its shape errors."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from kernels.add_rms_norm import add_rms_norm, add_rms_norm_fp8, reference, reference_fp8


def np_add_rms_norm(x, y, w, eps):
  s = x + y
  return s, w * s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("T,H,dtype", [(8, 64, jnp.bfloat16), (12, 128, jnp.bfloat16),
                                       (3, 32, jnp.float32)])
def test_add_rms_norm_matches_float64(T, H, dtype):
  rng = np.random.default_rng(T * H)
  x = jnp.asarray(rng.standard_normal((T, H)) * 3, dtype)
  y = jnp.asarray(rng.standard_normal((T, H)), dtype)
  w = jnp.asarray(rng.uniform(0.5, 1.5, H), dtype)
  s, h = add_rms_norm(x, y, w, eps=1e-5, interpret=True)
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  want_s, want_h = np_add_rms_norm(f64(x), f64(y), f64(w), 1e-5)
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(f64(s), want_s, rtol=tol, atol=tol)
  np.testing.assert_allclose(f64(h), want_h, rtol=2 * tol, atol=2 * tol)
  # and the same roundings as the two XLA ops it replaces
  ref_s, ref_h = reference(x, y, w, 1e-5)
  np.testing.assert_allclose(f64(h), f64(ref_h), rtol=tol, atol=tol)
  np.testing.assert_array_equal(f64(s), f64(ref_s))


def test_add_rms_norm_rejects_shapes_it_does_not_take():
  x = jnp.ones((4, 48), jnp.bfloat16)
  with pytest.raises(ShapeError):
    add_rms_norm(x, x, jnp.ones(48, jnp.bfloat16), eps=1e-5, interpret=True)   # H not a power of 2
  x = jnp.ones((4, 64), jnp.bfloat16)
  with pytest.raises(ShapeError):
    add_rms_norm(x, x.astype(jnp.float32), jnp.ones(64), eps=1e-5, interpret=True)


@pytest.mark.parametrize("T,H,dtype", [(8, 64, jnp.bfloat16), (5, 256, jnp.bfloat16),
                                       (3, 32, jnp.float32)])
def test_add_rms_norm_fp8_quantizes_the_normed_rows(T, H, dtype):
  """The FP8 variant: s as add_rms_norm, and rows that dequantize to the float64 RMSNorm within
  E4M3's rounding (3 mantissa bits), bit-identical to the XLA ops (norm, then
  ops.quantize_rows_fp8) that FP8Weight.linear would run; a zero row keeps a finite scale."""
  from jaxinfer.ops import E4M3_MAX
  rng = np.random.default_rng(T + H)
  x = rng.standard_normal((T, H)) * rng.uniform(0.1, 8, (T, 1))
  x[0] = 0.0
  y = np.zeros((T, H))
  y[1:] = rng.standard_normal((T - 1, H))
  x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
  w = jnp.asarray(rng.uniform(0.5, 1.5, H), dtype)
  s, q, sx = add_rms_norm_fp8(x, y, w, eps=1e-5, interpret=True)
  assert q.dtype == jnp.float8_e4m3fn and q.shape == (T, H) and sx.shape == (T, 1)
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  want_s, want_h = np_add_rms_norm(f64(x), f64(y), f64(w), 1e-5)
  np.testing.assert_allclose(f64(s), want_s, rtol=1e-2, atol=1e-2)
  sx64 = f64(sx)
  assert np.isfinite(sx64).all() and (sx64 > 0).all()
  np.testing.assert_allclose(sx64[1:, 0], np.abs(want_h[1:]).max(axis=1) / E4M3_MAX, rtol=2e-2)
  deq = np.asarray(q.astype(jnp.float32), np.float64) * sx64
  assert (deq[0] == 0).all()                     # the zero row
  np.testing.assert_allclose(deq, want_h, rtol=0.07, atol=0.07 * np.abs(want_h).max())
  assert np.abs(f64(q)).max() <= E4M3_MAX
  ref_s, ref_q, ref_sx = reference_fp8(x, y, w, 1e-5)
  np.testing.assert_array_equal(f64(s), f64(ref_s))
  np.testing.assert_array_equal(sx64, f64(ref_sx))
  np.testing.assert_array_equal(f64(q), f64(ref_q))


@pytest.mark.parametrize("quantize", [False, True])
def test_add_rms_norm_applies_the_fp8_output_scales_of_y(quantize):
  """y given as an FP8 projection's raw product with its row / column scales (ops.ScaledRows):
  the kernel scales it as FP8Weight.linear would (bit-identical to scaling first with XLA ops),
  and the sum and norm stay close to float64."""
  from jaxinfer.ops import ScaledRows
  T, H = 6, 128
  rng = np.random.default_rng(7 + quantize)
  x = jnp.asarray(rng.standard_normal((T, H)) * 2, jnp.bfloat16)
  raw = jnp.asarray(rng.standard_normal((T, H)) * 40, jnp.bfloat16)
  rs = jnp.asarray(rng.uniform(0.001, 0.05, (T, 1)), jnp.float32)
  cs = jnp.asarray(rng.uniform(0.5, 2.0, H), jnp.float32)
  w = jnp.asarray(rng.uniform(0.5, 1.5, H), jnp.bfloat16)
  y = ScaledRows(raw, rs, cs, jnp.bfloat16).apply()
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  if quantize:
    got = add_rms_norm_fp8(x, raw, w, eps=1e-5, y_row_scale=rs, y_col_scale=cs, interpret=True)
    want = reference_fp8(x, y, w, 1e-5)
  else:
    got = add_rms_norm(x, raw, w, eps=1e-5, y_row_scale=rs, y_col_scale=cs, interpret=True)
    want = reference(x, y, w, 1e-5)
    np.testing.assert_allclose(f64(got[1]), np_add_rms_norm(f64(x), f64(y), f64(w), 1e-5)[1],
                               rtol=2e-2, atol=2e-2)
  for g, r in zip(got, want):
    np.testing.assert_array_equal(f64(g), f64(r))
  np.testing.assert_allclose(f64(got[0]), f64(x) + f64(raw) * f64(rs) * f64(cs), rtol=2e-2,
                             atol=2e-2)
  with pytest.raises(ShapeError):
    add_rms_norm(x, raw, w, eps=1e-5, y_row_scale=rs[:3], y_col_scale=cs, interpret=True)


@pytest.mark.parametrize("tiling", [(2, 1), (4, 1), (1, 2), (1, 8), (2, 4)])
def test_add_rms_norm_fp8_tilings(tiling):
  """Rows per program and the two-kernel column split, over split-K partials with scales and over
  a plain y: the same sums, codes and scales as the XLA ops (interpret mode), float64-close."""
  from kernels.add_rms_norm import Tiling
  from jaxinfer.ops import ScaledRows
  T, H = 8, 256
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((T, H)) * 2, jnp.bfloat16)
  parts = jnp.asarray(rng.standard_normal((4, T, H)) * 20, jnp.float32)
  rs = jnp.asarray(rng.uniform(0.001, 0.05, (T, 1)), jnp.float32)
  cs = jnp.asarray(rng.uniform(0.5, 2.0, H), jnp.float32)
  w = jnp.asarray(rng.uniform(0.5, 1.5, H), jnp.bfloat16)
  t = Tiling(rows=tiling[0], split=tiling[1])
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  for y, scales in [(parts, (rs, cs)), (jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16),
                                        (None, None))]:
    got = add_rms_norm_fp8(x, y, w, eps=1e-5, y_row_scale=scales[0], y_col_scale=scales[1],
                           interpret=True, tiling=t)
    yy = ScaledRows(y, rs, cs, jnp.bfloat16).apply() if scales[0] is not None else y
    for g, r in zip(got, reference_fp8(x, yy, w, 1e-5)):
      np.testing.assert_array_equal(f64(g), f64(r))
    _, want_h = np_add_rms_norm(f64(x), f64(yy), f64(w), 1e-5)
    deq = f64(got[1]) * f64(got[2])
    np.testing.assert_allclose(deq, want_h, rtol=0.07, atol=0.07 * np.abs(want_h).max())
