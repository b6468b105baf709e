"""Paged decode attention (XQA-like) in Pallas Triton: GQA-grouped, split-K, bf16 or FP8 KV.

Layout (``jaxinfer.kv_cache`` / ``jaxinfer.attention``):
  q [T, H, D]                       flattened tokens; sequence b owns rows query_start[b] ..
                                    query_start[b+1]-1 (1 token for decode, a few for speculative use)
  k_pages, v_pages [N, page, KV, D] bf16, or E4M3 with scalar k_scale / v_scale (stored = value/scale)
  page_table [B, P], seq_lens [B]   token s of b is slot page_table[b, s // page] * page + s % page
  out [T, H, D]                     in q's dtype; query row i of b sits at position
                                    seq_lens[b] - q_len_b + i and attends keys <= its position.

Tiling: grid (KV, splits, B). One program owns one (sequence, KV head, split): its query rows are the
G = H/KV heads of that KV head times the sequence's query tokens (padded to >= 16 rows for the tensor
cores), so every K/V page is read from HBM exactly once for all query heads sharing it. The program
streams ``block_k``-token K/V tiles with an online softmax. When the page size is a multiple of
block_k a tile lies inside one page: one scalar page-table read and base-plus-constant addresses
(``key_tile``); smaller pages are gathered slot by slot. FP8 tiles are upcast to f16 in registers
(one cvt per pair on Hopper), their scales folded into the query and output scaling. Query rows
are loaded and written as one block when they are one token's consecutive heads, else gathered.
With one split the program normalises and writes its rows straight into out; with few sequences
the key range is split across ``splits`` programs (split-K, ``programs_per_sm`` programs per SM)
writing (acc, max, sum) partials, merged into out by ``DecodeTiles.combine``: "rows" (the split-K
default) a second kernel with one program per query row (and column chunk) that reads all splits'
partials of its row in one load; "serial" a program per (sequence, KV head) looping over the splits
(MLA's combine, ``finish_splits``); "fused" no second kernel: the last split of a (sequence, KV
head) to finish, found with an atomic arrival counter, merges (``merge_if_last``). Rows of no query
(padding) stay zero (out is aliased to zeros). ``key_tile``, ``split_range``,
``row_map``/``load_rows``/``store_rows`` and the serial split-K epilogue are shared with the MLA
decode kernel (kernels/mla_attention.py).

Target roofline: decode reads each cached K/V byte once, so time >= KV bytes / ~3.0 TB/s measured
read bandwidth (H100). B=64, 4096 context, 8 KV heads, D=128: 1.07 GB bf16 -> 0.35 ms; FP8 0.17 ms.
Measured (H100, 2026-11-23, benchmarks/attention.md runs 5-6): bf16 ~0.40 ms (~88% of the read
ceiling); FP8 0.214 ms (81%, 0.536x of bf16 in the same run; target 0.55x) with 16-key tiles, one warp
and 8 stages (FP8_TILES). Triton dequantises E4M3 in the MMA-operand layout (byte loads from shared
memory, a cvt per pair, ~1.6x the instructions per key of bf16), which leaves the loop latency-bound;
more tiles in flight per SM (1 warp, deep pipeline) hides it better than 4 warps x 4 stages (0.27 ms).
Tried and dropped: 64/128-key tiles, 8 warps, a transposed form with keys as the MMA M dimension
(E4M3 scores cost 10x the error), and an integer bit-trick upcast (``bits_upcast``, 20-35% slower:
still lowered in the operand layout).

Short contexts, many sequences (the c=64 serving decode: B=64, 129..192 keys, page 16, FP8; H100,
2026-11-24, benchmarks/attention.md "dattn"): 21.3 MB of K/V (7.1 us at 3.0 TB/s) take 13.0 us with
FP8_SHORT_TILES (mask_tail off; 13.5 with FP8_TILES' masked tail loop), 11.2 us even with K/V in L2:
the 512 one-warp programs (one per scheduler) are bound by a warp's instruction latency, 543
instructions per 16-key tile at 2.8 cycles each, ~140 of them gathering V's MMA operand byte by
byte from shared memory. Split-K, 2-4 warps per program, other tile sizes and stage counts, a
register-resident page table, peeled tails and lazy rescaling all measured the same or slower (more
warps per SM raise each warp's cycles per instruction as much). ~8 us needs V dequantized in one
vectorised pass and read transposed (ldmatrix.trans), which Pallas Triton does not express.

Split-K, B=1, 32768 context, 32/8 heads, page 64 (134 MB bf16 KV: 43.9 us at the 3.06 TB/s read
ceiling -- a 1 GiB sum -- of the same run; H100, benchmarks/attention.md session 5, device time from
a profiler trace): SPLIT_K_TILES (64-key tiles, 4 warps, 3 stages, 33 splits) 48.2 us split kernel
+ 2.3 us per-row combine (32 columns per program) = 50.0 us, 88% of the read ceiling (51.1 us, 86%,
in window 4's confirmation run); with the serial combine (11.5 us) it was 59.7 us (73%); the fused
merge made the split kernel 7.7 us longer
(its last program per KV head merges the 33 splits alone at the end of the kernel while the rest of
the GPU idles). Remaining gap (6 us): the split kernel runs at 91% of the ceiling (ncu: 2.6 TB/s
DRAM, 2 programs x 4 warps per SM, 128 registers, 39 KB shared memory): each program streams only
16 tiles, so its pipeline fill and final store are exposed; then the combine (2.3 us: latency of a
small kernel on L2-resident partials). FP8 (SPLIT_K_FP8_TILES: 32-key tiles, 2 warps, 6 stages,
4 programs per SM = 64 splits): ~31.7 us vs 50.1 us with the session-4 tiles and serial combine.
Page 16 (the engine's default), B=1, 32k: the B=64 tiles (slot gather) with the per-row combine,
bf16 58.4 us vs 67.8 with the serial one. B=64, 4096 context (one split, unchanged): bf16 342.8 us
device (3.13 TB/s, above the sum's ceiling), FP8 182.4 us (0.53x).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError
from jaxinfer.kv_cache import is_fp8
from kernels.flash_attention import _LOG2E, _MASK, online_softmax  # noqa: F401 (re-exported)

_MIN_ROWS = 16  # smallest M of a tensor-core dot in Triton
_NUM_SMS = 132  # H100 SXM


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
  # Best bf16 variant on the H100 (benchmarks/attention.md): 32-token tiles, 4 warps, 4 stages.
  block_k: int = 32
  num_warps: int = 4
  num_stages: int = 4
  splits: int | None = None   # None: enough programs to fill the SMs programs_per_sm times
  page_blocks: bool = True    # tiles inside one page read as blocks (False: slot gather, to compare)
  tile_upcast: bool = False   # FP8: see ``upcast``
  tile_upcast_v: bool = False # FP8: tile_upcast for V only (its MMA operand is the byte-gathered one)
  lazy_rescale: bool = False  # the accumulator is rescaled only in tiles where some row's max grew
                              # (a warp-uniform branch; bit-identical: the factor is exactly 1 else)
  bits_upcast: bool = False   # FP8: E4M3 -> f16 by integer bit moves (``e4m3_bits_to_f16``)
  mask_tail: bool = True      # only tiles crossing seq_len / the causal edge are masked
  peel_tail: bool = False     # mask_tail: the masked tail tiles as straight-line code, loaded
                              # before the unmasked loop (not a second pipelined loop)
  zero_pad: bool = False      # one query per sequence, T <= B, one split or the fused combine:
                              # program b zeroes row b if a padding token (no zeros buffer in)
  pt_regs: int = 0            # page tables of <= this many pages per sequence are loaded into
                              # registers once per program (no page-table load per tile)
  # split-K combine of the partials: "rows" (one program per query row and column chunk, all
  # splits in one load: ``combine_rows``; 2.3 us vs 11.5 at 33 splits on the H100), "serial" (one
  # program per (sequence, KV head) looping over the splits), "fused" (no second kernel: the last
  # split merges, ``merge_if_last``; measured slower)
  combine: str = "rows"
  programs_per_sm: int = 2    # splits=None: enough splits for this many programs per SM


# Fastest measured on the H100 (benchmarks/attention.md), B=64, 4096 context, 32/8 heads, D=128.
# FP8's loop is latency-bound (E4M3 converted in the MMA-operand layout): one warp per program
# and 5 stages keep more independent tiles in flight per SM than 4 warps x 4 stages.
BF16_TILES = DecodeTiles()
FP8_TILES = DecodeTiles(16, num_warps=1, num_stages=8)
# Split-K (few sequences, long contexts): fastest in the B=1, 32768-context, page-64 sweeps on the
# H100 (benchmarks/attention.md, session 5; device time from a profiler trace): bf16 64-key tiles x
# 4 warps x 3 stages, 2 programs per SM (33 splits), the per-row combine: 48.2 us split kernel +
# 2.3 us combine = 50.0 us, 88% of the read ceiling (the serial combine took 11.5 us; the fused one
# added 7.7 us to the split kernel). FP8: 32-key tiles, 2 warps, 6 stages, 4 programs per SM (64
# splits): 27.8 us split kernel (1 warp x 8 stages 29.0, 64 x 4 x 3 at 33 splits 37.6); more
# independent tiles in flight per SM hide the E4M3 upcast, as at B=64.
SPLIT_K_TILES = DecodeTiles(64, num_warps=4, num_stages=3, combine="rows")
SPLIT_K_FP8_TILES = DecodeTiles(32, num_warps=2, num_stages=6, combine="rows", programs_per_sm=4)
# FP8, short contexts, enough sequences x KV heads for every SM (the c=64 serving decode: B=64,
# 129..192 keys, page 16; H100, 2026-11-24, benchmarks/attention.md "dattn"): one split, every tile
# masked in one pipelined loop (mask_tail=False) instead of an unmasked loop plus a masked tail loop,
# whose second pipeline fill and duplicated code cost more than the masks: 13.0 vs 13.5 us at c=64,
# 42.9 vs 46.7 at c=256; at c=32 (256 sequence-heads, which FP8_TILES splits in 2 + a per-row combine)
# 11.1 vs 12.4 us. JAXINFER_DECODE_SHORT_TILES=0 keeps FP8_TILES.
FP8_SHORT_TILES = dataclasses.replace(FP8_TILES, mask_tail=False, splits=1)
SHORT_CONTEXT = 1024   # page-table capacity (pages_per_seq * page_size) up to which it applies
SHORT_TILES = os.environ.get("JAXINFER_DECODE_SHORT_TILES", "1") not in ("", "0")
# FP8 split-K over pages smaller than SPLIT_K_FP8_TILES' 32-key tiles (page 16, the engine's
# default) for at most SMALL_PAGE_MAX_PAIRS sequences x KV heads: 16-key tiles, 2 warps, 8 stages, 4
# programs per SM (H100, 2026-11-24, B=1, page 16, device time per call incl. the per-row combine,
# vs FP8_TILES: 1k 6.7 vs 7.2 us, 4k 9.7 vs 10.8, 8k 12.8 vs 15.4, 32k 32.4 vs 43.0). At B=8 (64
# sequence-heads, 2k keys) it measured 22.0 vs 21.6, at B=32 short contexts 13.3 vs 12.4: not there.
SPLIT_K_FP8_SMALL_PAGE_TILES = DecodeTiles(16, num_warps=2, num_stages=8, programs_per_sm=4)
SMALL_PAGE_MAX_PAIRS = 32


def default_tiles(fp8: bool, num_seqs: int, kv_heads: int, context: int,
                  page_size: int) -> DecodeTiles:
  """The measured best tiles: SPLIT_K_TILES / SPLIT_K_FP8_TILES when the key range will be split
  (fewer sequences x KV heads than two programs per SM) and a tile lies inside one page (FP8 over
  smaller pages, at most SMALL_PAGE_MAX_PAIRS sequence-heads: SPLIT_K_FP8_SMALL_PAGE_TILES), else
  BF16_TILES / FP8_TILES (FP8_SHORT_TILES, one split, over at most SHORT_CONTEXT keys when there
  are at least as many sequence-heads as SMs)."""
  split_tiles = SPLIT_K_FP8_TILES if fp8 else SPLIT_K_TILES
  split = default_splits(num_seqs, kv_heads, pl.cdiv(context, split_tiles.block_k)) > 1
  if split and page_size % split_tiles.block_k == 0:
    return split_tiles
  small = SPLIT_K_FP8_SMALL_PAGE_TILES
  if (fp8 and page_size % small.block_k == 0 and num_seqs * kv_heads <= SMALL_PAGE_MAX_PAIRS
      and default_splits(num_seqs, kv_heads, pl.cdiv(context, small.block_k)) > 1):
    return small
  if fp8 and SHORT_TILES and context <= SHORT_CONTEXT and num_seqs * kv_heads >= _NUM_SMS:
    return FP8_SHORT_TILES
  return FP8_TILES if fp8 else BF16_TILES


class RowMap(NamedTuple):
  """Row r of a program's tile is query token r // group of sequence b, head blk*group + r % group."""
  q_start: jax.Array
  q_len: jax.Array
  tok: jax.Array      # [rows]
  head: jax.Array     # [rows]
  row_ok: jax.Array   # [rows] a real query row
  first_head: jax.Array
  contiguous: bool    # one token and rows == group: the tile is heads first_head.. of one token


