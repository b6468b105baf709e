"""Residual add + RMSNorm + FP8 quantization (``kernels.add_rms_norm.add_rms_norm_fp8``) as a Mosaic
GPU kernel whose rows are split over a thread-block cluster: the decode-step form.

  add_rms_norm_fp8(x [T, H], y, w [H], eps, y_row_scale [T, 1], y_col_scale [H])
      -> (s = x + y [T, H], E4M3 rows of RMSNorm(s) * w [T, H], f32 row scales [T, 1])

y is the FP8 projection's raw product: its float32 split-K partial sums [S, T, H] (the decode
GEMM's output, summed here in order p = 0, 1, ..., S - 1) or bf16 [T, H], with the row / column
scales applied as ``FP8Weight.linear`` does (y * row * col rounded to x's dtype). Then as
``kernels.add_rms_norm.reference_fp8``: s rounded to x's dtype, the norm in float32 from the
rounded s, rounded, times w, rounded; per row sx = max(amax(h), tiny) / 448, E4M3(clip(h / sx)).
The row's sum of squares is the sum of the C slices' sums (float32 summation order differs from
the one-block kernel's: the same value to float32 rounding).

Why: at a decode step (T = 64) the Triton kernel runs one program per row: 64 SMs each read the
row's S partials (S * 16 KB) plus x, w and the column scales, ~4 us per call, two calls per
layer. Here C CTAs of one cluster share a row (T * C CTAs): two cross-CTA reductions (the sum of
squares, then the amax of the normed row), each through a small global buffer written and read
with TMA around a cluster barrier (``fp8_act_quant_mgpu.cluster_reduce``). H100 (64 rows, 4-way
partials): 3.59 us (8 CTAs, plain loads) / 4.00 (TMA staging) vs the Triton kernel's 3.47-3.55:
not faster, opt-in only.

Layout / tiling: arrays viewed as [..., H / 128, 128] (free reshapes; TMA boxes of <= 256 per
dimension); CTA (t, c) copies slice c (W = H / C columns: W / 128 tile rows) of y's S partials,
x, w and the column scales into shared memory with TMA, computes in registers, writes s and the
codes through shared memory with TMA; CTA (t, 0) writes the row scale. Shared memory at H = 4096,
C = 4, S = 4: 16 + 2 + 2 + 4 + 2 + 1 KB.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxinfer.errors import ShapeError
from kernels.add_rms_norm import check_product_scales
from kernels.fp8_act_quant_mgpu import (DIRECT, EX, LANES, ClusterTiling,  # noqa: F401
                                        cluster_reduce, on_hopper, store_codes)

_F32 = jnp.float32


def supports(x: jax.Array, y: jax.Array, w: jax.Array, cluster: int = 4) -> bool:
  """x [T, H] of a 16-bit float dtype; y the same or float32 partials [S, T, H] (S <= 16);
  w [H]; H split into ``cluster`` slices of a multiple of 128 columns (<= 32 * 128 each)."""
  if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float16) or w.shape != x.shape[-1:]:
    return False
  partials = (y.ndim == 3 and y.shape[1:] == x.shape and y.dtype == _F32 and y.shape[0] <= 16)
  if not (partials or (y.shape == x.shape and y.dtype == x.dtype)):
    return False
  h = x.shape[1]
  return cluster in (1, 2, 4, 8) and h % (LANES * cluster) == 0 and h // cluster <= 32 * LANES


def _direct_kernel(*refs, h: int, cluster: int, parts: int, scaled: bool, eps: float,
                   tiny: float, e4m3_max: float):
  """``_kernel`` with plain global-memory loads and stores (``ClusterTiling.direct``)."""
  it = iter(refs)
  x_ref, y_ref, w_ref = next(it), next(it), next(it)
  rs_ref, cs_ref = (next(it), next(it)) if scaled else (None, None)
  s_ref, q_ref, sx_ref, ex_ref = next(it), next(it), next(it), next(it)
  ex_s, all_s, xbar, cbar = next(it), next(it), next(it), next(it)
  ex_refs = (ex_ref, ex_s, all_s, xbar)
  dtype = x_ref.dtype
  t, c = lax.axis_index("t"), lax.axis_index("c")
  n = h // cluster // LANES
  cols = pl.ds(c * n, n)
  if parts:
    y = y_ref[0, t, cols]
    for p in range(1, parts):
      y = y + y_ref[p, t, cols]
    if not scaled:
      y = y.astype(dtype)
  else:
    y = y_ref[t, cols]
  if scaled:
    y = (y.astype(_F32) * rs_ref[t] * cs_ref[cols]).astype(dtype)
  s = (x_ref[t, cols].astype(_F32) + y.astype(_F32)).astype(dtype)
  s_ref[t, cols] = s
  s32 = s.astype(_F32)
  sumsq = _exchange(ex_refs, cbar, t, c, cluster, jnp.sum(s32 * s32), 0)
  inv = lax.rsqrt(sumsq / h + eps)
  normed = (s32 * inv).astype(dtype).astype(_F32)
  hv = (w_ref[cols].astype(dtype).astype(_F32) * normed).astype(dtype).astype(_F32)
  amax = _exchange(ex_refs, cbar, t, c, cluster, jnp.max(jnp.abs(hv)), 1)
  store_codes(hv, amax, q_ref, sx_ref, t, c, cols, tiny=tiny, e4m3_max=e4m3_max)


def _exchange(ex_refs, cbar, t, c, cluster: int, v, k: int):
  """The sum (k = 0) or max (k = 1) over the row's cluster of the CTAs' scalars v
  (``fp8_act_quant_mgpu.cluster_reduce``; ex_refs: the exchange buffer [2, T, C, EX] and the
  scratch: staging [1, EX], gather [C, EX], TMA barriers [2])."""
  ex_ref, ex_s, all_s, xbar = ex_refs
  return cluster_reduce(v, ex_ref.at[k], ex_s, all_s, xbar.at[k], cbar.at[k], t, c, cluster,
                        jnp.add if k == 0 else jnp.maximum)


def _kernel(*refs, h: int, cluster: int, parts: int, scaled: bool, eps: float, tiny: float,
            e4m3_max: float):
  it = iter(refs)
  x_ref, y_ref, w_ref = next(it), next(it), next(it)
  rs_ref, cs_ref = (next(it), next(it)) if scaled else (None, None)
  s_ref, q_ref, sx_ref, ex_ref = next(it), next(it), next(it), next(it)
  x_s, y_s, w_s = next(it), next(it), next(it)
  cs_s = next(it) if scaled else None
  s_s, q_s, bar = next(it), next(it), next(it)
  ex_s, all_s, xbar, cbar = next(it), next(it), next(it), next(it)
  ex_refs = (ex_ref, ex_s, all_s, xbar)
  dtype = x_ref.dtype
  t, c = lax.axis_index("t"), lax.axis_index("c")
  n = h // cluster // LANES
  b = c * n
  plgpu.copy_gmem_to_smem(x_ref.at[t, pl.ds(b, n)], x_s, bar)
  if parts:
    plgpu.copy_gmem_to_smem(y_ref.at[:, t, pl.ds(b, n)], y_s, bar)
  else:
    plgpu.copy_gmem_to_smem(y_ref.at[t, pl.ds(b, n)], y_s, bar)
  plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(b, n)], w_s, bar)
  if scaled:
    plgpu.copy_gmem_to_smem(cs_ref.at[pl.ds(b, n)], cs_s, bar)
  row = rs_ref[t] if scaled else None
  plgpu.barrier_wait(bar)
  if parts:
    y = y_s[0]
    for p in range(1, parts):
      y = y + y_s[p]
    if not scaled:
      y = y.astype(dtype)
  else:
    y = y_s[...]
  if scaled:
    y = (y.astype(_F32) * row * cs_s[...]).astype(dtype)
  s = (x_s[...].astype(_F32) + y.astype(_F32)).astype(dtype)
  s_s[...] = s
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(s_s, s_ref.at[t, pl.ds(b, n)])
  s32 = s.astype(_F32)

  def exchange(v, k):
    return _exchange(ex_refs, cbar, t, c, cluster, v, k)

  sumsq = exchange(jnp.sum(s32 * s32), 0)
  inv = lax.rsqrt(sumsq / h + eps)
  normed = (s32 * inv).astype(dtype).astype(_F32)
  hv = (w_s[...].astype(dtype).astype(_F32) * normed).astype(dtype).astype(_F32)
  store_codes(hv, exchange(jnp.max(jnp.abs(hv)), 1), q_ref, sx_ref, t, c, pl.ds(b, n),
              tiny=tiny, e4m3_max=e4m3_max, q_s=q_s)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "tiling"))
def add_rms_norm_fp8(x: jax.Array, y: jax.Array, w: jax.Array, *, eps: float, y_row_scale=None,
                     y_col_scale=None, interpret: bool = False,
                     tiling: ClusterTiling | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x + y, E4M3 rows of RMSNorm(x + y) * w [T, H], f32 row scales [T, 1]); see the module
  docstring."""
  from jaxinfer.ops import _TINY_AMAX, E4M3_MAX
  til = tiling or ClusterTiling()
  C = til.cluster
  if not supports(x, y, w, C):
    raise ShapeError(f"add_rms_norm_fp8_mgpu takes x [T, H] (16-bit float), y [T, H] or f32 "
                     f"partials [S <= 16, T, H], w [H], H a multiple of {LANES} * {C}; got "
                     f"{x.shape} {x.dtype}, {y.shape} {y.dtype}, {w.shape}")
  T, H = x.shape
  scaled = check_product_scales("add_rms_norm_fp8_mgpu: y", y_row_scale, y_col_scale, T, H)
  parts = y.shape[0] if y.ndim == 3 else 0
  n = H // C // LANES
  tile = lambda a: a.reshape(*a.shape[:-1], a.shape[-1] // LANES, LANES)
  args = [tile(x), tile(y), tile(w)]
  if scaled:
    args += [y_row_scale.astype(_F32).reshape(T), tile(y_col_scale.astype(_F32))]
  exchange = [plgpu.SMEM((1, EX), _F32), plgpu.SMEM((C, EX), _F32),
              plgpu.Barrier(num_arrivals=1, num_barriers=2),
              plgpu.ClusterBarrier(collective_axes=("c",), num_barriers=2)]
  if til.direct:
    scratch = exchange
  else:
    scratch = [plgpu.SMEM((n, LANES), x.dtype),
               plgpu.SMEM((parts, n, LANES) if parts else (n, LANES), y.dtype),
               plgpu.SMEM((n, LANES), w.dtype)]
    if scaled:
      scratch.append(plgpu.SMEM((n, LANES), _F32))
    scratch += [plgpu.SMEM((n, LANES), x.dtype), plgpu.SMEM((n, LANES), jnp.float8_e4m3fn),
                plgpu.Barrier(num_arrivals=4 if scaled else 3), *exchange]
  s, q, sx, _ = plgpu.kernel(
      functools.partial(_direct_kernel if til.direct else _kernel, h=H, cluster=C, parts=parts,
                        scaled=scaled, eps=eps, tiny=_TINY_AMAX, e4m3_max=E4M3_MAX),
      out_type=(jax.ShapeDtypeStruct((T, H // LANES, LANES), x.dtype),
                jax.ShapeDtypeStruct((T, H // LANES, LANES), jnp.float8_e4m3fn),
                jax.ShapeDtypeStruct((T, 1), _F32), jax.ShapeDtypeStruct((2, T, C, EX), _F32)),
      scratch_types=scratch,
      grid=(T,), grid_names=("t",), cluster=(C,), cluster_names=("c",),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name="add_rms_norm_fp8_mgpu",
  )(*args)
  return s.reshape(T, H), q.reshape(T, H), sx
