"""A small client of jaxinfer-serve.

  python -m jaxinfer.server.client --target=127.0.0.1:50051 --prompt="Hello" --max_tokens=32 --stream
  python -m jaxinfer.server.client --info | --health | --metrics
"""
from __future__ import annotations

import sys

import grpc
from absl import app, flags

from jaxinfer.server import jaxinfer_pb2 as pb
from jaxinfer.server import jaxinfer_pb2_grpc as pb_grpc

_TARGET = flags.DEFINE_string("target", "127.0.0.1:50051", "server address")
_PROMPT = flags.DEFINE_string("prompt", None, "prompt text")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "max generated tokens")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0: off")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus mass in (0, 1]")
_SEED = flags.DEFINE_integer("seed", None, "sampling seed")
_STOP = flags.DEFINE_multi_string("stop", [], "stop string (repeatable)")
_STREAM = flags.DEFINE_bool("stream", False, "print tokens as they arrive")
_LOGPROBS = flags.DEFINE_bool("logprobs", False, "print chosen-token logprobs")
_INFO = flags.DEFINE_bool("info", False, "print ModelInfo")
_HEALTH = flags.DEFINE_bool("health", False, "print Health")
_METRICS = flags.DEFINE_bool("metrics", False, "print the Prometheus metrics")
_TIMEOUT = flags.DEFINE_float("timeout_s", 600.0, "RPC deadline")


def make_request(prompt: str, *, max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=(), logprobs: bool = False
                 ) -> pb.GenerateRequest:
  sampling = pb.SamplingOptions(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, stop=list(stop), logprobs=logprobs)
  if seed is not None:
    sampling.seed = seed
  return pb.GenerateRequest(text=prompt, sampling=sampling)


def main(argv) -> None:
  del argv
  with grpc.insecure_channel(_TARGET.value) as channel:
    stub = pb_grpc.InferenceStub(channel)
    try:
      if _INFO.value:
        print(stub.ModelInfo(pb.ModelInfoRequest(), timeout=_TIMEOUT.value))
      if _HEALTH.value:
        print(stub.Health(pb.HealthRequest(), timeout=_TIMEOUT.value))
      if _METRICS.value:
        print(stub.Metrics(pb.MetricsRequest(), timeout=_TIMEOUT.value).prometheus_text)
      if _PROMPT.value is None:
        return
      req = make_request(_PROMPT.value, max_tokens=_MAX_TOKENS.value,
                         temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                         seed=_SEED.value, stop=_STOP.value, logprobs=_LOGPROBS.value)
      if _STREAM.value:
        for resp in stub.GenerateStream(req, timeout=_TIMEOUT.value):
          sys.stdout.write(resp.text)
          sys.stdout.flush()
          if resp.finished:
            print(f"\n[{pb.FinishReason.Name(resp.finish_reason)}]")
      else:
        resp = stub.Generate(req, timeout=_TIMEOUT.value)
        print(resp.text)
        print(f"[{pb.FinishReason.Name(resp.finish_reason)}; {len(resp.token_ids)} tokens]")
        if _LOGPROBS.value:
          print("logprobs:", [round(x, 4) for x in resp.logprobs])
    except grpc.RpcError as e:
      sys.exit(f"error: {e.code().name}: {e.details()}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
