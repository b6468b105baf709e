"""Per-row FP8 (E4M3) activation quantization in one Pallas Triton kernel, alone or after SwiGLU.

  quantize_rows(x [T, K])                        -> (E4M3 rows [T, K], f32 scales [T, 1])
  silu_mul_quantize(gate_up [T, 2I], row, col)   -> (E4M3 rows of silu(gate) * up [T, I], [T, 1])

Both quantize as ``jaxinfer.ops.quantize_rows_fp8`` (what ``ops.FP8Weight.linear`` does to its
input): per row sx = max(amax, tiny) / 448 and E4M3(clip(x / sx)), from the row's values in float32
after rounding to the activation dtype. ``silu_mul_quantize`` takes the fused w_gate_up projection's
output [T, 2I] (gate columns first, then up: ``models.llama.fuse_projections``), optionally as an FP8
projection's raw product with its row [T, 1] / column [2I] scales still to apply (``ops.ScaledRows``:
y = raw * row * col rounded to the dtype, as ``FP8Weight.linear`` finishes it), computes
h = silu(gate) * up (silu in float32 from the rounded gate, rounded to the dtype, times up, rounded:
``reference_silu_mul`` below) and quantizes h for the FP8 w_down.

Why: XLA:GPU runs a row quantization as two kernels (the row-amax reduction, then the scale-and-cast
fusion, each recomputing their producer: the SwiGLU and the scaling of the w_gate_up product), so a
FP8 Llama layer spends four small kernels between w_gate_up and w_down and between attention and
wo, re-reading the [T, 2I] product twice. One kernel each, reading the input once.

Measured (H100, Llama-3-8B FP8 c=64 serving, profiler, 2026-11-24): ``silu_mul_quantize`` 5.5 us per
call at 64 rows (0.22 ms per decode step for 32 layers; XLA's amax + cast + scaling kernels took
~0.3 ms) and 42 us at 1024 rows (1.3-1.5 ms per prefill step; XLA's pair 2.2 ms);
``quantize_rows`` 1.5 us at 64 rows, 3.7 us at 1024. Codes match the XLA ops bit for bit in
interpret mode; on the GPU ~4% of the SwiGLU codes differ by one E4M3 step (XLA's fusion skips the
intermediate bf16 roundings, ``xla_allow_excess_precision``), the scales by <= 1%.

Tiling (``Tiling``, ``default_tiling``): by default grid (T,), one program per row; the row is
processed in ``chunk``-wide slices (the largest power of two <= 2048 dividing the row width,
unrolled), all kept in registers between the amax pass and the store pass: 14336 float32 values
per row for Llama-3-8B's I, 28 per thread at 16 warps; above 64 rows the row amax is an
elementwise max over the slices, then one reduction (H100, 1024 x 2x14336: 38.7 vs 43.1 us per
call), up to 64 rows one reduction per slice (decode: faster in serving). Options (none faster
on the H100 at the serving shapes): ``rows`` rows per program (the column scales, f32 [2I], read
once per program instead of once per row), ``reload`` (the store pass re-reads the row instead of
holding it), ``interleave``, and ``split`` column slices per row in two kernels (slice values +
slice amax, then scales + codes: T * split programs). Every option gives the same bits (max is
exact, the per-element math is unchanged).
Roofline: reads 2 T 2I + writes T I bytes (T = 64, I = 14336: 4.6 MB, ~1.5 us at 3 TB/s); at decode
sizes it is launch/latency-bound (one SM streams a whole 57 KB row, plus 114 KB of column scales),
at prefill sizes (T = 1024: 73 MB, ~24 us) bandwidth-bound.
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
from kernels.add_rms_norm import check_product_scales

_MAX_CHUNK = 2048
_MAX_CHUNKS = 32
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How a call is spread over programs.

  ``rows``: rows per program (a power of two dividing T; their column scales are loaded once for
  all of them). ``num_warps``: per program (None: ``default_num_warps``). ``split``: column slices
  per row (a power of two): > 1 runs two kernels, the first computing each slice's values (written
  in the activation dtype, exact: they are rounded to it anyway) and amax, the second the row
  scales from the slice amaxes and the codes; T * split programs instead of T. ``reload``: the
  store pass re-reads the row (L2) and recomputes its values instead of holding them in
  registers (single kernel only). ``amax_once``: the row amax as an elementwise max over the
  chunks and one reduction, the chunks held in the activation dtype; False: one reduction per chunk,
  the chunks held in float32 (the first kernel's form; single kernel, one row per program). The
  same values either way. ``interleave``: each chunk's values computed right after its loads
  (fewer loads in flight per thread, fewer registers) instead of every load first."""
  rows: int = 1
  num_warps: int | None = None
  split: int = 1
  reload: bool = False
  amax_once: bool = True
  interleave: bool = False


