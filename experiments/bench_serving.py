"""Serving benchmark: concurrency sweep and Poisson arrivals through the jaxinfer engine, and the same
closed-loop sweep through HF transformers (static cache) as the peer.

  # on the GPU machine: one process per framework, one after the other (never overlapped: each
  # would contend for the GPU and the host cores of the other), then the report:
  python3 experiments/bench_serving.py --engine=hf  --out=$OUT/hf.json
  python3 experiments/bench_serving.py --engine=jax --out=$OUT/jax.json
  python3 experiments/bench_serving.py --engine=report --jax_json=... --hf_json=... --out=...

HF transformers auto-compiles the decode step when given a static cache; --hf_compile=false (the
default) passes ``disable_compile=True`` so the timed runs are eager and compile-free; with
--hf_compile the warm-up uses the timed lengths so the compiled graphs are reused.

Closed loop at concurrency c: c users, each sends its next request when the previous one finishes,
until ``requests_per_user * c`` requests are done. Poisson: open-loop arrivals at --poisson_rate.
Requests have --input_len random prompt tokens (a prompt set read with grain when --prompts names a
file of whitespace-separated token ids, one prompt a line) and generate exactly --output_len tokens
(ignore_eos). Reported per level: TTFT/TPOT/ITL p50/p99, output tokens/s per user and per GPU; the
report plots throughput per GPU against tokens/s per user (the Pareto view of the seeds).

The batch-1 roofline: a decode step must read every weight once (the embedding table only by rows),
so its floor is weight bytes over the device-to-device bandwidth measured in the same run.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import os
import threading
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

from experiments.gpu_trace import busy_ns, gpu_kernel_events, load_trace

_ENGINE = flags.DEFINE_enum("engine", "jax", ["jax", "hf", "report", "profile", "batch1"],
                            "what to run; profile: the batch-1 decode step, timed in parts and "
                            "broken down per GPU kernel; batch1: the engine's batch-1 decode step "
                            "for each of --batch1_variants in one process (before/after)")
_WEIGHTS = flags.DEFINE_enum("weights", "bf16", ["bf16", "fp8", "nvfp4", "nvfp4_fp8"],
                             "jax weights: bf16; fp8 (W8A8: E4M3 layer projections with "
                             "per-channel scales, dynamic per-row activation scales; embedding, "
                             "norms and LM head bf16); nvfp4 (W4A16 NVFP4 layer projections in the "
                             "kernel layout, llama.quantize_projections_nvfp4); nvfp4_fp8 (NVFP4 "
                             "for steps of <= --nvfp4_max_rows tokens, i.e. decode, FP8 for "
                             "prefill steps: both forms kept)")
_FP8_LM_HEAD = flags.DEFINE_bool("fp8_lm_head", False, "jax, --weights=fp8 / nvfp4_fp8: the LM head "
                                 "as an FP8 weight too (1.05 GB -> 0.53 GB read per decode step)")
_NVFP4_MAX_ROWS = flags.DEFINE_integer("nvfp4_max_rows", 64, "jax, --weights=nvfp4_fp8: the largest "
                                       "step (tokens) that takes the NVFP4 form")
_FUSE = flags.DEFINE_bool("fuse_projections", True, "jax: wq|wk|wv and w_gate|w_up as one GEMM each "
                          "(llama.fuse_projections, what the engine does on one device)")
_FP8_QUANT_IN_NORM = flags.DEFINE_bool("fp8_quant_in_norm", True, "jax, --weights=fp8: the norms "
                                        "before wqkv / w_gate_up emit the E4M3 rows those FP8 "
                                        "projections take (kernels/add_rms_norm_fp8: one kernel "
                                        "for three)")
_FP8_SCALE_IN_NORM = flags.DEFINE_bool("fp8_scale_in_norm", False, "jax, --weights=fp8: the norms "
                                        "after wo / w_down apply those FP8 projections' output "
                                        "scales (one kernel fewer each)")
_FP8_SCALE_IN_NORM_MIN = flags.DEFINE_integer("fp8_scale_in_norm_min_tokens", 0, "jax: "
                                              "--fp8_scale_in_norm only in steps of at least "
                                              "this many tokens (e.g. 128: prefill steps)")
_FUSED_ROPE_KV = flags.DEFINE_bool("fused_rope_kv", False, "jax: RoPE + K/V cache write as one "
                                   "kernel per layer (kernels/rope_kv_write.py; fused projections)")
_FP8_ACT_QUANT = flags.DEFINE_bool("fp8_act_quant", False, "jax, FP8 weights: wo / w_down inputs "
                                   "quantized by one kernel each, the SwiGLU in w_down's "
                                   "(kernels/fp8_act_quant.py)")
_FP8_SPLIT_K = flags.DEFINE_integer("fp8_split_k_max_rows", None, "jax: ops.FP8_SPLIT_K_MAX_ROWS "
                                    "(FP8 products of at most this many rows as explicit split-K "
                                    "partials that the norm / RoPE kernels sum; None: as set)")
_FP8_DECODE_KERNEL = flags.DEFINE_bool("fp8_decode_kernel", False, "jax, --weights=fp8: FP8 "
                                       "products of <= 64 rows (decode steps) on the Mosaic GPU "
                                       "decode GEMM (kernels/fp8_decode_matmul_mgpu.py, Hopper "
                                       "only; ops.FP8_DECODE_KERNEL) instead of cuBLASLt")
_GC_FREEZE = flags.DEFINE_bool("gc_freeze", False, "jax: gc.collect() + gc.freeze() after the "
                                "compiles (the model and JAX's caches leave the collector's view: "
                                "a full collection during the timed loop walks only new objects)")
_STATIC_PREFILL = flags.DEFINE_bool("static_prefill_steps", False, "jax: steps holding a prefill "
                                    "chunk take attention's prefill path with no runtime cond "
                                    "(EngineConfig.static_prefill_steps)")
_DECODE_ONLY = flags.DEFINE_bool("decode_only_steps", True, "jax: decode-only steps compile without "
                                 "attention's runtime decode/prefill branch (EngineConfig option)")
_FUSED_ADD_NORM = flags.DEFINE_bool("fused_add_norm", True, "jax/profile: residual add + RMSNorm as "
                                    "one Pallas kernel on GPU (kernels/add_rms_norm.py)")
_BATCH1_VARIANTS = flags.DEFINE_list(
    "batch1_variants",
    ["unfused:8:cond:xlanorm", "fused:8", "unfused:8:cond:xlanorm", "fused:8"],
    "batch1: layout:min_decode_tokens[:option...] per variant, run in this order (a repeat checks "
    "drift); layout unfused | fused | fp8 (fused + FP8 weights); options (measurement only): "
    "cond: attention with the earlier runtime decode/prefill cond in every step; nocond: the decode "
    "kernel without it in steps of <= 8 tokens; xlanorm: residual add and RMSNorm as XLA ops, not "
    "the fused kernel; hlo: also write the decode step's optimized HLO next to --out (window 2 of "
    "2026-11-23 also had oldsplits, for a split-K rule that measured slower and was reverted)")
_MODEL = flags.DEFINE_enum("model", "llama3-8b", ["llama3-8b", "toy"], "model shape (random weights)")
_CONC = flags.DEFINE_list("concurrency", ["1", "64"], "closed-loop levels run first, in order")
_EXTRA_CONC = flags.DEFINE_list("extra_concurrency", ["16", "256"],
                                "levels run afterwards while --time_budget_s allows")
_INPUT = flags.DEFINE_integer("input_len", 128, "prompt tokens")
_OUTPUT = flags.DEFINE_integer("output_len", 64, "generated tokens per request")
_PER_USER = flags.DEFINE_integer("requests_per_user", 2, "closed loop: requests per user")
_POISSON_RATE = flags.DEFINE_float("poisson_rate", 32.0, "requests/s (0: skip the Poisson run)")
_POISSON_N = flags.DEFINE_integer("poisson_requests", 128, "requests of the Poisson run")
_POISSON_CONC = flags.DEFINE_integer("poisson_max_batch", 64, "max batch of the Poisson run")
_PAGE = flags.DEFINE_integer("page_size", 16, "KV page size")
_KV_PAGES = flags.DEFINE_integer("kv_pages", 4096, "KV pages")
_BUDGET = flags.DEFINE_integer("max_num_batched_tokens", 1024, "step token budget")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", "bf16", ["bf16", "fp8"], "KV cache storage")
_PROMPTS = flags.DEFINE_string("prompts", None, "file of prompts (token ids), read with grain")
_TIME_BUDGET = flags.DEFINE_float("time_budget_s", 120.0, "skip extra levels past this")
_SEED = flags.DEFINE_integer("seed", 0, "seed")
_OUT = flags.DEFINE_string("out", "/tmp/bench_serving.json", "JSON output (report: .md/.png prefix)")
_JAX_JSON = flags.DEFINE_string("jax_json", None, "report: the jax run's JSON")
_HF_JSON = flags.DEFINE_string("hf_json", None, "report: the HF run's JSON")
_JAX_FP8_JSON = flags.DEFINE_string("jax_fp8_json", None, "report: a --weights=fp8 jax run's JSON "
                                    "(its own rows; never counted toward the bf16 target)")
_HF_COMPILE = flags.DEFINE_bool("hf_compile", True, "let transformers torch.compile the decode step "
                                "(its warm-up runs the timed shapes, so no compile is timed)")
_MIN_DECODE_TOKENS = flags.DEFINE_integer(
    "min_decode_tokens", 8, "smallest decode token bucket: XLA:GPU rewrites dots of under ~10M "
    "multiply-adds (a 1-token x [4096, 1024] k/v projection) into slow multiply+reduce kernels")
_HF_EAGER_TOO = flags.DEFINE_bool("hf_eager_too", False, "also time the eager HF run per level")
_ASYNC = flags.DEFINE_bool("async_scheduling", True, "engine: schedule step n+1 before step n's "
                            "tokens reach the host")
_CB_UPDATE_MODE = flags.DEFINE_enum(
    "command_buffer_update_mode", "SKIP_TEMP", ["", "ALWAYS_UPDATE", "SKIP_TEMP", "SKIP_PROFILED"],
    "XLA's --xla_gpu_command_buffer_update_mode unless XLA_FLAGS sets it ('': XLA's default, "
    "ALWAYS_UPDATE). SKIP_TEMP VA-remaps the temp buffer to a fixed address, so CUDA-graph nodes "
    "that touch only it and the weights are not updated each step: H100 c=64 host time per bf16 "
    "decode step 2.33 -> 1.71 ms in one run (2026-11-23 window 2); SKIP_PROFILED was slower")
_TRACE_DIR = flags.DEFINE_string("trace_dir", "/tmp/jaxinfer_step_trace", "profile: trace folder")
_CEILINGS = flags.DEFINE_bool("ceilings", True, "jax: measure the in-run read bandwidth and bf16 "
                              "FLOP/s (needed for the batch-1 roofline ratio; ~3 s)")
_TRACE_DECODE = flags.DEFINE_bool("trace_decode", True, "jax: after each main level, trace 20 "
                                  "decode steps (GPU kernels per step, and the host's own events)")
_SYNC_CHECK = flags.DEFINE_bool("sync_check", False, "jax: after each main level, one wave with the "
                                "same settings stepped synchronously (decode-step host / call time "
                                "with no step in flight)")
_TRACE_PREFILL = flags.DEFINE_bool("trace_prefill", False, "jax: after each main level, also trace "
                                   "the first 4 steps of c requests arriving at once (the "
                                   "token-budget prefill steps)")

T_START = time.perf_counter()


def llama_shape(name: str) -> dict:
  if name == "llama3-8b":
    return dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                head_dim=128, intermediate_size=14336, rope_theta=500000.0,
                max_position_embeddings=8192)
  return dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, intermediate_size=128, max_position_embeddings=1024)


def prompt_set(n: int, vocab: int, rng: np.random.Generator) -> list[list[int]]:
  """``n`` prompts of --input_len tokens: from --prompts through a grain pipeline, else random."""
  if _PROMPTS.value:
    import grain
    with open(_PROMPTS.value) as f:
      lines = [ln for ln in f.read().splitlines() if ln.strip()]
    ds = (grain.MapDataset.source(lines).shuffle(seed=_SEED.value)
          .map(lambda ln: [int(t) % vocab for t in ln.split()][:_INPUT.value]).repeat())
    return [ds[i] for i in range(n)]
  try:
    import grain
    ds = grain.MapDataset.range(n).map(
        lambda i: np.random.default_rng(i + 1000 * _SEED.value).integers(
            1, vocab, _INPUT.value).tolist())
    return [ds[i] for i in range(n)]
  except ImportError:  # the GPU image has no grain: the same prompts without it
    return [np.random.default_rng(i + 1000 * _SEED.value).integers(1, vocab, _INPUT.value).tolist()
            for i in range(n)]


def percentiles(xs) -> dict:
  xs = np.asarray(xs, np.float64)
  if xs.size == 0:
    return {"p50": None, "p99": None, "mean": None}
  return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)),
          "mean": float(xs.mean())}


def summarize(records: list[dict], wall: float) -> dict:
  """records: per request {arrival, token_times}."""
  ttft = [r["token_times"][0] - r["arrival"] for r in records]
  tpot = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
          for r in records if len(r["token_times"]) > 1]
  itl = [b - a for r in records for a, b in zip(r["token_times"], r["token_times"][1:])]
  out_tokens = sum(len(r["token_times"]) for r in records)
  return {"requests": len(records), "output_tokens": out_tokens, "wall_s": wall,
          "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "itl_s": percentiles(itl),
          "tokens_per_s_per_gpu": out_tokens / wall,
          "tokens_per_s_per_user": float(np.median([1.0 / t for t in tpot])) if tpot else None}


# ---------------------------------------------------------------------------------------------
# jaxinfer


def measure_device_ceilings() -> dict:
  """HBM read bandwidth (a read-only reduction over 4 GiB, 10 launches back to back per sample, so
  the host sync is amortised; a decode step reads its weights, it writes little) and bf16 matmul
  FLOP/s, in the same process as the run they bound."""
  import jax
  import jax.numpy as jnp
  x = jax.random.uniform(jax.random.key(0), (1 << 30,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  times = []
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready([total(x) for _ in range(10)])
    times.append((time.perf_counter() - t) / 10)
  bw = x.nbytes / float(np.median(times))
  del x
  m = 8192
  a = jax.random.normal(jax.random.key(7), (m, m), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(8), (m, m), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(mm(a, b))
  times = []
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready([mm(a, b) for _ in range(10)])
    times.append((time.perf_counter() - t) / 10)
  return {"hbm_bytes_per_s": bw, "bf16_flops_per_s": 2 * m ** 3 / float(np.median(times))}


def engine_config(c: int, pages_per_seq: int, kv_dtype=None, min_decode: int | None = None):
  """Engine settings of concurrency level ``c``: max batch c, prompt-sized chunks, a step token
  budget of min(--max_num_batched_tokens, c prompts) and two token buckets (c for decode-only steps,
  the budget for steps that prefill), so each level compiles two step shapes. The decode bucket is
  at least --min_decode_tokens (padding rows cost nothing in a weight-bound step)."""
  from jaxinfer.engine import EngineConfig
  min_decode = _MIN_DECODE_TOKENS.value if min_decode is None else min_decode
  budget = max(c, min_decode, min(_BUDGET.value, c * _INPUT.value))
  return EngineConfig(num_pages=_KV_PAGES.value, page_size=_PAGE.value, max_num_seqs=c,
                      max_num_batched_tokens=budget, chunk_size=_INPUT.value,
                      max_model_len=pages_per_seq * _PAGE.value, min_seq_bucket=c,
                      min_page_bucket=pages_per_seq,
                      token_buckets=tuple(sorted({max(c, min_decode), budget})),
                      kv_dtype=kv_dtype, async_scheduling=_ASYNC.value,
                      decode_only_steps=_DECODE_ONLY.value,
                      static_prefill_steps=_STATIC_PREFILL.value)


def model_params(cfg, weights: str, fuse: bool):
  """Random Llama params in the benchmark's layout: bf16, projections fused when ``fuse``, layer
  projections FP8 (``llama.quantize_projections_fp8``, with the LM head when --fp8_lm_head) when
  ``weights == "fp8"``, NVFP4 (``llama.quantize_projections_nvfp4``) for nvfp4 / nvfp4_fp8."""
  import jax
  import jax.numpy as jnp

  from jaxinfer import ops
  from jaxinfer.models import llama
  params = llama.init_params(cfg, jax.random.key(_SEED.value), jnp.bfloat16)
  if fuse:
    params = llama.fuse_projections(params)
  if weights == "fp8":
    params = jax.jit(functools.partial(llama.quantize_projections_fp8,
                                       lm_head=_FP8_LM_HEAD.value))(params)
  elif weights in ("nvfp4", "nvfp4_fp8"):
    # layer by layer (one layer's intermediates at a time), then the FP8 LM head if asked
    layers = []
    for layer in params["layers"]:
      layers.append(jax.block_until_ready(jax.jit(functools.partial(
          llama.quantize_projections_nvfp4, prefill_fp8=weights == "nvfp4_fp8",
          max_decode_rows=_NVFP4_MAX_ROWS.value))({"layers": [layer]})["layers"][0]))
    params = {**params, "layers": layers}
    if weights == "nvfp4_fp8" and _FP8_LM_HEAD.value:
      params = jax.jit(lambda p: {**p, "lm_head": ops.FP8Weight.from_dense(p["lm_head"])})(params)
  return jax.block_until_ready(params)


class GcTimer:
  """Python garbage-collection passes while active (``gc.callbacks``): count and seconds per
  generation; a full collection walks every live object (JAX's caches included) and shows up as
  a host-time spike in the step it lands in."""

  def __init__(self):
    self.stats: dict[int, list] = {}
    self._t = 0.0

  def _cb(self, phase, info):
    if phase == "start":
      self._t = time.perf_counter()
    else:
      st = self.stats.setdefault(info["generation"], [0, 0.0, 0.0])
      dt = time.perf_counter() - self._t
      st[0] += 1
      st[1] += dt
      st[2] = max(st[2], dt)

  def __enter__(self):
    gc.callbacks.append(self._cb)
    return self

  def __exit__(self, *exc):
    gc.callbacks.remove(self._cb)

  def summary(self) -> dict:
    return {f"gen{g}": {"count": n, "total_s": t, "max_s": m}
            for g, (n, t, m) in sorted(self.stats.items())}


def run_closed_loop(engine, prompts, concurrency: int, num_requests: int) -> tuple[dict, list]:
  with GcTimer() as gct:
    summary, steps = _run_closed_loop(engine, prompts, concurrency, num_requests)
  summary["gc"] = gct.summary()
  return summary, steps


def _run_closed_loop(engine, prompts, concurrency: int, num_requests: int) -> tuple[dict, list]:
  from jaxinfer.sampling import SamplingParams
  params = SamplingParams(max_tokens=_OUTPUT.value, ignore_eos=True)
  records, live, steps = {}, 0, []
  next_i, done = 0, 0
  t0 = time.perf_counter()
  while done < num_requests:
    while live < concurrency and next_i < num_requests:
      rid = engine.add_request(prompts[next_i % len(prompts)], params, request_id=f"r{next_i}")
      records[rid] = {"arrival": engine.clock(), "token_times": []}
      next_i += 1
      live += 1
    ts = time.perf_counter()
    outs = engine.step()
    steps.append((time.perf_counter() - ts, engine.last_step))
    now = engine.clock()
    for o in outs:
      records[o.request_id]["token_times"] += [now] * len(o.new_token_ids)
      if o.finished:
        records[o.request_id]["token_ids"] = o.token_ids
        done += 1
        live -= 1
  summary = summarize(list(records.values()), time.perf_counter() - t0)
  # The run's greedy outputs, hashed in request order: runs of one model, prompts and settings
  # that differ only in runtime options (XLA flags) must agree (a check on those options).
  summary["output_checksum"] = hashlib.sha256(repr(
      [records[f"r{i}"]["token_ids"] for i in range(num_requests)]).encode()).hexdigest()[:16]
  return summary, steps


def trace_decode_steps(engine, prompts, c: int, n: int = 20) -> dict:
  """Per-kernel GPU breakdown of ``n`` decode-only engine steps at batch ``c`` (after the timed
  run, so the trace's overhead is not in its numbers)."""
  import jax

  from jaxinfer.sampling import SamplingParams
  params = SamplingParams(max_tokens=n + 8, ignore_eos=True)
  ids = [engine.add_request(prompts[i % len(prompts)], params, request_id=f"t{i}")
         for i in range(c)]
  started: set[str] = set()
  while len(started) < c:                                     # prefill until every one decodes
    started.update(o.request_id for o in engine.step() if o.new_token_ids)
  if engine._in_flight is not None:
    jax.block_until_ready(engine._in_flight.tokens)
  folder = os.path.join(_TRACE_DIR.value, f"engine_c{c}")
  jax.profiler.start_trace(folder)
  for _ in range(n):
    engine.step()
  if engine._in_flight is not None:
    jax.block_until_ready(engine._in_flight.tokens)
  jax.profiler.stop_trace()
  engine.run_to_completion()
  assert not any(engine.abort(r) for r in ids)
  return gpu_kernel_breakdown(folder, n)


def trace_prefill_steps(engine, prompts, c: int, n: int = 4) -> dict:
  """Per-kernel GPU breakdown of the first ``n`` steps after ``c`` requests arrive at once at an
  idle engine: the token-budget prefill steps (chunks of several prompts, and the decode rows of
  the requests admitted before) that take most of a closed-loop wave's time after its decode steps.
  ``tokens_per_step``: the steps' real (unpadded) tokens."""
  import jax

  from jaxinfer.sampling import SamplingParams
  params = SamplingParams(max_tokens=4, ignore_eos=True)
  ids = [engine.add_request(prompts[i % len(prompts)], params, request_id=f"tp{i}")
         for i in range(c)]
  folder = os.path.join(_TRACE_DIR.value, f"engine_prefill_c{c}")
  jax.profiler.start_trace(folder)
  tokens = []
  for _ in range(n):
    engine.step()
    if engine._in_flight is not None:
      tokens.append(engine._in_flight.stats.num_tokens)
  if engine._in_flight is not None:
    jax.block_until_ready(engine._in_flight.tokens)
  jax.profiler.stop_trace()
  engine.run_to_completion()
  assert not any(engine.abort(r) for r in ids)
  return gpu_kernel_breakdown(folder, n) | {"tokens_per_step": tokens}


def run_poisson(engine, prompts, rate: float, num_requests: int) -> dict:
  from jaxinfer.sampling import SamplingParams
  params = SamplingParams(max_tokens=_OUTPUT.value, ignore_eos=True)
  rng = np.random.default_rng(_SEED.value)
  arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests))
  records, next_i, done = {}, 0, 0
  t0 = engine.clock()
  while done < num_requests:
    now = engine.clock() - t0
    while next_i < num_requests and arrivals[next_i] <= now:
      rid = engine.add_request(prompts[next_i % len(prompts)], params, request_id=f"p{next_i}")
      records[rid] = {"arrival": t0 + arrivals[next_i], "token_times": []}
      next_i += 1
    if not engine.has_unfinished():
      time.sleep(max(0.0, arrivals[next_i] - (engine.clock() - t0)))  # open loop: idle until next
      continue
    outs = engine.step()
    now = engine.clock()
    for o in outs:
      records[o.request_id]["token_times"] += [now] * len(o.new_token_ids)
      done += o.finished
  return summarize(list(records.values()), engine.clock() - t0) | {"rate_per_s": rate}


