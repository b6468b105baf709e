"""Public low-bit GEMM ops: pick a Pallas kernel by backend and shape, plain JAX on CPU.

  nvfp4_matmul(x [M, K], NVFP4Weight)                 -> [M, N]   (W4A16)
  nvfp4_w4a4_matmul(x [M, K], NVFP4Weight)            -> [M, N]   (x quantized to NVFP4 first)
  quantize_nvfp4_activations(x [M, K], global_scale)  -> (packed [M, K/2], scales [M, K/16])
  fp8_block_matmul(x [M, K], FP8BlockWeight)          -> [M, N]
  grouped_matmul(x [T, K], w, group_sizes [E])        -> [T, N]   (jax.lax.ragged_dot semantics;
      w: float [E, K, N], GroupedNVFP4Weight or GroupedFP8BlockWeight)

Outputs are in x's dtype. On GPU the kernels in kernels/{nvfp4,fp8_block,grouped}_matmul.py run
(Pallas Triton lowering, compute capability >= 8.9 for the fp8 conversions); elsewhere the plain-JAX
references. The dense NVFP4 / FP8 ops at M >= PREFILL_DEQUANT_M rows dequantize the weight to x's
dtype and call XLA's dot, which measured faster than the fused kernels (benchmarks/gemm.md).

NVFP4 weights in the kernel layout (kernels/quant/weights: NVFP4Weight.to_kernel_layout, a one-time
repack; K % 256 == 0) run the kernel-layout decode kernels (nvfp4_matmul.w4a16_matmul_kl,
grouped_matmul.grouped_matmul_nvfp4_kl: the fastest, 1.4-2.0x XLA's bf16 dot at M <= 32 and
2.3-3.1x ragged_dot on the H100, benchmarks/gemm.md); call it once on load for decode serving.
Weights in the Mosaic GPU layout (NVFP4Weight.to_mgpu_layout) run
kernels/nvfp4_matmul_mgpu.w4a16_matmul_mgpu on Hopper (compute capability 9.0) up to
MGPU_DECODE_MAX_M rows, and dequantize + XLA's dot otherwise (other GPUs, larger M); grouped ones
(GroupedNVFP4Weight.to_mgpu_layout) kernels/grouped_nvfp4_matmul_mgpu.grouped_w4a16_mgpu on
Hopper up to MGPU_GROUPED_MAX_ROWS_PER_GROUP rows per group on average.
ModelOpt-layout weights run the original kernels: dense decode (M <= 64) on the PTX "asm" route
with the even/odd x split (kernels.nvfp4_matmul.DECODE_DEQUANT / DECODE_EVEN_ODD), grouped decode
on kernels.grouped_matmul.DECODE_DEQUANT ("f32", bf16 MMA). Every f16 route (the kernel layout's,
"asm", "e4m3", "f16") casts x to f16 for the MMA: activations must then stay within
|x| <= 65504 (larger ones give inf); on the ModelOpt-layout kernels DECODE_X_SCALE lifts that
(exact per-row power-of-two prescale, one extra reduction over x per call).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.errors import ShapeError
from kernels import fp8_block_matmul as fp8_kernels
from kernels import fp8_block_matmul_mgpu as fp8_mgpu_kernels
from kernels import grouped_matmul as grouped_kernels
from kernels import grouped_nvfp4_matmul_mgpu as grouped_mgpu_kernels
from kernels import nvfp4_matmul as nvfp4_kernels
from kernels import nvfp4_matmul_mgpu as nvfp4_mgpu_kernels
from kernels.quant import fp8_block, nvfp4
from kernels.quant.weights import (FP8BlockWeight, GroupedFP8BlockWeight, GroupedNVFP4Weight,
                                   NVFP4Weight)

# Rows from which the dense ops dequantize the weight to x's dtype once and call XLA's dot instead
# of the fused kernel (GPU only). From the H100 run (benchmarks/gemm.md): at M=8192 the fused
# kernels reached 317 (NVFP4) / 288 (FP8) TFLOP/s, dequantize+dot 688 vs 741 for the bf16 dot;
# the dequantization costs ~90 us per 4096x14336 weight, so the crossover is a few hundred rows.
# None: always the fused kernel.
PREFILL_DEQUANT_M: int | None = 512

# Rows from which the dense FP8 block op runs the Mosaic GPU kernel (wgmma, Hopper only) instead:
# 1136 TFLOP/s at 8192^3 (1.45x XLA's bf16 dot, benchmarks/fp8_block.md). Unlike the dequantize
# path it quantizes x 1x128 to E4M3 first, as DeepSeek-V3's own recipe does.
MGPU_FP8_MIN_M: int = 512

# Fused gate/up projections for MoE experts (grouped_swiglu below): one kernel computing
# silu(x Wg) * (x Wu) when both weights are NVFP4 in the kernel layout (GPU only), always fed
# x in f16 on its f16 routes. H100, DeepSeek-V3 decode B=64 (benchmarks/deepseek.md, 22:27 UTC
# window): 1467 us for both projections vs 2 x 758 us as two grouped calls; fed bf16 x it was
# 1831 us (the in-loop x conversions dominate), hence the f16 cast is part of this path.
FUSED_SWIGLU: bool = True
# ... at decode-sized groups only (rows / groups <= this: 16-row tiles), where it was measured;
# larger groups (prefill) keep the two grouped calls.
FUSED_SWIGLU_MAX_ROWS_PER_GROUP: int = 16
# Kernel-layout grouped kernels on an f16 route get x cast to f16 by XLA (fused into its
# producer) instead of converting every x tile in the K loop (grouped_matmul.x_for_kl;
# bit-identical). Same window: grouped gate 758 vs 769 us, down 744 vs 760 us.
KL_X_F16: bool = True
# The same for the dense kernel-layout decode kernel: off. H100, 23:27 UTC window (bench_gemm
# x16in, float64-checked): mixed, 21.4 -> 27.1 us at M=8 K=4096 N=14336 and 39.4 -> 53.0 us at
# M=64 K=14336 N=4096, 24.9 -> 24.2 / 39.8 -> 37.9 us at the two others.
KL_X_F16_DENSE: bool = False
# Rows up to which a weight in the Mosaic GPU layout runs the Mosaic decode kernel (the range it
# was measured in: M = 1..64, benchmarks/gemm.md); above, dequantize + XLA's dot.
MGPU_DECODE_MAX_M: int = 64
# Mean rows per group up to which a GroupedNVFP4Weight in the Mosaic GPU layout
# (GroupedNVFP4Weight.to_mgpu_layout) runs the grouped Mosaic decode kernel
# (kernels/grouped_nvfp4_matmul_mgpu, 8-row chunks) on Hopper; above, and on other GPUs, the
# ModelOpt-layout grouped kernel on the bytes the records hold (an unpack per call: repack to
# "kernel" instead). H100, 2026-11-24 window 3 (benchmarks/gemm.md, float64-checked), T=64
# E=32 K=7168 N=2048: uniform 96.9 us vs 126.0 us for the Triton kernel-layout default (3.54x
# ragged_dot), skewed 71.8 vs 81.0 us (4.78x); measured at 2 rows per group on average, so the
# bound is the 8-row chunk.
MGPU_GROUPED_MAX_ROWS_PER_GROUP: int = 8


def _gpu_capability() -> float | None:
  """Compute capability (e.g. 9.0) when the default backend is a CUDA GPU, else None."""
  if jax.default_backend() != "gpu":
    return None
  cc = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return float(cc)
  except (TypeError, ValueError):
    return None


def _use_kernels() -> bool:
  cc = _gpu_capability()
  return cc is not None and cc >= 8.9


def nvfp4_matmul(x: jax.Array, w: NVFP4Weight) -> jax.Array:
  """W4A16; a weight in the kernel layout (NVFP4Weight.to_kernel_layout) runs the decode kernel
  nvfp4_matmul.w4a16_matmul_kl below PREFILL_DEQUANT_M rows, one in the Mosaic GPU layout
  (to_mgpu_layout) nvfp4_matmul_mgpu.w4a16_matmul_mgpu on Hopper up to MGPU_DECODE_MAX_M rows."""
  if x.ndim != 2 or x.shape[1] != w.k:
    raise ShapeError(f"x must be [M, K={w.k}], got {x.shape}")
  if not _use_kernels():
    return nvfp4_kernels.w4a16_reference(x, w.modelopt_packed(), w.scale, w.global_scale)
  mgpu = w.layout == "mgpu"
  if mgpu and _gpu_capability() == 9.0 and x.shape[0] <= MGPU_DECODE_MAX_M:
    return nvfp4_mgpu_kernels.w4a16_matmul_mgpu(x, w.packed, w.global_scale, n=w.n)
  if mgpu or (PREFILL_DEQUANT_M is not None and x.shape[0] >= PREFILL_DEQUANT_M):
    wd = nvfp4.dequantize(w.modelopt_packed(), w.scale, w.global_scale, x.dtype)
    return jnp.einsum("mk,nk->mn", x, wd, preferred_element_type=jnp.float32).astype(x.dtype)
  if w.layout == "kernel":
    if KL_X_F16_DENSE and x.dtype == jnp.bfloat16:
      t = nvfp4_kernels.default_kl_tiling(x.shape[0], w.n, w.k)
      if t.dequant != "f32":    # f16 route: cast x once here (fused into its producer by XLA)
        return nvfp4_kernels.w4a16_matmul_kl(x.astype(jnp.float16), w.packed, w.scale,
                                             w.global_scale, tiling=t, out_dtype=x.dtype)
    return nvfp4_kernels.w4a16_matmul_kl(x, w.packed, w.scale, w.global_scale)
  return nvfp4_kernels.w4a16_matmul(x, w.packed, w.scale, w.global_scale)


def quantize_nvfp4_activations(x: jax.Array, global_scale: jax.Array
                               ) -> tuple[jax.Array, jax.Array]:
  if _use_kernels():
    return nvfp4_kernels.quantize_activations(x, global_scale)
  return nvfp4_kernels.quantize_activations_reference(x, global_scale)


def nvfp4_w4a4_matmul(x: jax.Array, w: NVFP4Weight) -> jax.Array:
  """W4A4: x quantized with the weight's calibrated ``input_scale`` (amax(x)/2688 if absent)."""
  if x.ndim != 2 or x.shape[1] != w.k:
    raise ShapeError(f"x must be [M, K={w.k}], got {x.shape}")
  x_gs = w.input_scale if w.input_scale is not None else nvfp4.global_scale_for(x)
  w = w.to_modelopt_layout()
  xq, xs = quantize_nvfp4_activations(x, x_gs)
  cc = _gpu_capability()
  if cc is not None and cc >= 10.0:
    return nvfp4_kernels.w4a4_blackwell(xq, xs, x_gs, w.packed, w.scale, w.global_scale,
                                        out_dtype=x.dtype)
  if _use_kernels():
    return nvfp4_kernels.w4a4_matmul(xq, xs, x_gs, w.packed, w.scale, w.global_scale,
                                     out_dtype=x.dtype)
  return nvfp4_kernels.w4a4_reference(xq, xs, x_gs, w.packed, w.scale, w.global_scale,
                                      out_dtype=x.dtype)


