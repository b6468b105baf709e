"""MLA (multi-head latent attention, DeepSeek) over a paged latent cache, in the absorbed form.

Layout: ``latent_pages [num_pages, page_size, kv_lora_rank + rope_dim]``; the first ``kv_lora_rank``
entries of a cache slot are the compressed KV ``c``, the rest the shared rotary key ``k_rope``. Queries
are already absorbed (``q_latent = q_nope @ W_UK``): ``q_latent [T, H, kv_lora_rank]``, ``q_rope [T, H,
rope_dim]``. For token t of sequence b, over cached slots s of b with position <= positions[t]:

    score[h, s] = scale * (q_latent[t, h] . c[s] + q_rope[t, h] . k_rope[s])
    out[t, h]   = softmax_s(score[h]) @ c                     -> [T, H, kv_lora_rank]

The caller applies W_UV afterwards. FP8 (E4M3) latent pages carry one scalar ``latent_scale``
(stored = value / scale), as ``kv_cache.write_kv`` stores them.

Decode kernel (Pallas Triton), grid (head_blocks, splits, B), head blocks fastest so the programs
reading the same latent tiles run together and share them through L2: a program owns ``block_h``
heads x the sequence's query tokens as rows, streams ``block_k``-slot latent tiles (read as blocks
inside a page, else gathered slot by slot; ``key_tile``, shared with the paged decode kernel),
computes ``q_latent.c^T + q_rope.k_rope^T`` and accumulates ``p.c`` into a [rows, kv_lora_rank] f32
tile. FP8 tiles are upcast to f16 in registers (one cvt per pair on Hopper), the scale folded into
scores and output. One split writes rows straight into the output; split-K partials merge in
``paged_decode_attention``'s combine kernel.

Target roofline (B=64, 4096 context, 128 heads, 512+64): the latent cache is read once per step
(the H/block_h programs of one tile share it through L2): 302 MB bf16 / 151 MB FP8 -> 0.097 / 0.049 ms
at the measured 3.1 TB/s. But the step is also 73 GFLOP (2*576 + 2*512 per head and key), 0.093 ms at
the measured 783 TFLOP/s bf16 dense: at this batch and head count MLA decode is compute-bound, and
the FP8 "70% of read bandwidth" mark (0.070 ms) would need > 1 PFLOP/s. Measured (H100, 2026-11-23):
bf16 0.47 ms (16 heads per program, mma.sync), FP8 0.85-0.91 ms. FP8 is slower than bf16 because
Triton converts every tile in the MMA-operand layout: with 64 heads per program (wgmma) the
[64, 512] accumulator, the hoisted query-operand descriptors and the conversion exceed 255 registers
and spill inside the key loop; with 16-32 heads each tile is re-converted by 4-8 programs. See
benchmarks/attention.md. The FlashMLA-style kernel (each tile widened once, two warpgroups splitting the
output columns) exists on Mosaic GPU (kernels/mla_attention_mgpu.py: 0.166 ms
bf16, 0.358 ms FP8 at this shape); ``mla_paged_attention`` takes it on Hopper for decode batches with
enough sequences and keeps this kernel as the fallback (several tokens per sequence, few sequences,
head counts that are not a multiple of 64).

Context (prefill) MLA in the non-absorbed form is ``mla_prefill_attention``: ``flash_prefill`` with a
128-dim nope part (bf16 or FP8) plus a 64-dim rope part shared by all heads.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.attention import AttentionBatch
from jaxinfer.errors import ShapeError
from jaxinfer.kv_cache import is_fp8
from kernels.flash_attention import PrefillTiles, flash_prefill, online_softmax
from kernels.paged_decode_attention import (_LOG2E, _MASK, check_page_table, default_splits,
                                            finish_splits, key_tile, load_rows, row_map,
                                            split_outputs, split_range, tile_cols,
                                            upcast as upcast_tile, write_partials)


def _check_mla_shapes(q_latent, q_rope, latent_pages, batch: AttentionBatch) -> None:
  if q_latent.ndim != 3 or q_rope.ndim != 3 or latent_pages.ndim != 3:
    raise ShapeError(f"expected q_latent [T,H,R], q_rope [T,H,Dr], latent_pages [N,page,R+Dr]; got "
                     f"{q_latent.shape}, {q_rope.shape}, {latent_pages.shape}")
  T, H, R = q_latent.shape
  if q_rope.shape[:2] != (T, H):
    raise ShapeError(f"q_rope {q_rope.shape} does not match q_latent {q_latent.shape}")
  if latent_pages.shape[-1] != R + q_rope.shape[-1]:
    raise ShapeError(f"latent_pages last dim {latent_pages.shape[-1]} != kv_lora_rank {R} + rope_dim "
                     f"{q_rope.shape[-1]}")
  if batch.positions.shape != (T,):
    raise ShapeError(f"batch has {batch.positions.shape[0]} tokens, q_latent has {T}")


def reference_mla_paged_attention(q_latent: jax.Array, q_rope: jax.Array, latent_pages: jax.Array,
                                  batch: AttentionBatch, *, scale: float,
                                  latent_scale=1.0) -> jax.Array:
  """Plain-JAX absorbed MLA (float32 math). Returns [T, H, kv_lora_rank] in q_latent's dtype."""
  _check_mla_shapes(q_latent, q_rope, latent_pages, batch)
  T, H, R = q_latent.shape
  _, page_size, C = latent_pages.shape
  B, P = batch.page_table.shape
  S = P * page_size
  lat = latent_pages.astype(jnp.float32)
  if is_fp8(latent_pages.dtype):
    lat = lat * jnp.asarray(latent_scale, jnp.float32)
  lat = lat[batch.page_table].reshape(B, S, C)
  q = jnp.concatenate([q_latent, q_rope], axis=-1).astype(jnp.float32) * scale   # [T, H, C]
  causal = jnp.arange(S)[None, :] <= batch.positions[:, None]                     # [T, S]
  if T * S * C <= T * H * B * S:  # gather each token's sequence
    lt = lat[batch.seq_ids]                                                        # [T, S, C]
    s = jnp.einsum("thc,tsc->ths", q, lt)
    s = jnp.where(causal[:, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("ths,tsr->thr", p, lt[..., :R])
  else:  # score against every sequence, mask the others
    s = jnp.einsum("thc,bsc->thbs", q, lat)
    mine = batch.seq_ids[:, None] == jnp.arange(B)[None, :]
    mask = mine[:, :, None] & causal[:, None, :]                                   # [T, B, S]
    s = jnp.where(mask[:, None], s, -jnp.inf).reshape(T, H, B * S)
    p = jax.nn.softmax(s, axis=-1).reshape(T, H, B, S)
    o = jnp.einsum("thbs,bsr->thr", p, lat[..., :R])
  return o.astype(q_latent.dtype)


@dataclasses.dataclass(frozen=True)
class MLATiles:
  block_h: int = 32
  block_k: int = 32
  num_warps: int = 8
  num_stages: int = 2
  splits: int | None = None
  tile_upcast: bool = False   # FP8: see paged_decode_attention.upcast


# Fastest measured on the H100 (benchmarks/attention.md), B=64, 4096 context, 128 heads.
BF16_TILES = MLATiles(block_h=16, block_k=64, num_warps=4, num_stages=2)
FP8_TILES = MLATiles(block_h=64, block_k=32, num_warps=8, num_stages=2)


def _mla_decode_kernel(qs_ref, lens_ref, pt_ref, ql_ref, qr_ref, lat_ref, sc_ref, o_init_ref,
                       *out_refs, block_h: int, max_q: int, rows: int, block_k: int,
                       page_size: int, pages_per_seq: int, rank: int, rope_dim: int,
                       sm_scale: float, upcast, splits: int, tile_upcast: bool):
  del o_init_ref  # aliased with the output: zeros for the rows no program writes
  hb = pl.program_id(0)
  split = pl.program_id(1)
  b = pl.program_id(2)
  rm = row_map(qs_ref, b, hb, group=block_h, max_q=max_q, rows=rows)
  seq_len = lens_ref[b]
  q_pos = seq_len - rm.q_len + rm.tok
  score_scale = sm_scale * _LOG2E
  if upcast is not None:
    score_scale = score_scale * sc_ref[0]
  ql = load_rows(ql_ref, rm, 0, rank)
  qr = load_rows(qr_ref, rm, 0, rope_dim)
  first, last = split_range(seq_len, block_k, split, splits)

  def body(kb, carry):
    acc, m_prev, l_prev = carry
    keys, rows = key_tile(pt_ref, b, kb, block_k=block_k, page_size=page_size,
                          pages_per_seq=pages_per_seq)
    key_ok = keys < seq_len
    c = plgpu.load(lat_ref.at[rows, tile_cols(rows, 0, rank)], mask=key_ok[:, None], other=0.0)
    kr = plgpu.load(lat_ref.at[rows, tile_cols(rows, rank, rope_dim)], mask=key_ok[:, None],
                    other=0.0)
    if upcast is not None:
      c = upcast_tile(c, upcast, tile_upcast)
      kr = upcast_tile(kr, upcast, tile_upcast)
    s = (plgpu.dot(ql, c, trans_b=True) + plgpu.dot(qr, kr, trans_b=True)) * score_scale
    s = jnp.where(keys[None, :] <= q_pos[:, None], s, _MASK)
    p, correction, m_new, l_new = online_softmax(s, m_prev, l_prev)
    acc = acc * correction[:, None] + plgpu.dot(p.astype(c.dtype), c)
    return acc, m_new, l_new

  carry = (jnp.zeros((rows, rank), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(first, last, body, carry)
  if upcast is not None:
    acc = acc * sc_ref[0]
  write_partials(out_refs, b, hb, split, rm, acc, m, l)


@functools.partial(jax.jit, static_argnames=("scale", "max_q", "tiles", "interpret"))
def mla_decode_pallas(q_latent: jax.Array, q_rope: jax.Array, latent_pages: jax.Array,
                      page_table: jax.Array, seq_lens: jax.Array, query_start: jax.Array, *,
                      scale: float, latent_scale=1.0, max_q: int = 1,
                      tiles: MLATiles | None = None, interpret: bool = False) -> jax.Array:
  """The Pallas kernel for <= ``max_q`` query tokens per sequence -> [T, H, kv_lora_rank]."""
  if tiles is None:
    tiles = FP8_TILES if is_fp8(latent_pages.dtype) else BF16_TILES
  T, H, R = q_latent.shape
  Dr = q_rope.shape[-1]
  N, page_size, C = latent_pages.shape
  B, P = page_table.shape
  # rows = block_h x query tokens; past 64 rows the [rows, 512] f32 accumulator and the shared-memory
  # tiles no longer fit (seen: 256 KB requested for 128 rows), so block_h shrinks for several tokens.
  bh = min(tiles.block_h, H, max(1, 64 // max_q))
  if H % bh:
    raise ShapeError(f"heads {H} not a multiple of block_h {bh}")
  for d in (R, Dr):
    if d < 16 or d & (d - 1):
      raise ShapeError(f"kv_lora_rank and rope_dim must be powers of two >= 16, got {R}, {Dr}")
  if tiles.block_k % page_size and page_size % tiles.block_k:
    raise ShapeError(f"block_k {tiles.block_k} and page size {page_size} must divide one another")
  rows = max(16, 1 << (max_q * bh - 1).bit_length())
  nhb = H // bh
  splits = tiles.splits or default_splits(B, nhb, pl.cdiv(P * page_size, tiles.block_k))
  if not is_fp8(latent_pages.dtype) and latent_pages.dtype != q_latent.dtype:
    raise ShapeError(f"q_latent dtype {q_latent.dtype} must match the {latent_pages.dtype} latent "
                     "cache (or the cache be FP8)")
  upcast = jnp.float16 if is_fp8(latent_pages.dtype) else None
  out_dtype = q_latent.dtype
  if upcast is not None:
    q_latent, q_rope = q_latent.astype(upcast), q_rope.astype(upcast)
  else:
    q_rope = q_rope.astype(q_latent.dtype)
  qs = query_start.astype(jnp.int32)
  o_init = jnp.zeros((T, H, R), out_dtype)
  kernel = functools.partial(
      _mla_decode_kernel, block_h=bh, max_q=max_q, rows=rows, block_k=tiles.block_k,
      page_size=page_size, pages_per_seq=P, rank=R, rope_dim=Dr, sm_scale=scale, upcast=upcast,
      splits=splits, tile_upcast=tiles.tile_upcast)
  results = pl.pallas_call(
      kernel,
      grid=(nhb, splits, B),
      out_shape=split_outputs(B, nhb, splits, rows, R, jax.ShapeDtypeStruct((T, H, R), out_dtype)),
      input_output_aliases={7: 0} if splits == 1 else {},
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="mla_decode",
  )(qs, seq_lens.astype(jnp.int32), page_table.astype(jnp.int32), q_latent, q_rope,
    latent_pages.reshape(N * page_size, C), jnp.asarray(latent_scale, jnp.float32).reshape(1),
    o_init)
  return finish_splits(results, qs, o_init, group=bh, max_q=max_q, rows=rows,
                       interpret=interpret)


# The Mosaic GPU kernel runs one CTA per (64 heads, sequence) and does not split the context: below
# this many CTAs the Triton kernel (which splits) is preferred. Measured on the H100 at context 4096,
# 128 heads (benchmarks/attention.md): bf16 Triton 0.102 vs Mosaic 0.142 ms at 8 CTAs (B=4), Mosaic
# 0.142 vs 0.203 at 32 (B=16), Triton 0.122 vs Mosaic 0.141 at 16 (B=8); FP8 Mosaic 0.319 vs
# Triton 1.130 ms already at 8 CTAs.
MOSAIC_MIN_CTAS = {"bf16": 24, "fp8": 8}


def _is_hopper() -> bool:
  dev = jax.devices()[0]
  cc = getattr(dev, "compute_capability", None)
  if cc is not None:
    return str(cc).startswith("9.")
  return any(name in dev.device_kind for name in ("H100", "H200", "H800", "H20", "GH200"))


def mosaic_decode_wanted(q_latent, q_rope, latent_pages, batch: AttentionBatch, *, on_gpu: bool,
                         hopper: bool) -> bool:
  """Whether ``mla_paged_attention`` sends this batch to the Mosaic GPU decode kernel (statically;
  the one-token-per-sequence condition is also checked at run time)."""
  if not (on_gpu and hopper) or batch.num_tokens > batch.num_seqs:
    return False
  from kernels import mla_attention_mgpu   # lazy: it imports this module's reference
  if not mla_attention_mgpu.supported(q_latent, q_rope, latent_pages, batch.page_table,
                                      batch.seq_lens, batch.query_start):
    return False
  ctas = batch.num_seqs * (q_latent.shape[1] // 64)
  return ctas >= MOSAIC_MIN_CTAS["fp8" if is_fp8(latent_pages.dtype) else "bf16"]


def _mosaic_decode(q_latent, q_rope, latent_pages, batch: AttentionBatch, *, scale: float,
                   latent_scale=1.0) -> jax.Array:
  from kernels import mla_attention_mgpu
  return mla_attention_mgpu.mla_decode_mgpu(
      q_latent, q_rope, latent_pages, batch.page_table, batch.seq_lens, batch.query_start,
      scale=scale, latent_scale=latent_scale).astype(q_latent.dtype)


def mla_paged_attention(q_latent: jax.Array, q_rope: jax.Array, latent_pages: jax.Array,
                        batch: AttentionBatch, *, scale: float, latent_scale=1.0,
                        impl: str = "auto", max_new_tokens: int | None = None) -> jax.Array:
  """Absorbed MLA over the paged latent cache -> [T, H, kv_lora_rank] in q_latent's dtype.

  ``impl``: auto | pallas | reference. auto: the reference on CPU and for inputs the kernel does
  not take (q not bf16/f16, dims not powers of two, latents neither q's dtype nor FP8); else the
  Pallas decode kernel when every sequence has <= 8 new tokens this step (a runtime ``lax.cond`` on
  the longest chunk) and the reference otherwise. On Hopper GPUs, a decode batch (at most one new
  token per sequence: T <= B statically, checked at run time) whose shapes the Mosaic GPU kernel
  takes (``kernels/mla_attention_mgpu.py``: bf16 q, heads a multiple of 64, bf16 or E4M3 latents)
  and that gives it at least ``MOSAIC_MIN_CTAS[dtype]`` CTAs goes to that kernel instead (auto and
  pallas). pallas: the same choice without the input check, the kernel in interpret mode off GPU.
  The kernel places token i of sequence b at position ``seq_lens[b] - q_len_b + i`` and returns
  zeros for padding tokens.

  ``max_new_tokens``: a bound on every sequence's new tokens this step that the caller guarantees
  (1 for a decode-only step). When it fits the chosen kernel (1 for the Mosaic kernel, <= the
  Pallas kernel's per-sequence query bound) that kernel runs unconditionally: no runtime
  ``lax.cond``, whose predicate costs a device -> host round trip per call on the GPU (0.12-0.14
  ms of wall time per DeepSeek layer call at decode B=64, cond vs static in the same run,
  benchmarks/deepseek.md). A sequence with more new tokens than that gets wrong results.
  """
  if impl not in ("auto", "pallas", "reference"):
    raise ValueError(f"unknown MLA impl {impl!r}")
  _check_mla_shapes(q_latent, q_rope, latent_pages, batch)
  check_page_table(batch.page_table, latent_pages.shape[0])
  on_gpu = jax.default_backend() == "gpu"
  reference = functools.partial(reference_mla_paged_attention, q_latent, q_rope, latent_pages,
                                batch, scale=scale, latent_scale=latent_scale)
  R, Dr = q_latent.shape[-1], q_rope.shape[-1]
  supported = (q_latent.dtype in (jnp.bfloat16, jnp.float16) and R >= 16 and not R & (R - 1)
               and Dr >= 16 and not Dr & (Dr - 1)
               and (is_fp8(latent_pages.dtype) or latent_pages.dtype == q_latent.dtype))
  if impl == "reference" or (impl == "auto" and not (on_gpu and supported)):
    return reference()
  T, B = batch.num_tokens, batch.num_seqs
  max_q = min(1 << (-(-T // B) - 1).bit_length(), 8)
  longest = jnp.max(jnp.diff(batch.query_start))
  if mosaic_decode_wanted(q_latent, q_rope, latent_pages, batch, on_gpu=on_gpu,
                          hopper=on_gpu and _is_hopper()):
    mosaic = functools.partial(_mosaic_decode, q_latent, q_rope, latent_pages, batch,
                               scale=scale, latent_scale=latent_scale)
    if max_new_tokens is not None and max_new_tokens <= 1:
      return mosaic()
    return lax.cond(longest <= 1, mosaic, reference)

  def run_kernel():
    return mla_decode_pallas(q_latent, q_rope, latent_pages, batch.page_table, batch.seq_lens,
                             batch.query_start, scale=scale, latent_scale=latent_scale,
                             max_q=max_q, interpret=not on_gpu)

  if max_new_tokens is not None and max_new_tokens <= max_q:
    return run_kernel()
  return lax.cond(longest <= max_q, run_kernel, reference)


def mla_prefill_attention(q_nope: jax.Array, q_rope: jax.Array, k_nope: jax.Array,
                          k_rope: jax.Array, v: jax.Array, query_start: jax.Array,
                          kv_lens: jax.Array, *, scale: float, q_scale=1.0, k_scale=1.0,
                          v_scale=1.0, tiles: PrefillTiles = PrefillTiles(),
                          interpret: bool | None = None) -> jax.Array:
  """Context MLA (non-absorbed): q_nope [T,H,128] (bf16 or E4M3 with q_scale), q_rope [T,H,64] bf16,
  k_nope/v [B,S,H,128] (E4M3 with per-head k_scale/v_scale in FP8 mode), k_rope [B,S,1,64] bf16.
  Returns [T, H, 128] bf16 (q's dtype for bf16 inputs)."""
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return flash_prefill(q_nope, k_nope, v, query_start, kv_lens, scale=scale, q_scale=q_scale,
                       k_scale=k_scale, v_scale=v_scale, q_rope=q_rope, k_rope=k_rope, tiles=tiles,
                       interpret=interpret)
