"""Paged KV cache: the explicit cache pytree every model forward takes and returns.

Layout, per layer: ``k[l]``/``v[l]`` of shape ``[num_pages, page_size, kv_heads, head_dim]``. A sequence
owns a list of pages (its row of the page table); token ``s`` of a sequence lives in page
``page_table[s // page_size]`` at offset ``s % page_size``, i.e. flat slot ``page * page_size + offset``.

Page 0 is the *null page*: never handed to a sequence, it absorbs the K/V writes of padding tokens so a
fixed-shape step needs no masking on the write side. Allocators must start at page 1.

FP8 (E4M3) storage keeps one float32 scale per layer for K and one for V: stored = value / scale.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NULL_PAGE = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  k_scale: jax.Array  # [num_layers] float32; 1.0 for bf16/f32 storage
  v_scale: jax.Array

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def num_pages(self) -> int:
    return self.k[0].shape[0]

  @property
  def page_size(self) -> int:
    return self.k[0].shape[1]

  @property
  def dtype(self) -> jnp.dtype:
    return self.k[0].dtype

  def nbytes_per_token(self) -> int:
    kv_heads, head_dim = self.k[0].shape[2:]
    return 2 * self.num_layers * kv_heads * head_dim * jnp.dtype(self.dtype).itemsize

  @classmethod
  def create(cls, *, num_layers: int, num_pages: int, page_size: int, kv_heads: int, head_dim: int,
             dtype=jnp.bfloat16, k_scale: float = 1.0, v_scale: float = 1.0) -> KVCache:
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
    shape = (num_pages, page_size, kv_heads, head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return cls(k=zeros(), v=zeros(),
               k_scale=jnp.full((num_layers,), k_scale, jnp.float32),
               v_scale=jnp.full((num_layers,), v_scale, jnp.float32))


def is_fp8(dtype) -> bool:
  return jnp.dtype(dtype) in (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def write_kv(pages: jax.Array, new: jax.Array, slots: jax.Array, scale: jax.Array) -> jax.Array:
  """Scatters ``new`` [T, kv_heads, head_dim] into ``pages`` at flat ``slots`` [T]."""
  num_pages, page_size = pages.shape[:2]
  if is_fp8(pages.dtype):
    new = new.astype(jnp.float32) / scale
  flat = pages.reshape(num_pages * page_size, *pages.shape[2:])
  flat = flat.at[slots].set(new.astype(pages.dtype), mode="drop", unique_indices=False)
  return flat.reshape(pages.shape)