def row_map(qs_ref, b, blk, *, group: int, max_q: int, rows: int) -> RowMap:
  q_start = qs_ref[b]
  q_len = qs_ref[b + 1] - q_start
  r = lax.broadcasted_iota(jnp.int32, (rows,), 0)
  tok = lax.div(r, group)
  head = blk * group + lax.rem(r, group)
  row_ok = (r < max_q * group) & (tok < q_len)
  return RowMap(q_start, q_len, tok, head, row_ok, blk * group, max_q == 1 and rows == group)


def _row_index(rm: RowMap, rows: int, start: int, width: int):
  """Index of the tile's rows x columns start..start+width of a [T, H, width'] array: a block
  (base-plus-constant addresses) when contiguous, else an all-array gather (interpret mode needs
  arrays not to be mixed with slices)."""
  if rm.contiguous:
    return rm.q_start, pl.ds(rm.first_head, rows), pl.ds(start, width)
  d = start + lax.broadcasted_iota(jnp.int32, (1, width), 1)
  return (rm.q_start + rm.tok)[:, None], rm.head[:, None], d


def load_rows(ref, rm: RowMap, start: int, width: int) -> jax.Array:
  """The program's query rows of ref [T, H, *] (columns start..start+width), zeros for padding."""
  idx = _row_index(rm, rm.tok.shape[0], start, width)
  return plgpu.load(ref.at[idx], mask=rm.row_ok[:, None], other=0.0)


