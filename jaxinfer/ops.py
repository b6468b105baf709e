"""Small shared ops: RMSNorm, rotary embeddings, the one dispatch point for weight matmuls, and an
FP8 weight type for it."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

# GEMMs of at least this many rows with a 16-bit output of the input's dtype ask XLA for that
# output directly (still float32 accumulation: cuBLAS's epilogue does the rounding) rather than
# float32 and a convert: for the cuBLAS GEMMs XLA picks at prefill sizes the convert is a kernel of
# its own (H100, a 1024-token Llama-8B step: 26.6 -> 24.3 ms of kernels, c=64 serving 5811 -> 6019
# tok/s in one run). XLA then picks other cuBLAS kernels, so results differ in the last bit (the
# random-weight benchmark's greedy tokens changed). Smaller GEMMs (decode) keep the float32 form,
# whose convert XLA fuses into its Triton GEMM, and its split-K reductions in float32. 0: off.
NATIVE_OUT_MIN_ROWS = int(os.environ.get("JAXINFER_GEMM_NATIVE_OUT_MIN_ROWS", "512"))


def linear(x: jax.Array, w, out_dtype=None) -> jax.Array:
  """x [..., K] @ w [K, N], accumulated in float32, returned in ``out_dtype`` (default x's dtype).
  Quantized weight types (kernels/quant) carry their own ``linear``."""
  out_dtype = out_dtype or x.dtype
  if hasattr(w, "linear"):
    return w.linear(x).astype(out_dtype)
  rows = math.prod(x.shape[:-1])
  native = (NATIVE_OUT_MIN_ROWS > 0 and rows >= NATIVE_OUT_MIN_ROWS
            and jnp.dtype(out_dtype) == x.dtype and x.dtype in (jnp.bfloat16, jnp.float16))
  return jnp.einsum("...k,kn->...n", x, w.astype(x.dtype),
                    preferred_element_type=out_dtype if native else jnp.float32).astype(out_dtype)


E4M3_MAX = 448.0
_TINY_AMAX = 1e-12


def quantize_fp8_per_channel(w_kn: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dense [K, N] -> (E4M3 codes [N, K], f32 scale [N]): one scale per output channel (amax / 448),
  K minor (cuBLASLt's FP8 "TN" layout, no transpose at run time)."""
  w32 = jnp.asarray(w_kn, jnp.float32)
  s = jnp.max(jnp.abs(w32), axis=0) / E4M3_MAX
  s = jnp.where(s > 0, s, 1.0)
  return (w32 / s).T.astype(jnp.float8_e4m3fn), s


# FP8 projections of at most this many rows (decode steps) compute their product as explicit
# split-K partial sums: a batched E4M3 dot over S slices of K -> f32 [S, R, N] (the form XLA:GPU
# itself rewrites such small-M dots into: a cuBLASLt batched GEMM, then a reduction kernel), left
# for the consumer to sum: ``ops.ScaledRows.apply``, or the residual norm / RoPE kernels
# (kernels/add_rms_norm.py, kernels/rope_kv_write.py), which then replace XLA's reduction
# kernel. 0: off (XLA picks its own split).
FP8_SPLIT_K_MAX_ROWS = int(os.environ.get("JAXINFER_FP8_SPLIT_K_MAX_ROWS", "0"))


# Opt-in: FP8 products of at most ``fp8_decode_matmul_mgpu.MAX_ROWS`` (64) rows on a Hopper GPU run
# the Mosaic GPU decode GEMM (kernels/fp8_decode_matmul_mgpu.py) instead of XLA's cuBLASLt GEMMs, in
# the same output form: f32 split-K partials [S, R, N] (its own S, a power of two) where the XLA
# path would return partials (``fp8_split_k`` > 1: use it with FP8_SPLIT_K_MAX_ROWS >= 64), else
# the bf16 product [R, N] (split 1). CPU, other GPUs and other shapes keep the XLA path.
FP8_DECODE_KERNEL = os.environ.get("JAXINFER_FP8_DECODE_KERNEL", "0") not in ("", "0")
# Tests: run that kernel in the Mosaic GPU interpreter off Hopper (CPU) instead of skipping it.
FP8_DECODE_KERNEL_INTERPRET = False


def _fp8_decode_kernel_product(xq: jax.Array, w: jax.Array, splits: int) -> jax.Array | None:
  """The decode kernel's product for ``FP8Weight.linear_deferred``, or None where it does not
  apply (switch off, not Hopper, shape not taken)."""
  if not FP8_DECODE_KERNEL or xq.ndim != 2:
    return None
  from kernels import fp8_decode_matmul_mgpu as fd   # kernels import jaxinfer
  hopper = fd.on_hopper()
  if not (hopper or FP8_DECODE_KERNEL_INTERPRET):
    return None
  r, k = xq.shape
  n = w.shape[0]
  if not fd.supports(r, n, k):
    return None
  t = fd.default_tiling(r, n, k, num_sms=fd.num_sms(), max_split=16 if splits > 1 else 1)
  return fd.fp8_decode_matmul(xq, w, tiling=t, interpret=not hopper)


def fp8_split_k(rows: int, k: int, n: int) -> int:
  """Slices of K for an FP8 product of ``rows`` x [K, N] (1: a plain dot). Mirrors XLA's own choice
  at Llama-3-8B decode sizes on the H100 (64 rows: 4 for wqkv N=6144, 8 for wo / w_down N=4096, none
  for w_gate_up N=28672): more slices the fewer output columns there are to spread over the SMs.
  One row never splits: XLA:GPU lowers the one-row batched E4M3 dot of ``fp8_dot_partials`` to
  reduce fusions whose result is wrong on the H100 (relative error 1.8-2.3 against float64 for the
  Llama-3-8B wqkv / wo / w_down shapes, jax 0.11.2, five runs of 2026-11-24; benchmarks/serving.md),
  while the plain ``fp8_dot`` is right."""
  if rows > FP8_SPLIT_K_MAX_ROWS or rows < 2:
    return 1
  s = 8 if n <= 4096 else 4 if n <= 8192 else 1
  while s > 1 and k % (128 * s):
    s //= 2
  return s


def fp8_dot_partials(xq: jax.Array, w: jax.Array, splits: int) -> jax.Array:
  """E4M3 xq [R, K] · w [N, K]ᵀ as ``splits`` partial sums over equal slices of K -> f32
  [splits, R, N] (one batched dot; the sum over axis 0 is the product)."""
  r, k = xq.shape
  c = k // splits
  return jax.lax.dot_general(xq.reshape(r, splits, c), w.reshape(w.shape[0], splits, c),
                             (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.float32)


def fp8_dot(xq: jax.Array, w: jax.Array) -> jax.Array:
  """E4M3 xq [..., K] · E4M3 w [N, K]ᵀ -> bf16 [..., N] (f32 accumulation): one 2-D dot, the form
  XLA's GEMM rewriter turns into a cuBLASLt FP8 matmul (one contracting, one free dim per operand)."""
  y = jax.lax.dot_general(xq.reshape(-1, xq.shape[-1]), w, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.bfloat16)
  return y.reshape(*xq.shape[:-1], w.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FP8Weight:
  """W8A8 FP8 linear: E4M3 weight ``w`` [N, K] (K minor: cuBLASLt's FP8 "TN" layout, no transpose at
  run time) with one f32 scale per output channel ``scale`` [N]; activations quantized per row with
  a dynamic scale (row amax / 448) on every call.

  linear(x) = (E4M3(x / sx) . E4M3(W / sw)^T) * sx * sw: one 2-D ``dot_general`` of two E4M3
  operands, which XLA:GPU lowers to a cuBLASLt FP8 GEMM (f32 accumulation) on Hopper; the row and
  column scales are applied to its output in one elementwise fusion. A decode step reads half the
  bytes of bf16 weights; the row amax and the cast are one small fusion over x."""
  w: jax.Array
  scale: jax.Array

  @classmethod
  def from_dense(cls, w_kn: jax.Array) -> FP8Weight:
    """From a dense [K, N] weight (the models' [in, out] layout)."""
    return cls(*quantize_fp8_per_channel(w_kn))

  @property
  def shape(self) -> tuple[int, int]:
    """The dense [K, N] shape this weight stands for."""
    return (self.w.shape[1], self.w.shape[0])

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.w.astype(jnp.float32) * self.scale[:, None]).T.astype(dtype)

  def linear(self, x: jax.Array | FP8Rows) -> jax.Array:
    """x [..., K] (quantized here), or rows quantized already (``FP8Rows``, e.g. by the norm
    before this projection: ``add_rms_norm_fp8``)."""
    y = self.linear_deferred(x).apply()
    return y.reshape(*x.shape[:-1], self.w.shape[0])

  def linear_deferred(self, x: jax.Array | FP8Rows) -> ScaledRows:
    """``linear`` with its output scaling left to the consumer: the raw E4M3 product [R, N] and
    the row / column scales (``ScaledRows.apply`` finishes it; ``add_rms_norm`` takes it as is)."""
    xq, sx = (x.q, x.scale) if isinstance(x, FP8Rows) else quantize_rows_fp8(x)
    splits = fp8_split_k(xq.shape[0], xq.shape[1], self.w.shape[0])
    raw = _fp8_decode_kernel_product(xq, self.w, splits)
    if raw is None:
      raw = fp8_dot(xq, self.w) if splits == 1 else fp8_dot_partials(xq, self.w, splits)
    return ScaledRows(raw, sx, self.scale, x.dtype)


def quantize_rows_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., K] -> (E4M3 rows [R, K], f32 scales [R, 1]) with R the product of the leading dims:
  per row sx = max(amax, tiny) / 448 and E4M3(clip(x / sx)), from x's values in float32."""
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  sx = jnp.maximum(jnp.max(jnp.abs(rows), axis=-1, keepdims=True), _TINY_AMAX) / E4M3_MAX
  return jnp.clip(rows / sx, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn), sx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaledRows:
  """An FP8 projection's output before its scaling: ``raw`` [R, N] (the E4M3 product, bf16) or its
  split-K partial sums [S, R, N] (f32, ``fp8_dot_partials``), f32 ``row_scale`` [R, 1] and
  ``col_scale`` [N]; ``apply()`` = (sum of raw * row * col) in ``dtype``."""
  raw: jax.Array
  row_scale: jax.Array
  col_scale: jax.Array
  dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True), default=jnp.bfloat16)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.raw.shape[-2:]

  @property
  def partials(self) -> bool:
    return self.raw.ndim == 3

  def apply(self) -> jax.Array:
    raw = sum_partials(self.raw) if self.partials else self.raw.astype(jnp.float32)
    return (raw * self.row_scale * self.col_scale).astype(self.dtype)


