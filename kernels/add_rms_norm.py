"""Residual add + RMSNorm in one Pallas Triton kernel: (x, y, w) -> (x + y, RMSNorm(x + y) * w).

Layout: x, y [T, H] (the residual stream and a block's output, same dtype), w [H]. Outputs
s = x + y (rounded to x's dtype, the new residual) and h = w * (s * rsqrt(mean(s^2) + eps)), the
normalisation in float32 from the rounded s, the product in x's dtype, as ``jaxinfer.ops.rms_norm``
computes it (``reference`` below).

Why: XLA:GPU runs the residual add and the following RMSNorm as two kernels (the sum has two users:
the norm and the next residual add, so it is not fused into the normalisation fusion). In a
weight-bound decode step each is a ~2 us launch over a few KB: two per layer, 64 per Llama-3-8B step
plus their inter-kernel gaps. This kernel does both in one.

Tiling: grid (T,), one program per row, the whole row (H a power of two) in registers: H / (32 *
num_warps) values per thread (16 at H = 4096, 8 warps), so no spills; T programs spread a decode
step's few rows over as many SMs. Roofline: reads 2 T H, writes 2 T H elements: at T = 8, H = 4096
in bf16 that is 256 KB, far under a microsecond of HBM time: the kernel is launch-bound like the two
it replaces.

``add_rms_norm_fp8``: the same, with the normed rows also quantized for an FP8 (W8A8) projection,
as ``jaxinfer.ops.FP8Weight.linear`` quantizes its input (``reference_fp8``): per row
sx = max(amax(h), tiny) / 448 and E4M3(clip(h / sx)), h rounded to x's dtype first. Outputs s, the
E4M3 rows [T, H] and sx [T, 1] f32 (h itself is not written). It replaces three kernels (this one,
XLA's row-amax reduction and its scale-and-cast fusion) in front of each FP8 projection that follows
a norm (wqkv, w_gate_up). Same grid and tiling; writes T H bytes of E4M3 instead of 2 T H of h.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError

def reference(x: jax.Array, y: jax.Array, w: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Plain JAX: the residual sum and its RMSNorm, as two XLA ops."""
  s = (x.astype(jnp.float32) + y.astype(jnp.float32)).astype(x.dtype)
  s32 = s.astype(jnp.float32)
  normed = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
  return s, w.astype(x.dtype) * normed.astype(x.dtype)


def reference_fp8(x: jax.Array, y: jax.Array, w: jax.Array, eps: float
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Plain JAX: (x + y, E4M3 rows of RMSNorm(x + y) * w, their f32 scales [T, 1]), the rows
  quantized as ``jaxinfer.ops.FP8Weight.linear`` quantizes its input."""
  from jaxinfer.ops import quantize_rows_fp8
  s, h = reference(x, y, w, eps)
  return (s, *quantize_rows_fp8(h))


def supports(x: jax.Array, y: jax.Array, w: jax.Array) -> bool:
  """2-D x and y of one float dtype, H a power of two >= 16 (one Triton block per row)."""
  h = x.shape[-1]
  return (x.ndim == 2 and y.shape == x.shape and w.shape == (h,) and x.dtype == y.dtype
          and jnp.issubdtype(x.dtype, jnp.floating) and h >= 16 and not h & (h - 1))


def _kernel(x_ref, y_ref, w_ref, s_ref, h_ref, *, eps: float):
  s = (x_ref[...].astype(jnp.float32) + y_ref[...].astype(jnp.float32)).astype(s_ref.dtype)
  s_ref[...] = s
  s32 = s.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
  normed = (s32 * inv).astype(h_ref.dtype).astype(jnp.float32)
  w = w_ref[...].astype(h_ref.dtype).astype(jnp.float32)
  h_ref[...] = (w[None, :] * normed).astype(h_ref.dtype)


def _kernel_fp8(x_ref, y_ref, w_ref, s_ref, q_ref, sx_ref, *, eps: float, tiny: float,
                e4m3_max: float):
  s = (x_ref[...].astype(jnp.float32) + y_ref[...].astype(jnp.float32)).astype(s_ref.dtype)
  s_ref[...] = s
  s32 = s.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
  normed = (s32 * inv).astype(s_ref.dtype).astype(jnp.float32)
  w = w_ref[...].astype(s_ref.dtype).astype(jnp.float32)
  h = (w[None, :] * normed).astype(s_ref.dtype).astype(jnp.float32)    # h as the unfused path has it
  sx = jnp.maximum(jnp.max(jnp.abs(h), axis=-1, keepdims=True), tiny) / e4m3_max
  q_ref[...] = jnp.clip(h / sx, -e4m3_max, e4m3_max).astype(q_ref.dtype)
  sx_ref[...] = sx


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm_fp8(x: jax.Array, y: jax.Array, w: jax.Array, *, eps: float,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x + y, E4M3 rows of RMSNorm(x + y) * w [T, H], f32 row scales [T, 1]); see the module
  docstring."""
  from jaxinfer.ops import _TINY_AMAX, E4M3_MAX
  if not supports(x, y, w):
    raise ShapeError(f"add_rms_norm_fp8 takes x, y [T, H] of one float dtype with H a power of two "
                     f"and w [H]; got {x.shape} {x.dtype}, {y.shape} {y.dtype}, {w.shape}")
  T, H = x.shape
  block = pl.BlockSpec((1, H), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(_kernel_fp8, eps=eps, tiny=_TINY_AMAX, e4m3_max=E4M3_MAX),
      grid=(T,),
      in_specs=[block, block, pl.BlockSpec((H,), lambda i: (0,))],
      out_specs=[block, block, pl.BlockSpec((1, 1), lambda i: (i, 0))],
      out_shape=[jax.ShapeDtypeStruct((T, H), x.dtype),
                 jax.ShapeDtypeStruct((T, H), jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct((T, 1), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=min(8, max(1, H // 512)), num_stages=1),
      interpret=interpret,
      name="add_rms_norm_fp8",
  )(x, y, w)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(x: jax.Array, y: jax.Array, w: jax.Array, *, eps: float,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """(x + y, RMSNorm(x + y) * w) for x, y [T, H], w [H]; see the module docstring."""
  if not supports(x, y, w):
    raise ShapeError(f"add_rms_norm takes x, y [T, H] of one float dtype with H a power of two "
                     f"and w [H]; got {x.shape} {x.dtype}, {y.shape} {y.dtype}, {w.shape}")
  T, H = x.shape
  block = pl.BlockSpec((1, H), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(_kernel, eps=eps),
      grid=(T,),
      in_specs=[block, block, pl.BlockSpec((H,), lambda i: (0,))],
      out_specs=[block, block],
      out_shape=[jax.ShapeDtypeStruct((T, H), x.dtype)] * 2,
      compiler_params=plgpu.CompilerParams(num_warps=min(8, max(1, H // 512)), num_stages=1),
      interpret=interpret,
      name="add_rms_norm",
  )(x, y, w)
