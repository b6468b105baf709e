"""kernels/fp8_block_matmul: DeepSeek-style FP8 block-scaled GEMM, interpret mode vs float64.

Interpret mode fills float outputs with NaN first (see test_nvfp4_matmul), so a finite, close
result proves every element was written.
"""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from kernels import fp8_block_matmul as fk
from kernels.quant import fp8_block


def f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def random_fp8_weight(rng, n, k):
  w = rng.standard_normal((n, k)).astype(ml_dtypes.float8_e4m3fn)
  s = rng.uniform(0.01, 2.0, (-(-n // 128), -(-k // 128))).astype(np.float32)
  return jnp.asarray(w), jnp.asarray(s)


@pytest.mark.parametrize("m,n,k,tiling", [
    (1, 128, 256, None),                            # decode default, M=1
    (70, 200, 384, fk.Tiling(32, 64, 4, 2)),         # M and N tails, N not a multiple of 128
    (33, 256, 128, fk.Tiling(16, 256, 4, 2)),        # tile spans two 128-wide scale blocks
])
def test_fp8_block_matmul_matches_float64(rng, m, n, k, tiling):
  x = jnp.asarray(rng.standard_normal((m, k)) * np.exp(rng.standard_normal((m, 1))), jnp.bfloat16)
  w, s = random_fp8_weight(rng, n, k)
  y = fk.fp8_block_matmul(x, w, s, tiling=tiling, interpret=True)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  xq, xs = fp8_block.quantize_activations(x)
  x_deq = f64(xq) * np.repeat(np.asarray(xs, np.float64), 128, axis=1)
  w_deq = f64(w) * np.repeat(np.repeat(np.asarray(s, np.float64), 128, 0), 128, 1)[:n, :k]
  ref = x_deq @ w_deq.T
  y64 = f64(y)
  assert np.all(np.isfinite(y64))
  assert np.linalg.norm(y64 - ref) / np.linalg.norm(ref) < 5e-3   # bf16 output rounding
  # The 1x128 activation quantization itself stays within E4M3's relative half-ulp of x.
  x64 = f64(x)
  assert np.linalg.norm(x_deq - x64) / np.linalg.norm(x64) < 2.0**-4


@pytest.mark.parametrize("make", [
    lambda w, s: fk.fp8_block_matmul(jnp.ones((2, 200), jnp.bfloat16), w[:, :200], s),   # K % 128
    lambda w, s: fk.fp8_block_matmul(jnp.ones((2, 128), jnp.bfloat16), w, s),            # K mismatch
    lambda w, s: fk.fp8_block_matmul(jnp.ones((2, 256), jnp.bfloat16), w.astype(jnp.bfloat16), s),
    lambda w, s: fk.fp8_block_matmul(jnp.ones((2, 256), jnp.bfloat16), w, s[:1]),
    lambda w, s: fk.fp8_block_matmul(jnp.ones((2, 256), jnp.bfloat16), w, s.astype(jnp.bfloat16)),
    lambda w, s: fk.fp8_block_matmul(jnp.ones((256,), jnp.bfloat16), w, s),
])
def test_bad_inputs_raise_shape_error(rng, make):
  w, s = random_fp8_weight(rng, 256, 256)
  with pytest.raises(ShapeError):
    make(w, s)
