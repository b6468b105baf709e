"""MLA decode (absorbed form, paged latent cache) on Mosaic GPU (Hopper): TMA + wgmma, FlashMLA-style.

The math and the plain-JAX reference are ``kernels.mla_attention``'s (``reference_mla_paged_attention``):
for the one new token t of sequence b (decode), over the cached slots s < seq_lens[b],

    score[h, s] = scale * (q_latent[t, h] . c[s] + q_rope[t, h] . k_rope[s])
    out[t, h]   = softmax_s(score[h]) @ c                     -> [T, H, kv_lora_rank]

Layout: ``q_latent [T, H, R]``, ``q_rope [T, H, Dr]`` (bf16), ``latent_pages [N, page, R + Dr]`` (bf16,
or float8_e4m3fn with one scalar ``latent_scale``: stored = value / scale), ``page_table [B, P]``,
``seq_lens [B]``, ``query_start [B + 1]``; each sequence has at most one new token this step (the
token ``query_start[b+1] - 1``, at position ``seq_lens[b] - 1``). Tokens no sequence owns come out
zero. R a multiple of 128 (512 for DeepSeek), Dr a multiple of 64 (64), H a multiple of 64 (128).

Tiling (FlashMLA's structure): grid (H / 64, B), head blocks fastest so the two CTAs reading one
sequence's latent pages run together and share them through L2. A CTA owns 64 query rows (64 heads
of the sequence's token) and three warpgroups:
  * producer (40 registers): streams [64, R + Dr] latent tiles (64 keys) by TMA into ``stages``
    shared-memory slots, addressed through the page table (one copy per page when a tile spans
    several pages of 16/32, a slice of a page when pages are longer; page table, lengths and query
    starts are read as scalars from GMEM).
  * consumer 0: S = Q.K^T as one [64, 576] x [576, 64] wgmma chain (Q in shared memory as two
    [64, R/2] halves plus the rope part; the latent and rope parts of a tile are K ranges of one
    slot), online softmax in base 2, P (bf16) and the per-row rescale factor into shared memory
    for consumer 1, then its own half of O += P.V: output columns [0, R/2).
  * consumer 1: waits for P, rescales its accumulator, O += P.V for output columns [R/2, R).
  The [64, 512] f32 accumulator (256 registers per thread in one warpgroup) is split 128 + 128
  registers over the two consumers; V is the latent part of the same shared-memory tile as K (MLA
  reads the cache once for both products). Consumer 1's P.V of step i overlaps consumer 0's
  Q.K^T of step i+1 on the tensor cores. The last tile's rows past the sequence's length are zeroed
  in shared memory before use (the cache may hold anything there; 0 * NaN would poison P.V) and their
  scores masked. The output halves go registers -> shared memory (the Q halves, free by then) -> TMA.
  Options (``MLAMgpuTiles``): one slot, no tail zeroing, consumer 0 issuing Q.K^T(i+1) together
  with its P.V(i) (``overlap``), P.V from registers (``p_regs``).

FP8 (E4M3 latents): FP8 wgmma takes K-major operands only, and P.V contracts over keys, which are
the latent tile's rows (MN-major) -- so each tile is widened once to f16 in shared memory (sm_90
has a pairwise E4M3 -> f16 cvt, none to bf16) and both products run in f16 with an f16 Q and P
(no rounding beyond the cache's own E4M3 and f16's 11-bit Q/P; the scale is folded into the
scores and the output). Shared memory holds Q (72 KB), one f16 tile (72 KB), P and ``stages`` raw
E4M3 tiles (36 KB each): there is no room for a second f16 tile, so tile i+1 is widened only once
both consumers are done with tile i. ``fp8_widen``: "consumers" (default) -- each consumer widens
the columns only it reads (consumer 0 its P.V half and the rope part, consumer 1 its half) right
after its own P.V; "producer" -- the producer widens the whole tile after both released it.
Measured, the widened tile makes Q.K^T 4x slower than on a TMA-loaded tile (benchmarks/attention.md,
window 4). ``fp8_qk="e4m3"`` (experimental, NOT accurate on the H100: see below) avoids that:
Q.K^T runs as E4M3 wgmmas on the raw
TMA-loaded tile (both operands K-major as stored) with Q split into E4M3 hi + lo parts and an f32
scale per row (``split_q_e4m3``: q ~= scale (hi + lo), ~2^-8 relative, about bf16's precision),
and only V is widened, each consumer its own [64, R/2] half (which only it reads), consumer 0
under its Q.K^T. Shared memory: Q hi/lo 72 KB + V halves 64 KB + 2 raw tiles 72 KB + P.
Measured (window 5): 0.294 ms vs the default's 0.358 ms, but rel. err 3.5e-2 against the f32
reference on the GPU (3e-4 in the CPU interpreter): most likely the FP8 wgmma's reduced-precision
accumulation over K = 576 (x2 parts); promoting partial sums to f32 every 128 of K would be next.

Shared memory (bf16, 2 stages): Q 72 KB + 2 x 72 KB tiles + P 8 KB + row factors = 225 KB of 227
(Mosaic's 2 KB reduction scratch is turned off: the WGMMA-layout row reductions stay in a quad).

Target roofline (H100 SXM, B=64, context 4096, 128 heads, R 512 + Dr 64): 73 GFLOP per step
(2 * 576 + 2 * 512 per head and key), 0.093 ms at the measured 783 TFLOP/s bf16 dense GEMM
ceiling; the latent cache is 302 MB bf16 / 151 MB FP8 (0.097 / 0.049 ms at 3.1 TB/s). The step is
compute-bound; the issue's FP8 target (>= 70% of read bandwidth, 0.070 ms) needs > 1 PFLOP/s and is
out of reach with bf16 MMAs (FP8 MMAs would need an E4M3 Q and a transposed copy of the cache).
Shared-memory traffic matters as much: per 64-key tile the wgmmas read Q (72 KB, again every
tile), K (72 KB), V (64 KB) and P, and TMA writes 72 KB -- ~300 KB per tile, ~1.2 us at 128 B/clk.
Measured (H100, benchmarks/attention.md, window 5): bf16 0.166 ms (440 TFLOP/s, 2.84x the Triton
kernel's 0.471 ms in the same run), FP8 0.358 ms (204 TFLOP/s, 2.36x Triton's 0.844 ms). Profiled
per 64-key tile (bf16, consumer 0): TMA wait ~1 us, Q.K^T 1.3, softmax 0.5, P hand-off 0.4, P.V 0.5;
FP8: Q.K^T 5.7 us on the widened tile, widening 2.1.

Scope / not done: one new token per sequence (decode; speculative/chunked steps use the Triton
kernel), H a multiple of 64, no split-K over the context (B * H / 64 CTAs: 128 at B=64, 128 heads;
small batches stay on the Triton kernel, which splits: ``mla_attention.MOSAIC_MIN_CTAS``).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxinfer.errors import ShapeError
from jaxinfer.kv_cache import is_fp8
from kernels.mla_attention import reference_mla_paged_attention   # noqa: F401  (the reference)

_LOG2E = math.log2(math.e)
_ROWS = 64       # query rows (heads) per CTA: one wgmma M tile
_FP8 = jnp.float8_e4m3fn
_PROFILE_EVENTS = 36   # per warpgroup: 3 x 36 x 4 entries x 4 bytes = 1.7 KB of the ~1.9 KB free


@dataclasses.dataclass(frozen=True)
class MLAMgpuTiles:
  """block_k: keys per pipeline step (64: Mosaic's wgmma takes K in multiples of 64 for P.V, and a
  128-key bf16 tile would not fit shared memory twice); stages: latent tiles in flight (bf16: the
  tiles the MMAs read; FP8: the raw E4M3 tiles, widened one at a time into a single f16 tile);
  zero_tail: zero the last tile's rows past the sequence length in shared memory (off: those cache
  slots must hold finite values, since 0 * inf/NaN would poison P.V); overlap (bf16, >= 2
  stages): consumer 0 issues Q.K^T of step i+1 together with its P.V of step i instead of after it
  (FP8's single widened tile cannot hold step i+1 yet: ignored there); fp8_widen: which
  warpgroups widen the E4M3 tiles to f16: "producer" (after both consumers released the f16 tile)
  or "consumers" (each consumer the columns only it reads, right after its own P.V: the two halves
  in parallel and without waiting for the other consumer; 6% faster on the H100);
  widen_layout: the register layout of the E4M3 -> f16 widening ("auto": Mosaic's inference,
  2-byte loads; "WGMMA_8BIT" / "WGMMA_UPCAST_2X": 4-byte loads); p_regs: consumer 0's P.V takes
  P from registers and P is stored for consumer 1 while that MMA runs (instead of before it, and
  read back from shared memory); not with overlap; fp8_mma: the MMA dtype E4M3 tiles are widened
  to ("f16": one cvt per pair; "bf16": through f32, and Q/P in bf16); fp8_qk: "widened" (Q.K^T on
  the widened tile) or "e4m3" (Q.K^T as E4M3 MMAs on the raw tile with a hi + lo split Q; only V
  is widened; implies the consumers widen, f16; experimental: fails the 1e-2 accuracy bound on
  the H100, 3.5e-2)."""
  block_k: int = 64
  stages: int = 2
  zero_tail: bool = True
  overlap: bool = False
  fp8_widen: str = "consumers"
  widen_layout: str = "auto"
  p_regs: bool = False
  fp8_mma: str = "f16"
  fp8_qk: str = "widened"

  def __post_init__(self):
    if self.block_k != 64:
      raise ValueError(f"block_k must be 64, got {self.block_k}")
    if self.fp8_widen not in ("producer", "consumers"):
      raise ValueError(f"fp8_widen must be 'producer' or 'consumers', got {self.fp8_widen!r}")
    if self.fp8_qk not in ("widened", "e4m3"):
      raise ValueError(f"fp8_qk must be 'widened' or 'e4m3', got {self.fp8_qk!r}")
    if self.fp8_mma not in ("f16", "bf16"):
      raise ValueError(f"fp8_mma must be 'f16' or 'bf16', got {self.fp8_mma!r}")
    if self.widen_layout not in ("auto", "WGMMA", "WGMMA_8BIT", "WGMMA_UPCAST_2X"):
      raise ValueError(f"unknown widen_layout {self.widen_layout!r}")
    if self.stages < 1 or (self.overlap and self.stages < 2):
      raise ValueError(f"stages must be >= 1 (>= 2 with overlap), got {self.stages}")


# Measured on the H100 (benchmarks/attention.md, window 3): P.V from registers 13% faster in bf16
# (0.166 vs 0.190 ms, same run); 4-byte E4M3 loads 2.5% faster for the FP8 widening.
BF16_TILES = MLAMgpuTiles(stages=2, p_regs=True)
FP8_TILES = MLAMgpuTiles(stages=2, widen_layout="WGMMA_8BIT")


def default_tiles(fp8: bool) -> MLAMgpuTiles:
  return FP8_TILES if fp8 else BF16_TILES


def _smem(shape, dtype, swizzle: int = 128):
  item = jnp.dtype(dtype).itemsize
  swizzle = min(swizzle, shape[-1] * item)
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, swizzle // item)),
                                              plgpu.SwizzleTransform(swizzle)))


_SMEM_LIMIT = 232448   # H100: 227 KB per block


def smem_bytes(tiles: MLAMgpuTiles, rank: int, rope_dim: int, fp8: bool) -> int:
  """Shared memory the kernel asks for (buffers + ~1 KB of barriers and alignment)."""
  C = rank + rope_dim
  n = _ROWS * C * 2 + _ROWS * tiles.block_k * 2 + 4 * _ROWS + 1024
  if fp8:
    return n + tiles.block_k * C * 2 + tiles.stages * tiles.block_k * C
  return n + tiles.stages * tiles.block_k * C * 2


def _when(cond, enabled: bool):
  """``pl.when(cond)`` if ``enabled`` else a decorator that does not trace the body."""
  return pl.when(cond) if enabled else (lambda f: f)


def _kernel(ql_ref, qr_ref, lat_ref, pt_ref, lens_ref, qs_ref, sc_ref, out_ref, scoped, *,
            block_k: int, stages: int, page_size: int, pages_per_seq: int, rank: int,
            rope_dim: int, sm_scale: float, fp8: bool, zero_tail: bool, overlap: bool,
            coop: bool, widen_layout: str, p_regs: bool, qk8: bool, interpret: bool):
  smem, bars = scoped
  ql_smem, qr_smem, k_smem, raw_smem, p_smem, row_smem = smem
  k_bars, k_consumed, ql_bar, qr_bar, p_ready, p_consumed, raw_bars, raw_free = bars
  half = rank // 2
  C = rank + rope_dim
  wg = lax.axis_index("wg")
  h0 = lax.axis_index("heads") * _ROWS
  b = lax.axis_index("batch")
  q0 = qs_ref[b]
  q_len = qs_ref[b + 1] - q0
  tok = q0 + q_len - 1                     # the sequence's new token
  seq_len = lens_ref[b]
  n = jnp.where(q_len > 0, lax.div(seq_len + block_k - 1, jnp.int32(block_k)), 0)
  sub = min(block_k, page_size)            # keys per TMA copy
  copies = block_k // sub
  slots = 1 if fp8 else stages             # tiles the MMAs read (FP8: one widened f16 tile)
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def tile_copy(i, dst, bar):
    """TMA the latent rows of tile i (one copy per page it spans) into ``dst`` on ``bar``."""
    for c in range(copies):
      key0 = i * block_k + c * sub
      j = jnp.minimum(lax.div(key0, jnp.int32(page_size)), pages_per_seq - 1)
      page = pt_ref[b, j]
      if sub == page_size:
        src = lat_ref.at[page]
      else:
        src = lat_ref.at[page, pl.ds(lax.rem(key0, jnp.int32(page_size)), sub)]
      plgpu.copy_gmem_to_smem(src, dst.at[pl.ds(c * sub, sub)], bar)

  def masked_rows(x, valid, layout=None):
    if layout is None:
      rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    else:
      rows = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=layout)
    return jnp.where(rows < valid, x, jnp.zeros_like(x))

  widen_lay = None if widen_layout == "auto" else getattr(plgpu.Layout, widen_layout)

  def widen_chunks(r, cols, valid=None):
    """E4M3 raw slot r -> the f16 tile, 64 columns at a time; rows >= valid zeroed if given."""
    for c0 in cols:
      src = raw_smem.at[r, :, pl.ds(c0, 64)]
      x = (src[...] if widen_lay is None else plgpu.load(src, layout=widen_lay))
      if k_smem.dtype == jnp.bfloat16:   # no E4M3 -> bf16 cvt on sm_90: through f32
        x = x.astype(jnp.float32)
      x = x.astype(k_smem.dtype)
      k_smem[0, :, pl.ds(c0, 64)] = x if valid is None else masked_rows(x, valid, widen_lay)

  # FP8 with coop: each consumer widens the columns of tile i+1 that only it reads, as soon as it is
  # done with tile i (consumer 0: its P.V half and the rope part, which only its Q.K^T reads;
  # consumer 1: its P.V half), then both arrive on k_bars[0]
  own_cols = (list(range(0, half, 64)) + list(range(rank, C, 64)), list(range(half, rank, 64)))

  def coop_fill(i, w):
    r = lax.rem(i, jnp.int32(stages))
    plgpu.barrier_wait(raw_bars.at[r])
    if zero_tail:   # only the last tile has rows past the length
      pl.when(i < n - 1)(lambda: widen_chunks(r, own_cols[w]))
      pl.when(i == n - 1)(lambda: widen_chunks(r, own_cols[w], seq_len - i * block_k))
    else:
      widen_chunks(r, own_cols[w])
    plgpu.commit_smem()
    plgpu.barrier_arrive(raw_free.at[r])
    plgpu.barrier_arrive(k_bars.at[0])

  def pv(acc, v_ref):
    """acc + P @ v_ref (P from shared memory), by wgmma."""
    if interpret:   # the CPU interpreter has no run_state over accumulators
      def mma(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_ref)
        return acc_ref[...]
      return acc + pl.run_scoped(mma, plgpu.ACC(acc.shape, jnp.float32))

    def in_regs(acc_ref):
      plgpu.wgmma(acc_ref, p_smem, v_ref)
    return pl.run_state(in_regs)(plgpu.ACC.init(acc))

  def store_out(acc, inv, j):
    out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
    # Q's j-th half (qk8: the j-th V half), no longer read by then (see consumer 0)
    o_smem = k_smem.at[j] if qk8 else ql_smem.at[j]
    o_smem[...] = out.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[tok, pl.ds(h0, _ROWS), pl.ds(j * half, half)])
    plgpu.wait_smem_to_gmem(0)

  if qk8:
    _qk8_consumers(locals())

  @_when((wg == 0) & (n > 0), not qk8)
  def _consumer0():
    plgpu.set_max_registers(232, action="increase")
    for j in range(2):   # Q's latent part as two [64, R/2] halves: they later hold the output halves
      plgpu.copy_gmem_to_smem(ql_ref.at[tok, pl.ds(h0, _ROWS), pl.ds(j * half, half)],
                              ql_smem.at[j], ql_bar)
    plgpu.copy_gmem_to_smem(qr_ref.at[tok, pl.ds(h0, _ROWS)], qr_smem, qr_bar)
    c = sm_scale * _LOG2E
    if fp8:
      c = c * sc_ref[0]
    plgpu.barrier_wait(ql_bar)
    plgpu.barrier_wait(qr_bar)

    def zero_rows(tile, valid):   # rows >= valid may hold anything (FP8: the producer does it)
      if zero_tail and not fp8:
        for c0 in range(0, C, 64):
          part = tile.at[:, pl.ds(c0, 64)]
          part[...] = masked_rows(part[...], valid)
        plgpu.commit_smem()

    def issue_qk(s_ref, tile):
      for j in range(2):
        plgpu.wgmma(s_ref, ql_smem.at[j], tile.at[:, pl.ds(j * half, half)].T)
      plgpu.wgmma(s_ref, qr_smem, tile.at[:, pl.ds(rank, rope_dim)].T)

    def qk(tile):
      def run(s_ref):
        issue_qk(s_ref, tile)
        return s_ref[...]
      return pl.run_scoped(run, plgpu.ACC((_ROWS, block_k), jnp.float32))

    def softmax(i, s, m_i, l_i, *, masked: bool):
      """Online softmax of S(i) -> (P(i) in the MMA dtype, rescale factor, new max, new sum)."""
      if masked:
        cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(cols < seq_len - i * block_k, s, -jnp.inf)
      with jax.named_scope("softmax"):
        m_new = jnp.maximum(m_i, s.max(axis=1) * c)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
      return p.astype(p_smem.dtype), alpha, m_new, l_i

    def publish(i, p, alpha):
      """P(i) and the rescale factor to consumer 1 through shared memory."""
      with jax.named_scope("wait_p_free"):
        pl.when(i > 0)(lambda: plgpu.barrier_wait(p_consumed))   # consumer 1 is done with P(i-1)
      with jax.named_scope("publish"):
        p_smem[...] = p
        row_smem[...] = alpha
        plgpu.commit_smem()
        plgpu.barrier_arrive(p_ready)

    def softmax_and_publish(i, s, m_i, l_i, *, masked: bool):
      p, alpha, m_new, l_i = softmax(i, s, m_i, l_i, masked=masked)
      publish(i, p, alpha)
      return alpha, m_new, l_i

    def step(i, carry, *, masked: bool):
      acc, m_i, l_i = carry
      slot = lax.rem(i, jnp.int32(slots))
      with jax.named_scope("wait_k"):
        plgpu.barrier_wait(k_bars.at[slot])
      tile = k_smem.at[slot]
      if masked:
        zero_rows(tile, seq_len - i * block_k)
      with jax.named_scope("qk"):
        s = qk(tile)
      if p_regs and not interpret:   # P.V from registers, P published while it runs
        p, alpha, m_i, l_i = softmax(i, s, m_i, l_i, masked=masked)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        def pv_regs(acc_ref):
          plgpu.wgmma(acc_ref, p, tile.at[:, pl.ds(0, half)])
          publish(i, p, alpha)
        with jax.named_scope("pv"):
          acc = pl.run_state(pv_regs)(plgpu.ACC.init(acc))
      else:
        alpha, m_i, l_i = softmax_and_publish(i, s, m_i, l_i, masked=masked)
        with jax.named_scope("pv"):
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
          acc = pv(acc, tile.at[:, pl.ds(0, half)])
      if coop:
        with jax.named_scope("widen"):
          pl.when(i + 1 < n)(lambda: coop_fill(i + 1, 0))
      else:
        plgpu.barrier_arrive(k_consumed.at[slot])
      return acc, m_i, l_i

    def overlapped_step(i, carry):
      """P.V(i) and Q.K^T(i+1) issued together (the tensor cores are not idle while this warpgroup
      waits for the MMAs); every S is masked (a no-op but the last), the tail rows of the last tile
      are zeroed before its Q.K^T is issued."""
      acc, m_i, l_i, s = carry
      slot, nxt = lax.rem(i, jnp.int32(slots)), lax.rem(i + 1, jnp.int32(slots))
      alpha, m_i, l_i = softmax_and_publish(i, s, m_i, l_i, masked=True)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      plgpu.barrier_wait(k_bars.at[nxt])
      pl.when(i + 1 == n - 1)(lambda: zero_rows(k_smem.at[nxt], seq_len - (i + 1) * block_k))
      if interpret:
        acc = pv(acc, k_smem.at[slot, :, pl.ds(0, half)])
        s = qk(k_smem.at[nxt])
      else:
        def both(refs):
          acc_ref, s_ref = refs
          plgpu.wgmma(acc_ref, p_smem, k_smem.at[slot, :, pl.ds(0, half)])
          issue_qk(s_ref, k_smem.at[nxt])
        zeros = plgpu.layout_cast(jnp.full((_ROWS, block_k), 0, jnp.float32), plgpu.Layout.WGMMA)
        acc, s = pl.run_state(both)((plgpu.ACC.init(acc), plgpu.ACC.init(zeros)))
      plgpu.barrier_arrive(k_consumed.at[slot])
      return acc, m_i, l_i, s

    acc = plgpu.layout_cast(jnp.full((_ROWS, half), 0, jnp.float32), plgpu.Layout.WGMMA)
    m_i = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), row_layout)
    l_i = plgpu.layout_cast(jnp.full((_ROWS,), 0, jnp.float32), row_layout)
    if overlap:
      plgpu.barrier_wait(k_bars.at[0])
      pl.when(n == 1)(lambda: zero_rows(k_smem.at[0], seq_len))
      s0 = qk(k_smem.at[0])
      acc, m_i, l_i, s = lax.fori_loop(0, n - 1, overlapped_step, (acc, m_i, l_i, s0))
      last = n - 1
      slot = lax.rem(last, jnp.int32(slots))
      alpha, m_i, l_i = softmax_and_publish(last, s, m_i, l_i, masked=True)
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      acc = pv(acc, k_smem.at[slot, :, pl.ds(0, half)])
      plgpu.barrier_arrive(k_consumed.at[slot])
    else:
      if coop:
        coop_fill(jnp.int32(0), 0)
      carry = lax.fori_loop(0, n - 1, functools.partial(step, masked=False), (acc, m_i, l_i))
      acc, _, l_i = step(n - 1, carry, masked=True)
    inv = 1.0 / l_i
    if fp8:
      inv = inv * sc_ref[0]
    plgpu.barrier_wait(p_consumed)      # consumer 1 has read the last alpha
    row_smem[...] = inv
    plgpu.commit_smem()
    plgpu.barrier_arrive(p_ready)
    # consumer 0's last Q.K^T completed before P(n-1) went out, and consumer 1 never reads Q
    store_out(acc, inv, 0)

  @_when((wg == 1) & (n > 0), not qk8)
  def _consumer1():
    plgpu.set_max_registers(232, action="increase")

    def step(i, acc):
      slot = lax.rem(i, jnp.int32(slots))
      with jax.named_scope("wait_k"):
        plgpu.barrier_wait(k_bars.at[slot])
      with jax.named_scope("wait_p"):
        plgpu.barrier_wait(p_ready)
      with jax.named_scope("pv"):
        alpha = plgpu.load(row_smem, layout=row_layout)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        acc = pv(acc, k_smem.at[slot, :, pl.ds(half, half)])
      plgpu.barrier_arrive(p_consumed)
      if coop:
        with jax.named_scope("widen"):
          pl.when(i + 1 < n)(lambda: coop_fill(i + 1, 1))
      else:
        plgpu.barrier_arrive(k_consumed.at[slot])
      return acc

    if coop:
      coop_fill(jnp.int32(0), 1)
    acc = plgpu.layout_cast(jnp.full((_ROWS, half), 0, jnp.float32), plgpu.Layout.WGMMA)
    acc = lax.fori_loop(0, n, step, acc)
    plgpu.barrier_wait(p_ready)
    inv = plgpu.load(row_smem, layout=row_layout)
    store_out(acc, inv, 1)

  @pl.when((wg == 2) & (n > 0))
  def _producer():
    if not fp8:
      plgpu.set_max_registers(40, action="decrease")

      @pl.loop(0, n)
      def _(i):
        slot = lax.rem(i, jnp.int32(stages))
        with jax.named_scope("wait_free"):
          pl.when(i >= stages)(lambda: plgpu.barrier_wait(k_consumed.at[slot]))
        tile_copy(i, k_smem.at[slot], k_bars.at[slot])

      @pl.loop(jnp.maximum(n - stages, 0), n)
      def _(i):   # observe the last releases too, so no barrier phase is left unobserved
        plgpu.barrier_wait(k_consumed.at[lax.rem(i, jnp.int32(stages))])
      return

    plgpu.set_max_registers(40, action="decrease")
    if coop or qk8:   # FP8, the consumers widen: this warpgroup only streams the raw tiles
      @pl.loop(0, n)
      def _(i):
        r = lax.rem(i, jnp.int32(stages))
        with jax.named_scope("wait_free"):
          pl.when(i >= stages)(lambda: plgpu.barrier_wait(raw_free.at[r]))
        tile_copy(i, raw_smem.at[r], raw_bars.at[r])

      @pl.loop(jnp.maximum(n - stages, 0), n)
      def _(i):
        plgpu.barrier_wait(raw_free.at[lax.rem(i, jnp.int32(stages))])
      return

    # FP8: raw E4M3 tiles by TMA into ``stages`` slots, each widened here into the one f16 tile
    # (E4M3 -> f16 is exact; the scale is applied to the scores and the output)

    @pl.loop(0, jnp.minimum(n, stages))
    def _(i):
      tile_copy(i, raw_smem.at[i], raw_bars.at[i])

    def widen(r, valid=None):
      widen_chunks(r, range(0, C, 64), valid)

    @pl.loop(0, n)
    def _(i):
      r = lax.rem(i, jnp.int32(stages))
      with jax.named_scope("wait_raw"):
        plgpu.barrier_wait(raw_bars.at[r])
      with jax.named_scope("wait_free"):
        pl.when(i >= 1)(lambda: plgpu.barrier_wait(k_consumed.at[0]))
      with jax.named_scope("widen"):
        if zero_tail:
          pl.when(i < n - 1)(lambda: widen(r))
          pl.when(i == n - 1)(lambda: widen(r, seq_len - i * block_k))
        else:
          widen(r)
        plgpu.commit_smem()          # the f16 tile is visible to wgmma; raw slot r's reads are done
      plgpu.barrier_arrive(k_bars.at[0])

      @pl.when(i + stages < n)
      def _next():
        tile_copy(i + stages, raw_smem.at[r], raw_bars.at[r])

    plgpu.barrier_wait(k_consumed.at[0])   # the last release (no phase left unobserved)


def _qk8_consumers(env) -> None:
  """FP8 with ``fp8_qk="e4m3"``: Q.K^T as E4M3 wgmmas straight on the TMA-loaded raw tile (Q split
  into E4M3 hi + lo parts with a per-row scale), so only V is widened -- each consumer its own
  [64, R/2] half, which only it reads -- and no tile is both written by stores and read by Q.K^T.
  Consumer 0 issues Q.K^T(i) and widens its V half in the MMA's shadow."""
  e = dict(env)
  wg, n, ql_smem, qr_smem, k_smem, raw_smem, p_smem, row_smem = (
      e["wg"], e["n"], e["ql_smem"], e["qr_smem"], e["k_smem"], e["raw_smem"], e["p_smem"],
      e["row_smem"])
  raw_bars, raw_free, ql_bar, qr_bar, p_ready, p_consumed = (
      e["raw_bars"], e["raw_free"], e["ql_bar"], e["qr_bar"], e["p_ready"], e["p_consumed"])
  stages, half, block_k, seq_len, tok, h0 = (e["stages"], e["half"], e["block_k"], e["seq_len"],
                                             e["tok"], e["h0"])
  ql_ref, qr_ref, sc_ref = e["ql_ref"], e["qr_ref"], e["sc_ref"]
  masked_rows, widen_lay, pv, store_out, interpret = (
      e["masked_rows"], e["widen_lay"], e["pv"], e["store_out"], e["interpret"])
  zero_tail, sm_scale, row_layout = e["zero_tail"], e["sm_scale"], e["row_layout"]

  def widen_half(i, r, w):
    """Raw slot r (tile i) -> this consumer's V half (f16), rows past the length zeroed."""
    def run(valid):
      for c0 in range(w * half, (w + 1) * half, 64):
        src = raw_smem.at[r, :, pl.ds(c0, 64)]
        x = (src[...] if widen_lay is None else plgpu.load(src, layout=widen_lay))
        x = x.astype(k_smem.dtype)
        k_smem[w, :, pl.ds(c0 - w * half, 64)] = (x if valid is None else
                                                    masked_rows(x, valid, widen_lay))
    if zero_tail:
      pl.when(i < n - 1)(lambda: run(None))
      pl.when(i == n - 1)(lambda: run(seq_len - i * block_k))
    else:
      run(None)
    plgpu.commit_smem()

  def pv_half(acc, w):
    if interpret:
      return pv(acc, k_smem.at[w])
    def body(acc_ref):
      plgpu.wgmma(acc_ref, p_smem, k_smem.at[w])
    return pl.run_state(body)(plgpu.ACC.init(acc))

  @pl.when((wg == 0) & (n > 0))
  def _consumer0():
    plgpu.set_max_registers(232, action="increase")
    for j in range(2):   # hi, lo
      plgpu.copy_gmem_to_smem(ql_ref.at[j, tok, pl.ds(h0, _ROWS)], ql_smem.at[j], ql_bar)
    plgpu.copy_gmem_to_smem(qr_ref.at[tok, pl.ds(h0, _ROWS)], qr_smem, qr_bar)      # row scales
    c = sm_scale * _LOG2E * sc_ref[0]
    plgpu.barrier_wait(ql_bar)
    plgpu.barrier_wait(qr_bar)
    qsc = plgpu.load(qr_smem, layout=row_layout)

    def step(i, carry):
      acc, m_i, l_i = carry
      r = lax.rem(i, jnp.int32(stages))
      with jax.named_scope("wait_k"):
        plgpu.barrier_wait(raw_bars.at[r])
      raw = raw_smem.at[r]
      with jax.named_scope("qk"):
        if interpret:
          def qk_run(s_ref):
            plgpu.wgmma(s_ref, ql_smem.at[0], raw.T)
            plgpu.wgmma(s_ref, ql_smem.at[1], raw.T)
            return s_ref[...]
          s = pl.run_scoped(qk_run, plgpu.ACC((_ROWS, block_k), jnp.float32))
          widen_half(i, r, 0)
        else:
          def qk_run(s_ref):
            plgpu.wgmma(s_ref, ql_smem.at[0], raw.T)
            plgpu.wgmma(s_ref, ql_smem.at[1], raw.T)
            widen_half(i, r, 0)          # in the MMA's shadow
          zeros = plgpu.layout_cast(jnp.full((_ROWS, block_k), 0, jnp.float32),
                                    plgpu.Layout.WGMMA)
          s = pl.run_state(qk_run)(plgpu.ACC.init(zeros))
      plgpu.barrier_arrive(raw_free.at[r])
      with jax.named_scope("softmax"):
        s = s * lax.broadcast_in_dim(qsc, s.shape, [0])
        cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(cols < seq_len - i * block_k, s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1) * c)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
      with jax.named_scope("publish"):
        pl.when(i > 0)(lambda: plgpu.barrier_wait(p_consumed))
        p_smem[...] = p.astype(p_smem.dtype)
        row_smem[...] = alpha
        plgpu.commit_smem()
        plgpu.barrier_arrive(p_ready)
      with jax.named_scope("pv"):
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        acc = pv_half(acc, 0)
      return acc, m_new, l_i

    acc = plgpu.layout_cast(jnp.full((_ROWS, half), 0, jnp.float32), plgpu.Layout.WGMMA)
    m_i = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), row_layout)
    l_i = plgpu.layout_cast(jnp.full((_ROWS,), 0, jnp.float32), row_layout)
    acc, _, l_i = lax.fori_loop(0, n, step, (acc, m_i, l_i))
    inv = (1.0 / l_i) * sc_ref[0]
    plgpu.barrier_wait(p_consumed)
    row_smem[...] = inv
    plgpu.commit_smem()
    plgpu.barrier_arrive(p_ready)
    store_out(acc, inv, 0)

  @pl.when((wg == 1) & (n > 0))
  def _consumer1():
    plgpu.set_max_registers(232, action="increase")

    def step(i, acc):
      r = lax.rem(i, jnp.int32(stages))
      with jax.named_scope("wait_k"):
        plgpu.barrier_wait(raw_bars.at[r])
      with jax.named_scope("widen"):
        widen_half(i, r, 1)
      plgpu.barrier_arrive(raw_free.at[r])
      with jax.named_scope("wait_p"):
        plgpu.barrier_wait(p_ready)
      with jax.named_scope("pv"):
        alpha = plgpu.load(row_smem, layout=row_layout)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        acc = pv_half(acc, 1)
      plgpu.barrier_arrive(p_consumed)
      return acc

    acc = plgpu.layout_cast(jnp.full((_ROWS, half), 0, jnp.float32), plgpu.Layout.WGMMA)
    acc = lax.fori_loop(0, n, step, acc)
    plgpu.barrier_wait(p_ready)
    inv = plgpu.load(row_smem, layout=row_layout)
    store_out(acc, inv, 1)


