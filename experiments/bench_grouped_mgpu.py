"""Grouped NVFP4 decode on Mosaic GPU (kernels/grouped_nvfp4_matmul_mgpu.py) on the GPU: float64
checks at small odd shapes, then the issue's grouped decode target (T=64, E=32, K=7168, N=2048,
uniform and skewed routing) against jax.lax.ragged_dot (bf16) and the Triton kernel-layout default
(x in f16, as the public op runs it), in one run. Same method as experiments/bench_gemm.py's
grouped section (self-contained: experiments are separate binaries): R = 3 weight sets per jit
(more bytes than L2), the jit dispatched back-to-back, wall time per call, median of --reps; each
variant float64-checked on its own timed output; optional GPU kernel time from a profiler trace.

  PYTHONPATH=. python3 experiments/bench_grouped_mgpu.py --out=$OUT/grouped.json \
      --gm_sections=check,target --gm_variants="mgpu,mgpu s6"
"""
from __future__ import annotations

import json
import os
import re
import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import gemm_timing
from kernels import grouped_matmul as gk
from kernels import grouped_nvfp4_matmul_mgpu as gm
from kernels.quant import nvfp4

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/grouped_mgpu.json", "JSON results path")
flags.DEFINE_integer("reps", 5, "timed repetitions (median)")
flags.DEFINE_float("rep_seconds", 0.03, "target wall time of one repetition")
flags.DEFINE_float("budget_s", 420.0, "skip remaining work after this many seconds")
flags.DEFINE_integer("shrink", 1, "divide the big dims by this (CPU dry runs, with --interpret)")
flags.DEFINE_bool("interpret", False, "run the Mosaic kernel in interpret mode (CPU dry run)")
flags.DEFINE_string("device_time", "", "regex: impls whose GPU kernel time per call is also read "
                    "from a profiler trace (dev_us, span_us, per kernel)")


class _Bench:
  """The subset of experiments/bench_gemm.py this script uses (same timing and records)."""
  RESULTS: list[dict] = []
  CEIL = {"read_tbs": 3.05}
  T0 = time.time()
  E2M1_F64 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])

  @staticmethod
  def D(x: int) -> int:
    return max(16, x // FLAGS.shrink)

  @classmethod
  def over_budget(cls) -> bool:
    return time.time() - cls.T0 > FLAGS.budget_s

  @staticmethod
  def bench(fn, argsets, first_out=None, jitted=None) -> float:
    return gemm_timing.wall_seconds_per_call(fn, argsets, reps=FLAGS.reps,
                                             rep_seconds=FLAGS.rep_seconds,
                                             first_out=first_out, jitted=jitted)

  @classmethod
  def record(cls, section, name, shape, impl, seconds=None, bytes_=0, flops=0, err=None,
             note="", error=None):
    r = {"section": section, "name": name, "shape": shape, "impl": impl, "note": note}
    if seconds is not None:
      r["us"] = seconds * 1e6
      r["tbs"] = bytes_ / seconds / 1e12 if bytes_ else None
      r["tflops"] = flops / seconds / 1e12 if flops else None
      r["roofline_frac"] = bytes_ / (cls.CEIL["read_tbs"] * 1e12) / seconds if bytes_ else None
    if err is not None:
      r["rel_err"] = err
    if error is not None:
      r["error"] = error
    cls.RESULTS.append(r)
    us = f"{r['us']:9.1f}" if "us" in r else "        -"
    print(f"[{section}] {name:28s} {impl:34s} {us} us  tbs={r.get('tbs') or 0:5.2f} "
          f"roof={r.get('roofline_frac') or 0:4.2f} err={err if err is not None else '-'} "
          f"{note} {('ERROR ' + error) if error else ''}", flush=True)
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "ceilings": cls.CEIL, "results": cls.RESULTS}, f, indent=1)
    return r

  @staticmethod
  def device_times(f, argsets, calls: int = 3) -> dict:
    return gemm_timing.device_times(f, argsets, calls, prefix="grouped_trace_")

  @classmethod
  def attempt(cls, section, name, shape, impl, fn, argsets, bytes_=0, flops=0, ref=None,
              note=""):
    """Check fn(*argsets[0]) against ref (its timed jit's first output), then time it; record
    errors, never raise."""
    if cls.over_budget():
      return cls.record(section, name, shape, impl, note="skipped (budget)")
    try:
      err = None
      first, jitted = [], []
      s = cls.bench(fn, argsets, first, jitted)
      if ref is not None:
        err = cls.err64(first[0], ref)
      del first
      if FLAGS.device_time and re.search(FLAGS.device_time, impl):
        try:
          dt = cls.device_times(jitted[0], argsets)
          note = (f"{note} dev_us={dt.get('dev_us', float('nan')):.2f} "
                  f"span_us={dt.get('span_us', float('nan')):.2f} kernels={dt.get('kernels')}")
        except Exception as e:  # noqa: BLE001
          note = f"{note} device_time failed: {type(e).__name__}: {e}"[:800]
      return cls.record(section, name, shape, impl, s, bytes_, flops, err, note)
    except Exception as e:  # noqa: BLE001 - a failing variant must not end the run
      traceback.print_exc(limit=2)
      return cls.record(section, name, shape, impl, note=note,
                        error=f"{type(e).__name__}: {e}"[:600])

  @staticmethod
  def keys(n):
    return jax.random.split(jax.random.key(int(time.time() * 1e3) % 2**31), n)

  @classmethod
  def dequant_f64(cls, packed, scale, gs) -> np.ndarray:
    p = np.asarray(packed)
    codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[0], -1)
    s = np.asarray(jnp.asarray(scale, jnp.float32), np.float64)
    return cls.E2M1_F64[codes] * np.repeat(s, 16, axis=1) * float(gs)

  @staticmethod
  def err64(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    if not np.all(np.isfinite(y)):
      return float("nan")
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))

  _routing = staticmethod(gemm_timing.routing_group_sizes)

  @classmethod
  def sec_ceil(cls):
    x = jax.random.normal(jax.random.key(1), (cls.D(256 * 1024 * 1024),), jnp.float32)  # 1 GiB
    s = cls.bench(lambda a: jnp.sum(a), [(x,)])
    cls.CEIL["read_tbs"] = x.nbytes / s / 1e12
    cls.record("ceil", "read stream 1GiB f32", "", "xla sum", s, x.nbytes)


