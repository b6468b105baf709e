"""The attention dispatch point: every model's attention over the paged KV cache goes through here.

A step's tokens are *flattened*: ``T`` tokens from up to ``B`` sequences, each sequence's tokens
contiguous (a prefill chunk, or one decode token), padded to a bucketed ``T``. ``AttentionBatch`` says
where each token sits; it is built on the host by ``build_batch`` and is a pytree of int32 arrays.

Token ``t`` of sequence ``b = seq_ids[t]`` at position ``positions[t]`` attends every cached key of ``b``
at positions ``<= positions[t]`` (causal, with the cached prefix). The reference path below is plain
JAX; ``paged_attention`` picks a Pallas kernel on GPU when one applies.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kv_cache import NULL_PAGE, is_fp8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionBatch:
  positions: jax.Array      # [T] position of each token in its sequence
  seq_ids: jax.Array        # [T] row of page_table holding each token's sequence
  slots: jax.Array          # [T] flat cache slot each token's K/V is written to (null page for padding)
  page_table: jax.Array     # [B, P] pages of each sequence
  seq_lens: jax.Array       # [B] cached length of each sequence after this step (0 for padding rows)
  query_start: jax.Array    # [B + 1] first flat token of each sequence; query_start[B] = real tokens
  logit_indices: jax.Array  # [B] flat index of each sequence's last token this step

  @property
  def num_tokens(self) -> int:
    return self.positions.shape[0]

  @property
  def num_seqs(self) -> int:
    return self.page_table.shape[0]


@dataclasses.dataclass(frozen=True)
class SeqChunk:
  """One sequence's share of a step: ``num_tokens`` new tokens starting at position ``start``."""
  pages: Sequence[int]
  start: int
  num_tokens: int


def bucket(n: int, minimum: int = 8) -> int:
  """Smallest power of two >= max(n, minimum): bounds the number of compiled shapes."""
  b = minimum
  while b < n:
    b *= 2
  return b


