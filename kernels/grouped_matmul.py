"""Grouped (MoE) GEMM with jax.lax.ragged_dot semantics, in Pallas (Triton lowering).

y[T, N] where rows of x [T, K] are sorted by group: rows starts[g] .. starts[g] + sizes[g] use
expert g's weight; rows past sum(group_sizes) are zero. Weights:
  bf16/f16/f32 [E, K, N]                                  (ragged_dot's rhs layout)
  NVFP4  packed u8 [E, N, K/2], scales e4m3 [E, N, K/16], global f32 [E]   (ModelOpt per expert)
  FP8    e4m3 [E, N, K], scale_inv f32 [E, N/128, K/128]; x quantized 1x128 on the fly (DeepSeek)

Schedule: the rows are cut into group-aligned tiles of bm rows (a group of s rows takes
cdiv(s, bm) tiles; one extra pseudo-group covers rows past the total and writes zeros). The static
tile count cdiv-bounds T // bm + E + 1; unused tiles do no work. Empty groups get no tiles, skewed
routing just gives a group more tiles. Grid (tiles, cdiv(N, bn)); each program reads its tile's
(group, row_start, row_end) from the schedule, streams that expert's weight tile over K,
dequantizes in registers (NVFP4: kernels/nvfp4_matmul.dequant_tile) and runs bf16 / fp8 MMA.

Kernel-layout NVFP4 (``grouped_matmul_nvfp4_kl``, bytes from kernels/quant/nvfp4.to_kernel_layout):
the same schedule with the dense decode kernel's dequantization (nvfp4_matmul.kl_tile_dot: two
K-contiguous halves per 256-wide byte tile, no interleave), bk = 256 per byte tile, block_k / 256
tiles per loop step. ``grouped_swiglu_nvfp4_kl`` is the MoE's gate and up projections in one
kernel: a program owns bn columns of both weights for its row tile (two [bn, 128] byte tiles per
K tile against one x slice) and writes silu(x Wg) * (x Wu) from its two f32 accumulators.
``Tiling.programs`` replaces the one-program-per-tile grid by P programs per N tile that loop
over the used tiles (at decode most of the T // bm + E + 1 slots have no tile). x may come in
f16 (``x_for_kl``): the f16 dequant routes then skip the per-tile conversion in the K loop.

Target roofline (H100, E=32, K=7168, N=2048): decode T=64 reads every expert's weight once:
NVFP4 264 MB -> ~88 us at 3 TB/s (bf16 ragged_dot moves 940 MB); prefill T=8192: 240 GFLOP ->
~0.35 ms at the bf16 MMA rate; the expected loss is the partial last tile of each group
(E * bm/2 wasted rows ~ 25% at bm=128, 256-row groups). DeepSeek-V3 decode B=64 (512 rows on
~194 of 256 experts, N/K 2048/7168 and 7168/2048): 4.8 GB of NVFP4 experts per layer -> ~1.6 ms
at 3 TB/s; measured (benchmarks/deepseek.md) 2.18 TB/s for the fused gate/up kernel and 2.35 TB/s
for the down projection (72-78% of the read ceiling). The 16-row MMA tile carries ~2.6 real rows
per expert, so every kernel here is bound by the dequantization's instruction issue and its
latency (few warps per SM), not by the tensor cores.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError
from kernels import fp8_block_matmul
from kernels.nvfp4_matmul import (check_asm_layout, global_factor, k_block, kl_dequant_half,
                                  kl_global_factor, kl_mode_for, kl_tile_dot, mode_for,
                                  row_scales, tile_dot)
from kernels.quant import fp8_block, nvfp4


@dataclasses.dataclass(frozen=True)
class Tiling:
  block_m: int = 16
  block_n: int = 64
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 3
  x_even_odd: bool = False   # NVFP4 only: see kernels/nvfp4_matmul.Tiling
  dequant: str = "f32"       # NVFP4 only: kernels/nvfp4_matmul.DEQUANT_MODES
  w_as_a: bool = False       # NVFP4 only: weight tile as the MMA's A operand (y^T = W x^T)
  x_scale: bool = False      # NVFP4 f16 routes only: per-row power-of-two prescale of x
  load_3d: bool = False      # NVFP4 only: bytes loaded as [bn, bk/16, 8] (nvfp4_matmul.Tiling)
  # 0: one program per schedule tile and N tile (the static tile bound T // bm + E + 1 leaves
  # programs with no tile, which still launch and read the schedule). P > 0: P programs per N
  # tile, program p looping over tiles p, p + P, ... below the number of used tiles.
  programs: int = 0


# NVFP4 dequantization route / x prescale at <= 64 rows per group (decode); see
# kernels/nvfp4_matmul.DEQUANT_MODES. Prefill-sized groups keep the bf16-MMA "f32" route.
DECODE_DEQUANT = "f32"
DECODE_X_SCALE = False


def default_tiling(t: int, n: int, num_groups: int, fmt: str) -> Tiling:
  rows_per_group = t / max(1, num_groups)
  nv = {"dequant": DECODE_DEQUANT, "x_scale": DECODE_X_SCALE} if fmt == "nvfp4" else {}
  if rows_per_group <= 16:
    return Tiling(16, 64, 128 if fmt == "fp8" else 256, 4, 4, **nv)
  if rows_per_group <= 64:
    return Tiling(64, 64, 128, 4, 3, **nv)
  return Tiling(128, 128, 128 if fmt == "fp8" else 64, 8, 3)


def make_schedule(group_sizes: jax.Array, num_rows: int, block_m: int) -> jax.Array:
  """int32 [3, T // bm + E + 1]: per tile (group, row_start, row_end).

  group in [0, E) computes; group == E writes zeros (rows past the total); -1 means unused.
  """
  e = group_sizes.shape[0]
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  starts_all = jnp.concatenate([starts, ends[-1:]])
  ends_all = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
  tiles = (ends_all - starts_all + block_m - 1) // block_m
  tile_end = jnp.cumsum(tiles)
  tile_start = tile_end - tiles
  max_tiles = num_rows // block_m + e + 1
  i = jnp.arange(max_tiles, dtype=jnp.int32)
  # compare_all: one elementwise + reduce fusion ([max_tiles, E + 1] compares); the default
  # "scan" method is a while loop of ~log2(E) steps, each its own small kernels on the GPU
  g = jnp.searchsorted(tile_end, i, side="right", method="compare_all").astype(jnp.int32)
  gc = jnp.minimum(g, e)
  row_start = starts_all[gc] + (i - tile_start[gc]) * block_m
  valid = g <= e
  group = jnp.where(valid, g, -1)
  return jnp.stack([group, jnp.where(valid, row_start, 0), jnp.where(valid, ends_all[gc], 0)])


def _over_tiles(tile_fn, programs: int):
  """Kernel (sched_ref, count_ref, *refs) running ``tile_fn(tile, n_tile, sched_ref, *refs)``
  for its schedule tile (programs == 0: program_id(0) is the tile) or, with ``programs`` = P > 0,
  for tiles program_id(0) + i * P below count_ref[0] (the number of used tiles)."""
  def kernel(sched_ref, count_ref, *refs):
    pid, pid_n = pl.program_id(0), pl.program_id(1)   # (read outside the loop: interpret mode)
    if programs == 0:
      tile_fn(pid, pid_n, sched_ref, *refs)
      return

    def body(i, carry):
      tile_fn(pid + i * programs, pid_n, sched_ref, *refs)
      return carry

    jax.lax.fori_loop(0, (count_ref[0] - pid + programs - 1) // programs, body, 0)
  return kernel


def used_tiles(sched: jax.Array, programs: int) -> jax.Array:
  """int32 [1]: how many schedule tiles are used (they come first); a constant 0 when the kernel
  does not read it (programs == 0: no extra XLA op)."""
  if programs == 0:
    return jnp.zeros((1,), jnp.int32)
  return jnp.sum(sched[0] >= 0, dtype=jnp.int32).reshape(1)


def _schedule_tile(sched_ref, pid_t, pid_n, *, bm: int, bn: int, n: int):
  """Schedule entry pid_t (group g, rows r0..r1) and output-column tile pid_n: the group, row
  range, first column, and the row / column / output masks of the [bm, bn] tile."""
  g = sched_ref[0, pid_t]
  r0 = sched_ref[1, pid_t]
  r1 = sched_ref[2, pid_t]
  n0 = pid_n * bn
  row_ok = (r0 + jnp.arange(bm)) < r1
  col_ok = (n0 + jnp.arange(bn)) < n
  return g, r0, r1, n0, row_ok, col_ok, row_ok[:, None] & col_ok[None, :]


def _kernel(pid_t, pid_n, sched_ref, *refs, fmt, e, n, k, bm, bn, bk, k_steps, mask_k, x_even_odd, mode,
            w_as_a, x_scale, load_3d):
  xinv_ref = xmul_ref = None
  if fmt == "nvfp4" and x_scale:
    x_ref, xinv_ref, xmul_ref, wq_ref, ws_ref, gs_ref, o_ref = refs
  elif fmt in ("nvfp4", "nvfp4_kl"):
    x_ref, wq_ref, ws_ref, gs_ref, o_ref = refs
  elif fmt == "fp8":
    xq_ref, xs_ref, w_ref, ws_ref, o_ref = refs
  else:
    x_ref, w_ref, o_ref = refs
  g, r0, r1, n0, row_ok, col_ok, out_mask = _schedule_tile(sched_ref, pid_t, pid_n,
                                                            bm=bm, bn=bn, n=n)

  def both(a, b):
    return a[:, None] if b is None else a[:, None] & b[None, :]

  def load_w(ref, idx, mask):
    """Weight tile; fp8 loads take no fill value (Triton cannot splat an int into f8): their
    masked lanes only reach output columns that are never stored, or scales zeroed later."""
    if mask is None:
      return ref[idx]
    other = None if jnp.issubdtype(ref.dtype, jnp.floating) and ref.dtype.itemsize == 1 else 0
    return plgpu.load(ref.at[idx], mask=mask, other=other)

  masked_n = n % bn != 0

  @pl.when((g >= 0) & (g < e))
  def _compute():
    x_inv = x_mul = None
    if xinv_ref is not None:
      x_inv = plgpu.load(xinv_ref.at[pl.ds(r0, bm)], mask=row_ok, other=1.0)
      x_mul = plgpu.load(xmul_ref.at[pl.ds(r0, bm)], mask=row_ok, other=1.0)

    def body(i, acc):
      k0 = pl.multiple_of(i * bk, bk)
      if fmt == "fp8":
        a = plgpu.load(xq_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], mask=row_ok[:, None])
        a_s = plgpu.load(xs_ref.at[pl.ds(r0, bm), i], mask=row_ok, other=0)
        b = load_w(w_ref, (g, pl.ds(n0, bn), pl.ds(k0, bk)), col_ok[:, None] if masked_n else None)
        b_s = fp8_block_matmul.weight_scale_row(
            lambda j, c: ws_ref[g, pl.ds(j, c), i], n0, bn, n)
        return acc + plgpu.dot(a, b, trans_b=True) * (a_s[:, None] * b_s[None, :])
      if fmt == "dense":
        kx_ok = ((k0 + jnp.arange(bk)) < k) if mask_k else None
        x = plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], mask=both(row_ok, kx_ok), other=0)
        wmask = None
        if masked_n or mask_k:
          wmask = both(kx_ok if mask_k else jnp.full((bk,), True), col_ok)
        w = load_w(w_ref, (g, pl.ds(k0, bk), pl.ds(n0, bn)), wmask)
        return acc + plgpu.dot(x, w)
      if fmt == "nvfp4_kl":   # bk = 256 * tiles per step: kernel-layout byte tiles [bn, 128]
        tile_k = nvfp4.KERNEL_TILE
        half, groups = tile_k // 2, tile_k // 32
        for j in range(bk // tile_k):
          t = i * (bk // tile_k) + j
          wq = load_w(wq_ref, (g, pl.ds(n0, bn), pl.ds(pl.multiple_of(t * half, half), half)),
                      col_ok[:, None] if masked_n else None)

          def load_scale(h, t=t):
            ks = pl.multiple_of(t * 2 * groups + h * groups, groups)
            return load_w(ws_ref, (g, pl.ds(n0, bn), pl.ds(ks, groups)),
                          col_ok[:, None] if masked_n else None)

          def load_x(h, t=t):
            kx = pl.multiple_of(t * tile_k + h * half, half)
            return plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(kx, half)], mask=row_ok[:, None],
                              other=0)

          acc = kl_tile_dot(acc, load_x, wq, load_scale, mode, w_as_a)
        return acc
      kp, ks = pl.multiple_of(k0 // 2, bk // 2), k0 // 16
      kp_ok = ((kp + jnp.arange(bk // 2)) < k // 2) if mask_k else None
      ks_ok = ((ks + jnp.arange(bk // 16)) < k // 16) if mask_k else None
      need = masked_n or mask_k
      if load_3d:   # wq_ref is [E, N, K/16, 8]
        wq = load_w(wq_ref, (g, pl.ds(n0, bn), pl.ds(ks, bk // 16), slice(None)),
                    jnp.broadcast_to(both(col_ok, ks_ok)[:, :, None], (bn, bk // 16, 8))
                    if need else None)
      else:
        wq = load_w(wq_ref, (g, pl.ds(n0, bn), pl.ds(kp, bk // 2)),
                    both(col_ok, kp_ok) if need else None)
      ws = load_w(ws_ref, (g, pl.ds(n0, bn), pl.ds(ks, bk // 16)),
                  both(col_ok, ks_ok) if need else None)
      kx_ok = ((k0 + jnp.arange(bk)) < k) if mask_k else None
      x = plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], mask=both(row_ok, kx_ok), other=0)
      return tile_dot(acc, x, wq, ws, ks_ok, mode, x_even_odd, w_as_a, x_inv)

    acc_shape = (bn, bm) if w_as_a else (bm, bn)
    acc = jax.lax.fori_loop(0, k_steps, body, jnp.zeros(acc_shape, jnp.float32))
    if fmt == "nvfp4":
      acc = acc * (gs_ref[g] * global_factor(mode))
    elif fmt == "nvfp4_kl":
      acc = acc * (gs_ref[g] * kl_global_factor(mode))
    if x_mul is not None:
      acc = acc * (x_mul[None, :] if w_as_a else x_mul[:, None])
    if w_as_a:
      acc = acc.T
    plgpu.store(o_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=out_mask)

  @pl.when(g == e)
  def _zeros():
    plgpu.store(o_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], jnp.zeros((bm, bn), o_ref.dtype),
                mask=out_mask)


def check_grouped_inputs(x: jax.Array, group_sizes: jax.Array, e: int) -> None:
  """Input checks every grouped GEMM shares (also the Mosaic GPU FP8 one): x [T, K], integer
  group_sizes [E]."""
  if x.ndim != 2:
    raise ShapeError(f"x must be [T, K], got {x.shape}")
  if group_sizes.ndim != 1 or group_sizes.shape[0] != e:
    raise ShapeError(f"group_sizes must be [E={e}], got {group_sizes.shape}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ShapeError(f"group_sizes must be integer, got {group_sizes.dtype}")


def _run(fmt, operands, x, group_sizes, e, n, k, tiling, interpret, out_dtype):
  t_rows = x.shape[0]
  t = tiling or default_tiling(t_rows, n, e, fmt)
  if fmt == "fp8":
    bk, mask_k = fp8_block.BLOCK, False
  elif fmt == "nvfp4_kl":   # block_k: a multiple of the layout's 256 dividing K, else 256
    bk, mask_k = nvfp4.KERNEL_TILE, False
    if t.block_k % bk == 0 and k % t.block_k == 0:
      bk = t.block_k
  else:
    bk, mask_k = k_block(k, t.block_k)
  if fmt == "fp8":
    if n % t.block_n and t.block_n > fp8_block.BLOCK:
      raise ShapeError(f"block_n {t.block_n} > 128 needs N % block_n == 0 (N={n})")
  sched = make_schedule(group_sizes, t_rows, t.block_m)
  if fmt == "nvfp4_kl":
    mode = kl_mode_for(t.dequant, interpret)
  else:
    mode = mode_for(t.dequant, interpret) if fmt == "nvfp4" else "f32"
    check_asm_layout(mode, t.x_even_odd)
  x_scale = t.x_scale and mode != "f32" and fmt == "nvfp4"
  if x_scale:
    operands = (operands[0], *row_scales(operands[0]), *operands[1:])
  load_3d = t.load_3d and fmt == "nvfp4"
  if load_3d:
    i = 3 if x_scale else 1
    operands = (*operands[:i], operands[i].reshape(e, n, k // 16, 8), *operands[i + 1:])
  tile_fn = functools.partial(_kernel, fmt=fmt, e=e, n=n, k=k, bm=t.block_m, bn=t.block_n, bk=bk,
                              k_steps=-(-k // bk), mask_k=mask_k,
                              x_even_odd=t.x_even_odd and fmt == "nvfp4",
                              mode=mode, w_as_a=t.w_as_a and fmt in ("nvfp4", "nvfp4_kl"),
                              x_scale=x_scale,
                              load_3d=load_3d)
  return pl.pallas_call(
      _over_tiles(tile_fn, t.programs), out_shape=jax.ShapeDtypeStruct((t_rows, n), out_dtype),
      grid=(t.programs or sched.shape[1], pl.cdiv(n, t.block_n)), interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      name=f"grouped_matmul_{fmt}",
  )(sched, used_tiles(sched, t.programs), *operands)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def grouped_matmul_dense(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                         tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """ragged_dot(x [T, K], w [E, K, N], group_sizes [E]) with a float weight (cast to x's dtype)."""
  if w.ndim != 3:
    raise ShapeError(f"grouped weight must be [E, K, N], got {w.shape}")
  e, k, n = w.shape
  check_grouped_inputs(x, group_sizes, e)
  if x.shape[1] != k:
    raise ShapeError(f"x has K={x.shape[1]} but the weight has K={k}")
  return _run("dense", (x, w.astype(x.dtype)), x, group_sizes, e, n, k, tiling, interpret,
              x.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def grouped_matmul_nvfp4(x: jax.Array, packed: jax.Array, scale: jax.Array,
                         global_scale: jax.Array, group_sizes: jax.Array, *,
                         tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """ragged_dot with per-expert NVFP4 weights [E, N, K/2] / [E, N, K/16] / [E] -> [T, N]."""
  nvfp4.check_layout(packed, scale)
  if packed.ndim != 3:
    raise ShapeError(f"grouped NVFP4 weight must be [E, N, K/2], got {packed.shape}")
  e, n, k = packed.shape[0], packed.shape[1], packed.shape[2] * 2
  check_grouped_inputs(x, group_sizes, e)
  if x.shape[1] != k:
    raise ShapeError(f"x has K={x.shape[1]} but the weight has K={k}")
  if global_scale.shape != (e,):
    raise ShapeError(f"global_scale must be [E={e}], got {global_scale.shape}")
  return _run("nvfp4", (x, packed, scale, global_scale.astype(jnp.float32)), x, group_sizes, e, n,
              k, tiling, interpret, x.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "out_dtype"))
def grouped_matmul_nvfp4_kl(x: jax.Array, packed_kl: jax.Array, scale: jax.Array,
                            global_scale: jax.Array, group_sizes: jax.Array, *,
                            tiling: Tiling | None = None, interpret: bool = False,
                            out_dtype=None) -> jax.Array:
  """grouped_matmul_nvfp4 on kernel-layout bytes (kernels/quant/nvfp4.to_kernel_layout, K a
  multiple of 256): the decode kernel's dequantization (nvfp4_matmul.kl_tile_dot) per expert
  tile. ``tiling``: block_m / block_n / num_warps / num_stages / w_as_a / dequant (one of
  nvfp4_matmul.KL_DEQUANT_MODES); block_k: K per loop step, a multiple of the layout's 256 (else
  256). Output in ``out_dtype`` (default x's): an f16 x on the f16 routes skips the in-kernel
  conversion of every x tile (see x_for_kl)."""
  e, n, k = _check_nvfp4_kl(x, packed_kl, scale, global_scale, group_sizes, "expert")
  return _run("nvfp4_kl", (x, packed_kl, scale, global_scale.astype(jnp.float32)), x, group_sizes,
              e, n, k, tiling or default_kl_tiling(x.shape[0], e, k), interpret,
              out_dtype or x.dtype)


# x in f16 for the kernel-layout kernels. Their f16 dequant routes (every KL mode but "f32") cast
# each x tile to f16 inside the K loop, in every warp of every N-tile program: with bm = 16 rows
# that is ~1/5 of the loop's instructions (nvfp4_matmul's docstring: ~3.9 vs ~3.0-3.5 SASS
# instructions per weight element with x in bf16 vs f16). Casting x once outside (XLA fuses it
# into the producer, e.g. the MoE row gather) gives bit-identical results: both are the same
# round-to-nearest bf16 -> f16 conversion, with the same |x| <= 65504 range condition.
def x_for_kl(x: jax.Array, tiling: Tiling) -> jax.Array:
  """x cast to f16 when the kernel-layout ``tiling`` runs an f16 route."""
  return x.astype(jnp.float16) if tiling.dequant != "f32" and x.dtype == jnp.bfloat16 else x


# Kernel-layout grouped tiling at <= 16 rows per group (decode): the weight as the MMA's B
# operand, bn 128, two 256-wide K tiles per loop step, 3 stages: the fastest float64-verified
# variant of the H100 sweep for both uniform and skewed routing (benchmarks/gemm.md, window 2);
# larger groups use 64-row tiles with the same fields.
KL_DECODE = {"block_n": 128, "block_k": 512, "num_warps": 4, "num_stages": 3, "dequant": "asm",
             "w_as_a": False}
# Overrides of KL_DECODE for short K (<= SHORT_K: DeepSeek's down projection, K = 2048, where a
# program's K loop has only 8 byte tiles) and for the fused gate/up kernel
# (grouped_swiglu_nvfp4_kl, two weight tiles per step). Measured on the H100 at DeepSeek-V3's
# decode B=64 routing (512 rows, 194 active experts of 256; benchmarks/deepseek.md, window of
# 2026-11-23 22:27 UTC, x in f16, each f32-checked at 1.7e-3):
#   short K (down, N 7168, K 2048): bn 64, one 256-wide K tile per step, 4 stages: 682 us
#     (2.35 TB/s of NVFP4 bytes) vs 744 us for KL_DECODE (bn 128, 2 tiles/step, 3 stages): with
#     ~68 KB of shared memory 3 CTAs share an SM, so one program's pipeline prologue (a K loop
#     of only 8 tiles) overlaps the others' work (bn 128 one tile/step 3 stages: 707 us).
#   fused gate/up (N 2048, K 7168): bn 64 (2 x [64, 128] weight tiles per K tile: KL_DECODE's
#     bytes per stage), 2 tiles/step, 3 stages: 1467 us for both projections vs 2 x 758 us for
#     two KL_DECODE calls; bn 128 variants 1745-2253 us, 8 warps 1694 us, 1 tile/step 1486 us.
SHORT_K = 2048
KL_DECODE_SHORT_K: dict = {"block_n": 64, "block_k": 256, "num_stages": 4}
KL_DECODE_GLU: dict = {"block_n": 64}
# Override for decode-sized groups (<= 16 rows per group) of the unfused grouped GEMM at any K:
# the short-K tiling. H100, 2026-11-24 (benchmarks/gemm.md, window 4; T=64 tokens, E=32, K=7168,
# N=2048, x in f16, float64-checked at 1.66e-3): uniform routing 124.0 us vs 132.0 us for
# KL_DECODE (2.77x vs 2.60x ragged_dot), skewed 81.0 vs 93.1 us (4.21x vs 3.67x); bn 128 with 4
# or 2 stages was slower (143.9 / 130.3 and 103.7 / 116.2 us). The fused gate/up kernel keeps
# KL_DECODE + KL_DECODE_GLU (measured there), larger groups KL_DECODE.
KL_DECODE_SMALL_GROUPS: dict = {"block_n": 64, "block_k": 256, "num_stages": 4}


def default_kl_tiling(t: int, num_groups: int, k: int | None = None, glu: bool = False
                      ) -> Tiling:
  rows_per_group = t / max(1, num_groups)
  bm = 16 if rows_per_group <= 16 else 64
  d = dict(KL_DECODE)
  if k is not None and k <= SHORT_K:
    d.update(KL_DECODE_SHORT_K)
  if glu:
    d.update(KL_DECODE_GLU)
  elif rows_per_group <= 16:
    d.update(KL_DECODE_SMALL_GROUPS)
  return Tiling(bm, d["block_n"], d["block_k"], d["num_warps"], d["num_stages"],
                dequant=d["dequant"], w_as_a=d["w_as_a"], programs=d.get("programs", 0))


# ----- fused gate/up projection with the SwiGLU epilogue (kernel layout) -----
#
# h = silu(x Wg) * (x Wu) per group, in one pass: each program owns bn columns of BOTH projections
# for its row tile, so every x slice is loaded and converted once for two weight tiles (half the
# x traffic and conversions of two calls), the two [bm, bn] f32 accumulators meet in registers,
# and the [T, N] gate / up intermediates never reach HBM; one launch and one schedule instead of
# two, and twice the weight bytes in flight per program. Same schedule, dequantization
# (nvfp4_matmul.kl_dequant_half, the weight as the MMA's B operand) and masking as
# grouped_matmul_nvfp4_kl; each projection keeps its own per-expert global scale. The epilogue
# runs in f32 (the two-call form rounds g and u to x's dtype first): at most one rounding, to the
# output dtype.

def _glu_kernel(pid_t, pid_n, sched_ref, x_ref, gq_ref, gsc_ref, ggs_ref, uq_ref, usc_ref, ugs_ref,
                o_ref, *, e, n, bm, bn, tps, k_steps, mode):
  g, r0, r1, n0, row_ok, col_ok, out_mask = _schedule_tile(sched_ref, pid_t, pid_n,
                                                            bm=bm, bn=bn, n=n)
  masked_n = n % bn != 0
  half = nvfp4.KERNEL_TILE // 2
  groups = half // nvfp4.BLOCK_SIZE

  def load_w(ref, idx):
    if not masked_n:
      return ref[idx]
    other = None if ref.dtype == jnp.float8_e4m3fn else 0
    return plgpu.load(ref.at[idx], mask=col_ok[:, None], other=other)

  @pl.when((g >= 0) & (g < e))
  def _compute():
    def body(i, accs):
      acc_g, acc_u = accs
      for j in range(tps):
        t = i * tps + j
        kp = pl.multiple_of(t * half, half)
        wg = load_w(gq_ref, (g, pl.ds(n0, bn), pl.ds(kp, half)))
        wu = load_w(uq_ref, (g, pl.ds(n0, bn), pl.ds(kp, half)))
        for h, name in enumerate(("lo", "hi")):
          ks = pl.multiple_of(t * 2 * groups + h * groups, groups)
          kx = pl.multiple_of(t * nvfp4.KERNEL_TILE + h * half, half)
          sidx = (g, pl.ds(n0, bn), pl.ds(ks, groups))
          dg = kl_dequant_half(wg, load_w(gsc_ref, sidx), name, mode)
          du = kl_dequant_half(wu, load_w(usc_ref, sidx), name, mode)
          x = plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(kx, half)], mask=row_ok[:, None],
                         other=0).astype(dg.dtype)
          acc_g = acc_g + plgpu.dot(x, dg, trans_b=True)
          acc_u = acc_u + plgpu.dot(x, du, trans_b=True)
      return acc_g, acc_u

    zeros = jnp.zeros((bm, bn), jnp.float32)
    acc_g, acc_u = jax.lax.fori_loop(0, k_steps, body, (zeros, zeros))
    f = kl_global_factor(mode)
    gate = acc_g * (ggs_ref[g] * f)
    up = acc_u * (ugs_ref[g] * f)
    h = gate / (1.0 + jnp.exp(-gate)) * up          # silu(gate) * up, in f32
    plgpu.store(o_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], h.astype(o_ref.dtype), mask=out_mask)

  @pl.when(g == e)
  def _zeros():
    plgpu.store(o_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], jnp.zeros((bm, bn), o_ref.dtype),
                mask=out_mask)


