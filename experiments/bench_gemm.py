"""Correctness on GPU and timings of the low-bit GEMM kernels against XLA peers, in one run.

Peers: XLA bf16 ``jnp.dot`` (weights as separate arrays), ``jax.lax.ragged_dot`` (bf16),
``jax.nn.scaled_dot_general`` (nvfp4 config). Ceilings (read bandwidth, bf16 and fp8 GEMM rates)
are measured in the same run. Timing: R independent weight sets (more bytes than L2) applied in
one jit, that jit dispatched back-to-back `iters` times, wall time / (iters * R); median of reps.

  PYTHONPATH=. python3 experiments/bench_gemm.py --out=$OUT/gemm.json [--sections=...]
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import gemm_timing
from kernels import fp8_block_matmul as fp8k
from kernels import grouped_matmul as gk
from kernels import nvfp4_matmul as nk
from kernels import gemm as gemm_ops
from kernels import nvfp4_matmul_mgpu as mgk
from kernels.quant.weights import NVFP4Weight
from kernels.quant import fp8_block, nvfp4

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/gemm.json", "JSON results path")
flags.DEFINE_list("sections", ["ceil", "check", "decode", "fp8", "prefill", "grouped"],
                  "which sections to run, in order; decode:KxN[@M1/M2] runs one decode shape")
flags.DEFINE_integer("reps", 5, "timed repetitions (median)")
flags.DEFINE_float("rep_seconds", 0.03, "target wall time of one repetition")
flags.DEFINE_float("budget_s", 420.0, "skip remaining work after this many seconds")
flags.DEFINE_integer("shrink", 1, "divide the big dims by this (CPU dry runs, with --interpret)")
flags.DEFINE_bool("short", False, "fewer shapes and variants (second, shorter device run)")
flags.DEFINE_bool("check_short", False, "the check section on its first shapes only")
flags.DEFINE_bool("interpret", False, "run Pallas kernels in interpret mode (CPU dry run)")
flags.DEFINE_enum("variant_set", "all", ["all", "new", "final"],
                  "decode/grouped NVFP4 variants: all (tiling sweep of the bf16-MMA kernel), new "
                  "(E4M3/f16 dequant routes and weight-as-A), final (default + the best few)")
flags.DEFINE_list("decode_ms", ["1", "8", "32", "64"], "decode M values")
flags.DEFINE_list("decode_kn", ["4096x14336", "14336x4096"], "decode (K, N) shapes")
flags.DEFINE_list("grouped_cases", ["64u", "64s", "8192u"], "grouped T + u(niform)/s(kewed)")
flags.DEFINE_list("kl_variants", ["B128 asm", "B128 asm xf16", "A64 asm", "B256 asm xf16",
                                  "B128 e4m3"],
                  "kernel-layout decode variants (see KL_VARIANTS), timed in this order")
flags.DEFINE_list("kl_ms", ["1", "8", "32", "64"], "kernel-layout decode M values")
flags.DEFINE_list("old_routes", ["asm even/odd"],
                  "kl section: ModelOpt-layout routes also timed ('default', 'previous default' "
                  "= the f32 route, 'asm even/odd')")
flags.DEFINE_bool("ceil_read_only", False, "ceil section: only the read-bandwidth ceiling")
flags.DEFINE_float("ceil_small_mb", 0.0, "ceil section: also time a sum over --kl_sets arrays "
                   "of this many MB each in one jit (a decode GEMM's bytes; 0: off)")
flags.DEFINE_integer("kl_sets", 8, "kl section: independent weight sets per jit (> L2 in bytes)")
flags.DEFINE_list("klcheck_shapes", ["5x200x1024", "40x128x768"], "klcheck MxNxK shapes")
flags.DEFINE_list("klcheck_variants", [], "klcheck variants (default: --kl_variants + 3 routes)")
flags.DEFINE_string("kl_pick_from", "", "kl section: time the --kl_pick_n best float64-verified "
                    "kernel-layout variants of this earlier JSON (by geometric-mean time over its "
                    "kl shapes) instead of --kl_variants")
flags.DEFINE_list("mgcheck_variants", ["mgpu default", "mgpu c1 s2", "mgpu c2 r2 s2 k2"],
                  "mgcheck section: Mosaic GPU kernel tilings (mgpu_variant syntax)")
flags.DEFINE_string("device_time", "",
                    "regex: impls whose GPU kernel time per call is also read from a profiler "
                    "trace of 3 calls (dev_us: kernel time summed, span_us: first start to last "
                    "end, per GEMM; kernels: per-kernel us per GEMM); empty: off")
flags.DEFINE_integer("kl_pick_n", 3, "see --kl_pick_from")
flags.DEFINE_list("gkl_variants", ["B128 asm", "B64 asm", "A64 asm"],
                  "grouped kernel-layout variants (kl_variant syntax; split-K tokens ignored)")
flags.DEFINE_list("gkl_baselines", ["modelopt default"],
                  "grouped kl section: ModelOpt-layout kernels also timed ('modelopt default')")

RESULTS: list[dict] = []
# Overwritten by the "ceil" section; defaults are run 1's measurements on the H100 (2026-11-23).
CEIL = {"read_tbs": 3.05, "bf16_tflops": 707.0, "fp8_tflops": 1247.0}
T0 = time.time()


def D(x: int) -> int:
  return max(16, x // FLAGS.shrink)


def over_budget() -> bool:
  return time.time() - T0 > FLAGS.budget_s


def bench(fn, argsets, first_out=None, jitted=None) -> float:
  """Seconds per call (experiments/gemm_timing.wall_seconds_per_call at --reps/--rep_seconds)."""
  return gemm_timing.wall_seconds_per_call(fn, argsets, reps=FLAGS.reps,
                                           rep_seconds=FLAGS.rep_seconds,
                                           first_out=first_out, jitted=jitted)


def rel_err(y, ref) -> float:
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  if not np.all(np.isfinite(y)):
    return float("nan")
  return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def record(section, name, shape, impl, seconds=None, bytes_=0, flops=0, err=None, note="",
           error=None):
  r = {"section": section, "name": name, "shape": shape, "impl": impl, "note": note}
  if seconds is not None:
    r["us"] = seconds * 1e6
    r["tbs"] = bytes_ / seconds / 1e12 if bytes_ else None
    r["tflops"] = flops / seconds / 1e12 if flops else None
    floor = max(bytes_ / (CEIL["read_tbs"] * 1e12),
                flops / (CEIL["fp8_tflops" if "fp8" in impl else "bf16_tflops"] * 1e12))
    r["roofline_frac"] = floor / seconds if floor else None
  if err is not None:
    r["rel_err"] = err
  if error is not None:
    r["error"] = error
  RESULTS.append(r)
  us = f"{r['us']:9.1f}" if "us" in r else "        -"
  print(f"[{section}] {name:28s} {impl:34s} {us} us  "
        f"tbs={r.get('tbs') or 0:5.2f} tflops={r.get('tflops') or 0:6.1f} "
        f"roof={r.get('roofline_frac') or 0:4.2f} err={err if err is not None else '-'} "
        f"{note} {('ERROR ' + error) if error else ''}", flush=True)
  save()
  return r


def save():
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ceilings": CEIL,
               "results": RESULTS}, f, indent=1)


device_times = gemm_timing.device_times


def attempt(section, name, shape, impl, fn, argsets, bytes_=0, flops=0, ref=None, note=""):
  """Check fn(*argsets[0]) against ref (if given), then time it; record errors, never raise."""
  if over_budget():
    return record(section, name, shape, impl, note="skipped (budget)")
  try:
    err = None
    first, jitted = [], []
    s = bench(fn, argsets, first, jitted)
    if ref is not None:   # checked on the timed jit's own first output (saves a compile)
      err = rel_err(first[0], ref() if callable(ref) else ref)
    del first
    if FLAGS.device_time and re.search(FLAGS.device_time, impl):
      try:
        dt = device_times(jitted[0], argsets)
        note = (f"{note} dev_us={dt.get('dev_us', float('nan')):.2f} "
                f"span_us={dt.get('span_us', float('nan')):.2f} kernels={dt.get('kernels')}")
      except Exception as e:  # noqa: BLE001
        note = f"{note} device_time failed: {type(e).__name__}: {e}"[:800]
    return record(section, name, shape, impl, s, bytes_, flops, err, note)
  except Exception as e:  # noqa: BLE001 - a failing variant must not end the run
    msg = f"{type(e).__name__}: {e}"[:600]
    traceback.print_exc(limit=2)
    return record(section, name, shape, impl, note=note, error=msg)


def keys(n):
  return jax.random.split(jax.random.key(int(time.time() * 1e3) % 2**31), n)


def nvfp4_sets(r, n, k, key):
  """R independent NVFP4 weights [N, K/2] (random normal, quantized on device)."""
  out = []
  for kk in jax.random.split(key, r):
    p, s, g = jax.jit(nvfp4.quantize)(jax.random.normal(kk, (n, k), jnp.float32))
    out.append((p, s, g))
  return out


# ---------------------------------------------------------------------------------------------

def sec_ceil():
  x = jax.random.normal(jax.random.key(1), (D(256 * 1024 * 1024),), jnp.float32)  # 1 GiB
  s = bench(lambda a: jnp.sum(a), [(x,)])
  CEIL["read_tbs"] = x.nbytes / s / 1e12
  record("ceil", "read stream 1GiB f32", "", "xla sum", s, x.nbytes)
  del x
  if FLAGS.ceil_small_mb:   # the same read in calls of a decode GEMM's size (fill and tail count)
    words = D(int(FLAGS.ceil_small_mb * 1e6)) // 4
    sets = [(jax.random.bits(kk, (words,), jnp.uint32),) for kk in keys(FLAGS.kl_sets)]
    attempt("ceil", f"read stream {FLAGS.ceil_small_mb:g}MB x{len(sets)}", "", "xla sum small",
            lambda a: jnp.sum(a), sets, words * 4)
    del sets
  if FLAGS.ceil_read_only:
    return
  n = D(8192)
  a = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(3), (n, n), jnp.bfloat16)
  s = bench(lambda a, b: a @ b, [(a, b)])
  CEIL["bf16_tflops"] = 2 * n**3 / s / 1e12
  record("ceil", "bf16 gemm 8192^3", "", "xla dot", s, 0, 2 * n**3)
  a8, b8 = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
  s = bench(lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
            [(a8, b8)])
  CEIL["fp8_tflops"] = 2 * n**3 / s / 1e12
  record("ceil", "fp8 gemm 8192^3 (per-tensor)", "", "xla fp8 dot", s, 0, 2 * n**3)


def sec_check():
  """Small odd shapes: every kernel against its f32 reference on fresh random inputs."""
  ks = iter(keys(64))
  shapes = [(1, 96, 48), (5, 200, 1040), (64, 256, 512), (100, 384, 2048), (257, 512, 768)]
  short = FLAGS.short or FLAGS.check_short
  for m, n, k in shapes[:2] if short else shapes:
    x = jax.random.normal(next(ks), (m, k), jnp.bfloat16)
    p, s, g = nvfp4.quantize(jax.random.normal(next(ks), (n, k)))
    y = nk.w4a16_matmul(x, p, s, g)
    record("check", f"w4a16 m{m} n{n} k{k}", "", "ours",
           err=rel_err(y, nk.w4a16_reference(x.astype(jnp.float32), p, s, g)))
    gx = nvfp4.global_scale_for(x)
    xq, xs = nk.quantize_activations(x, gx)
    rq, rs = nk.quantize_activations_reference(x, gx)
    dq = nvfp4.dequantize(xq, xs, gx)
    dr = nvfp4.dequantize(rq, rs, gx)
    mism = float(jnp.mean((dq != dr).astype(jnp.float32)))
    record("check", f"nvfp4 quant m{m} k{k}", "", "ours", err=rel_err(dq, dr),
           note=f"mismatch_frac={mism:.2e}")
    y4 = nk.w4a4_matmul(xq, xs, gx, p, s, g)
    record("check", f"w4a4 m{m} n{n} k{k}", "", "ours",
           err=rel_err(y4, nk.w4a4_reference(xq, xs, gx, p, s, g, out_dtype=jnp.float32)))
    if k % 128 == 0:
      wq, wsi = fp8_block.quantize_weight(jax.random.normal(next(ks), (n, k)))
      for t in [None, fp8k.Tiling(64, 256, 4, 3)] if n % 256 == 0 else [None]:
        yf = fp8k.fp8_block_matmul(x, wq, wsi, tiling=t)
        record("check", f"fp8 m{m} n{n} k{k} {t and t.block_n}", "", "ours",
               err=rel_err(yf, fp8k.fp8_block_reference(x.astype(jnp.float32), wq, wsi)))
  for t_rows, e, k, n, sizes in [(64, 8, 256, 128, [9, 0, 30, 0, 1, 20, 0, 0]),
                                 (100, 4, 384, 200, [0, 50, 3, 40]),
                                 (8, 3, 128, 64, [0, 0, 0])][:1 if short else 3]:
    x = jax.random.normal(next(ks), (t_rows, k), jnp.bfloat16)
    w = jax.random.normal(next(ks), (e, k, n), jnp.float32)
    gs = jnp.array(sizes, jnp.int32)
    y = gk.grouped_matmul_dense(x, w.astype(jnp.bfloat16), gs)
    record("check", f"grouped bf16 t{t_rows} e{e}", "", "ours",
           err=rel_err(y, gk.grouped_reference(x.astype(jnp.float32), w.astype(jnp.bfloat16), gs)))
    p, s, g = jax.vmap(lambda a: nvfp4.quantize(a.T))(w)
    y = gk.grouped_matmul_nvfp4(x, p, s, g, gs)
    record("check", f"grouped nvfp4 t{t_rows} e{e}", "", "ours",
           err=rel_err(y, gk.grouped_nvfp4_reference(x.astype(jnp.float32), p, s, g, gs)))
    wq, wsi = fp8_block.quantize_weight(jnp.swapaxes(w, 1, 2))
    y = gk.grouped_matmul_fp8(x, wq, wsi, gs)
    record("check", f"grouped fp8 t{t_rows} e{e}", "", "ours",
           err=rel_err(y, gk.grouped_fp8_reference(x.astype(jnp.float32), wq, wsi, gs)))


def _split_for(tiles: int, k: int, bk: int, programs: int = 264) -> int:
  split = 1
  while tiles * split < programs and (k // bk) % (split * 2) == 0 and k // bk >= split * 4:
    split *= 2
  return split


def _new_tilings(m, n, k):
  """f16 dequant routes (jnp and inline PTX), the weight as the MMA's A operand, 3-D loads."""
  base = nk.default_tiling(m, n, k)
  bm = 16 if m <= 16 else (32 if m <= 32 else 64)
  bk = 256 if m <= 16 else 128
  split = _split_for(-(-m // bm) * -(-n // 64), k, bk)
  a64 = nk.Tiling(bm, 64, bk, split, 4, 4, dequant="asm", w_as_a=True)
  return {"default": base,
          "e4m3": dataclasses.replace(base, dequant="e4m3"),
          "asm": dataclasses.replace(base, dequant="asm"),
          "asm_f16": dataclasses.replace(base, dequant="asm_f16"),
          "asm A bn64": a64,
          "asm A bn64 eo": dataclasses.replace(a64, x_even_odd=True),
          "asm A bn64 3d": dataclasses.replace(a64, load_3d=True),
          "asm A bn64 xs": dataclasses.replace(a64, x_scale=True),
          "asm_f16 A bn64": dataclasses.replace(a64, dequant="asm_f16"),
          "e4m3 A bn64": dataclasses.replace(a64, dequant="e4m3"),
          **({"asm A bn64 nosplit": dataclasses.replace(a64, split_k=1)} if split > 1 else {})}


def _decode_tilings(m, n, k):
  if FLAGS.variant_set == "new":
    return _new_tilings(m, n, k)
  if FLAGS.variant_set == "final":
    base = nk.default_tiling(m, n, k)
    out = {"default": base,
           "f32 (previous default)": dataclasses.replace(base, dequant="f32", x_scale=False)}
    if m == 8:
      out["default x_scale"] = dataclasses.replace(base, x_scale=True)
      out["asm_f16"] = dataclasses.replace(base, dequant="asm_f16")
      out["f16 jnp"] = dataclasses.replace(base, dequant="f16")
    return out
  base = nk.default_tiling(m, n, k)
  out = {"default": base}
  for label, bn, bk in [("bn128bk128", 128, 128), ("bn32bk512", 32, 512)]:
    t = nk.default_tiling(m, n, k)
    bm = t.block_m
    out[label] = nk.Tiling(bm, bn, bk, _split_for(-(-m // bm) * (n // bn), k, bk), 4, 4)
  out["nosplit"] = nk.Tiling(base.block_m, base.block_n, base.block_k, 1, 4, 4)
  out = {**out, **{f"{name} even/odd": dataclasses.replace(t, x_even_odd=True)
                   for name, t in out.items()}}
  if FLAGS.short:
    out = {name: out[name] for name in ["default", "default even/odd", "bn128bk128 even/odd",
                                        "nosplit even/odd"]}
  return out


def sec_decode(kn_list=None):
  """kn_list: ["KxN"] or ["KxN@M1/M2"] (one shape, optionally its own M values)."""
  r = 16
  ms_override = None
  if kn_list and "@" in kn_list[0]:
    kn_list[0], ms = kn_list[0].split("@")
    ms_override = [int(v) for v in ms.split("/")]
  for k, n in [tuple(D(int(v)) for v in kn.split("x")) for kn in kn_list or FLAGS.decode_kn]:
    key_w, key_x = keys(2)
    wsets = nvfp4_sets(r, n, k, key_w)
    bf16_w = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in jax.random.split(key_w, r)]
    wq_bytes = n * k // 2 + n * k // 16
    if ms_override:
      ms = ms_override
    elif FLAGS.short:
      ms = [1, 64] if k == D(4096) else [32]
    else:
      ms = [int(v) for v in FLAGS.decode_ms]
    for m in ms:
      xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(key_x, r)]
      io = m * k * 2 + m * n * 2
      shape = f"M{m} K{k} N{n}"
      base = attempt("decode", shape, shape, "xla bf16 dot", lambda x, w: x @ w,
                     list(zip(xs, bf16_w)), n * k * 2 + io, 2 * m * n * k)
      ref = nk.w4a16_reference(xs[0].astype(jnp.float32), *wsets[0])
      best = None
      for label, t in _decode_tilings(m, n, k).items():
        res = attempt("decode", shape, shape, f"ours w4a16 {label}",
                      lambda x, p, s, g, t=t: nk.w4a16_matmul(x, p, s, g, tiling=t),
                      [(x, *w) for x, w in zip(xs, wsets)], wq_bytes + io, 2 * m * n * k, ref=ref,
                      note=f"{t}")
        if "us" in res and (best is None or res["us"] < best["us"]):
          best = res
      if best is not None and "us" in base:
        record("decode", shape, shape, "SPEEDUP best/xla",
               note=f"{base['us'] / best['us']:.2f}x ({best['impl']}); "
                    f"{best['tbs'] / CEIL['read_tbs']:.0%} of read bw")
      if m == 32 and k == D(4096) and not FLAGS.short and FLAGS.variant_set == "all":
        gx = [nvfp4.global_scale_for(x) for x in xs]
        q = [nk.quantize_activations(x, g) for x, g in zip(xs, gx)]
        attempt("decode", shape, shape, "ours w4a4 (quantized x)",
                lambda xq, xsc, xg, p, s, g: nk.w4a4_matmul(xq, xsc, xg, p, s, g),
                [(*qq, xg, *w) for qq, xg, w in zip(q, gx, wsets)], wq_bytes + io, 2 * m * n * k)
        cfg = jax.nn.get_scaled_dot_general_config("nvfp4")
        attempt("decode", shape, shape, "jax.nn.scaled_dot_general nvfp4",
                lambda x, w: jax.nn.scaled_dot_general(
                    x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.bfloat16,
                    configs=[cfg, cfg]),
                list(zip(xs, bf16_w))[:2], n * k * 2 + io, 2 * m * n * k)
        attempt("decode", shape, shape, "ours nvfp4 act quant",
                lambda x, g: nk.quantize_activations(x, g), list(zip(xs, gx)),
                m * k * 2 + m * k // 2 + m * k // 16)
    del wsets, bf16_w


def sec_prefill():
  m = k = n = D(8192)
  key_w, key_x = keys(2)
  wsets = nvfp4_sets(2, n, k, key_w)
  xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(key_x, 2)]
  bf16_w = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in jax.random.split(key_w, 2)]
  flops = 2 * m * n * k
  shape = "M8192 K8192 N8192"
  base = attempt("prefill", shape, shape, "xla bf16 dot", lambda x, w: x @ w,
                 list(zip(xs, bf16_w)), 0, flops)
  ref = nk.w4a16_reference(xs[0][:256].astype(jnp.float32), *wsets[0])
  tilings = [("128x128x64 w8 s3", nk.Tiling(128, 128, 64, 1, 8, 3)),
             ("128x256x64 w8 s3", nk.Tiling(128, 256, 64, 1, 8, 3)),
             ("128x128x128 w8 s3", nk.Tiling(128, 128, 128, 1, 8, 3)),
             ("128x128x64 w4 s4", nk.Tiling(128, 128, 64, 1, 4, 4))]
  for label, t in tilings[:2] if FLAGS.short else tilings:
    res = attempt("prefill", shape, shape, f"ours w4a16 {label}",
                  lambda x, p, s, g, t=t: nk.w4a16_matmul(x, p, s, g, tiling=t),
                  [(x, *w) for x, w in zip(xs, wsets)], 0, flops, note=str(t))
    if "us" in res:
      y = nk.w4a16_matmul(xs[0][:256], *wsets[0], tiling=t)
      record("prefill", shape, shape, f"check {label} (first 256 rows)", err=rel_err(y, ref))
  attempt("prefill", shape, shape, "dequant->bf16 + xla dot",
          lambda x, p, s, g: x @ nvfp4.dequantize(p, s, g, jnp.bfloat16).T,
          [(x, *w) for x, w in zip(xs, wsets)], 0, flops)
  gx = [nvfp4.global_scale_for(x) for x in xs]
  if FLAGS.short:
    return
  attempt("prefill", shape, shape, "ours nvfp4 act quant",
          lambda x, g: nk.quantize_activations(x, g), list(zip(xs, gx)),
          m * k * 2 + m * k // 2 + m * k // 16)
  q = [nk.quantize_activations(x, g) for x, g in zip(xs, gx)]
  attempt("prefill", shape, shape, "ours w4a4 128x128x64",
          lambda xq, xsc, xg, p, s, g: nk.w4a4_matmul(xq, xsc, xg, p, s, g,
                                                       tiling=nk.Tiling(128, 128, 64, 1, 8, 3)),
          [(*qq, xg, *w) for qq, xg, w in zip(q, gx, wsets)], 0, flops)
  del base


_routing = gemm_timing.routing_group_sizes


def sec_grouped():
  e, k, n = 32, D(7168), D(2048)
  key_w, key_x = keys(2)
  r_nv = 3
  nv = []
  for kk in jax.random.split(key_w, r_nv):
    p, s, g = jax.jit(jax.vmap(lambda w: nvfp4.quantize(w)))(
        jax.random.normal(kk, (e, n, k), jnp.float32).astype(jnp.bfloat16))
    nv.append((p, s, g))
  bf = [jax.random.normal(kk, (e, k, n), jnp.bfloat16) for kk in jax.random.split(key_w, 2)]
  f8 = [] if FLAGS.short else [jax.jit(fp8_block.quantize_weight)(jnp.swapaxes(b, 1, 2))
                               for b in bf]
  cases = [(64 if c[:-1] == "64" else D(int(c[:-1])), c[-1] == "s") for c in FLAGS.grouped_cases]
  for t_rows, skew in cases[1:] if FLAGS.short else cases:
    gs = _routing(t_rows, e, skew)
    active = int(jnp.sum(gs > 0))
    xs = [jax.random.normal(kk, (t_rows, k), jnp.bfloat16) for kk in jax.random.split(key_x, 3)]
    io = t_rows * k * 2 + t_rows * n * 2
    flops = 2 * t_rows * k * n
    shape = f"T{t_rows} E{e} K{k} N{n} {'skewed' if skew else 'uniform'}"
    base = attempt("grouped", shape, shape, "jax.lax.ragged_dot bf16",
                   lambda x, w: jax.lax.ragged_dot(x, w, gs), list(zip(xs, bf)),
                   active * k * n * 2 + io, flops, note=f"active={active}")
    ref_rows = min(t_rows, 512)
    gs_ref = gs if t_rows <= 512 else jnp.minimum(jnp.cumsum(gs), ref_rows) - jnp.minimum(
        jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(gs)[:-1]]), ref_rows)
    tilings = ([gk.default_tiling(t_rows, n, e, "nvfp4"), gk.Tiling(16, 64, 256, 4, 4, True),
                gk.Tiling(16, 128, 128, 4, 4, True)] if t_rows <= 512 else
               [gk.default_tiling(t_rows, n, e, "nvfp4"), gk.Tiling(128, 256, 64, 8, 3)])
    if t_rows <= 512 and FLAGS.variant_set != "all":
      asm = [gk.Tiling(16, 64, 256, 4, 4, dequant="asm"),
             gk.Tiling(16, 64, 256, 4, 4, dequant="asm", w_as_a=True),
             gk.Tiling(16, 64, 256, 4, 4, True, dequant="asm", w_as_a=True),
             gk.Tiling(16, 128, 128, 8, 4, dequant="asm", w_as_a=True),
             gk.Tiling(16, 64, 256, 4, 4, dequant="asm", w_as_a=True, x_scale=True),
             gk.Tiling(16, 64, 256, 4, 4, dequant="asm_f16", w_as_a=True),
             gk.Tiling(16, 64, 256, 4, 4, dequant="asm", w_as_a=True, load_3d=True)]
      base = tilings[0]
      tilings = [base] + (asm if FLAGS.variant_set == "new" else [
          dataclasses.replace(base, dequant="f32", x_scale=False),
          dataclasses.replace(base, x_scale=True)][:1 if skew else 2])
    ref = gk.grouped_nvfp4_reference(xs[0][:ref_rows].astype(jnp.float32), *nv[0], gs_ref)
    best = None
    if FLAGS.short:
      tilings = tilings[:2] if t_rows <= 512 else tilings[:1]
    for t in tilings:
      res = attempt("grouped", shape, shape, f"ours nvfp4 {t.block_m}x{t.block_n}x{t.block_k}"
                    f"{' eo' if t.x_even_odd else ''} {t.dequant}{' A' if t.w_as_a else ''}"
                    f"{' xs' if t.x_scale else ''}{' 3d' if t.load_3d else ''}",
                    lambda x, p, s, g, t=t: gk.grouped_matmul_nvfp4(x, p, s, g, gs, tiling=t),
                    [(x, *w) for x, w in zip(xs, nv)], active * k * n * 9 // 16 + io, flops,
                    note=str(t), ref=ref if ref_rows == t_rows else None)
      if "us" in res and ref_rows < t_rows:
        y = gk.grouped_matmul_nvfp4(xs[0], *nv[0], gs, tiling=t)[:ref_rows]
        record("grouped", shape, shape, f"check {res['impl']}", err=rel_err(y, ref))
        if best is None or res["us"] < best["us"]:
          best = res
    if best is not None and "us" in base:
      record("grouped", shape, shape, "SPEEDUP best nvfp4/ragged_dot",
             note=f"{base['us'] / best['us']:.2f}x ({best['impl']})")
    if FLAGS.short or FLAGS.variant_set != "all":
      continue
    t_bf = gk.default_tiling(t_rows, n, e, "dense")
    attempt("grouped", shape, shape, "ours bf16 grouped",
            lambda x, w: gk.grouped_matmul_dense(x, w, gs, tiling=t_bf), list(zip(xs, bf)),
            active * k * n * 2 + io, flops,
            ref=(lambda: gk.grouped_reference(xs[0].astype(jnp.float32), bf[0], gs))
            if t_rows <= 512 else None)
    attempt("grouped", shape, shape, "ours fp8 grouped",
            lambda x, w, s: gk.grouped_matmul_fp8(x, w, s, gs), [(x, *w) for x, w in zip(xs, f8)],
            active * k * n + io, flops,
            ref=(lambda: gk.grouped_fp8_reference(xs[0].astype(jnp.float32), *f8[0], gs))
            if t_rows <= 512 else None)


# ----- kernel-layout decode (nk.w4a16_matmul_kl): float64 checks first, then timings -----

E2M1_F64 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def dequant_f64(packed, scale, gs) -> np.ndarray:
  """ModelOpt bytes [N, K/2] -> float64 [N, K] on the host (the check reference)."""
  p = np.asarray(packed)
  codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[0], -1)
  s = np.asarray(jnp.asarray(scale, jnp.float32), np.float64)
  return E2M1_F64[codes] * np.repeat(s, 16, axis=1) * float(gs)