def build_batch_arrays(lens: Sequence[int], starts: Sequence[int], pages: Sequence[Sequence[int]],
                       page_size: int, *, num_tokens: int, num_seqs: int,
                       pages_per_seq: int) -> dict[str, np.ndarray]:
  """Host-side AttentionBatch fields (NumPy, vectorised over tokens) for sequences b with
  ``lens[b]`` new tokens from position ``starts[b]`` in pages ``pages[b]``, padded to
  (num_tokens, num_seqs, pages_per_seq)."""
  n = len(lens)
  lens = np.asarray(lens, np.int32).reshape(n)
  starts = np.asarray(starts, np.int32).reshape(n)
  total = int(lens.sum())
  if total > num_tokens or n > num_seqs:
    raise ValueError(f"{total} tokens / {n} seqs exceed the step's {num_tokens} / {num_seqs}")
  page_table = np.full((num_seqs, pages_per_seq), NULL_PAGE, np.int32)
  for b, seq_pages in enumerate(pages):
    if len(seq_pages) > pages_per_seq:
      raise ValueError(f"sequence {b} has {len(seq_pages)} pages, the step allows {pages_per_seq}")
    page_table[b, :len(seq_pages)] = seq_pages
  ends = starts + lens
  needed = -(-ends // page_size)
  have = np.fromiter((len(p) for p in pages), np.int32, n)
  if (short := np.flatnonzero(needed > have)).size:
    b = int(short[0])
    raise ValueError(f"sequence {b} needs {needed[b]} pages, has {have[b]}")
  seq_ids = np.zeros(num_tokens, np.int32)
  positions = np.zeros(num_tokens, np.int32)
  slots = np.full(num_tokens, NULL_PAGE * page_size, np.int32)
  first = np.cumsum(lens) - lens                                   # flat index of each seq's start
  seq_ids[:total] = np.repeat(np.arange(n, dtype=np.int32), lens)
  positions[:total] = np.arange(total, dtype=np.int32) - np.repeat(first - starts, lens)
  slots[:total] = (page_table[seq_ids[:total], positions[:total] // page_size] * page_size
                   + positions[:total] % page_size)
  seq_lens = np.zeros(num_seqs, np.int32)
  seq_lens[:n] = ends
  query_start = np.full(num_seqs + 1, total, np.int32)
  query_start[:n] = first
  logit_indices = np.zeros(num_seqs, np.int32)
  logit_indices[:n] = first + lens - 1
  return {"positions": positions, "seq_ids": seq_ids, "slots": slots, "page_table": page_table,
          "seq_lens": seq_lens, "query_start": query_start, "logit_indices": logit_indices}


def build_batch(chunks: Sequence[SeqChunk], page_size: int, *, num_tokens: int, num_seqs: int,
                pages_per_seq: int) -> AttentionBatch:
  """An AttentionBatch padded to (num_tokens, num_seqs, pages_per_seq), on device."""
  arrays = build_batch_arrays([c.num_tokens for c in chunks], [c.start for c in chunks],
                              [c.pages for c in chunks], page_size, num_tokens=num_tokens,
                              num_seqs=num_seqs, pages_per_seq=pages_per_seq)
  return AttentionBatch(**{name: jnp.asarray(a) for name, a in arrays.items()})


def _dequant(pages: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  if is_fp8(pages.dtype):
    return (pages.astype(jnp.float32) * scale).astype(dtype)
  return pages.astype(dtype)


def reference_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              batch: AttentionBatch, *, scale: float, k_scale=1.0, v_scale=1.0,
                              logits_soft_cap: float | None = None) -> jax.Array:
  """Plain-JAX paged attention. q [T, H, D]; pages [N, page, KV, Dk/Dv] -> [T, H, Dv].

  Gathers each sequence's keys (``[B, S, KV, D]``); then either gathers them again per token or scores
  every token against every sequence, whichever materialises fewer elements for these static shapes.
  """
  T, H, D = q.shape
  _, page_size, KV, _ = k_pages.shape
  B, P = batch.page_table.shape
  S = P * page_size
  G = H // KV
  k = _dequant(k_pages, k_scale, q.dtype)[batch.page_table].reshape(B, S, KV, -1)
  v = _dequant(v_pages, v_scale, q.dtype)[batch.page_table].reshape(B, S, KV, -1)
  qg = q.reshape(T, KV, G, D).astype(jnp.float32) * scale
  key_pos = jnp.arange(S)
  causal = key_pos[None, :] <= batch.positions[:, None]                    # [T, S]
  if T * S * KV * D <= T * B * S * H:  # per-token gather
    kt, vt = k[batch.seq_ids], v[batch.seq_ids]                            # [T, S, KV, D]
    s = jnp.einsum("tkgd,tskd->tkgs", qg, kt.astype(jnp.float32))
    s = _soft_cap(s, logits_soft_cap)
    s = jnp.where(causal[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("tkgs,tskd->tkgd", p, vt.astype(jnp.float32))
  else:  # score against all sequences, mask the others
    s = jnp.einsum("tkgd,bskd->tkgbs", qg, k.astype(jnp.float32))
    s = _soft_cap(s, logits_soft_cap)
    mine = batch.seq_ids[:, None] == jnp.arange(B)[None, :]                # [T, B]
    mask = mine[:, :, None] & causal[:, None, :]                           # [T, B, S]
    s = jnp.where(mask[:, None, None], s, -jnp.inf).reshape(T, KV, G, B * S)
    p = jax.nn.softmax(s, axis=-1).reshape(T, KV, G, B, S)
    o = jnp.einsum("tkgbs,bskd->tkgd", p, v.astype(jnp.float32))
  return o.reshape(T, H, -1).astype(q.dtype)


def _soft_cap(s, cap):
  return s if cap is None else cap * jnp.tanh(s / cap)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: AttentionBatch, *,
                    scale: float, k_scale=1.0, v_scale=1.0, impl: str = "auto",
                    max_new_tokens: int | None = None, static_prefill: bool = False) -> jax.Array:
  """Causal attention of flattened queries over the paged cache. ``impl``: auto | pallas | reference.

  auto: the reference on CPU, and on GPU for inputs the kernels do not take (q not bf16/f16, a
  power-of-two head_dim, cache of q's dtype or FP8); else the Pallas kernels (``pallas`` forces
  them, in interpret mode off GPU). Batches whose sequences all have <= ``max_q`` new tokens (decode, speculative) take the
  paged decode kernel; others gather each sequence's pages and run the prefill kernel (chunked
  prefill over the cached prefix). The choice between the two is a runtime ``lax.cond`` on the
  longest chunk where the shapes alone do not tell (a step of at most 8 tokens: always decode, no
  cond). ``max_new_tokens``: a bound on every sequence's new tokens that the caller guarantees (the
  serving engine passes 1 for its decode-only steps); up to 8 it selects the decode kernel with no
  cond, and a sequence with more tokens than that gets wrong results. The kernels place query token i of sequence b
  at position ``seq_lens[b] - q_len_b + i`` (what ``build_batch`` produces) and return zeros for
  padding tokens. ``static_prefill``: a step the caller knows holds a prefill chunk (the serving
  engine's mixed steps) takes the gather + prefill kernel path with no runtime cond; that path is
  correct for any batch (decode rows included), so this only drops the branch (its
  ``set_case_condition`` kernels and the idle time a conditional costs inside a CUDA graph).
  Ignored where the shapes alone select the decode kernel or with ``max_new_tokens``. By default
  (``PAGED_PREFILL``) those steps run kernels/paged_prefill_attention.py instead where the page
  tables are short: one kernel reading K/V through the page table (no gather), decode rows included.
  """
  if impl not in ("auto", "pallas", "reference"):
    raise ValueError(f"unknown attention impl {impl!r}")
  on_gpu = jax.default_backend() == "gpu"
  if impl == "auto" and on_gpu:
    from kernels.paged_decode_attention import kernel_supports  # kernels import jaxinfer
    if not kernel_supports(q, k_pages):
      impl = "reference"
  if impl == "reference" or (impl == "auto" and not on_gpu):
    return reference_paged_attention(q, k_pages, v_pages, batch, scale=scale, k_scale=k_scale,
                                     v_scale=v_scale)
  return _pallas_paged_attention(q, k_pages, v_pages, batch, scale=scale, k_scale=k_scale,
                                 v_scale=v_scale, interpret=not on_gpu,
                                 max_new_tokens=max_new_tokens, static_prefill=static_prefill)


_MAX_DECODE_TOKENS = 8  # per sequence, for the decode kernel
# Query rows per program of the prefill kernel in static prefill steps (``static_prefill``; 0: the
# kernel's default tiles). A serving engine's mixed step holds a few prompt chunks and many 1-token
# decode rows, each decode row costing the kernel a whole query tile over its keys: smaller tiles
# waste less there.
MIXED_PREFILL_BLOCK_Q = int(os.environ.get("JAXINFER_MIXED_PREFILL_BLOCK_Q", "0"))
# Static prefill steps on kernels/paged_prefill_attention.py (K/V read through the page table, no
# gathered copy), JAXINFER_PAGED_PREFILL: "auto" (default) where the step's page tables span at
# most PAGED_PREFILL_MAX_KEYS keys (its small tiles are measured at short contexts: the c=64 serving mixed
# step on the H100, 0.55 ms per step vs 2.26 for the gather + flash_prefill path), "1" always, "0"
# never. JAXINFER_PAGED_PREFILL_TILES="block_q,block_k,num_warps,num_stages[,page_blocks,
# sort_items,small_items]" overrides its default tiles (the omitted fields keep their defaults).
PAGED_PREFILL = os.environ.get("JAXINFER_PAGED_PREFILL", "auto")
PAGED_PREFILL_MAX_KEYS = int(os.environ.get("JAXINFER_PAGED_PREFILL_MAX_KEYS", "1024"))
PAGED_PREFILL_TILES = os.environ.get("JAXINFER_PAGED_PREFILL_TILES", "")


def _pallas_paged_attention(q, k_pages, v_pages, batch: AttentionBatch, *, scale, k_scale, v_scale,
                            interpret: bool, max_new_tokens: int | None = None,
                            static_prefill: bool = False) -> jax.Array:
  from kernels import flash_attention, paged_decode_attention as decode  # kernels import jaxinfer

  decode.check_decode_shapes(q, k_pages, v_pages, batch.page_table, batch.seq_lens,
                             batch.query_start)
  decode.check_page_table(batch.page_table, k_pages.shape[0])
  T, B = batch.num_tokens, batch.num_seqs
  max_q = min(bucket(-(-T // B), 1), _MAX_DECODE_TOKENS)
  # Statically decode: when no sequence can have more new tokens than the step has, or than the
  # caller's bound (then the kernel's query rows follow that bound).
  static_decode = T <= max_q
  if not static_decode and max_new_tokens is not None and max_new_tokens <= _MAX_DECODE_TOKENS:
    static_decode, max_q = True, max(max_q, bucket(max_new_tokens, 1))

  def run_decode():
    return decode.paged_decode_attention(
        q, k_pages, v_pages, batch.page_table, batch.seq_lens, batch.query_start, scale=scale,
        k_scale=k_scale, v_scale=v_scale, max_q=max_q, interpret=interpret)

  def run_prefill(tiles=flash_attention.PrefillTiles()):
    _, page_size, kv_heads, _ = k_pages.shape
    k = k_pages[batch.page_table].reshape(B, -1, kv_heads, k_pages.shape[-1])
    v = v_pages[batch.page_table].reshape(B, -1, kv_heads, v_pages.shape[-1])
    return flash_attention.flash_prefill(
        q, k, v, batch.query_start, batch.seq_lens, scale=scale, k_scale=k_scale,
        v_scale=v_scale, tiles=tiles, interpret=interpret).astype(q.dtype)

  if static_decode:
    return run_decode()
  max_keys = batch.page_table.shape[1] * k_pages.shape[1]
  paged_prefill_on = PAGED_PREFILL == "1" or (PAGED_PREFILL == "auto"
                                              and max_keys <= PAGED_PREFILL_MAX_KEYS)
  if static_prefill and paged_prefill_on:
    from kernels import paged_prefill_attention as paged_prefill  # kernels import jaxinfer
    tiles = paged_prefill.PagedPrefillTiles()
    if PAGED_PREFILL_TILES:
      vals = [int(x) for x in PAGED_PREFILL_TILES.split(",")]
      tiles = paged_prefill.PagedPrefillTiles(*vals[:4], *map(bool, vals[4:]))
    return paged_prefill.paged_prefill_attention(
        q, k_pages, v_pages, batch.page_table, batch.seq_lens, batch.query_start, scale=scale,
        k_scale=k_scale, v_scale=v_scale, tiles=tiles, interpret=interpret)
  if static_prefill:
    tiles = flash_attention.PrefillTiles()
    if MIXED_PREFILL_BLOCK_Q:
      tiles = dataclasses.replace(tiles, block_q=MIXED_PREFILL_BLOCK_Q,
                                  num_warps=4 if MIXED_PREFILL_BLOCK_Q <= 64 else tiles.num_warps)
    return run_prefill(tiles)
  longest = jnp.max(jnp.diff(batch.query_start))
  return jax.lax.cond(longest <= max_q, run_decode, run_prefill)
