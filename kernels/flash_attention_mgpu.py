"""Causal prefill flash attention on Mosaic GPU (Hopper): warp-specialised TMA + wgmma, bf16 + FP8.

Layout (dense batches only; see "Scope" below):
  q [B, S, H, D], k [B, S, KV, D], v [B, S, KV, D]  ->  out [B, S, H, D]
  causal self-attention (query i attends to keys 0..i), GQA/MQA (H a multiple of KV), D 64 or 128,
  S a multiple of 2 * block_q and of block_kv.

Precision modes, picked from q's dtype:
  * bf16/f16 q, k, v: bf16 wgmma for Q.K^T and P.V, f32 softmax and accumulator, out in q's dtype.
  * FP8 (E4M3 q, k, v with per-head scales q_scale [H], k_scale [KV], v_scale [KV]): FP8 wgmma for
    both products, out in bf16. P is in [0, 1]; it is computed as 2^8 * P (the shift is folded into
    the running max, so it costs nothing) and rounded to E4M3 in registers, which keeps small
    probabilities out of E4M3's subnormal range; the row sum l uses the same scaled f32 P, so the
    factor cancels. Error: every E4M3 operand carries <= 2^-4 relative rounding error; measured
    ||out - ref|| / ||ref|| ~ 2e-2 against float64 attention over the dequantized inputs.

FP8 wgmma takes both operands K-major only. For Q.K^T both Q [rows, D] and K [keys, D] are K-major
as stored. For P.V the contraction runs over keys, so V must be stored keys-fastest: the op
transposes V to vt [B, KV, D, S] in XLA before the kernel (``prepare_v_fp8``; its cost is part of
the op and of every timing). The same pass permutes the keys inside each group of 16: the f32 score
tile leaves wgmma in the accumulator layout (thread t of a quad holds columns 2t, 2t+1, 8+2t, 9+2t
of each 16-column group), while the FP8 A-operand layout wants columns 4t..4t+3 in one 32-bit
register. Instead of shuffling P between threads (FA3 uses byte permutes plus shuffles), the
kernel packs each thread's four E4M3 values as they are and the matching rows of V are permuted to
the same order (the contraction is order-free), so the P -> FP8 operand step is two cvt
instructions and no data movement (``_p_to_fp8_operand``).

Tiling (FA3 structure): grid (H, B, S / (2 * block_q)), heads fastest so the H / KV query heads
sharing a KV head run together and hit L2 on its K/V; the heaviest causal query tiles are
scheduled first. Each CTA runs three warpgroups: a producer (40 registers) that streams
[block_kv, D] K tiles and V tiles by TMA through ``stages`` shared-memory slots, and two consumers
(232 registers), each owning 64 query rows: S = Q.K^T by wgmma into registers, online softmax in
base 2 (the key blocks below the diagonal run unmasked, the diagonal band with a position mask; with
256-key blocks a diagonal block whose second half lies above all of a warpgroup's rows runs at half
width), then O += P.V with P fed from registers. A named barrier alternates the two consumers so one's
softmax overlaps the other's tensor-core work (FA3's ping-pong). Output tiles go registers ->
swizzled smem -> TMA store.

Target roofline (H100 SXM, B=4 S=4096 H=32/8 D=128 causal, 2.2 TFLOP of useful work): measured
dense GEMM ceilings 783 TFLOP/s bf16 and 903 FP8 (benchmarks/attention.md); cuDNN bf16 attention
553 TFLOP/s there; FlashAttention-3 reaches ~75% of bf16 peak and ~1.2 PFLOP/s in FP8 (CUDA). The
issue's targets: bf16 >= cuDNN bf16, FP8 >= 1.4x cuDNN bf16. Measured (H100, 2026-11-23, same run,
benchmarks/attention.md, window 2): bf16 539 TFLOP/s = 1.02x cuDNN's 528; FP8 721 TFLOP/s incl. the
V pre-pass = 1.37x (ping-pong, block_kv 128, 2 stages; the overlap variant is slower, 634). Run 7
(``default_tiles``: FP8 256-key steps, half-width diagonal steps, row sums on the tensor cores):
FP8 778 TFLOP/s incl. the V pre-pass = 1.40x / 1.46x cuDNN timed before / after it (cuDNN itself
moves ~5% between timings); bf16 565 = 1.02x / 1.06x. The persistent grid (``MgpuTiles.persistent``,
FP8's default) was 4.3% faster again in run 8: 785-794 TFLOP/s, 1.43x-1.45x cuDNN. The gap to the MMA roof: per 128-key step the
softmax's 2 x 8192 ex2 take as many cycles on the MUFU as the FP8 MMAs on the tensor cores, and each
warpgroup runs QK -> softmax -> PV serially. So the softmax's row sums run on the tensor cores
(P.ones: one extra N=8 wgmma per step next to P.V, into a fresh accumulator each step).

Scope: dense equal-length sequences (q_len == kv_len == S, no cached prefix). Ragged / chunked
batches stay on the Pallas Triton kernel (kernels/flash_attention.py); ``flash_prefill`` here takes
that kernel's packed layout and only uses Mosaic GPU when the caller promises a dense batch.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxinfer.errors import ShapeError
from jaxinfer.kv_cache import is_fp8

_LOG2E = math.log2(math.e)
# P is computed as 2^_P_SHIFT * softmax numerator before the E4M3 cast (E4M3 max is 448).
_P_SHIFT = 8.0
_FP8 = jnp.float8_e4m3fn
_SCALE_COLS = 32   # per-head scale rows are padded to 128 bytes for their TMA copy
_ONES_COLS = 8     # N of the P.ones wgmma that sums P's rows (MgpuTiles.rowsum_mma)


@dataclasses.dataclass(frozen=True)
class MgpuTiles:
  """block_q: query rows per consumer warpgroup (a CTA holds 2 * block_q); block_kv: keys per
  pipeline step; stages: K/V shared-memory slots in flight; overlap: FA3's intra-warpgroup overlap
  (the softmax of step j runs while P.V of step j-1 is on the tensor cores) on top of the
  two-warpgroup ping-pong; pingpong: alternate the two consumer warpgroups with a named barrier
  (one's softmax while the other's wgmmas run). Off, both run freely: better when the softmax
  takes longer than the MMAs (FP8), since the barrier then serialises the two softmaxes.
  rowsum_mma (FP8 with the serial loop; ignored otherwise): the softmax row sums come from the
  tensor cores, as P.ones [block_kv, 8] issued with P.V, instead of a per-element add and a quad
  shuffle per step on the softmax path; l then sums the E4M3-rounded P that P.V uses. Measured
  3-4% faster on the H100 (benchmarks/attention.md).
  persistent: that many CTAs (e.g. the SM count), each looping over work items (c, c + n, ...,
  heaviest causal tiles first) with the K/V pipeline running on across items, so the next item's
  first loads overlap this one's last steps and epilogue; 0: one CTA per 128-row query tile."""
  block_q: int = 64
  block_kv: int = 128
  stages: int = 2
  overlap: bool = False
  pingpong: bool = True
  rowsum_mma: bool = True
  persistent: int = 0

  def __post_init__(self):
    if self.block_q != 64:
      raise ValueError(f"block_q must be 64 (one wgmma M tile per warpgroup), got {self.block_q}")
    if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
      raise ValueError(f"block_kv must be 64, 128, 192 or 256, got {self.block_kv}")
    if self.stages < 2:
      raise ValueError(f"stages must be >= 2, got {self.stages}")
    if self.persistent < 0 or (self.persistent and self.overlap):
      raise ValueError(f"persistent must be >= 0 and is not implemented with overlap, got "
                       f"persistent={self.persistent}, overlap={self.overlap}")