def ref_f64(x, w64) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64) @ w64.T


def err64(y, ref) -> float:
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  if not np.all(np.isfinite(y)):
    return float("nan")
  return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def kl_variant(name: str, m: int, n: int, k: int):
  """"B128 asm xf16" -> (KLTiling, x dtype): B = weight as the MMA's B operand (A = as A), 128 =
  block_n, then the dequant mode, optional w<warps>, s<stages>, k<split>, t<K tiles per loop
  step>, bm<rows>, xf16 (x cast
  to f16 by the caller, inside the timed call), x16in (x handed over already in f16, as a
  producer fusing the cast would give it; output bf16: gemm.KL_X_F16). A suffix "@small" /
  "@large" limits the variant to M <= 32 / M > 32 (see kl_applies)."""
  parts = name.split("@")[0].split()
  if parts[0] == "default":     # the kernel's own default tiling (nk.default_kl_tiling)
    return nk.default_kl_tiling(m, n, k), jnp.float16 if "xf16" in parts else jnp.bfloat16
  form, bn = parts[0][0], int(parts[0][1:])
  kw = {"w_as_a": form == "A", "block_n": bn, "dequant": parts[1]}
  x_dtype = jnp.bfloat16
  for p in parts[2:]:
    if p in ("xf16", "x16in"):
      x_dtype = jnp.float16 if p == "xf16" else x_dtype
    elif p[0] == "w":
      kw["num_warps"] = int(p[1:])
    elif p[0] == "s":
      kw["num_stages"] = int(p[1:])
    elif p.startswith("bm"):
      kw["block_m"] = int(p[2:])
    elif p[0] == "k":
      kw["split_k"] = int(p[1:])
    elif p[0] == "t":
      kw["tiles_per_step"] = int(p[1:])
  return nk.default_kl_tiling(m, n, k, **kw), x_dtype


