"""FP8 E4M3 block scaling as in DeepSeek-V3 checkpoints.

Weights: ``weight`` float8_e4m3fn [..., N, K] ([out_features, in_features], K contiguous) and
``weight_scale_inv`` float32 [..., ceil(N/128), ceil(K/128)], one scale per 128x128 block:

  dequant(w)[n, k] = float(weight[n, k]) * weight_scale_inv[n // 128, k // 128]

Activations: 1x128 blocks along K, quantized on the fly: x_fp8 [M, K], x_scale f32 [M, K/128] with
x[m, k] ~= x_fp8[m, k] * x_scale[m, k // 128] and x_scale = amax(block) / 448.
Plain JAX (XLA) only; the GEMMs live in ``kernels/fp8_block_matmul.py``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinfer.errors import ShapeError

BLOCK = 128
E4M3_MAX = 448.0


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


@jax.jit
def quantize_weight(w_nk: jax.Array) -> tuple[jax.Array, jax.Array]:
  """w [..., N, K] -> (float8_e4m3fn [..., N, K], scale_inv f32 [..., ceil(N/128), ceil(K/128)])."""
  *lead, n, k = w_nk.shape
  nb, kb = _cdiv(n, BLOCK), _cdiv(k, BLOCK)
  w32 = w_nk.astype(jnp.float32)
  pad = [(0, 0)] * len(lead) + [(0, nb * BLOCK - n), (0, kb * BLOCK - k)]
  blocks = jnp.pad(w32, pad).reshape(*lead, nb, BLOCK, kb, BLOCK)
  amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))
  scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
  q = (blocks / scale[..., :, None, :, None]).astype(jnp.float8_e4m3fn)
  q = q.reshape(*lead, nb * BLOCK, kb * BLOCK)[..., :n, :k]
  return q, scale.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize_weight(w: jax.Array, scale_inv: jax.Array, dtype=jnp.float32) -> jax.Array:
  check_weight_layout(w, scale_inv)
  *lead, n, k = w.shape
  s = jnp.repeat(jnp.repeat(scale_inv, BLOCK, axis=-2), BLOCK, axis=-1)[..., :n, :k]
  return (w.astype(jnp.float32) * s).astype(dtype)


@jax.jit
def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., K] (K % 128 == 0) -> (float8_e4m3fn [..., K], f32 scales [..., K/128])."""
  k = x.shape[-1]
  if k % BLOCK:
    raise ShapeError(f"FP8 1x128 activation blocks need K % 128 == 0, got K={k}")
  blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], k // BLOCK, BLOCK)
  amax = jnp.max(jnp.abs(blocks), axis=-1)
  scale = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
  q = (blocks / scale[..., None]).astype(jnp.float8_e4m3fn).reshape(x.shape)
  # Keeps XLA:GPU from eliding the e4m3 rounding when a caller's jit widens q again
  # (it folds convert(convert(v, narrow), wide), openxla/xla#41605).
  return jax.lax.optimization_barrier((q, scale))


@jax.jit
def dequantize_activations(q: jax.Array, scale: jax.Array) -> jax.Array:
  k = q.shape[-1]
  return (q.astype(jnp.float32).reshape(*q.shape[:-1], k // BLOCK, BLOCK)
          * scale[..., None]).reshape(q.shape)


def check_weight_layout(w: jax.Array, scale_inv: jax.Array) -> None:
  if w.dtype != jnp.float8_e4m3fn:
    raise ShapeError(f"FP8 block weight must be float8_e4m3fn, got {w.dtype}")
  if scale_inv.dtype != jnp.float32:
    raise ShapeError(f"FP8 weight_scale_inv must be float32, got {scale_inv.dtype}")
  *lead, n, k = w.shape
  want = (*lead, _cdiv(n, BLOCK), _cdiv(k, BLOCK))
  if scale_inv.shape != want:
    raise ShapeError(f"weight_scale_inv shape {scale_inv.shape} does not match weight {w.shape} "
                     f"(expected {want})")
