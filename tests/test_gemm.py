"""kernels/gemm: public low-bit ops on CPU (plain-JAX fallbacks) against float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import ops
from jaxinfer.errors import ShapeError
from kernels import gemm
from kernels.quant import (FP8BlockWeight, GroupedFP8BlockWeight, GroupedNVFP4Weight, NVFP4Weight,
                           fp8_block, nvfp4)


def f64(a):
  return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def rel(y, ref):
  y = f64(y)
  assert np.all(np.isfinite(y))
  return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def np_ragged(x, w_ekn, sizes):
  out = np.zeros((x.shape[0], w_ekn.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = x[start:start + size] @ w_ekn[g]
    start += size
  return out


def test_cpu_uses_reference_path():
  assert jax.default_backend() == "cpu" and not gemm._use_kernels()


def test_dense_ops_match_float64(rng):
  k, n = 256, 96
  w_kn = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((4, k)), jnp.bfloat16)
  w4 = NVFP4Weight.from_dense(w_kn)
  assert rel(jax.jit(gemm.nvfp4_matmul)(x, w4), f64(x) @ f64(w4.dequantize())) < 5e-3
  w8 = FP8BlockWeight.from_dense(w_kn)
  xq, xs = fp8_block.quantize_activations(x)
  x_deq = f64(fp8_block.dequantize_activations(xq, xs))
  assert rel(ops.linear(x, w8), x_deq @ f64(w8.dequantize())) < 5e-3


def test_w4a4_op_quantizes_with_input_scale(rng):
  k, n = 128, 64
  x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
  w = NVFP4Weight.from_dense(jnp.asarray(rng.standard_normal((k, n)), jnp.float32))
  w = NVFP4Weight(w.packed, w.scale, w.global_scale, nvfp4.global_scale_for(x) * 2)
  y = gemm.nvfp4_w4a4_matmul(x, w)
  xq, xs = gemm.quantize_nvfp4_activations(x, w.input_scale)
  ref = f64(nvfp4.dequantize(xq, xs, w.input_scale)) @ f64(w.dequantize())
  assert rel(y, ref) < 1e-6
  assert rel(y, f64(x) @ f64(w.dequantize())) < 0.2   # W4A4 is a coarse approximation of W4A16


def test_grouped_ops_match_float64(rng):
  t, e, k, n = 30, 4, 256, 48
  sizes = [10, 0, 15, 2]                                  # 3 trailing rows past the total
  gs = jnp.asarray(sizes, jnp.int32)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32)
  y = gemm.grouped_matmul(x, w.astype(jnp.bfloat16), gs)
  assert y.dtype == jnp.bfloat16 and y.shape == (t, n)
  assert rel(y, np_ragged(f64(x), f64(w.astype(jnp.bfloat16)), sizes)) < 5e-3
  assert np.all(f64(y)[27:] == 0)
  g4 = GroupedNVFP4Weight.from_dense(w)
  assert rel(gemm.grouped_matmul(x, g4, gs), np_ragged(f64(x), f64(g4.dequantize()), sizes)) < 5e-3
  g8 = GroupedFP8BlockWeight.from_dense(w)
  xq, xs = fp8_block.quantize_activations(x)
  x_deq = f64(fp8_block.dequantize_activations(xq, xs))
  assert rel(gemm.grouped_matmul(x, g8, gs), np_ragged(x_deq, f64(g8.dequantize()), sizes)) < 5e-3


def test_bad_weights_raise_shape_error(rng):
  x = jnp.ones((4, 128), jnp.bfloat16)
  with pytest.raises(ShapeError):
    gemm.grouped_matmul(x, jnp.ones((2, 128, 8), jnp.int32), jnp.ones((2,), jnp.int32))
  with pytest.raises(ShapeError):
    gemm.nvfp4_matmul(jnp.ones((4, 64)), NVFP4Weight.from_dense(jnp.ones((128, 16))))


def test_fp8_block_op_dispatches_to_mosaic_kernel_on_hopper(rng, monkeypatch):
  """On a (pretended) Hopper GPU at M >= MGPU_FP8_MIN_M the op runs the Mosaic GPU kernel (here
  in its interpreter), with 1x128-quantized activations."""
  calls = []
  kernel = gemm.fp8_mgpu_kernels.fp8_block_matmul

  def interpreted(*args, **kwargs):
    calls.append(args[0].shape)
    return kernel(*args, **kwargs, interpret=True)

  monkeypatch.setattr(gemm, "_gpu_capability", lambda: 9.0)
  monkeypatch.setattr(gemm, "MGPU_FP8_MIN_M", 8)
  monkeypatch.setattr(gemm.fp8_mgpu_kernels, "fp8_block_matmul", interpreted)
  k, n = 256, 128
  w8 = FP8BlockWeight.from_dense(jnp.asarray(rng.standard_normal((k, n)), jnp.float32))
  x = jnp.asarray(rng.standard_normal((20, k)), jnp.bfloat16)
  y = gemm.fp8_block_matmul(x, w8)
  assert calls == [(20, k)]
  xq, xs = fp8_block.quantize_activations(x)
  ref = f64(fp8_block.dequantize_activations(xq, xs)) @ f64(w8.dequantize())
  assert rel(y, ref) < 5e-3


def test_kernel_layout_weights_dispatch(rng, monkeypatch):
  """CPU: a kernel-layout weight gives the ModelOpt weight's result; on a (pretended) GPU the
  dense and grouped ops call the kernel-layout kernels (here interpreted)."""
  k, n = 512, 64
  w = NVFP4Weight.from_dense(jnp.asarray(rng.standard_normal((k, n)), jnp.float32))
  wk = w.to_kernel_layout()
  x = jnp.asarray(rng.standard_normal((3, k)), jnp.bfloat16)
  ref = f64(x) @ f64(w.dequantize())
  np.testing.assert_array_equal(f64(gemm.nvfp4_matmul(x, wk)), f64(gemm.nvfp4_matmul(x, w)))
  calls = []

  def spy(fn):
    def run(*args, **kwargs):
      calls.append(fn.__name__)
      return fn(*args, **kwargs, interpret=True)
    return run

  monkeypatch.setattr(gemm, "_gpu_capability", lambda: 9.0)
  monkeypatch.setattr(gemm, "KL_X_F16", False)
  monkeypatch.setattr(gemm, "KL_X_F16_DENSE", False)
  monkeypatch.setattr(gemm.nvfp4_kernels, "w4a16_matmul_kl",
                      spy(gemm.nvfp4_kernels.w4a16_matmul_kl))
  monkeypatch.setattr(gemm.grouped_kernels, "grouped_matmul_nvfp4_kl",
                      spy(gemm.grouped_kernels.grouped_matmul_nvfp4_kl))
  assert rel(gemm.nvfp4_matmul(x, wk), ref) < 5e-3
  gw = GroupedNVFP4Weight.from_dense(jnp.asarray(rng.standard_normal((3, k, n)), jnp.float32))
  sizes = [2, 0, 4]
  xg = jnp.asarray(rng.standard_normal((6, k)), jnp.bfloat16)
  y = gemm.grouped_matmul(xg, gw.to_kernel_layout(), jnp.asarray(sizes, jnp.int32))
  assert rel(y, np_ragged(f64(xg), f64(gw.dequantize()), sizes)) < 5e-3
  assert calls == ["w4a16_matmul_kl", "grouped_matmul_nvfp4_kl"]
  # KL_X_F16(_DENSE): x reaches both kernels as f16, results bit-identical, outputs still bf16
  calls.clear()
  monkeypatch.setattr(gemm, "KL_X_F16", True)
  monkeypatch.setattr(gemm, "KL_X_F16_DENSE", True)
  seen = []
  for name in ("w4a16_matmul_kl", "grouped_matmul_nvfp4_kl"):
    fn = getattr(gemm.nvfp4_kernels if name.startswith("w4") else gemm.grouped_kernels, name)

    def record(*args, fn=fn, **kwargs):
      seen.append(args[0].dtype)
      return fn(*args, **kwargs)
    monkeypatch.setattr(gemm.nvfp4_kernels if name.startswith("w4") else gemm.grouped_kernels,
                        name, record)
  y16 = gemm.nvfp4_matmul(x, wk)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(f64(y16), f64(gemm.nvfp4_matmul(x, wk)))
  yg16 = gemm.grouped_matmul(xg, gw.to_kernel_layout(), jnp.asarray(sizes, jnp.int32))
  np.testing.assert_array_equal(f64(yg16), f64(y))
  assert len(seen) == 3 and all(d == jnp.float16 for d in seen)


@pytest.mark.parametrize("fused", [False, True])
def test_grouped_swiglu_matches_float64(rng, monkeypatch, fused):
  """silu(x Wg) * (x Wu): the two-call form on CPU, and with FUSED_SWIGLU on a (pretended) GPU
  the fused kernel-layout kernel (interpreted) for kernel-layout weights only."""
  t, e, k, n = 14, 3, 512, 64
  sizes = [5, 0, 7]                                       # 2 trailing rows past the total
  gs = jnp.asarray(sizes, jnp.int32)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
  wg = GroupedNVFP4Weight.from_dense(jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32))
  wu = GroupedNVFP4Weight.from_dense(jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32))
  g = np_ragged(f64(x), f64(wg.dequantize()), sizes)
  ref = g / (1 + np.exp(-g)) * np_ragged(f64(x), f64(wu.dequantize()), sizes)
  calls = []
  if fused:
    kernel = gemm.grouped_kernels.grouped_swiglu_nvfp4_kl

    def spy(*args, **kwargs):
      calls.append("fused")
      return kernel(*args, **kwargs, interpret=True)
    monkeypatch.setattr(gemm, "FUSED_SWIGLU", True)
    monkeypatch.setattr(gemm, "_gpu_capability", lambda: 9.0)
    monkeypatch.setattr(gemm.grouped_kernels, "grouped_swiglu_nvfp4_kl", spy)
    monkeypatch.setattr(gemm.grouped_kernels, "grouped_matmul_nvfp4_kl",
                        lambda *a, **kw: gemm.grouped_kernels.grouped_nvfp4_kl_reference(*a))
    monkeypatch.setattr(gemm.grouped_kernels, "grouped_matmul_nvfp4",
                        lambda *a, **kw: gemm.grouped_kernels.grouped_nvfp4_reference(*a))
  for a, b in [(wg.to_kernel_layout(), wu.to_kernel_layout()), (wg, wu)]:
    y = gemm.grouped_swiglu(x, a, b, gs)
    assert y.dtype == jnp.bfloat16 and y.shape == (t, n)
    assert rel(y, ref) < 1e-2
    assert np.all(f64(y)[12:] == 0)
  assert calls == (["fused"] if fused else [])     # ModelOpt-layout weights: never fused
  if fused:   # more rows per group than FUSED_SWIGLU_MAX_ROWS_PER_GROUP: the two-call form
    monkeypatch.setattr(gemm, "FUSED_SWIGLU_MAX_ROWS_PER_GROUP", 4)
    y = gemm.grouped_swiglu(x, wg.to_kernel_layout(), wu.to_kernel_layout(), gs)
    assert rel(y, ref) < 1e-2 and calls == ["fused"]