def _num_sms() -> int:
  return getattr(jax.devices()[0], "core_count", None) or 132   # H100 SXM when not reported


def default_tiles(fp8: bool, seq_len: int) -> MgpuTiles:
  """The fastest measured tiles (H100, benchmarks/attention.md runs 5-9), on a persistent grid of
  one CTA per SM: bf16 128-key steps (256 keys would not fit shared memory at 2 stages; persistent
  was 2% slower than one CTA per tile in run 8's probe but 8% faster in run 9's bench, and the only
  bf16 variant at or above cuDNN in both); FP8 256-key steps where S allows (fewer per-step O
  rescales and barriers; the diagonal step runs at half width when it can), persistent ~4% faster."""
  if fp8 and seq_len % 256 == 0:
    return MgpuTiles(block_kv=256, persistent=_num_sms())
  return MgpuTiles(persistent=_num_sms())


def prepare_v_fp8(v: jax.Array, two_pass: bool = False) -> jax.Array:
  """[B, S, KV, D] -> [B, KV, D, S] (keys fastest, K-major for the P.V wgmma), keys permuted inside
  each group of 16 as position 4t + 2h + l <- 8h + 2t + l (see the module docstring).

  ``two_pass``: permute whole [KV * D] key rows first, then run a plain batched 2-D transpose (two
  passes over V, but each in a shape XLA's transpose emitter handles well) instead of one 7-D
  transpose."""
  B, S, KV, D = v.shape
  if S % 16:
    raise ShapeError(f"sequence length {S} must be a multiple of 16")
  if two_pass:
    rows = v.reshape(B, S // 16, 2, 4, 2, KV * D).transpose(0, 1, 3, 2, 4, 5)
    rows = lax.optimization_barrier(rows.reshape(B, S, KV * D))
    return rows.transpose(0, 2, 1).reshape(B, KV, D, S)
  v = v.reshape(B, S // 16, 2, 4, 2, KV, D)          # key = 16c + 8h + 2t + l
  v = v.transpose(0, 5, 6, 1, 3, 2, 4)               # [B, KV, D, c, t, h, l]
  return v.reshape(B, KV, D, S)


def _p_to_fp8_operand(p: jax.Array, interpret: bool) -> jax.Array:
  """f32 [64, n] probabilities in the wgmma accumulator layout -> E4M3 wgmma A operand whose column
  4t + 2h + l of each 16-group holds p's column 8h + 2t + l (the order prepare_v_fp8 gives V)."""
  rows, n = p.shape
  if interpret:   # the same logical permutation, spelled out for the CPU interpreter
    p8 = p.astype(_FP8).reshape(rows, n // 16, 2, 4, 2)
    return p8.transpose(0, 1, 3, 2, 4).reshape(rows, n)
  from jax.experimental.mosaic import gpu as mgpu   # lazy: Mosaic GPU internals, compiled path only
  from jax._src.lib.mlir import ir
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA,),
      return_type=plgpu.ShapeDtypeStruct((rows, n), _FP8, layout=plgpu.Layout.WGMMA_8BIT))
  def relabel(_, x):
    x8 = x.astype(ir.Float8E4M3FNType.get())     # cvt.rn.satfinite.e4m3x2.f32, pairwise
    regs = x8.registers                          # [1, n/8, 1, 1, 2, 1, 1, 1, 1] of vector<2xf8>
    new_shape = fa.WGMMA_LAYOUT_8BIT.registers_shape((rows, n))   # [1, n/16, 1, 1, 2, ...]
    new = regs.reshape(*regs.shape[:1], n // 16, 2, *regs.shape[2:])
    packed = np.empty(new_shape, dtype=object)
    for idx in np.ndindex(*new_shape):
      lo = new[(idx[0], idx[1], 0, *idx[2:])]
      hi = new[(idx[0], idx[1], 1, *idx[2:])]
      packed[idx] = mgpu_utils.vector_concat([lo, hi])
    return mgpu.FragmentedArray(_registers=packed, _layout=fa.WGMMA_LAYOUT_8BIT, _is_signed=None)

  return relabel(p)


def _pv(acc, p_op, v_op, then, p_scratch, rowsum=None):
  """acc + p_op @ v_op by wgmma with P from registers; ``then()`` runs while the MMA is in flight.
  ``rowsum`` (ones operand [block_kv, 8]): also p_op @ ones (P's row sums, in every column) in the
  same wgmma group, into a fresh accumulator; returns (acc, sums) then. The CPU interpreter has no run_state over accumulators
  nor register A operands, so there P goes through ``p_scratch`` (shared memory, interpret mode
  only) and the products are added afterwards (same arithmetic)."""
  if p_scratch is not None:
    p_scratch[...] = p_op

    def mma(acc_ref, l_ref=None):
      plgpu.wgmma(acc_ref, p_scratch, v_op)
      if l_ref is not None:
        plgpu.wgmma(l_ref, p_scratch, rowsum)
      then()
      return acc_ref[...] if l_ref is None else (acc_ref[...], l_ref[...])
    if rowsum is None:
      return acc + pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32))
    pv, sums = pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32),
                             plgpu.ACC((acc.shape[0], _ONES_COLS), jnp.float32))
    return acc + pv, sums

  if rowsum is None:
    def in_regs(acc_ref):
      plgpu.wgmma(acc_ref, p_op, v_op)
      then()
    return pl.run_state(in_regs)(plgpu.ACC.init(acc))

  def both_in_regs(refs):
    acc_ref, l_ref = refs
    plgpu.wgmma(acc_ref, p_op, v_op)
    plgpu.wgmma(l_ref, p_op, rowsum)
    then()
  # a fresh row-sum accumulator per step: FP8 wgmma adds into its accumulator with only ~14
  # mantissa bits, which, carried over the whole loop, biases a sum of positive terms downwards
  zeros = plgpu.layout_cast(jnp.full((acc.shape[0], _ONES_COLS), 0, jnp.float32),
                            plgpu.Layout.WGMMA)
  return pl.run_state(both_in_regs)((plgpu.ACC.init(acc), plgpu.ACC.init(zeros)))


