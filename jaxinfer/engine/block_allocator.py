"""Page allocator of the paged KV cache: hands out pages 1..N-1 (page 0 is the null page)."""
from __future__ import annotations

from collections.abc import Iterable

from jaxinfer.kv_cache import NULL_PAGE


class BlockAllocator:
  """A free list of KV-cache pages. All-or-nothing: ``allocate`` either returns every page asked for
  or raises, so a failed allocation never leaks part of a sequence's pages."""

  def __init__(self, num_pages: int):
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page {NULL_PAGE} is the null page), got {num_pages}")
    self.num_pages = num_pages
    # LIFO free list: recently freed pages are reused first (still warm in caches).
    self._free = [p for p in range(num_pages - 1, 0, -1)]
    self._in_use: set[int] = set()

  @property
  def capacity(self) -> int:
    """Pages a sequence can ever own (every page but the null page)."""
    return self.num_pages - 1

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    return len(self._in_use)

  def can_allocate(self, n: int) -> bool:
    return n <= len(self._free)

  def allocate(self, n: int) -> list[int]:
    if n > len(self._free):
      raise MemoryError(f"asked for {n} KV pages, {len(self._free)} free")
    pages = [self._free.pop() for _ in range(n)]
    self._in_use.update(pages)
    return pages

  def free(self, pages: Iterable[int]) -> None:
    for p in pages:
      if p not in self._in_use:
        raise ValueError(f"page {p} freed twice or never allocated")
      self._in_use.remove(p)
      self._free.append(p)
