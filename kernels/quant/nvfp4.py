"""NVFP4: E2M1 values, one E4M3 scale per 16 contiguous elements along K, one FP32 scale per tensor.

Layout (byte-compatible with NVIDIA ModelOpt / TensorRT-LLM checkpoints; the contraction axis K is
always the last axis, so a Linear weight is stored [N, K] = [out_features, in_features]):

  ``weight``          uint8          [..., N, K // 2]   two E2M1 codes per byte: element 2i in the
                                                        low nibble, element 2i+1 in the high nibble
  ``weight_scale``    float8_e4m3fn  [..., N, K // 16]  block scale of elements 16j .. 16j+15
  ``weight_scale_2``  float32        scalar (per expert: [E])  per-tensor (global) scale
  ``input_scale``     float32        scalar             calibrated activation global scale (W4A4)

  dequant(w)[n, k] = e2m1(code[n, k]) * float(weight_scale[n, k // 16]) * weight_scale_2

E2M1 codes: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa; magnitudes
{0, 0.5, 1, 1.5, 2, 3, 4, 6}. The global scale is chosen as amax / (6 * 448) so that every block
scale amax_block / (6 * global) fits E4M3 (max 448). E2M1 x E4M3 products have at most 6
significant bits, so a dequantized element is exact in bf16 before the global scale.

Everything here is plain JAX (XLA); the fused Pallas activation quantizer lives in
``kernels/nvfp4_matmul.py``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinfer.errors import ShapeError

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0


def check_k(k: int) -> None:
  if k % BLOCK_SIZE:
    raise ShapeError(f"NVFP4 needs the contraction size K to be a multiple of {BLOCK_SIZE}, got {k}")


def global_scale_for(x: jax.Array) -> jax.Array:
  """FP32 per-tensor scale amax / (6 * 448) (ModelOpt's ``weight_scale_2`` / ``input_scale``)."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
  return jnp.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), 1.0).astype(jnp.float32)


def e2m1_codes(v: jax.Array) -> jax.Array:
  """Round float32 values (already divided by their scales) to E2M1 codes 0..15 (uint8), RNE, saturating."""
  f4 = jnp.clip(v, -E2M1_MAX, E2M1_MAX).astype(jnp.float4_e2m1fn)
  return jax.lax.bitcast_convert_type(f4, jnp.uint4).astype(jnp.uint8)


def e2m1_values(codes: jax.Array) -> jax.Array:
  """E2M1 codes (any integer dtype, 0..15) to float32."""
  return jax.lax.bitcast_convert_type(codes.astype(jnp.uint4), jnp.float4_e2m1fn).astype(jnp.float32)


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """[..., K] codes 0..15 to [..., K // 2] uint8, element 2i in the low nibble."""
  codes = codes.astype(jnp.uint8)
  return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """[..., K // 2] uint8 to [..., K] codes (uint8)."""
  lo = packed & 0xF
  hi = packed >> 4
  return jnp.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@jax.jit
