"""gRPC server tests: a tiny random model served on loopback (free port), real gRPC clients."""
import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import urllib.request

import grpc
import portpicker
import pytest

from jaxinfer.engine import EngineConfig, EngineLoop, LLMEngine
from jaxinfer.engine.toy_model import ByteTokenizer, toy_config, toy_params
from jaxinfer.errors import (EngineUnavailableError, InvalidRequestError, RequestCancelledError,
                             ResourceExhaustedError)
from jaxinfer.server import jaxinfer_pb2 as pb
from jaxinfer.server import jaxinfer_pb2_grpc as pb_grpc
from jaxinfer.server.service import InferenceService, ServerThread, status_code

# Same model and step shape as tests/test_engine.py: one compile serves both files.
CFG = toy_config(max_position_embeddings=256)
PARAMS = toy_params(CFG)
BASE = EngineConfig(num_pages=33, page_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                    chunk_size=8, min_token_bucket=32, min_seq_bucket=8, min_page_bucket=32)
LONG = 100   # max_tokens of requests that must still be running when the test acts on them


class Served:
  def __init__(self, **overrides):
    self.engine = LLMEngine.from_llama(CFG, PARAMS, tokenizer=ByteTokenizer(),
                                       config=dataclasses.replace(BASE, **overrides))
    self.loop = EngineLoop(self.engine).start()
    self.server = ServerThread(InferenceService(self.loop, model_name="toy"),
                               port=portpicker.pick_unused_port()).start()
    self.channel = grpc.insecure_channel(self.server.address)
    self.stub = pb_grpc.InferenceStub(self.channel)

  def raw(self, method: str):
    """A unary call that sends raw bytes, for requests the generated stubs cannot express."""
    return self.channel.unary_unary(f"/jaxinfer.v1.Inference/{method}",
                                    request_serializer=lambda b: b,
                                    response_deserializer=pb.GenerateResponse.FromString)

  def close(self):
    self.channel.close()
    self.server.stop(grace=None)
    self.loop.shutdown()


@pytest.fixture(scope="module")
def served():
  s = Served(max_queued_requests=1000)
  yield s
  s.close()


def req(text="hello", **sampling):
  sampling.setdefault("max_tokens", 8)
  return pb.GenerateRequest(text=text, sampling=pb.SamplingOptions(**sampling))


def assert_idle_and_free(s: Served):
  assert s.loop.wait_idle(timeout=60)
  assert s.engine.allocator.num_used == 0


def test_generate_stream_health_info_metrics(served):
  r = served.stub.Generate(req("hi there", max_tokens=10, ignore_eos=True, logprobs=True))
  assert len(r.token_ids) == 10 and len(r.logprobs) == 10 and r.finish_reason == pb.LENGTH
  assert r.num_prompt_tokens == len(ByteTokenizer().encode("hi there"))
  chunks = list(served.stub.GenerateStream(req("hi there", max_tokens=10, ignore_eos=True)))
  assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
  assert [t for c in chunks for t in c.token_ids] == list(r.token_ids)      # greedy: same tokens
  assert "".join(c.text for c in chunks) == r.text
  h = served.stub.Health(pb.HealthRequest())
  assert h.status == pb.HealthResponse.SERVING
  info = served.stub.ModelInfo(pb.ModelInfoRequest())
  assert (info.vocab_size, info.max_model_len, info.page_size, info.max_batch) == (259, 256, 4, 8)
  text = served.stub.Metrics(pb.MetricsRequest()).prometheus_text
  assert "jaxinfer_time_to_first_token_seconds_count" in text and "jaxinfer_kv_pages_used" in text
  assert_idle_and_free(served)


UNKNOWN_FIELD = req("hi").SerializeToString() + b"\xf8\x06\x01"           # field 111, varint 1
BAD_UTF8 = b"\x12\x02\xff\xfe"                                            # text = b"\xff\xfe"