def mgpu_variant(name: str, m: int, n: int, k: int) -> mgk.MgpuTiling:
  """"mgpu default" (mgk.default_tiling) or "mgpu" followed by c<consumer warpgroups>,
  r<64-row strips per consumer>, s<stages>, k<split>, i (k_interleave: the consumers share the
  strips and alternate K tiles), x (x_in_kernel: x cast and permuted by the producer warpgroup
  instead of an XLA fusion), b (no_auto_barriers), p<0|1|2>
  (pdl: programmatic dependent launch), g<CTAs> (stream_k: persistent stream-K grid),
  f (split_combine="kernel"), C (split_combine="cluster"), T
  (tile_major; the bench transposes the weight sets once), P (overlap_pairs: wgmma overlap over
  pairs of steps), X (x_in_kernel=False: x cast and permuted by an XLA fusion), a<n> (mma_parts:
  a record dequantized and multiplied in n K parts; A: an accumulator per part), K<n>
  (k_per_step), V (x_convert=2: the conflict-free row-per-warp x conversion; implies x): each
  given field (S / Q / D / Z: the measurement probes "stream" / "mma" / "deq" / "compute" (y is
  wrong: their
  rel. error is not a check); M: x_multicast, implies X; "old": the sixth session's defaults, i.e. x in the
  kernel up to M=32 with x_convert=1, no overlap_pairs, one K tile per step) replaces the default's (a "@small" / "@large" suffix as for
  kl_variant)."""
  parts = name.split("@")[0].split()
  fields = {"c": "consumers", "r": "strips", "s": "stages", "k": "split_k", "p": "pdl",
            "g": "stream_k", "K": "k_per_step", "a": "mma_parts"}
  kw = {fields[p[0]]: int(p[1:]) for p in parts[1:]
        if p not in ("default", "i", "x", "b", "f", "T", "C", "P", "X", "V", "M", "old",
                     "S", "Q", "D", "A", "Z")}
  if "A" in parts[1:]:   # an accumulator per K part (independent wgmma chains)
    kw["split_acc"] = True
  for letter, probe in (("S", "stream"), ("Q", "mma"), ("D", "deq"), ("Z", "compute")):
    if letter in parts[1:]:
      kw["probe"] = probe
  if "old" in parts[1:]:   # the sixth session's default tiling
    kw.update(x_in_kernel=m <= 32, x_convert=1, overlap_pairs=False, k_per_step=1)
  if "M" in parts[1:]:   # x tiles multicast to clusters of two CTAs
    kw["x_multicast"], kw["x_in_kernel"] = True, False
  if "V" in parts[1:]:   # the conflict-free x conversion (in the kernel)
    kw["x_convert"], kw["x_in_kernel"] = 2, True
  if "P" in parts[1:]:   # wgmma overlap over pairs of steps (distinct A registers per step)
    kw["overlap_pairs"] = True
  if "X" in parts[1:]:   # x through the XLA fusion, not converted in the kernel
    kw["x_in_kernel"] = False
  if "b" in parts[1:]:
    kw["no_auto_barriers"] = True
  if "f" in parts[1:]:   # split-K partials combined in the kernel
    kw["split_combine"] = "kernel"
  if "T" in parts[1:]:   # K-tile-major weight (mgk.to_tile_major)
    kw["tile_major"] = True
  if "C" in parts[1:]:   # split-K partials combined through a thread-block cluster's DSMEM
    kw["split_combine"] = "cluster"
  if "i" in parts[1:]:
    kw["k_interleave"] = True
  if "x" in parts[1:]:
    kw["x_in_kernel"] = True
  return mgk.default_tiling(m, n, k, **kw)