def run_jax() -> dict:
  import jax
  import jax.numpy as jnp

  from jaxinfer.engine import LLMEngine
  from jaxinfer.engine.step import LlamaForward
  from jaxinfer.models import llama

  result = {"engine": "jaxinfer", "device": str(jax.devices()[0].device_kind),
            "jax_version": jax.__version__, "model": _MODEL.value,
            "input_len": _INPUT.value, "output_len": _OUTPUT.value, "kv_dtype": _KV_DTYPE.value,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "requests_per_user": _PER_USER.value}
  on_gpu = jax.default_backend() == "gpu"
  cfg = llama.LlamaConfig(**llama_shape(_MODEL.value))
  dtype = jnp.bfloat16
  t = time.perf_counter()
  params = model_params(cfg, _WEIGHTS.value, _FUSE.value)
  result["init_s"] = time.perf_counter() - t
  result["weights"], result["fused_projections"] = _WEIGHTS.value, _FUSE.value
  result["fp8_lm_head"] = _FP8_LM_HEAD.value
  if _WEIGHTS.value == "nvfp4_fp8":
    result["nvfp4_max_rows"] = _NVFP4_MAX_ROWS.value
  result["fused_add_norm"], result["decode_only_steps"] = _FUSED_ADD_NORM.value, _DECODE_ONLY.value
  from jaxinfer.ops import RowSplitWeight
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  embed_bytes = params["embed"].nbytes if not cfg.tie_word_embeddings else 0
  decode_form = jax.tree.map(lambda w: w.small if isinstance(w, RowSplitWeight) else w, params,
                             is_leaf=lambda w: isinstance(w, RowSplitWeight))
  result["weight_bytes"] = weight_bytes
  result["decode_read_bytes"] = sum(x.nbytes for x in jax.tree.leaves(decode_form)) - embed_bytes
  kv_dtype = jnp.float8_e4m3fn if _KV_DTYPE.value == "fp8" else dtype
  cache = llama.create_cache(cfg, num_pages=_KV_PAGES.value, page_size=_PAGE.value, dtype=kv_dtype)
  pages_per_seq = -(-(_INPUT.value + _OUTPUT.value) // _PAGE.value)
  max_len = pages_per_seq * _PAGE.value

  forward = LlamaForward(cfg, _FUSED_ADD_NORM.value, fp8_quant_in_norm=_FP8_QUANT_IN_NORM.value,
                         fp8_scale_in_norm=_FP8_SCALE_IN_NORM.value,
                         fp8_scale_in_norm_min_tokens=_FP8_SCALE_IN_NORM_MIN.value,
                         fused_rope_kv=_FUSED_ROPE_KV.value, fp8_act_quant=_FP8_ACT_QUANT.value)
  result["fused_rope_kv"] = _FUSED_ROPE_KV.value
  result["fp8_act_quant"] = _FP8_ACT_QUANT.value
  result["static_prefill_steps"] = _STATIC_PREFILL.value
  from jaxinfer import ops
  if _FP8_SPLIT_K.value is not None:
    ops.FP8_SPLIT_K_MAX_ROWS = _FP8_SPLIT_K.value
  result["fp8_split_k_max_rows"] = ops.FP8_SPLIT_K_MAX_ROWS
  if _FP8_DECODE_KERNEL.value:
    ops.FP8_DECODE_KERNEL = True
  result["fp8_decode_kernel"] = ops.FP8_DECODE_KERNEL
  result["max_num_batched_tokens"] = _BUDGET.value
  result["fp8_quant_in_norm"] = _FP8_QUANT_IN_NORM.value
  result["fp8_scale_in_norm"] = _FP8_SCALE_IN_NORM.value
  result["fp8_scale_in_norm_min_tokens"] = _FP8_SCALE_IN_NORM_MIN.value

  def engine_for(c: int) -> LLMEngine:
    return LLMEngine(params, forward, cache, vocab_size=cfg.vocab_size,
                     max_model_len=max_len, config=engine_config(c, pages_per_seq, kv_dtype))

  main_levels = [int(c) for c in _CONC.value]
  extra_levels = [int(c) for c in _EXTRA_CONC.value if int(c) not in main_levels]
  poisson_c = _POISSON_CONC.value
  # Compile every step shape of the main levels (and the Poisson run) concurrently, up front.
  t = time.perf_counter()
  warm = [engine_for(c) for c in sorted(set(main_levels + [poisson_c]))]
  shapes = [(e, s) for e in warm for s in e.buckets.all_shapes()]
  import concurrent.futures
  with concurrent.futures.ThreadPoolExecutor(len(shapes)) as pool:
    list(pool.map(lambda es: es[0].warmup([es[1]], samplers=(True,)), shapes))
  result["compile_s"] = time.perf_counter() - t
  result["compiled_shapes"] = [s for _, s in shapes]
  result["gc_freeze"] = _GC_FREEZE.value
  if _GC_FREEZE.value:
    gc.collect()
    gc.freeze()
    result["gc_frozen_objects"] = gc.get_freeze_count()
  logging.info("compiled %d shapes in %.1fs", len(shapes), result["compile_s"])
  if on_gpu and _CEILINGS.value:
    result["ceilings"] = measure_device_ceilings()
    logging.info("ceilings %s", result["ceilings"])

  prompts = prompt_set(max(main_levels + extra_levels + [1]) * _PER_USER.value, cfg.vocab_size,
                       np.random.default_rng(_SEED.value))
  result["levels"] = {}

  def save():  # after every part: a run stopped by its time limit keeps what it measured
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)

  def run_level(c: int, extra: bool):
    nonlocal cache
    engine = engine_for(c)
    if extra:
      engine.warmup(num_threads=4, samplers=(True,))
    # one short untimed wave first (first-call dispatch costs), then the measured closed loop
    run_closed_loop(engine, prompts, c, c)
    summary, steps = run_closed_loop(engine, prompts, c, _PER_USER.value * c)
    cache = engine.cache
    decode_steps = [(dt, st) for dt, st in steps if st is not None and st.decode_only]
    summary["decode_step_s"] = percentiles([dt for dt, _ in decode_steps])
    # host part (schedule, batch build, dispatch) vs. waiting for the device, per decode step
    summary["decode_step_host_s"] = percentiles([st.host_s for _, st in decode_steps])
    summary["decode_step_wait_s"] = percentiles([st.wait_s for _, st in decode_steps])
    # of the host part, the jitted call itself (input copy and the runtime's launch work)
    summary["decode_step_call_s"] = percentiles([st.call_s for _, st in decode_steps])
    summary["steps"] = len(steps)
    # steps that took over twice their kind's median (spikes): index, kind, wall / host ms
    med = {k: float(np.median([dt for dt, st in steps if st is not None and st.decode_only == k]
                              or [0.0])) for k in (True, False)}
    summary["slow_steps"] = [
        (i, "decode" if st.decode_only else "prefill", round(1e3 * dt, 2), round(1e3 * st.host_s, 2))
        for i, (dt, st) in enumerate(steps) if st is not None and dt > 2 * med[st.decode_only]][:20]
    # where the wall time goes: steps that prefill (any chunk longer than one token) vs
    # decode-only ones (with async scheduling a step() call waits on the step before it, so the
    # split is by the dispatched step's kind, one step off; the sums are what matters)
    for kind, pick_ in (("decode_only", lambda st: st.decode_only),
                        ("with_prefill", lambda st: not st.decode_only)):
      part = [(dt, st) for dt, st in steps if st is not None and pick_(st)]
      summary[f"{kind}_steps"] = {"count": len(part), "total_s": sum(dt for dt, _ in part),
                                  "step_s": percentiles([dt for dt, _ in part]),
                                  "tokens": percentiles([st.num_tokens for _, st in part])}
    result["levels"][str(c)] = summary
    save()                      # before the trace: a trace that fails keeps the timed numbers
    if _SYNC_CHECK.value and not extra:   # before the traces (a trace may crash)
      # The same engine settings stepped synchronously (each step's tokens read before the next
      # is scheduled: nothing in flight at dispatch), one untimed wave: is the jitted call's cost
      # its own, or does it come from the step still running on the device?
      sync_engine = LLMEngine(params, forward, cache,
                              vocab_size=cfg.vocab_size, max_model_len=max_len,
                              config=dataclasses.replace(engine_config(c, pages_per_seq, kv_dtype),
                                                         async_scheduling=False))
      _, sync_steps = run_closed_loop(sync_engine, prompts, c, c)
      cache = engine.cache = sync_engine.cache        # the traces below step `engine` again
      sync_decode = [st for _, st in sync_steps if st is not None and st.decode_only]
      summary["sync_decode_step_host_s"] = percentiles([st.host_s for st in sync_decode])
      summary["sync_decode_step_call_s"] = percentiles([st.call_s for st in sync_decode])
      summary["sync_decode_step_wait_s"] = percentiles([st.wait_s for st in sync_decode])
      del sync_engine
      save()
    if on_gpu and not extra and _TRACE_DECODE.value:
      summary["decode_kernels"] = trace_decode_steps(engine, prompts, c)
      cache = engine.cache
      save()
    if on_gpu and not extra and _TRACE_PREFILL.value:
      summary["prefill_kernels"] = trace_prefill_steps(engine, prompts, c)
      cache = engine.cache
    logging.info("c=%d %s", c, json.dumps({k: v for k, v in summary.items()
                                            if k not in ("decode_kernels", "prefill_kernels")}))
    if c == 1 and on_gpu and "ceilings" in result:
      floor = result["decode_read_bytes"] / result["ceilings"]["hbm_bytes_per_s"]
      result["batch1_decode"] = {"step_s_p50": summary["decode_step_s"]["p50"], "roofline_s": floor,
                                 "ratio": summary["decode_step_s"]["p50"] / floor}
    save()

  for c in main_levels:
    run_level(c, extra=False)
  if _POISSON_RATE.value > 0:
    engine = engine_for(poisson_c)
    result["poisson"] = run_poisson(engine, prompts, _POISSON_RATE.value, _POISSON_N.value)
    result["poisson"]["max_batch"] = poisson_c
    cache = engine.cache
    save()
  for c in extra_levels:
    if time.perf_counter() - T_START > _TIME_BUDGET.value:
      logging.info("time budget spent: skipping concurrency %d", c)
      result.setdefault("skipped_levels", []).append(c)
      continue
    run_level(c, extra=True)
  result["total_s"] = time.perf_counter() - T_START
  return result


