"""ops.FP8Weight: the W8A8 FP8 linear against a float64 emulation of its quantization."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer.ops import E4M3_MAX, FP8Weight, linear


@pytest.mark.parametrize("rows", [1, 8, 37])
def test_fp8_weight_linear_matches_float64_emulation(rows):
  rng = np.random.default_rng(rows)
  k, n = 96, 80
  w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 0.2, n)).astype(np.float32)   # per-column ranges
  x = (rng.standard_normal((rows, k)) * rng.uniform(0.1, 5.0, (rows, 1))).astype(np.float32)
  q = FP8Weight.from_dense(jnp.asarray(w))
  assert q.w.shape == (n, k) and q.w.dtype == jnp.float8_e4m3fn and q.shape == (k, n)

  sw = np.abs(w).max(axis=0) / E4M3_MAX                                  # per output channel
  wq = (w / sw).T.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)     # [N, K]
  np.testing.assert_array_equal(np.asarray(q.w, np.float64), wq)
  xb = x.astype(ml_dtypes.bfloat16).astype(np.float64)
  sx = np.abs(xb).max(axis=1, keepdims=True) / E4M3_MAX                  # per row
  xq = np.clip(xb / sx, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  want = (xq @ wq.T) * sx * sw
  got = np.asarray(linear(jnp.asarray(x, jnp.bfloat16), q), np.float64)
  # bf16 raw dot output, then the scaled bf16 result: two roundings of 2^-8
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
  # and the quantization itself stays close to the dense product
  dense = xb @ w.astype(np.float64)
  assert np.linalg.norm(got - dense) / np.linalg.norm(dense) < 0.06


def test_fp8_weight_is_a_pytree_under_jit():
  w = jax.random.normal(jax.random.key(0), (64, 32)) * 0.05
  x = jax.random.normal(jax.random.key(1), (3, 5, 64)).astype(jnp.bfloat16)
  q = FP8Weight.from_dense(w)
  got = jax.jit(linear)(x, q)
  assert got.shape == (3, 5, 32) and got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(w), rtol=0.07, atol=1e-3)
