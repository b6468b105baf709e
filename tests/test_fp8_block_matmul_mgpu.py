"""kernels/fp8_block_matmul_mgpu: Mosaic GPU FP8 block-scaled GEMM in GPU interpret mode vs float64.

GPU interpret mode (plgpu.InterpretGPUParams) simulates the warpgroups, TMA copies, barriers and
wgmma on CPU; it fills allocated buffers with NaN first (uninitialized_memory="nan"), so a
finite result close to the reference proves every output element was written.
"""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from kernels import fp8_block_matmul_mgpu as mk
from kernels.quant import fp8_block


def fresh_rng() -> np.random.Generator:
  """Fresh entropy on every run; printed so that a failure can be replayed."""
  entropy = np.random.SeedSequence().entropy
  print("seed", entropy)
  return np.random.default_rng(entropy)


def as_f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def float64_reference(x, w, s):
  """y = sum over 128-wide K blocks of (xq @ wq^T) * x_scale * w_scale, all in float64."""
  xq, xs = fp8_block.quantize_activations(x)
  n, k = w.shape
  x_deq = as_f64(xq) * np.repeat(np.asarray(xs, np.float64), 128, axis=1)
  w_scale = np.repeat(np.repeat(np.asarray(s, np.float64), 128, 0), 128, 1)[:n, :k]
  return x_deq @ (as_f64(w) * w_scale).T


C = mk.Config


@pytest.mark.parametrize("m,n,k,cfg,dtype", [
    (1, 128, 128, None, jnp.bfloat16),                              # decode, M=1 padded to 128
    (100, 256, 384, C(64, 128, "n", 3), jnp.float32),               # consumers split N, M tail
    (70, 256, 256, C(64, 128, "m", 2, k_sub=2), jnp.float32),       # two K blocks per step
    (72, 256, 256, C(128, 128, "n", 2, grid_tile_width=1), jnp.bfloat16),  # two 64-row strips
])
def test_matches_float64(m, n, k, cfg, dtype):
  rng = fresh_rng()
  x = jnp.asarray(rng.standard_normal((m, k)) * np.exp(rng.standard_normal((m, k // 128))
                                                        ).repeat(128, axis=1), dtype)
  w = jnp.asarray(rng.standard_normal((n, k)).astype(ml_dtypes.float8_e4m3fn))
  s = jnp.asarray(rng.uniform(0.01, 2.0, (n // 128, k // 128)).astype(np.float32))
  y = mk.fp8_block_matmul(x, w, s, config=cfg, interpret=True)
  assert y.shape == (m, n) and y.dtype == dtype
  ref = float64_reference(x, w, s)
  y64 = as_f64(y)
  assert np.all(np.isfinite(y64))
  tol = 5e-3 if dtype == jnp.bfloat16 else 1e-5    # bf16 output rounding / f32 accumulation
  assert np.linalg.norm(y64 - ref) / np.linalg.norm(ref) < tol
  assert np.max(np.abs(y64 - ref)) < 4 * tol * np.max(np.abs(ref))


def test_supported_shapes():
  assert mk.supported(8192, 8192, 8192)
  assert mk.supported(1, 7168, 2048)
  assert not mk.supported(16, 200, 256)                     # N not a multiple of the CTA tile
  assert not mk.supported(16, 256, 384, C(64, 128, "m", 2, k_sub=2))   # K % 256
  assert not mk.supported(16, 128 * 260, 256)              # scale row over one TMA box


@pytest.mark.parametrize("make", [
    lambda w, s: mk.fp8_block_matmul(jnp.ones((2, 200), jnp.bfloat16), w[:, :200], s),  # K % 128
    lambda w, s: mk.fp8_block_matmul(jnp.ones((2, 128), jnp.bfloat16), w, s),           # K mismatch
    lambda w, s: mk.fp8_block_matmul(jnp.ones((2, 256), jnp.bfloat16), w.astype(jnp.bfloat16), s),
    lambda w, s: mk.fp8_block_matmul(jnp.ones((2, 256), jnp.bfloat16), w, s[:, :1]),    # scales
    lambda w, s: mk.fp8_block_matmul(jnp.ones((2, 256), jnp.bfloat16), w[:64], s),     # N % 128
    lambda w, s: mk.fp8_block_matmul(jnp.ones((2, 2, 256), jnp.bfloat16), w, s),
    lambda w, s: mk.quantized_matmul(jnp.ones((2, 256), jnp.bfloat16), jnp.ones((2, 2)), w, s),
])
def test_bad_inputs_raise(make):
  w = jnp.ones((128, 256), jnp.float8_e4m3fn)
  s = jnp.ones((1, 2), jnp.float32)
  with pytest.raises(ShapeError):
    make(w, s)


@pytest.mark.parametrize("t,sizes,cfg", [
    (200, [50, 0, 120, 20], C(64, 128, "m", 2)),        # empty group, 10 rows past the total
    (100, [0, 90, 0, 30], C(128, 128, "n", 2)),         # skewed; sizes sum past T (clipped)
])
def test_grouped_matches_float64(t, sizes, cfg):
  rng = fresh_rng()
  e, n, k = len(sizes), 256, 128
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((e, n, k)).astype(ml_dtypes.float8_e4m3fn))
  s = jnp.asarray(rng.uniform(0.01, 2.0, (e, n // 128, k // 128)).astype(np.float32))
  y = as_f64(mk.grouped_fp8_block_matmul(x, w, s, jnp.asarray(sizes, jnp.int32), config=cfg,
                                         interpret=True))
  assert y.shape == (t, n) and np.all(np.isfinite(y))
  start = 0
  for g, size in enumerate(sizes):
    end = min(start + size, t)
    if end > start:
      ref = float64_reference(x[start:end], w[g], s[g])
      assert np.linalg.norm(y[start:end] - ref) / np.linalg.norm(ref) < 1e-5
    start = end
  assert np.all(y[start:] == 0)                          # rows past sum(group_sizes)


def test_grouped_bad_inputs_raise():
  w = jnp.ones((2, 128, 256), jnp.float8_e4m3fn)
  s = jnp.ones((2, 1, 2), jnp.float32)
  with pytest.raises(ShapeError):
    mk.grouped_fp8_block_matmul(jnp.ones((4, 256)), w, s, jnp.ones((3,), jnp.int32))
  with pytest.raises(ShapeError):
    mk.grouped_fp8_block_matmul(jnp.ones((4, 256)), w[0], s[0], jnp.ones((2,), jnp.int32))
