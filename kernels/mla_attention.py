"""MLA (multi-head latent attention, DeepSeek) over a paged latent cache, in the absorbed form.

Layout: ``latent_pages [num_pages, page_size, kv_lora_rank + rope_dim]``; the first ``kv_lora_rank``
entries of a cache slot are the compressed KV ``c``, the rest the shared rotary key ``k_rope``. Queries
are already absorbed (``q_latent = q_nope @ W_UK``): ``q_latent [T, H, kv_lora_rank]``, ``q_rope [T, H,
rope_dim]``. For token t of sequence b, over cached slots s of b with position <= positions[t]:

    score[h, s] = scale * (q_latent[t, h] . c[s] + q_rope[t, h] . k_rope[s])
    out[t, h]   = softmax_s(score[h]) @ c                     -> [T, H, kv_lora_rank]

The caller applies W_UV afterwards. FP8 (E4M3) latent pages carry one scalar ``latent_scale``
(stored = value / scale), as ``kv_cache.write_kv`` stores them.

This module holds the plain-JAX reference; the Pallas kernel is ``mla_paged_attention(impl="pallas")``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.attention import AttentionBatch
from jaxinfer.errors import ShapeError
from jaxinfer.kv_cache import is_fp8


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


def mla_paged_attention(q_latent: jax.Array, q_rope: jax.Array, latent_pages: jax.Array,
                        batch: AttentionBatch, *, scale: float, latent_scale=1.0,
                        impl: str = "auto") -> jax.Array:
  """Absorbed MLA over the paged latent cache -> [T, H, kv_lora_rank]. ``impl``: auto | reference."""
  if impl not in ("auto", "reference"):
    raise ValueError(f"unknown MLA impl {impl!r}")
  return reference_mla_paged_attention(q_latent, q_rope, latent_pages, batch, scale=scale,
                                       latent_scale=latent_scale)
