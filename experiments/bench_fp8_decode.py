"""The Mosaic GPU FP8 decode GEMM (kernels/fp8_decode_matmul_mgpu.py) on the GPU: float64 checks and
GPU time per GEMM against XLA's FP8 path as ops uses it (cuBLASLt split-K partials
``ops.fp8_dot_partials`` at ``ops.fp8_split_k``'s split, or ``ops.fp8_dot``) and XLA's bf16 dot.

Timing: ``sets`` independent weight sets (> 200 MB in all, so no set is L2-resident) applied in
one jit; GPU time per GEMM from a profiler trace (kernel time summed / GEMMs: dev_us; span of the
whole jit / GEMMs: span_us) and wall time of back-to-back calls / GEMMs (wall_us).

  PYTHONPATH=. python3 experiments/bench_fp8_decode.py --out=$OUT/fp8dec.json
"""
from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import ops
from kernels import fp8_decode_matmul_mgpu as fd

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/fp8dec.json", "JSON output")
flags.DEFINE_string("cases", "odd,64,1", "comma list: odd (small odd shapes, float64 only), "
                    "64 / 1 / <R> (the four Llama-3-8B shapes at R rows)")
flags.DEFINE_string("shapes", "wqkv,wo,gate_up,down,lm_head", "Llama shapes to run")
flags.DEFINE_string("variants", "", "extra tilings per Llama shape: ';'-separated "
                    "'shape:tile_n,split_k,tile_k,stages[,w][,p1|p2][,l<d>][,r]' (w: wait_prev, p: pdl, l: l2_ahead, r: rotate), e.g. "
                    "'wo:128,4,128,8;down:256,8,128,5,w'")
flags.DEFINE_bool("peers", True, "time XLA's FP8 paths and the bf16 dot too")
flags.DEFINE_string("peer_impls", "xla_fp8_split,xla_fp8_dot,xla_bf16", "which peers (--peers)")
flags.DEFINE_bool("interpret", False, "CPU smoke: interpret mode, tiny shapes, no timing")
flags.DEFINE_integer("min_bytes", 200 << 20, "weight bytes per timed jit (sets of weights)")
flags.DEFINE_integer("reps", 5, "wall-time repetitions (median)")
flags.DEFINE_float("budget_s", 170, "stop starting new cases after this many seconds")
flags.DEFINE_bool("profile", True, "GPU time from a profiler trace (off under ncu)")

LLAMA = {"wqkv": (6144, 4096), "wo": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
         "lm_head": (128256, 4096)}
T0 = time.time()
RESULTS: list[dict] = []


def dump():
  with open(FLAGS.out, "w") as f:
    json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "results": RESULTS}, f, indent=1)


def record(**kw):
  RESULTS.append(kw)
  print("[fp8dec]", json.dumps(kw)[:600], flush=True)
  dump()


def rand_fp8(key, shape, scale=1.0):
  return (jax.random.normal(key, shape, jnp.float32) * scale).astype(jnp.float8_e4m3fn)


def f64_check(y, x, w, cols=None) -> float:
  """max |y - x.w^T| / max |x.w^T| in float64 over columns ``cols`` (all if None); y may be
  partials [S, R, N]."""
  y = np.asarray(jax.device_get(y), np.float64)
  if y.ndim == 3:
    y = y.sum(0)
  xn = np.asarray(jax.device_get(x).astype(np.float32), np.float64)
  wn = jax.device_get(w if cols is None else w[cols])
  ref = xn @ np.asarray(wn.astype(np.float32), np.float64).T
  if cols is not None:
    y = y[:, cols]
  if not np.all(np.isfinite(y)):
    return float("inf")
  return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def device_times(f, args, gemms: int, calls: int = 3) -> dict:
  from experiments import gpu_trace   # noqa: PLC0415
  d = tempfile.mkdtemp(prefix="fp8dec_trace_")
  jax.block_until_ready(f(*args))
  with jax.profiler.trace(d):
    out = None
    for _ in range(calls):
      out = f(*args)
    jax.block_until_ready(out)
  pd = gpu_trace.load_trace(d)
  if pd is None:
    return {}
  kernels, intervals, _ = gpu_trace.gpu_kernel_events(pd)
  if not intervals:
    return {}
  n = calls * gemms
  per = {re.sub(r"\s+", " ", k)[:70]: round(v[0] / n / 1e3, 2) for k, v in kernels.items()}
  return {"dev_us": sum(v[0] for v in kernels.values()) / n / 1e3,
          "busy_us": gpu_trace.busy_ns(intervals) / n / 1e3,
          "kernels": dict(sorted(per.items(), key=lambda kv: -kv[1])[:5])}


