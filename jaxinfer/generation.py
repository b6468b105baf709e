"""Static-batch generation: prefill every prompt (in chunks of at most ``prefill_chunk`` tokens per
step, several prompts per step), then decode all live sequences one token per step until each stops.

Each sequence owns a contiguous run of pages in a cache sized for this batch. Shapes are bucketed
(powers of two) so repeated calls reuse compiled steps. The serving engine does the same with a
shared allocator and requests that come and go; this is the simple, notebook-sized path.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import SeqChunk, bucket, build_batch
from jaxinfer.errors import InvalidRequestError, PromptTooLongError
from jaxinfer.outputs import GenerationOutput
from jaxinfer.sampling import SamplingBatch, SamplingParams, sample_jit


@dataclasses.dataclass
class _Seq:
  prompt: list[int]
  params: SamplingParams
  pages: list[int]
  limit: int                       # total length (prompt + generated) at which it stops
  generated: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  prefilled: int = 0
  finish_reason: str | None = None
  text: str = ""

  @property
  def length(self) -> int:
    return len(self.prompt) + len(self.generated)


def validate_prompt(ids: Sequence[int], params: SamplingParams, max_context: int,
                    vocab_size: int) -> int:
  """Returns the total length the request may reach; raises typed errors for bad requests."""
  if len(ids) == 0:
    raise InvalidRequestError("empty prompt")
  if any(not (0 <= int(t) < vocab_size) for t in ids):
    raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})")
  if len(ids) + 1 > max_context:
    raise PromptTooLongError(f"prompt has {len(ids)} tokens; the model's context is {max_context} "
                             "and at least one token must be generated")
  return min(len(ids) + params.max_tokens, max_context)


def generate(model, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], *,
             page_size: int = 16, prefill_chunk: int = 512, eos_token_ids: Sequence[int] = (),
             decode: Callable[[list[int]], str] | None = None,
             on_finish: Callable[[int], None] | None = None) -> list[GenerationOutput]:
  """Generates for each prompt (token ids). ``decode`` turns ids into text (for stop strings)."""
  if len(prompts) != len(params):
    raise InvalidRequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
  vocab = model.config.vocab_size
  seqs, next_page = [], 1
  for ids, p in zip(prompts, params):
    limit = validate_prompt(ids, p, model.max_context, vocab)
    n_pages = -(-limit // page_size)
    seqs.append(_Seq(list(map(int, ids)), p, list(range(next_page, next_page + n_pages)), limit))
    next_page += n_pages
  cache = model.create_cache(num_pages=next_page, page_size=page_size)
  num_seqs = bucket(len(seqs), 1)
  pages_per_seq = bucket(max(len(s.pages) for s in seqs), 1)
  stop_ids = [set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else set(eos_token_ids))
              for s in seqs]

  while True:
    step = _next_step(seqs, prefill_chunk)
    if not step:
      break
    chunks, ids, rows = [], [], []
    for i, start, n in step:
      s = seqs[i]
      chunks.append(SeqChunk(s.pages, start, n))
      ids.extend((s.prompt + s.generated)[start:start + n])
      rows.append(i)
    num_tokens = bucket(len(ids))
    batch = build_batch(chunks, page_size, num_tokens=num_tokens, num_seqs=num_seqs,
                        pages_per_seq=pages_per_seq)
    tokens = np.zeros(num_tokens, np.int32)
    tokens[:len(ids)] = ids
    logits, cache = model.forward(model.params, jnp.asarray(tokens), cache, batch)
    sb = SamplingBatch.from_params([seqs[i].params for i in rows],
                                   [len(seqs[i].generated) for i in rows], num_seqs)
    new_tokens, logprobs = (np.asarray(a) for a in sample_jit(logits, sb))
    for row, (i, start, n) in enumerate(step):
      s = seqs[i]
      if s.prefilled < len(s.prompt):
        s.prefilled = start + n
        if s.prefilled < len(s.prompt):
          continue  # mid-prompt chunk: its logits are not a prediction we use
      _append(s, int(new_tokens[row]), float(logprobs[row]), stop_ids[i], decode)
      if s.finish_reason and on_finish:
        on_finish(i)
  return [GenerationOutput(None, s.prompt, s.text, s.generated, s.finish_reason,
                           s.logprobs if s.params.logprobs else None) for s in seqs]


def _next_step(seqs: list[_Seq], prefill_chunk: int) -> list[tuple[int, int, int]]:
  """(seq index, start position, token count) for this step: prompt chunks first, else decodes."""
  budget, step = prefill_chunk, []
  for i, s in enumerate(seqs):
    if s.prefilled < len(s.prompt) and budget > 0:
      n = min(len(s.prompt) - s.prefilled, budget)
      step.append((i, s.prefilled, n))
      budget -= n
  if step:
    return step
  return [(i, s.length - 1, 1) for i, s in enumerate(seqs) if s.finish_reason is None]


def _append(s: _Seq, token: int, logprob: float, stop_ids: set[int], decode) -> None:
  if token in stop_ids:
    s.finish_reason = "stop"
    return
  s.generated.append(token)
  s.logprobs.append(logprob)
  if decode is not None:
    s.text = decode(s.generated)
    for stop in s.params.stop:
      cut = s.text.find(stop)
      if cut >= 0:
        s.text = s.text[:cut]
        s.finish_reason = "stop"
        return
  if s.length >= s.limit:
    s.finish_reason = "length"