bg = _Bench
flags.DEFINE_list("gm_sections", ["check", "target"],
                  "check (small odd shapes), target, ceil, profile (for ncu)")
flags.DEFINE_list("gm_cases", ["64u", "64s"], "target routings: T + u(niform) / s(kewed)")
flags.DEFINE_list("gm_variants", ["mgpu"],
                  "Mosaic variants: 'mgpu' (the default tiling) + tokens r<rows> c<consumers> "
                  "m<strips per consumer> s<stages> p<ctas> a (automatic barriers on) k (in-kernel "
                  "work list) t (stream-K tail) P / P0 (programmatic dependent launch on / off) "
                  "K<K tiles per step>")
flags.DEFINE_list("gm_check_variants", ["mgpu", "mgpu k c1 m2 s3 p5", "mgpu K4 s2 p5",
                                        "mgpu t s2 p4"],
                  "variants of the small-shape check")
flags.DEFINE_integer("gm_profile_calls", 2, "profile section: calls inside the profiler range")
flags.DEFINE_list("gm_baselines", ["ragged_dot", "triton", "op"],
                  "peers timed in the same run (op: the public gemm.grouped_matmul on the mgpu "
                  "layout)")


def variant(name: str, t_rows: int, e: int, k_of_variant: int | None = None
            ) -> gm.GroupedMgpuTiling:
  kw = {}
  for p in name.split("@")[0].split()[1:]:
    if p in ("P", "P0"):
      kw["pdl"] = p == "P"
    elif p[0] == "K":
      kw["k_per_step"] = int(p[1:])
    elif p[0] == "r":
      kw["block_rows"] = int(p[1:])
    elif p[0] == "c":
      kw["consumers"] = int(p[1:])
    elif p[0] == "s":
      kw["stages"] = int(p[1:])
    elif p[0] == "p":
      kw["ctas"] = int(p[1:])
    elif p == "a":
      kw["no_auto_barriers"] = False
    elif p[0] == "m":
      kw["strips"] = int(p[1:])
    elif p == "k":
      kw["work_list"] = "kernel"
    elif p == "t":
      kw["tail"] = True
  return gm.default_tiling(t_rows, e, k=k_of_variant, **kw)


def ref64(x, w64, sizes) -> np.ndarray:
  x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref = np.zeros((x64.shape[0], w64[0].shape[0]))
  start = 0
  for i, c in enumerate(sizes):
    c = max(0, min(int(c), x64.shape[0] - start))
    if c:
      ref[start:start + c] = x64[start:start + c] @ w64[i].T
    start += c
  return ref