def store_rows(o_ref, rm: RowMap, val):
  """Writes a [rows, D] tile into its rows of o [T, H, D]."""
  idx = _row_index(rm, val.shape[0], 0, o_ref.shape[-1])
  plgpu.store(o_ref.at[idx], val.astype(o_ref.dtype), mask=rm.row_ok[:, None])


def split_range(seq_len, block_k: int, split, splits: int):
  """Key tiles [first, last) that program ``split`` of ``splits`` streams for ``seq_len`` keys."""
  num_blocks = lax.div(seq_len + block_k - 1, block_k)
  per_split = lax.div(num_blocks + splits - 1, splits)
  first = split * per_split
  return first, jnp.minimum(first + per_split, num_blocks)


def load_page_row(pt_ref, b, pages_per_seq: int) -> jax.Array:
  """Sequence b's page-table row [pages_per_seq, a power of two] as a register vector, for
  ``key_tile(pt_row=...)``."""
  return pt_ref[b, pl.ds(0, pages_per_seq)]


def key_tile(pt_ref, b, kb, *, block_k: int, page_size: int, pages_per_seq: int,
             page_blocks: bool = True, pt_row=None):
  """Keys ``kb*block_k ..`` of sequence b -> (keys [block_k], rows of the flat [N*page, ...] cache).

  A tile inside one page (page_size a multiple of block_k) is a contiguous ``pl.ds`` of rows: one
  scalar page-table read and base-plus-constant addresses. Otherwise rows is a [block_k, 1] gather
  of slots through the page table. Index the cache with ``tile_cols(rows, ...)`` for the columns.
  ``pt_row`` (``load_page_row``): the page comes out of the registers (a masked sum over the row)
  instead of a dependent global load per tile.
  """
  keys = kb * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
  if page_blocks and page_size % block_k == 0:
    start = kb * block_k
    idx = jnp.minimum(lax.div(start, page_size), pages_per_seq - 1)
    if pt_row is not None:
      page = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, pt_row.shape, 0) == idx, pt_row, 0))
    else:
      page = pt_ref[b, idx]
    row0 = pl.multiple_of(page * page_size + lax.rem(start, page_size), block_k)
    return keys, pl.ds(row0, block_k)
  page = plgpu.load(pt_ref.at[b, lax.div(keys, page_size)],
                    mask=keys < pages_per_seq * page_size, other=0)
  return keys, (page * page_size + lax.rem(keys, page_size))[:, None]


