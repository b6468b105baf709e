"""FP8 block-scaled GEMM (DeepSeek 1x128 / 128x128 scales) on the GPU: Mosaic GPU kernel vs peers.

One run times, side by side: XLA's bf16 dot and XLA's per-tensor-scaled FP8 dot at M=N=K=size,
the Mosaic GPU kernel (kernels/fp8_block_matmul_mgpu.py) per tiling config, kernel alone (x already
quantized) and end to end (bf16 x, 1x128 quantization included), and the Triton kernel
(kernels/fp8_block_matmul.py). Correctness first: every config is checked on GPU against the f32
reference on a small odd shape and on 256 rows of the big product.

Timing: the jitted op dispatched back-to-back `iters` times (>= rep_seconds of work), wall time /
iters; median of `reps` repetitions. The single weight (64 MiB at 8192^2) exceeds the 50 MiB L2.

  PYTHONPATH=. python3 experiments/bench_fp8_block.py --out=$RES/fp8_block.json \
      --md=$RES/fp8_block.md [--configs=a,b] [--budget_s=50]
"""
from __future__ import annotations

import datetime
import json
import math
import statistics
import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from kernels import fp8_block_matmul as triton_fp8
from kernels import fp8_block_matmul_mgpu as mgpu_fp8
from kernels import grouped_matmul
from kernels.quant import fp8_block