def _overlapped_loop(q_smem, k_smem, k_bars, v_bars, k_consumed, v_consumed, m_i, *, softmax,
                     operand, slot_of, v_operand, schedule, full_steps, kv_steps, block_q: int,
                     block_kv: int, head_dim: int, p_scratch):
  """FA3's intra-warpgroup overlap. Step j issues S_j = Q.K_j^T and then O += P_{j-1}.V_{j-1}
  (both async), waits for S_j only, runs the softmax of S_j while the P.V product is still on the
  tensor cores, then waits for it; O is rescaled by alpha_{j-1} right after S_j is issued. P_j is
  converted to the operand type only after that wait: converting earlier would write registers the
  in-flight wgmma may still read (P_{j-1} and P_j share registers across the loop), which makes
  ptxas serialise the two. The O accumulator lives in one wgmma accumulator for the whole loop.
  Returns (O, l)."""
  f32 = jnp.float32
  s_shape = (block_q, block_kv)

  def first_qk(s_ref):
    plgpu.wgmma(s_ref, q_smem, k_smem.at[0].T)
    return s_ref[...]
  qk = pl.run_scoped(first_qk, plgpu.ACC(s_shape, f32))
  plgpu.barrier_arrive(k_consumed.at[0])
  p, m_i, _ = softmax(qk, m_i, jnp.int32(0), masked=True)
  l_i = p.sum(axis=1)
  p_op = operand(p)
  alpha = plgpu.layout_cast(jnp.full((block_q,), 1.0, f32), plgpu.Layout.WGMMA.reduce(1))
  rescale = lambda o, a: o * lax.broadcast_in_dim(a, o.shape, [0])

  def issue(o_ref, o_val, slot, prev, p_prev, alpha):
    """S_j and the previous P.V in flight; returns S_j (and O in interpret mode)."""
    if p_scratch is not None:   # CPU interpreter: O as a value, P through shared memory
      def qk_only(s_ref):
        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
        return s_ref[...]
      qk = pl.run_scoped(qk_only, plgpu.ACC(s_shape, f32))
      plgpu.barrier_wait(v_bars.at[prev])
      o_val = _pv(rescale(o_val, alpha), p_prev, v_operand(prev), schedule, p_scratch)
      return qk, o_val

    def both(s_ref):
      plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)
      o_ref[...] = rescale(plgpu.wgmma_accumulator_load(o_ref, wait_n=None), alpha)
      plgpu.barrier_wait(v_bars.at[prev])
      plgpu.wgmma(o_ref, p_prev, v_operand(prev))
      schedule()
      return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)   # S_j done, P.V may still run
    return pl.run_scoped(both, plgpu.ACC(s_shape, f32)), None

  def run(o_ref):
    o_val = (plgpu.layout_cast(jnp.full((block_q, head_dim), 0, f32), plgpu.Layout.WGMMA)
             if p_scratch is not None else None)

    def body(step, carry, *, masked: bool):
      p_prev, m_i, l_i, alpha, o_val = carry
      slot, prev = slot_of(step), slot_of(step - 1)
      plgpu.barrier_wait(k_bars.at[slot])
      qk, o_val = issue(o_ref, o_val, slot, prev, p_prev, alpha)
      plgpu.barrier_arrive(k_consumed.at[slot])
      p, m_i, alpha = softmax(qk, m_i, step, masked)
      l_i = l_i * alpha + p.sum(axis=1)
      plgpu.wgmma_wait(0)
      plgpu.barrier_arrive(v_consumed.at[prev])
      return operand(p), m_i, l_i, alpha, o_val

    split = jnp.maximum(full_steps, 1)
    carry = (p_op, m_i, l_i, alpha, o_val)
    carry = lax.fori_loop(1, split, functools.partial(body, masked=False), carry)
    p_last, _, l_fin, a_last, o_val = lax.fori_loop(split, kv_steps,
                                                    functools.partial(body, masked=True), carry)
    last = slot_of(kv_steps - 1)
    if p_scratch is not None:
      plgpu.barrier_wait(v_bars.at[last])
      o = _pv(rescale(o_val, a_last), p_last, v_operand(last), schedule, p_scratch)
    else:
      o_ref[...] = rescale(plgpu.wgmma_accumulator_load(o_ref, wait_n=None), a_last)
      plgpu.barrier_wait(v_bars.at[last])
      plgpu.wgmma(o_ref, p_last, v_operand(last))
      schedule()
      o = o_ref[...]
    plgpu.barrier_arrive(v_consumed.at[last])
    return o, l_fin

  if p_scratch is not None:
    return run(None)
  return pl.run_scoped(run, plgpu.ACC((block_q, head_dim), f32))