def wall_us(f, args, gemms: int) -> float:
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(FLAGS.reps):
    t = time.perf_counter()
    out = None
    for _ in range(5):
      out = f(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t) / 5 / gemms * 1e6)
  return statistics.median(ts)


def parse_variants() -> dict[str, list[fd.DecodeTiling]]:
  out: dict[str, list] = {}
  for spec in filter(None, FLAGS.variants.split(";")):
    shape, vals = spec.split(":")
    v = vals.split(",")
    out.setdefault(shape.strip(), []).append(fd.DecodeTiling(
        int(v[0]), int(v[1]), int(v[2]), int(v[3]), wait_prev="w" in v[4:],
        pdl=2 if "p2" in v[4:] else 1 if "p1" in v[4:] else 0,
        l2_ahead=next((int(f[1:]) for f in v[4:] if f.startswith("l")), 0),
        rotate="r" in v[4:]))
  return out


def short(t: fd.DecodeTiling) -> str:
  """A tiling as the --variants syntax writes it: tile_n,split_k,tile_k,stages[,w][,p1][,l4]."""
  return ",".join([str(t.tile_n), str(t.split_k), str(t.tile_k), str(t.stages)]
                  + (["w"] if t.wait_prev else []) + ([f"p{t.pdl}"] if t.pdl else [])
                  + ([f"l{t.l2_ahead}"] if t.l2_ahead else []) + (["r"] if t.rotate else []))


def odd_cases(interp: bool):
  key = jax.random.PRNGKey(int(time.time()))
  cases = [(5, 200, 384, fd.DecodeTiling(128, 1, 256, 2)), (1, 264, 1152, None),
           (64, 520, 768, fd.DecodeTiling(64, 2, 256, 2)), (13, 1024, 2048, None),
           (64, 256, 1024, fd.DecodeTiling(256, 2, 128, 3, wait_prev=True)),
           (40, 6144, 4096, None)]
  if interp:
    cases = cases[:2]
  for r, n, k, t in cases:
    k1, k2, key = jax.random.split(key, 3)
    x, w = rand_fp8(k1, (r, k)), rand_fp8(k2, (n, k), 4.0)
    try:
      tt = t or fd.default_tiling(r, n, k)
      y = fd.fp8_decode_matmul(x, w, tiling=tt, interpret=interp)
      err = f64_check(y, x, w)
      # f32 partials are not exact either: Hopper's FP8 wgmma accumulates with a reduced mantissa
      # (XLA's cuBLASLt split-K path measured 0.8-1.1e-3 on the same shapes), so one bound for both.
      ok = err < 8e-3
      record(case="odd", r=r, n=n, k=k, tiling=short(tt), err=err, ok=bool(ok))
    except Exception as e:   # noqa: BLE001
      record(case="odd", r=r, n=n, k=k, tiling=str(t), error=f"{type(e).__name__}: {e}"[:1500],
             tb=traceback.format_exc()[-1500:])


