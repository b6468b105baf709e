"""The jaxinfer.v1.Inference gRPC service (grpc.aio) over an EngineLoop, and a thread to serve it.

Requests are parsed by the service itself (not the generated deserializer) so malformed bytes,
invalid UTF-8 and unknown fields come back as INVALID_ARGUMENT with a message instead of a generic
error. Status codes: INVALID_ARGUMENT (bad request, prompt too long), RESOURCE_EXHAUSTED (queue
full), CANCELLED (request cancelled), UNAVAILABLE (shutting down / engine failed), INTERNAL (bug).
A client that cancels or disconnects cancels its handler task, which aborts the engine request and
frees its KV pages before the next engine step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator

import grpc
import numpy as np
from google.protobuf import message as pb_message
from google.protobuf import unknown_fields

from jaxinfer.engine import EngineLoop, FinishReason, RequestOutput
from jaxinfer.errors import (EngineUnavailableError, InvalidRequestError, JaxinferError,
                             RequestCancelledError, ResourceExhaustedError)
from jaxinfer.sampling import SamplingParams
from jaxinfer.server import jaxinfer_pb2 as pb

SERVICE_NAME = "jaxinfer.v1.Inference"
DEFAULT_MAX_TOKENS = 64

_FINISH = {FinishReason.STOP: pb.STOP, FinishReason.LENGTH: pb.LENGTH}


def status_code(e: Exception) -> grpc.StatusCode:
  if isinstance(e, InvalidRequestError):
    return grpc.StatusCode.INVALID_ARGUMENT
  if isinstance(e, ResourceExhaustedError):
    return grpc.StatusCode.RESOURCE_EXHAUSTED
  if isinstance(e, RequestCancelledError):
    return grpc.StatusCode.CANCELLED
  if isinstance(e, EngineUnavailableError):
    return grpc.StatusCode.UNAVAILABLE
  return grpc.StatusCode.INTERNAL


@dataclasses.dataclass(frozen=True)
class _Unparsable:
  message: str


def _parse_generate_request(data: bytes) -> pb.GenerateRequest | _Unparsable:
  try:
    return pb.GenerateRequest.FromString(data)
  except pb_message.DecodeError as e:
    return _Unparsable(f"malformed GenerateRequest (invalid UTF-8 in a string field?): {e}")


def _unknown_field_numbers(msg) -> list[int]:
  numbers = [f.field_number for f in unknown_fields.UnknownFieldSet(msg)]
  for field, value in msg.ListFields():
    if field.message_type is not None and not field.is_repeated:
      numbers += _unknown_field_numbers(value)
  return numbers


def request_to_engine_args(req: pb.GenerateRequest) -> tuple[str | list[int], SamplingParams]:
  """Raises InvalidRequestError for anything the engine would not accept."""
  unknown = _unknown_field_numbers(req)
  if unknown:
    raise InvalidRequestError(f"unknown fields (numbers {sorted(unknown)}) in GenerateRequest")
  kind = req.WhichOneof("prompt")
  if kind is None:
    raise InvalidRequestError("prompt is empty: set `text` or `token_ids`")
  prompt = req.text if kind == "text" else list(req.token_ids.ids)
  s = req.sampling
  if any(t < 0 for t in s.stop_token_ids):
    raise InvalidRequestError("stop_token_ids must be >= 0")
  params = SamplingParams(
      max_tokens=s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
      temperature=float(s.temperature), top_k=int(s.top_k),
      top_p=float(np.float32(s.top_p)) if s.HasField("top_p") else 1.0,
      seed=s.seed if s.HasField("seed") else None, stop_token_ids=tuple(s.stop_token_ids),
      stop=tuple(s.stop), logprobs=s.logprobs, ignore_eos=s.ignore_eos)
  return prompt, params


class InferenceService:

  def __init__(self, engine_loop: EngineLoop, *, model_name: str, architecture: str = "llama"):
    self.loop = engine_loop
    self.model_name = model_name
    self.architecture = architecture

  async def _run(self, raw, context) -> AsyncIterator[tuple[str, RequestOutput]]:
    if isinstance(raw, _Unparsable):
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, raw.message)
    aio_loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    try:
      prompt, params = request_to_engine_args(raw)
      rid = self.loop.submit(prompt, params,
                             lambda item: aio_loop.call_soon_threadsafe(queue.put_nowait, item))
    except JaxinferError as e:
      await context.abort(status_code(e), str(e))
    done = False
    try:
      while True:
        item = await queue.get()
        if isinstance(item, Exception):
          done = True
          await context.abort(status_code(item), str(item))
        done = item.finished
        yield raw.request_id, item
        if done:
          return
    finally:
      if not done:  # the client cancelled or went away: free the request's pages now
        self.loop.abort(rid)

  async def generate(self, raw, context) -> pb.GenerateResponse:
    async for request_id, out in self._run(raw, context):
      if out.finished:
        return pb.GenerateResponse(request_id=request_id, text=out.text,
                                   token_ids=out.token_ids, logprobs=out.logprobs or (),
                                   finish_reason=_FINISH[out.finish_reason],
                                   num_prompt_tokens=out.num_prompt_tokens)
    await context.abort(grpc.StatusCode.INTERNAL, "request ended without a final output")

  async def generate_stream(self, raw, context) -> AsyncIterator[pb.GenerateStreamResponse]:
    async for request_id, out in self._run(raw, context):
      yield pb.GenerateStreamResponse(
          request_id=request_id, text=out.new_text, token_ids=out.new_token_ids,
          logprobs=out.new_logprobs or (), finished=out.finished,
          finish_reason=_FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
          num_prompt_tokens=out.num_prompt_tokens)

  async def health(self, request, context) -> pb.HealthResponse:
    sched = self.loop.engine.scheduler
    status = pb.HealthResponse.SERVING if self.loop.healthy else pb.HealthResponse.NOT_SERVING
    return pb.HealthResponse(status=status, running_requests=len(sched.running),
                             waiting_requests=len(sched.waiting))

  async def model_info(self, request, context) -> pb.ModelInfoResponse:
    eng = self.loop.engine
    cfg = eng.config
    fwd_cfg = getattr(eng.forward, "cfg", None)
    return pb.ModelInfoResponse(
        model=self.model_name, architecture=self.architecture, vocab_size=eng.vocab_size,
        max_model_len=eng.max_model_len, num_layers=eng.cache.num_layers,
        hidden_size=getattr(fwd_cfg, "hidden_size", 0), kv_cache_dtype=str(eng.cache.dtype),
        kv_pages=eng.cache.num_pages, page_size=eng.page_size, max_batch=cfg.max_num_seqs,
        chunk_size=cfg.chunk_size, max_num_batched_tokens=cfg.max_num_batched_tokens)

  async def metrics(self, request, context) -> pb.MetricsResponse:
    return pb.MetricsResponse(prometheus_text=self.loop.engine.metrics.exposition().decode())

  def handler(self) -> grpc.GenericRpcHandler:
    ser = lambda m: m.SerializeToString()
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Generate": grpc.unary_unary_rpc_method_handler(
            self.generate, request_deserializer=_parse_generate_request, response_serializer=ser),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            self.generate_stream, request_deserializer=_parse_generate_request,
            response_serializer=ser),
        "Health": grpc.unary_unary_rpc_method_handler(
            self.health, request_deserializer=pb.HealthRequest.FromString,
            response_serializer=ser),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            self.model_info, request_deserializer=pb.ModelInfoRequest.FromString,
            response_serializer=ser),
        "Metrics": grpc.unary_unary_rpc_method_handler(
            self.metrics, request_deserializer=pb.MetricsRequest.FromString,
            response_serializer=ser),
    })


def format_address(host: str, port: int) -> str:
  return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ServerThread:
  """Serves an InferenceService on its own thread and asyncio loop. ``stop(grace)`` is graceful:
  new RPCs are refused (UNAVAILABLE) while those in flight get ``grace`` seconds to finish."""

  def __init__(self, service: InferenceService, *, host: str = "127.0.0.1", port: int = 0):
    self.service = service
    self.host = host
    self._requested_port = port
    self.port: int | None = None
    self._ready = threading.Event()
    self._error: BaseException | None = None
    self._aio_loop: asyncio.AbstractEventLoop | None = None
    self._server: grpc.aio.Server | None = None
    self._stop_requested: asyncio.Event | None = None
    self._grace: float | None = None
    self._thread = threading.Thread(target=self._main, name="jaxinfer-grpc", daemon=True)

  @property
  def address(self) -> str:
    return format_address(self.host, self.port)

  def start(self) -> ServerThread:
    self._thread.start()
    self._ready.wait()
    if self._error is not None:
      raise self._error
    return self

  def _main(self) -> None:
    try:
      asyncio.run(self._serve())
    except BaseException as e:  # surfaced by start()
      self._error = e
      self._ready.set()

  async def _serve(self) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((self.service.handler(),))
    self.port = server.add_insecure_port(format_address(self.host, self._requested_port))
    if not self.port:
      raise OSError(f"cannot bind {format_address(self.host, self._requested_port)}")
    await server.start()
    self._stop_requested = asyncio.Event()
    self._server, self._aio_loop = server, asyncio.get_running_loop()
    self._ready.set()
    await self._stop_requested.wait()
    await server.stop(self._grace)

  def stop(self, grace: float | None = 5.0) -> None:
    if self._server is not None and self._thread.is_alive():
      self._grace = grace
      self._aio_loop.call_soon_threadsafe(self._stop_requested.set)
    self._thread.join()

  def wait(self) -> None:
    self._thread.join()
