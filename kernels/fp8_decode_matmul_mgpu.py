"""FP8 (E4M3 x E4M3) decode GEMM on Mosaic GPU (Hopper): TMA-streamed weight, FP8 wgmma from SMEM.

Computes the raw (unscaled) product of ``ops.FP8Weight.linear_deferred`` for decode steps:
    y[R, N] = xq[R, K] . w[N, K]^T   (f32 accumulation),  R <= 64 rows,
returned either as bf16 [R, N] (split 1: what ``ops.fp8_dot`` returns) or as f32 split-K partial
sums [S, R, N] (S > 1: what ``ops.fp8_dot_partials`` returns; the sum over S is the product), so
the existing consumers (``ops.ScaledRows.apply``, kernels/add_rms_norm.py, kernels/rope_kv_write.py,
kernels/fp8_act_quant.py) take it unchanged.

Layout: w is the E4M3 [N, K] of ``ops.FP8Weight`` as stored (K contiguous: the K-major operand
FP8 wgmma requires, no repack); xq the E4M3 activations [R, K] (``ops.quantize_rows_fp8``).

Tiling: grid (ceil(N / tile_n), split_k); CTA (n, s) owns W rows [n0, n0 + tile_n) (the last CTA's
n0 is clamped to N - tile_n: its tile overlaps its neighbour's, which it recomputes with the same
values, so no out-of-bounds access and no masking on N) and the K range [s Ks, (s + 1) Ks),
Ks = K / split_k. Per CTA one producer warpgroup streams, per K step of tile_k (128 = one 128-byte
swizzle row of E4M3) the W tile [tile_n, tile_k] and the x tile [Rp, tile_k] (Rp = R rounded up to
8) by TMA into ``stages`` shared-memory slots (128-byte swizzle, (8, 128) tiles; a "full" mbarrier
per slot, a "free" one the consumer arrives on); one consumer warpgroup issues per step one FP8
wgmma m64 n=tile_n k=tile_k with A = the x tile (64-row slot; rows >= Rp are never written and only
reach accumulator rows that are never stored) and B = the W tile transposed, waits and releases
the slot. Where Ks is not a multiple of tile_k the last step is peeled off statically: it loads
the range's last full-width box (overlapping the step before; TMA boxes are fixed and the 128-byte
swizzled tiles cannot be sliced narrower for the copy) and multiplies only its new columns. Epilogue: the accumulator [64, tile_n] (WGMMA layout) is stored from
registers straight into the output (rows < R; 8- or 4-byte stores, 32 bytes per row per quad of
threads): no shared-memory round trip.

Why this orientation (x as wgmma's A, W as B): the wgmma n dimension (up to 256) runs over the
weight, so one consumer warpgroup covers 256 weight rows per step with a 128-register accumulator;
R <= 64 pads to the fixed m64 for free (the tensor cores are < 20% busy at decode anyway: a
[256, 128] E4M3 W tile is 2 M MACs = ~512 clocks of one SM's FP8 tensor cores against ~2500 clocks
to stream its 32 KB at the SM's share of the HBM bandwidth).

Schedule (``default_tiling``): tile_n in 64..256 (multiples of 32) and a power-of-two split_k chosen
by a cost model (whole waves of CTAs over the SMs x per-CTA bytes + the partials' write and re-read
+ the x tiles re-read from L2), so that all SMs stream the same bytes to the end; K steps of 256
(longer contiguous runs per weight row than 128: 2-7% faster on the H100); ``TUNED`` holds the
H100-measured schedules of the Llama-3-8B decode shapes at R = 64 (wqkv 6144 x 4096: 256 CTAs of
48 rows x 2 K halves, two per SM; wo 4096 x 4096: 64 x 2 with 512-wide steps; w_gate_up
28672 x 4096: 256 CTAs of 112 rows, two per SM; w_down 4096 x 14336: 128 rows x 4 K quarters).

Roofline (H100 SXM, ~3.0 TB/s measured read ceiling): the bytes are N K (weight) + R K (x, from L2)
+ the output: wqkv 25.4 MB -> 8.5 us, wo 17.0 MB -> 5.7 us, w_gate_up 117.7 MB -> 39 us, w_down
59.6 MB -> 19.9 us: 73 us per layer. The FP8 tensor cores are < 20% busy at R = 64.

Measured (H100, jax 0.11.2, 2026-11-24 windows 3-4, GPU time per GEMM from a profiler trace, weight
sets > 200 MB, each output float64-checked): R = 64: wqkv 11.9-12.2 us (2.1 TB/s), wo 8.8-8.9
(1.9), w_gate_up 44.2-44.9 (2.65), w_down 24.1 (2.48), LM head 128256 x 4096 187.9 (2.80), against
XLA's cuBLASLt path as ops runs it (split-K partials) 13.4, 11.2-11.4, 44.4-45.9, 26.9, 192.3;
R = 1: 12.1, 9.5, 42.9 (2.74), 24.4, 174 (3.02). Where the rest goes: ~2-3 us per GEMM of pipeline
fill and drain (wqkv / wo), and DRAM efficiency (ncu: 74-77% of the 3.35 TB/s DRAM peak for
w_gate_up / w_down, 15-24% L2 hits: the x tiles). Tried and not kept: L2 prefetch ahead of the
ring (l2_ahead: 10-20% slower), programmatic dependent launch (pdl: no gain in the GEMM times,
within noise in serving), rotated K walks (rotate: no change). Accuracy: the FP8 wgmma's
accumulation is not exact f32 (relative error ~1e-3 of the output's max over K = 2048-4096, the
same as cuBLASLt's FP8 GEMMs: both are within the bf16 output rounding).

Interpret mode (CPU, ``plgpu.InterpretGPUParams``) runs the same grid, TMA copies, barriers,
slots, clamped tiles and the peeled tail with a jnp dot for the wgmma and a jnp store for the
register epilogue.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxinfer.errors import ShapeError
from kernels.nvfp4_matmul_mgpu import wgmma_thread_origin

WG_M = 64          # wgmma's M: rows of x per accumulator (R <= 64)
K_ALIGN = 128      # K granularity (one 128-byte swizzle row of E4M3)
MAX_ROWS = WG_M
_SMEM_BUDGET = 200 * 1024


@dataclasses.dataclass(frozen=True)
class DecodeTiling:
  """tile_n: weight rows per CTA (wgmma n: a multiple of 8, <= 256); split_k: K ranges (grid
  dimension; > 1 gives f32 partials [split_k, R, N]); tile_k: K per pipeline step (a multiple of
  128); stages: shared-memory slots in flight (each (tile_n + 64) * tile_k bytes); wait_prev: the
  consumer keeps one step's wgmma in flight (waits for step i-1's and releases its slot after
  issuing step i's); pdl: programmatic dependent launch (Hopper), 0 off; 1: the kernel may start
  while the previous kernel of the stream still runs: its producer requests the weight tiles of
  the first ``stages`` steps, then waits (griddepcontrol.wait: the earlier grids have completed and
  their writes are visible) before it loads any x (the output is written after x is read, so after
  the wait too); 2: as 1, and every CTA also signals griddepcontrol.launch_dependents at its start
  (the next PDL kernel may launch early); l2_ahead: > 0: with each step's loads the producer also
  requests the W tile ``stages + l2_ahead - 1`` steps ahead into L2 (cp.async.bulk.prefetch), so
  more of the weight stream is in flight than the shared-memory ring holds; rotate: CTA n walks
  its K range starting at step n mod steps (wrapping around), so that the CTAs' concurrent
  requests are spread over the K offsets (DRAM channels / banks) instead of all at the same
  offset (only without a tail step; the sum's order differs, not its terms)."""
  tile_n: int = 256
  split_k: int = 1
  tile_k: int = 128
  stages: int = 4
  wait_prev: bool = False
  pdl: int = 0
  l2_ahead: int = 0
  rotate: bool = False

  def __post_init__(self):
    if self.tile_n % 8 or not 8 <= self.tile_n <= 256:
      raise ValueError(f"tile_n must be a multiple of 8 in [8, 256], got {self}")
    if self.tile_k % K_ALIGN or self.tile_k <= 0:
      raise ValueError(f"tile_k must be a positive multiple of {K_ALIGN}, got {self}")
    if self.l2_ahead < 0:
      raise ValueError(f"l2_ahead must be >= 0, got {self}")
    if self.pdl not in (0, 1, 2):
      raise ValueError(f"pdl must be 0, 1 or 2, got {self}")
    if self.split_k < 1 or self.stages < 1:
      raise ValueError(f"split_k and stages must be >= 1, got {self}")


def smem_bytes(t: DecodeTiling) -> int:
  return t.stages * (t.tile_n + WG_M) * t.tile_k + 1024


def padded_rows(r: int) -> int:
  return -(-r // 8) * 8


def _cost(r: int, n: int, k: int, tile_n: int, split: int, num_sms: int) -> float:
  """Byte-equivalents of one schedule: whole waves of CTAs x the bytes each streams (its W tile,
  plus its x tiles from L2 at a quarter weight), plus the output written and re-read."""
  ctas = -(-n // tile_n) * split
  ks = k // split
  waves = -(-ctas // num_sms)
  per_cta = tile_n * ks + 0.25 * padded_rows(r) * ks
  out = 2 * split * r * n * 4 if split > 1 else 2 * r * n * 2
  return waves * num_sms * per_cta + out + 2048.0 * ctas   # + a per-CTA fixed cost (fill)


# H100-measured schedules (benchmarks/serving.md, kernel table; windows 2-4 of 2026-11-24, GPU
# time per GEMM at R=64): (R, N, K) -> fields. wqkv and w_gate_up run two CTAs per SM (256 CTAs
# of <= 113 KB of shared memory): wqkv 11.9-12.0 us vs 12.1-12.2 for 128 CTAs of 96 rows;
# w_gate_up 44.1-44.9 us vs 47.3 for 128 CTAs of 224 rows with 128-wide K steps. wo without
# wait_prev (8.7-8.8 vs 8.9 us).
TUNED: dict[tuple[int, int, int], dict] = {
    (64, 6144, 4096): dict(tile_n=48, split_k=2, tile_k=256, stages=3),      # wqkv 11.9 us
    (64, 4096, 4096): dict(tile_n=64, split_k=2, tile_k=512, stages=3,
                           wait_prev=False),                                 # wo 8.8 us
    (64, 28672, 4096): dict(tile_n=112, split_k=1, tile_k=256, stages=2),    # w_gate_up 44.2 us
    (64, 4096, 14336): dict(tile_n=128, split_k=4, tile_k=256, stages=4),    # w_down 24.1 us
}

# Experiments (serving A/B without code edits): "field=value,..." for tile_k, stages, wait_prev,
# pdl, l2_ahead, applied over TUNED in every default_tiling (explicit overrides still win).
_ENV_FIELDS = ("tile_k", "stages", "wait_prev", "pdl", "l2_ahead", "rotate")


def _env_fields() -> dict:
  spec = os.environ.get("JAXINFER_FP8_DECODE_TILING", "")
  out = {}
  for item in filter(None, (i.strip() for i in spec.split(","))):
    key, _, val = item.partition("=")
    if key not in _ENV_FIELDS:
      raise ValueError(f"JAXINFER_FP8_DECODE_TILING: unknown field {key!r} (one of {_ENV_FIELDS})")
    out[key] = val.lower() in ("1", "true") if key in ("wait_prev", "rotate") else int(val)
  return out


def default_tiling(r: int, n: int, k: int, num_sms: int = 132, max_split: int = 16,
                   **overrides) -> DecodeTiling:
  """The cheapest (tile_n, split_k) by ``_cost`` (tile_n a multiple of 32 in [64, 256], <= N;
  split_k a power of two <= max_split with Ks a multiple of 128 and >= 512 where possible), as
  many stages as fit ~200 KB of shared memory (2..8, at most the steps of a CTA), K steps of 256
  (128 for K ranges under 512), the consumer keeping one step's wgmma in flight; ``TUNED``
  schedules where measured (unless their split exceeds max_split). ``overrides``
  replace fields (over JAXINFER_FP8_DECODE_TILING's, over TUNED entries)."""
  fields = dict(TUNED.get((r, n, k), {}))
  if fields.get("split_k", 1) > max_split:
    fields = {}
  fields.setdefault("wait_prev", True)
  fields.update(_env_fields())
  fields.update(overrides)
  if "tile_n" in fields and "split_k" in fields:
    tile_n, split = fields.pop("tile_n"), fields.pop("split_k")
  else:
    best = None
    cands = [tn for tn in range(64, 257, 32) if tn <= n] or [max(8, n // 8 * 8)]
    for tn in ([fields["tile_n"]] if "tile_n" in fields else cands):
      s = 1
      while s <= max_split and k % (K_ALIGN * s) == 0:
        if s == 1 or k // s >= 512:
          c = _cost(r, n, k, tn, s, num_sms)
          if best is None or c < best[0] - 1e-6 * best[0]:
            best = (c, tn, s)
        s *= 2
    _, tile_n, split = best
    if "split_k" in fields:
      split = fields["split_k"]
    fields.pop("tile_n", None)
    fields.pop("split_k", None)
  ks = k // split
  tile_k = min(fields.pop("tile_k", 2 * K_ALIGN if ks >= 4 * K_ALIGN else K_ALIGN),
               ks // K_ALIGN * K_ALIGN)
  steps = -(-(k // split) // tile_k)
  stages = fields.pop("stages", None)
  if stages is None:
    stages = 8
    while stages > 2 and smem_bytes(DecodeTiling(tile_n, split, tile_k, stages)) > _SMEM_BUDGET:
      stages -= 1
    stages = max(1, min(stages, steps))
  return DecodeTiling(tile_n=tile_n, split_k=split, tile_k=tile_k, stages=stages, **fields)


def supports(r: int, n: int, k: int) -> bool:
  """Shapes the kernel takes: 1 <= R <= 64, N a multiple of 8 (>= 8), K a multiple of 128."""
  return 1 <= r <= MAX_ROWS and n >= 8 and n % 8 == 0 and k >= K_ALIGN and k % K_ALIGN == 0


def _fp8_transforms():
  return (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))


def _store_rows(acc, o_ref, r: int):
  """acc [64, tile_n] (WGMMA layout) -> o_ref[row, col] for row < r (o_ref: an [r, tile_n] view of
  the output), each register's two consecutive columns as one vector store."""
  def body(ctx, a, ref):
    del ctx
    from jax._src.lib.mlir import ir                            # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, vector        # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    index = ir.IndexType.get()
    i32 = ir.IntegerType.get_signless(32)
    _, row0, q2 = wgmma_thread_origin()
    for idx, reg in np.ndenumerate(a.registers):
      j, h = idx[1], idx[4]
      row32 = arith.addi(row0, mu.c(8 * h, i32))
      row = arith.index_cast(index, row32)
      col = arith.index_cast(index, arith.addi(q2, mu.c(8 * j, i32)))
      if r == WG_M:
        vector.store(reg, ref, [row, col])
      else:
        with mu.when(arith.cmpi(arith.CmpIPredicate.ult, row32, mu.c(r, i32))):
          vector.store(reg, ref, [row, col])
    return ()

  plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()), return_type=())(body)(
      acc, o_ref)


def _kernel(x_ref, w_ref, o_ref, scoped, *, r: int, rp: int, n: int, t: DecodeTiling, ks: int,
            interpret: bool):
  (w_smem, x_smem), (full, free) = scoped
  tn, tk, stages, split = t.tile_n, t.tile_k, t.stages, t.split_k
  wg = lax.axis_index("wg")
  n0 = jnp.minimum(lax.axis_index("n") * tn, n - tn)
  sk = lax.axis_index("s")
  k0 = sk * ks
  full_steps, rem = divmod(ks, tk)
  steps = full_steps + (1 if rem else 0)

  def slot_of(i):
    return lax.rem(i, jnp.int32(stages)) if not isinstance(i, int) else i % stages

  rot = lax.rem(lax.axis_index("n"), jnp.int32(full_steps)) if t.rotate and not rem else None

  def col0(i, tail):
    """First K column of step i; the tail step loads the last full-width box of the K range (it
    overlaps the previous step's; the consumer takes its last `rem` columns)."""
    if tail:
      return pl.multiple_of(k0 + ks - tk, K_ALIGN)
    j = i if rot is None else lax.rem(i + rot, jnp.int32(full_steps))
    return pl.multiple_of(k0 + j * tk, K_ALIGN)

  def issue_w(i, tail=False):
    slot = slot_of(i)
    plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(n0, tn), pl.ds(col0(i, tail), tk)], w_smem.at[slot],
                            full.at[slot])

  def issue_x(i, tail=False):
    slot = slot_of(i)
    plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(col0(i, tail), tk)],
                            x_smem.at[slot, pl.ds(0, rp)], full.at[slot])

  # pdl: the weight tiles of the first `prefetch` steps are requested before griddepcontrol.wait
  # (no earlier kernel writes the weights), everything that reads x after it.
  prefetch = min(stages, steps) if t.pdl else 0

  def cols(ref, width):
    """The columns a step multiplies: all, or the tail step's last `width`."""
    return ref if width == tk else ref.at[:, pl.ds(tk - width, width)]

  @pl.when(wg == 1)
  def _producer():
    if t.pdl == 2 and not interpret:
      plgpu.griddepcontrol_launch_dependents()
    for i in range(prefetch):
      issue_w(jnp.int32(i), tail=bool(rem) and i == full_steps)
    if t.pdl and not interpret:
      plgpu.griddepcontrol_wait()

    @pl.loop(0, full_steps)
    def _(i):
      pl.when(i >= stages)(lambda: plgpu.barrier_wait(free.at[slot_of(i)]))
      if prefetch:
        pl.when(i >= prefetch)(lambda: issue_w(i))
      else:
        issue_w(i)
      issue_x(i)
      if t.l2_ahead and not interpret:
        j = i + (stages + t.l2_ahead - 1)
        pl.when(j < full_steps)(lambda: plgpu.async_prefetch(
            w_ref.at[pl.ds(n0, tn), pl.ds(col0(j, False), tk)]))

    if rem:
      if full_steps >= stages:
        plgpu.barrier_wait(free.at[slot_of(full_steps)])
      if full_steps >= prefetch:
        issue_w(jnp.int32(full_steps), tail=True)
      issue_x(jnp.int32(full_steps), tail=True)

    @pl.loop(max(steps - stages, 0), steps)
    def _(i):   # observe the last releases too, so no barrier phase is left unobserved
      plgpu.barrier_wait(free.at[slot_of(i)])

  def out_view():
    cols = pl.ds(n0, tn)
    return o_ref.at[sk, :, cols] if split > 1 else o_ref.at[:, cols]

  @pl.when(wg == 0)
  def _consumer():
    if interpret:
      def mma(acc, slot, width):
        xt = x_smem[slot].astype(jnp.float32)[:, tk - width:]
        wt = w_smem[slot].astype(jnp.float32)[:, tk - width:]
        return acc + jnp.dot(xt, wt.T, precision=lax.Precision.HIGHEST)

      def step(i, acc):
        slot = slot_of(i)
        plgpu.barrier_wait(full.at[slot])
        acc = mma(acc, slot, tk)
        plgpu.barrier_arrive(free.at[slot])
        return acc

      acc = lax.fori_loop(0, full_steps, step, jnp.zeros((WG_M, tn), jnp.float32))
      if rem:
        slot = full_steps % stages
        plgpu.barrier_wait(full.at[slot])
        acc = mma(acc, slot, rem)
        plgpu.barrier_arrive(free.at[slot])
      out_view()[...] = acc[:r].astype(o_ref.dtype)
      return

    def run(acc_ref):
      def one(slot, width):
        plgpu.wgmma(acc_ref, cols(x_smem.at[slot], width),
                    cols(w_smem.at[slot], width).transpose((1, 0)))

      if t.wait_prev:
        @pl.loop(0, full_steps)
        def _(i):
          slot = slot_of(i)
          plgpu.barrier_wait(full.at[slot])
          one(slot, tk)
          plgpu.wgmma_wait(1)
          pl.when(i > 0)(lambda: plgpu.barrier_arrive(free.at[slot_of(i + stages - 1)]))
        if rem:
          slot = full_steps % stages
          plgpu.barrier_wait(full.at[slot])
          one(slot, rem)
          plgpu.wgmma_wait(1)
          if full_steps:
            plgpu.barrier_arrive(free.at[(full_steps - 1) % stages])
        plgpu.wgmma_wait(0)
        plgpu.barrier_arrive(free.at[(steps - 1) % stages])
      else:
        @pl.loop(0, full_steps)
        def _(i):
          slot = slot_of(i)
          plgpu.barrier_wait(full.at[slot])
          one(slot, tk)
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(free.at[slot])
        if rem:
          slot = full_steps % stages
          plgpu.barrier_wait(full.at[slot])
          one(slot, rem)
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(free.at[slot])
      return acc_ref[...]

    acc = pl.run_scoped(run, plgpu.ACC((WG_M, tn), jnp.float32))
    out = plgpu.layout_cast(acc.astype(o_ref.dtype), plgpu.Layout.WGMMA)
    _store_rows(out, out_view(), r)


def _check_inputs(xq: jax.Array, w: jax.Array) -> None:
  if xq.ndim != 2 or w.ndim != 2 or xq.shape[1] != w.shape[1]:
    raise ShapeError(f"need xq [R, K] and w [N, K], got {xq.shape} and {w.shape}")
  if xq.dtype != jnp.float8_e4m3fn or w.dtype != jnp.float8_e4m3fn:
    raise ShapeError(f"xq and w must be float8_e4m3fn, got {xq.dtype} and {w.dtype}")
  r, k = xq.shape
  n = w.shape[0]
  if not supports(r, n, k):
    raise ShapeError(f"fp8_decode_matmul takes 1 <= R <= {MAX_ROWS}, N % 8 == 0, "
                     f"K % {K_ALIGN} == 0; got R={r}, N={n}, K={k}")


def _check_tiling(r: int, n: int, k: int, t: DecodeTiling) -> None:
  del r
  if k % (K_ALIGN * t.split_k):
    raise ShapeError(f"K={k} does not split into {t.split_k} ranges of a multiple of {K_ALIGN}")
  if t.tile_k > k // t.split_k:
    raise ShapeError(f"tile_k={t.tile_k} exceeds a split's K range {k // t.split_k}")
  if t.tile_n > n:
    raise ShapeError(f"tile_n={t.tile_n} exceeds N={n}")
  if smem_bytes(t) > 227 * 1024:
    raise ShapeError(f"{t} needs {smem_bytes(t)} bytes of shared memory")


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def fp8_decode_matmul(xq: jax.Array, w: jax.Array, *, tiling: DecodeTiling | None = None,
                      interpret: bool = False) -> jax.Array:
  """E4M3 xq [R, K] . E4M3 w [N, K]^T -> bf16 [R, N] (split_k 1) or f32 partials [S, R, N]
  (split_k S > 1), f32 accumulation. R <= 64, N % 8 == 0, K % 128 == 0."""
  _check_inputs(xq, w)
  r, k = xq.shape
  n = w.shape[0]
  t = tiling or default_tiling(r, n, k)
  _check_tiling(r, n, k, t)
  rp = padded_rows(r)
  if rp != r:
    xq = jnp.pad(xq, ((0, rp - r), (0, 0)))
  split = t.split_k
  ks = k // split
  out_shape = (jax.ShapeDtypeStruct((split, r, n), jnp.float32) if split > 1 else
               jax.ShapeDtypeStruct((r, n), jnp.bfloat16))
  kernel = functools.partial(_kernel, r=r, rp=rp, n=n, t=t, ks=ks, interpret=bool(interpret))

  def entry(x_ref, w_ref, o_ref):
    smem = (plgpu.SMEM((t.stages, t.tile_n, t.tile_k), jnp.float8_e4m3fn,
                       transforms=_fp8_transforms()),
            plgpu.SMEM((t.stages, WG_M, t.tile_k), jnp.float8_e4m3fn,
                       transforms=_fp8_transforms()))
    bars = (plgpu.Barrier(num_arrivals=2, num_barriers=t.stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=t.stages))
    pl.run_scoped(lambda *scoped: kernel(x_ref, w_ref, o_ref, scoped), smem, bars,
                  collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=out_shape, grid=(-(-n // t.tile_n), split), grid_names=("n", "s"),
      num_threads=2, thread_name="wg", kernel_name="fp8_decode_matmul",
      compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=0),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(xq, w)


def fp8_decode_reference(xq: jax.Array, w: jax.Array, split_k: int = 1) -> jax.Array:
  """Plain-JAX reference: the same outputs (bf16 [R, N] or f32 partials [S, R, N]) from an f32
  'highest' einsum of the exactly widened E4M3 values."""
  r, k = xq.shape
  x32 = xq.astype(jnp.float32).reshape(r, split_k, k // split_k)
  w32 = w.astype(jnp.float32).reshape(w.shape[0], split_k, k // split_k)
  parts = jnp.einsum("rsk,nsk->srn", x32, w32, precision=lax.Precision.HIGHEST)
  return parts[0].astype(jnp.bfloat16) if split_k == 1 else parts


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x: FP8 wgmma)."""
  try:
    d = jax.devices()[0]
    return d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9")
  except RuntimeError:
    return False


def num_sms() -> int:
  """The default device's SM count (132 on an H100 SXM when unknown)."""
  try:
    return int(getattr(jax.devices()[0], "core_count", 0)) or 132
  except RuntimeError:
    return 132
