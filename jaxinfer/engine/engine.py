"""The serving engine: requests in, one jitted step per call of ``step()``, outputs out.

``LLMEngine`` is single-threaded (a notebook can drive it directly); ``EngineLoop`` (engine_loop.py)
runs it on a background thread for the server. Each ``step()``:
  1. the scheduler picks decode tokens and prefill chunks within the token/sequence budgets,
     allocating pages and preempting (recompute) when pages run out;
  2. one jitted forward + sample over the bucketed, flattened batch is dispatched;
  3. each request whose chunk reached its last token gets the sampled token; stop ids, stop
     strings, max_tokens and the context length finish requests, which free their pages at once.

With ``async_scheduling`` (the default), step() dispatches step n+1 *before* waiting for step n's
sampled tokens, so the host part of a step (scheduling, batch building, dispatch, detokenizing)
overlaps the device's work instead of leaving the GPU idle (vLLM's and SGLang's async scheduling).
Step n+1 is scheduled as if step n's tokens were known: a request that will get one counts it as a
*pending* token, which step n+1 reads on device from step n's output. A request that step n
finishes (stop id, stop string) has one wasted row in step n+1, ignored; one that max_tokens will
finish is not scheduled again. Outputs are the same as synchronous stepping, one step later.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from jaxinfer.engine.block_allocator import BlockAllocator
from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.engine.request import FinishReason, Request, RequestOutput, RequestStatus
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.step import LlamaForward, StepBuckets, build_host_batch, step_jit
from jaxinfer.errors import InvalidRequestError, PromptTooLongError
from jaxinfer.kv_cache import KVCache
from jaxinfer.models import llama
from jaxinfer.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class StepStats:
  shape: tuple[int, int, int]   # bucketed (tokens, sequences, pages per sequence)
  num_seqs: int
  num_tokens: int
  num_decode: int               # sequences that took a single decode token
  host_s: float = 0.0           # schedule + batch build + dispatch (device work is asynchronous)
  call_s: float = 0.0           # of host_s: the jitted step's call (its input's host-to-device
                                # copy and the runtime's launch work)
  wait_s: float = 0.0           # blocked waiting for the step's sampled tokens (with async
                                # scheduling, while the next step was already dispatched)

  @property
  def decode_only(self) -> bool:
    return self.num_decode == self.num_seqs


@dataclasses.dataclass
class _InFlight:
  """A dispatched step: its sampled tokens and logprobs (device arrays), and per row the request
  that takes the token (None: a prefill chunk that does not reach the end of its prompt)."""
  tokens: jax.Array
  logprobs: jax.Array
  rows: list[Request | None]
  stats: StepStats
  t_dispatched: float


class TokenizerLike(Protocol):
  eos_token_ids: tuple[int, ...]

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  num_pages: int = 2048                 # KV-cache pages, including the null page 0
  page_size: int = 16
  max_num_seqs: int = 64                # max batch: sequences per step
  max_num_batched_tokens: int = 512     # token budget of a step
  chunk_size: int = 256                 # max prefill tokens of one request in one step
  max_model_len: int | None = None      # None: the model's max_position_embeddings
  kv_dtype: Any = None                  # None: the weights' dtype; jnp.float8_e4m3fn: FP8 cache
  max_queued_requests: int = 4096       # beyond this, submissions get ResourceExhaustedError
  min_token_bucket: int = 8
  min_seq_bucket: int = 8
  min_page_bucket: int = 8
  token_buckets: tuple[int, ...] | None = None  # explicit step-token ladder (last = the budget)
  async_scheduling: bool = True         # dispatch step n+1 before waiting for step n's tokens
  fuse_projections: bool = True         # Llama on one device: wq|wk|wv and w_gate|w_up as one GEMM each
  decode_only_steps: bool = True        # Llama: steps of single-token rows compile without attention's
                                        # runtime decode/prefill branch (one more compile per such shape)
  static_prefill_steps: bool = False    # Llama: steps holding a prefill chunk take attention's prefill
                                        # path with no runtime branch (decode-only steps as above)


def _maybe_fuse(params, config: EngineConfig):
  """Llama params in the fused-projection layout when the config asks and they sit on one device."""
  if config.fuse_projections and llama.can_fuse_projections(params):
    return llama.fuse_projections(params)
  return params


class LLMEngine:

  def __init__(self, params, forward: Callable, cache: KVCache, *, vocab_size: int,
               max_model_len: int, tokenizer: TokenizerLike | None = None,
               config: EngineConfig = EngineConfig(), metrics: EngineMetrics | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.params = params
    self.forward = forward
    # Decode-only steps (every row one token) run a forward that tells attention so statically.
    self._decode_forward = (dataclasses.replace(forward, decode_only=True)
                            if config.decode_only_steps and isinstance(forward, LlamaForward)
                            else None)
    # Steps with a prefill chunk: the same, with attention's prefill path (correct for any rows).
    self._prefill_forward = (dataclasses.replace(forward, prefill_step=True)
                             if config.static_prefill_steps and isinstance(forward, LlamaForward)
                             else None)
    self.cache = cache
    self.tokenizer = tokenizer
    self.config = config
    self.vocab_size = vocab_size
    self.page_size = cache.page_size
    self.max_model_len = max_model_len
    self.allocator = BlockAllocator(cache.num_pages)
    self.scheduler = Scheduler(self.allocator, page_size=cache.page_size,
                               max_num_seqs=config.max_num_seqs,
                               max_num_batched_tokens=config.max_num_batched_tokens,
                               chunk_size=config.chunk_size)
    self.buckets = StepBuckets.create(
        max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
        max_pages_per_seq=min(-(-max_model_len // cache.page_size), cache.num_pages - 1),
        min_tokens=config.min_token_bucket, min_seqs=config.min_seq_bucket,
        min_pages=config.min_page_bucket)
    if config.token_buckets:
      if max(config.token_buckets) != config.max_num_batched_tokens:
        raise ValueError("token_buckets must end at max_num_batched_tokens")
      self.buckets = dataclasses.replace(self.buckets, tokens=tuple(sorted(config.token_buckets)))
    self.metrics = metrics if metrics is not None else EngineMetrics()
    self.metrics.kv_pages_total.set(self.allocator.capacity)
    self.clock = clock
    self._requests: dict[str, Request] = {}
    self._eos = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else frozenset()
    self.num_steps = 0
    self.last_step: StepStats | None = None
    self.compiled_shapes: set[tuple[int, int, int]] = set()
    # The previous step's sampled tokens stay on device ([largest seq bucket] int32) to feed the
    # next step; _in_flight is the dispatched step whose tokens the host has not read yet.
    self._no_prev = jax.device_put(np.zeros(self.buckets.seqs[-1], np.int32))
    self._in_flight: _InFlight | None = None

  @classmethod
  def from_llama(cls, cfg: llama.LlamaConfig, params, *, tokenizer: TokenizerLike | None = None,
                 config: EngineConfig = EngineConfig(), **kw) -> LLMEngine:
    cache = llama.create_cache(cfg, num_pages=config.num_pages, page_size=config.page_size,
                               dtype=config.kv_dtype or params["final_norm"].dtype)
    return cls(_maybe_fuse(params, config), LlamaForward(cfg), cache, vocab_size=cfg.vocab_size,
               max_model_len=config.max_model_len or cfg.max_position_embeddings,
               tokenizer=tokenizer, config=config, **kw)

  @classmethod
  def from_loaded(cls, model, config: EngineConfig = EngineConfig(), **kw) -> LLMEngine:
    """From ``jaxinfer.loader.load_model(...)``'s LoadedModel (config, params, tokenizer, forward)."""
    cfg = model.config
    cache = model.create_cache(config.num_pages, config.page_size, config.kv_dtype)
    # A sharded model (sharding.model.ShardedModel) brings its own hashable step forward.
    sharded_forward = getattr(model, "step_forward", None)
    forward = sharded_forward or (
        LlamaForward(cfg) if isinstance(cfg, llama.LlamaConfig) else model.forward)
    params = model.params
    if sharded_forward is None and isinstance(cfg, llama.LlamaConfig):
      params = _maybe_fuse(params, config)
    return cls(params, forward, cache, vocab_size=cfg.vocab_size,
               max_model_len=config.max_model_len or cfg.max_position_embeddings,
               tokenizer=model.tokenizer, config=config, **kw)

  # ---- requests ---------------------------------------------------------------------------------

  def make_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                   request_id: str | None = None) -> Request:
    """Validates and tokenizes a request without touching engine state (safe from any thread)."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
      raise InvalidRequestError(f"sampling params must be a SamplingParams, got {type(params)}")
    if isinstance(prompt, str):
      if not prompt:
        raise InvalidRequestError("empty prompt")
      if self.tokenizer is None:
        raise InvalidRequestError("this engine has no tokenizer: pass prompt token ids")
      ids = list(self.tokenizer.encode(prompt))
    else:
      try:
        ids = [int(t) for t in prompt]
      except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"a prompt is a string or a sequence of token ids: {e}") from None
    if not ids:
      raise InvalidRequestError("empty prompt")
    bad = [t for t in ids if not 0 <= t < self.vocab_size]
    if bad:
      raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size}) "
                                f"(the vocabulary); got {bad[:5]}")
    if len(ids) >= self.max_model_len:
      raise PromptTooLongError(f"prompt has {len(ids)} tokens; the model's context is "
                               f"{self.max_model_len} and must leave room for one generated token")
    if self.scheduler.pages_for(len(ids) + 1) > self.allocator.capacity:
      raise PromptTooLongError(
          f"prompt has {len(ids)} tokens; the KV cache holds at most "
          f"{self.allocator.capacity * self.page_size} tokens of one sequence")
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos)
    return Request(request_id or uuid.uuid4().hex, ids, params, self.clock(),
                   max_output_tokens=min(params.max_tokens, self.max_model_len - len(ids)),
                   stop_token_ids=stop_ids)

  def add_request(self, request: Request | str | Sequence[int],
                  params: SamplingParams | None = None, request_id: str | None = None) -> str:
    if not isinstance(request, Request):
      request = self.make_request(request, params, request_id)
    if request.request_id in self._requests:
      raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
    self._requests[request.request_id] = request
    self.scheduler.add(request)
    self.metrics.prompt_tokens.inc(len(request.prompt_token_ids))
    self._update_gauges()
    return request.request_id

  def abort(self, request_id: str) -> bool:
    """Cancels a request; its pages are free when this returns. False if it is not in the engine."""
    req = self._requests.pop(request_id, None)
    if req is None:
      return False
    self.scheduler.remove(req)
    req.status, req.finish_reason = RequestStatus.FINISHED, FinishReason.CANCELLED
    self.metrics.finished.labels(FinishReason.CANCELLED.value).inc()
    self._update_gauges()
    return True

  def has_unfinished(self) -> bool:
    return bool(self._requests)

  @property
  def num_unfinished(self) -> int:
    return len(self._requests)

  # ---- the step ---------------------------------------------------------------------------------

  def step(self) -> list[RequestOutput]:
    """Schedules and dispatches one step; returns the outputs of the step whose tokens reached the
    host during this call (with async scheduling, the previous one)."""
    t0 = time.perf_counter()
    plan = self.scheduler.schedule()
    outputs = [self._finish(r, r.finish_reason) for r in plan.finished]
    if plan.preempted:
      self.metrics.preemptions.inc(len(plan.preempted))
    previous, self._in_flight = self._in_flight, None
    if plan.chunks:
      self._in_flight = self._dispatch(plan.chunks, previous, t0)
    if previous is not None:
      outputs += self._collect(previous)
    if self._in_flight is not None and not self.config.async_scheduling:
      outputs += self._collect(self._in_flight)
      self._in_flight = None
    self._update_gauges()
    self.metrics.step_time.observe(time.perf_counter() - t0)
    return outputs

  def _dispatch(self, chunks, previous: _InFlight | None, t_start: float) -> _InFlight:
    # One pass over the chunks (this is the per-step host path: see StepStats.host_s).
    host, sampling_rows, rows = [], [], []
    num_tokens = num_decode = max_pages = 0
    greedy = decode_only = True
    for b, c in enumerate(chunks):
      req, n = c.request, c.num_tokens
      done = c.start + n == req.num_tokens                  # c.completes
      host.append((req.tokens(c.start, c.start + n), req.pages, c.start))
      num_tokens += n
      max_pages = max(max_pages, len(req.pages))
      if n != 1:
        decode_only = False
      if done:
        sampling_rows.append((req.params, req.num_output_tokens))
        greedy = greedy and req.params.greedy
        num_decode += n == 1
        rows.append(req)
      else:
        sampling_rows.append((None, 0))
        rows.append(None)
    shape = self.buckets.shape_for(num_tokens, len(chunks), max_pages)
    hb = build_host_batch(host, self.page_size, shape, sampling_rows)
    self.compiled_shapes.add(shape)
    prev_tokens = previous.tokens if previous is not None else self._no_prev
    forward = self.forward
    if self._decode_forward is not None and decode_only:
      forward = self._decode_forward
    elif self._prefill_forward is not None and not decode_only:
      forward = self._prefill_forward
    t_call = time.perf_counter()
    tokens, logprobs, self.cache = step_jit(self.params, hb.ints, prev_tokens, self.cache,
                                            forward=forward, shape=shape, greedy=greedy)
    t_called = time.perf_counter()
    for b, c in enumerate(chunks):
      c.request.num_computed += c.num_tokens
      if rows[b] is not None:
        rows[b].pending_rows.append(b)
    t_dispatched = time.perf_counter()
    stats = StepStats(shape, len(chunks), num_tokens, num_decode, host_s=t_dispatched - t_start,
                      call_s=t_called - t_call)
    self.num_steps += 1
    return _InFlight(tokens, logprobs, rows, stats, t_dispatched)

  def _collect(self, step: _InFlight) -> list[RequestOutput]:
    """Waits for a dispatched step's tokens and hands each to its request (unless the request
    finished or was cancelled meanwhile: its row was wasted work)."""
    t = time.perf_counter()
    tokens, logprobs = jax.device_get((step.tokens, step.logprobs))
    self.last_step = dataclasses.replace(step.stats, wait_s=time.perf_counter() - t)
    tokens, logprobs = tokens.tolist(), logprobs.tolist()   # Python scalars, once per step
    now = self.clock()
    outputs = []
    generated = 0
    for b, req in enumerate(step.rows):
      if req is None:
        continue
      req.pending_rows.pop(0)
      if req.finished:
        continue
      n = len(req.output_token_ids)
      out = self._append(req, tokens[b], logprobs[b], now)
      generated += len(req.output_token_ids) - n
      if out is not None:
        outputs.append(out)
    if generated:
      self.metrics.generated_tokens.inc(generated)
    return outputs

  def _append(self, req: Request, token: int, logprob: float, now: float) -> RequestOutput | None:
    if req.first_token_time is None:
      req.first_token_time = now
      self.metrics.ttft.observe(now - req.arrival_time)
    req.last_token_time = now
    if token in req.stop_token_ids:  # a stop id (or EOS) ends the output and is not part of it
      return self._finish(req, FinishReason.STOP)
    req.output_token_ids.append(token)
    req.output_logprobs.append(logprob)
    if self._detokenize(req, len(req.output_token_ids)):
      return self._finish(req, FinishReason.STOP)
    if len(req.output_token_ids) >= req.max_output_tokens:
      return self._finish(req, FinishReason.LENGTH)
    return self._delta(req, final=False)

  def _detokenize(self, req: Request, num_ids: int) -> bool:
    """Extends ``req.text`` with the text of the newest output ids; True when a stop string ended it.

    Incremental (vLLM's prefix/read offsets): each call decodes a short window, not the whole output,
    and decodes it with a few tokens of left context so tokenizers whose decoding depends on the
    previous token (leading-space markers) give the same text as a whole-sequence decode. Text
    ending in an incomplete UTF-8 character (U+FFFD) waits for the next token.
    """
    if self.tokenizer is None:
      return False
    ids = req.output_token_ids[:num_ids]
    prefix_text = self.tokenizer.decode(ids[req.prefix_offset:req.read_offset])
    new_text = self.tokenizer.decode(ids[req.prefix_offset:])
    if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
      return False
    prev = len(req.text)
    req.text += new_text[len(prefix_text):]
    req.prefix_offset, req.read_offset = req.read_offset, len(ids)
    stops = req.params.stop
    if not stops:
      return False
    search_from = max(0, prev - max(len(s) for s in stops) + 1)
    hits = [i for i in (req.text.find(s, search_from) for s in stops) if i >= 0]
    if hits:
      req.text = req.text[:min(hits)]
      req.text_final = True
      return True
    return False

  def _flush_text(self, req: Request) -> None:
    """At the end: whatever text is still held back (an incomplete character) is appended."""
    if self.tokenizer is None or req.text_final:
      return
    ids = req.output_token_ids
    prefix_text = self.tokenizer.decode(ids[req.prefix_offset:req.read_offset])
    new_text = self.tokenizer.decode(ids[req.prefix_offset:])
    req.text += new_text[len(prefix_text):]
    req.prefix_offset = req.read_offset = len(ids)

  def _stable_text_len(self, req: Request) -> int:
    """Text that can be streamed now: nothing that could be the start of a stop string."""
    text = req.text
    n = len(text)
    for s in req.params.stop:
      for k in range(min(len(s) - 1, n), 0, -1):
        if text[n - k:n] == s[:k]:
          n -= k
          break
    return max(n, req.num_text_sent)

  def _delta(self, req: Request, final: bool) -> RequestOutput | None:
    ids = tuple(req.output_token_ids[req.num_tokens_sent:])
    text_end = len(req.text) if final else self._stable_text_len(req)
    new_text = req.text[req.num_text_sent:text_end]
    if not ids and not new_text and not final:
      return None
    lps = tuple(req.output_logprobs[req.num_tokens_sent:]) if req.params.logprobs else None
    req.num_tokens_sent = len(req.output_token_ids)
    req.num_text_sent = text_end
    if not final:
      return RequestOutput(req.request_id, ids, lps, new_text, False,
                           num_prompt_tokens=len(req.prompt_token_ids))
    return RequestOutput(
        req.request_id, ids, lps, new_text, True, req.finish_reason,
        token_ids=tuple(req.output_token_ids), text=req.text,
        logprobs=tuple(req.output_logprobs) if req.params.logprobs else None,
        num_prompt_tokens=len(req.prompt_token_ids))

  def _finish(self, req: Request, reason: FinishReason) -> RequestOutput:
    if req.status is not RequestStatus.FINISHED:
      self.scheduler.remove(req)
    req.status, req.finish_reason = RequestStatus.FINISHED, reason
    self._flush_text(req)
    self._requests.pop(req.request_id, None)
    self.metrics.finished.labels(reason.value).inc()
    n = len(req.output_token_ids)
    if n > 1:
      self.metrics.tpot.observe((req.last_token_time - req.first_token_time) / (n - 1))
    return self._delta(req, final=True)

  def _update_gauges(self) -> None:
    self.metrics.queue_length.set(len(self.scheduler.waiting))
    self.metrics.running.set(len(self.scheduler.running))
    self.metrics.kv_pages_used.set(self.allocator.num_used)

  # ---- convenience ------------------------------------------------------------------------------

  def _decode_shapes(self) -> set[tuple[int, int, int]]:
    """Step shapes a decode-only step (n sequences, one token each) can take."""
    b = self.buckets
    return {b.shape_for(n, n, p) for n in range(1, b.seqs[-1] + 1) for p in b.pages
            if n <= b.tokens[-1]}

  def run_to_completion(self) -> dict[str, RequestOutput]:
    """Steps until every request has finished; returns each request's final output."""
    finals = {}
    while self.has_unfinished():
      for out in self.step():
        if out.finished:
          finals[out.request_id] = out
    return finals

  def warmup(self, shapes: Sequence[tuple[int, int, int]] | None = None,
             num_threads: int = 1, samplers: Sequence[bool] = (True, False)) -> None:
    """Compiles the step for ``shapes`` (default: every bucket combination) ahead of time, in the
    all-greedy variant and/or the sampling one (``samplers``: greedy flags); with ``num_threads``
    > 1 the XLA compilations run concurrently. The compiled executables land in the jit cache, so
    serving then never compiles for these shapes."""
    shapes = list(shapes or self.buckets.all_shapes())
    # steps with a prefill chunk take _prefill_forward when there is one; decode-only steps take
    # _decode_forward (decode shapes) when there is one, else self.forward
    forwards = {s: [self._prefill_forward or self.forward] for s in shapes}
    for s in set(shapes) & self._decode_shapes():
      if self._decode_forward is not None:
        forwards[s].append(self._decode_forward)
      elif self._prefill_forward is not None:
        forwards[s].append(self.forward)

    def compile_one(variant):
      shape, greedy, forward = variant
      hb = build_host_batch([], self.page_size, shape)
      step_jit.lower(self.params, hb.ints, self._no_prev, self.cache,
                     forward=forward, shape=shape, greedy=greedy).compile()
      return shape

    variants = [(s, g, f) for s in shapes for g in samplers for f in forwards[s]]
    if num_threads > 1:
      with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        self.compiled_shapes.update(pool.map(compile_one, variants))
    else:
      self.compiled_shapes.update(map(compile_one, variants))