def kl_applies(name: str, m: int) -> bool:
  scope = name.partition("@")[2]
  return not scope or (scope == "small") == (m <= 32)


def pick_variants(path: str, section: str, n: int, shape_filter: str = "") -> list[str]:
  """The n fastest variants of an earlier run's section that were float64-verified (rel. error
  < 1e-2) on every shape they ran, ranked by the geometric mean of their time over XLA's / the
  peer's on the same shapes (shapes containing ``shape_filter``)."""
  with open(path) as f:
    rows = [r for r in json.load(f)["results"] if r["section"] == section and "us" in r
            and shape_filter in r["shape"]]
  peers = {r["shape"]: r["us"] for r in rows if not r["impl"].startswith(("kl ", "modelopt "))}
  ratios: dict[str, list[float]] = {}
  bad = set()
  for r in rows:
    if r["impl"].startswith("kl ") and r["shape"] in peers:
      if not r.get("rel_err", 1) < 1e-2:
        bad.add(r["impl"])
      ratios.setdefault(r["impl"], []).append(r["us"] / peers[r["shape"]])
  score = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in ratios.items() if k not in bad}
  return [k[3:] for k in sorted(score, key=score.get)[:n]]


def kl_call(t, x_dtype):
  def f(x, p, s, g):
    return nk.w4a16_matmul_kl(x.astype(x_dtype), p, s, g, tiling=t)
  return f