def _kernel(q_ref, k_ref, v_ref, sc_ref, out_ref, scoped, *, fp8: bool, block_q: int,
            block_kv: int, stages: int, head_dim: int, group: int, score_c: float,
            num_q_tiles: int, out_dtype, overlap: bool, pingpong: bool, interpret: bool,
            rowsum_mma: bool, persistent: int, num_heads: int, batch: int, ones_ref=None):
  smem, bars, consumed, schedule_barrier = scoped
  q_smem2, o_smem2, k_smem, v_smem, sc_smem2, p_smem2, ones_smem2 = smem
  k_bars, v_bars, q_bars, sc_bars, ones_bars = bars
  k_consumed, v_consumed = consumed
  wg = lax.axis_index("wg")
  if persistent:   # CTA c runs work items c, c + persistent, ... (heaviest causal tiles first)
    cta = lax.axis_index("cta")
    num_items = num_heads * batch * num_q_tiles
    my_items = lax.div(num_items - cta + persistent - 1, jnp.int32(persistent))
  else:
    my_items = 1

  def tile_coords(i):
    """(head, batch, KV head, first query row, key steps) of this CTA's i-th work item."""
    if persistent:
      item = cta + i * persistent
      hb = lax.rem(item, jnp.int32(num_heads * batch))
      h, b = lax.rem(hb, jnp.int32(num_heads)), lax.div(hb, jnp.int32(num_heads))
      qt = num_q_tiles - 1 - lax.div(item, jnp.int32(num_heads * batch))
    else:
      h, b = lax.axis_index("heads"), lax.axis_index("batch")
      qt = num_q_tiles - 1 - lax.axis_index("q_seq")     # heaviest causal tiles first
    kvh = lax.div(h, jnp.array(group, h.dtype))
    cta_q0 = qt * (2 * block_q)
    cta_kv_steps = pl.cdiv(cta_q0 + 2 * block_q, jnp.array(block_kv, jnp.int32))
    return h, b, kvh, cta_q0, cta_kv_steps

  def schedule():
    if pingpong:
      plgpu.barrier_arrive(schedule_barrier)
      plgpu.barrier_wait(schedule_barrier)

  @pl.when(wg < 2)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    if rowsum_mma:
      plgpu.copy_gmem_to_smem(ones_ref, ones_smem2.at[wg], ones_bars.at[wg])
      plgpu.barrier_wait(ones_bars.at[wg])

    def tile(i, g0):
      h, b, kvh, cta_q0, cta_kv_steps = tile_coords(i)
      q_smem = q_smem2.at[wg]
      o_smem = o_smem2.at[wg] if o_smem2 is not None else q_smem
      q_base = cta_q0 + wg * block_q
      kv_steps = pl.cdiv(q_base + block_q, jnp.array(block_kv, jnp.int32))
      plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, block_q), h], q_smem, q_bars.at[wg])
      if fp8:
        sc_smem = sc_smem2.at[wg]
        plgpu.copy_gmem_to_smem(sc_ref.at[h], sc_smem, sc_bars.at[wg])
        plgpu.barrier_wait(sc_bars.at[wg])
        c = sc_smem[0]          # sm_scale * log2(e) * q_scale[h] * k_scale[kvh]
      else:
        c = score_c
      plgpu.barrier_wait(q_bars.at[wg])

      m_i = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((block_q,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      full_steps = lax.div(q_base, jnp.array(block_kv, jnp.int32))   # blocks fully below the diagonal
      p_scratch = p_smem2.at[wg] if interpret else None

      def slot_of(step):   # steps count on across this CTA's work items (g0 before this one)
        return lax.rem(g0 + step, jnp.array(stages, step.dtype))

      def v_operand(slot, width: int = block_kv):
        if fp8:
          return v_smem.at[slot, :, pl.ds(0, width)].T if width < block_kv else v_smem.at[slot].T
        return v_smem.at[slot, pl.ds(0, width)] if width < block_kv else v_smem.at[slot]

      def softmax(qk, m_i, step, masked: bool):
        """Online-softmax step for one [block_q, block_kv] score tile: returns the f32 probabilities
        P, the new running max and the factor alpha that O and the row sum are rescaled by."""
        if masked:
          rows = plgpu.broadcasted_iota(jnp.int32, qk.shape, 0, layout=plgpu.Layout.WGMMA)
          cols = plgpu.broadcasted_iota(jnp.int32, qk.shape, 1, layout=plgpu.Layout.WGMMA)
          qk = jnp.where(rows + q_base >= cols + step * block_kv, qk, -jnp.inf)
        # base 2; m is kept in log2 units so p = exp2(qk * c - m) is one FMA + EX2 per element
        m_ij = jnp.maximum(m_i, qk.max(axis=1) * c)
        alpha = jnp.exp2(m_i - m_ij)
        m_sub = m_ij - _P_SHIFT if fp8 else m_ij
        p = jnp.exp2(qk * c - lax.broadcast_in_dim(m_sub, qk.shape, [0]))
        return p, m_ij, alpha

      def operand(p):   # f32 probabilities -> the P.V wgmma's A operand (registers)
        return _p_to_fp8_operand(p, interpret) if fp8 else p.astype(q_ref.dtype)

      def drain(step, _, *, scheds: int):
        # this warpgroup is done but its partner still needs steps: observe their loads (keeps every
        # barrier's phase in step across the warpgroups) and release their slots
        slot = slot_of(step)
        plgpu.barrier_wait(k_bars.at[slot])
        plgpu.barrier_wait(v_bars.at[slot])
        plgpu.barrier_arrive(k_consumed.at[slot])
        plgpu.barrier_arrive(v_consumed.at[slot])
        for _ in range(scheds):
          schedule()

      # every warpgroup has >= 1 step (causal, q_len == kv_len)
      plgpu.barrier_wait(k_bars.at[slot_of(jnp.int32(0))])
      pl.when(wg == 1)(schedule)
      if overlap:
        acc, l_i = _overlapped_loop(
            q_smem, k_smem, k_bars, v_bars, k_consumed, v_consumed, m_i,
            softmax=softmax, operand=operand, slot_of=slot_of, v_operand=v_operand, schedule=schedule,
            full_steps=full_steps, kv_steps=kv_steps, block_q=block_q, block_kv=block_kv,
            head_dim=head_dim, p_scratch=p_scratch)
        lax.fori_loop(kv_steps, cta_kv_steps, functools.partial(drain, scheds=1), None)
      else:
        acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

        def kv_loop(step, carry, *, masked: bool, width: int = block_kv):
          """One key step; ``width`` < block_kv: only the first ``width`` keys of the tile (the
          diagonal step when the rest lies above every row of this warpgroup)."""
          acc, m_i, l_i = carry
          slot = slot_of(step)
          k_tile = k_smem.at[slot, pl.ds(0, width)] if width < block_kv else k_smem.at[slot]

          def compute_qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_tile.T)
            schedule()
            return acc_ref[...]
          qk = pl.run_scoped(compute_qk, plgpu.ACC((block_q, width), jnp.float32))
          plgpu.barrier_arrive(k_consumed.at[slot])
          p, m_i, alpha = softmax(qk, m_i, step, masked)
          acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
          if rowsum_mma:   # l_i [block_q, 8] f32: sums of P.ones (every column the same)
            l_i *= lax.broadcast_in_dim(alpha, l_i.shape, [0])
            p_op = operand(p)
          else:
            l_i *= alpha
            p_op = operand(p)
            l_i += p.sum(axis=1)   # this order (from jax's attention_mgpu) schedules best
          acc, l_i, m_i, p_op = lax.optimization_barrier((acc, l_i, m_i, p_op))
          if pingpong:
            plgpu.barrier_arrive(schedule_barrier)     # softmax done
          plgpu.barrier_wait(v_bars.at[slot])
          if pingpong:
            plgpu.barrier_wait(schedule_barrier)       # tensor cores free

          def wait_next_k():
            nxt = step + 1

            @pl.when(nxt < kv_steps)
            def _wait():
              plgpu.barrier_wait(k_bars.at[slot_of(nxt)])
          p_scr = (p_scratch.at[:, pl.ds(0, width)] if p_scratch is not None and width < block_kv
                   else p_scratch)
          if rowsum_mma:
            ones = ones_smem2.at[wg]
            ones = ones.at[:, pl.ds(0, width)] if width < block_kv else ones
            acc, sums = _pv(acc, p_op, v_operand(slot, width), wait_next_k, p_scr, rowsum=ones.T)
            l_i += sums
          else:
            acc = _pv(acc, p_op, v_operand(slot, width), wait_next_k, p_scr)
          plgpu.barrier_arrive(v_consumed.at[slot])
          return acc, m_i, l_i

        if rowsum_mma:
          l_i = plgpu.layout_cast(jnp.full((block_q, _ONES_COLS), 0, jnp.float32),
                                  plgpu.Layout.WGMMA)
        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, full_steps, functools.partial(kv_loop, masked=False), carry)
        if block_kv >= 256:   # a diagonal step whose second half is above all 64 rows: half width
          half = q_base + block_q <= (kv_steps - 1) * block_kv + block_kv // 2
          masked_full_end = jnp.where(half, kv_steps - 1, kv_steps)
          carry = lax.fori_loop(full_steps, masked_full_end,
                                functools.partial(kv_loop, masked=True), carry)
          carry = lax.fori_loop(masked_full_end, kv_steps,
                                functools.partial(kv_loop, masked=True, width=block_kv // 2), carry)
        else:
          carry = lax.fori_loop(full_steps, kv_steps, functools.partial(kv_loop, masked=True), carry)
        acc, m_i, l_i = carry
        lax.fori_loop(kv_steps, cta_kv_steps, functools.partial(drain, scheds=2), None)
        if rowsum_mma:   # every column holds the same row sum
          l_i = l_i.max(axis=1)
      pl.when(wg == 0)(schedule)

      if fp8:
        inv = sc_smem[1] / l_i       # v_scale[kvh] / l
      else:
        inv = 1.0 / l_i
      out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
      o_smem[...] = out.astype(out_dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(q_base, block_q), h])
      plgpu.wait_smem_to_gmem(0)
      return g0 + cta_kv_steps

    lax.fori_loop(0, my_items, tile, jnp.int32(0))

  @pl.when(wg == 2)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")

    def tile(i, g0):
      _, b, kvh, _, cta_kv_steps = tile_coords(i)

      @pl.loop(0, cta_kv_steps)
      def _(step):
        g = g0 + step   # steps count on across work items; slot g was last used by step g - stages
        slot = lax.rem(g, jnp.int32(stages))
        pl.when(g >= stages)(lambda: plgpu.barrier_wait(k_consumed.at[slot]))
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(step * block_kv, block_kv), kvh],
                                k_smem.at[slot], k_bars.at[slot])
        pl.when(g >= stages)(lambda: plgpu.barrier_wait(v_consumed.at[slot]))
        if fp8:
          v_tile = v_ref.at[b, kvh, :, pl.ds(step * block_kv, block_kv)]
        else:
          v_tile = v_ref.at[b, pl.ds(step * block_kv, block_kv), kvh]
        plgpu.copy_gmem_to_smem(v_tile, v_smem.at[slot], v_bars.at[slot])
      return g0 + cta_kv_steps

    total = lax.fori_loop(0, my_items, tile, jnp.int32(0))

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _(g):   # observe the last releases too, so no barrier phase is left unobserved
      slot = lax.rem(g, jnp.int32(stages))
      plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.barrier_wait(v_consumed.at[slot])


