"""The notebook-facing API: ``LLM(model=...).generate(prompts, SamplingParams(...))`` and the
streaming iterator ``LLM.stream(prompt, SamplingParams(...))``, both on the serving engine
(jaxinfer.engine: continuous batching with chunked prefill over a paged KV cache), in-process — no
server needed."""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import jax
from tqdm import tqdm

from jaxinfer.compilation_cache import enable_compilation_cache
from jaxinfer.engine import EngineConfig, LLMEngine, RequestOutput
from jaxinfer.errors import InvalidRequestError
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.models import llama
from jaxinfer.outputs import GenerationOutput
from jaxinfer.sampling import SamplingParams

if TYPE_CHECKING:
  from sharding.config import ParallelConfig

_CPU_KV_BYTES = 128 << 20
_GPU_KV_FRACTION = 0.5   # of the device memory free after loading the weights


class LLM:
  """A loaded model ready to generate. ``model``: None (embedded default), a .gguf file, a HF folder,
  a jaxinfer orbax folder, or an already loaded ``LoadedModel``.

  ``prefill_chunk`` is the step's token budget (prefill chunks and decode tokens together),
  ``max_batch`` the most sequences in one step. The KV cache takes ``kv_cache_bytes`` (default: half
  the free accelerator memory, 128 MiB on CPU); ``engine_config`` overrides all of these.
  ``parallel`` places the model on a device mesh (tensor/pipeline/expert parallel; see sharding/);
  with ``dp`` > 1 it serves dp independent replicas (``sharding.replicas``), each KV cache sized as
  one engine's. On one device a Llama's q/k/v and gate/up projections are fused into one weight each
  (``llama.fuse_projections``; ``self.model.params`` holds that layout, ``llama.unfuse_projections``
  gives the checkpoint one back).
  """

  def __init__(self, model: str | LoadedModel | None = None, *, dtype=None, page_size: int = 16,
               prefill_chunk: int = 512, max_batch: int = 64, kv_dtype=None,
               kv_cache_bytes: int | None = None, engine_config: EngineConfig | None = None,
               parallel: ParallelConfig | None = None):
    enable_compilation_cache()
    self.model = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype)
    replicas = None
    if parallel is not None and parallel.dp > 1:  # dp independent engine replicas
      from sharding.replicas import shard_replicas
      replicas = shard_replicas(self.model, parallel)
      self.model = replicas[0]
    elif parallel is not None:
      from sharding.model import shard_model
      self.model = shard_model(self.model, parallel)
    elif (self.model.architecture == "llama" and llama.can_fuse_projections(self.model.params)
          and (engine_config is None or engine_config.fuse_projections)):
      # Fused here rather than in the engine so the unfused weights are not kept alive beside them.
      self.model = dataclasses.replace(self.model, params=llama.fuse_projections(self.model.params))
    self.tokenizer = self.model.tokenizer
    self.page_size = page_size
    self.prefill_chunk = prefill_chunk
    if engine_config is None:
      engine_config = EngineConfig(
          num_pages=self._num_pages(page_size, kv_dtype, kv_cache_bytes), page_size=page_size,
          max_num_seqs=max_batch, max_num_batched_tokens=max(prefill_chunk, max_batch),
          chunk_size=prefill_chunk, kv_dtype=kv_dtype,
          # On accelerators sequences up to 1024 tokens share one page-table width (fewer compiled
          # shapes; the decode kernel skips pages past each sequence's length). On CPU the
          # reference attention pays for every page in the table, so the ladder starts small.
          min_page_bucket=8 if jax.default_backend() == "cpu" else max(8, 1024 // page_size))
    if replicas is not None:
      from sharding.replicas import DataParallelEngine
      self.engine = DataParallelEngine.from_replicas(replicas, engine_config)
    else:
      self.engine = LLMEngine.from_loaded(self.model, engine_config)
    self._inbox: dict[str, collections.deque[RequestOutput]] = {}

  def _num_pages(self, page_size: int, kv_dtype, kv_cache_bytes: int | None) -> int:
    page_bytes = page_size * self.model.create_cache(2, page_size, kv_dtype).nbytes_per_token()
    if kv_cache_bytes is None:
      stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
      kv_cache_bytes = (_CPU_KV_BYTES if not stats else
                        int(_GPU_KV_FRACTION * (stats["bytes_limit"] - stats["bytes_in_use"])))
    one_full_sequence = -(-self.model.max_context // page_size) + 1
    return max(kv_cache_bytes // page_bytes, one_full_sequence + 1)

  def encode_prompt(self, prompt: str | Sequence[int] | Sequence[dict]) -> list[int]:
    """A string, token ids, or a chat (list of {'role', 'content'} messages)."""
    if isinstance(prompt, str):
      if not prompt:
        raise InvalidRequestError("empty prompt")
      return self._tok().encode(prompt)
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
      text = self._tok().apply_chat_template(prompt, add_generation_prompt=True)
      return self._tok().encode(text, add_special_tokens=False)
    if all(isinstance(t, int) for t in prompt):
      return prompt
    raise InvalidRequestError("a prompt is a string, a list of token ids, or a list of chat messages")

  def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
               *, use_tqdm: bool = True) -> list[GenerationOutput]:
    """Generates for one prompt or a list of prompts (strings, token id lists or chats), all batched
    together by the engine; outputs in prompt order."""
    single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict)))
    prompts = [prompts] if single else list(prompts)
    if not prompts:
      raise InvalidRequestError("no prompts given")
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
      sampling_params = [sampling_params or SamplingParams()] * len(prompts)
    if len(sampling_params) != len(prompts):
      raise InvalidRequestError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
    # Validate every request before any is queued, so a bad one leaves the engine untouched.
    requests = [self.engine.make_request(self.encode_prompt(p), sp)
                for p, sp in zip(prompts, sampling_params)]
    finals: dict[str, RequestOutput] = {}
    with tqdm(total=len(requests), desc="generating", unit="prompt", disable=not use_tqdm) as bar:
      for r in requests:
        self._submit(r)
      try:
        while len(finals) < len(requests):
          for r in requests:
            if r.request_id not in finals:
              for out in self._drain(r.request_id):
                if out.finished:
                  finals[r.request_id] = out
                  bar.update()
          if len(finals) < len(requests):
            self._pump()
      finally:
        for r in requests:
          self._forget(r.request_id)
    return [GenerationOutput(p if isinstance(p, str) else None, r.prompt_token_ids,
                             finals[r.request_id].text, list(finals[r.request_id].token_ids),
                             finals[r.request_id].finish_reason.value,
                             list(finals[r.request_id].logprobs)
                             if finals[r.request_id].logprobs is not None else None)
            for p, r in zip(prompts, requests)]

  def stream(self, prompt, sampling_params: SamplingParams | None = None
             ) -> Iterator[RequestOutput]:
    """Yields the request's outputs as the engine produces them: ``new_token_ids`` / ``new_text``
    per step, the last with ``finished`` set. Several streams (and ``generate``) can be consumed
    interleaved; closing the iterator early cancels the request and frees its KV pages."""
    request = self.engine.make_request(self.encode_prompt(prompt), sampling_params)
    self._submit(request)
    rid = request.request_id
    try:
      while True:
        for out in self._drain(rid):
          yield out
          if out.finished:
            return
        self._pump()
    finally:
      self._forget(rid)

  def _submit(self, request) -> None:
    self._inbox[request.request_id] = collections.deque()
    self.engine.add_request(request)

  def _drain(self, rid: str) -> list[RequestOutput]:
    box = self._inbox[rid]
    items = list(box)
    box.clear()
    return items

  def _forget(self, rid: str) -> None:
    self._inbox.pop(rid, None)
    self.engine.abort(rid)   # no-op when it already finished

  def _pump(self) -> None:
    """One engine step; each output goes to its request's inbox."""
    for out in self.engine.step():
      box = self._inbox.get(out.request_id)
      if box is not None:
        box.append(out)

  def _tok(self):
    if self.tokenizer is None:
      raise InvalidRequestError("this checkpoint has no tokenizer: pass token ids")
    return self.tokenizer