def sec_klcheck():
  """Every kernel-layout variant and the PTX even/odd route at small odd shapes vs float64."""
  ks = iter(keys(64))
  names = FLAGS.klcheck_variants or list(dict.fromkeys(
      FLAGS.kl_variants + ["B64 f32", "B128 e4m3", "A64 asm_bytes"]))
  for m, n, k in [tuple(int(v) for v in s.split("x")) for s in FLAGS.klcheck_shapes]:
    x = jax.random.normal(next(ks), (m, k), jnp.bfloat16)
    p, s, g = nvfp4.quantize(jax.random.normal(next(ks), (n, k)))
    ref = ref_f64(x, dequant_f64(p, s, g))
    pk = nvfp4.to_kernel_layout(p)
    for name in [v for v in names if kl_applies(v, m)]:
      try:
        t, xdt = kl_variant(name, m, n, k)
        y = kl_call(t, xdt)(x, pk, s, g)
        record("klcheck", f"kl m{m} n{n} k{k}", "", name, err=err64(y, ref), note=str(t))
      except Exception as e:  # noqa: BLE001
        record("klcheck", f"kl m{m} n{n} k{k}", "", name, error=f"{type(e).__name__}: {e}"[:400])
    for bm in sorted({16 if m <= 16 else (32 if m <= 32 else 64), 64}):
      t = nk.Tiling(bm, 64, 256, 1, 4, 4, x_even_odd=True, dequant="asm")
      try:
        y = nk.w4a16_matmul(x, p, s, g, tiling=t)
        record("klcheck", f"modelopt m{m} n{n} k{k}", "", f"asm even/odd bm{bm}",
               err=err64(y, ref), note=str(t))
      except Exception as e:  # noqa: BLE001
        record("klcheck", f"modelopt m{m} n{n} k{k}", "", f"asm even/odd bm{bm}",
               error=f"{type(e).__name__}: {e}"[:400])