def _smem(shape, dtype):
  item = jnp.dtype(dtype).itemsize
  swizzle = min(128, shape[-1] * item)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // item)),
                                              plgpu.SwizzleTransform(swizzle)))


def check_dense_shapes(q, k, v, tiles: MgpuTiles) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ShapeError(f"expected q [B,S,H,D], k/v [B,S,KV,D]; got {q.shape}, {k.shape}, {v.shape}")
  B, S, H, D = q.shape
  if k.shape != v.shape or k.shape[0] != B or k.shape[1] != S or k.shape[3] != D:
    raise ShapeError(f"q {q.shape}, k {k.shape}, v {v.shape} disagree")
  if H % k.shape[2]:
    raise ShapeError(f"query heads {H} not a multiple of KV heads {k.shape[2]}")
  if D not in (64, 128):
    raise ShapeError(f"head dim must be 64 or 128, got {D}")
  if S % (2 * tiles.block_q) or S % tiles.block_kv:
    raise ShapeError(f"sequence length {S} must be a multiple of {2 * tiles.block_q} and "
                     f"{tiles.block_kv}")
  if is_fp8(q.dtype) != is_fp8(k.dtype) or is_fp8(q.dtype) != is_fp8(v.dtype):
    raise ShapeError(f"q/k/v must be all FP8 or all bf16/f16, got {q.dtype}/{k.dtype}/{v.dtype}")
  if not is_fp8(q.dtype) and not (q.dtype == k.dtype == v.dtype and
                                   q.dtype in (jnp.bfloat16, jnp.float16)):
    raise ShapeError(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype}: expected one of bf16/f16")
  if is_fp8(q.dtype) and not (q.dtype == k.dtype == v.dtype == _FP8):
    raise ShapeError(f"FP8 attention takes float8_e4m3fn q/k/v, got {q.dtype}/{k.dtype}/{v.dtype}")