def fp8_block_matmul(x: jax.Array, w: FP8BlockWeight) -> jax.Array:
  if x.ndim != 2 or x.shape[1] != w.k:
    raise ShapeError(f"x must be [M, K={w.k}], got {x.shape}")
  if not _use_kernels():
    return fp8_kernels.fp8_block_reference(x, w.weight, w.scale_inv)
  m, n = x.shape[0], w.weight.shape[0]
  if (_gpu_capability() == 9.0 and m >= MGPU_FP8_MIN_M
      and fp8_mgpu_kernels.supported(m, n, w.k)):
    return fp8_mgpu_kernels.fp8_block_matmul(x, w.weight, w.scale_inv)
  if PREFILL_DEQUANT_M is not None and x.shape[0] >= PREFILL_DEQUANT_M:
    # No activation quantization on this path: x stays in its own precision (more accurate).
    wd = fp8_block.dequantize_weight(w.weight, w.scale_inv, x.dtype)
    return jnp.einsum("mk,nk->mn", x, wd, preferred_element_type=jnp.float32).astype(x.dtype)
  return fp8_kernels.fp8_block_matmul(x, w.weight, w.scale_inv)




def grouped_swiglu(x: jax.Array, w_gate, w_up, group_sizes: jax.Array) -> jax.Array:
  """silu(grouped_matmul(x, w_gate)) * grouped_matmul(x, w_up) -> [T, N] in x's dtype: the MoE
  experts' gate/up half. With FUSED_SWIGLU, on GPU, for two kernel-layout GroupedNVFP4Weight of
  equal shape and decode-sized groups it is one kernel (grouped_matmul.grouped_swiglu_nvfp4_kl:
  x read once and cast to f16 once, no [T, N] intermediates, f32 epilogue); otherwise the two
  grouped GEMMs and an XLA elementwise op."""
  if (FUSED_SWIGLU and _use_kernels() and isinstance(w_gate, GroupedNVFP4Weight)
      and isinstance(w_up, GroupedNVFP4Weight) and w_gate.layout == w_up.layout == "kernel"
      and w_gate.packed.shape == w_up.packed.shape
      and x.shape[0] <= FUSED_SWIGLU_MAX_ROWS_PER_GROUP * w_gate.num_groups):
    t = grouped_kernels.default_kl_tiling(x.shape[0], w_gate.num_groups, w_gate.k, glu=True)
    return grouped_kernels.grouped_swiglu_nvfp4_kl(
        grouped_kernels.x_for_kl(x, t), w_gate.packed, w_gate.scale,
        w_gate.global_scale, w_up.packed, w_up.scale, w_up.global_scale, group_sizes, tiling=t,
        out_dtype=x.dtype)
  return jax.nn.silu(grouped_matmul(x, w_gate, group_sizes)) * grouped_matmul(x, w_up,
                                                                              group_sizes)


