"""Grouped (MoE) NVFP4 W4A16 decode GEMM on Mosaic GPU (Hopper): a persistent TMA stream.

y[T, N] = ragged_dot(x [T, K], dequant(W) [E, K, N], group_sizes [E]) (``jax.lax.ragged_dot``
semantics: rows are sorted by group, rows past sum(group_sizes) are zero) for decode-sized
groups, built on the dense decode kernel of kernels/nvfp4_matmul_mgpu.py (its weight records,
in-register dequantization into wgmma's A operand, in-kernel x conversion): y^T = W_e x_e^T per
expert e, the dequantized weight as the wgmma's A operand (registers), the expert's rows of x as
the B operand (f16, ``block_rows`` = Mp columns: wgmma n).

Weight layout (``to_grouped_mgpu_layout``): each expert's ModelOpt bytes repacked by
``nvfp4_matmul_mgpu.to_mgpu_layout`` into 9216-byte (64-row strip, 256-wide K tile) records,
stacked: uint32 [E, S, K/256, 72, 32], S = ceil(N/64) rounded up to a multiple of
``STRIP_ALIGN`` (= the CTA's strips; padded strips have zero codes and scales).

Work list (a few tiny XLA ops on the router's group sizes, on device, ``make_work_list``): the
rows of each non-empty expert are cut into chunks of Mp rows (chunk = expert, first row, end
row); a work item is (chunk, block of consumers x strips 64-row strips of N): items = chunks x S
/ (consumers x strips).
Empty experts give no chunks, so they cost nothing; skewed routing gives an expert more chunks
(its weight is read once per chunk: with Mp = 8 the skewed benchmark routing reads 20 expert
weights for 18 active experts). Rows past the total get "zero chunks" that only store zeros.

Kernel (grid = ``ctas`` persistent CTAs, 132 on the H100): CTA p takes items p, p + P, ... of the
dynamic item count and streams, per item, its K tiles through one continuous pipeline of ``stages``
shared-memory slots (no fill / drain between items: the producer runs ahead across item
boundaries). Per step (``k_per_step`` K tiles; one described here), the producer warpgroup TMAs the
item's weight records (one per strip, [consumers x strips, 72, 32] from W[e, strips, t]) into the
slot and the raw [Mp, 256] x tile (rows r..r+Mp-1 of x in natural order, r = min(chunk start, T -
Mp): x is never gathered or copied; rows of neighbouring experts inside the tile only reach
accumulator columns that are never stored) into one of 2 staging slots, then converts the previous
step's raw tile to the permuted, swizzled f16 wgmma tile (nvfp4_matmul_mgpu._convert_x_gpu) and
arrives on the slot's barrier. Each consumer warpgroup owns ``strips`` strips of the item: waits
for the slot, dequantizes a record into registers (nvfp4_matmul_mgpu._dequant_gpu), issues its 16
wgmmas (m64 nMp k16), dequantizes the next strip's record while they run, ..., waits, releases the
slot; at the item's last K tile it scales by the expert's global scale and stores the accumulators
transposed straight from registers into y rows [chunk start, chunk end) (masked scalar stores: y is
small at decode). Then the zero items.

Target roofline (H100, 3.05 TB/s measured read): T=64, E=32, K=7168, N=2048, uniform routing
(2 rows per expert) reads all 32 experts' NVFP4 bytes, 32 x 2048 x 7168 x 9/16 = 264 MB -> 86.6
us; the issue's target is 3.5x jax.lax.ragged_dot in bf16 (338 us in the same runs) = 96.6 us,
89% of the read ceiling. 1024 strips x 28 K tiles = 28672 records over 132 CTAs: 3.9 items of 2
strips per CTA (the longest CTA streams 4 x 28 = 112 steps vs 108.6 on average: 97%). Per SM at
2.75 TB/s that is ~10 bytes per clock, one 9216-byte record every ~900 clocks: the dequantization
(~1 k warp-instructions per record) needs ~25% of the issue slots, the wgmmas (n = 8) little.

Defaults (K_PER_STEP, PDL): two K tiles per pipeline step (each strip's two records are one
contiguous 18 KB TMA; 4 stages) and programmatic dependent launch (the launch of the next kernel
overlaps this one's end).

Measured (H100, jax 0.11.2, benchmarks/gemm.md "Sixth session", 2026-11-24 windows 1-5; every row
float64-checked on its timed output at 1.66e-3; wall = back-to-back calls, GPU = kernel time from a
trace): T=64 E=32 K=7168 N=2048 uniform, W3-W5: defaults 95.4-97.3 us wall vs jax.lax.ragged_dot
bf16 337-343 us (3.51-3.54x, about 1% above the target: within the run-to-run spread) and the
Triton kernel-layout default 122-126 us (the public op gemm.grouped_matmul on the mgpu layout:
96.5-99.2 us, 3.45-3.51x); two K tiles alone 100.0 / 92.3 us GPU (2.86 TB/s of NVFP4 bytes over the
kernel, 94% of the read ceiling); one K tile, no PDL (W1-W4) 99.2-101.1 / 93.4-94.5 us
(3.37-3.44x). Skewed: defaults 69.7-71.8 us (4.78-4.86x; Triton 79-87 us). Where the rest goes: 512
items on 132 CTAs (4 items on 116 CTAs, 3 on 16: ~3%), the pipeline fill (~2 us), and 4-7 us per
call between kernels (wall minus GPU time; PDL hides part). Measured slower and off by default:
16-row chunks (+6%), one consumer (+27%), the in-kernel work list (+1.5%), the stream-K tail
(+5-8%, correct; plus XLA's zeroing of the semaphores), two strips per consumer (+3% uniform,
+15-40% skewed), four K tiles per step (+26%).

Interpret mode (CPU) runs the same pipeline (persistent loop, TMA at dynamic rows, barriers,
slots, zero items, masking) with the dense kernel's jnp twin of the dequantization and a jnp dot
instead of the register-A wgmma (see nvfp4_matmul_mgpu's docstring for how the PTX is checked).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxinfer.errors import ShapeError
from kernels import nvfp4_matmul_mgpu as mg
from kernels.quant import nvfp4

STRIP = mg.STRIP
TILE_K = mg.TILE_K
STRIP_ALIGN = 2       # strips per expert padded to a multiple of this (the CTA's strips)
_X_RAW_SLOTS = 2


@dataclasses.dataclass(frozen=True)
class GroupedMgpuTiling:
  """block_rows: rows of x per chunk (wgmma n, a multiple of 8, <= 64): an expert with more rows
  takes several chunks (its weight is streamed once per chunk); consumers: compute warpgroups per
  CTA (1 or 2); strips: 64-row strips per consumer (its wgmmas for strip j run while it
  dequantizes strip j + 1; an item covers consumers x strips strips); stages: K tiles in flight
  per CTA; ctas: persistent CTAs (the grid; 132 = the H100's SMs); no_auto_barriers: Pallas's
  unsafe_no_auto_barriers (as in nvfp4_matmul_mgpu.MgpuTiling); work_list: "xla" (the chunk
  table is built by a few small XLA ops before the kernel, ``make_work_list``) or "kernel" (each
  warpgroup derives it from the group sizes itself: a scan over the E sizes per item in the
  producer and once per CTA in the consumers; no XLA ops, no extra launches); tail: stream-K
  tail: each CTA takes n_items // ctas whole items, and the K tiles of the n_items % ctas leftover
  items are split evenly over all CTAs if that gives every CTA at least half an item (without it
  the CTAs with one more item set the time: 4 vs 3.88 items per CTA at the target); the <= 3
  pieces of a split item are added in the kernel (per-thread arrival counters in a persistent
  global semaphore array, f32 workspace: the last contributor adds and stores); pdl:
  programmatic dependent launch (Hopper): every CTA executes
  ``griddepcontrol.launch_dependents`` at its start and then ``griddepcontrol.wait`` before it
  reads anything (the kernel is launched with programmatic stream serialization): the next kernel
  of the stream is launched while this one runs and its CTAs start on the SMs this persistent grid
  frees, and this kernel's launch overlaps the previous kernel's end; ordering is unchanged (the
  wait returns when the grids before complete and their memory is visible); k_per_step: K tiles
  per pipeline step (1, 2 or 4; each strip's records of a step are contiguous in memory: one TMA of
  k_per_step x 9216 bytes per strip, fewer barrier round trips per byte; K % (256 k_per_step) == 0,
  else 1)."""
  block_rows: int = 8
  consumers: int = 2
  stages: int = 8
  ctas: int = 132
  no_auto_barriers: bool = True
  strips: int = 1
  work_list: str = "xla"
  tail: bool = False
  pdl: bool = False
  k_per_step: int = 1

  def __post_init__(self):
    if self.work_list not in ("xla", "kernel"):
      raise ValueError(f"work_list must be 'xla' or 'kernel', got {self}")
    if self.k_per_step not in (1, 2, 4):
      raise ValueError(f"k_per_step must be 1, 2 or 4, got {self}")
    if self.block_rows % 8 or not 8 <= self.block_rows <= 64:
      raise ValueError(f"block_rows must be a multiple of 8 in [8, 64], got {self}")
    if (self.consumers not in (1, 2) or self.stages < 2 or self.ctas < 1
        or self.strips not in (1, 2)):
      raise ValueError(f"need consumers and strips in (1, 2), stages >= 2, ctas >= 1, got {self}")

  @property
  def cta_strips(self) -> int:
    return self.consumers * self.strips


def smem_bytes(t: GroupedMgpuTiling) -> int:
  mp, kps = t.block_rows, t.k_per_step
  return (t.stages * kps * (mg.RECORD_WORDS * 4 * t.cta_strips + mp * TILE_K * 2)
          + _X_RAW_SLOTS * mp * TILE_K * 2 * kps + 16 * t.stages + 1024)


# Defaults from the H100 window 3 of 2026-11-24 (benchmarks/gemm.md; float64-checked on the timed
# outputs; T=64 E=32 K=7168 N=2048, wall / GPU us): two K tiles per step + PDL 96.9 us uniform
# (3.54x ragged_dot) vs 99.6 / 94.5 for one K tile without PDL; two K tiles alone 100.0 / 92.3
# (skewed 70.7 vs 74.2), PDL alone 98.2 (skewed 71.7).
K_PER_STEP = 2
PDL = True


def default_tiling(t_rows: int, num_groups: int, num_sms: int = 132, k: int | None = None,
                   **overrides) -> GroupedMgpuTiling:
  """Mp = the mean group size rounded up to 8 (8 at T=64, E=32), two consumers, K_PER_STEP K
  tiles per step (1 when the K tiles do not divide), PDL, as many stages as fit 200 KB of shared
  memory (<= 8), one CTA per SM."""
  mean = -(-t_rows // max(1, num_groups))
  mp = overrides.pop("block_rows", min(64, max(8, -(-mean // 8) * 8)))
  consumers = overrides.pop("consumers", 2)
  stages = overrides.pop("stages", None)
  t = GroupedMgpuTiling(block_rows=mp, consumers=consumers, stages=2,
                        strips=overrides.pop("strips", 1),
                        work_list=overrides.pop("work_list", "xla"),
                        tail=overrides.pop("tail", False),
                        pdl=overrides.pop("pdl", PDL),
                        k_per_step=overrides.pop(
                            "k_per_step",
                            K_PER_STEP if k is None or -(-k // TILE_K) % K_PER_STEP == 0 else 1),
                        ctas=overrides.pop("ctas", num_sms),
                        no_auto_barriers=overrides.pop("no_auto_barriers", True))
  if overrides:
    raise TypeError(f"unknown GroupedMgpuTiling fields {sorted(overrides)}")
  if stages is None:
    stages = 8
    while stages > 2 and smem_bytes(dataclasses.replace(t, stages=stages)) > 200 * 1024:
      stages -= 1
  return dataclasses.replace(t, stages=stages)


# ----- weight layout -----

def to_grouped_mgpu_layout(packed: jax.Array, scale: jax.Array) -> jax.Array:
  """Per-expert ModelOpt NVFP4 [E, N, K/2] u8 + [E, N, K/16] e4m3 -> uint32 [E, S, K/256, 72,
  32] (nvfp4_matmul_mgpu.to_mgpu_layout per expert, strips padded to a multiple of
  STRIP_ALIGN with zero records). One expert at a time (lax.map: bounded temporaries)."""
  nvfp4.check_layout(packed, scale)
  if packed.ndim != 3:
    raise ShapeError(f"grouped NVFP4 weight must be [E, N, K/2], got {packed.shape}")
  w = lax.map(lambda ps: mg.to_mgpu_layout(*ps), (packed, scale))
  s = w.shape[1]
  s_pad = -(-s // STRIP_ALIGN) * STRIP_ALIGN
  if s_pad != s:
    w = jnp.pad(w, ((0, 0), (0, s_pad - s), (0, 0), (0, 0), (0, 0)))
  return w


def from_grouped_mgpu_layout(w: jax.Array, n: int, k: int) -> tuple[jax.Array, jax.Array]:
  """Inverse of to_grouped_mgpu_layout -> (packed [E, N, K/2], scale [E, N, K/16])."""
  s_n = -(-n // STRIP)
  return lax.map(lambda we: mg.from_mgpu_layout(we[:s_n], n, k), w)


# ----- work list -----

def make_work_list(group_sizes: jax.Array, num_rows: int, block_rows: int) -> jax.Array:
  """int32 [3, C + 2] for C = cdiv(T, Mp) + E chunk slots: columns 0..C-1 are chunks (expert,
  row_start, row_end), the used ones first (in expert order), then unused (-1, 0, 0); column C
  holds (number of chunks, number of zero chunks, total rows); column C + 1 is padding. Zero
  chunk z covers rows [total + z Mp, min(T, total + (z + 1) Mp))."""
  e = group_sizes.shape[0]
  mp = block_rows
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  chunks = (ends - starts + mp - 1) // mp
  chunk_end = jnp.cumsum(chunks)
  chunk_start = chunk_end - chunks
  total_chunks = chunk_end[-1]
  total = ends[-1]
  n_slots = -(-num_rows // mp) + e
  i = jnp.arange(n_slots, dtype=jnp.int32)
  g = jnp.searchsorted(chunk_end, i, side="right", method="compare_all").astype(jnp.int32)
  gc = jnp.minimum(g, e - 1)
  r0 = starts[gc] + (i - chunk_start[gc]) * mp
  r1 = jnp.minimum(r0 + mp, ends[gc])
  valid = i < total_chunks
  sched = jnp.stack([jnp.where(valid, gc, -1), jnp.where(valid, r0, 0), jnp.where(valid, r1, 0)])
  zero_chunks = (num_rows - total + mp - 1) // mp
  meta = jnp.stack([jnp.stack([total_chunks, zero_chunks, total]), jnp.zeros((3,), jnp.int32)],
                   axis=1)
  return jnp.concatenate([sched, meta.astype(jnp.int32)], axis=1)


# ----- the kernel -----

def _store_rows(acc, o_ref, rbase, r0, r1, *, mp: int, interpret: bool):
  """acc [64, Mp] f32 (y^T of one strip; column c = row rbase + c of y) -> o_ref [T, 64] (the
  strip's columns of y) at rows r0 <= rbase + c < r1, in o_ref's dtype."""
  if interpret:
    val = acc.T.astype(o_ref.dtype)
    for c in range(mp):
      row = rbase + c

      @pl.when((row >= r0) & (row < r1))
      def _(c=c, row=row):
        o_ref[pl.ds(row, 1), :] = val[c:c + 1]
    return
  out = plgpu.layout_cast(acc.astype(o_ref.dtype), plgpu.Layout.WGMMA)

  def body(ctx, a, ref, rb, lo, hi):
    from jax._src.lib.mlir.dialects import vector               # noqa: PLC0415
    rb, lo, hi = (v.registers.flat[0] for v in (rb, lo, hi))
    regs = list(np.ndenumerate(a.registers))
    vals = [[vector.extract(reg, [], [e]) for e in range(2)] for _, reg in regs]
    _emit_rows(vals, [idx for idx, _ in regs], ref, rb, lo, hi)
    return ()

  splat = plgpu.Layout.WG_SPLAT(shape=())
  plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(), splat, splat, splat),
                    return_type=())(body)(out, o_ref, rbase, r0, r1)


def _scan_groups(gsz_ref, c, *, e: int, t_real: int, mp: int):
  """In-kernel work list: walks the E group sizes -> (number of chunks, total rows, and for chunk
  c (if given) its expert, first row and end row). Unrolled for E <= 64."""
  def body(g, carry):
    cum_c, cum_r, fg, fr0, fr1 = carry
    end = jnp.minimum(cum_r + jnp.maximum(gsz_ref[g], 0), t_real)
    ch = lax.div(end - cum_r + (mp - 1), jnp.int32(mp))
    if c is not None:
      hit = (c >= cum_c) & (c < cum_c + ch)
      r0 = cum_r + (c - cum_c) * mp
      fg = jnp.where(hit, jnp.int32(g), fg)
      fr0 = jnp.where(hit, r0, fr0)
      fr1 = jnp.where(hit, jnp.minimum(r0 + mp, end), fr1)
    return cum_c + ch, end, fg, fr0, fr1
  carry = (jnp.int32(0),) * 5
  if e <= 64:
    for g in range(e):
      carry = body(g, carry)
    return carry
  return lax.fori_loop(0, e, body, carry)


# per-thread stream-K combine (the same protocol as nvfp4_matmul_mgpu._streamk_fixup)
_ST_V2 = "{\n.reg .b64 a;\nadd.s64 a, $0, $1;\nst.global.v2.f32 [a], {$2, $3};\n}"
_LD_V2 = "{\n.reg .b64 a;\nadd.s64 a, $2, $3;\nld.global.cg.v2.f32 {$0, $1}, [a];\n}"
_ATOM_ADD = "{\n.reg .b64 a;\nadd.s64 a, $1, $2;\natom.acq_rel.gpu.global.add.u32 $0, [a], 1;\n}"
_ST_ZERO = ("{\n.reg .b64 a;\n.reg .b32 z;\nmov.b32 z, 0;\nadd.s64 a, $0, $1;\n"
            "st.relaxed.gpu.global.b32 [a], z;\n}")


def _emit_rows(vals, regs, ref, rb, lo, hi):
  """Masked transposed stores of WGMMA-layout values (inside an inline_mgpu body): value e of
  register idx (row r of the strip, column c) -> ref[rb + c, r] if lo <= rb + c < hi."""
  from jax._src.lib.mlir import ir                            # noqa: PLC0415
  from jax._src.lib.mlir.dialects import arith, memref        # noqa: PLC0415
  from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
  index = ir.IndexType.get()
  i32 = ir.IntegerType.get_signless(32)
  out_ty = ir.MemRefType(ref.type).element_type
  _, n0, q2 = mg.wgmma_thread_origin()
  q2 = arith.addi(q2, rb)
  for q, idx in enumerate(regs):
    j, h = idx[1], idx[4]
    col = arith.index_cast(index, arith.addi(n0, mu.c(8 * h, i32)))
    for e in range(2):
      row32 = arith.addi(q2, mu.c(8 * j + e, i32))
      ok = arith.andi(arith.cmpi(arith.CmpIPredicate.sge, row32, lo),
                      arith.cmpi(arith.CmpIPredicate.slt, row32, hi))
      val = vals[q][e]
      if val.type != out_ty:
        val = arith.truncf(out_ty, val)
      with mu.when(ok):
        memref.store(val, ref, [arith.index_cast(index, row32), col])


def _fixup_gpu(acc, ws_ref, cnt_ref, o_ref, n, c_first, own, st, rbase, r0, r1, *, ctas: int,
               cta_strips: int, mp: int, max_contrib: int):
  """Stream-K combine of one strip of a split item (GPU). acc [64, Mp] f32 (WGMMA layout, times
  the global scale) is this CTA's partial. Thread t writes its Mp/2 values to its place in this
  CTA's workspace slot (f32 offset ``own`` of ws_ref [G, 2, cta_strips, 64 Mp]), then atomically
  increments its counter ``cnt_ref[t]`` (acq_rel, GPU scope); the thread that sees n - 1 (n
  contributors: CTAs c_first .. c_first + n - 1; c_first's piece is in its slot 1, the others' in
  slot 0) resets its counter, adds the n slots and stores its values of y rows [r0, r1)."""
  def body(ctx, a, ws, cnt, ref, n, cf, own, st, rb, lo, hi):
    from jax._src.lib.mlir import ir                            # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, vector        # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    n, cf, own, st, rb, lo, hi = (v.registers.flat[0] for v in (n, cf, own, st, rb, lo, hi))
    i32 = ir.IntegerType.get_signless(32)
    i64 = ir.IntegerType.get_signless(64)
    f32 = ir.F32Type.get()
    tid = arith.remui(mu.thread_idx(), mu.c(128, i32))
    regs = list(np.ndenumerate(a.registers))
    nv = 2 * len(regs)
    off = arith.muli(arith.extui(i64, tid), mu.c(4 * nv, i64))
    ws_p = mu.memref_ptr(ws)

    def slot_bytes(slot_f32):   # i32 f32-offset -> i64 byte offset of this thread's values
      return arith.addi(arith.muli(arith.extui(i64, slot_f32), mu.c(4, i64)), off)

    own_b = slot_bytes(own)
    for q, (_, reg) in enumerate(regs):
      v0, v1 = (vector.extract(reg, [], [e]) for e in range(2))
      mu.inline_ptx(_ST_V2, ws_p, arith.addi(own_b, mu.c(8 * q, i64)), v0, v1,
                    has_side_effects=True)
    cnt_p = mu.memref_ptr(cnt)
    coff = arith.muli(arith.extui(i64, tid), mu.c(4, i64))
    old = mu.inline_ptx(_ATOM_ADD, cnt_p, coff, result_types=i32, has_side_effects=True)
    last = arith.cmpi(arith.CmpIPredicate.eq, old, arith.subi(n, mu.c(1, i32)))
    with mu.when(last):
      mu.inline_ptx(_ST_ZERO, cnt_p, coff, has_side_effects=True)
      zero = mu.c(0.0, f32)
      sums = [[zero, zero] for _ in regs]
      for r in range(max_contrib):
        ok = arith.cmpi(arith.CmpIPredicate.slt, mu.c(r, i32), n)
        cidx = arith.minsi(arith.addi(cf, mu.c(r, i32)), mu.c(ctas - 1, i32))
        slot = arith.addi(arith.muli(arith.addi(arith.muli(cidx, mu.c(2, i32)),
                                                mu.c(1 if r == 0 else 0, i32)),
                                     mu.c(cta_strips, i32)), st)
        base = slot_bytes(arith.muli(slot, mu.c(STRIP * mp, i32)))
        for q in range(len(regs)):
          vals = mu.inline_ptx(_LD_V2, ws_p, arith.addi(base, mu.c(8 * q, i64)),
                               result_types=[f32, f32], has_side_effects=True)
          for e in range(2):
            sums[q][e] = arith.addf(sums[q][e], arith.select(ok, vals[e], zero))
      _emit_rows(sums, [idx for idx, _ in regs], ref, rb, lo, hi)
    return ()

  splat = plgpu.Layout.WG_SPLAT(shape=())
  plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) + (plgpu.RefType(),) * 3 + (splat,) * 7,
                    return_type=())(body)(acc, ws_ref, cnt_ref, o_ref, n, c_first, own, st,
                                          rbase, r0, r1)


def _kernel(x_ref, w_ref, gs_ref, meta_ref, o_ref, ws_ref, scoped, *, t_rows: int,
            t_real: int, mp: int, consumers: int, strips: int, stages: int, t_k: int,
            n_slots: int, ctas: int, e: int, list_in_kernel: bool, tail: bool, x_transforms,
            interpret: bool, pdl: bool = False, kps: int = 1):
  (w_smem, x_smem, x_raw, info), (full, free, raw_bar) = scoped
  if pdl and not interpret:
    plgpu.griddepcontrol_launch_dependents()
    plgpu.griddepcontrol_wait()
  wg = lax.axis_index("wg")
  p = lax.axis_index("c")
  cta_strips = consumers * strips
  strip_blocks = w_ref.shape[1] // cta_strips
  rebalance = consumers == 2 and not interpret
  scan = functools.partial(_scan_groups, meta_ref, e=e, t_real=t_real, mp=mp)
  # a split item has <= 3 contributors: the tail is used only if every CTA's range is >= half
  # an item (t_k / 2 steps), else the leftover items go whole
  max_contrib = min(ctas, 3)

  def counts():
    """(chunks, zero chunks, total rows)."""
    if list_in_kernel:
      n_chunks, total = scan(None)[:2]
      return n_chunks, lax.div(t_real - total + (mp - 1), jnp.int32(mp)), total
    return meta_ref[0, n_slots], meta_ref[1, n_slots], meta_ref[2, n_slots]

  def chunk(c):
    """(expert, first row, end row) of chunk c."""
    if list_in_kernel:
      return scan(c)[2:]
    return meta_ref[0, c], meta_ref[1, c], meta_ref[2, c]

  n_chunks, n_zero, total = counts()
  n_items = n_chunks * strip_blocks
  if tail:
    # stream-K tail: every CTA takes n_items // G whole items; the K steps of the L leftover
    # items are shared evenly, CTA p taking tail steps [lo, hi) of S = L t_k
    # (only when every CTA gets >= t_k / 2 tail steps: an item's contributors are then <= 3
    # consecutive CTAs; with fewer leftover steps the leftover items go whole to the first CTAs)
    split = (n_items % ctas) * t_k >= ctas * (-(-t_k // 2))
    n_whole = jnp.where(split, n_items // ctas, jnp.maximum(n_items - p + ctas - 1, 0) // ctas)
    s_tail = jnp.where(split, (n_items % ctas) * t_k, 0)
    lo = p * s_tail // ctas
    hi = (p + 1) * s_tail // ctas
  else:
    n_whole = jnp.maximum(n_items - p + ctas - 1, 0) // ctas
    lo = hi = s_tail = jnp.int32(0)
  j0 = lo // t_k
  j1 = jnp.where(hi > lo, (hi + t_k - 1) // t_k, j0)     # tail items [j0, j1)

  def cta_of(step):   # the CTA whose tail range holds tail step `step`
    return ((step + 1) * ctas - 1) // jnp.maximum(s_tail, 1)

  def piece(j):
    """Tail item j: (item, first K tile, end K tile, first local step)."""
    kb = jnp.maximum(lo - j * t_k, 0)
    ke = jnp.minimum(hi - j * t_k, t_k)
    return n_whole * ctas + j, kb, ke, n_whole * t_k + j * t_k + kb - lo

  def convert(i):
    r = lax.rem(i, jnp.int32(_X_RAW_SLOTS))
    slot = lax.rem(i, jnp.int32(stages))
    plgpu.barrier_wait(raw_bar.at[r])
    for h in range(kps):
      src = x_raw.at[r] if kps == 1 else x_raw.at[r, h]
      dst = x_smem.at[slot] if kps == 1 else x_smem.at[slot, h]
      if interpret:
        dst[...] = mg._permute_x_tile(src[...].astype(jnp.float16))
      else:
        mg._convert_x_gpu(src, dst, mp, mp, x_transforms)
    plgpu.commit_smem()
    plgpu.barrier_arrive(full.at[slot])

  def produce(item, kb, ke, i0):
    c = item // strip_blocks
    b = lax.rem(item, jnp.int32(strip_blocks))
    g, r0, r1 = chunk(c)
    rbase = jnp.minimum(r0, t_rows - mp)

    @pl.loop(kb, ke)
    def _(kt):
      i = i0 + kt - kb
      slot = lax.rem(i, jnp.int32(stages))
      pl.when(i >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))

      @pl.when(kt == kb)
      def _():   # the piece's (expert, rows) for the consumers, published with the slot
        for f, v in enumerate((g, r0, r1, rbase)):
          info[slot, f] = v

      ktiles = kt if kps == 1 else pl.ds(pl.multiple_of(kt * kps, kps), kps)
      plgpu.copy_gmem_to_smem(w_ref.at[g, pl.ds(b * cta_strips, cta_strips), ktiles],
                              w_smem.at[slot], full.at[slot])
      r = lax.rem(i, jnp.int32(_X_RAW_SLOTS))
      for h in range(kps):   # (a TMA box is <= 256 elements per dimension)
        k0 = pl.multiple_of((kt * kps + h) * TILE_K, TILE_K)
        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(rbase, mp), pl.ds(k0, TILE_K)],
                                x_raw.at[r] if kps == 1 else x_raw.at[r, h], raw_bar.at[r])
      pl.when(i >= 1)(lambda: convert(i - 1))

  @pl.when(wg == consumers)
  def _producer():
    if rebalance:
      plgpu.set_max_registers(40, action="decrease")

    @pl.loop(0, n_whole)
    def _(it):
      produce(p + it * ctas, jnp.int32(0), jnp.int32(t_k), it * t_k)

    if tail:
      pl.loop(j0, j1)(lambda j: produce(*piece(j)))

    steps = n_whole * t_k + hi - lo
    pl.when(steps > 0)(lambda: convert(steps - 1))

    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _(i):   # observe the last releases too, so no barrier phase is left unobserved
      plgpu.barrier_wait(free.at[lax.rem(i, jnp.int32(stages))])

  local = [wg * strips + j for j in range(strips)]     # the consumer's strips in the slot

  def consume(item, kb, ke, i0):
    """-> (accs times the global scale, strip block, rbase, r0, r1) of one piece."""
    b = lax.rem(item, jnp.int32(strip_blocks))
    slot0 = lax.rem(i0, jnp.int32(stages))
    plgpu.barrier_wait(full.at[slot0])      # the piece's first K tile: its info is in the slot
    g, r0, r1, rbase = (info[slot0, f] for f in range(4))
    gfac = gs_ref[g] * mg._GLOBAL_FACTOR
    if interpret:
      def step(kt, accs):
        slot = lax.rem(i0 + kt - kb, jnp.int32(stages))
        pl.when(kt > kb)(lambda: plgpu.barrier_wait(full.at[slot]))
        for h in range(kps):
          xt = (x_smem[slot] if kps == 1 else x_smem[slot, h]).astype(jnp.float32).T
          accs = tuple(
              acc + jnp.dot(mg.dequant_record(w_smem[slot, j] if kps == 1 else
                                              w_smem[slot, j, h]).astype(jnp.float32), xt,
                            precision=lax.Precision.HIGHEST) for acc, j in zip(accs, local))
        plgpu.barrier_arrive(free.at[slot])
        return accs
      accs = lax.fori_loop(kb, ke, step, tuple(jnp.zeros((STRIP, mp), jnp.float32)
                                               for _ in local))
    else:
      def run(*acc_refs):
        @pl.loop(kb, ke)
        def _(kt):
          slot = lax.rem(i0 + kt - kb, jnp.int32(stages))
          pl.when(kt > kb)(lambda: plgpu.barrier_wait(full.at[slot]))
          for h in range(kps):
            for acc_ref, j in zip(acc_refs, local):
              rec = w_smem.at[slot, j] if kps == 1 else w_smem.at[slot, j, h]
              xs = x_smem.at[slot] if kps == 1 else x_smem.at[slot, h]
              plgpu.wgmma(acc_ref, mg._dequant_gpu(rec), xs.T)
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(free.at[slot])
        return [r[...] for r in acc_refs]
      accs = pl.run_scoped(run, *[plgpu.ACC((STRIP, mp), jnp.float32) for _ in local])
    return [acc * gfac for acc in accs], b, rbase, r0, r1

  def view(b, j):
    return o_ref.at[:, pl.ds(pl.multiple_of((b * cta_strips + j) * STRIP, STRIP), STRIP)]

  cnt = None
  if tail and not interpret:
    cnt = pl.get_global(plgpu.SemaphoreType.REGULAR((ctas * cta_strips * 128,)))

  def combine(j, acc, b, st, rbase, r0, r1):
    """Split tail item j, strip st of the block: this CTA's partial -> the workspace; the last
    contributor adds them and stores y."""
    c_first = cta_of(j * t_k)
    n = cta_of(j * t_k + t_k - 1) - c_first + 1
    mine = jnp.where(p == c_first, 1, 0)
    if interpret:
      # the interpreter runs the CTAs one after another in grid order, so the contributor with
      # the highest index (c_first + n - 1) is the last: it adds the slots (no counters)
      ws_ref[p, mine, st] = acc.reshape(STRIP * mp)

      @pl.when(p == c_first + n - 1)
      def _():
        total_acc = jnp.zeros((STRIP * mp,), jnp.float32)
        for r in range(max_contrib):
          part = ws_ref[jnp.minimum(c_first + r, ctas - 1), 1 if r == 0 else 0, st]
          total_acc = total_acc + jnp.where(r < n, part, 0.0)
        _store_rows(total_acc.reshape(STRIP, mp), view(b, st), rbase, r0, r1, mp=mp,
                    interpret=True)
      return
    own = ((p * 2 + mine) * cta_strips + st) * (STRIP * mp)
    c0 = pl.multiple_of((j * cta_strips + st) * 128, 128)
    _fixup_gpu(plgpu.layout_cast(acc, plgpu.Layout.WGMMA), ws_ref, cnt.at[pl.ds(c0, 128)],
               view(b, st), n, c_first, own, st, rbase, r0, r1, ctas=ctas,
               cta_strips=cta_strips, mp=mp, max_contrib=max_contrib)

  @pl.when(wg < consumers)
  def _consumer():
    if rebalance:
      plgpu.set_max_registers(232, action="increase")

    @pl.loop(0, n_whole)
    def _(it):
      accs, b, rbase, r0, r1 = consume(p + it * ctas, jnp.int32(0), jnp.int32(t_k), it * t_k)
      for acc, j in zip(accs, local):
        _store_rows(acc, view(b, j), rbase, r0, r1, mp=mp, interpret=interpret)

    def tail_item(j):
      item, kb, ke, i0 = piece(j)
      accs, b, rbase, r0, r1 = consume(item, kb, ke, i0)
      whole = (kb == 0) & (ke == t_k)
      for acc, st in zip(accs, local):
        pl.when(whole)(lambda acc=acc, st=st: _store_rows(acc, view(b, st), rbase, r0, r1,
                                                          mp=mp, interpret=interpret))
        pl.when(jnp.logical_not(whole))(
            lambda acc=acc, st=st: combine(j, acc, b, st, rbase, r0, r1))

    if tail:
      pl.loop(j0, j1)(tail_item)

    # rows past the total: zeros
    my_zero = jnp.maximum(n_zero * strip_blocks - p + ctas - 1, 0) // ctas

    @pl.loop(0, my_zero)
    def _(it):
      item = p + it * ctas
      z = item // strip_blocks
      b = item - z * strip_blocks
      r0 = total + z * mp
      zeros = jnp.zeros((STRIP, mp), jnp.float32)
      if not interpret:
        zeros = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
      for j in local:
        _store_rows(zeros, view(b, j), jnp.minimum(r0, t_rows - mp), r0,
                    jnp.minimum(r0 + mp, t_rows), mp=mp, interpret=interpret)


def _check(x, w, global_scale, group_sizes, n):
  if x.ndim != 2:
    raise ShapeError(f"x must be [T, K], got {x.shape}")
  if w.ndim != 5 or w.shape[3:] != (72, 32) or w.dtype != jnp.uint32:
    raise ShapeError(f"the weight must be to_grouped_mgpu_layout's uint32 [E, S, K/256, 72, 32],"
                     f" got {w.dtype}{list(w.shape)}")
  e = w.shape[0]
  if group_sizes.ndim != 1 or group_sizes.shape[0] != e:
    raise ShapeError(f"group_sizes must be [E={e}], got {group_sizes.shape}")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ShapeError(f"group_sizes must be integer, got {group_sizes.dtype}")
  t, k = x.shape
  nvfp4.check_k(k)
  if -(-k // TILE_K) != w.shape[2]:
    raise ShapeError(f"x has K={k} but the weight holds {w.shape[2]} K tiles of {TILE_K}")
  if not 0 < n <= w.shape[1] * STRIP or -(-n // STRIP) > w.shape[1] or (
      w.shape[1] - -(-n // STRIP) >= STRIP_ALIGN):
    raise ShapeError(f"n={n} does not match the weight's {w.shape[1]} strips of {STRIP}")
  if jnp.shape(global_scale) != (e,):
    raise ShapeError(f"global_scale must be [E={e}], got shape {jnp.shape(global_scale)}")
  if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ShapeError(f"x must be bf16, f16 or f32, got {x.dtype}")


@functools.partial(jax.jit, static_argnames=("n", "tiling", "interpret", "out_dtype"))
def grouped_w4a16_mgpu(x: jax.Array, w: jax.Array, global_scale: jax.Array,
                       group_sizes: jax.Array, *, n: int,
                       tiling: GroupedMgpuTiling | None = None, interpret: bool = False,
                       out_dtype=None) -> jax.Array:
  """ragged_dot(x [T, K], W [E, K, N], group_sizes [E]) -> [T, N] (``out_dtype``, default x's)
  with per-expert NVFP4 weights repacked by ``to_grouped_mgpu_layout`` (K a multiple of 16, any
  N), global scales [E]. x is cast to f16 (|x| <= 65504) in the kernel."""
  _check(x, w, global_scale, group_sizes, n)
  t_rows, k = x.shape
  e, s_n, t_k = w.shape[:3]
  t = tiling or default_tiling(t_rows, e, k=k)
  if t_k % t.k_per_step:      # K tiles per step must divide the K tiles: else one per step
    t = dataclasses.replace(t, k_per_step=1)
  mp = t.block_rows
  out_dtype = out_dtype or x.dtype
  if smem_bytes(t) > mg._SMEM_LIMIT:
    raise ShapeError(f"{t} needs {smem_bytes(t)} bytes of shared memory")
  if s_n % t.cta_strips:
    raise ShapeError(f"{s_n} strips are not a multiple of the CTA's {t.cta_strips} (consumers x "
                     f"strips)")
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    x = x.astype(jnp.float16)
  # raw TMA tiles are [Mp, 256] at rows min(start, T - Mp), K tiles whole: pad small T / odd K
  rows = max(t_rows, mp)
  if rows != t_rows or k != t_k * TILE_K:
    x = jnp.pad(x, ((0, rows - t_rows), (0, t_k * TILE_K - k)))
  if t.work_list == "kernel":
    meta, n_slots = group_sizes.astype(jnp.int32), 0
  else:
    meta = make_work_list(group_sizes, t_rows, mp)
    n_slots = meta.shape[1] - 2
  gs = jnp.asarray(global_scale, jnp.float32)
  x_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  kps = t.k_per_step
  kernel = functools.partial(_kernel, t_rows=rows, t_real=t_rows, mp=mp, consumers=t.consumers,
                             strips=t.strips, stages=t.stages, t_k=t_k // kps, n_slots=n_slots,
                             kps=kps,
                             ctas=t.ctas, e=e, list_in_kernel=t.work_list == "kernel",
                             tail=t.tail, x_transforms=x_transforms, interpret=bool(interpret),
                             pdl=t.pdl)

  def entry(x_ref, w_ref, gs_ref, meta_ref, o_ref, ws_ref=None):
    ks = () if kps == 1 else (kps,)
    smem = (plgpu.SMEM((t.stages, t.cta_strips, *ks, 72, 32), jnp.uint32),
            plgpu.SMEM((t.stages, *ks, mp, TILE_K), jnp.float16, transforms=x_transforms),
            plgpu.SMEM((_X_RAW_SLOTS, *ks, mp, TILE_K), x.dtype),
            plgpu.SMEM((t.stages, 4), jnp.int32))
    bars = (plgpu.Barrier(num_arrivals=2, num_barriers=t.stages),
            plgpu.Barrier(num_arrivals=t.consumers, num_barriers=t.stages),
            plgpu.Barrier(num_arrivals=kps, num_barriers=_X_RAW_SLOTS))
    pl.run_scoped(lambda *scoped: kernel(x_ref, w_ref, gs_ref, meta_ref, o_ref, ws_ref, scoped),
                  smem,
                  bars, collective_axes="wg")

  out_type = jax.ShapeDtypeStruct((rows, s_n * STRIP), out_dtype)
  if t.tail:   # + the f32 workspace of the split items' partial sums (2 slots per CTA)
    out_type = (out_type, jax.ShapeDtypeStruct((t.ctas, 2, t.cta_strips, STRIP * mp),
                                               jnp.float32))
  out = plgpu.kernel(
      entry, out_type=out_type, grid=(t.ctas,),
      grid_names=("c",), num_threads=t.consumers + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=0,
                                           unsafe_no_auto_barriers=t.no_auto_barriers),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(x, w, gs, meta)
  if t.tail:
    out = out[0]
  if rows != t_rows or s_n * STRIP != n:
    out = out[:t_rows, :n]
  return out


def grouped_w4a16_reference_mgpu(x: jax.Array, w: jax.Array, global_scale: jax.Array,
                                 group_sizes: jax.Array, n: int) -> jax.Array:
  """Plain-JAX reference on the repacked weight (undoes the repack; f32 'highest' ragged_dot)."""
  from kernels import grouped_matmul   # noqa: PLC0415
  packed, scale = from_grouped_mgpu_layout(w, n, x.shape[1])
  return grouped_matmul.grouped_nvfp4_reference(x, packed, scale, global_scale, group_sizes)
