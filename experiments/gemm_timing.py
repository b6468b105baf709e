"""Helpers shared by the GEMM benchmarks (bench_gemm, bench_grouped_mgpu): wall time per call of a
function over R independent argument sets in one jit, GPU kernel time from a profiler trace of
that jit, and the MoE routings the grouped cases time."""
from __future__ import annotations

import math
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def wall_seconds_per_call(fn, argsets, *, reps: int, rep_seconds: float, first_out=None,
                          jitted=None) -> float:
  """Seconds per call of fn(*args), averaged over the R argsets in one jit dispatched
  back-to-back; median of ``reps`` repetitions of ~``rep_seconds`` each. ``first_out`` (a list)
  receives fn(*argsets[0]) from the first (compiling) call, ``jitted`` (a list) the jitted
  function of all argsets."""
  f = jax.jit(lambda sets: [fn(*a) for a in sets])
  if jitted is not None:
    jitted.append(f)
  outs = jax.block_until_ready(f(argsets))
  if first_out is not None:
    first_out.append(outs[0])
  del outs
  t = time.perf_counter()
  jax.block_until_ready(f(argsets))
  one = time.perf_counter() - t
  iters = int(min(50, max(2, math.ceil(rep_seconds / max(one, 1e-6)))))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    out = None
    for _ in range(iters):
      out = f(argsets)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / (iters * len(argsets)))
  return statistics.median(times)


def device_times(f, argsets, calls: int = 3, prefix: str = "gemm_trace_") -> dict:
  """GPU time per call of the jitted ``f`` over ``argsets`` from a profiler trace of ``calls``
  calls: kernel time summed (dev_us), first kernel start to last end (span_us), the six longest
  kernels. Empty where the trace has no GPU kernels (CPU)."""
  from experiments import gpu_trace   # noqa: PLC0415
  d = tempfile.mkdtemp(prefix=prefix)
  jax.block_until_ready(f(argsets))
  with jax.profiler.trace(d):
    out = None
    for _ in range(calls):
      out = f(argsets)
    jax.block_until_ready(out)
  pd = gpu_trace.load_trace(d)
  if pd is None:
    return {}
  kernels, intervals, _ = gpu_trace.gpu_kernel_events(pd)
  n = calls * len(argsets)
  if not intervals:
    return {}
  per = {re.sub(r"\s+", " ", k)[:60]: v[0] / n / 1e3 for k, v in kernels.items()}
  return {"dev_us": sum(v[0] for v in kernels.values()) / n / 1e3,
          "span_us": (intervals[-1][1] - intervals[0][0]) / n / 1e3,
          "kernels": dict(sorted(per.items(), key=lambda kv: -kv[1])[:6])}


def routing_group_sizes(t_rows: int, e: int, skewed: bool) -> jax.Array:
  """Rows per expert for ``t_rows`` routed rows over ``e`` experts: uniform, or a Zipf(1.2)
  multinomial (seed 0) over randomly permuted experts."""
  if not skewed:
    return jnp.full((e,), t_rows // e, jnp.int32)
  probs = 1.0 / np.arange(1, e + 1) ** 1.2
  rng = np.random.default_rng(0)
  sizes = rng.multinomial(t_rows, probs / probs.sum())
  return jnp.asarray(rng.permutation(sizes), jnp.int32)
