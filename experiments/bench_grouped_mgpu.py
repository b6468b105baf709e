"""Grouped NVFP4 decode on Mosaic GPU (kernels/grouped_nvfp4_matmul_mgpu.py) on the GPU: float64
checks at small odd shapes, then the issue's grouped decode target (T=64, E=32, K=7168, N=2048,
uniform and skewed routing) against jax.lax.ragged_dot (bf16) and the Triton kernel-layout default
(x in f16, as the public op runs it), in one run. Reuses experiments/bench_gemm.py's timing,
checking and JSON (its flags: --out, --reps, --rep_seconds, --budget_s, --shrink, --interpret,
--device_time).

  PYTHONPATH=. python3 experiments/bench_grouped_mgpu.py --out=$OUT/grouped.json \
      --gm_sections=check,target --gm_variants="mgpu,mgpu s6"
"""
from __future__ import annotations

import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_gemm as bg
from kernels import grouped_matmul as gk
from kernels import grouped_nvfp4_matmul_mgpu as gm
from kernels.quant import nvfp4

FLAGS = flags.FLAGS
flags.DEFINE_list("gm_sections", ["check", "target"], "check (small odd shapes), target, ceil")
flags.DEFINE_list("gm_cases", ["64u", "64s"], "target routings: T + u(niform) / s(kewed)")
flags.DEFINE_list("gm_variants", ["mgpu"], "Mosaic variants: 'mgpu' + tokens r<rows> c<consumers>"
                  " s<stages> p<ctas> a (automatic barriers on)")
flags.DEFINE_list("gm_check_variants", ["mgpu", "mgpu r16 c1 s3 p7"],
                  "variants of the small-shape check")
flags.DEFINE_list("gm_baselines", ["ragged_dot", "triton"], "peers timed in the same run")


def variant(name: str, t_rows: int, e: int) -> gm.GroupedMgpuTiling:
  kw = {}
  for p in name.split("@")[0].split()[1:]:
    if p[0] == "r":
      kw["block_rows"] = int(p[1:])
    elif p[0] == "c":
      kw["consumers"] = int(p[1:])
    elif p[0] == "s":
      kw["stages"] = int(p[1:])
    elif p[0] == "p":
      kw["ctas"] = int(p[1:])
    elif p == "a":
      kw["no_auto_barriers"] = False
  return gm.default_tiling(t_rows, e, **kw)


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
        t = variant(name, t_rows, e)
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
      t = variant(name, t_rows, e)
      results.append(bg.attempt(
          "gm", shape, shape, name,
          lambda x, w, g, t=t: gm.grouped_w4a16_mgpu(x, w, g, gs, n=n, tiling=t,
                                                     interpret=FLAGS.interpret),
          [(x, *st["mg"]) for x, st in zip(xs, sets)], nv_bytes, flops, ref=ref, note=str(t)))
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


def main(argv):
  del argv
  print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  sections = {"ceil": bg.sec_ceil, "check": sec_check, "target": sec_target}
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