def upcast(x: jax.Array, dtype, tile: bool) -> jax.Array:
  """E4M3 tile -> ``dtype`` for the MMAs. tile=False lets Triton convert in the MMA-operand layout
  (byte-wise shared-memory loads, then a cvt per pair). tile=True converts through a transpose pair,
  which Triton does not push into the operand layout: the tile is converted row-blocked with vector
  loads, stored to shared memory as f16 and read back by ldmatrix (a pair around an operand that
  the MMA already uses transposed folds away, so that operand is unaffected)."""
  return x.T.astype(dtype).T if tile else x.astype(dtype)


_E4M3_TO_F16_BITS = 256.0   # e4m3_bits_to_f16 returns value * 2^-8; scales carry the 2^8


def e4m3_bits_to_f16(x: jax.Array) -> jax.Array:
  """uint8 E4M3 bit patterns -> float16 holding value * 2^-8, exactly, subnormals included: sign
  to bit 15, exponent and mantissa shifted into f16's (exponent bias 15 vs 7, so the result is the
  value times 2^-8). The E4M3 NaN (0x7f) comes out finite; caches never hold it."""
  x = x.astype(jnp.uint16)
  bits = ((x & 0x80) << 8) | ((x & 0x7F) << 7)
  return lax.bitcast_convert_type(bits, jnp.float16)


def tile_cols(rows, start: int, width: int):
  """Columns start .. start+width in the form ``key_tile``'s rows need (slice, or iota for a gather)."""
  if isinstance(rows, pl.Slice):
    return pl.ds(start, width)
  return start + lax.broadcasted_iota(jnp.int32, (1, width), 1)