C = mgpu_fp8.Config
CONFIGS = {  # per-consumer tile, consumer split (wg M/N), promotion, K blocks per step, stages
    "m64n128_wgM_s4": C(64, 128, "m", 4),
    "m128n128_wgN_s3": C(128, 128, "n", 3),
    "m64n128_wgM_k2_s2": C(64, 128, "m", 2, k_sub=2),
    "m128n128_wgN_rescale_s3": C(128, 128, "n", 3, promote="rescale"),
    "m64n128_wgM_s4_lane": C(64, 128, "m", 4, lane=True),
    "m128n128_wgM_s3": C(128, 128, "m", 3),
    "m128n128_wgN_s3_lane": C(128, 128, "n", 3, lane=True),
    "m64n128_wgN_s4": C(64, 128, "n", 4),
    "m64n128_wgM_s5": C(64, 128, "m", 5),
    "m128n128_wgM_rescale_s3": C(128, 128, "m", 3, promote="rescale"),
    "m64n128_wgM_s4_snakeM": C(64, 128, "m", 4, grid_minor="m"),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/fp8_block.json", "JSON results path")
flags.DEFINE_string("md", "", "markdown table path (optional)")
flags.DEFINE_list("configs", list(CONFIGS), "Mosaic configs to time, in order")
flags.DEFINE_integer("size", 8192, "M = N = K")
flags.DEFINE_integer("reps", 5, "timed repetitions (median)")
flags.DEFINE_float("rep_seconds", 0.03, "target wall time of one repetition")
flags.DEFINE_float("budget_s", 50.0, "skip remaining work after this many seconds")
flags.DEFINE_bool("triton", True, "also time the Triton kernel")
flags.DEFINE_bool("dense", True, "time the dense M=N=K=size GEMM (peers + configs)")
flags.DEFINE_bool("e2e_best", True, "also time the fastest config end to end (bf16 x in)")
flags.DEFINE_integer("e2e_after", 5, "time e2e after this many configs (riskier ones after it)")
flags.DEFINE_list("grouped_routings", ["uniform", "skewed"], "grouped section routings")
flags.DEFINE_bool("grouped_check", True, "check the grouped kernel on a small ragged shape")
flags.DEFINE_bool("grouped", False, "time grouped (MoE) prefill T=8192, E=32, K=7168, N=2048")
flags.DEFINE_bool("grouped_triton", False, "grouped section: also the Triton grouped kernel")
flags.DEFINE_list("check_configs", ["m64n128_wgM_s4"],
                  "configs also checked on a small odd shape (M=200, N=512, K=1024)")

T0 = time.time()
RESULTS: list[dict] = []
META: dict = {}


def over_budget() -> bool:
  return time.time() - T0 > FLAGS.budget_s


def bench(f, *args) -> float:
  """Median over reps of the wall time per call of f(*args), called back to back."""
  jax.block_until_ready(f(*args))                      # compile + warm up
  t = time.perf_counter()
  jax.block_until_ready(f(*args))
  calls = int(min(100, max(2, math.ceil(FLAGS.rep_seconds / max(time.perf_counter() - t, 1e-6)))))
  per_call = []
  for _ in range(FLAGS.reps):
    t, last = time.perf_counter(), None
    for _ in range(calls):
      last = f(*args)                                  # async dispatch; only the last is kept
    jax.block_until_ready(last)
    per_call.append((time.perf_counter() - t) / calls)
  return statistics.median(per_call)


def rel_err(y, ref) -> float:
  """||y - ref|| / ||ref|| in float64 (nan if y has a non-finite element)."""
  d = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  r = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  return float(np.linalg.norm(d - r) / max(np.linalg.norm(r), 1e-30)) if np.isfinite(d).all() \
      else float("nan")


def save() -> None:
  with open(FLAGS.out, "w") as f:
    json.dump({"meta": META, "results": RESULTS}, f, indent=1)
  if FLAGS.md:
    with open(FLAGS.md, "w") as f:
      f.write(markdown())


def record(section: str, impl: str, seconds: float | None = None, flops: float = 0.0,
           err: float | None = None, note: str = "") -> None:
  r = {"section": section, "impl": impl, "t_us": None if seconds is None else seconds * 1e6,
       "tflops": None if not seconds or not flops else flops / seconds / 1e12, "rel_err": err,
       "note": note, "at_s": round(time.time() - T0, 1)}
  RESULTS.append(r)
  tf = "" if r["tflops"] is None else f"{r['tflops']:.0f} TFLOP/s"
  tu = "" if r["t_us"] is None else f"{r['t_us']:.0f} us"
  print(f"[{r['at_s']:6.1f}s] {section:6s} {impl:44s} {tu:>10s} {tf:>14s} "
        f"{'' if err is None else f'err={err:.2e}'} {note}", flush=True)
  save()


def attempt(section: str, impl: str, fn) -> None:
  if over_budget():
    record(section, impl, note="skipped: over budget")
    return
  print(f"[{time.time() - T0:6.1f}s] start {section} {impl}", flush=True)
  try:
    fn()
  except Exception as e:  # noqa: BLE001 - a failing config is a result, not a crash
    traceback.print_exc()
    record(section, impl, note=f"FAILED: {type(e).__name__}: {str(e)[:300]}")


def markdown() -> str:
  bf16 = next((r["tflops"] for r in RESULTS if r["impl"] == "xla bf16 dot"), None)
  lines = [f"FP8 block-scaled GEMM, M=N=K={META.get('size')} ({META.get('device')}, "
           f"{META.get('date')}, jax {META.get('jax')})", "",
           "| section | impl | time (us) | TFLOP/s | x XLA bf16 | rel err | note |",
           "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
  for r in RESULTS:
    ratio = "" if not (bf16 and r["tflops"]) else f"{r['tflops'] / bf16:.2f}"
    lines.append(f"| {r['section']} | {r['impl']} | "
                 f"{'' if r['t_us'] is None else f'{r['t_us']:.0f}'} | "
                 f"{'' if r['tflops'] is None else f'{r['tflops']:.0f}'} | {ratio} | "
                 f"{'' if r['rel_err'] is None else f'{r['rel_err']:.1e}'} | {r['note']} |")
  return "\n".join(lines) + "\n"


def run_grouped(keys) -> None:
  """MoE prefill: T=8192 rows over E=32 experts (uniform and skewed), K=7168, N=2048."""
  t, e, k, n = 8192, 32, 7168, 2048
  x = jax.random.normal(next(keys), (t, k), jnp.bfloat16)
  w = jax.random.normal(next(keys), (e, n, k), jnp.bfloat16)
  wq, ws = jax.jit(fp8_block.quantize_weight)(w)
  w_ekn = jnp.swapaxes(w, 1, 2)
  del w
  flops = 2.0 * t * k * n
  skew = np.maximum(1, (np.random.default_rng(0).pareto(1.0, e) + 0.05))
  routings = {"uniform": np.full(e, t // e),
              "skewed": np.floor(skew / skew.sum() * t).astype(int)}
  for routing in FLAGS.grouped_routings:
    sizes = routings[routing]
    sizes[0] += t - sizes.sum()
    gs = jnp.asarray(sizes, jnp.int32)
    ours = jax.jit(lambda x, gs: mgpu_fp8.grouped_fp8_block_matmul(x, wq, ws, gs))
    tri = jax.jit(lambda x, gs: grouped_matmul.grouped_matmul_fp8(x, wq, ws, gs))
    rag = jax.jit(lambda x, gs: jax.lax.ragged_dot(x, w_ekn, gs))
    sizes_1024 = np.diff(np.minimum(np.cumsum(sizes), 1024), prepend=0)   # the first 1024 rows
    ref = grouped_matmul.grouped_fp8_reference(x[:1024].astype(jnp.float32), wq, ws,
                                               jnp.asarray(sizes_1024, jnp.int32))
    impls = [("mosaic grouped fp8", ours), ("xla ragged_dot bf16", rag)]
    if FLAGS.grouped_triton:
      impls.insert(1, ("triton grouped fp8", tri))
    for impl, f in impls:
      def run(f=f, impl=impl):
        err = rel_err(f(x, gs)[:1024], ref) if "fp8" in impl else None
        record("grouped", f"{impl} {routing}", bench(f, x, gs), flops, err)
      attempt("grouped", f"{impl} {routing}", run)


def run_dense(keys, n: int, flops: float) -> None:
  """XLA bf16 / per-tensor FP8 dots and each Mosaic config at M=N=K=n (and the best e2e)."""
  a = jax.random.normal(next(keys), (n, n), jnp.bfloat16)
  b = jax.random.normal(next(keys), (n, n), jnp.bfloat16)
  attempt("peer", "xla bf16 dot", lambda: record(
      "peer", "xla bf16 dot", bench(jax.jit(lambda a, b: a @ b.T), a, b), flops))
  a8, b8 = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)

  x = a
  wq, wsi = jax.jit(fp8_block.quantize_weight)(b.astype(jnp.float32))
  del b
  xq, xsc = jax.jit(fp8_block.quantize_activations)(x)
  quant = jax.jit(fp8_block.quantize_activations)
  attempt("peer", "xla 1x128 act quant alone", lambda: record(
      "peer", "xla 1x128 act quant alone", bench(quant, x), note="bf16 x -> e4m3 + scales"))
  ref_rows = jax.jit(lambda x: mgpu_fp8.fp8_block_reference(x, wq, wsi))(x[:256].astype(
      jnp.float32))

  def run_e2e_best():
    timed = [r for r in RESULTS if r["impl"].endswith(" kernel") and r["tflops"]]
    if not timed:
      return
    best = max(timed, key=lambda r: r["tflops"])["impl"][:-len(" kernel")]
    g = jax.jit(lambda x: mgpu_fp8.fp8_block_matmul(x, wq, wsi, config=CONFIGS[best]))
    attempt("mosaic", f"{best} e2e", lambda: record(
        "mosaic", f"{best} e2e (incl. act quant)", bench(g, x), flops))

  for i, name in enumerate(FLAGS.configs):
    if FLAGS.e2e_best and i == FLAGS.e2e_after:
      run_e2e_best()
    cfg = CONFIGS[name]
    if not mgpu_fp8.supported(n, n, n, cfg):
      record("mosaic", name, note="shape unsupported by config")
      continue

    def run(cfg=cfg, name=name):
      f = jax.jit(lambda xq, xsc: mgpu_fp8.quantized_matmul(xq, xsc, wq, wsi, config=cfg))
      y = f(xq, xsc)
      err = rel_err(y[:256], ref_rows)
      record("mosaic", f"{name} kernel", bench(f, xq, xsc), flops, err)
    attempt("mosaic", name, run)
  if FLAGS.e2e_best and len(FLAGS.configs) <= FLAGS.e2e_after:
    run_e2e_best()

  # Last: in run 2 this XLA FP8 dot did not finish within 30 s (compile/autotune or hang).
  fp8_dot = jax.jit(lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32)
                    .astype(jnp.bfloat16))
  attempt("peer", "xla fp8 dot (per-tensor)", lambda: record(
      "peer", "xla fp8 dot (per-tensor)", bench(fp8_dot, a8, b8), flops))

  if FLAGS.triton:
    def run_triton():
      g = jax.jit(lambda x: triton_fp8.fp8_block_matmul(x, wq, wsi))
      err = rel_err(g(x)[:256], ref_rows)
      record("triton", "triton fp8 block e2e", bench(g, x), flops, err)
    attempt("triton", "triton fp8 block e2e", run_triton)


def main(_) -> None:
  dev = jax.devices()[0]
  META.update(device=dev.device_kind, date=datetime.datetime.now(datetime.UTC).isoformat(
      timespec="seconds"), jax=jax.__version__, size=FLAGS.size,
      sms=getattr(dev, "core_count", None))
  print(META, flush=True)
  n = FLAGS.size
  flops = 2.0 * n**3
  keys = iter(jax.random.split(jax.random.key(0), 16))

  # Small odd shape first: lowering + correctness of each config (M not a tile multiple).
  xs_ = jax.random.normal(next(keys), (200, 1024), jnp.float32) * 3
  wq_, ws_ = fp8_block.quantize_weight(jax.random.normal(next(keys), (512, 1024), jnp.float32))
  ws_ = ws_ * jnp.exp(jax.random.normal(next(keys), ws_.shape))
  ref_ = mgpu_fp8.fp8_block_reference(xs_, wq_, ws_)
  for name in FLAGS.check_configs:
    cfg = CONFIGS[name]

    def check(cfg=cfg, name=name):
      y = mgpu_fp8.fp8_block_matmul(xs_, wq_, ws_, config=cfg)
      record("check", f"mosaic {name} m200 n512 k1024", err=rel_err(y, ref_))
    attempt("check", f"mosaic {name}", check)

  if FLAGS.grouped_check:
    def grouped_check():
      sizes = jnp.asarray([50, 0, 300, 7], jnp.int32)             # 3 rows past the total
      gx = jax.random.normal(next(keys), (360, 512), jnp.bfloat16)
      gw, gs = fp8_block.quantize_weight(jax.random.normal(next(keys), (4, 256, 512)))
      y = mgpu_fp8.grouped_fp8_block_matmul(gx, gw, gs, sizes)
      ref = grouped_matmul.grouped_fp8_reference(gx.astype(jnp.float32), gw, gs, sizes)
      tail = float(jnp.max(jnp.abs(y[357:].astype(jnp.float32))))
      record("check", "mosaic grouped t360 e4 n256 k512", err=rel_err(y, ref),
             note=f"max |rows past total| = {tail}")
    attempt("check", "mosaic grouped", grouped_check)

  if FLAGS.dense:
    run_dense(keys, n, flops)
  if FLAGS.grouped:
    run_grouped(keys)
  print(f"done in {time.time() - T0:.1f}s", flush=True)
  print(markdown(), flush=True)


if __name__ == "__main__":
  app.run(main)
