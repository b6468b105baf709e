"""FP8 E4M3 block-scaled GEMM (DeepSeek-V3 scheme) in Pallas (Triton lowering), FP8 MMA.

y[M, N] = sum_kb (xq[:, kb] @ wq[:, kb]^T) * x_scale[:, kb] * w_scale_inv[n // 128, kb]

Layouts (kernels/quant/fp8_block.py): x quantized on the fly into 1x128 blocks (xq e4m3 [M, K],
x_scale f32 [M, K/128]); weight e4m3 [N, K] (K contiguous, the K-major B operand that Hopper's fp8
wgmma wants) with weight_scale_inv f32 [ceil(N/128), ceil(K/128)].

Kernel: grid (cdiv(M, bm), cdiv(N, bn)); the K loop steps exactly one 128-wide scale block, so
each step is one fp8 MMA into a fresh f32 tile, rescaled by the outer product of the row scales and
the (one or two) weight block scales and added to the f32 accumulator (DeepGEMM's "promotion"
idea, here per 128-K step). K must be a multiple of 128; rows past M and columns past N are masked.

Target roofline (H100): M = N = K = 8192 is 1.1 PFLOP -> ~1.35 ms at the measured ~820 TFLOP/s
fp8 rate; the per-step rescale adds ~bm*bn FMAs per 128-deep MMA (<1% of the MMA work) but
serializes the accumulator, and the activation quantization is one extra XLA pass over x
(3 bytes/element).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError
from kernels.quant import fp8_block

BK = fp8_block.BLOCK


@dataclasses.dataclass(frozen=True)
class Tiling:
  block_m: int = 128
  block_n: int = 128
  num_warps: int = 8
  num_stages: int = 4


def default_tiling(m: int, n: int, k: int) -> Tiling:
  if m <= 64:
    return Tiling(16 if m <= 16 else 64, 64, 4, 4)
  return Tiling(128, 128, 8, 4)


def weight_scale_row(ws_row_ref_at, n0, bn: int, n: int) -> jax.Array:
  """Weight block scales for columns n0 .. n0+bn of one K block, as [bn] (bn <= 128 or 128*j)."""
  del n
  if bn <= BK:
    return jnp.broadcast_to(ws_row_ref_at(n0 // BK, 1).reshape(1), (bn,))
  nb = bn // BK
  s = ws_row_ref_at(n0 // BK, nb)
  return jnp.broadcast_to(s.reshape(nb, 1), (nb, BK)).reshape(bn)


def _kernel(xq_ref, xs_ref, w_ref, ws_ref, o_ref, *, m, n, bm, bn, k_steps):
  pid_m, pid_n = pl.program_id(0), pl.program_id(1)
  m0, n0 = pid_m * bm, pid_n * bn
  row_ok = (m0 + jnp.arange(bm)) < m
  col_ok = (n0 + jnp.arange(bn)) < n

  def body(i, acc):
    k0 = pl.multiple_of(i * BK, BK)
    a = plgpu.load(xq_ref.at[pl.ds(m0, bm), pl.ds(k0, BK)], mask=row_ok[:, None])
    a_s = plgpu.load(xs_ref.at[pl.ds(m0, bm), i], mask=row_ok, other=0)
    if n % bn:
      b = plgpu.load(w_ref.at[pl.ds(n0, bn), pl.ds(k0, BK)], mask=col_ok[:, None])
    else:
      b = w_ref[pl.ds(n0, bn), pl.ds(k0, BK)]
    b_s = weight_scale_row(lambda j, c: ws_ref[pl.ds(j, c), i], n0, bn, n)
    part = plgpu.dot(a, b, trans_b=True)
    return acc + part * (a_s[:, None] * b_s[None, :])

  acc = jax.lax.fori_loop(0, k_steps, body, jnp.zeros((bm, bn), jnp.float32))
  plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype),
              mask=row_ok[:, None] & col_ok[None, :])


def check_shapes(k: int, weight: jax.Array, scale_inv: jax.Array, grouped: bool = False) -> None:
  fp8_block.check_weight_layout(weight, scale_inv)
  if weight.ndim != (3 if grouped else 2):
    raise ShapeError(f"FP8 weight must be {'[E, N, K]' if grouped else '[N, K]'}, got {weight.shape}")
  if weight.shape[-1] != k:
    raise ShapeError(f"x has K={k} but the FP8 weight has K={weight.shape[-1]}")
  if k % BK:
    raise ShapeError(f"FP8 block-scaled GEMM needs K % 128 == 0, got K={k}")


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def fp8_block_matmul(x: jax.Array, weight: jax.Array, scale_inv: jax.Array, *,
                     tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """x [M, K] (bf16/f32) @ FP8 W [N, K]^T -> [M, N] in x's dtype; x quantized 1x128 on the fly."""
  if x.ndim != 2:
    raise ShapeError(f"x must be [M, K], got {x.shape}")
  m, k = x.shape
  check_shapes(k, weight, scale_inv)
  n = weight.shape[0]
  t = tiling or default_tiling(m, n, k)
  if n % t.block_n and t.block_n > BK:
    raise ShapeError(f"block_n {t.block_n} > 128 needs N % block_n == 0 (N={n})")
  xq, xs = fp8_block.quantize_activations(x)
  return pl.pallas_call(
      functools.partial(_kernel, m=m, n=n, bm=t.block_m, bn=t.block_n, k_steps=k // BK),
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(pl.cdiv(m, t.block_m), pl.cdiv(n, t.block_n)), interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      name="fp8_block_matmul",
  )(xq, xs, weight, scale_inv)


def fp8_block_reference(x: jax.Array, weight: jax.Array, scale_inv: jax.Array) -> jax.Array:
  """Plain JAX: the same 1x128 activation quantization, f32 math (the CPU fallback)."""
  xq, xs = fp8_block.quantize_activations(x)
  xd = fp8_block.dequantize_activations(xq, xs)
  w = fp8_block.dequantize_weight(weight, scale_inv, jnp.float32)
  return jnp.einsum("mk,nk->mn", xd, w, precision="highest").astype(x.dtype)