def split_q_e4m3(q_latent: jax.Array, q_rope: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[T, H, R] + [T, H, Dr] -> (E4M3 [2, T, H, R + Dr]: hi and lo parts, f32 [T, H] row scales)
  with q ~= scale * (hi + lo): hi = e4m3(q / scale), lo = e4m3(q / scale - hi), scale = max|q| / 448
  per row (~2^-8 relative, about bf16's precision)."""
  q = jnp.concatenate([q_latent, q_rope], axis=-1).astype(jnp.float32)
  amax = jnp.max(jnp.abs(q), axis=-1)
  scale = jnp.where(amax > 0, amax / 448.0, 1.0)
  qn = q / scale[..., None]
  hi = qn.astype(_FP8)
  lo = (qn - hi.astype(jnp.float32)).astype(_FP8)
  return jnp.stack([hi, lo]), scale


def check_shapes(q_latent, q_rope, latent_pages, page_table, seq_lens, query_start,
                 tiles: MLAMgpuTiles) -> None:
  if q_latent.ndim != 3 or q_rope.ndim != 3 or latent_pages.ndim != 3 or page_table.ndim != 2:
    raise ShapeError(f"expected q_latent [T,H,R], q_rope [T,H,Dr], latent_pages [N,page,R+Dr], "
                     f"page_table [B,P]; got {q_latent.shape}, {q_rope.shape}, "
                     f"{latent_pages.shape}, {page_table.shape}")
  T, H, R = q_latent.shape
  Dr = q_rope.shape[-1]
  B = page_table.shape[0]
  if q_rope.shape[:2] != (T, H) or latent_pages.shape[-1] != R + Dr:
    raise ShapeError(f"q_rope {q_rope.shape} / latent_pages {latent_pages.shape} do not match "
                     f"q_latent {q_latent.shape}")
  if seq_lens.shape != (B,) or query_start.shape != (B + 1,):
    raise ShapeError(f"seq_lens {seq_lens.shape} / query_start {query_start.shape} do not match "
                     f"{B} sequences")
  if H % _ROWS or R % 128 or Dr % 64:
    raise ShapeError(f"heads {H} must be a multiple of {_ROWS}, kv_lora_rank {R} of 128, rope_dim "
                     f"{Dr} of 64")
  if q_latent.dtype != jnp.bfloat16 or q_rope.dtype != jnp.bfloat16:
    raise ShapeError(f"q_latent / q_rope must be bf16, got {q_latent.dtype} / {q_rope.dtype}")
  if latent_pages.dtype not in (jnp.bfloat16, jnp.float16, _FP8):
    raise ShapeError(f"latent_pages must be bf16, f16 or float8_e4m3fn, got {latent_pages.dtype}")
  page_size = latent_pages.shape[1]
  if tiles.block_k % page_size and page_size % tiles.block_k:
    raise ShapeError(f"block_k {tiles.block_k} and page size {page_size} must divide one another")
  if page_size % 8 or tiles.block_k % 8:
    raise ShapeError(f"page size {page_size} must be a multiple of 8")


def supported(q_latent, q_rope, latent_pages, page_table, seq_lens, query_start,
              tiles: MLAMgpuTiles | None = None) -> bool:
  """Whether ``mla_decode_mgpu`` takes these shapes and dtypes (and they fit shared memory)."""
  tiles = tiles or default_tiles(is_fp8(latent_pages.dtype))
  try:
    check_shapes(q_latent, q_rope, latent_pages, page_table, seq_lens, query_start, tiles)
  except ShapeError:
    return False
  R, Dr = q_latent.shape[-1], q_rope.shape[-1]
  return smem_bytes(tiles, R, Dr, is_fp8(latent_pages.dtype)) <= 227 * 1024 - 1024


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret", "profile_dir"))
def mla_decode_mgpu(q_latent: jax.Array, q_rope: jax.Array, latent_pages: jax.Array,
                    page_table: jax.Array, seq_lens: jax.Array, query_start: jax.Array, *,
                    scale: float, latent_scale=1.0, tiles: MLAMgpuTiles | None = None,
                    interpret: bool | plgpu.InterpretGPUParams = False,
                    profile_dir: str = "") -> jax.Array:
  """Absorbed MLA decode (one new token per sequence) -> [T, H, kv_lora_rank] bf16; see the module
  docstring. ``interpret`` (True or an InterpretGPUParams) runs the Mosaic GPU interpreter on CPU.
  ``profile_dir`` (GPU): record the kernel's named phases (qk, softmax, publish, pv, waits, widen)
  per warpgroup with Mosaic GPU's profiler and write a Perfetto trace there; the buffer lives in
  the ~2 KB of shared memory left, so only the first few tiles of each warpgroup are kept."""
  fp8 = is_fp8(latent_pages.dtype)
  tiles = tiles or default_tiles(fp8)
  check_shapes(q_latent, q_rope, latent_pages, page_table, seq_lens, query_start, tiles)
  T, H, R = q_latent.shape
  Dr = q_rope.shape[-1]
  N, page_size, C = latent_pages.shape
  B, P = page_table.shape
  stages = tiles.stages
  qk8 = fp8 and tiles.fp8_qk == "e4m3"
  kernel = functools.partial(
      _kernel, block_k=tiles.block_k, stages=stages, page_size=page_size, pages_per_seq=P,
      rank=R, rope_dim=Dr, sm_scale=scale, fp8=fp8, zero_tail=tiles.zero_tail,
      overlap=tiles.overlap and not fp8, coop=fp8 and tiles.fp8_widen == "consumers",
      widen_layout=tiles.widen_layout, p_regs=tiles.p_regs, qk8=qk8,
      interpret=bool(interpret))
  bk = tiles.block_k
  slots = 1 if fp8 else stages
  # FP8: f16 MMAs (E4M3 -> f16 is one cvt per pair; there is no E4M3 -> bf16 cvt on sm_90)
  mma_dtype = (jnp.float16 if fp8 and tiles.fp8_mma == "f16" else
               jnp.float16 if latent_pages.dtype == jnp.float16 else jnp.bfloat16)
  if latent_pages.dtype == jnp.float16:
    q_latent, q_rope = q_latent.astype(mma_dtype), q_rope.astype(mma_dtype)
  if qk8:   # q_latent <- E4M3 [2, T, H, C] hi/lo parts, q_rope <- their f32 [T, H] row scales
    mma_dtype = jnp.float16
    q_latent, q_rope = split_q_e4m3(q_latent, q_rope)
  elif fp8:
    q_latent, q_rope = q_latent.astype(mma_dtype), q_rope.astype(mma_dtype)

  def entry(ql_ref, qr_ref, lat_ref, pt_ref, lens_ref, qs_ref, sc_ref, out_ref):
    if qk8:   # Q hi/lo (E4M3), row scales, the two V halves (f16)
      q_bufs = (_smem((2, _ROWS, C), _FP8, swizzle=64), plgpu.SMEM((_ROWS,), jnp.float32),
                _smem((2, bk, R // 2), mma_dtype))
    else:
      q_bufs = (_smem((2, _ROWS, R // 2), mma_dtype), _smem((_ROWS, Dr), mma_dtype),
                _smem((slots, bk, C), mma_dtype))
    smem = (*q_bufs,
            _smem((stages, bk, C), _FP8, swizzle=64) if fp8 else None,   # 576 = 9 x 64
            _smem((_ROWS, bk), mma_dtype), plgpu.SMEM((_ROWS,), jnp.float32))
    copies = bk // min(bk, page_size)
    coop = fp8 and (tiles.fp8_widen == "consumers" or qk8)
    bars = (plgpu.Barrier(num_arrivals=(2 if coop else 1) if fp8 else copies, num_barriers=slots),
            plgpu.Barrier(num_arrivals=2, num_barriers=slots),
            plgpu.Barrier(num_arrivals=2), plgpu.Barrier(num_arrivals=1),   # Q's parts
            plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=copies, num_barriers=stages) if fp8 else None,
            plgpu.Barrier(num_arrivals=2, num_barriers=stages) if coop else None)
    pl.run_scoped(lambda *scoped: kernel(ql_ref, qr_ref, lat_ref, pt_ref, lens_ref, qs_ref, sc_ref,
                                         out_ref, scoped),
                  smem, bars, collective_axes="wg")

  out = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((T, H, R), mma_dtype),
      grid=(H // _ROWS, B),
      grid_names=("heads", "batch"),
      num_threads=3,
      thread_name="wg",
      # the row reductions (max, sum) of the WGMMA layout stay within a quad of threads and need no
      # shared-memory scratch; its default 2 KB would not fit next to the tiles
      compiler_params=plgpu.CompilerParams(
          approx_math=True, reduction_scratch_bytes=0,
          **(dict(profile_space=_PROFILE_EVENTS, profile_dir=profile_dir, profile_bounds_check=True)
             if profile_dir else {})),
      interpret=(interpret if isinstance(interpret, plgpu.InterpretGPUParams) else
                 plgpu.InterpretGPUParams() if interpret else None),
  )(q_latent, q_rope, latent_pages, page_table.astype(jnp.int32), seq_lens.astype(jnp.int32),
    query_start.astype(jnp.int32), jnp.asarray(latent_scale, jnp.float32).reshape(1))
  owned = jnp.arange(T) < query_start[-1]       # tokens past the last sequence: zeros
  return jnp.where(owned[:, None, None], out, 0).astype(jnp.bfloat16)
