"""The engine's one jitted step: forward over a flattened mixed batch, then per-row sampling.

Shapes are bucketed — tokens ``T``, sequences ``B``, pages per sequence ``P`` each rounded up to the
next entry of a short ladder — so a steady state (the same ladder rungs step after step) never
recompiles. Padding tokens write to the null page and padding rows sample greedily and are ignored.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention, sampling
from jaxinfer.kv_cache import NULL_PAGE, KVCache
from jaxinfer.models import llama

ForwardFn = Callable[..., tuple[jax.Array, KVCache]]


@dataclasses.dataclass(frozen=True)
class LlamaForward:
  """``forward(params, tokens, cache, batch)`` of a Llama config; hashable by value, so every engine
  over the same config shares one compiled step."""
  cfg: llama.LlamaConfig

  def __call__(self, params, tokens, cache, batch):
    return llama.forward(params, tokens, cache, batch, self.cfg)


def ladder(minimum: int, maximum: int) -> tuple[int, ...]:
  """Powers of two from ``minimum`` up to the first one >= ``maximum``, the last clipped to it."""
  rungs, b = [], max(1, minimum)
  while b < maximum:
    rungs.append(b)
    b *= 2
  rungs.append(maximum)
  return tuple(rungs)


def pick(rungs: Sequence[int], n: int) -> int:
  for r in rungs:
    if r >= n:
      return r
  raise ValueError(f"{n} exceeds the largest bucket {rungs[-1]}")


@dataclasses.dataclass(frozen=True)
class StepBuckets:
  tokens: tuple[int, ...]
  seqs: tuple[int, ...]
  pages: tuple[int, ...]

  @classmethod
  def create(cls, *, max_num_batched_tokens: int, max_num_seqs: int, max_pages_per_seq: int,
             min_tokens: int = 8, min_seqs: int = 8, min_pages: int = 8) -> StepBuckets:
    return cls(ladder(min(min_tokens, max_num_batched_tokens), max_num_batched_tokens),
               ladder(min(min_seqs, max_num_seqs), max_num_seqs),
               ladder(min(min_pages, max_pages_per_seq), max_pages_per_seq))

  def shape_for(self, num_tokens: int, num_seqs: int, max_pages: int) -> tuple[int, int, int]:
    return pick(self.tokens, num_tokens), pick(self.seqs, num_seqs), pick(self.pages, max_pages)

  def all_shapes(self):
    return [(t, b, p) for t in self.tokens for b in self.seqs if b <= t for p in self.pages]


@dataclasses.dataclass(frozen=True)
class HostBatch:
  """The numpy inputs of one step (moved to the device by the jitted call)."""
  tokens: np.ndarray
  batch: attention.AttentionBatch


def build_host_batch(chunks: Sequence[tuple[Sequence[int], Sequence[int], int]], page_size: int,
                     shape: tuple[int, int, int]) -> HostBatch:
  """``chunks``: (token ids, pages, start position) per sequence. Vectorised equivalent of
  ``attention.build_batch`` (that one is per-chunk Python; a 256-sequence decode step notices)."""
  T, B, P = shape
  lens = np.fromiter((len(c[0]) for c in chunks), np.int32, len(chunks))
  total = int(lens.sum())
  if total > T or len(chunks) > B:
    raise ValueError(f"{total} tokens / {len(chunks)} seqs exceed the step's {T} / {B}")
  tokens = np.zeros(T, np.int32)
  page_table = np.full((B, P), NULL_PAGE, np.int32)
  starts = np.zeros(B, np.int32)
  for b, (ids, pages, start) in enumerate(chunks):
    if len(pages) > P:
      raise ValueError(f"sequence {b} has {len(pages)} pages, step allows {P}")
    page_table[b, :len(pages)] = pages
    starts[b] = start
  if total:
    tokens[:total] = np.concatenate([np.asarray(c[0], np.int32) for c in chunks])
  n = len(chunks)
  ends = np.cumsum(lens)
  seq_ids = np.zeros(T, np.int32)
  seq_ids[:total] = np.repeat(np.arange(n, dtype=np.int32), lens)
  positions = np.zeros(T, np.int32)
  positions[:total] = np.arange(total, dtype=np.int32) - np.repeat(ends - lens, lens) + \
      np.repeat(starts[:n], lens)
  slots = np.full(T, NULL_PAGE * page_size, np.int32)
  slots[:total] = page_table[seq_ids[:total], positions[:total] // page_size] * page_size + \
      positions[:total] % page_size
  seq_lens = np.zeros(B, np.int32)
  seq_lens[:n] = starts[:n] + lens
  query_start = np.full(B + 1, total, np.int32)
  query_start[:n] = ends - lens
  logit_indices = np.zeros(B, np.int32)
  logit_indices[:n] = ends - 1
  return HostBatch(tokens, attention.AttentionBatch(positions, seq_ids, slots, page_table, seq_lens,
                                                    query_start, logit_indices))


def _greedy(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)
  return tokens, logprobs[:, 0]


def _step(params, tokens, cache, batch, sampling_batch, *, forward):
  logits, cache = forward(params, tokens, cache, batch)
  logits = logits.astype(jnp.float32)
  # An all-greedy batch skips the sampler's full-vocabulary sort (ms at a 128k vocabulary).
  next_tokens, logprobs = jax.lax.cond(jnp.all(sampling_batch.temperature == 0), _greedy,
                                       lambda l: sampling.sample(l, sampling_batch), logits)
  return next_tokens, logprobs, cache


step_jit = jax.jit(_step, static_argnames=("forward",), donate_argnames=("cache",))