def _per_head(scale, n: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (n,))


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret", "v_prepared"))
def flash_prefill_dense(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, q_scale=1.0,
                        k_scale=1.0, v_scale=1.0, tiles: MgpuTiles | None = None,
                        interpret: bool | plgpu.InterpretGPUParams = False,
                        v_prepared: bool = False) -> jax.Array:
  """Causal attention over dense equal-length sequences; see the module docstring.

  q [B, S, H, D], k/v [B, S, KV, D]: bf16/f16 (out in q's dtype) or float8_e4m3fn with per-head
  scales (q_scale [H] or scalar, k_scale/v_scale [KV] or scalar; out bf16). ``interpret`` (True or
  an InterpretGPUParams) runs the kernel in the Mosaic GPU interpreter on CPU. ``v_prepared``: FP8
  v already went through ``prepare_v_fp8`` ([B, KV, D, S], e.g. when a cache stores it so).
  ``tiles`` None: ``default_tiles``.
  """
  if tiles is None:
    tiles = default_tiles(is_fp8(q.dtype), q.shape[1] if q.ndim == 4 else 0)
  if v_prepared:
    if not is_fp8(v.dtype) or v.ndim != 4:
      raise ShapeError(f"v_prepared takes FP8 v [B, KV, D, S], got {v.dtype} {v.shape}")
    v_shape = (v.shape[0], v.shape[3], v.shape[1], v.shape[2])
  else:
    v_shape = v.shape
  check_dense_shapes(q, k, jax.ShapeDtypeStruct(v_shape, v.dtype), tiles)
  B, S, H, D = q.shape
  KV = k.shape[2]
  fp8 = is_fp8(q.dtype)
  out_dtype = jnp.bfloat16 if fp8 else q.dtype
  block_q, block_kv, stages = tiles.block_q, tiles.block_kv, tiles.stages
  stages = min(stages, S // block_kv)
  if fp8:
    if block_kv % 128:
      raise ShapeError(f"FP8 needs block_kv a multiple of 128 (one swizzle row), got {block_kv}")
    v = v if v_prepared else prepare_v_fp8(v)
    c = (scale * _LOG2E) * _per_head(q_scale, H) * jnp.repeat(_per_head(k_scale, KV), H // KV)
    vs = jnp.repeat(_per_head(v_scale, KV), H // KV)
    sc = jnp.zeros((H, _SCALE_COLS), jnp.float32).at[:, 0].set(c).at[:, 1].set(vs)
  else:
    sc = jnp.zeros((H, _SCALE_COLS), jnp.float32)   # unused
  num_q_tiles = S // (2 * block_q)
  rowsum_mma = tiles.rowsum_mma and fp8 and not tiles.overlap
  persistent = min(tiles.persistent, H * B * num_q_tiles)
  if persistent:
    grid, grid_names = (persistent,), ("cta",)
  else:
    grid, grid_names = (H, B, num_q_tiles), ("heads", "batch", "q_seq")
  kernel = functools.partial(
      _kernel, fp8=fp8, block_q=block_q, block_kv=block_kv, stages=stages, head_dim=D,
      group=H // KV, score_c=scale * _LOG2E, num_q_tiles=num_q_tiles, out_dtype=out_dtype,
      overlap=tiles.overlap, pingpong=tiles.pingpong, interpret=bool(interpret),
      rowsum_mma=rowsum_mma, persistent=persistent, num_heads=H, batch=B)
  inputs = (q, k, v, sc)
  if rowsum_mma:   # [8, block_kv]: the K-major B operand of P.ones, like V's tiles
    inputs += (jnp.ones((_ONES_COLS, block_kv), _FP8),)

  def entry(q_ref, k_ref, v_ref, sc_ref, *refs):
    *ones_ref, out_ref = refs
    q_buf = _smem((2, block_q, D), q.dtype)
    o_buf = _smem((2, block_q, D), out_dtype) if fp8 else None   # bf16 reuses the q buffer
    k_buf = _smem((stages, block_kv, D), k.dtype)
    v_buf = _smem((stages, D, block_kv), v.dtype) if fp8 else _smem((stages, block_kv, D), v.dtype)
    sc_buf = plgpu.SMEM((2, _SCALE_COLS), jnp.float32) if fp8 else None
    p_buf = _smem((2, block_q, block_kv), _FP8 if fp8 else q.dtype) if interpret else None
    ones_buf = _smem((2, _ONES_COLS, block_kv), _FP8) if rowsum_mma else None
    pl.run_scoped(
        lambda *scoped: kernel(q_ref, k_ref, v_ref, sc_ref, out_ref, scoped, ones_ref=(
            ones_ref[0] if ones_ref else None)),
        (q_buf, o_buf, k_buf, v_buf, sc_buf, p_buf, ones_buf),
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
         plgpu.Barrier(num_barriers=2) if rowsum_mma else None),
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=2),
        collective_axes="wg",
    )

  return plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((B, S, H, D), out_dtype),
      grid=grid,
      grid_names=grid_names,
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams) else
                 plgpu.InterpretGPUParams() if interpret else None),
  )(*inputs)