def sum_partials(parts: jax.Array) -> jax.Array:
  """f32 sum of split-K partials [S, ...] over S (as the norm / RoPE kernels sum them)."""
  return jnp.sum(parts.astype(jnp.float32), axis=0)


def linear_deferred(x: jax.Array | FP8Rows, w) -> jax.Array | ScaledRows:
  """``linear`` for a projection whose consumer can apply an FP8 weight's output scaling itself
  (``add_rms_norm``): a ``ScaledRows`` for an ``FP8Weight`` (2-D x), else ``linear(x, w)``."""
  if isinstance(w, FP8Weight) and len(x.shape) == 2:
    return w.linear_deferred(x)
  return linear(x, w)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSplitWeight:
  """One projection stored in two forms, picked per call by its row count (static under jit):
  ``small`` for calls of at most ``max_rows`` rows, ``large`` for bigger ones. For serving: a
  decode step (few rows) is bound by the weight read, so it wants the fewest weight bytes (e.g.
  NVFP4 for the W4A16 decode kernels), while a prefill step is compute-bound and wants the fastest
  tensor cores (e.g. ``FP8Weight``, W8A8). Both forms must stand for the same [K, N] matrix up to
  their own quantization; memory is both forms' bytes together."""
  small: Any
  large: Any
  max_rows: int = dataclasses.field(metadata=dict(static=True), default=64)

  def pick(self, rows: int):
    """The form a call of ``rows`` rows uses."""
    return self.small if rows <= self.max_rows else self.large

  def linear(self, x: jax.Array) -> jax.Array:
    return linear(x, self.pick(math.prod(x.shape[:-1])))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FP8Rows:
  """Activations already quantized for ``FP8Weight.linear``: E4M3 rows ``q`` [T, K], f32 scales
  ``scale`` [T, 1], and the dtype the activations had (the projection's output dtype)."""
  q: jax.Array
  scale: jax.Array
  dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True), default=jnp.bfloat16)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.q.shape


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def add_rms_norm(x: jax.Array, y: jax.Array | ScaledRows, weight: jax.Array, eps: float,
                 fused: bool = False) -> tuple[jax.Array, jax.Array]:
  """(x + y, rms_norm(x + y)): the residual add and the next RMSNorm. ``fused``: one Pallas kernel
  on GPU where it takes the shapes (kernels/add_rms_norm.py; XLA runs these as two kernels), else
  these two XLA ops. Same rounding either way. y may be an FP8 projection's unscaled output
  (``ScaledRows``): the kernel applies its scales (else one more XLA op)."""
  if fused and jax.default_backend() == "gpu":
    from kernels import add_rms_norm as kernel   # kernels import jaxinfer
    raw = y.raw if isinstance(y, ScaledRows) else y
    if kernel.supports(x, raw, weight):
      scales = (y.row_scale, y.col_scale) if isinstance(y, ScaledRows) else (None, None)
      return kernel.add_rms_norm(x, raw, weight, eps=eps, y_row_scale=scales[0],
                                 y_col_scale=scales[1])
  if isinstance(y, ScaledRows):
    y = y.apply()
  s = x + y
  return s, rms_norm(s, weight, eps)


def add_rms_norm_fp8(x: jax.Array, y: jax.Array | ScaledRows, weight: jax.Array, eps: float,
                     fused: bool = False) -> tuple[jax.Array, FP8Rows]:
  """(x + y, rms_norm(x + y) quantized for an FP8 projection): what ``add_rms_norm`` followed by
  ``FP8Weight.linear``'s input quantization compute, as one Pallas kernel on GPU when ``fused``
  (kernels/add_rms_norm.add_rms_norm_fp8), else those XLA ops. Same values either way."""
  if fused and jax.default_backend() == "gpu":
    from kernels import add_rms_norm as kernel   # kernels import jaxinfer
    raw = y.raw if isinstance(y, ScaledRows) else y
    if kernel.supports(x, raw, weight):
      scales = (y.row_scale, y.col_scale) if isinstance(y, ScaledRows) else (None, None)
      s, q, sx = kernel.add_rms_norm_fp8(x, raw, weight, eps=eps, y_row_scale=scales[0],
                                         y_col_scale=scales[1])
      return s, FP8Rows(q, sx, x.dtype)
  s, h = add_rms_norm(x, y, weight, eps)
  return s, FP8Rows(*quantize_rows_fp8(h), h.dtype)


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
