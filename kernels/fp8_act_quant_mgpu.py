"""Per-row FP8 (E4M3) activation quantization (alone or after SwiGLU) as a Mosaic GPU kernel whose
rows are split over a thread-block cluster: the decode-step form of ``kernels.fp8_act_quant``.

  quantize_rows(x [T, K])                         -> (E4M3 rows [T, K], f32 scales [T, 1])
  silu_mul_quantize(gate_up [T, 2I], row, col)    -> (E4M3 rows of silu(gate) * up [T, I], [T, 1])

Same math and roundings as ``kernels.fp8_act_quant`` (its plain-JAX references are this module's
too): the FP8 product's scaling y = raw * row * col rounded to the dtype, silu in float32 from the
rounded gate, rounded, times up, rounded; per row sx = max(amax, tiny) / 448 and
E4M3(clip(h / sx)).

Why: a decode step quantizes T = 64 rows. The Triton kernel runs one program per row, so 64 of the
H100's 132 SMs each stream a whole row (for the SwiGLU 57 KB of bf16 product plus 114 KB of f32
column scales) and do its 14336 sigmoids and divisions: latency-bound, 7 us per call in serving.
Splitting a row over several programs needs the row amax across them; here the C programs of a row
are one thread-block cluster (C <= 8, co-scheduled by the hardware), so they can wait for each
other: each stores its slice's amax into its 16-byte slot of a small f32 [T, C, 4] buffer in
global memory with TMA (every slot is written before it is read: no initialisation) and waits for
the store, arrives on a cluster barrier (release), waits (acquire), then loads its row's C slots
with TMA and takes their max (``cluster_reduce``). T * C CTAs of one warpgroup each.

The first form of the exchange (plain global stores and loads of the slots) was wrong on the H100
at 1024 rows (0.5-1.1% of the rows got a wrong scale: a stale or early read; right at 64 rows in
every check): TMA reads go through L2, and their issue follows the barrier wait. With it, the
``direct`` form (plain loads of the data, plain stores of the codes) matched the Triton kernel bit
for bit in every H100 check (w5: 8 input sets at 64 rows, 4 at 1024, 4 and 8 CTAs; a 2-layer
decode step's logprobs), but the TMA-staged form still gave a wrong scale in ~0.1% of the rows at
1024 rows (4 CTAs; cause not found): it is not used by the dispatch (``DIRECT``). OPEN BUG: in
the final H100 check (w6) the direct form with 8 CTAs also gave codes different from the Triton
kernel at 1024 rows (0.024% of the codes over 8 input sets, the scales identical); never at 64 rows.
Until found, the dispatch (``kernels.fp8_act_quant.CLUSTER``) is off by default: experiments only.

Measured (H100, profiler, 64 x 2x14336, SwiGLU with scales): direct, 8 CTAs per row 4.28 / 4.53 us
vs the Triton kernel's 5.64-5.69 / 7.23 (w4 / w5); in serving (w4, the first exchange) 0.167 vs
0.224 ms per decode step. 1024 rows: 39.5 us vs 38.7 (Triton, one reduction).

Layout / tiling: inputs viewed as [T, K / 128, 128] (a free reshape; TMA boxes of at most 256 per
dimension): CTA (t, c) copies its row's slice c of W = K / C columns (W / 128 rows of 128: gate
and up, and their column scales) into shared memory with TMA, computes in registers (W / 128
values per thread and array), exchanges the amax, writes its E4M3 codes to shared memory and
stores them with TMA; CTA (t, 0) writes the row scale. Shared memory: W (2 + 2 + 4 + 4 + 1) bytes
(SwiGLU with scales), 46 KB at W = 3584. Roofline as ``kernels.fp8_act_quant``: 4.6 MB at T = 64,
I = 14336, ~1.5 us of HBM time; the cluster spreads it over T * C CTAs.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxinfer.errors import ShapeError
from kernels.add_rms_norm import check_product_scales
from kernels.fp8_decode_matmul_mgpu import on_hopper  # noqa: F401  (re-exported for the dispatch)

LANES = 128       # the minor dimension of every shared-memory tile (TMA box <= 256)
# The form the kernels take when dispatched from kernels/fp8_act_quant.py / add_rms_norm.py
# (their CLUSTER switches): plain global loads / stores (1, the default: faster, and the only form
# bit-identical in every H100 check) or TMA through shared memory (0; see the module docstring).
DIRECT = os.environ.get("JAXINFER_CLUSTER_DIRECT", "1") not in ("", "0")
MAX_CLUSTER = 8   # portable thread-block cluster size
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ClusterTiling:
  """``cluster``: CTAs per row (a power of two <= 8 whose slices are whole multiples of 128).
  ``direct``: the slices loaded from global memory into registers and the codes stored from
  registers (no TMA, no shared-memory staging, no barrier wait before the math)."""
  cluster: int = 4
  direct: bool = False


def supports(x: jax.Array, glu: bool, cluster: int = 4) -> bool:
  """2-D x of a 16/32-bit float dtype whose (half, for ``glu``) row width splits into ``cluster``
  slices of a multiple of 128 columns."""
  if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    return False
  k = x.shape[1]
  if glu:
    if k % 2:
      return False
    k //= 2
  return (cluster in (1, 2, 4, 8) and k % (LANES * cluster) == 0
          and k // cluster <= 32 * LANES)


EX = 4   # f32 words per exchange slot: 16 bytes, the smallest TMA box


def cluster_reduce(v, am_ref, ex_s, all_s, bar, cbar, t, c, cluster: int, op=jnp.maximum):
  """``op`` (max, or e.g. add) over the row's cluster of each CTA's scalar v, in the order of the
  CTAs, through global memory by TMA only:
  each CTA stores its value ([1, EX] from shared memory) into its slot of am_ref [T, C, EX] and
  waits for the store to complete, arrives on the cluster barrier (release), waits for every
  CTA (acquire), then loads the row's C slots with TMA (through L2: no stale L1 line, no plain
  load the compiler could hoist above the wait)."""
  for i in range(EX):
    ex_s[0, i] = v
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(ex_s, am_ref.at[t, pl.ds(c, 1)])
  plgpu.wait_smem_to_gmem(0)
  plgpu.barrier_arrive(cbar)
  plgpu.barrier_wait(cbar)
  plgpu.copy_gmem_to_smem(am_ref.at[t], all_s, bar)
  plgpu.barrier_wait(bar)
  m = all_s[0, 0]
  for p in range(1, cluster):
    m = op(m, all_s[p, 0])
  return m


def store_codes(v, amax, q_ref, sx_ref, t, c, cols, *, tiny: float, e4m3_max: float, q_s=None):
  """The end of every cluster kernel here: the row's scale sx = max(amax, tiny) / E4M3 max, this
  CTA's codes clip(v / sx) stored to q_ref[t, cols] (through q_s and a TMA store when given, the
  store waited for at the end), and CTA 0 of the cluster writes sx_ref[t, 0]."""
  sx = jnp.maximum(amax, tiny) / e4m3_max
  codes = jnp.clip(v / sx, -e4m3_max, e4m3_max)
  if q_s is None:
    q_ref[t, cols] = codes.astype(q_ref.dtype)
  else:
    q_s[...] = codes.astype(q_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_s, q_ref.at[t, cols])

  @pl.when(c == 0)
  def _():
    sx_ref[t, 0] = sx

  if q_s is not None:
    plgpu.wait_smem_to_gmem(0)


def _direct_kernel(*refs, width: int, cluster: int, glu: bool, scaled: bool, tiny: float,
                   e4m3_max: float):
  """``_kernel`` with plain global-memory loads and stores (``ClusterTiling.direct``)."""
  it = iter(refs)
  x_ref = next(it)
  rs_ref, cs_ref = (next(it), next(it)) if scaled else (None, None)
  q_ref, sx_ref, am_ref = next(it), next(it), next(it)
  ex_s, all_s, xbar, cbar = next(it), next(it), next(it), next(it)
  dtype = x_ref.dtype
  t, c = lax.axis_index("t"), lax.axis_index("c")
  n = width // cluster // LANES
  b = c * n
  half = width // LANES
  row = rs_ref[t] if scaled else None

  def load(off):
    v = x_ref[t, pl.ds(off, n)]
    if scaled:
      v = (v.astype(_F32) * row * cs_ref[pl.ds(off, n)]).astype(dtype)
    return v

  h = load(b)
  if glu:
    up = load(half + b)
    g = h.astype(_F32)
    silu = (g * jax.nn.sigmoid(g)).astype(dtype).astype(_F32)
    h = (silu * up.astype(_F32)).astype(dtype)
  h = h.astype(_F32)
  amax = cluster_reduce(jnp.max(jnp.abs(h)), am_ref, ex_s, all_s, xbar, cbar, t, c, cluster)
  store_codes(h, amax, q_ref, sx_ref, t, c, pl.ds(b, n), tiny=tiny, e4m3_max=e4m3_max)


def _kernel(*refs, width: int, cluster: int, glu: bool, scaled: bool, tiny: float,
            e4m3_max: float):
  """Refs: x [T, K/128, 128], [row scales [T], column scales [K/128, 128],] codes [T, W/128, 128],
  scales [T, 1], slice amaxes [T, C]; scratch: x slices (gate[, up]), [their column scales,] codes,
  the TMA barrier, the cluster barrier."""
  it = iter(refs)
  x_ref = next(it)
  rs_ref, cs_ref = (next(it), next(it)) if scaled else (None, None)
  q_ref, sx_ref, am_ref = next(it), next(it), next(it)
  g_s = next(it)
  u_s = next(it) if glu else None
  cg_s = next(it) if scaled else None
  cu_s = next(it) if scaled and glu else None
  q_s, bar, ex_s, all_s, xbar, cbar = next(it), next(it), next(it), next(it), next(it), next(it)
  dtype = x_ref.dtype
  t, c = lax.axis_index("t"), lax.axis_index("c")
  n = width // cluster // LANES                    # tile rows of this CTA's slice
  b = c * n
  half = width // LANES                            # the up columns' offset (in tile rows)
  plgpu.copy_gmem_to_smem(x_ref.at[t, pl.ds(b, n)], g_s, bar)
  if glu:
    plgpu.copy_gmem_to_smem(x_ref.at[t, pl.ds(half + b, n)], u_s, bar)
  if scaled:
    plgpu.copy_gmem_to_smem(cs_ref.at[pl.ds(b, n)], cg_s, bar)
    if glu:
      plgpu.copy_gmem_to_smem(cs_ref.at[pl.ds(half + b, n)], cu_s, bar)
  row = rs_ref[t] if scaled else None
  plgpu.barrier_wait(bar)

  def load(v_s, c_s):
    v = v_s[...]
    if scaled:
      v = (v.astype(_F32) * row * c_s[...]).astype(dtype)
    return v

  h = load(g_s, cg_s)
  if glu:
    g = h.astype(_F32)
    silu = (g * jax.nn.sigmoid(g)).astype(dtype).astype(_F32)
    h = (silu * load(u_s, cu_s).astype(_F32)).astype(dtype)
  h = h.astype(_F32)
  amax = cluster_reduce(jnp.max(jnp.abs(h)), am_ref, ex_s, all_s, xbar, cbar, t, c, cluster)
  store_codes(h, amax, q_ref, sx_ref, t, c, pl.ds(b, n), tiny=tiny, e4m3_max=e4m3_max, q_s=q_s)


def _call(x, row_scale, col_scale, *, glu: bool, interpret: bool, name: str,
          tiling: ClusterTiling | None):
  from jaxinfer.ops import _TINY_AMAX, E4M3_MAX
  t = tiling or ClusterTiling()
  if not supports(x, glu, t.cluster):
    raise ShapeError(f"{name} takes x [T, K] of a float dtype with its {'half ' if glu else ''}row "
                     f"width a multiple of {LANES} * {t.cluster} (<= {32 * LANES} per CTA); got "
                     f"{x.shape} {x.dtype}")
  T, K = x.shape
  scaled = check_product_scales(f"{name}:", row_scale, col_scale, T, K)
  width = K // 2 if glu else K
  C = t.cluster
  n = width // C // LANES
  args = [x.reshape(T, K // LANES, LANES)]
  if scaled:
    args += [row_scale.astype(_F32).reshape(T), col_scale.astype(_F32).reshape(K // LANES, LANES)]
  exchange = [plgpu.SMEM((1, EX), _F32), plgpu.SMEM((C, EX), _F32),
              plgpu.Barrier(num_arrivals=1), plgpu.ClusterBarrier(collective_axes=("c",))]
  if t.direct:
    scratch = exchange
  else:
    scratch = [plgpu.SMEM((n, LANES), x.dtype)] * (2 if glu else 1)
    if scaled:
      scratch += [plgpu.SMEM((n, LANES), _F32)] * (2 if glu else 1)
    copies = (2 if glu else 1) * (2 if scaled else 1)   # TMA copies arriving on the barrier
    scratch += [plgpu.SMEM((n, LANES), jnp.float8_e4m3fn), plgpu.Barrier(num_arrivals=copies),
                *exchange]
  q, sx, _ = plgpu.kernel(
      functools.partial(_direct_kernel if t.direct else _kernel, width=width, cluster=C,
                        glu=glu, scaled=scaled, tiny=_TINY_AMAX, e4m3_max=E4M3_MAX),
      out_type=(jax.ShapeDtypeStruct((T, width // LANES, LANES), jnp.float8_e4m3fn),
                jax.ShapeDtypeStruct((T, 1), _F32), jax.ShapeDtypeStruct((T, C, EX), _F32)),
      scratch_types=scratch,
      grid=(T,), grid_names=("t",), cluster=(C,), cluster_names=("c",),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      kernel_name=name,
  )(*args)
  return q.reshape(T, width), sx


@functools.partial(jax.jit, static_argnames=("interpret", "tiling"))
def quantize_rows(x: jax.Array, *, interpret: bool = False, tiling: ClusterTiling | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """(E4M3 rows [T, K], f32 scales [T, 1]) of x [T, K], as ``ops.quantize_rows_fp8``."""
  return _call(x, None, None, glu=False, interpret=interpret, name="quantize_rows_fp8_mgpu",
               tiling=tiling)


@functools.partial(jax.jit, static_argnames=("interpret", "tiling"))
def silu_mul_quantize(gate_up: jax.Array, row_scale=None, col_scale=None, *,
                      interpret: bool = False, tiling: ClusterTiling | None = None
                      ) -> tuple[jax.Array, jax.Array]:
  """(E4M3 rows of silu(gate) * up [T, I], f32 scales [T, 1]) of gate_up [T, 2I] (with the FP8
  product's row / column scales, if given), as ``kernels.fp8_act_quant.silu_mul_quantize``."""
  return _call(gate_up, row_scale, col_scale, glu=True, interpret=interpret,
               name="silu_mul_fp8_mgpu", tiling=tiling)
