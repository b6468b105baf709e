"""Paged prefill attention in Pallas Triton: mixed prefill + decode steps straight from the paged
(FP8 or bf16) cache, no gathered K/V copy.

Layout (``jaxinfer.attention``, like ``kernels/paged_decode_attention.py``):
  q [T, H, D]             flattened tokens (bf16/f16); sequence b owns rows query_start[b] ..
                          query_start[b+1]-1 (a prompt chunk, or one decode token); rows from
                          query_start[B] on are padding
  k_pages, v_pages [N, page, KV, D]   bf16/f16 (q's dtype), or E4M3 with scalar k_scale / v_scale
  page_table [B, P], seq_lens [B]     token s of b: slot page_table[b, s // page] * page + s % page
  out [T, H, D]           q's dtype; query row i of b sits at position seq_lens[b] - q_len_b + i
                          and attends keys <= its position; padding rows are written as zeros.

Work items: one program per (KV head, work item); a work item is ``block_q`` consecutive query
tokens of one sequence, listed by ``work_items`` from query_start and seq_lens alone as (sequence,
first token, tokens, position of the first token): a tiny XLA computation on B + 1 ints that every
layer of a step shares (XLA's CSE leaves one per step), so a program needs one dependent load before
it reads q and the page table. The grid is the static bound W = ceil((T + B (block_q - 1)) /
block_q) per KV head, never below the real tiles plus the ceil(padding tokens / block_q) items that
write the padding rows' zeros, so no program is empty unless the step has fewer sequences than B. A
decode row is a one-token item. ``sort_items`` orders the items heaviest (most keys) first, so the
long decode rows do not end up in the last wave.

Tiling: a program's rows are its tokens x the G = H/KV query heads of its KV head (row r: token
r // G, head kvh*G + r % G), so each K/V tile is read once for all G heads: ``block_q * G`` rows
(>= 16 for the tensor cores; ``small_items`` runs items of <= 16/G tokens on a 16-row branch of the
same kernel). K/V tiles of ``block_k`` keys come straight from the cache through the page table
(``paged_decode_attention.key_tile``: a block when a tile lies inside one page, else a slot gather
of rows), FP8 converted to f16 in registers (q cast to f16 in the kernel; the scales folded into the
score and output scaling). Key tiles wholly below the causal diagonal of the item's first token run
unmasked; the diagonal tiles are masked. Online softmax in base 2, f32 accumulator.

Roofline (H100, the c=64 serving mixed step: T=1024 = 7-8 prompt chunks of 128 tokens + up to 56
decode rows, 32/8 heads, D=128, contexts <= 192, FP8 cache): ~1 GFLOP of useful attention per layer
(nothing), K/V read ~20 MB (mostly the decode rows' contexts; 7 us at 3 TB/s), q read + out write 16
MB (from / to L2 in serving): a latency-bound kernel. Measured (H100, 2026-11-24, jax 0.11.2,
benchmarks/serving.md "pattn"): in the serving benchmark's prefill steps 0.55-0.58 ms per step with
4 stages and 0.58-0.61 with the default 6 (17-19 us per layer; 0.62-0.67 with 64-row tiles on 4
warps) against 2.26 ms for the gather + ``flash_prefill`` + select fusions it replaces (c=64 tok/s
+3-5%). Kernel probe (16 layers, cold caches, 7 chunks + 56 decode rows): 64-row tiles on 4 warps
34.7 us (ncu: 182 registers, 2 CTAs per SM, 12.5% occupancy, 3.8 waves: latency-bound); 16-row tiles
on 1 warp, heaviest first, 24.5 us (ncu: 164 registers, 12 CTAs/SM) and 22.8 us with 6 stages (the
default); the old path 111 us. Long contexts (T=1024 in 4 chunks at 1k keys / 2 at 2k): 129.7 /
234.7 us vs 153.5 / 244.8 for the old path, so ``jaxinfer.attention`` uses it by default up to 1024
keys.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError
from jaxinfer.kv_cache import is_fp8
from kernels.flash_attention import online_softmax
from kernels.paged_decode_attention import (check_decode_shapes, key_tile, reference_paged_decode,
                                            tile_cols)

_LOG2E = math.log2(math.e)
_MASK = -1e30
_MIN_ROWS = 16  # smallest M of a tensor-core dot in Triton


@dataclasses.dataclass(frozen=True)
class PagedPrefillTiles:
  # Defaults: fastest at the c=64 serving mixed step on the H100 (windows 3-5, 2026-11-24): 16-row
  # tiles (4 tokens x G=4 heads) on one warp, heaviest items first, page-sized key tiles, 6 stages
  # (probe 22.8-23.4 us vs 24.4-24.6 with 4, 24.5 with 8; in serving, where q and the chunks' K/V
  # are L2-hot, 0.58-0.61 ms per step vs 0.55-0.58 with 4 stages, within run-to-run spread).
  block_q: int = 4      # query tokens per program; rows = block_q * G (padded to >= 16)
  block_k: int = 16     # keys per K/V tile (page-sized or smaller: blocks; larger: slot gather)
  num_warps: int = 1
  num_stages: int = 6
  page_blocks: bool = True   # key tiles inside one page read as blocks (else slot gather)
  sort_items: bool = True    # work items heaviest first (else in sequence order)
  small_items: bool = False  # items of few tokens (decode rows) on a tile of max(16, G) rows


def num_work_items(num_tokens: int, num_seqs: int, block_q: int) -> int:
  """Static bound on the work items of a step: real tiles + padding tiles never exceed it."""
  return -(-(num_tokens + num_seqs * (block_q - 1)) // block_q)


def work_items(query_start: jax.Array, seq_lens: jax.Array, num_tokens: int, block_q: int,
               sort: bool = False) -> jax.Array:
  """[4, W] int32, one column per work item: (b, first token, tokens, position of the first token).

  The real items are the block_q-token tiles of every sequence (b >= 0; tile j of b starts at token
  query_start[b] + j*block_q, at position seq_lens[b] - q_len_b + j*block_q), in sequence order, or
  with ``sort`` heaviest (most keys) first; then the padding items (b = -1): block_q-token pieces of
  the padding rows from query_start[B] on (tokens may be 0), whose programs write zeros."""
  B = query_start.shape[0] - 1
  W = num_work_items(num_tokens, B, block_q)
  qs = query_start.astype(jnp.int32)
  q_len = jnp.maximum(qs[1:] - qs[:-1], 0)
  n = (q_len + block_q - 1) // block_q                                  # tiles of each sequence
  cum = jnp.cumsum(n)                                                   # inclusive
  w = jnp.arange(W, dtype=jnp.int32)
  b = jnp.minimum(jnp.sum(cum[None, :] <= w[:, None], axis=1), B - 1).astype(jnp.int32)
  total = cum[-1]
  real = w < total
  j = w - (cum[b] - n[b])
  first = jnp.where(real, qs[b] + j * block_q, qs[B] + (w - total) * block_q)
  count = jnp.where(real, jnp.minimum(block_q, q_len[b] - j * block_q),
                    jnp.clip(num_tokens - first, 0, block_q))
  pos0 = jnp.where(real, seq_lens.astype(jnp.int32)[b] - q_len[b] + j * block_q, -1)
  items = jnp.stack([jnp.where(real, b, -1), first, count, pos0]).astype(jnp.int32)
  if sort:   # keys of an item: pos0 + count (padding: -1, last); stable, so ties keep their order
    items = items[:, jnp.argsort(-(pos0 + jnp.where(real, count, 0)), stable=True)]
  return items


def _kernel(work_ref, pt_ref, q_ref, k_ref, v_ref, ksc_ref, vsc_ref, o_ref, *, group: int,
            rows: int, small_rows: int, block_q: int, block_k: int, page_size: int,
            pages_per_seq: int, sm_scale: float, kv_upcast, page_blocks: bool):
  kvh = pl.program_id(0)
  w = pl.program_id(1)
  b = work_ref[0, w]
  first = work_ref[1, w]
  count = work_ref[2, w]
  D = k_ref.shape[-1]
  dv = o_ref.shape[-1]

  def row_index(n: int):
    r = lax.broadcasted_iota(jnp.int32, (n,), 0)
    tok = lax.div(r, group)                             # token of row r within the item
    head = kvh * group + lax.rem(r, group)
    row_ok = (r < block_q * group) & (tok < count)
    ocols = lax.broadcasted_iota(jnp.int32, (1, dv), 1)
    return tok, head, row_ok, ((first + tok)[:, None], head[:, None], ocols)

  def attend(n: int):
    tok, head, row_ok, o_idx = row_index(n)
    pos0 = work_ref[3, w]                               # position of the item's first token
    q_pos = pos0 + tok
    cols = lax.broadcasted_iota(jnp.int32, (1, D), 1)
    q = plgpu.load(q_ref.at[(first + tok)[:, None], head[:, None], cols], mask=row_ok[:, None],
                   other=0.0)
    score_scale = sm_scale * _LOG2E
    if kv_upcast is not None:
      q = q.astype(kv_upcast)
      score_scale = score_scale * ksc_ref[0]
    last_pos = pos0 + count - 1

    def body(kb, carry, *, masked: bool):
      acc, m_prev, l_prev = carry
      keys, rows_ix = key_tile(pt_ref, b, kb, block_k=block_k, page_size=page_size,
                               pages_per_seq=pages_per_seq, page_blocks=page_blocks)
      kc, vc = tile_cols(rows_ix, 0, D), tile_cols(rows_ix, 0, dv)
      if masked:
        key_ok = (keys <= last_pos)[:, None]
        k = plgpu.load(k_ref.at[rows_ix, kvh, kc], mask=key_ok, other=0.0)
        v = plgpu.load(v_ref.at[rows_ix, kvh, vc], mask=key_ok, other=0.0)
      else:
        k = plgpu.load(k_ref.at[rows_ix, kvh, kc])
        v = plgpu.load(v_ref.at[rows_ix, kvh, vc])
      if kv_upcast is not None:
        k, v = k.astype(kv_upcast), v.astype(kv_upcast)
      s = plgpu.dot(q, k, trans_b=True) * score_scale
      if masked:
        s = jnp.where(keys[None, :] <= q_pos[:, None], s, _MASK)
      p, correction, m_new, l_new = online_softmax(s, m_prev, l_prev)
      acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
      return acc, m_new, l_new

    carry = (jnp.zeros((n, dv), jnp.float32), jnp.full((n,), -jnp.inf, jnp.float32),
             jnp.zeros((n,), jnp.float32))
    num_blocks = lax.div(last_pos + block_k, block_k)
    num_full = jnp.minimum(lax.div(pos0 + 1, block_k), num_blocks)
    carry = lax.fori_loop(0, num_full, functools.partial(body, masked=False), carry)
    acc, _, l = lax.fori_loop(num_full, num_blocks, functools.partial(body, masked=True), carry)
    out_scale = vsc_ref[0] if kv_upcast is not None else 1.0
    out = acc * (out_scale / jnp.where(l > 0, l, 1.0))[:, None]
    plgpu.store(o_ref.at[o_idx], out.astype(o_ref.dtype), mask=row_ok[:, None])

  if small_rows < rows:   # items of <= small_rows / G tokens (decode rows) on a smaller tile
    small = count * group <= small_rows
    pl.when((b >= 0) & small)(lambda: attend(small_rows))
    pl.when((b >= 0) & jnp.logical_not(small))(lambda: attend(rows))
  else:
    pl.when(b >= 0)(lambda: attend(rows))

  @pl.when(b < 0)
  def _zero_padding():
    _, _, row_ok, o_idx = row_index(rows)
    plgpu.store(o_ref.at[o_idx], jnp.zeros((rows, dv), o_ref.dtype), mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret"))
def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            page_table: jax.Array, seq_lens: jax.Array, query_start: jax.Array, *,
                            scale: float, k_scale=1.0, v_scale=1.0,
                            tiles: PagedPrefillTiles = PagedPrefillTiles(),
                            interpret: bool = False) -> jax.Array:
  """Causal attention of any number of query tokens per sequence over the paged cache -> [T, H, D]
  in q's dtype (padding rows zero); see the module docstring."""
  check_decode_shapes(q, k_pages, v_pages, page_table, seq_lens, query_start)
  T, H, D = q.shape
  N, page_size, KV, _ = k_pages.shape
  B, P = page_table.shape
  G = H // KV
  if tiles.block_k % page_size and page_size % tiles.block_k:
    raise ShapeError(f"block_k {tiles.block_k} and page size {page_size} must divide one another")
  rows = max(_MIN_ROWS, 1 << (tiles.block_q * G - 1).bit_length())
  small_rows = min(rows, max(_MIN_ROWS, 1 << (G - 1).bit_length())) if tiles.small_items else rows
  kv_upcast = jnp.float16 if is_fp8(k_pages.dtype) else None
  work = work_items(query_start, seq_lens, T, tiles.block_q, tiles.sort_items)
  kernel = functools.partial(
      _kernel, group=G, rows=rows, small_rows=small_rows, block_q=tiles.block_q,
      block_k=tiles.block_k, page_size=page_size, pages_per_seq=P, sm_scale=scale,
      kv_upcast=kv_upcast, page_blocks=tiles.page_blocks)
  return pl.pallas_call(
      kernel,
      grid=(KV, work.shape[1]),
      out_shape=jax.ShapeDtypeStruct((T, H, D), q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="paged_prefill_attention",
  )(work, page_table.astype(jnp.int32), q, k_pages.reshape(N * page_size, KV, D),
    v_pages.reshape(N * page_size, KV, D), jnp.asarray(k_scale, jnp.float32).reshape(1),
    jnp.asarray(v_scale, jnp.float32).reshape(1))


def reference_paged_prefill(q, k_pages, v_pages, page_table, seq_lens, query_start, *,
                            scale: float, k_scale=1.0, v_scale=1.0) -> jax.Array:
  """Plain-JAX float32 reference (same semantics): every query row of every sequence, padding 0.
  The decode kernel's reference already handles any number of query rows per sequence."""
  return reference_paged_decode(q, k_pages, v_pages, page_table, seq_lens, query_start,
                                scale=scale, k_scale=k_scale, v_scale=v_scale).astype(q.dtype)