@pytest.mark.parametrize("request_or_bytes,code,message", [
    (req(""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 300)), grpc.StatusCode.INVALID_ARGUMENT,
     "context"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 200)), grpc.StatusCode.INVALID_ARGUMENT,
     "KV cache"),
    (req(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (req(max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (req(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (req(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (req(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 9999])), grpc.StatusCode.INVALID_ARGUMENT,
     "token ids must be in"),
    (UNKNOWN_FIELD, grpc.StatusCode.INVALID_ARGUMENT, "unknown fields"),
    (BAD_UTF8, grpc.StatusCode.INVALID_ARGUMENT, "UTF-8"),
])
def test_bad_input_gets_its_status_while_other_requests_keep_running(served, request_or_bytes,
                                                                     code, message):
  stream = served.stub.GenerateStream(req("keep going", max_tokens=LONG, ignore_eos=True))
  first = next(stream)
  with pytest.raises(grpc.RpcError) as e:
    if isinstance(request_or_bytes, bytes):
      served.raw("Generate")(request_or_bytes)
    else:
      served.stub.Generate(request_or_bytes)
  assert e.value.code() == code and message in e.value.details()
  with pytest.raises(grpc.RpcError) as e:   # the streaming RPC validates the same way
    if isinstance(request_or_bytes, bytes):
      served.channel.unary_stream("/jaxinfer.v1.Inference/GenerateStream",
                                  request_serializer=lambda b: b)(request_or_bytes).next()
    else:
      next(served.stub.GenerateStream(request_or_bytes))
  assert e.value.code() == code
  rest = list(stream)
  assert rest[-1].finished and len(first.token_ids) + sum(len(c.token_ids) for c in rest) == LONG
  assert_idle_and_free(served)


def test_client_cancelling_mid_stream_frees_the_request(served):
  cancelled_before = served.engine.metrics.finished.labels("cancelled")._value.get()
  stream = served.stub.GenerateStream(req("cancel me", max_tokens=LONG, ignore_eos=True))
  assert not next(stream).finished
  stream.cancel()
  with pytest.raises(grpc.RpcError) as e:
    list(stream)
  assert e.value.code() == grpc.StatusCode.CANCELLED
  assert_idle_and_free(served)
  assert served.engine.metrics.finished.labels("cancelled")._value.get() == cancelled_before + 1
  assert served.stub.Generate(req("still serving", max_tokens=3)).token_ids


def test_client_vanishing_frees_the_request(served):
  cancelled_before = served.engine.metrics.finished.labels("cancelled")._value.get()
  channel = grpc.insecure_channel(served.server.address)
  stream = pb_grpc.InferenceStub(channel).GenerateStream(req("bye", max_tokens=LONG,
                                                             ignore_eos=True))
  assert not next(stream).finished
  channel.close()                                   # the client goes away mid-stream
  assert_idle_and_free(served)
  assert served.engine.metrics.finished.labels("cancelled")._value.get() == cancelled_before + 1
  assert served.stub.Generate(req("still serving", max_tokens=3)).token_ids


def test_300_concurrent_grpc_requests_all_answered_once(served):
  rng = random.Random(0)
  futures = {}
  for i in range(300):
    text = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 20)))
    r = req(text, max_tokens=rng.randint(1, 6), temperature=rng.choice([0.0, 0.8]),
            top_p=rng.choice([1.0, 0.7]), top_k=rng.choice([0, 20]), logprobs=rng.random() < 0.5)
    r.request_id = f"r{i}"
    futures[r.request_id] = (r, served.stub.Generate.future(r))
  ids = []
  for rid, (r, f) in futures.items():
    resp = f.result()
    ids.append(resp.request_id)
    assert len(resp.token_ids) <= r.sampling.max_tokens  # 0 when EOS comes first
    assert len(resp.logprobs) == (len(resp.token_ids) if r.sampling.logprobs else 0)
  assert sorted(ids) == sorted(futures)                          # every request, none duplicated
  assert_idle_and_free(served)


def test_queue_full_is_resource_exhausted_and_shutdown_is_graceful():
  s = Served(max_queued_requests=2)
  try:
    streams = [s.stub.GenerateStream(req(f"long {i}", max_tokens=LONG, ignore_eos=True))
               for i in range(2)]
    firsts = [next(st) for st in streams]                         # both admitted and running
    with pytest.raises(grpc.RpcError) as e:
      s.stub.Generate(req("one too many"))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Graceful stop while both streams are in flight: they finish, later RPCs are refused.
    stopper = threading.Thread(target=s.server.stop, kwargs={"grace": 120})
    stopper.start()
    for first, st in zip(firsts, streams):
      rest = list(st)
      assert rest[-1].finished
      assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == LONG
    stopper.join()
    with pytest.raises(grpc.RpcError) as e:
      s.stub.Health(pb.HealthRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
  finally:
    s.channel.close()
    s.loop.shutdown()
  with pytest.raises(EngineUnavailableError):
    s.loop.submit("late", None, lambda item: None)


def test_status_code_mapping():
  assert status_code(InvalidRequestError("x")) == grpc.StatusCode.INVALID_ARGUMENT
  assert status_code(ResourceExhaustedError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
  assert status_code(RequestCancelledError("x")) == grpc.StatusCode.CANCELLED
  assert status_code(EngineUnavailableError("x")) == grpc.StatusCode.UNAVAILABLE
  assert status_code(RuntimeError("x")) == grpc.StatusCode.INTERNAL


def test_jaxinfer_serve_binary_serves_and_shuts_down_on_sigterm():
  port, metrics_port = portpicker.pick_unused_port(), portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
      [sys.executable, "-m", "jaxinfer.server.main", "--model=toy", f"--port={port}",
       "--max_batch=8", "--max_num_batched_tokens=32", "--chunk_size=16", "--kv_pages=64",
       "--page_size=8", "--max_model_len=64", f"--metrics_port={metrics_port}"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  try:
    lines = []
    for line in proc.stdout:                    # bounded: the process prints this once, or exits
      lines.append(line)
      if "jaxinfer-serve: serving" in line:
        break
    assert f"127.0.0.1:{port}" in lines[-1], "".join(lines)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
      stub = pb_grpc.InferenceStub(channel)
      assert stub.Health(pb.HealthRequest()).status == pb.HealthResponse.SERVING
      r = stub.Generate(req("hi", max_tokens=4, ignore_eos=True))
      assert len(r.token_ids) == 4
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=60) as resp:
      text = resp.read().decode()
    assert 'jaxinfer_requests_finished_total{reason="length"} 1.0' in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
