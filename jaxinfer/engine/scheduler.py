"""Continuous-batching scheduler with chunked prefill and recompute preemption.

Every step gets a token budget (``max_num_batched_tokens``) and a sequence budget (``max_num_seqs``).
Running requests are served first, oldest first: a decoding request takes one token, a request still
prefilling (a new prompt, or one recomputing after preemption) takes up to ``chunk_size`` tokens. The
rest of the budget admits waiting requests in arrival order. So decode and prefill chunks of different
requests share one step, and requests join and leave between steps.

When a running request needs a page and none is free, the newest running request is preempted: its
pages are freed and it goes back to the front of the queue to be recomputed (prompt plus the tokens it
already generated) once pages free up. Waiting requests never preempt running ones.
"""
from __future__ import annotations

import collections
import dataclasses

from jaxinfer.engine.block_allocator import BlockAllocator
from jaxinfer.engine.request import FinishReason, Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
  request: Request
  start: int        # first position computed this step (== request.num_computed before the step)
  num_tokens: int

  @property
  def completes(self) -> bool:
    """Whether this chunk reaches the request's last known token, so its logits are sampled."""
    return self.start + self.num_tokens == self.request.num_tokens


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
  chunks: list[ScheduledChunk]
  preempted: list[Request]
  finished: list[Request]   # requests finished by the scheduler (outgrew the whole KV cache)


class Scheduler:

  def __init__(self, allocator: BlockAllocator, *, page_size: int, max_num_seqs: int,
               max_num_batched_tokens: int, chunk_size: int):
    if min(page_size, max_num_seqs, max_num_batched_tokens, chunk_size) <= 0:
      raise ValueError("page_size, max_num_seqs, max_num_batched_tokens, chunk_size must be > 0")
    self.allocator = allocator
    self.page_size = page_size
    self.max_num_seqs = max_num_seqs
    self.max_num_batched_tokens = max_num_batched_tokens
    self.chunk_size = chunk_size
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: list[Request] = []

  def pages_for(self, num_tokens: int) -> int:
    return -(-num_tokens // self.page_size)

  def add(self, request: Request) -> None:
    request.status = RequestStatus.WAITING
    self.waiting.append(request)

  def remove(self, request: Request) -> None:
    """Takes a request out of the scheduler (finished or cancelled) and frees its pages at once."""
    if request.status is RequestStatus.RUNNING:
      self.running.remove(request)
    elif request.status is RequestStatus.WAITING:
      self.waiting.remove(request)
    self._free(request)

  def _free(self, request: Request) -> None:
    self.allocator.free(request.pages)
    request.pages = []

  def _preempt(self, request: Request) -> None:
    self.running.remove(request)
    self._free(request)
    request.num_computed = 0
    request.num_preemptions += 1
    request.status = RequestStatus.WAITING
    self.waiting.appendleft(request)

  def _reserve(self, request: Request, num_tokens: int) -> bool:
    extra = self.pages_for(request.num_computed + num_tokens) - len(request.pages)
    if extra <= 0:
      return True
    if not self.allocator.can_allocate(extra):
      return False
    request.pages.extend(self.allocator.allocate(extra))
    return True

  def schedule(self) -> SchedulerOutput:
    budget = self.max_num_batched_tokens
    chunks: list[ScheduledChunk] = []
    preempted: list[Request] = []
    finished: list[Request] = []

    i = 0
    while i < len(self.running) and budget > 0:
      req = self.running[i]
      n = min(req.num_tokens - req.num_computed, self.chunk_size, budget)
      outgrown = self.pages_for(req.num_computed + n) > self.allocator.capacity
      if req.pending_rows and (outgrown or req.num_output_tokens >= req.max_output_tokens):
        i += 1  # its last token is still on the device (async scheduling): it ends when that lands
        continue
      if outgrown:
        # Alone it would own the whole cache and still not fit: it can grow no further.
        self.running.pop(i)
        self._free(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.LENGTH
        finished.append(req)
        continue
      while not self._reserve(req, n):
        victim = self.running[-1]
        self._preempt(victim)
        preempted.append(victim)
        if victim is req:
          break
      if req.status is not RequestStatus.RUNNING:
        break  # req itself was preempted: everything after it already was
      chunks.append(ScheduledChunk(req, req.num_computed, n))
      budget -= n
      i += 1

    while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
      req = self.waiting[0]
      n = min(req.num_tokens - req.num_computed, self.chunk_size, budget)
      if not self._reserve(req, n):
        break
      self.waiting.popleft()
      req.status = RequestStatus.RUNNING
      self.running.append(req)
      chunks.append(ScheduledChunk(req, req.num_computed, n))
      budget -= n
    return SchedulerOutput(chunks, preempted, finished)