def _decode_kernel(qs_ref, lens_ref, pt_ref, q_ref, k_ref, v_ref, ksc_ref, vsc_ref, *refs,
                   group: int, max_q: int, rows: int, block_k: int, page_size: int,
                   pages_per_seq: int, sm_scale: float, kv_upcast, splits: int,
                   page_blocks: bool, tile_upcast: bool, bits_upcast: bool, mask_tail: bool,
                   peel_tail: bool = False, zero_pad: bool = False, pt_regs: int = 0,
                   tile_upcast_v: bool = False, lazy_rescale: bool = False,
                   combine: str = "serial", interpret: bool = False, num_warps: int = 4):
  # refs: [o_init (aliased with out: zeros for the rows no program writes; not with zero_pad)]
  # [, cnt_init], out_refs
  fused = combine == "fused" and splits > 1
  out_refs = refs[(0 if zero_pad else 1) + (1 if fused else 0):]
  kvh = pl.program_id(0)
  split = pl.program_id(1)
  b = pl.program_id(2)
  rm = row_map(qs_ref, b, kvh, group=group, max_q=max_q, rows=rows)
  seq_len = lens_ref[b]
  q_pos = seq_len - rm.q_len + rm.tok
  D = k_ref.shape[-1]
  score_scale = sm_scale * _LOG2E
  kv_factor = _E4M3_TO_F16_BITS if bits_upcast else 1.0
  if kv_upcast is not None:
    score_scale = score_scale * (ksc_ref[0] * kv_factor)
  q = load_rows(q_ref, rm, 0, D)
  pt_row = (load_page_row(pt_ref, b, pages_per_seq)
            if pages_per_seq <= pt_regs and not pages_per_seq & (pages_per_seq - 1)
            and page_blocks and page_size % block_k == 0 else None)

  def load_tile(kb, *, masked: bool, limit=None):
    """Keys and K/V of tile kb; masked: keys >= seq_len (and the whole tile unless kb < limit)
    read as zeros."""
    keys, rows_ix = key_tile(pt_ref, b, kb, block_k=block_k, page_size=page_size,
                             pages_per_seq=pages_per_seq, page_blocks=page_blocks, pt_row=pt_row)
    cols = tile_cols(rows_ix, 0, D)
    if masked:
      ok = keys < seq_len
      if limit is not None:
        ok = ok & (kb < limit)
      zero = 0 if bits_upcast else 0.0   # uint8 bit patterns or a float cache
      k = plgpu.load(k_ref.at[rows_ix, kvh, cols], mask=ok[:, None], other=zero)
      v = plgpu.load(v_ref.at[rows_ix, kvh, cols], mask=ok[:, None], other=zero)
    else:
      k = plgpu.load(k_ref.at[rows_ix, kvh, cols])
      v = plgpu.load(v_ref.at[rows_ix, kvh, cols])
    return keys, k, v

  def update(kb, keys, k, v, carry, *, masked: bool, limit=None):
    """Online-softmax step over one loaded tile; limit: the tile counts only if kb < limit."""
    acc, m_prev, l_prev = carry
    if bits_upcast:
      k, v = e4m3_bits_to_f16(k), e4m3_bits_to_f16(v)
    elif kv_upcast is not None:
      k = upcast(k, kv_upcast, tile_upcast)
      v = upcast(v, kv_upcast, tile_upcast or tile_upcast_v)
    s = plgpu.dot(q, k, trans_b=True) * score_scale
    if masked:
      vis = keys[None, :] <= q_pos[:, None]
      if limit is not None:
        vis = vis & (kb < limit)
      s = jnp.where(vis, s, _MASK)
    # (with a limit, a tile wholly outside the range adds nothing, even before any key)
    p, correction, m_new, l_new = online_softmax(s, m_prev, l_prev,
                                                 keep=vis if limit is not None else None)
    if lazy_rescale:   # rows whose max did not grow have correction == 1 exactly: skip the multiply
      grew = jnp.max(jnp.where(m_new > m_prev, 1, 0)) > 0
      acc = lax.cond(grew, lambda a: a * correction[:, None], lambda a: a, acc)
    else:
      acc = acc * correction[:, None]
    acc = acc + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, l_new

  def body(kb, carry, *, masked: bool = True):
    keys, k, v = load_tile(kb, masked=masked)
    return update(kb, keys, k, v, carry, masked=masked)

  carry = (jnp.zeros((rows, D), jnp.float32),
           jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  first, last = split_range(seq_len, block_k, split, splits)
  if mask_tail:   # tiles whose keys every query row sees (all < seq_len - q_len + 1) run unmasked
    full = jnp.clip(lax.div(seq_len - rm.q_len + 1, block_k), first, last)
    if peel_tail:
      # The masked tail is at most n_tail tiles (the last query row's partial tile and the
      # (max_q - 1) keys of the others): straight-line code whose loads are issued before the
      # unmasked loop, so their latency hides behind it (a second pipelined loop would wait a
      # full memory latency after the first). Tiles at or past ``last`` count for nothing.
      n_tail = (max_q - 1 + block_k - 1) // block_k + 1
      tail = [(full + i,) + load_tile(full + i, masked=True, limit=last) for i in range(n_tail)]
      carry = lax.fori_loop(first, full, functools.partial(body, masked=False), carry)
      for kb, keys, k, v in tail:
        carry = update(kb, keys, k, v, carry, masked=True, limit=last)
      acc, m, l = carry
    else:
      carry = lax.fori_loop(first, full, functools.partial(body, masked=False), carry)
      acc, m, l = lax.fori_loop(full, last, body, carry)
  else:
    acc, m, l = lax.fori_loop(first, last, body, carry)
  if kv_upcast is not None:
    acc = acc * (vsc_ref[0] * kv_factor)
  if fused:
    o_ref, acc_ref, m_ref, l_ref, cnt_ref = out_refs
    write_real_partials(acc_ref, m_ref, l_ref, b, kvh, split, rm, acc, m, l)
    merge_if_last(o_ref, acc_ref, m_ref, l_ref, cnt_ref, rm, b, kvh, group=group, max_q=max_q,
                  splits=splits, barrier=not interpret, num_warps=num_warps)
  elif splits > 1 and combine == "rows":
    write_real_partials(*out_refs, b, kvh, split, rm, acc, m, l)
  else:
    write_partials(out_refs, b, kvh, split, rm, acc, m, l)
  if zero_pad:   # row b, if a padding token (one query per sequence, T <= B): zeros
    o_ref = out_refs[0]
    T = o_ref.shape[0]
    pad = (b >= qs_ref[qs_ref.shape[0] - 1]) & (b < T) & (split == 0)
    plgpu.store(o_ref.at[jnp.minimum(b, T - 1), pl.ds(kvh * group, group), :],
                jnp.zeros((group, D), o_ref.dtype), mask=jnp.full((group, D), pad))


_MERGE_ELEMS = 8192   # f32 accumulator elements per merge load at 4 warps (64 registers a thread)


def merge_row(o_ref, acc_ref, m_ref, l_ref, b, blk, r, *, splits: int, tok, head, valid,
              num_warps: int = 4, col0=0, cols: int | None = None):
  """Merges query row r's split-K partials of (sequence b, block blk) into o[tok, head] (columns
  col0 .. col0+cols, all by default): its maxima and sums over all splits (the split axis padded to
  a power of two, masked) as one vector load, its accumulators as [chunk, cols] loads (one when
  chunk covers the splits); nothing is stored unless ``valid`` (a scalar)."""
  s_pad = acc_ref.shape[2]
  cols = cols or acc_ref.shape[-1]
  chunk = max(1, min(s_pad, _MERGE_ELEMS * num_warps // (4 * cols)))
  ok = (lax.broadcasted_iota(jnp.int32, (s_pad,), 0) < splits) & valid
  m = plgpu.load(m_ref.at[b, blk, pl.ds(0, s_pad), r], mask=ok, other=-jnp.inf)
  l = plgpu.load(l_ref.at[b, blk, pl.ds(0, s_pad), r], mask=ok, other=0.0)
  mx = jnp.max(m)
  mx = jnp.where(mx > -jnp.inf, mx, 0.0)
  total = jnp.sum(l * jnp.exp2(m - mx))      # empty splits (m = -inf) weigh 0

  def add_chunk(c, out):
    s0 = 0 if isinstance(c, int) else pl.multiple_of(c * chunk, chunk)
    okc = (s0 + lax.broadcasted_iota(jnp.int32, (chunk,), 0) < splits) & valid
    mc = plgpu.load(m_ref.at[b, blk, pl.ds(s0, chunk), r], mask=okc, other=-jnp.inf)
    a = plgpu.load(acc_ref.at[b, blk, pl.ds(s0, chunk), r, pl.ds(col0, cols)], mask=okc[:, None],
                   other=0.0)
    return out + jnp.sum(a * jnp.exp2(mc - mx)[:, None], axis=0)

  if chunk == s_pad:
    out = add_chunk(0, jnp.zeros((cols,), jnp.float32))
  else:
    out = lax.fori_loop(0, s_pad // chunk, add_chunk, jnp.zeros((cols,), jnp.float32))
  out = out / jnp.where(total > 0, total, 1.0)
  plgpu.store(o_ref.at[tok, head, pl.ds(col0, cols)], out.astype(o_ref.dtype),
              mask=jnp.full((cols,), valid))


def merge_if_last(o_ref, acc_ref, m_ref, l_ref, cnt_ref, rm: RowMap, b, blk, *, group: int,
                  max_q: int, splits: int, barrier: bool = True, num_warps: int = 4):
  """Fused split-K combine: after its partials are written, a program bumps the arrival counter of
  its (sequence, block); the one that arrives last merges every split's partials into o
  (``merge_row`` per query row, straight-line: the rows' loads can be in flight together).

  Ordering: the CTA barrier orders all threads' partial stores before the counter update, which is
  an acq_rel atomic at GPU scope (release of the stores; for the merging program, acquire of the
  other splits' stores, CUTLASS-semaphore style). The counter array must be zeros on entry."""
  if barrier:                            # (interpret mode runs programs one after another)
    plgpu.debug_barrier()
  old = plgpu.atomic_add(cnt_ref, (b, blk), jnp.int32(1))

  @pl.when(old == splits - 1)
  def _merge():
    for r in range(max_q * group):       # static: the rows that can hold a query token
      tok = r // group
      merge_row(o_ref, acc_ref, m_ref, l_ref, b, blk, jnp.int32(r), splits=splits,
                tok=rm.q_start + tok, head=rm.first_head + r % group, valid=tok < rm.q_len,
                num_warps=num_warps)


def write_real_partials(acc_ref, m_ref, l_ref, b, blk, split, rm: RowMap, acc, m, l):
  """Split-K partials (acc, max, sum) of the program's real query rows (padding rows unwritten)."""
  plgpu.store(acc_ref.at[b, blk, split, :, :], acc, mask=rm.row_ok[:, None])
  plgpu.store(m_ref.at[b, blk, split, :], m, mask=rm.row_ok)
  plgpu.store(l_ref.at[b, blk, split, :], l, mask=rm.row_ok)


# Output columns per combine program (D // this programs per query row; 1 warp for 32): H100, B=1
# 32k, 33 splits: 2.3 us with 32 columns vs 2.8 (64) and 3.3 (128) (benchmarks/attention.md)
_COMBINE_COLS = 32


def _combine_rows_kernel(qs_ref, acc_ref, m_ref, l_ref, o_init_ref, o_ref, *, group: int,
                         splits: int, cols: int, num_warps: int):
  """One program per (block, query row r, sequence and column chunk): ``merge_row``."""
  del o_init_ref
  blk, r = pl.program_id(0), pl.program_id(1)
  nc = acc_ref.shape[-1] // cols
  b, c = lax.div(pl.program_id(2), nc), lax.rem(pl.program_id(2), nc)
  q_start = qs_ref[b]
  tok = lax.div(r, group)
  merge_row(o_ref, acc_ref, m_ref, l_ref, b, blk, r, splits=splits, tok=q_start + tok,
            head=blk * group + lax.rem(r, group), valid=tok < qs_ref[b + 1] - q_start,
            num_warps=num_warps, col0=pl.multiple_of(c * cols, cols), cols=cols)


def combine_rows(acc, m, l, query_start, o_init, *, group: int, max_q: int, splits: int,
                 interpret: bool) -> jax.Array:
  """Merges split-K partials ([B, blocks, s_pad >= splits, rows, D], ...) into o_init: grid
  (blocks, max_q * group, B * D / _COMBINE_COLS), one query row's column chunk per program."""
  B, blocks = acc.shape[:2]
  D = acc.shape[-1]
  cols = min(D, _COMBINE_COLS)
  num_warps = 4 if cols >= 128 else max(1, cols // 32)
  return pl.pallas_call(
      functools.partial(_combine_rows_kernel, group=group, splits=splits, cols=cols,
                        num_warps=num_warps),
      grid=(blocks, max_q * group, B * (D // cols)),
      out_shape=jax.ShapeDtypeStruct(o_init.shape, o_init.dtype),
      input_output_aliases={4: 0},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="combine_rows",
  )(query_start, acc, m, l, o_init)


def write_partials(out_refs, b, blk, split, rm: RowMap, acc, m, l):
  """One split: normalise and write the rows straight into o. Several: keep (acc, m, l) partials."""
  if len(out_refs) == 1:
    store_rows(out_refs[0], rm, acc / jnp.where(l > 0, l, 1.0)[:, None])
  else:
    acc_ref, m_ref, l_ref = out_refs
    acc_ref[b, blk, split, :, :] = acc
    m_ref[b, blk, split, :] = m
    l_ref[b, blk, split, :] = l


def _combine_kernel(qs_ref, acc_ref, m_ref, l_ref, o_init_ref, o_ref, *, group: int, max_q: int,
                    rows: int, splits: int):
  del o_init_ref
  blk = pl.program_id(0)
  b = pl.program_id(1)
  rm = row_map(qs_ref, b, blk, group=group, max_q=max_q, rows=rows)
  m_max = lax.fori_loop(0, splits, lambda s, mx: jnp.maximum(mx, m_ref[b, blk, s, :]),
                        jnp.full((rows,), -jnp.inf, jnp.float32))
  m_max = jnp.where(m_max > -jnp.inf, m_max, 0.0)   # rows no split saw

  def body(s, carry):
    out, total = carry
    w = jnp.exp2(m_ref[b, blk, s, :] - m_max)       # 0 for empty splits (m = -inf)
    return out + acc_ref[b, blk, s, :, :] * w[:, None], total + l_ref[b, blk, s, :] * w

  out, total = lax.fori_loop(0, splits, body, (jnp.zeros(acc_ref.shape[-2:], jnp.float32),
                                               jnp.zeros((rows,), jnp.float32)))
  store_rows(o_ref, rm, out / jnp.where(total > 0, total, 1.0)[:, None])


def split_outputs(B: int, blocks: int, splits: int, rows: int, d: int, out):
  """out_shape of a split-K kernel: the output itself for one split, else the partials."""
  if splits == 1:
    return (out,)
  return (jax.ShapeDtypeStruct((B, blocks, splits, rows, d), jnp.float32),
          jax.ShapeDtypeStruct((B, blocks, splits, rows), jnp.float32),
          jax.ShapeDtypeStruct((B, blocks, splits, rows), jnp.float32))


def finish_splits(results, query_start, o_init, *, group: int, max_q: int, rows: int,
                  interpret: bool) -> jax.Array:
  """The output for one split; else merges the partials with a small Pallas kernel into o_init."""
  if len(results) == 1:
    return results[0]
  acc, m, l = results
  B, blocks, splits = acc.shape[:3]
  return pl.pallas_call(
      functools.partial(_combine_kernel, group=group, max_q=max_q, rows=rows, splits=splits),
      grid=(blocks, B),
      out_shape=jax.ShapeDtypeStruct(o_init.shape, o_init.dtype),
      input_output_aliases={4: 0},
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
      name="combine_splits",
  )(query_start, acc, m, l, o_init)


def check_page_table(page_table: jax.Array, num_pages: int) -> None:
  """Raises ShapeError if a (concrete) page table points outside the cache; traced tables pass."""
  if isinstance(page_table, jax.core.Tracer):
    return
  lo, hi = int(jnp.min(page_table)), int(jnp.max(page_table))
  if lo < 0 or hi >= num_pages:
    raise ShapeError(f"page table entries span [{lo}, {hi}], outside the cache's {num_pages} pages")


def check_decode_shapes(q, k_pages, v_pages, page_table, seq_lens, query_start) -> None:
  if q.ndim != 3 or k_pages.ndim != 4:
    raise ShapeError(f"expected q [T,H,D], pages [N,page,KV,D]; got {q.shape}, {k_pages.shape}")
  if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
    raise ShapeError(f"k_pages {k_pages.shape} {k_pages.dtype} != v_pages {v_pages.shape} "
                     f"{v_pages.dtype}")
  T, H, D = q.shape
  KV = k_pages.shape[2]
  if k_pages.shape[3] != D or H % KV:
    raise ShapeError(f"q {q.shape} does not fit pages {k_pages.shape}")
  if D < 16 or D & (D - 1):
    raise ShapeError(f"head_dim must be a power of two >= 16, got {D}")
  if not is_fp8(k_pages.dtype) and q.dtype != k_pages.dtype:
    raise ShapeError(f"q dtype {q.dtype} must match the {k_pages.dtype} cache (or the cache be FP8)")
  B = page_table.shape[0]
  if page_table.ndim != 2 or seq_lens.shape != (B,) or query_start.shape != (B + 1,):
    raise ShapeError(f"page_table {page_table.shape}, seq_lens {seq_lens.shape}, query_start "
                     f"{query_start.shape} disagree")


def kernel_supports(q: jax.Array, k_pages: jax.Array) -> bool:
  """Whether the Pallas kernels take these inputs (else callers fall back to the reference)."""
  d = q.shape[-1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and d >= 16 and not d & (d - 1)
          and (is_fp8(k_pages.dtype) or k_pages.dtype == q.dtype))


def default_splits(num_seqs: int, kv_heads: int, max_blocks: int, programs_per_sm: int = 2) -> int:
  want = pl.cdiv(programs_per_sm * _NUM_SMS, num_seqs * kv_heads)
  return max(1, min(want, max_blocks, 64))


@functools.partial(jax.jit, static_argnames=("scale", "max_q", "tiles", "interpret"))
def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           page_table: jax.Array, seq_lens: jax.Array, query_start: jax.Array, *,
                           scale: float, k_scale=1.0, v_scale=1.0, max_q: int = 1,
                           tiles: DecodeTiles | None = None,
                           interpret: bool = False) -> jax.Array:
  """Attention of <= ``max_q`` query tokens per sequence over the paged cache -> [T, H, D].
  ``tiles`` None: the measured best for the cache dtype and the split-K regime (``default_tiles``)."""
  check_decode_shapes(q, k_pages, v_pages, page_table, seq_lens, query_start)
  T, H, D = q.shape
  N, page_size, KV, _ = k_pages.shape
  B, P = page_table.shape
  if tiles is None:
    tiles = default_tiles(is_fp8(k_pages.dtype), B, KV, P * page_size, page_size)
  G = H // KV
  block_k = tiles.block_k
  if block_k % page_size and page_size % block_k:
    raise ShapeError(f"block_k {block_k} and page size {page_size} must divide one another")
  rows = max(_MIN_ROWS, 1 << (max_q * G - 1).bit_length())
  max_blocks = pl.cdiv(P * page_size, block_k)
  splits = tiles.splits or default_splits(B, KV, max_blocks, tiles.programs_per_sm)
  # e4m3 -> f16 is one conversion instruction on Hopper (-> bf16 takes three), and f16 holds
  # every e4m3 value; queries are cast to f16 for the tensor-core dot.
  kv_upcast = jnp.float16 if is_fp8(k_pages.dtype) else None
  bits_upcast = tiles.bits_upcast and kv_upcast is not None
  if bits_upcast:
    if k_pages.dtype != jnp.float8_e4m3fn:
      raise ShapeError(f"bits_upcast takes an E4M3 cache, got {k_pages.dtype}")
    k_pages = lax.bitcast_convert_type(k_pages, jnp.uint8)
    v_pages = lax.bitcast_convert_type(v_pages, jnp.uint8)
  out_dtype = q.dtype
  if kv_upcast is not None:
    q = q.astype(kv_upcast)
  qs = query_start.astype(jnp.int32)
  o_init = jnp.zeros((T, H, D), out_dtype)
  if tiles.combine not in ("serial", "rows", "fused"):
    raise ValueError(f"unknown combine {tiles.combine!r}")
  combine = tiles.combine if splits > 1 else "serial"
  # zero_pad: the kernel writes every output row (padding tokens' rows as zeros), so out needs no
  # zeros buffer aliased in (XLA copies one in per call)
  zero_pad = (tiles.zero_pad and max_q == 1 and T <= B and not G & (G - 1)
              and (splits == 1 or combine == "fused"))
  kernel = functools.partial(
      _decode_kernel, group=G, max_q=max_q, rows=rows, block_k=block_k, page_size=page_size,
      pages_per_seq=P, sm_scale=scale, kv_upcast=kv_upcast, splits=splits, page_blocks=tiles.page_blocks,
      tile_upcast=tiles.tile_upcast, bits_upcast=bits_upcast, mask_tail=tiles.mask_tail,
      peel_tail=tiles.peel_tail, zero_pad=zero_pad, pt_regs=tiles.pt_regs,
      tile_upcast_v=tiles.tile_upcast_v, lazy_rescale=tiles.lazy_rescale,
      combine=combine, interpret=bool(interpret), num_warps=tiles.num_warps)
  o_shape = jax.ShapeDtypeStruct((T, H, D), out_dtype)
  extra, aliases = (), ({8: 0} if splits == 1 else {})
  s_pad = 1 << (splits - 1).bit_length()   # rows / fused: the split axis padded to a power of two
  if combine == "fused":   # out, partials, arrival counters
    out_shape = (o_shape,) + split_outputs(B, KV, s_pad, rows, D, o_shape) + (
        jax.ShapeDtypeStruct((B, KV), jnp.int32),)
    extra, aliases = (jnp.zeros((B, KV), jnp.int32),), {8: 0, 9: 4}
  else:
    out_shape = split_outputs(B, KV, s_pad if combine == "rows" else splits, rows, D, o_shape)
  if zero_pad:   # no o_init operand
    aliases = {k - 1: v for k, v in aliases.items() if k != 8}
  results = pl.pallas_call(
      kernel,
      grid=(KV, splits, B),
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="paged_decode_attention",
  )(qs, seq_lens.astype(jnp.int32), page_table.astype(jnp.int32), q,
    k_pages.reshape(N * page_size, KV, D), v_pages.reshape(N * page_size, KV, D),
    jnp.asarray(k_scale, jnp.float32).reshape(1), jnp.asarray(v_scale, jnp.float32).reshape(1),
    *(() if zero_pad else (o_init,)), *extra)
  if combine == "fused":
    return results[0]
  if combine == "rows":
    return combine_rows(*results, qs, o_init, group=G, max_q=max_q, splits=splits,
                        interpret=interpret)
  return finish_splits(results, qs, o_init, group=G, max_q=max_q, rows=rows, interpret=interpret)


def reference_paged_decode(q, k_pages, v_pages, page_table, seq_lens, query_start, *, scale: float,
                           k_scale=1.0, v_scale=1.0) -> jax.Array:
  """Plain-JAX float32 reference: same semantics as the kernel, every query row of every sequence."""
  T, H, D = q.shape
  N, page_size, KV, _ = k_pages.shape
  B, P = page_table.shape
  S = P * page_size
  G = H // KV
  k = (k_pages.astype(jnp.float32) * k_scale)[page_table].reshape(B, S, KV, D)
  v = (v_pages.astype(jnp.float32) * v_scale)[page_table].reshape(B, S, KV, D)
  t = jnp.arange(T)
  seq = jnp.clip(jnp.searchsorted(query_start, t, side="right") - 1, 0, B - 1)
  q_len = query_start[seq + 1] - query_start[seq]
  pos = seq_lens[seq] - q_len + t - query_start[seq]
  s = jnp.einsum("thd,tshd->ths", q.astype(jnp.float32), jnp.repeat(k[seq], G, axis=2)) * scale
  s = jnp.where((jnp.arange(S)[None, :] <= pos[:, None])[:, None, :], s, -jnp.inf)
  o = jnp.einsum("ths,tshd->thd", jax.nn.softmax(s, axis=-1), jnp.repeat(v[seq], G, axis=2))
  valid = t < query_start[B]
  return jnp.where(valid[:, None, None], o, 0.0)
