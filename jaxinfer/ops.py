"""Small shared ops: RMSNorm, rotary embeddings, and the one dispatch point for weight matmuls."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def linear(x: jax.Array, w, out_dtype=None) -> jax.Array:
  """x [..., K] @ w [K, N], accumulated in float32, returned in ``out_dtype`` (default x's dtype).
  Quantized weight types (kernels/quant) carry their own ``linear``."""
  out_dtype = out_dtype or x.dtype
  if hasattr(w, "linear"):
    return w.linear(x).astype(out_dtype)
  return jnp.einsum("...k,kn->...n", x, w.astype(x.dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(rotary_dim: int, theta: float, scaling=None) -> jax.Array:
  """Inverse frequencies; ``scaling`` is a llama3-style RopeScaling or None."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  if scaling is None:
    return inv_freq
  low_wavelen = scaling.original_max_position / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)                   # [T, D]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE (HF layout) on x [T, heads, D] with cos/sin [T, D]."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)