def sec_mgcheck():
  """The Mosaic GPU decode kernel at small odd shapes (M not a multiple of 8, N not of 64, K not
  of 256) and several tilings, against float64."""
  ks = iter(keys(64))
  for m, n, k in [(5, 200, 272), (40, 128, 768), (1, 64, 256), (13, 384, 2048)]:
    x = jax.random.normal(next(ks), (m, k), jnp.bfloat16)
    p, s, g = nvfp4.quantize(jax.random.normal(next(ks), (n, k)))
    ref = ref_f64(x, dequant_f64(p, s, g))
    wm = mgk.to_mgpu_layout(p, s)
    for name in FLAGS.mgcheck_variants:
      try:
        t = mgpu_variant(name, m, n, k)
        y = mgk.w4a16_matmul_mgpu(x, wm, g, n=n, tiling=t, interpret=FLAGS.interpret)
        record("mgcheck", f"mgpu m{m} n{n} k{k}", "", name, err=err64(y, ref), note=str(t))
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        record("mgcheck", f"mgpu m{m} n{n} k{k}", "", name, error=f"{type(e).__name__}: {e}"[:1500])


def sec_diag():
  """Where the interleaved PTX route's wrong values come from: x = one-hot rows, so y[i, :] is
  the dequantized column k_i as the kernel saw it; report which (n, k) each value matches."""
  m, n, k = 16, 64, 256
  key = keys(1)[0]
  p, s, g = nvfp4.quantize(jax.random.normal(key, (n, k)))
  w = dequant_f64(p, s, g)
  k_of_row = np.arange(m) * 13 % k
  x = jnp.asarray(np.eye(k)[k_of_row], jnp.bfloat16)
  for label, t in [("asm interleaved bm16", nk.Tiling(16, 64, 256, 1, 4, 4, dequant="asm")),
                   ("asm even/odd bm16", nk.Tiling(16, 64, 256, 1, 4, 4, True, dequant="asm")),
                   ("e4m3 interleaved bm16", nk.Tiling(16, 64, 256, 1, 4, 4, dequant="e4m3"))]:
    try:
      check = nk.check_asm_layout
      nk.check_asm_layout = lambda *a: None
      try:
        y = np.asarray(jnp.asarray(nk.w4a16_matmul(x, p, s, g, tiling=t), jnp.float32), np.float64)
      finally:
        nk.check_asm_layout = check
      want = w[:, k_of_row].T                                  # [m, n]
      ok = np.isclose(y, want, rtol=1e-2, atol=1e-6)
      where = {}
      for i, j in zip(*np.nonzero(~ok)):
        hits = np.argwhere(np.isclose(w, y[i, j], rtol=1e-3, atol=0))
        for hn, hk in hits[:4]:
          d = (int(hn - j), int(hk - k_of_row[i]))
          where[d] = where.get(d, 0) + 1
      top = sorted(where.items(), key=lambda kv: -kv[1])[:8]
      record("diag", "one-hot m16 n64 k256", "", label, err=err64(y, want.T.T),
             note=f"wrong {int((~ok).sum())}/{ok.size}; (dn, dk) of matching sources: {top}")
    except Exception as e:  # noqa: BLE001
      record("diag", "one-hot m16 n64 k256", "", label, error=f"{type(e).__name__}: {e}"[:400])


_KL_SHAPES: list[dict] = []


def sec_kl(arg=None):
  """Decode on the kernel layout vs XLA's bf16 dot, float64-checked on the timed call's output.
  M is the outer loop (every shape gets the first M before any gets the second). The section
  argument "kl:8/1" runs only those M (weights are kept for a later "kl:64/32")."""
  ms = [int(v) for v in arg[0].split("/")] if arg else [int(v) for v in FLAGS.kl_ms]
  if not _KL_SHAPES:
    _KL_SHAPES.extend(_kl_weights())
  _kl_time(_KL_SHAPES, ms)


def _kl_weights() -> list[dict]:
  r = FLAGS.kl_sets
  shapes = []
  for k, n in [tuple(D(int(v)) for v in kn.split("x")) for kn in FLAGS.decode_kn]:
    key_w, key_x = keys(2)
    wsets = nvfp4_sets(r, n, k, key_w)
    shapes.append(dict(k=k, n=n, key_x=key_x, wsets=wsets,
                       klsets=[(nvfp4.to_kernel_layout(p), s, g) for p, s, g in wsets],
                       w64=dequant_f64(*wsets[0]),
                       bf16_w=[jax.random.normal(kk, (k, n), jnp.bfloat16)
                               for kk in jax.random.split(key_w, r)]))
  return shapes