def grouped_matmul(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
  """ragged_dot(x [T, K], w, group_sizes [E]) -> [T, N] in x's dtype; rows past the total are 0."""
  gpu = _use_kernels()
  if isinstance(w, GroupedNVFP4Weight):
    if (gpu and w.layout == "mgpu" and _gpu_capability() == 9.0
        and x.shape[0] <= MGPU_GROUPED_MAX_ROWS_PER_GROUP * w.num_groups):
      return grouped_mgpu_kernels.grouped_w4a16_mgpu(x, w.packed, w.global_scale, group_sizes,
                                                     n=w.n)
    if w.layout == "mgpu":
      w = w.to_modelopt_layout()
    if gpu and w.layout == "kernel":
      t = grouped_kernels.default_kl_tiling(x.shape[0], w.num_groups, w.k)
      return grouped_kernels.grouped_matmul_nvfp4_kl(
          grouped_kernels.x_for_kl(x, t) if KL_X_F16 else x, w.packed, w.scale, w.global_scale,
          group_sizes, tiling=t, out_dtype=x.dtype)
    if gpu:
      return grouped_kernels.grouped_matmul_nvfp4(x, w.packed, w.scale, w.global_scale,
                                                  group_sizes)
    return grouped_kernels.grouped_nvfp4_reference(x, w.modelopt_packed(), w.scale,
                                                   w.global_scale, group_sizes)
  if isinstance(w, GroupedFP8BlockWeight):
    if gpu:
      return grouped_kernels.grouped_matmul_fp8(x, w.weight, w.scale_inv, group_sizes)
    return grouped_kernels.grouped_fp8_reference(x, w.weight, w.scale_inv, group_sizes)
  w = jnp.asarray(w)
  if w.ndim != 3 or not jnp.issubdtype(w.dtype, jnp.floating):
    raise ShapeError(f"grouped weight must be float [E, K, N] or a grouped quantized weight, "
                     f"got {w.dtype}{list(w.shape)}")
  if gpu:
    return grouped_kernels.grouped_matmul_dense(x, w, group_sizes)
  return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                            preferred_element_type=jnp.float32).astype(x.dtype)
