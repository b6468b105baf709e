"""jaxinfer-serve: the gRPC serving binary.

  jaxinfer-serve --model=/path/to/model.gguf --port=50051 --max_batch=64 --chunk_size=256
  jaxinfer-serve --model=toy            # a tiny random model with a byte tokenizer, for smoke tests

Serves jaxinfer.v1.Inference (server/jaxinfer.proto) on --host (127.0.0.1 unless told otherwise);
Prometheus metrics over HTTP on --metrics_port (0: off; always available through the Metrics RPC).
SIGTERM/SIGINT shut down gracefully: new RPCs are refused, those in flight get --grace_s to finish.
"""
from __future__ import annotations

import os
import signal
import threading

import jax.numpy as jnp
from absl import app, flags, logging

from jaxinfer.engine import EngineConfig, EngineLoop, LLMEngine
from jaxinfer.server.service import InferenceService, ServerThread

_MODEL = flags.DEFINE_string("model", "default",
                             "'default' (embedded SmolLM2-135M GGUF), 'toy' (tiny random model), or "
                             "a .gguf file / HF folder / jaxinfer orbax folder")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to bind")
_PORT = flags.DEFINE_integer("port", 50051, "gRPC port (0: pick a free one)")
_METRICS_PORT = flags.DEFINE_integer("metrics_port", 0, "Prometheus HTTP port (0: off)")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "max sequences in one step")
_CHUNK = flags.DEFINE_integer("chunk_size", 256, "max prefill tokens of one request per step")
_TOKENS = flags.DEFINE_integer("max_num_batched_tokens", 512, "token budget of one step")
_KV_PAGES = flags.DEFINE_integer("kv_pages", 2048, "KV-cache pages (page 0 is reserved)")
_PAGE = flags.DEFINE_integer("page_size", 16, "tokens per KV page")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", "auto", ["auto", "bf16", "fp8"],
                              "KV-cache storage; auto: the weights' dtype")
_MAX_LEN = flags.DEFINE_integer("max_model_len", 0, "context limit (0: the model's)")
_MAX_QUEUED = flags.DEFINE_integer("max_queued", 4096, "requests in flight before "
                                   "RESOURCE_EXHAUSTED")
_GRACE = flags.DEFINE_float("grace_s", 10.0, "seconds in-flight RPCs get at shutdown")
_WARMUP = flags.DEFINE_bool("warmup", False, "compile every step-shape bucket combination before "
                            "serving (concurrently; many shapes with the default ladders)")


def build_engine(model: str, config: EngineConfig) -> tuple[LLMEngine, str]:
  if model == "toy":
    from jaxinfer.engine.toy_model import ByteTokenizer, toy_config, toy_params
    cfg = toy_config()
    return LLMEngine.from_llama(cfg, toy_params(cfg), tokenizer=ByteTokenizer(), config=config), "toy"
  from jaxinfer.loader import load_model
  loaded = load_model(None if model == "default" else model)
  return LLMEngine.from_loaded(loaded, config), loaded.source


def main(argv) -> None:
  del argv
  kv_dtype = {"auto": None, "bf16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn}[_KV_DTYPE.value]
  config = EngineConfig(num_pages=_KV_PAGES.value, page_size=_PAGE.value,
                        max_num_seqs=_MAX_BATCH.value, max_num_batched_tokens=_TOKENS.value,
                        chunk_size=_CHUNK.value, max_model_len=_MAX_LEN.value or None,
                        kv_dtype=kv_dtype, max_queued_requests=_MAX_QUEUED.value)
  engine, name = build_engine(_MODEL.value, config)
  if _WARMUP.value:
    engine.warmup(num_threads=os.cpu_count() or 1)
  loop = EngineLoop(engine).start()
  server = ServerThread(InferenceService(loop, model_name=name), host=_HOST.value,
                        port=_PORT.value).start()
  if _METRICS_PORT.value:
    import prometheus_client
    prometheus_client.start_http_server(_METRICS_PORT.value, addr=_HOST.value,
                                        registry=engine.metrics.registry)
    logging.info("metrics on http://%s:%d/metrics", _HOST.value, _METRICS_PORT.value)
  logging.info("serving %s on %s", name, server.address)
  print(f"jaxinfer-serve: serving {name} on {server.address}", flush=True)
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  stop.wait()
  logging.info("shutting down (grace %.1fs)", _GRACE.value)
  server.stop(_GRACE.value)
  loop.shutdown()


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
