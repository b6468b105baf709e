"""The engine's one jitted step: forward over a flattened mixed batch, then per-row sampling.

Shapes are bucketed — tokens ``T``, sequences ``B``, pages per sequence ``P`` each rounded up to the
next entry of a short ladder — so a steady state (the same ladder rungs step after step) never
recompiles. Padding tokens write to the null page and padding rows sample greedily and are ignored.

Host-to-device traffic per step is one small packed int32 array (every field; the float32 ones,
temperature and top_p, as their bits); weights and the donated KV cache stay on device. A token
given as ``-(r + 1)`` is row ``r`` of the previous step's sampled tokens, read on device: with async
scheduling the engine dispatches step n+1 before step n's tokens reach the host.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
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
  fused_add_norm: bool = True   # residual add + RMSNorm as one Pallas kernel on GPU
  decode_only: bool = False     # every sequence has one new token: attention without a runtime branch
  prefill_step: bool = False    # the step holds a prefill chunk: attention's prefill path, no branch
  fp8_quant_in_norm: bool = True    # FP8 weights: the norms before wqkv / w_gate_up emit E4M3 rows
                                    # (H100 c=64, one run: 7664 -> 8035 tok/s, decode step 5.60 ->
                                    # 5.35 ms, 753 -> 627 kernels/step); no effect on bf16 weights
  fp8_scale_in_norm: bool = False   # FP8 weights: the norms after wo / w_down apply their output
                                    # scales (measured: decode steps slower, prefill faster, ~even)
  fp8_scale_in_norm_min_tokens: int = 0   # ... only in steps of at least this many tokens (e.g.
                                          # 128: prefill steps only)
  fused_rope_kv: bool = False       # fused wqkv: RoPE + K/V cache write as one kernel per layer
                                    # (kernels/rope_kv_write.py), off until timed on the GPU
  fp8_act_quant: bool = False       # FP8 weights: wo / w_down inputs quantized by one kernel each
                                    # (kernels/fp8_act_quant.py, SwiGLU included), off until timed

  def __call__(self, params, tokens, cache, batch):
    return llama.forward(params, tokens, cache, batch, self.cfg,
                         fused_add_norm=self.fused_add_norm,
                         max_new_tokens=1 if self.decode_only else None,
                         fp8_quant_in_norm=self.fp8_quant_in_norm,
                         fp8_scale_in_norm=(self.fp8_scale_in_norm and
                                            tokens.shape[0] >= self.fp8_scale_in_norm_min_tokens),
                         fused_rope_kv=self.fused_rope_kv,
                         fp8_act_quant=self.fp8_act_quant,
                         static_prefill=self.prefill_step and not self.decode_only)


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


@functools.lru_cache(maxsize=256)
def _layout(shape: tuple[int, int, int]) -> dict[str, tuple[int, int]]:
  """Offsets of each int32 field in the packed step input (one host-to-device copy per step)."""
  T, B, P = shape
  sizes = [("tokens", T), ("token_src", T), ("positions", T), ("seq_ids", T), ("slots", T),
           ("page_table", B * P), ("seq_lens", B), ("query_start", B + 1), ("logit_indices", B),
           ("top_k", B), ("seeds", B), ("steps", B), ("temperature", B), ("top_p", B)]
  out, o = {}, 0
  for name, n in sizes:
    out[name] = (o, o + n)
    o += n
  return out


_FLOAT_FIELDS = ("temperature", "top_p")   # float32, stored as their bits in the int32 array


@dataclasses.dataclass(frozen=True)
class HostBatch:
  """The host inputs of one step, packed in one int32 array ``ints`` (see ``_layout``; the
  per-row temperature and top_p as float32 bits): one host-to-device copy per step."""
  shape: tuple[int, int, int]
  ints: np.ndarray

  def field(self, name: str) -> np.ndarray:
    a, b = _layout(self.shape)[name]
    out = self.ints[a:b]
    if name in _FLOAT_FIELDS:
      return out.view(np.float32)
    return out.reshape(self.shape[1], self.shape[2]) if name == "page_table" else out

  @property
  def floats(self) -> np.ndarray:
    """[2, B] float32: the rows' temperature and top_p."""
    return np.stack([self.field(n) for n in _FLOAT_FIELDS])

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
  ``attention.build_batch_arrays`` plus those of ``SamplingBatch.from_params``, packed into one
  int32 array. Greedy rows keep the padding values of the sampling fields (the sampler takes the argmax
  for a row of temperature 0 whatever its top-k / top-p / key).

  This is on the engine's per-step host path, so it writes the packed array directly with a few
  vectorised NumPy ops over all rows (no per-row array building; ``build_host_batch_reference``
  is the field-by-field form it is tested against).
  """
  T, B, P = shape
  layout = _layout(shape)
  ints = np.zeros(layout["top_p"][1], np.int32)
  view = lambda name: ints[layout[name][0]:layout[name][1]]
  n = len(chunks)
  if n > B:
    raise ValueError(f"{n} sequences exceed the step's {B}")
  lens = np.fromiter(map(len, (c[0] for c in chunks)), np.int64, n)
  starts = np.fromiter((c[2] for c in chunks), np.int64, n)
  npages = np.fromiter(map(len, (c[1] for c in chunks)), np.int64, n)
  total = int(lens.sum())
  if total > T:
    raise ValueError(f"{total} tokens exceed the step's {T}")
  if n and int(npages.max()) > P:
    b = int(np.argmax(npages))
    raise ValueError(f"sequence {b} has {npages[b]} pages, the step allows {P}")
  ends = starts + lens
  if (short := np.flatnonzero(-(-ends // page_size) > npages)).size:
    b = int(short[0])
    raise ValueError(f"sequence {b} needs {-(-ends[b] // page_size)} pages, has {npages[b]}")
  rows = np.arange(n)
  page_table = view("page_table").reshape(B, P)
  page_table[:] = NULL_PAGE
  num_pages = int(npages.sum())
  flat_pages = np.fromiter(itertools.chain.from_iterable(c[1] for c in chunks), np.int32,
                           num_pages)
  page_table[np.repeat(rows, npages),
             np.arange(num_pages) - np.repeat(np.cumsum(npages) - npages, npages)] = flat_pages
  first = np.cumsum(lens) - lens                      # flat index of each sequence's first token
  seq_ids = np.repeat(rows, lens)
  positions = np.arange(total) - np.repeat(first - starts, lens)
  view("seq_ids")[:total] = seq_ids
  view("positions")[:total] = positions
  slots = view("slots")
  slots[:total] = page_table[seq_ids, positions // page_size] * page_size + positions % page_size
  slots[total:] = NULL_PAGE * page_size                 # padding writes go to the null page
  view("seq_lens")[:n] = ends
  query_start = view("query_start")
  query_start[:n] = first
  query_start[n:] = total
  view("logit_indices")[:n] = first + lens - 1
  ids = np.fromiter(itertools.chain.from_iterable(c[0] for c in chunks), np.int32, total)
  view("tokens")[:total] = np.maximum(ids, 0)
  token_src = view("token_src")
  token_src[:] = -1
  token_src[:total] = np.where(ids < 0, -ids - 1, -1)   # pending: previous step's row
  temperature, top_p = view("temperature").view(np.float32), view("top_p").view(np.float32)
  top_p[:] = 1.0                                        # padding / greedy rows
  top_k, seeds, steps = view("top_k"), view("seeds"), view("steps")
  for i, (p, step) in enumerate(sampling_rows):
    if p is None or p.greedy:
      continue
    temperature[i], top_p[i], top_k[i] = p.temperature, p.top_p, p.top_k
    seeds[i] = np.uint32(p.resolved_seed()).view(np.int32)
    steps[i] = step
  return HostBatch(shape, ints)


def build_host_batch_reference(chunks: Sequence[tuple[Sequence[int], Sequence[int], int]],
                               page_size: int, shape: tuple[int, int, int],
                               sampling_rows: Sequence[tuple[sampling.SamplingParams | None, int]]
                               = ()) -> HostBatch:
  """``build_host_batch`` field by field, from ``attention.build_batch_arrays`` and a loop over
  rows: the reference it is tested against."""
  T, B, P = shape
  lens = [len(c[0]) for c in chunks]
  arrays = attention.build_batch_arrays(lens, [c[2] for c in chunks], [c[1] for c in chunks],
                                        page_size, num_tokens=T, num_seqs=B, pages_per_seq=P)
  layout = _layout(shape)
  ints = np.zeros(layout["top_p"][1], np.int32)
  view = lambda name: ints[layout[name][0]:layout[name][1]]
  for name, a in arrays.items():
    view(name)[:] = a.reshape(-1)
  view("token_src")[:] = -1
  for (ids, _, _), q in zip(chunks, arrays["query_start"]):
    for j, t in enumerate(ids):
      view("tokens")[q + j] = max(t, 0)
      view("token_src")[q + j] = -t - 1 if t < 0 else -1
  for i in range(B):
    view("top_p")[i] = np.float32(1.0).view(np.int32)
  for i, (p, step) in enumerate(sampling_rows):
    if p is not None and not p.greedy:
      view("temperature")[i] = np.float32(p.temperature).view(np.int32)
      view("top_p")[i] = np.float32(p.top_p).view(np.int32)
      view("top_k")[i], view("steps")[i] = p.top_k, step
      view("seeds")[i] = np.uint32(p.resolved_seed()).view(np.int32)
  return HostBatch(shape, ints)


def _step(params, ints, prev_tokens, cache, *, forward, shape, greedy=False):
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
    as_f32 = lambda name: jax.lax.bitcast_convert_type(f(name), jnp.float32)
    sb = sampling.SamplingBatch(as_f32("temperature"), f("top_k"), as_f32("top_p"), keys)
  next_tokens, logprobs = sampling.sample(logits, sb)
  return jnp.zeros_like(prev_tokens).at[:B].set(next_tokens), logprobs, cache


step_jit = jax.jit(_step, static_argnames=("forward", "shape", "greedy"),
                   donate_argnames=("cache",))