def quantized(key, e, n, k):
  p, s, g = jax.jit(jax.vmap(nvfp4.quantize))(
      jax.random.normal(key, (e, n, k), jnp.float32).astype(jnp.bfloat16))
  return p, s, g


CHECK_CASES = [   # T, E, N, K, group sizes
    (12, 3, 200, 272, [5, 0, 6]),            # rows past the total, N % 64, K % 256
    (37, 5, 384, 2048, [0, 20, 0, 9, 8]),    # a group > 16 rows, empty groups
    (64, 4, 128, 768, [64, 0, 0, 0]),        # one expert takes every row
    (5, 4, 64, 256, [1, 0, 3, 0]),           # T < 8
]                                            # (the target shape: checked by sec_target)


def sec_check():
  for t_rows, e, n, k, sizes in CHECK_CASES:
    t_rows, n, k = (t_rows, n, k) if FLAGS.shrink == 1 or k < 1024 else (t_rows, bg.D(n), bg.D(k))
    p, s, g = quantized(bg.keys(1)[0], e, n, k)
    w64 = [bg.dequant_f64(p[i], s[i], g[i]) for i in range(e)]
    w = gm.to_grouped_mgpu_layout(p, s)
    x = jax.random.normal(bg.keys(1)[0], (t_rows, k), jnp.bfloat16) * 3
    gs = jnp.asarray(sizes, jnp.int32)
    ref = ref64(x, w64, sizes)
    shape = f"T{t_rows} E{e} N{n} K{k} {sizes if len(sizes) < 8 else 'uniform'}"
    for name in FLAGS.gm_check_variants:
      try:
        t = variant(name, t_rows, e, k)
        y = gm.grouped_w4a16_mgpu(x, w, g, gs, n=n, tiling=t, interpret=FLAGS.interpret)
        bg.record("gmcheck", shape, shape, name, err=bg.err64(y, ref), note=str(t))
      except Exception as ex:  # noqa: BLE001
        traceback.print_exc(limit=3)
        bg.record("gmcheck", shape, shape, name, error=f"{type(ex).__name__}: {ex}"[:600])


def sec_target():
  e, k, n = 32, bg.D(7168), bg.D(2048)
  key_w, key_x = bg.keys(2)
  sets = []
  for kk in jax.random.split(key_w, 3):
    p, s, g = quantized(kk, e, n, k)
    kl = (nvfp4.to_kernel_layout(p), s, g) if k % nvfp4.KERNEL_TILE == 0 else None
    sets.append({"nv": (p, s, g), "kl": kl,
                 "mg": (jax.block_until_ready(jax.jit(gm.to_grouped_mgpu_layout)(p, s)), g)})
  w64 = [bg.dequant_f64(sets[0]["nv"][0][i], sets[0]["nv"][1][i], sets[0]["nv"][2][i])
         for i in range(e)]
  bf = ([jax.random.normal(kk, (e, k, n), jnp.bfloat16) for kk in jax.random.split(key_w, 2)]
        if "ragged_dot" in FLAGS.gm_baselines else [])
  for case in FLAGS.gm_cases:
    t_rows, skew = int(case[:-1]), case[-1] == "s"
    if bg.over_budget():
      return
    gs = bg._routing(t_rows, e, skew)
    sizes = np.asarray(gs)
    active = int((sizes > 0).sum())
    xs = [jax.random.normal(kk, (t_rows, k), jnp.bfloat16) for kk in jax.random.split(key_x, 3)]
    ref = ref64(xs[0], w64, sizes)
    io = t_rows * k * 2 + t_rows * n * 2
    flops = 2 * t_rows * k * n
    nv_bytes = active * k * n * 9 // 16 + io
    shape = f"T{t_rows} E{e} K{k} N{n} {'skewed' if skew else 'uniform'}"
    base = None
    if bf:
      base = bg.attempt("gm", shape, shape, "jax.lax.ragged_dot bf16",
                        lambda x, w: jax.lax.ragged_dot(x, w, gs), list(zip(xs, bf)),
                        active * k * n * 2 + io, flops, note=f"active={active}")
    results = []
    for name in FLAGS.gm_variants:
      t = variant(name, t_rows, e, k)
      results.append(bg.attempt(
          "gm", shape, shape, name,
          lambda x, w, g, t=t: gm.grouped_w4a16_mgpu(x, w, g, gs, n=n, tiling=t,
                                                     interpret=FLAGS.interpret),
          [(x, *st["mg"]) for x, st in zip(xs, sets)], nv_bytes, flops, ref=ref, note=str(t)))
    if "op" in FLAGS.gm_baselines and not FLAGS.interpret:   # the public op (its dispatch)
      from kernels import gemm                                   # noqa: PLC0415
      from kernels.quant.weights import GroupedNVFP4Weight       # noqa: PLC0415
      results.append(bg.attempt(
          "gm", shape, shape, "op gemm.grouped_matmul (mgpu layout)",
          lambda x, w: gemm.grouped_matmul(x, w, gs),
          [(x, GroupedNVFP4Weight(st["mg"][0], st["nv"][1], st["nv"][2], layout="mgpu"))
           for x, st in zip(xs, sets)], nv_bytes, flops, ref=ref))
    if "triton" in FLAGS.gm_baselines and not FLAGS.interpret and sets[0]["kl"] is not None:
      t = gk.default_kl_tiling(t_rows, e, k)
      results.append(bg.attempt(
          "gm", shape, shape, "triton kl default x16in",
          lambda x, p, s, g, t=t: gk.grouped_matmul_nvfp4_kl(x, p, s, g, gs, tiling=t,
                                                             out_dtype=jnp.bfloat16),
          [(x.astype(jnp.float16), *st["kl"]) for x, st in zip(xs, sets)], nv_bytes, flops,
          ref=ref, note=str(t)))
    good = [r for r in results if "us" in r and r.get("rel_err", 1) < 1e-2]
    if good and base is not None and "us" in base:
      best = min(good, key=lambda r: r["us"])
      bg.record("gm", shape, shape, "SPEEDUP best verified/ragged_dot",
                note=f"{base['us'] / best['us']:.2f}x ({best['impl']}); "
                     f"{best['tbs'] / bg.CEIL['read_tbs']:.0%} of read bw")