def quantize(x: jax.Array, global_scale: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Quantize x [..., K] along its last axis.

  Returns (packed uint8 [..., K/2], block scales float8_e4m3fn [..., K/16], global scale f32 scalar).
  ``global_scale`` defaults to amax(x) / (6 * 448) over the whole array.
  """
  check_k(x.shape[-1])
  if global_scale is None:
    global_scale = global_scale_for(x)
  global_scale = jnp.asarray(global_scale, jnp.float32)
  x32 = x.astype(jnp.float32)
  blocks = x32.reshape(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
  amax = jnp.max(jnp.abs(blocks), axis=-1)
  scale = jnp.clip(amax / (E2M1_MAX * global_scale), 0.0, E4M3_MAX).astype(jnp.float8_e4m3fn)
  # The barrier keeps XLA:GPU from folding convert(convert(v, e4m3), f32) into v (it elides
  # narrowing casts, openxla/xla#41605), which would divide by the unrounded scale.
  denom = jax.lax.optimization_barrier(scale).astype(jnp.float32)[..., None] * global_scale
  q = jnp.where(denom > 0, blocks / jnp.where(denom > 0, denom, 1.0), 0.0)
  codes = e2m1_codes(q).reshape(x.shape)
  return pack_nibbles(codes), scale, global_scale


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(packed: jax.Array, scale: jax.Array, global_scale: jax.Array,
               dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`quantize`: [..., K/2] uint8, [..., K/16] e4m3, f32 scalar -> [..., K]."""
  check_layout(packed, scale)
  vals = e2m1_values(unpack_nibbles(packed))
  k = vals.shape[-1]
  blocks = vals.reshape(*vals.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)
  out = blocks * scale.astype(jnp.float32)[..., None]
  gs = jnp.asarray(global_scale, jnp.float32)
  gs = gs.reshape(gs.shape + (1,) * (out.ndim - gs.ndim))  # per-expert [E] scales broadcast
  return (out * gs).reshape(vals.shape).astype(dtype)


def check_layout(packed: jax.Array, scale: jax.Array) -> None:
  """Raise ShapeError unless (packed, scale) are a valid NVFP4 pair."""
  if packed.dtype != jnp.uint8:
    raise ShapeError(f"NVFP4 packed values must be uint8, got {packed.dtype}")
  if scale.dtype != jnp.float8_e4m3fn:
    raise ShapeError(f"NVFP4 block scales must be float8_e4m3fn, got {scale.dtype}")
  k = packed.shape[-1] * 2
  check_k(k)
  if scale.shape != (*packed.shape[:-1], k // BLOCK_SIZE):
    raise ShapeError(f"NVFP4 scale shape {scale.shape} does not match packed {packed.shape} "
                     f"(expected {(*packed.shape[:-1], k // BLOCK_SIZE)})")


# ----- kernel layout: the same bytes, K-permuted for the decode kernels -----
# Within each KERNEL_TILE-wide K tile t of a row, byte j (0 <= j < KERNEL_TILE / 2) holds element
# t*KERNEL_TILE + j in its low nibble and element t*KERNEL_TILE + KERNEL_TILE/2 + j in its high
# nibble. The decode kernel then dequantizes the low and the high nibbles of one byte tile into
# two K-contiguous halves, each dotted with a contiguous slice of x (no interleave, no x shuffle).
# Block scales keep the ModelOpt layout. The permutation is a one-time repack (to_kernel_layout)
# and is undone exactly by from_kernel_layout.
KERNEL_TILE = 256


def check_kernel_k(k: int) -> None:
  if k % KERNEL_TILE:
    raise ShapeError(f"the NVFP4 kernel layout needs K to be a multiple of {KERNEL_TILE}, got {k}")


def to_kernel_layout(packed: jax.Array) -> jax.Array:
  """ModelOpt bytes [..., K/2] -> kernel-layout bytes [..., K/2] (see KERNEL_TILE)."""
  codes = unpack_nibbles(packed)
  k = codes.shape[-1]
  check_kernel_k(k)
  tiles = codes.reshape(*codes.shape[:-1], k // KERNEL_TILE, 2, KERNEL_TILE // 2)
  return (tiles[..., 0, :] | (tiles[..., 1, :] << 4)).reshape(packed.shape)


def from_kernel_layout(packed_kl: jax.Array) -> jax.Array:
  """Inverse of to_kernel_layout: kernel-layout bytes [..., K/2] -> ModelOpt bytes."""
  half = KERNEL_TILE // 2
  check_kernel_k(packed_kl.shape[-1] * 2)
  t = packed_kl.reshape(*packed_kl.shape[:-1], -1, half)
  codes = jnp.stack([t & 0xF, t >> 4], axis=-2).reshape(*packed_kl.shape[:-1], -1)
  return pack_nibbles(codes)