def llama_case(r: int, shape: str, extra: list):
  n, k = LLAMA[shape]
  sets = max(2, -(-FLAGS.min_bytes // (n * k)))
  key = jax.random.PRNGKey(r * 7 + n + k)
  kx, kw = jax.random.split(key)
  # one x per weight set: with a shared x XLA merges the dots into one GEMM over the concatenated
  # weights (a copy of all of them per call), which is not what a decode step runs
  xs = [rand_fp8(jax.random.fold_in(kx, i), (r, k)) for i in range(sets)]
  x = xs[0]
  ws = [rand_fp8(jax.random.fold_in(kw, i), (n, k), 4.0) for i in range(sets)]
  wbytes = n * k + r * k
  cols = np.unique(np.concatenate([np.random.default_rng(0).choice(n, 384, replace=False),
                                   np.arange(n - 64, n)]))
  splits = 8 if n <= 4096 else 4 if n <= 8192 else 1        # ops.fp8_split_k at 64 rows
  while splits > 1 and k % (128 * splits):
    splits //= 2
  impls = {}
  peer = set(FLAGS.peer_impls.split(",")) if FLAGS.peers else set()
  if "xla_fp8_split" in peer:
    impls["xla_fp8_split"] = (lambda xq, w: ops.fp8_dot_partials(xq, w, splits)) if splits > 1 \
        else (lambda xq, w: ops.fp8_dot(xq, w))
  if splits > 1 and "xla_fp8_dot" in peer:
    impls["xla_fp8_dot"] = lambda xq, w: ops.fp8_dot(xq, w)
  t_def = fd.default_tiling(r, n, k, max_split=16 if splits > 1 else 1)    # as ops picks it
  impls[f"mgpu default {short(t_def)}"] = lambda xq, w, t=t_def: fd.fp8_decode_matmul(xq, w, tiling=t)
  for t in extra:
    impls[f"mgpu {short(t)}"] = lambda xq, w, t=t: fd.fp8_decode_matmul(xq, w, tiling=t)
  for name, op in impls.items():
    if time.time() - T0 > FLAGS.budget_s:
      record(case=str(r), shape=shape, impl=name, note="skipped (budget)")
      continue
    try:
      f = jax.jit(lambda xl, wl, op=op: [op(xq, w) for xq, w in zip(xl, wl)])
      ys = f(xs, ws)
      err = f64_check(ys[0], x, ws[0], cols)
      dt = device_times(f, (xs, ws), sets) if FLAGS.profile else {}
      wu = wall_us(f, (xs, ws), sets)
      dev = dt.get("dev_us")
      record(case=str(r), shape=shape, n=n, k=k, impl=name, err=err, sets=sets,
             dev_us=dev, busy_us=dt.get("busy_us"), wall_us=wu,
             tbps_dev=wbytes / dev / 1e6 if dev else None, tbps_wall=wbytes / wu / 1e6,
             kernels=dt.get("kernels"))
    except Exception as e:   # noqa: BLE001
      record(case=str(r), shape=shape, impl=name, error=f"{type(e).__name__}: {e}"[:1500],
             tb=traceback.format_exc()[-1500:])
  if "xla_bf16" in peer and time.time() - T0 <= FLAGS.budget_s:
    try:   # bf16 dot (twice the weight bytes): fewer, bigger sets
      wb = [w.astype(jnp.bfloat16) for w in ws[:max(2, sets // 2)]]
      del ws
      xb = [xq.astype(jnp.bfloat16) for xq in xs[:len(wb)]]
      f = jax.jit(lambda xl, wl: [jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())),
                                                      preferred_element_type=jnp.float32
                                                      ).astype(jnp.bfloat16)
                                  for xq, w in zip(xl, wl)])
      dt = device_times(f, (xb, wb), len(wb))
      wu = wall_us(f, (xb, wb), len(wb))
      record(case=str(r), shape=shape, n=n, k=k, impl="xla_bf16", dev_us=dt.get("dev_us"),
             wall_us=wu, tbps_dev=2 * n * k / dt["dev_us"] / 1e6 if dt.get("dev_us") else None,
             kernels=dt.get("kernels"))
    except Exception as e:   # noqa: BLE001
      record(case=str(r), shape=shape, impl="xla_bf16", error=f"{type(e).__name__}: {e}"[:800])


def main(_):
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  record(case="env", device=str(jax.devices()[0]), jax=jax.__version__)
  cases = [c.strip() for c in FLAGS.cases.split(",") if c.strip()]
  if "odd" in cases:
    odd_cases(FLAGS.interpret)
  if FLAGS.interpret:
    return
  extra = parse_variants()
  for c in cases:
    if c == "odd":
      continue
    for shape in filter(None, FLAGS.shapes.split(",")):
      if time.time() - T0 > FLAGS.budget_s:
        break
      llama_case(int(c), shape, extra.get(shape, []) if c == "64" else [])
  print("[fp8dec] done in", round(time.time() - T0, 1), "s")


if __name__ == "__main__":
  app.run(main)