def _scaled(y, row, col, dtype):
  if row is None:
    return y
  return (y.astype(_F32) * row * col).astype(dtype)


def reference_silu_mul(gate_up: jax.Array, row_scale=None, col_scale=None) -> jax.Array:
  """Plain JAX: silu(gate) * up [T, I] in gate_up's dtype (gate_up scaled first, if scales)."""
  dtype = gate_up.dtype
  y = _scaled(gate_up, row_scale, col_scale, dtype)
  gate, up = jnp.split(y, 2, axis=-1)
  g = gate.astype(_F32)
  silu = (g * jax.nn.sigmoid(g)).astype(dtype)
  return (silu.astype(_F32) * up.astype(_F32)).astype(dtype)


def reference_silu_mul_quantize(gate_up: jax.Array, row_scale=None, col_scale=None
                                ) -> tuple[jax.Array, jax.Array]:
  """Plain JAX: ``reference_silu_mul`` then ``ops.quantize_rows_fp8``."""
  from jaxinfer.ops import quantize_rows_fp8
  return quantize_rows_fp8(reference_silu_mul(gate_up, row_scale, col_scale))


def chunk_width(k: int) -> int | None:
  """The slice width a row of k values is processed in, or None when no power of two >= 16 and
  <= 2048 divides k into at most 32 slices."""
  c = _MAX_CHUNK
  while c >= 16:
    if k % c == 0:
      return c if k // c <= _MAX_CHUNKS else None
    c //= 2
  return None


def supports(x: jax.Array, glu: bool) -> bool:
  """2-D x of a 16/32-bit float dtype whose (half, for ``glu``) row width ``chunk_width`` takes."""
  if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return False
  k = x.shape[1]
  if glu:
    if k % 2:
      return False
    k //= 2
  return chunk_width(k) is not None


def _rows(ref, t0, rows: int, cols):
  """Rows [t0, t0 + rows) of ref at columns ``cols``: 1-D for one row, else [rows, ...]."""
  return ref[t0, cols] if rows == 1 else ref[pl.ds(t0, rows), cols]


def _set_rows(ref, t0, rows: int, cols, v):
  if rows == 1:
    ref[t0, cols] = v
  else:
    ref[pl.ds(t0, rows), cols] = v


def _loader(x_ref, rs_ref, cs_ref, t0, rows: int, chunk: int):
  """load(off) -> the [rows, chunk] (1-D for one row) slice of x at column off, scaled by the
  product's row / column scales first if there are any, in x's dtype."""
  dtype = x_ref.dtype
  row = None
  if rs_ref is not None:
    row = rs_ref[t0, 0] if rows == 1 else rs_ref[pl.ds(t0, rows), :]

  def load(off):
    v = _rows(x_ref, t0, rows, pl.ds(off, chunk))
    if row is not None:
      col = cs_ref[pl.ds(off, chunk)]
      v = (v.astype(_F32) * row * (col if rows == 1 else col[None, :])).astype(dtype)
    return v
  return load


def _value(x, up, dtype):
  """The value to quantize (in the activation dtype): silu(x) * up for a SwiGLU, else x."""
  if up is None:
    return x
  g = x.astype(_F32)
  silu = (g * jax.nn.sigmoid(g)).astype(dtype).astype(_F32)
  return (silu * up.astype(_F32)).astype(dtype)


