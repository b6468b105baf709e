"""kernels/fp8_decode_matmul_mgpu: the Mosaic GPU FP8 decode GEMM on CPU.

* the kernel in the Mosaic GPU interpreter (TMA, barriers, slot reuse, split-K partials, the
  clamped last N tile, the peeled K tail; NaN-poisoned output, out-of-bounds reads raise) against
  float64 NumPy on fresh random E4M3 inputs: R = 1, 5, 64; N not a multiple of the tile; K a
  multiple of 128 but not of the stage;
* the register -> (row, column) map of the epilogue's stores against Mosaic's WGMMA_LAYOUT;
* the schedule covers the H100's SMs at the Llama-3-8B decode shapes; clear errors;
* the compiled path lowers to Mosaic GPU for the H100 on CPU;
* ops: FP8Weight.linear_deferred / linear with the switch (kernel interpreted) equal the XLA path.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.mosaic.gpu import fragmented_array as fa

from jaxinfer import ops
from jaxinfer.errors import ShapeError
from kernels import fp8_decode_matmul_mgpu as fd

T = fd.DecodeTiling


def rand_e4m3(rng, shape, scale=1.0):
  return jnp.asarray((rng.standard_normal(shape) * scale).astype(ml_dtypes.float8_e4m3fn))


def f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


CASES = [
    # R, N, K, tiling: N=200 over tiles of 128 (clamped last tile), K=384 = 256 + a 128 tail
    (1, 200, 384, T(128, 1, 256, 2)),
    # split-K partials, each K range 384 = 256 + a 128 tail; R not a multiple of 8
    (5, 136, 768, T(64, 2, 256, 2)),
    # 4 steps through 2 slots (slot reuse), split 2, one step's wgmma kept in flight
    (64, 264, 1024, T(128, 2, 128, 2, wait_prev=True)),
    # pdl: the first stages' weight tiles requested up front (here all steps, the tail among them)
    (8, 192, 640, T(64, 1, 256, 4, pdl=2)),
    # rotated K walks (CTA n starts at step n mod 4), 3 N tiles
    (16, 192, 1024, T(64, 1, 256, 2, wait_prev=True, rotate=True)),
]


@pytest.mark.parametrize("r,n,k,tiling", CASES)
def test_matches_float64(rng, r, n, k, tiling):
  x, w = rand_e4m3(rng, (r, k)), rand_e4m3(rng, (n, k), 8.0)
  y = fd.fp8_decode_matmul(x, w, tiling=tiling, interpret=True)
  s = tiling.split_k
  assert y.shape == ((s, r, n) if s > 1 else (r, n))
  assert y.dtype == (jnp.float32 if s > 1 else jnp.bfloat16)
  yy = f64(y)
  assert np.all(np.isfinite(yy)), "unwritten (NaN-poisoned) output"
  xs, ws = f64(x).reshape(r, s, k // s), f64(w).reshape(n, s, k // s)
  ref = np.einsum("rsk,nsk->srn", xs, ws)
  if s == 1:                 # bf16 output: one rounding of the f32 sum
    np.testing.assert_allclose(yy, ref[0], rtol=2 ** -8, atol=1e-6 * np.abs(ref).max())
  else:                      # f32 partials: only the f32 accumulation
    np.testing.assert_allclose(yy, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  ref_jax = f64(fd.fp8_decode_reference(x, w, s))
  np.testing.assert_allclose(yy, ref_jax, rtol=2 ** -8, atol=1e-5 * np.abs(ref).max())


def test_epilogue_register_map():
  """Register (0, j, 0, 0, h, ...) of thread 32 w + l of Mosaic's WGMMA_LAYOUT ([64, 224], the
  widest non-power-of-two tile the schedule picks) holds row 16 w + 8 h + l // 4, columns
  8 j + 2 (l % 4) + (0, 1): the map _store_rows stores."""
  tiling = fa.WGMMA_LAYOUT.tiling
  strides = tiling.tile_strides((224, 1))
  assert tiling.tile_shape((64, 224)) == (1, 28, 4, 1, 2, 1, 8, 4, 2)
  assert fa.WGMMA_LAYOUT.registers_shape((64, 224)) == (1, 28, 1, 1, 2, 1, 1, 1, 1)
  for w, l, j, h, e in [(0, 0, 0, 0, 0), (3, 31, 27, 1, 1), (1, 6, 5, 1, 0), (2, 13, 17, 0, 1)]:
    flat = sum(i * s for i, s in zip((0, j, w, 0, h, 0, l // 4, l % 4, e), strides))
    assert divmod(flat, 224) == (16 * w + 8 * h + l // 4, 8 * j + 2 * (l % 4) + e)


LLAMA = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def test_default_tiling_fills_the_h100():
  for r in (1, 64):
    for n, k in LLAMA:
      t = fd.default_tiling(r, n, k)
      ctas = -(-n // t.tile_n) * t.split_k
      per_sm = 2 if fd.smem_bytes(t) <= 113 * 1024 else 1      # CTAs resident per SM
      assert 0.8 * 132 * per_sm <= ctas <= 132 * per_sm, (r, n, k, t, ctas)
      assert fd.smem_bytes(t) <= 227 * 1024 and not t.split_k & (t.split_k - 1)
      assert k % (128 * t.split_k) == 0
  assert fd.default_tiling(64, 28672, 4096).split_k == 1
  assert fd.default_tiling(64, 4096, 4096, max_split=1).split_k == 1


def test_bad_inputs_raise(rng):
  x, w = rand_e4m3(rng, (4, 256)), rand_e4m3(rng, (64, 256))
  with pytest.raises(ShapeError):
    fd.fp8_decode_matmul(x.astype(jnp.bfloat16), w, interpret=True)
  with pytest.raises(ShapeError):
    fd.fp8_decode_matmul(rand_e4m3(rng, (65, 256)), w, interpret=True)
  with pytest.raises(ShapeError):
    fd.fp8_decode_matmul(rand_e4m3(rng, (4, 200)), rand_e4m3(rng, (64, 200)), interpret=True)
  with pytest.raises(ShapeError):
    fd.fp8_decode_matmul(x, w, tiling=T(64, 4, 128, 2), interpret=True)   # 256 / 4 < 128
  with pytest.raises(ValueError):
    T(100, 1, 128, 2)
  assert not fd.supports(4, 60, 256) and fd.supports(64, 8, 128)


def test_lowers_for_hopper_on_cpu():
  cases = [(r, n, k, None) for r in (1, 64) for n, k in LLAMA]
  cases += [(5, 200, 384, T(128, 1, 256, 2)), (64, 6144, 4096, T(96, 2, 128, 8, wait_prev=True)),
            (64, 4096, 14336, T(128, 4, 128, 6, pdl=1)), (8, 192, 640, T(64, 1, 256, 4, pdl=2))]
  for r, n, k, t in cases:
    args = (jax.ShapeDtypeStruct((r, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn))
    fn = lambda a, b, t=t: fd.fp8_decode_matmul(a, b, tiling=t)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("split_rows", [0, 64])
def test_ops_switch_gives_the_xla_result(rng, monkeypatch, split_rows):
  """FP8Weight.linear_deferred / linear with ops.FP8_DECODE_KERNEL (kernel interpreted on CPU):
  the same output form (partials where the XLA path gives partials) and the same values up to
  the f32 summation order and the bf16 rounding of the unsplit product."""
  k, n, r = 1024, 136, 5
  w = ops.FP8Weight.from_dense(jnp.asarray(rng.standard_normal((k, n)), jnp.float32))
  x = jnp.asarray(rng.standard_normal((r, k)), jnp.bfloat16)
  monkeypatch.setattr(ops, "FP8_SPLIT_K_MAX_ROWS", split_rows)
  base = w.linear_deferred(x)
  base_y = w.linear(x)
  monkeypatch.setattr(ops, "FP8_DECODE_KERNEL", True)
  monkeypatch.setattr(ops, "FP8_DECODE_KERNEL_INTERPRET", True)
  calls = []
  orig = fd.fp8_decode_matmul
  monkeypatch.setattr(fd, "fp8_decode_matmul", lambda *a, **kw: calls.append(kw) or orig(*a, **kw))
  got = w.linear_deferred(x)
  got_y = w.linear(x)
  assert len(calls) == 2 and calls[0]["interpret"]
  assert got.partials == base.partials == (split_rows > 0)
  np.testing.assert_array_equal(f64(got.row_scale), f64(base.row_scale))
  a, b = f64(got.apply()), f64(base.apply())
  scale = np.abs(b).max()
  np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-5 * scale)
  np.testing.assert_allclose(f64(got_y), f64(base_y), rtol=2 ** -7, atol=1e-5 * scale)
  if split_rows:     # the unscaled f32 sums agree to f32 rounding
    np.testing.assert_allclose(f64(ops.sum_partials(got.raw)), f64(ops.sum_partials(base.raw)),
                               rtol=1e-5, atol=1e-5 * np.abs(f64(ops.sum_partials(base.raw))).max())
  # more rows than the kernel takes: the XLA path
  calls.clear()
  w.linear_deferred(jnp.asarray(rng.standard_normal((65, k)), jnp.bfloat16))
  assert not calls


def test_env_tiling_fields(monkeypatch):
  monkeypatch.setenv("JAXINFER_FP8_DECODE_TILING", "tile_k=256,l2_ahead=4,wait_prev=1")
  t = fd.default_tiling(64, 4096, 14336)
  assert (t.tile_k, t.l2_ahead, t.wait_prev) == (256, 4, True)
  assert fd.smem_bytes(t) <= 200 * 1024 + 1024
  assert fd.default_tiling(64, 4096, 14336, l2_ahead=0).l2_ahead == 0
  monkeypatch.setenv("JAXINFER_FP8_DECODE_TILING", "split_k=2")
  with pytest.raises(ValueError):
    fd.default_tiling(64, 4096, 14336)