def sec_profile():
  """The first --gm_variants tiling at the uniform target shape: compiled and run once, then
  --gm_profile_calls calls between cuProfilerStart / cuProfilerStop (for ncu --profile-from-start
  off)."""
  import ctypes   # noqa: PLC0415
  e, k, n, t_rows = 32, bg.D(7168), bg.D(2048), 64
  p, s, g = quantized(bg.keys(1)[0], e, n, k)
  w = jax.block_until_ready(jax.jit(gm.to_grouped_mgpu_layout)(p, s))
  x = jax.random.normal(bg.keys(1)[0], (t_rows, k), jnp.bfloat16)
  gs = bg._routing(t_rows, e, False)
  t = variant(FLAGS.gm_variants[0], t_rows, e, k)
  f = jax.jit(lambda x, w, g: gm.grouped_w4a16_mgpu(x, w, g, gs, n=n, tiling=t,
                                                    interpret=FLAGS.interpret))
  jax.block_until_ready(f(x, w, g))
  cu = ctx = None
  if not FLAGS.interpret:
    cu, ctx, dev = ctypes.CDLL("libcuda.so.1"), ctypes.c_void_p(), ctypes.c_int()
    cu.cuInit(0)
    cu.cuDeviceGet(ctypes.byref(dev), 0)
    cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)

  def prof(name):
    if cu is not None:
      cu.cuCtxPushCurrent(ctx)
      getattr(cu, name)()
      cu.cuCtxPopCurrent(ctypes.byref(ctypes.c_void_p()))
  prof("cuProfilerStart")
  for _ in range(FLAGS.gm_profile_calls):
    out = f(x, w, g)
  jax.block_until_ready(out)
  prof("cuProfilerStop")
  print("profiled", FLAGS.gm_profile_calls, "calls of", t, flush=True)


def main(argv):
  del argv
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  sections = {"ceil": bg.sec_ceil, "check": sec_check, "target": sec_target,
              "profile": sec_profile}
  for name in FLAGS.gm_sections:
    if bg.over_budget():
      print("budget exhausted before", name)
      break
    print(f"=== {name} ({time.time() - bg.T0:.0f}s)", flush=True)
    try:
      sections[name]()
    except Exception:  # noqa: BLE001
      traceback.print_exc()
  print("\n==== summary ====")
  for r in bg.RESULTS:
    print(f"{r['section']:8s} {r['shape']:36s} {r['impl']:32s} "
          f"{r.get('us', float('nan')):9.1f}us tbs={r.get('tbs') or 0:5.2f} "
          f"roof={r.get('roofline_frac') or 0:4.2f} err={r.get('rel_err', '-')} "
          f"{r['note'] if 'SPEEDUP' in r['impl'] else ''}"
          f"{' ERR ' + r['error'][:200] if 'error' in r else ''}")
  print(f"total {time.time() - bg.T0:.0f}s")


if __name__ == "__main__":
  app.run(main)