def _amax(hs) -> jax.Array:
  """Row amax of the chunks ``hs``: an elementwise max over the chunks, then one reduction (one
  cross-warp reduction per row instead of one per chunk; the same value)."""
  m = None
  for h in hs:
    a = jnp.abs(h.astype(_F32))
    m = a if m is None else jnp.maximum(m, a)
  return jnp.max(m, axis=-1)


def _split_refs(refs, scaled: bool):
  x_ref, *refs = refs
  rs_ref = cs_ref = None
  if scaled:
    rs_ref, cs_ref, *refs = refs
  return x_ref, rs_ref, cs_ref, refs


def _kernel(*refs, width: int, chunk: int, rows: int, glu: bool, scaled: bool, reload: bool,
            amax_once: bool, interleave: bool, tiny: float, e4m3_max: float):
  """One program: ``rows`` whole rows (amax pass, then the store pass)."""
  x_ref, rs_ref, cs_ref, (q_ref, sx_ref) = _split_refs(refs, scaled)
  t0 = pl.program_id(0) * rows
  dtype = x_ref.dtype
  load = _loader(x_ref, rs_ref, cs_ref, t0, rows, chunk)
  n = width // chunk
  if not amax_once:              # one row; float32 chunks, a reduction per chunk
    xs = [load(c * chunk) for c in range(n)]
    ups = [load(width + c * chunk) for c in range(n)] if glu else [None] * n
    hs, amax = [], None
    for x, u in zip(xs, ups):
      h = _value(x, u, dtype).astype(_F32)
      hs.append(h)
      m = jnp.max(jnp.abs(h))
      amax = m if amax is None else jnp.maximum(amax, m)
    sx = jnp.maximum(amax, tiny) / e4m3_max
    for c, h in enumerate(hs):
      q_ref[t0, pl.ds(c * chunk, chunk)] = jnp.clip(h / sx, -e4m3_max, e4m3_max).astype(
          q_ref.dtype)
    sx_ref[pl.ds(t0, 1), :] = jnp.full((1, 1), sx, _F32)
    return

  def values():
    if interleave:
      return [_value(load(c * chunk), load(width + c * chunk) if glu else None, dtype)
              for c in range(n)]
    # every load first (independent: their latencies overlap), then the math
    xs = [load(c * chunk) for c in range(n)]
    ups = [load(width + c * chunk) for c in range(n)] if glu else [None] * n
    return [_value(x, u, dtype) for x, u in zip(xs, ups)]

  hs = values()
  sx = jnp.maximum(_amax(hs), tiny) / e4m3_max
  if reload:
    hs = values()
  if rows > 1:
    sx = sx[:, None]
  for c, h in enumerate(hs):
    q = jnp.clip(h.astype(_F32) / sx, -e4m3_max, e4m3_max).astype(q_ref.dtype)
    _set_rows(q_ref, t0, rows, pl.ds(c * chunk, chunk), q)
  sx_ref[pl.ds(t0, rows), :] = (jnp.full((1, 1), sx, _F32) if rows == 1 else sx)


def _slice_kernel(*refs, width: int, slice_w: int, chunk: int, rows: int, glu: bool,
                  scaled: bool):
  """Split, first kernel: program (i, p) computes the values of column slice p of its rows,
  writes them (activation dtype) and their amax [rows, 1] at column p of the amax array."""
  x_ref, rs_ref, cs_ref, (h_ref, am_ref) = _split_refs(refs, scaled)
  t0, p = pl.program_id(0) * rows, pl.program_id(1)
  dtype = x_ref.dtype
  load = _loader(x_ref, rs_ref, cs_ref, t0, rows, chunk)
  n = slice_w // chunk
  base = p * slice_w
  xs = [load(base + c * chunk) for c in range(n)]
  ups = [load(width + base + c * chunk) for c in range(n)] if glu else [None] * n
  hs = [_value(x, u, dtype) for x, u in zip(xs, ups)]
  for c, h in enumerate(hs):
    _set_rows(h_ref, t0, rows, pl.ds(base + c * chunk, chunk), h)
  amax = _amax(hs)
  am_ref[pl.ds(t0, rows), pl.ds(p, 1)] = (jnp.full((1, 1), amax, _F32) if rows == 1
                                          else amax[:, None])