def _check_nvfp4_kl(x, packed_kl, scale, global_scale, group_sizes, what: str) -> tuple:
  nvfp4.check_layout(packed_kl, scale)
  if packed_kl.ndim != 3:
    raise ShapeError(f"grouped NVFP4 {what} weight must be [E, N, K/2], got {packed_kl.shape}")
  e, n, k = packed_kl.shape[0], packed_kl.shape[1], packed_kl.shape[2] * 2
  nvfp4.check_kernel_k(k)
  check_grouped_inputs(x, group_sizes, e)
  if x.shape[1] != k:
    raise ShapeError(f"x has K={x.shape[1]} but the {what} weight has K={k}")
  if global_scale.shape != (e,):
    raise ShapeError(f"{what} global_scale must be [E={e}], got {global_scale.shape}")
  return e, n, k


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "out_dtype"))
def grouped_swiglu_nvfp4_kl(x: jax.Array, gate_packed: jax.Array, gate_scale: jax.Array,
                            gate_global: jax.Array, up_packed: jax.Array, up_scale: jax.Array,
                            up_global: jax.Array, group_sizes: jax.Array, *,
                            tiling: Tiling | None = None, interpret: bool = False,
                            out_dtype=None) -> jax.Array:
  """silu(ragged_dot(x, Wg)) * ragged_dot(x, Wu) -> [T, N] (``out_dtype``, default x's), both
  weights per-expert NVFP4 in the kernel layout ([E, N, K/2] u8, [E, N, K/16] e4m3, [E] f32;
  K % 256 == 0). Rows past sum(group_sizes) are zero. ``tiling``: as grouped_matmul_nvfp4_kl
  (B operand only: w_as_a is ignored); default ``default_kl_tiling(.., glu=True)``."""
  e, n, k = _check_nvfp4_kl(x, gate_packed, gate_scale, gate_global, group_sizes, "gate")
  if up_packed.shape != gate_packed.shape or up_scale.shape != gate_scale.shape:
    raise ShapeError(f"up weight {up_packed.shape}/{up_scale.shape} must match the gate's "
                     f"{gate_packed.shape}/{gate_scale.shape}")
  _check_nvfp4_kl(x, up_packed, up_scale, up_global, group_sizes, "up")
  t = tiling or default_kl_tiling(x.shape[0], e, k, glu=True)
  tile_k = nvfp4.KERNEL_TILE
  tps = t.block_k // tile_k if t.block_k % tile_k == 0 and k % t.block_k == 0 else 1
  sched = make_schedule(group_sizes, x.shape[0], t.block_m)
  tile_fn = functools.partial(_glu_kernel, e=e, n=n, bm=t.block_m, bn=t.block_n, tps=tps,
                              k_steps=k // (tile_k * tps), mode=kl_mode_for(t.dequant, interpret))
  return pl.pallas_call(
      _over_tiles(tile_fn, t.programs),
      out_shape=jax.ShapeDtypeStruct((x.shape[0], n), out_dtype or x.dtype),
      grid=(t.programs or sched.shape[1], pl.cdiv(n, t.block_n)), interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      name="grouped_swiglu_nvfp4_kl",
  )(sched, used_tiles(sched, t.programs), x, gate_packed, gate_scale, gate_global.astype(jnp.float32),
    up_packed, up_scale, up_global.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def grouped_matmul_fp8(x: jax.Array, weight: jax.Array, scale_inv: jax.Array,
                       group_sizes: jax.Array, *, tiling: Tiling | None = None,
                       interpret: bool = False) -> jax.Array:
  """ragged_dot with per-expert FP8 block-scaled weights [E, N, K] / [E, N/128, K/128] -> [T, N]."""
  fp8_block_matmul.check_shapes(x.shape[-1], weight, scale_inv, grouped=True)
  e, n, k = weight.shape
  check_grouped_inputs(x, group_sizes, e)
  xq, xs = fp8_block.quantize_activations(x)
  return _run("fp8", (xq, xs, weight, scale_inv), x, group_sizes, e, n, k, tiling, interpret,
              x.dtype)


# ----- plain-JAX references (also the CPU fallback of kernels/gemm.py) -----

def grouped_reference(x: jax.Array, w_ekn: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """jax.lax.ragged_dot in f32 on a dense [E, K, N] weight, cast to x's dtype."""
  y = jax.lax.ragged_dot(x.astype(jnp.float32), w_ekn.astype(jnp.float32),
                         group_sizes.astype(jnp.int32), precision="highest")
  return y.astype(x.dtype)


def grouped_nvfp4_kl_reference(x, packed_kl, scale, global_scale, group_sizes) -> jax.Array:
  return grouped_nvfp4_reference(x, nvfp4.from_kernel_layout(packed_kl), scale, global_scale,
                                 group_sizes)


def grouped_swiglu_nvfp4_kl_reference(x, gate_packed, gate_scale, gate_global, up_packed,
                                      up_scale, up_global, group_sizes, out_dtype=None
                                      ) -> jax.Array:
  """silu(x Wg) * (x Wu) per group in f32 (no intermediate rounding), cast to out_dtype / x's."""
  def proj(packed, scale, gs):
    w = jnp.swapaxes(nvfp4.dequantize(nvfp4.from_kernel_layout(packed), scale, gs, jnp.float32),
                     1, 2)
    return jax.lax.ragged_dot(x.astype(jnp.float32), w, group_sizes.astype(jnp.int32),
                              precision="highest")
  g = proj(gate_packed, gate_scale, gate_global)
  return (jax.nn.silu(g) * proj(up_packed, up_scale, up_global)).astype(out_dtype or x.dtype)


def grouped_nvfp4_reference(x, packed, scale, global_scale, group_sizes) -> jax.Array:
  w = jnp.swapaxes(nvfp4.dequantize(packed, scale, global_scale, jnp.float32), 1, 2)
  return grouped_reference(x, w, group_sizes)


def grouped_fp8_reference(x, weight, scale_inv, group_sizes) -> jax.Array:
  xq, xs = fp8_block.quantize_activations(x)
  xd = fp8_block.dequantize_activations(xq, xs)
  w = jnp.swapaxes(fp8_block.dequantize_weight(weight, scale_inv, jnp.float32), 1, 2)
  return grouped_reference(xd, w, group_sizes).astype(x.dtype)
