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

Both take y as an FP8 projection's raw output with its scales still to apply (``y_row_scale``
[T, 1], ``y_col_scale`` [H], f32): y = raw * row * col rounded to x's dtype, as
``FP8Weight.linear`` finishes it (the wo and w_down outputs: XLA cannot fuse that scaling into a
Pallas kernel, so it is a kernel of its own otherwise). The raw output may also be the product's
split-K partial sums, float32 [S, T, H] with S a power of two (``ops.fp8_dot_partials``, decode
steps): the kernel sums them first (XLA's reduction kernel over the partials is then not needed).

``Tiling``: ``rows`` rows per program (w and the column scales read once per program), or for
``add_rms_norm_fp8`` ``split`` column slices per row in two kernels (residual sum + per-slice sum
of squares over T * split programs, then norm + quantization per row; the row's sum of squares is
then a sum of slice sums: the same value up to float32 summation order). Default
(``default_tiling``): one row per program, one kernel, 16 warps for ``add_rms_norm_fp8`` at <= 64
rows. ``CLUSTER``: decode calls on the Mosaic GPU cluster kernel (kernels/add_rms_norm_mgpu.py;
opt-in, not faster).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError

def _scaled(y, y_row_scale, y_col_scale, dtype):
  if y.ndim == 3:                                       # split-K partial sums
    from jaxinfer.ops import sum_partials
    y = sum_partials(y)
    if y_row_scale is None:
      return y.astype(dtype)
  if y_row_scale is None:
    return y
  return (y.astype(jnp.float32) * y_row_scale * y_col_scale).astype(dtype)


def reference(x: jax.Array, y: jax.Array, w: jax.Array, eps: float, y_row_scale=None,
              y_col_scale=None) -> tuple[jax.Array, jax.Array]:
  """Plain JAX: the residual sum and its RMSNorm, as two XLA ops (y scaled first, if scales)."""
  y = _scaled(y, y_row_scale, y_col_scale, x.dtype)
  s = (x.astype(jnp.float32) + y.astype(jnp.float32)).astype(x.dtype)
  s32 = s.astype(jnp.float32)
  normed = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
  return s, w.astype(x.dtype) * normed.astype(x.dtype)


def reference_fp8(x: jax.Array, y: jax.Array, w: jax.Array, eps: float, y_row_scale=None,
                  y_col_scale=None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Plain JAX: (x + y, E4M3 rows of RMSNorm(x + y) * w, their f32 scales [T, 1]), the rows
  quantized as ``jaxinfer.ops.FP8Weight.linear`` quantizes its input."""
  from jaxinfer.ops import quantize_rows_fp8
  s, h = reference(x, y, w, eps, y_row_scale, y_col_scale)
  return (s, *quantize_rows_fp8(h))


def supports(x: jax.Array, y: jax.Array, w: jax.Array) -> bool:
  """2-D x and y of one float dtype (or y float32 split-K partials [S, T, H], S a power of two),
  H a power of two >= 16 (one Triton block per row)."""
  h = x.shape[-1]
  partials = (y.ndim == 3 and y.shape[1:] == x.shape and y.dtype == jnp.float32
              and not y.shape[0] & (y.shape[0] - 1))
  return (x.ndim == 2 and (partials or (y.shape == x.shape and x.dtype == y.dtype))
          and w.shape == (h,) and jnp.issubdtype(x.dtype, jnp.floating) and h >= 16
          and not h & (h - 1))


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How a call is spread over programs. ``rows``: rows per program (a power of two dividing T; the
  weight and column scales loaded once for all of them). ``split``: column slices per row (a power
  of two; ``add_rms_norm_fp8`` only): > 1 runs two kernels, the first summing y's split-K partials
  and the residual slice by slice (T * split programs: a decode step's partials are its bulk of
  bytes) and writing each slice's sum of squares, the second normalising and quantizing whole rows
  from the residual sum (one row per program). ``num_warps``: per program (None: by row width)."""
  rows: int = 1
  split: int = 1
  num_warps: int | None = None


def _finish(s, w_ref, refs, *, eps: float, quantize: bool, tiny: float, e4m3_max: float,
            sumsq=None):
  """From the rounded residual sum s [R, H]: h = RMSNorm(s) * w, written (refs[0]) or quantized
  (refs[0] codes, refs[1] scales). ``sumsq`` [R, 1]: the rows' sum of squares, if given."""
  dtype = s.dtype
  s32 = s.astype(jnp.float32)
  if sumsq is None:
    ms = jnp.mean(s32 * s32, axis=-1, keepdims=True)
  else:
    ms = sumsq / s.shape[-1]
  inv = jax.lax.rsqrt(ms + eps)
  normed = (s32 * inv).astype(dtype).astype(jnp.float32)
  w = w_ref[...].astype(dtype).astype(jnp.float32)
  h = (w[None, :] * normed).astype(dtype)
  if not quantize:
    refs[0][...] = h
    return
  h = h.astype(jnp.float32)                             # h as the unfused path has it
  sx = jnp.maximum(jnp.max(jnp.abs(h), axis=-1, keepdims=True), tiny) / e4m3_max
  refs[0][...] = jnp.clip(h / sx, -e4m3_max, e4m3_max).astype(refs[0].dtype)
  refs[1][...] = sx


def _residual(x_ref, y_ref, rs_ref, cs_ref, dtype):
  """s = x + y rounded to dtype, y summed over its split-K partials and scaled first if so."""
  y = y_ref[...]
  if y.ndim == 3:               # split-K partials [S, R, H] (summed as one block: H100 window 4,
    y = jnp.sum(y, axis=0)      # 0.34 ms per decode step, slice by slice 0.42)
    if rs_ref is None:
      y = y.astype(dtype)
  if rs_ref is not None:
    y = (y.astype(jnp.float32) * rs_ref[...] * cs_ref[...][None, :]).astype(dtype)
  return (x_ref[...].astype(jnp.float32) + y.astype(jnp.float32)).astype(dtype)


def _kernel(*refs, eps: float, scaled: bool, quantize: bool, tiny: float = 0.0,
            e4m3_max: float = 0.0):
  """Refs: x, y, w, [row scale, col scale,] then s and h, or s, E4M3 rows and their scales."""
  x_ref, y_ref, w_ref, *refs = refs
  rs_ref = cs_ref = None
  if scaled:
    rs_ref, cs_ref, *refs = refs
  s = _residual(x_ref, y_ref, rs_ref, cs_ref, refs[0].dtype)
  refs[0][...] = s
  _finish(s, w_ref, refs[1:], eps=eps, quantize=quantize, tiny=tiny, e4m3_max=e4m3_max)


def _sum_kernel(*refs, scaled: bool):
  """Split, first kernel: program (t, p) writes the residual sum of row t's slice p and its sum
  of squares (refs: x, y, [row scale, col scale,] s, sum of squares)."""
  x_ref, y_ref, *refs = refs
  rs_ref = cs_ref = None
  if scaled:
    rs_ref, cs_ref, *refs = refs
  s_ref, ss_ref = refs
  s = _residual(x_ref, y_ref, rs_ref, cs_ref, s_ref.dtype)
  s_ref[...] = s
  s32 = s.astype(jnp.float32)
  ss_ref[...] = jnp.sum(s32 * s32, axis=-1, keepdims=True)[None]


def _norm_kernel(s_ref, ss_ref, w_ref, q_ref, sx_ref, *, eps: float, tiny: float,
                 e4m3_max: float):
  """Split, second kernel: whole rows from the residual sum and the slices' sums of squares."""
  sumsq = jnp.sum(ss_ref[...], axis=0)                  # [S, R, 1] -> [R, 1]
  _finish(s_ref[...], w_ref, (q_ref, sx_ref), eps=eps, quantize=True, tiny=tiny,
          e4m3_max=e4m3_max, sumsq=sumsq)


def check_product_scales(what: str, row_scale, col_scale, rows: int, cols: int) -> bool:
  """Whether an unscaled FP8 product [rows, cols] comes with its scales; raises if they are malformed.

  The fused kernels that finish an FP8 projection (here, fp8_act_quant, rope_kv_write) take its raw
  product with the activation's row scales [rows, 1] and the weight's column scales [cols]."""
  if row_scale is None:
    return False
  if row_scale.shape != (rows, 1) or col_scale is None or col_scale.shape != (cols,):
    raise ShapeError(f"{what} scales must be [{rows}, 1] and [{cols}], got {row_scale.shape}, "
                     f"{None if col_scale is None else col_scale.shape}")
  return True


# ``add_rms_norm_fp8`` calls of at most CLUSTER_MAX_ROWS rows (decode steps) on a Hopper GPU run
# the Mosaic GPU kernel with each row split over a thread-block cluster of this many CTAs
# (kernels/add_rms_norm_mgpu.py) instead of the Triton kernel, where it takes the shapes: the same
# values up to the float32 summation order of the row's sum of squares. 0: off.
CLUSTER = int(os.environ.get("JAXINFER_ADD_NORM_CLUSTER", "0"))
CLUSTER_MAX_ROWS = 64


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def default_tiling(t: int, h: int, partials: bool, quantize: bool) -> Tiling:
  """The tiling a call of t rows of width h uses (``partials``: y is split-K partial sums): one
  row per program; ``add_rms_norm_fp8`` calls of at most 64 rows (decode) with 16 warps (H100,
  64 x 4096 over 4-way partials: 3.23 / 4.70 us vs 3.47 / 5.50 at 8 warps in two windows; the
  row's sum of squares is then summed in another order: float32-rounding differences are
  possible, none seen in 8 x 64 checked rows)."""
  del partials
  if quantize and t <= 64 and h >= 4096:
    return Tiling(num_warps=16)
  return Tiling()


def _call(x, y, w, y_row_scale, y_col_scale, *, eps, quantize, interpret, name,
          tiling: Tiling | None = None):
  from jaxinfer.ops import _TINY_AMAX, E4M3_MAX
  if not supports(x, y, w):
    raise ShapeError(f"{name} takes x, y [T, H] of one float dtype with H a power of two "
                     f"and w [H]; got {x.shape} {x.dtype}, {y.shape} {y.dtype}, {w.shape}")
  T, H = x.shape
  scaled = check_product_scales(f"{name}: y", y_row_scale, y_col_scale, T, H)
  t = tiling or default_tiling(T, H, y.ndim == 3, quantize)
  R = t.rows if _pow2(t.rows) and T % t.rows == 0 else 1
  P = t.split if quantize and _pow2(t.split) and H % t.split == 0 and H // t.split >= 16 else 1
  consts = dict(tiny=_TINY_AMAX, e4m3_max=E4M3_MAX)
  scale_args = ((y_row_scale.astype(jnp.float32), y_col_scale.astype(jnp.float32))
                if scaled else ())
  num_warps = t.num_warps or min(8, max(1, H // 512))
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  vec = pl.BlockSpec((H,), lambda i: (0,))
  if P > 1:
    hs = H // P
    block = pl.BlockSpec((R, hs), lambda i, p: (i, p))
    y_block = pl.BlockSpec((y.shape[0], R, hs), lambda i, p: (0, i, p)) if y.ndim == 3 else block
    extra = [pl.BlockSpec((R, 1), lambda i, p: (i, 0)), pl.BlockSpec((hs,), lambda i, p: (p,))]
    s, ss = pl.pallas_call(
        functools.partial(_sum_kernel, scaled=scaled),
        grid=(T // R, P),
        in_specs=[block, y_block] + (extra if scaled else []),
        out_specs=[block, pl.BlockSpec((1, R, 1), lambda i, p: (p, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((T, H), x.dtype),
                   jax.ShapeDtypeStruct((P, T, 1), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=min(num_warps, max(1, hs // 256)),
                                             num_stages=1),
        interpret=interpret, name=name + "_sum")(x, y, *scale_args)
    row = pl.BlockSpec((1, H), lambda i: (i, 0))
    q, sx = pl.pallas_call(
        functools.partial(_norm_kernel, eps=eps, **consts),
        grid=(T,),
        in_specs=[row, pl.BlockSpec((P, 1, 1), lambda i: (0, i, 0)), vec],
        out_specs=[row, pl.BlockSpec((1, 1), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((T, H), jnp.float8_e4m3fn),
                   jax.ShapeDtypeStruct((T, 1), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=min(8, max(1, H // 512)), num_stages=1),
        interpret=interpret, name=name)(s, ss, w)
    return s, q, sx
  block = pl.BlockSpec((R, H), lambda i: (i, 0))
  row = pl.BlockSpec((R, 1), lambda i: (i, 0))
  y_block = (pl.BlockSpec((y.shape[0], R, H), lambda i: (0, i, 0)) if y.ndim == 3 else block)
  in_specs = [block, y_block, vec] + ([row, vec] if scaled else [])
  if quantize:
    out_specs = [block, block, row]
    out_shape = [jax.ShapeDtypeStruct((T, H), x.dtype),
                 jax.ShapeDtypeStruct((T, H), jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct((T, 1), jnp.float32)]
  else:
    out_specs, out_shape = [block, block], [jax.ShapeDtypeStruct((T, H), x.dtype)] * 2
  return pl.pallas_call(
      functools.partial(_kernel, eps=eps, scaled=scaled, quantize=quantize, **consts),
      grid=(T // R,),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=interpret,
      name=name,
  )(x, y, w, *scale_args)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "tiling"))
def add_rms_norm(x: jax.Array, y: jax.Array, w: jax.Array, *, eps: float, y_row_scale=None,
                 y_col_scale=None, interpret: bool = False, tiling: Tiling | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """(x + y, RMSNorm(x + y) * w) for x, y [T, H], w [H]; see the module docstring."""
  return tuple(_call(x, y, w, y_row_scale, y_col_scale, eps=eps, quantize=False,
                     interpret=interpret, name="add_rms_norm", tiling=tiling))


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "tiling"))
def add_rms_norm_fp8(x: jax.Array, y: jax.Array, w: jax.Array, *, eps: float, y_row_scale=None,
                     y_col_scale=None, interpret: bool = False, tiling: Tiling | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(x + y, E4M3 rows of RMSNorm(x + y) * w [T, H], f32 row scales [T, 1]); see the module
  docstring. ``tiling``: None for ``default_tiling`` (or the cluster kernel: ``CLUSTER``)."""
  if (tiling is None and not interpret and CLUSTER and x.ndim == 2
      and x.shape[0] <= CLUSTER_MAX_ROWS):
    from kernels import add_rms_norm_mgpu as nm
    if nm.on_hopper() and nm.supports(x, y, w, CLUSTER):
      return nm.add_rms_norm_fp8(x, y, w, eps=eps, y_row_scale=y_row_scale,
                                 y_col_scale=y_col_scale,
                                 tiling=nm.ClusterTiling(CLUSTER, nm.DIRECT))
  return tuple(_call(x, y, w, y_row_scale, y_col_scale, eps=eps, quantize=True,
                     interpret=interpret, name="add_rms_norm_fp8", tiling=tiling))