def _quantize_kernel(h_ref, am_ref, q_ref, sx_ref, *, slice_w: int, chunk: int, rows: int,
                     tiny: float, e4m3_max: float):
  """Split, second kernel: the row scales from the slice amaxes, the codes of slice p."""
  t0, p = pl.program_id(0) * rows, pl.program_id(1)
  sx = jnp.maximum(jnp.max(_rows(am_ref, t0, rows, slice(None)), axis=-1), tiny) / e4m3_max
  if rows > 1:
    sx = sx[:, None]
  base = p * slice_w
  hs = [_rows(h_ref, t0, rows, pl.ds(base + c * chunk, chunk)) for c in range(slice_w // chunk)]
  for c, h in enumerate(hs):
    q = jnp.clip(h.astype(_F32) / sx, -e4m3_max, e4m3_max).astype(q_ref.dtype)
    _set_rows(q_ref, t0, rows, pl.ds(base + c * chunk, chunk), q)

  @pl.when(p == 0)
  def _():
    sx_ref[pl.ds(t0, rows), :] = (jnp.full((1, 1), sx, _F32) if rows == 1 else sx)


def default_num_warps(width: int, rows: int) -> int:
  """Warps per row program. H100 (profiler, Llama-8B rows): SwiGLU rows of 14336 5.66 / 5.52 us at
  8 / 16 warps for 64 rows and 46.3 / 41.9 us for 1024 rows; plain rows of 4096 ~1.5 us at 4-16
  warps for 64 rows and 3.7 / 4.0 / 4.6 us at 4 / 8 / 16 warps for 1024 rows."""
  del rows
  return 16 if width >= 8192 else 4


def default_tiling(width: int, t: int, glu: bool) -> Tiling:
  """The tiling a call of t rows of ``width`` outputs uses: one row per program; the row amax as
  one reduction above 64 rows (H100, SwiGLU rows of 14336 at 1024 rows: 38.7 vs 43.1 us), one
  per chunk up to 64 (decode: 5.65 vs 5.74 us isolated, and 7.0 vs 8.4 us per call in serving)."""
  del width, glu
  return Tiling(amax_once=t > 64)


# SwiGLU calls (``silu_mul_quantize``) of at most CLUSTER_MAX_ROWS rows (decode steps) on a Hopper
# GPU run the Mosaic GPU kernel with each row split over a thread-block cluster of this many CTAs
# (kernels/fp8_act_quant_mgpu.py) instead of the Triton kernel, where it takes the shape: the same
# values where its cross-CTA exchange is right (H100, 64 x 2x14336: 4.3-4.6 vs 5.65-7.2 us per
# call; in serving 0.167 vs 0.224 ms per decode step, but no tok/s gain in the final same-run set).
# OPEN BUG: in the final H100 check the 8-CTA form gave different codes from the Triton kernel in
# 0.02% of the values at 1024 rows (a race in the exchange; never seen at 64 rows): off by
# default, opt-in for experiments only. ``quantize_rows`` stays on the Triton kernel. 0: off.
CLUSTER = int(os.environ.get("JAXINFER_ACT_QUANT_CLUSTER", "0"))
CLUSTER_MAX_ROWS = 64


def _cluster_for(x: jax.Array, glu: bool, interpret: bool, tiling) -> int:
  """The cluster size of the Mosaic GPU kernel this call runs, or 0 for the Triton kernel."""
  if (not glu or tiling is not None or interpret or not CLUSTER or x.ndim != 2
      or x.shape[0] > CLUSTER_MAX_ROWS):
    return 0
  from kernels import fp8_act_quant_mgpu as am
  return CLUSTER if am.on_hopper() and am.supports(x, glu, CLUSTER) else 0


def _pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def _call(x, row_scale, col_scale, *, glu: bool, interpret: bool, name: str,
          tiling: Tiling | None):
  from jaxinfer.ops import _TINY_AMAX, E4M3_MAX
  if not supports(x, glu):
    raise ShapeError(f"{name} takes x [T, K] of a float dtype with its {'half ' if glu else ''}"
                     f"row width a multiple of a power of two in [16, 2048] (<= 32 of them); got "
                     f"{x.shape} {x.dtype}")
  T, K = x.shape
  scaled = check_product_scales(f"{name}:", row_scale, col_scale, T, K)
  width = K // 2 if glu else K
  t = tiling or default_tiling(width, T, glu)
  rows = t.rows if _pow2(t.rows) and T % t.rows == 0 else 1
  split = t.split if _pow2(t.split) and width % t.split == 0 else 1
  if split > 1 and chunk_width(width // split) is None:
    split = 1
  amax_once = t.amax_once or rows > 1 or split > 1 or t.reload
  num_warps = t.num_warps or default_num_warps(width, T)
  args = (x,) + ((row_scale.astype(_F32), col_scale.astype(_F32)) if scaled else ())
  out_q = jax.ShapeDtypeStruct((T, width), jnp.float8_e4m3fn)
  out_sx = jax.ShapeDtypeStruct((T, 1), _F32)
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  consts = dict(tiny=_TINY_AMAX, e4m3_max=E4M3_MAX)
  if split == 1:
    return tuple(pl.pallas_call(
        functools.partial(_kernel, width=width, chunk=chunk_width(width), rows=rows, glu=glu,
                          scaled=scaled, reload=t.reload, amax_once=amax_once,
                          interleave=t.interleave, **consts),
        grid=(T // rows,), out_shape=[out_q, out_sx], compiler_params=params,
        interpret=interpret, name=name)(*args))
  slice_w = width // split
  chunk = chunk_width(slice_w)
  h, am = pl.pallas_call(
      functools.partial(_slice_kernel, width=width, slice_w=slice_w, chunk=chunk, rows=rows,
                        glu=glu, scaled=scaled),
      grid=(T // rows, split),
      out_shape=[jax.ShapeDtypeStruct((T, width), x.dtype), jax.ShapeDtypeStruct((T, split), _F32)],
      compiler_params=params, interpret=interpret, name=name + "_slices")(*args)
  return tuple(pl.pallas_call(
      functools.partial(_quantize_kernel, slice_w=slice_w, chunk=chunk, rows=rows, **consts),
      grid=(T // rows, split), out_shape=[out_q, out_sx], compiler_params=params,
      interpret=interpret, name=name)(h, am))


@functools.partial(jax.jit, static_argnames=("interpret", "tiling"))
def quantize_rows(x: jax.Array, *, interpret: bool = False, tiling: Tiling | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """(E4M3 rows [T, K], f32 scales [T, 1]) of x [T, K], as ``ops.quantize_rows_fp8``.
  ``tiling``: None for ``default_tiling`` (or the cluster kernel: ``CLUSTER``)."""
  if c := _cluster_for(x, False, interpret, tiling):
    from kernels import fp8_act_quant_mgpu as am
    return am.quantize_rows(x, tiling=am.ClusterTiling(c, am.DIRECT))
  return _call(x, None, None, glu=False, interpret=interpret, name="quantize_rows_fp8",
               tiling=tiling)


@functools.partial(jax.jit, static_argnames=("interpret", "tiling"))
def silu_mul_quantize(gate_up: jax.Array, row_scale=None, col_scale=None, *,
                      interpret: bool = False, tiling: Tiling | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """(E4M3 rows of silu(gate) * up [T, I], f32 scales [T, 1]) of gate_up [T, 2I] (with the FP8
  product's row / column scales, if given); see the module docstring. ``tiling``: None for
  ``default_tiling`` (or the cluster kernel: ``CLUSTER``)."""
  if c := _cluster_for(gate_up, True, interpret, tiling):
    from kernels import fp8_act_quant_mgpu as am
    return am.silu_mul_quantize(gate_up, row_scale, col_scale,
                                tiling=am.ClusterTiling(c, am.DIRECT))
  return _call(gate_up, row_scale, col_scale, glu=True, interpret=interpret,
               name="silu_mul_fp8", tiling=tiling)