# ---------------------------------------------------------------------------------------------
# batch1: the engine's batch-1 decode step, variants before/after in one process


def run_batch1() -> dict:
  """Per --batch1_variants entry: an engine at bench_serving's c=1 settings (decode token bucket
  ``min_decode``), one untimed request, then the closed loop of --requests_per_user requests; the
  median engine decode step (host loop included: what the c=1 level of --engine=jax reports as
  ``batch1_decode``) against the weight-read floor at the in-run bandwidth; then a 20-step trace per
  kernel on GPU. Every variant shares the process, the ceilings and the random weights."""
  import jax
  import jax.numpy as jnp

  from jaxinfer.engine import LLMEngine
  from jaxinfer.engine.step import LlamaForward
  from jaxinfer.models import llama

  on_gpu = jax.default_backend() == "gpu"
  cfg = llama.LlamaConfig(**llama_shape(_MODEL.value))
  result = {"device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": _MODEL.value,
            "input_len": _INPUT.value, "output_len": _OUTPUT.value, "variants": {}}

  def save():
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)

  layouts = {"unfused": model_params(cfg, "bf16", False)}
  embed_bytes = layouts["unfused"]["embed"].nbytes
  read_bytes = lambda p: sum(x.nbytes for x in jax.tree.leaves(p)) - embed_bytes
  result["decode_read_bytes"] = read_bytes(layouts["unfused"])
  if on_gpu:
    result["ceilings"] = measure_device_ceilings()
  bw = result.get("ceilings", {}).get("hbm_bytes_per_s", 3.0e12)
  save()
  pages_per_seq = -(-(_INPUT.value + _OUTPUT.value) // _PAGE.value)
  cache = llama.create_cache(cfg, num_pages=_KV_PAGES.value, page_size=_PAGE.value,
                             dtype=jnp.bfloat16)
  prompts = prompt_set(4, cfg.vocab_size, np.random.default_rng(_SEED.value))
  for i, variant in enumerate(_BATCH1_VARIANTS.value):
    try:
      layout, min_decode, *opts = variant.split(":")
      if layout not in layouts:
        base = layouts.get("fused") or llama.fuse_projections(layouts["unfused"])
        layouts["fused"] = base
        if layout == "fp8":
          layouts["fp8"] = jax.block_until_ready(jax.jit(llama.quantize_projections_fp8)(base))
      params = layouts[layout]
      attn = next((o for o in opts if o in ("cond", "nocond")), "auto")
      parts = VariantForward(cfg, attn, "xlanorm" not in opts)
      forward = LlamaForward(cfg) if parts == VariantForward(cfg) else parts
      engine = LLMEngine(params, forward, cache, vocab_size=cfg.vocab_size,
                         max_model_len=pages_per_seq * _PAGE.value,
                         config=engine_config(1, pages_per_seq, min_decode=int(min_decode)))
      t = time.perf_counter()
      if variant not in _BATCH1_VARIANTS.value[:i]:   # a repeat reuses the jit cache
        engine.warmup(num_threads=2, samplers=(True,))
      compile_s = time.perf_counter() - t
      if "hlo" in opts:   # the decode step's optimized HLO, for reading its fusions
        import gzip
        from jaxinfer.engine.step import build_host_batch, step_jit
        shape = (engine.buckets.tokens[0], 1, pages_per_seq)
        hb = build_host_batch([], _PAGE.value, shape)
        hlo = step_jit.lower(params, hb.ints, engine._no_prev, engine.cache,
                             forward=forward, shape=shape, greedy=True).compile().as_text()
        with gzip.open(os.path.join(os.path.dirname(os.path.abspath(_OUT.value)),
                                    f"step_hlo_{i}_{layout}{min_decode}.txt.gz"), "wt") as f:
          f.write(hlo)
      run_closed_loop(engine, prompts, 1, 1)
      summary, steps = run_closed_loop(engine, prompts, 1, _PER_USER.value)
      decode = [dt for dt, st in steps if st is not None and st.decode_only]
      step_s = float(np.median(decode))
      floor = result["decode_read_bytes"] / bw
      entry = {"layout": layout, "min_decode_tokens": int(min_decode), "options": opts,
               "compile_s": compile_s, "decode_steps": len(decode), "step_s": percentiles(decode),
               "tpot_s": summary["tpot_s"], "read_bytes": read_bytes(params),
               "over_bf16_roofline": step_s / floor, "over_bf16_roofline_3TBps": step_s / (
                   result["decode_read_bytes"] / 3.0e12)}
      if on_gpu:
        entry["decode_kernels"] = trace_decode_steps(engine, prompts, 1)
      cache = engine.cache
      del engine
      result["variants"][f"{i}_{variant}"] = entry
      logging.info("batch1 %s: step p50 %.3f ms = %.3fx roofline, %s kernels/step", variant,
                   1e3 * step_s, entry["over_bf16_roofline"],
                   entry.get("decode_kernels", {}).get("kernels_per_step"))
      save()
    except Exception as e:  # noqa: BLE001  (recorded; the next variant still runs)
      result["variants"][f"{i}_{variant}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      logging.exception("batch1 %s failed", variant)
      save()
      cache = llama.create_cache(cfg, num_pages=_KV_PAGES.value, page_size=_PAGE.value,
                                 dtype=jnp.bfloat16)   # the failed engine may have donated it
  result["total_s"] = time.perf_counter() - T_START
  save()
  return result


_PATCH_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class VariantForward:
  """The engine's Llama forward with parts switched back to their earlier form, for before/after
  timing (measurement only; distinct from ``LlamaForward`` in the jit cache). ``attention``: "auto"
  (the dispatch as it is), "cond" (the earlier dispatch: a runtime decode/prefill ``lax.cond`` in
  every step, also where the step's shape settles it) or "nocond" (the decode kernel in steps of
  <= 8 tokens); ``fused_add_norm``: False for the residual add and RMSNorm as XLA ops.
  The attention switch is a module patch for the duration of the trace, under a lock (the engine's
  warm-up traces from several threads)."""
  cfg: Any
  attention: str = "auto"
  fused_add_norm: bool = True

  def __call__(self, params, tokens, cache, batch):
    from jaxinfer import attention
    from jaxinfer.models import llama
    run = lambda: llama.forward(params, tokens, cache, batch, self.cfg,
                                fused_add_norm=self.fused_add_norm)
    if self.attention == "auto":
      return run()
    if self.attention == "nocond" and tokens.shape[0] > 8:
      return run()
    patch = functools.partial(variant_attention, mode=self.attention)
    with _PATCH_LOCK:
      dispatch, attention.paged_attention = attention.paged_attention, patch
      try:
        return run()
      finally:
        attention.paged_attention = dispatch


def variant_attention(q, k_pages, v_pages, batch, *, scale, k_scale=1.0, v_scale=1.0, impl="auto",
                      mode="auto"):
  """Measurement only: ``attention.paged_attention`` on the GPU kernels, mode "cond" as it was
  (a runtime branch in every step), "nocond" as it is (the decode kernel, statically, where the step
  has <= max_q tokens)."""
  del impl
  import jax
  import jax.numpy as jnp

  from jaxinfer import attention
  from kernels import flash_attention, paged_decode_attention as decode
  interpret = jax.default_backend() != "gpu"
  T, B = batch.num_tokens, batch.num_seqs
  max_q = min(attention.bucket(-(-T // B), 1), 8)

  def run_decode():
    return decode.paged_decode_attention(
        q, k_pages, v_pages, batch.page_table, batch.seq_lens, batch.query_start, scale=scale,
        k_scale=k_scale, v_scale=v_scale, max_q=max_q, interpret=interpret)

  def run_prefill():
    _, _, kv_heads, _ = k_pages.shape
    k = k_pages[batch.page_table].reshape(B, -1, kv_heads, k_pages.shape[-1])
    v = v_pages[batch.page_table].reshape(B, -1, kv_heads, v_pages.shape[-1])
    return flash_attention.flash_prefill(
        q, k, v, batch.query_start, batch.seq_lens, scale=scale, k_scale=k_scale,
        v_scale=v_scale, interpret=interpret).astype(q.dtype)

  if mode != "cond" and T <= max_q:
    return run_decode()
  longest = jnp.max(jnp.diff(batch.query_start))
  return jax.lax.cond(longest <= max_q, run_decode, run_prefill)


# ---------------------------------------------------------------------------------------------
# profile: where the batch-1 decode step's time goes


def kernel_category(name: str) -> str:
  """Coarse class of an XLA/Pallas GPU kernel by its name."""
  n = name.lower()
  if any(k in n for k in ("paged_decode_attention", "combine_splits", "flash_prefill")):
    return "attention"
  if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul")):
    return "gemm"
  if "dynamic_update_slice" in n or "scatter" in n:
    return "kv_write"
  if "reduce" in n:
    return "reduce"
  if "memcpy" in n or "memset" in n:
    return "memcpy"
  return "elementwise/other"


def gpu_kernel_breakdown(trace_dir: str, num_steps: int) -> dict:
  """Per-kernel GPU time of a ``jax.profiler.trace`` folder, per step: totals by kernel name (XLA
  names one kernel per fusion, e.g. gemm_fusion_dot.12, so a layer's kernels have distinct names;
  grouped also with the numeric suffix stripped), by category (gemm / attention / kv_write / reduce
  / elementwise), device busy time (union of kernel intervals) and the wall span from the first
  kernel's start to the last one's end."""
  import re
  pd = load_trace(trace_dir)
  if pd is None:
    return {"error": f"no xplane.pb under {trace_dir}"}
  kernels, intervals, lines = gpu_kernel_events(pd)
  if not intervals:
    return {"error": "no GPU kernel events", "gpu_lines": sorted(set(lines))[:20],
            "host_events": host_event_breakdown(pd, num_steps)}
  busy = busy_ns(intervals)
  per_step_ms = lambda ns: ns / num_steps / 1e6
  cats: dict[str, list] = {}
  groups: dict[str, list] = {}
  for name, (ns, n) in kernels.items():
    for table, key in ((cats, kernel_category(name)), (groups, re.sub(r"[._]\d+$", "", name))):
      t = table.setdefault(key, [0.0, 0])
      t[0] += per_step_ms(ns)
      t[1] += n / num_steps
  fmt = lambda table: {k: {"ms_per_step": v[0], "kernels_per_step": v[1]}
                       for k, v in sorted(table.items(), key=lambda kv: -kv[1][0])}
  top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:60]
  return {"steps": num_steps, "host_events": host_event_breakdown(pd, num_steps),
          "kernels_per_step": sum(k[1] for k in kernels.values()) / num_steps,
          "kernel_sum_ms_per_step": per_step_ms(sum(k[0] for k in kernels.values())),
          "busy_ms_per_step": per_step_ms(busy),
          "span_ms_per_step": per_step_ms(intervals[-1][1] - intervals[0][0]),
          "by_category": fmt(cats), "by_kernel_group": dict(list(fmt(groups).items())[:25]),
          "top_kernels": [{"kernel": name[:120], "count": n, "ms_per_step": per_step_ms(ns)}
                          for name, (ns, n) in top]}


def host_event_breakdown(pd, num_steps: int, top: int = 40) -> list[dict]:
  """The host threads' trace events (the runtime's TraceMe scopes: PjRt execute, thunk launches,
  command-buffer updates, Python calls) per step, by thread kind and name, largest total first:
  where the host time of a step goes on the other side of ``jit``'s call."""
  totals: dict[tuple[str, str], list] = {}
  for plane in pd.planes:
    if not plane.name.startswith("/host"):
      continue
    for line in plane.lines:
      thread = line.name.split("/")[0]
      for ev in line.events:
        t = totals.setdefault((thread, ev.name[:120]), [0.0, 0])
        t[0] += ev.duration_ns
        t[1] += 1
  rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
  return [{"thread": th, "event": name, "us_per_step": ns / num_steps / 1e3,
           "count_per_step": n / num_steps} for (th, name), (ns, n) in rows]


def large_copies(hlo_text: str, min_bytes: int = 1 << 20) -> list[str]:
  """Copy instructions of the optimized HLO that move >= min_bytes (a cache copied every step)."""
  import re
  sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "f8e4m3fn": 1, "s8": 1, "u8": 1}
  out = []
  for line in hlo_text.splitlines():
    if " copy(" not in line and "copy-start(" not in line:
      continue
    m = re.search(r"= (\w+)\[([\d,]*)\]", line)
    if m and m.group(1) in sizes:
      n = sizes[m.group(1)] * int(np.prod([int(d) for d in m.group(2).split(",") if d] or [1]))
      if n >= min_bytes:
        out.append(f"{n / 1e6:.1f} MB: {line.strip()[:200]}")
  return out


def time_calls(fn, n: int) -> dict:
  """``fn()`` returns an array to wait on. Blocked: median of n calls each waited for; pipelined:
  n calls back to back, one wait (device time when the host keeps ahead)."""
  import jax
  jax.block_until_ready(fn())
  blocked = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    blocked.append(time.perf_counter() - t)
  t = time.perf_counter()
  outs = [fn() for _ in range(n)]
  jax.block_until_ready(outs)
  return {"blocked_s": percentiles(blocked), "pipelined_s": (time.perf_counter() - t) / n}


def decode_only_attention(q, k_pages, v_pages, batch, *, scale, k_scale=1.0, v_scale=1.0,
                          impl="auto"):
  """Profile only: ``attention.paged_attention`` without its runtime decode/prefill ``lax.cond``
  (valid for decode-only batches), to measure what that conditional costs on GPU."""
  del impl
  import jax

  from jaxinfer import attention
  from kernels import paged_decode_attention as decode
  max_q = min(attention.bucket(-(-batch.num_tokens // batch.num_seqs), 1), 8)
  return decode.paged_decode_attention(q, k_pages, v_pages, batch.page_table, batch.seq_lens,
                                       batch.query_start, scale=scale, k_scale=k_scale,
                                       v_scale=v_scale, max_q=max_q,
                                       interpret=jax.default_backend() != "gpu")


def run_profile() -> dict:
  """The batch-1 decode step of the Llama-3-8B shape at the serving benchmark's c=1 settings,
  each part traced and broken down per GPU kernel: (b) the engine's jitted forward + sample step
  (greedy), (b') the same step with attention's runtime conditional removed, (c)
  ``LLMEngine.step()`` end to end (host and wait parts), (a) the bare forward (KV cache of the
  engine's size, and of one sequence's pages); the step's large HLO copies; the c>1 decode steps
  of --concurrency while --time_budget_s allows."""
  import gzip

  import jax
  import jax.numpy as jnp

  from jaxinfer import attention
  from jaxinfer.compilation_cache import enable_compilation_cache
  from jaxinfer.engine import LLMEngine, step as step_mod
  from jaxinfer.engine.step import LlamaForward, build_host_batch, step_jit
  from jaxinfer.models import llama
  from jaxinfer.sampling import SamplingParams

  enable_compilation_cache()   # the AOT compile for the HLO text below then loads from disk
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  result = {"device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": _MODEL.value}

  def save():
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)

  def traced(key, fn, n=10):
    folder = os.path.join(_TRACE_DIR.value, key)
    jax.profiler.start_trace(folder)
    jax.block_until_ready([fn() for _ in range(n)])
    jax.profiler.stop_trace()
    return gpu_kernel_breakdown(folder, n)

  cfg = llama.LlamaConfig(**llama_shape(_MODEL.value))
  params = llama.init_params(cfg, jax.random.key(_SEED.value), jnp.bfloat16)
  result["decode_read_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params)) - (
      0 if cfg.tie_word_embeddings else params["embed"].nbytes)
  ps = _PAGE.value
  P = -(-(_INPUT.value + _OUTPUT.value) // ps)
  ctx = _INPUT.value + _OUTPUT.value // 2                     # mid-generation position
  pages = list(range(1, P + 1))
  shape = (1, 1, P)
  fwd = LlamaForward(cfg, _FUSED_ADD_NORM.value)
  state = {"cache": llama.create_cache(cfg, num_pages=_KV_PAGES.value, page_size=ps,
                                       dtype=jnp.bfloat16),
           "tok": jnp.asarray([7], jnp.int32)}
  # the step as async decode runs it: its input token is the previous step's output, on device
  hb = build_host_batch([([-1], pages, ctx)], ps, shape, [(SamplingParams(), ctx - _INPUT.value)])
  ints = jnp.asarray(hb.ints)

  def stepper(jitted):
    def step():
      state["tok"], _, state["cache"] = jitted(params, ints, state["tok"], state["cache"],
                                               forward=fwd, shape=shape, greedy=True)
      return state["tok"]
    return step

  step = stepper(step_jit)
  result["step_jit"] = time_calls(step, 30)
  logging.info("step_jit %s", result["step_jit"])
  result["step_jit"]["kernels"] = traced("step", step)
  save()
  hlo = step_jit.lower(params, ints, state["tok"], state["cache"], forward=fwd,
                       shape=shape, greedy=True).compile().as_text()
  result["step_large_copies"] = large_copies(hlo)
  result["step_hlo_conditionals"] = hlo.count(" conditional(")
  with gzip.open(os.path.join(out_dir, "step_hlo.txt.gz"), "wt") as f:
    f.write(hlo)
  save()

  # (b') no runtime conditional in attention (measurement only: a trace-time substitution)
  no_cond_jit = jax.jit(step_mod._step, static_argnames=("forward", "shape", "greedy"),
                        donate_argnames=("cache",))
  dispatch, attention.paged_attention = attention.paged_attention, decode_only_attention
  try:
    no_cond = stepper(no_cond_jit)
    result["step_no_attention_cond"] = time_calls(no_cond, 30)
  finally:
    attention.paged_attention = dispatch
  result["step_no_attention_cond"]["kernels"] = traced("no_cond", no_cond)
  logging.info("step_no_attention_cond %s", {k: v for k, v in
                                              result["step_no_attention_cond"].items()
                                              if k != "kernels"})
  save()

  # (c) the engine, at bench_serving's c=1 settings, one request at a time
  engine = LLMEngine(params, fwd, state.pop("cache"), vocab_size=cfg.vocab_size,
                     max_model_len=P * ps, config=engine_config(1, P))
  engine.warmup(num_threads=2, samplers=(True,))
  prompt = np.random.default_rng(_SEED.value).integers(1, cfg.vocab_size, _INPUT.value).tolist()
  sp = SamplingParams(max_tokens=_OUTPUT.value, ignore_eos=True)
  engine_steps = []
  for rep in range(3):
    engine.add_request(prompt, sp)
    if rep == 2:
      jax.profiler.start_trace(os.path.join(_TRACE_DIR.value, "engine"))
    n = 0
    while engine.has_unfinished():
      t = time.perf_counter()
      engine.step()
      st = engine.last_step
      if rep > 0 and st is not None and st.decode_only:
        engine_steps.append((time.perf_counter() - t, st.host_s, st.wait_s))
      n += 1
    if rep == 2:
      jax.profiler.stop_trace()
      result["engine_kernels"] = gpu_kernel_breakdown(os.path.join(_TRACE_DIR.value, "engine"), n)
  arr = np.asarray(engine_steps)
  result["engine_step"] = {"steps": len(arr), "step_s": percentiles(arr[:, 0]),
                           "host_s": percentiles(arr[:, 1]), "wait_s": percentiles(arr[:, 2]),
                           "async": engine.config.async_scheduling}
  logging.info("engine %s", result["engine_step"])
  state["cache"] = engine.cache
  del engine
  save()

  # (a) the bare model forward (as bench_generate times it), engine-sized and one-sequence caches
  base = build_host_batch([([7], pages, ctx)], ps, shape)
  tokens, batch = jnp.asarray(base.tokens), jax.tree.map(jnp.asarray, base.batch)

  def bare():
    logits, state["cache"] = llama.forward_jit(params, tokens, state["cache"], batch, cfg=cfg)
    return logits

  for key, num_pages in (("forward_engine_cache", None), ("forward_small_cache", P + 1)):
    if time.perf_counter() - T_START > _TIME_BUDGET.value:
      result.setdefault("skipped", []).append(key)
      continue
    if num_pages:
      state["cache"] = llama.create_cache(cfg, num_pages=num_pages, page_size=ps,
                                          dtype=jnp.bfloat16)
    result[key] = {"num_pages": state["cache"].num_pages, **time_calls(bare, 30)}
    logging.info("%s %s", key, result[key])
    save()
  del state["cache"]

  # the decode step of bench_serving's c=64 level (64 rows), as far as --time_budget_s allows
  for b in [int(c) for c in _CONC.value if int(c) > 1]:
    if time.perf_counter() - T_START > _TIME_BUDGET.value:
      result.setdefault("skipped_batches", []).append(b)
      continue
    key = f"step_jit_b{b}"
    cache = llama.create_cache(cfg, num_pages=max(_KV_PAGES.value, b * P + 1), page_size=ps,
                               dtype=jnp.bfloat16)
    rows = [([-(i + 1)], list(range(1 + i * P, 1 + (i + 1) * P)), ctx) for i in range(b)]
    hb_b = build_host_batch(rows, ps, (b, b, P), [(SamplingParams(), ctx - _INPUT.value)] * b)
    ints_b = jnp.asarray(hb_b.ints)
    state[key] = (jnp.asarray(np.random.default_rng(b).integers(1, 1000, b), jnp.int32), cache)

    def step_b():
      tok, _, c = step_jit(params, ints_b, *state[key], forward=fwd, shape=(b, b, P),
                           greedy=True)
      state[key] = (tok, c)
      return tok

    result[key] = time_calls(step_b, 20)
    result[key]["kernels"] = traced(key, step_b)
    logging.info("%s %s", key, {k: v for k, v in result[key].items() if k != "kernels"})
    del state[key], cache
    save()
  result["roofline_s"] = {"3.0TB/s": result["decode_read_bytes"] / 3.0e12}
  if jax.default_backend() == "gpu":
    result["ceilings"] = measure_device_ceilings()
    result["roofline_s"]["measured_bw"] = (result["decode_read_bytes"]
                                           / result["ceilings"]["hbm_bytes_per_s"])
  save()
  return result


# ---------------------------------------------------------------------------------------------
# HF transformers peer


def run_hf() -> dict:
  """Each level: --requests_per_user batches of c prompts (the jax closed loop's requests, same
  prompts) through ``generate`` back to back (static cache, greedy, exactly --output_len tokens). transformers compiles the decode step itself when the cache is static
  (--hf_compile); the warm-up calls run the timed shapes (same batch, prompt and output lengths, so
  the same static cache and compiled graph), so no compile is timed. A streamer stamps each new
  token as it reaches the host (generate copies it there every step): TTFT, ITL, TPOT."""
  import torch
  import transformers

  shape = llama_shape(_MODEL.value)
  config = transformers.LlamaConfig(
      vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
      num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
      num_key_value_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
      intermediate_size=shape["intermediate_size"], rope_theta=shape.get("rope_theta", 10000.0),
      max_position_embeddings=shape["max_position_embeddings"])
  torch.manual_seed(_SEED.value)
  torch.set_default_dtype(torch.bfloat16)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  t = time.perf_counter()
  with torch.device(device):
    model = transformers.LlamaForCausalLM(config).eval()
  result = {"engine": "hf-transformers", "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "model": _MODEL.value, "input_len": _INPUT.value, "output_len": _OUTPUT.value,
            "cache": "static", "torch_compile": _HF_COMPILE.value,
            "requests_per_user": _PER_USER.value, "init_s": time.perf_counter() - t, "levels": {}}
  rng = np.random.default_rng(_SEED.value)

  class Stamps:  # generate's streamer protocol: put(tokens) each step, end()
    def __init__(self):
      self.times = []

    def put(self, value):
      self.times.append(time.perf_counter())   # the first put is the prompt

    def end(self):
      pass

  def gen(ids, compile_: bool):
    stamps = Stamps()
    sync()
    t = time.perf_counter()
    gc = transformers.GenerationConfig(
        max_new_tokens=_OUTPUT.value, min_new_tokens=_OUTPUT.value, do_sample=False,
        cache_implementation="static", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    gc.disable_compile = not compile_
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                           streamer=stamps)
    sync()
    total = time.perf_counter() - t
    if out.shape[1] != ids.shape[1] + _OUTPUT.value:
      raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, not {_OUTPUT.value}")
    token_times = stamps.times[1:]
    return {"requests": ids.shape[0], "output_tokens": ids.shape[0] * _OUTPUT.value,
            "wall_s": total, "ttft_s": token_times[0] - t,
            "tpot_s": (token_times[-1] - token_times[0]) / (len(token_times) - 1),
            "itl_s": np.diff(token_times).tolist()}

  def timed_batches(batches, compile_: bool) -> dict:
    """The static-batch server at concurrency c: the users' k-th requests form batch k, run back
    to back (user u's next request arrives when its batch ends), so --requests_per_user batches
    serve the closed loop's requests, the jax run's prompts (``prompt_set``) in order."""
    sync()
    t = time.perf_counter()
    runs = [gen(b, compile_) for b in batches]
    wall = time.perf_counter() - t
    itl = [x for r in runs for x in r["itl_s"]]
    tokens = sum(r["output_tokens"] for r in runs)
    return {"requests": sum(r["requests"] for r in runs), "output_tokens": tokens, "wall_s": wall,
            "batches": len(runs), "batch_wall_s": [r["wall_s"] for r in runs],
            "ttft_s": {"p50": float(np.median([r["ttft_s"] for r in runs])),
                       "per_batch": [r["ttft_s"] for r in runs]},
            "tpot_s": {"p50": float(np.median([r["tpot_s"] for r in runs]))},
            "itl_s": {"p50": float(np.percentile(itl, 50)), "p99": float(np.percentile(itl, 99))},
            "tokens_per_s_per_gpu": tokens / wall,
            "tokens_per_s_per_user": float(np.median([1.0 / r["tpot_s"] for r in runs]))}

  def save():
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)

  levels = [int(c) for c in _CONC.value] + [int(c) for c in _EXTRA_CONC.value]
  for i, c in enumerate(levels):
    if i >= len(_CONC.value) and time.perf_counter() - T_START > _TIME_BUDGET.value:
      result.setdefault("skipped_levels", []).append(c)
      continue
    prompts = prompt_set(_PER_USER.value * c, shape["vocab_size"], rng)
    batches = [torch.tensor(prompts[k * c:(k + 1) * c], device=device)
               for k in range(_PER_USER.value)]
    ids = batches[0]
    modes = ([False] if _HF_EAGER_TOO.value or not _HF_COMPILE.value else []) + (
        [True] if _HF_COMPILE.value else [])
    for compile_ in modes:
      key = "levels" if compile_ == _HF_COMPILE.value else "levels_eager"
      try:
        t = time.perf_counter()
        gen(ids, compile_)                       # compiles (static cache of the timed shape)
        warmup_s = time.perf_counter() - t
        if compile_:
          gen(ids, compile_)                     # CUDA graphs are recorded on a later call
        r = timed_batches(batches, compile_) | {"warmup_s": warmup_s, "torch_compile": compile_}
      except Exception as e:  # noqa: BLE001  (recorded: the eager run, if asked, still goes on)
        r = {"error": f"{type(e).__name__}: {e}"[:1000], "torch_compile": compile_}
      if "error" in r:
        result.setdefault("errors", {})[f"{c}_{'compiled' if compile_ else 'eager'}"] = r
      else:
        result.setdefault(key, {})[str(c)] = r
      logging.info("hf c=%d compile=%s %s", c, compile_, r)
      save()
  result["total_s"] = time.perf_counter() - T_START
  return result


# ---------------------------------------------------------------------------------------------
# report


def report_series(runs: list[dict]) -> list[tuple[str, dict]]:
  """(label, {concurrency: level summary}) per engine run, HF's eager levels as their own series."""
  series = []
  for run in runs:
    compiled = run.get("torch_compile")
    label = run["engine"] + ("" if compiled is None else " (torch.compile)" if compiled else
                             " (eager)")
    if run.get("weights") == "fp8":
      label += " FP8 weights (W8A8)"
    series.append((label, run.get("levels", {})))
    if run.get("levels_eager"):
      series.append((run["engine"] + " (eager)", run["levels_eager"]))
  return [(label, lv) for label, lv in series if lv]


def targets(jax_run: dict | None, hf_run: dict | None, fp8_run: dict | None = None) -> dict:
  """The issue's two targets from the runs' own numbers: output tokens/s against HF at c=64
  (>= 3x; against the compiled peer when it ran, else eager, labelled), and the batch-1 decode
  step against the weight-read roofline (<= 1.3x; at the in-run read bandwidth and at 3.0 TB/s)."""
  out = {}
  if jax_run and hf_run:
    jl = jax_run.get("levels", {}).get("64")
    for key, label in (("levels", "hf"), ("levels_eager", "hf_eager")):
      hl = hf_run.get(key, {}).get("64")
      if jl and hl:
        name = label if key == "levels_eager" or not hf_run.get("torch_compile") else "hf_compiled"
        out[f"c64_tokens_per_s_vs_{name}"] = (jl["tokens_per_s_per_gpu"]
                                              / hl["tokens_per_s_per_gpu"])
  hl = (hf_run or {}).get("levels", {}).get("64")
  fl = (fp8_run or {}).get("levels", {}).get("64")
  if hl and fl:   # quantized ours vs bf16 HF: a separate row, not the bf16 target
    out["c64_fp8_weights_tokens_per_s_vs_hf_bf16_NOT_the_target"] = (
        fl["tokens_per_s_per_gpu"] / hl["tokens_per_s_per_gpu"])
  if jax_run and "batch1_decode" in jax_run:
    b1 = jax_run["batch1_decode"]
    out["batch1_step_over_roofline"] = b1["ratio"]
    out["batch1_step_over_roofline_3TBps"] = b1["step_s_p50"] / (jax_run["decode_read_bytes"]
                                                                 / 3.0e12)
  return out


def report() -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  load = lambda p: json.load(open(p)) if p and os.path.exists(p) else None
  jax_run, hf_run, fp8_run = load(_JAX_JSON.value), load(_HF_JSON.value), load(_JAX_FP8_JSON.value)
  if jax_run and jax_run.get("weights") == "fp8":
    raise ValueError("--jax_json must be the bf16 run (the target's); pass FP8 as --jax_fp8_json")
  runs = [r for r in (jax_run, fp8_run, hf_run) if r]
  series = report_series(runs)
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for label, levels in series:
    pts = sorted((int(c), v) for c, v in levels.items())
    x = [v["tokens_per_s_per_user"] for _, v in pts]
    y = [v["tokens_per_s_per_gpu"] for _, v in pts]
    ax.plot(x, y, "o-", label=label)
    for (c, _), xi, yi in zip(pts, x, y):
      ax.annotate(f"c={c}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set_xlabel("interactivity: output tokens/s per user")
  ax.set_ylabel("throughput: output tokens/s per GPU")
  ax.set_title(f"Llama-3-8B-shaped, random weights ({runs[0].get('device', '?')})")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(_OUT.value.removesuffix(".json") + ".png", dpi=120)
  rows = ["| engine | c | out tok/s/GPU | tok/s/user | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "ITL p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
  ms = lambda d, k: "-" if d.get(k) is None else f"{1e3 * d[k]:.1f}"
  for label, levels in series:
    for c, v in sorted(levels.items(), key=lambda kv: int(kv[0])):
      itl = v.get("itl_s", {})
      rows.append(f"| {label} | {c} | {v['tokens_per_s_per_gpu']:.0f} | "
                  f"{v['tokens_per_s_per_user']:.1f} | {ms(v['ttft_s'], 'p50')} / "
                  f"{ms(v['ttft_s'], 'p99')} | {ms(v['tpot_s'], 'p50')} / {ms(v['tpot_s'], 'p99')} | "
                  f"{ms(itl, 'p50')} / {ms(itl, 'p99')} |")
  if jax_run and "poisson" in jax_run:
    v = jax_run["poisson"]
    rows.append(f"| jaxinfer, Poisson {v['rate_per_s']:g} req/s | <={v['max_batch']} | "
                f"{v['tokens_per_s_per_gpu']:.0f} | {v['tokens_per_s_per_user']:.1f} | "
                f"{ms(v['ttft_s'], 'p50')} / {ms(v['ttft_s'], 'p99')} | {ms(v['tpot_s'], 'p50')} / "
                f"{ms(v['tpot_s'], 'p99')} | {ms(v['itl_s'], 'p50')} / {ms(v['itl_s'], 'p99')} |")
  table = "\n".join(rows)
  goals = targets(jax_run, hf_run, fp8_run)
  print(table)
  print("targets:", goals)
  with open(_OUT.value, "w") as f:
    json.dump({"targets": goals, "runs": runs}, f, indent=1)
  with open(_OUT.value.removesuffix(".json") + "_table.md", "w") as f:
    f.write(table + "\n")


def main(argv) -> None:
  del argv
  if _CB_UPDATE_MODE.value and "xla_gpu_command_buffer_update_mode" not in os.environ.get(
      "XLA_FLAGS", ""):   # before JAX starts its backend (jax is imported inside the runs)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_gpu_command_buffer_update_mode={_CB_UPDATE_MODE.value}")
  if _ENGINE.value == "report":
    report()
    return
  if _ENGINE.value == "batch1":
    result = run_batch1()
    for key, v in result["variants"].items():
      if "error" in v:
        print(f"{key:>24}: {v['error'][:300]}")
        continue
      k = v.get("decode_kernels", {})
      print(f"{key:>24}: step p50 {1e3 * v['step_s']['p50']:.3f} ms = "
            f"{v['over_bf16_roofline']:.3f}x bf16 roofline; kernels/step "
            f"{k.get('kernels_per_step')}, busy {k.get('busy_ms_per_step')}")
    return
  if _ENGINE.value == "profile":
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    result = run_profile()
    for key, v in result.items():
      if isinstance(v, dict) and "blocked_s" in v:
        k = v.get("kernels", {})
        print(f"{key:>24}: blocked p50 {1e3 * v['blocked_s']['p50']:.2f} ms, pipelined "
              f"{1e3 * v['pipelined_s']:.2f} ms, GPU busy {k.get('busy_ms_per_step', 0):.2f} / span "
              f"{k.get('span_ms_per_step', 0):.2f} ms, "
              f"{ {c: round(v['ms_per_step'], 2) for c, v in k.get('by_category', {}).items()} }")
    print({k: v for k, v in result.items() if not isinstance(v, dict) or k in (
        "engine_step", "roofline_s", "ceilings")})
    print("engine kernels", {k: v for k, v in result.get("engine_kernels", {}).items()
                             if k != "top_kernels"})
    return
  result = run_jax() if _ENGINE.value == "jax" else run_hf()
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=1)
  rows = [f"{result['engine']} {c:>4}: {v['tokens_per_s_per_gpu']:9.1f} tok/s/GPU "
          f"{v['tokens_per_s_per_user']:7.1f} tok/s/user  TTFT p50 {1e3 * v['ttft_s']['p50']:8.1f} ms"
          f"  TPOT p50 {1e3 * v['tpot_s']['p50']:7.2f} ms"
          for c, v in sorted(result["levels"].items(), key=lambda kv: int(kv[0]))]
  print("\n".join(rows))
  if "batch1_decode" in result:
    print("batch-1 decode:", result["batch1_decode"])


if __name__ == "__main__":
  app.run(main)
