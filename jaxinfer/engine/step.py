"""The engine's one jitted step: forward over a flattened mixed batch, then per-row sampling.

Shapes are bucketed — tokens ``T``, sequences ``B``, pages per sequence ``P`` each rounded up to the
next entry of a short ladder — so a steady state (the same ladder rungs step after step) never
recompiles. Padding tokens write to the null page and padding rows sample greedily and are ignored.

Host-to-device traffic per step is two small packed arrays (every int32 field in one, temperature and
top_p in the other); weights and the donated KV cache stay on device. A token given as ``-(r + 1)``
is row ``r`` of the previous step's sampled tokens, read on device: with async scheduling the engine
dispatches step n+1 before step n's tokens reach the host.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention, sampling
from jaxinfer.kv_cache import KVCache
from jaxinfer.models import llama

ForwardFn = Callable[..., tuple[jax.Array, KVCache]]


@dataclasses.dataclass(frozen=True)
class LlamaForward:
  """``forward(params, tokens, cache, batch)`` of a Llama config; hashable by value, so every engine
  over the same config shares one compiled step."""
  cfg: llama.LlamaConfig
  fused_add_norm: bool = True   # residual add + RMSNorm as one Pallas kernel on GPU
  decode_only: bool = False     # every sequence has one new token: attention without a runtime branch

  def __call__(self, params, tokens, cache, batch):
    return llama.forward(params, tokens, cache, batch, self.cfg,
                         fused_add_norm=self.fused_add_norm,
                         max_new_tokens=1 if self.decode_only else None)


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


def _layout(shape: tuple[int, int, int]) -> dict[str, tuple[int, int]]:
  """Offsets of each int32 field in the packed step input (one host-to-device copy per step)."""
  T, B, P = shape
  sizes = [("tokens", T), ("token_src", T), ("positions", T), ("seq_ids", T), ("slots", T), ("page_table", B * P),
           ("seq_lens", B), ("query_start", B + 1), ("logit_indices", B), ("top_k", B),
           ("seeds", B), ("steps", B)]
  out, o = {}, 0
  for name, n in sizes:
    out[name] = (o, o + n)
    o += n
  return out


@dataclasses.dataclass(frozen=True)
class HostBatch:
  """The host inputs of one step, packed: every int32 field in ``ints`` (see ``_layout``), the
  per-row temperature and top_p in ``floats`` [2, B]."""
  shape: tuple[int, int, int]
  ints: np.ndarray
  floats: np.ndarray

  def field(self, name: str) -> np.ndarray:
    a, b = _layout(self.shape)[name]
    out = self.ints[a:b]
    return out.reshape(self.shape[1], self.shape[2]) if name == "page_table" else out

  @property
  def tokens(self) -> np.ndarray:
    return self.field("tokens")

  @property
  def batch(self) -> attention.AttentionBatch:
    return attention.AttentionBatch(*(self.field(n) for n in (
        "positions", "seq_ids", "slots", "page_table", "seq_lens", "query_start", "logit_indices")))


def build_host_batch(chunks: Sequence[tuple[Sequence[int], Sequence[int], int]], page_size: int,
                     shape: tuple[int, int, int],
                     sampling_rows: Sequence[tuple[sampling.SamplingParams | None, int]] = ()
                     ) -> HostBatch:
  """``chunks``: (token ids, pages, start position) per sequence, an id ``-(r + 1)`` standing for
  row r of the previous step's sampled tokens; ``sampling_rows``: (params or
  None for a row whose logits are not used, output tokens so far) per sequence. The fields of
  ``attention.build_batch_arrays`` plus those of ``SamplingBatch.from_params``, packed into two
  arrays."""
  T, B, P = shape
  lens = [len(c[0]) for c in chunks]
  arrays = attention.build_batch_arrays(lens, [c[2] for c in chunks], [c[1] for c in chunks],
                                        page_size, num_tokens=T, num_seqs=B, pages_per_seq=P)
  layout = _layout(shape)
  ints = np.zeros(layout["steps"][1], np.int32)
  view = lambda name: ints[layout[name][0]:layout[name][1]]
  for name, a in arrays.items():
    view(name)[:] = a.reshape(-1)
  view("token_src")[:] = -1
  if chunks:
    ids = np.concatenate([np.asarray(c[0], np.int32) for c in chunks])
    view("tokens")[:ids.size] = np.maximum(ids, 0)
    view("token_src")[:ids.size] = np.where(ids < 0, -ids - 1, -1)   # pending: previous step's row
  floats = np.zeros((2, B), np.float32)
  floats[1] = 1.0                                       # top_p of padding / greedy rows
  top_k, seeds, steps = view("top_k"), view("seeds"), view("steps")
  for i, (p, step) in enumerate(sampling_rows):
    if p is None:
      continue
    floats[0, i], floats[1, i], top_k[i] = p.temperature, p.top_p, p.top_k
    seeds[i] = np.uint32(p.resolved_seed()).view(np.int32)
    steps[i] = step
  return HostBatch(shape, ints, floats)


def _step(params, ints, floats, prev_tokens, cache, *, forward, shape, greedy=False):
  """-> (sampled tokens [R] (rows past B are zero), their logprobs [B], the cache), R =
  ``prev_tokens.shape[0]`` the engine's largest sequence bucket, so the output of one step can feed
  the next whatever their shapes. ``greedy``: every row is greedy (static: no sort, no device-side
  branch)."""
  layout = _layout(shape)
  f = lambda name: ints[layout[name][0]:layout[name][1]]
  B, P = shape[1], shape[2]
  batch = attention.AttentionBatch(f("positions"), f("seq_ids"), f("slots"),
                                   f("page_table").reshape(B, P), f("seq_lens"), f("query_start"),
                                   f("logit_indices"))
  src = f("token_src")
  tokens = jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)], f("tokens"))
  logits, cache = forward(params, tokens, cache, batch)
  logits = logits.astype(jnp.float32)
  sb = None
  if not greedy:
    seeds = jax.lax.bitcast_convert_type(f("seeds"), jnp.uint32)
    keys = sampling.row_keys(seeds, f("steps").astype(jnp.uint32))
    sb = sampling.SamplingBatch(floats[0], f("top_k"), floats[1], keys)
  next_tokens, logprobs = sampling.sample(logits, sb)
  return jnp.zeros_like(prev_tokens).at[:B].set(next_tokens), logprobs, cache


step_jit = jax.jit(_step, static_argnames=("forward", "shape", "greedy"),
                   donate_argnames=("cache",))