def _kl_time(shapes: list[dict], ms: list[int]) -> None:
  r = FLAGS.kl_sets
  for m in ms:
    for sh in shapes:
      if over_budget():
        return
      k, n = sh["k"], sh["n"]
      xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(sh["key_x"], r)]
      io = m * k * 2 + m * n * 2
      wq_bytes = n * k // 2 + n * k // 16
      shape = f"M{m} K{k} N{n}"
      ref = ref_f64(xs[0], sh["w64"])
      base = attempt("kl", shape, shape, "xla bf16 dot", lambda x, w: x @ w,
                     list(zip(xs, sh["bf16_w"])), n * k * 2 + io, 2 * m * n * k)
      results = []
      names = (pick_variants(FLAGS.kl_pick_from, "kl", FLAGS.kl_pick_n)
               if FLAGS.kl_pick_from else FLAGS.kl_variants)
      for name in [v for v in names if kl_applies(v, m)]:
        if name == "op mgpu":   # the public op on an NVFP4Weight in the Mosaic GPU layout
          if "mgsets" not in sh:
            sh["mgsets"] = [(mgk.to_mgpu_layout(p, s), g) for p, s, g in sh["wsets"]]
          fn = lambda x, wm, s, g: gemm_ops.nvfp4_matmul(x, NVFP4Weight(wm, s, g, layout="mgpu"))
          results.append(attempt("kl", shape, shape, f"kl {name}", fn,
                                 [(x, wm, w[1], g) for x, (wm, g), w
                                  in zip(xs, sh["mgsets"], sh["wsets"])], wq_bytes + io,
                                 2 * m * n * k, ref=ref, note="gemm.nvfp4_matmul"))
          continue
        if name.startswith("mgpu"):   # the Mosaic GPU kernel on its own weight layout
          if "mgsets" not in sh:
            sh["mgsets"] = [(mgk.to_mgpu_layout(p, s), g) for p, s, g in sh["wsets"]]
          try:
            tm = mgpu_variant(name, m, n, k)
          except Exception as e:  # noqa: BLE001
            record("kl", shape, shape, f"kl {name}", error=f"{type(e).__name__}: {e}"[:400])
            continue
          fn = lambda x, w, g, tm=tm, n=n: mgk.w4a16_matmul_mgpu(
              x, w, g, n=n, tiling=tm, interpret=FLAGS.interpret)
          if tm.tile_major and "mgsets_t" not in sh:
            sh["mgsets_t"] = [(mgk.to_tile_major(w), g) for w, g in sh["mgsets"]]
          msets = sh["mgsets_t"] if tm.tile_major else sh["mgsets"]
          results.append(attempt("kl", shape, shape, f"kl {name}", fn,
                                 [(x, *w) for x, w in zip(xs, msets)], wq_bytes + io,
                                 2 * m * n * k, ref=ref, note=str(tm)))
          continue
        t, xdt = kl_variant(name, m, n, k)
        if "x16in" in name.split("@")[0].split():   # x arrives in f16, output bf16
          fn = lambda x, p, s, g, t=t: nk.w4a16_matmul_kl(x, p, s, g, tiling=t,
                                                          out_dtype=jnp.bfloat16)
          sets = [(x.astype(jnp.float16), *w) for x, w in zip(xs, sh["klsets"])]
        else:
          fn, sets = kl_call(t, xdt), [(x, *w) for x, w in zip(xs, sh["klsets"])]
        results.append(attempt("kl", shape, shape, f"kl {name}", fn, sets, wq_bytes + io,
                               2 * m * n * k, ref=ref, note=str(t)))
      bm = 16 if m <= 16 else (32 if m <= 32 else 64)
      shape_t = nk._decode_shape_tiling(m, n, k, 132)
      old = {"default": nk.default_tiling(m, n, k),    # the ModelOpt-layout default (asm e/o)
             "previous default": shape_t,              # the f32 route, the default until now
             "asm even/odd": dataclasses.replace(shape_t, block_m=bm, x_even_odd=True,
                                                 dequant="asm")}
      for label in FLAGS.old_routes:
        t = old[label]
        results.append(attempt("kl", shape, shape, f"modelopt {label}",
                               lambda x, p, s, g, t=t: nk.w4a16_matmul(x, p, s, g, tiling=t),
                               [(x, *w) for x, w in zip(xs, sh["wsets"])], wq_bytes + io,
                               2 * m * n * k, ref=ref, note=str(t)))
      good = [res for res in results if "us" in res and res.get("rel_err", 1) < 1e-2]
      if good and "us" in base:
        best = min(good, key=lambda res: res["us"])
        record("kl", shape, shape, "SPEEDUP best verified/xla",
               note=f"{base['us'] / best['us']:.2f}x ({best['impl']}); "
                    f"{best['tbs'] / CEIL['read_tbs']:.0%} of read bw")

def gkl_tiling(name: str, t_rows: int, e: int):
  """kl_variant syntax -> grouped_matmul.Tiling for grouped_matmul_nvfp4_kl."""
  parts = name.split("@")[0].split()
  if parts[0] == "default":     # grouped_matmul.default_kl_tiling
    return gk.default_kl_tiling(t_rows, e)
  rows_per_group = t_rows / e
  form, bn = parts[0][0], int(parts[0][1:])
  kw = {"w_as_a": form == "A", "dequant": parts[1]}
  bm, warps, stages, bk = (16 if rows_per_group <= 16 else 64), 4, 4, nvfp4.KERNEL_TILE
  for p in parts[2:]:
    if p[0] == "w":
      warps = int(p[1:])
    elif p[0] == "s":
      stages = int(p[1:])
    elif p[0] == "t":
      bk = nvfp4.KERNEL_TILE * int(p[1:])
    elif p.startswith("bm"):
      bm = int(p[2:])
  return gk.Tiling(bm, bn, bk, warps, stages, **kw)