def reference_dense(q, k, v, *, scale: float, q_scale=1.0, k_scale=1.0, v_scale=1.0,
                    dtype=jnp.float32) -> jax.Array:
  """Plain-JAX causal attention of ``flash_prefill_dense`` (inputs dequantized with their scales),
  computed in ``dtype`` (float64 under jax_enable_x64 for the tests)."""
  B, S, H, D = q.shape
  KV = k.shape[2]
  qf = q.astype(dtype) * _per_head(q_scale, H).astype(dtype)[:, None]
  kf = k.astype(dtype) * _per_head(k_scale, KV).astype(dtype)[:, None]
  vf = v.astype(dtype) * _per_head(v_scale, KV).astype(dtype)[:, None]
  kf = jnp.repeat(kf, H // KV, axis=2)
  vf = jnp.repeat(vf, H // KV, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
  s = jnp.where(jnp.tril(jnp.ones((S, S), bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vf)


def dense_supported(q, k, v, tiles: MgpuTiles | None = None) -> bool:
  """Whether the packed-layout inputs of ``flash_prefill`` have shapes the dense kernel takes
  (T == B * S and the dense kernel's own constraints); the run-time layout is checked separately."""
  T, H, D = q.shape
  B, S, KV, _ = k.shape
  if tiles is None:
    tiles = default_tiles(is_fp8(q.dtype), S)
  try:
    check_dense_shapes(jax.ShapeDtypeStruct((B, S, H, D), q.dtype), k, v, tiles)
  except ShapeError:
    return False
  return T == B * S and (not is_fp8(q.dtype) or tiles.block_kv % 128 == 0)


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret"))
def flash_prefill(q: jax.Array, k: jax.Array, v: jax.Array, query_start: jax.Array,
                  kv_lens: jax.Array, *, scale: float, q_scale=1.0, k_scale=1.0, v_scale=1.0,
                  tiles: MgpuTiles | None = None,
                  interpret: bool = False) -> jax.Array:
  """``kernels.flash_attention.flash_prefill``'s packed layout (q [T, H, D], k/v [B, S, KV, D]):
  the Mosaic GPU kernel when the batch is dense -- every sequence is a whole prompt of exactly S
  tokens (T == B * S, query_start == [0, S, 2S, ...], kv_lens == S), decided at run time by a
  lax.cond -- and the Pallas Triton kernel otherwise (ragged lengths, chunked prefill over a cached
  prefix, shapes the dense kernel does not take)."""
  from kernels import flash_attention   # the portable (Triton) path

  def triton():
    return flash_attention.flash_prefill(q, k, v, query_start, kv_lens, scale=scale,
                                         q_scale=q_scale, k_scale=k_scale, v_scale=v_scale,
                                         interpret=interpret)
  T, H, D = q.shape
  B, S, _, _ = k.shape
  if tiles is None:
    tiles = default_tiles(is_fp8(q.dtype), S)
  if not dense_supported(q, k, v, tiles):
    return triton()

  def dense():
    out = flash_prefill_dense(q.reshape(B, S, H, D), k, v, scale=scale, q_scale=q_scale,
                              k_scale=k_scale, v_scale=v_scale, tiles=tiles, interpret=interpret)
    return out.reshape(T, H, D)
  is_dense = (jnp.all(query_start == jnp.arange(B + 1, dtype=query_start.dtype) * S) &
              jnp.all(kv_lens == S))
  return lax.cond(is_dense, dense, triton)