def sec_gkl():
  """Grouped decode (T=64, E=32, K=7168, N=2048; uniform and skewed routing) on the kernel layout
  vs jax.lax.ragged_dot in bf16, each variant float64-checked on its timed output."""
  e, k, n = 32, D(7168), D(2048)
  key_w, key_x = keys(2)
  r_nv = 3
  nv, kl = [], []
  for kk in jax.random.split(key_w, r_nv):
    p, s, g = jax.jit(jax.vmap(lambda w: nvfp4.quantize(w)))(
        jax.random.normal(kk, (e, n, k), jnp.float32).astype(jnp.bfloat16))
    nv.append((p, s, g))
    kl.append((nvfp4.to_kernel_layout(p), s, g))
  w64 = [dequant_f64(nv[0][0][i], nv[0][1][i], nv[0][2][i]) for i in range(e)]
  bf = [jax.random.normal(kk, (e, k, n), jnp.bfloat16) for kk in jax.random.split(key_w, 2)]
  for case in FLAGS.grouped_cases:
    t_rows, skew = 64 if case[:-1] == "64" else D(int(case[:-1])), case[-1] == "s"
    if over_budget():
      return
    gs = _routing(t_rows, e, skew)
    sizes = np.asarray(gs)
    active = int((sizes > 0).sum())
    xs = [jax.random.normal(kk, (t_rows, k), jnp.bfloat16) for kk in jax.random.split(key_x, 3)]
    x64 = np.asarray(xs[0].astype(jnp.float32), np.float64)
    ref = np.zeros((t_rows, n))
    start = 0
    for i, c in enumerate(sizes):
      ref[start:start + c] = x64[start:start + c] @ w64[i].T
      start += c
    io = t_rows * k * 2 + t_rows * n * 2
    flops = 2 * t_rows * k * n
    shape = f"T{t_rows} E{e} K{k} N{n} {'skewed' if skew else 'uniform'}"
    base = attempt("gkl", shape, shape, "jax.lax.ragged_dot bf16",
                   lambda x, w: jax.lax.ragged_dot(x, w, gs), list(zip(xs, bf)),
                   active * k * n * 2 + io, flops, note=f"active={active}")
    nv_bytes = active * k * n * 9 // 16 + io
    results = []
    for name in FLAGS.gkl_variants:
      t = gkl_tiling(name, t_rows, e)
      # x16in: x handed over in f16 (the public op's path: gemm.KL_X_F16 casts x in its
      # producer), output bf16
      x16 = "x16in" in name.split("@")[0].split()
      results.append(attempt("gkl", shape, shape, f"kl {name}",
                             lambda x, p, s, g, t=t: gk.grouped_matmul_nvfp4_kl(
                                 x, p, s, g, gs, tiling=t, out_dtype=jnp.bfloat16),
                             [(x.astype(jnp.float16) if x16 else x, *w) for x, w in zip(xs, kl)],
                             nv_bytes, flops, ref=ref, note=str(t)))
    if "modelopt default" in FLAGS.gkl_baselines:
      results.append(attempt("gkl", shape, shape, "modelopt default",
                             lambda x, p, s, g: gk.grouped_matmul_nvfp4(x, p, s, g, gs),
                             [(x, *w) for x, w in zip(xs, nv)], nv_bytes, flops, ref=ref,
                             note=str(gk.default_tiling(t_rows, n, e, "nvfp4"))))
    good = [res for res in results if "us" in res and res.get("rel_err", 1) < 1e-2]
    if good and "us" in base:
      best = min(good, key=lambda res: res["us"])
      record("gkl", shape, shape, "SPEEDUP best verified/ragged_dot",
             note=f"{base['us'] / best['us']:.2f}x ({best['impl']}); "
                  f"{best['tbs'] / CEIL['read_tbs']:.0%} of read bw")


def sec_fp8():
  m = n = k = D(8192)
  key_w, key_x = keys(2)
  xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in jax.random.split(key_x, 2)]
  ws = [jax.jit(fp8_block.quantize_weight)(jax.random.normal(kk, (n, k), jnp.float32))
        for kk in jax.random.split(key_w, 2)]
  flops = 2 * m * n * k
  shape = "M8192 K8192 N8192"
  ref = fp8k.fp8_block_reference(xs[0][:256].astype(jnp.float32), *ws[0])
  tilings = [fp8k.Tiling(128, 128, 8, 4), fp8k.Tiling(128, 256, 8, 3), fp8k.Tiling(128, 128, 4, 4),
             fp8k.Tiling(64, 256, 4, 4)]
  for t in tilings[:2] if FLAGS.short else tilings:
    res = attempt("fp8", shape, shape, f"ours fp8 block {t.block_m}x{t.block_n} w{t.num_warps}",
                  lambda x, w, s, t=t: fp8k.fp8_block_matmul(x, w, s, tiling=t),
                  [(x, *w) for x, w in zip(xs, ws)], 0, flops, note=str(t))
    if "us" in res:
      y = fp8k.fp8_block_matmul(xs[0][:256], *ws[0], tiling=t)
      record("fp8", shape, shape, f"check {t.block_m}x{t.block_n}", err=rel_err(y, ref))
  attempt("fp8", shape, shape, "fp8 act quant 1x128 (xla)",
          lambda x: fp8_block.quantize_activations(x), [(x,) for x in xs], m * k * 3 + m * k // 32)
  for m_dec in [1, 64]:
    shp = f"M{m_dec} K{k} N{n}"
    attempt("fp8", shp, shp, "ours fp8 block (decode)",
            lambda x, w, s: fp8k.fp8_block_matmul(x, w, s), [(x[:m_dec], *w) for x, w in
                                                             zip(xs, ws)],
            n * k + n * k // 16384 * 4, 2 * m_dec * n * k,
            ref=lambda: fp8k.fp8_block_reference(xs[0][:m_dec].astype(jnp.float32), *ws[0]))


def main(argv):
  del argv
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  if FLAGS.interpret:
    from jax.experimental import pallas as pl
    original = pl.pallas_call

    def forced_interpret(*args, **kwargs):
      kwargs["interpret"] = True
      return original(*args, **kwargs)
    pl.pallas_call = forced_interpret
    real_mode_for = nk.mode_for   # inline PTX cannot run on the CPU: use its jnp twin
    nk.mode_for = gk.mode_for = lambda dequant, interpret: real_mode_for(dequant, True)
    real_kl_mode_for = nk.kl_mode_for
    nk.kl_mode_for = gk.kl_mode_for = lambda dequant, interpret: real_kl_mode_for(dequant, True)
  sections = {"ceil": sec_ceil, "check": sec_check, "decode": sec_decode,
              "prefill": sec_prefill, "grouped": sec_grouped, "fp8": sec_fp8,
              "klcheck": sec_klcheck, "kl": sec_kl, "mgcheck": sec_mgcheck, "diag": sec_diag, "gkl": sec_gkl}
  for name in FLAGS.sections:
    name, _, arg = name.partition(":")   # "decode:KxN" runs one decode shape
    if name not in sections:
      continue
    if over_budget():
      print("budget exhausted before", name)
      break
    print(f"=== {name} ({time.time() - T0:.0f}s)", flush=True)
    try:
      sections[name](*([[arg]] if arg else []))
    except Exception:  # noqa: BLE001
      traceback.print_exc()
  print("\n==== summary ====")
  for r in RESULTS:
    if r["section"] in ("check", "klcheck", "mgcheck") and "rel_err" in r and (r["rel_err"] != r["rel_err"]
                                                          or r["rel_err"] > 2e-2):
      print("BAD CHECK", r["name"], r["rel_err"])
  for r in RESULTS:
    if r["section"] == "check":
      continue
    print(f"{r['section']:8s} {r['shape']:34s} {r['impl']:38s} "
          f"{r.get('us', float('nan')):9.1f}us tbs={r.get('tbs') or 0:5.2f} "
          f"tf={r.get('tflops') or 0:6.1f} roof={r.get('roofline_frac') or 0:4.2f} "
          f"err={r.get('rel_err', '-')} {r['note'] if 'SPEEDUP' in r['impl'] else ''}"
          f"{' ERR ' + r['error'][:150] if 'error' in r else ''}")
  print(f"total {time.time() - T0:.0f}s")


if __name__ == "__main__":
  app.run(main)
