"""One Wan DiT denoising step (one forward, batch 1) split into GEMM / attention / rest, per precision.

Per variant three jitted functions run on the same random inputs: the whole block, only its matmuls
(as the block issues them: fused q/k/v where the variant fuses, FP8 inputs pre-quantized, raw dot
outputs), and only its two attentions (FP8: the kernel on E4M3 codes); rest = block - GEMM - attention
(norms, modulation, RoPE, residuals, scale/bias epilogues, quantization casts). Step = L × block +
embed/head; --full_step=v1,v2 also times those variants' full forward (--full_step_mode: layerwise,
one jitted block called per layer as the pipeline runs it, or scan, a lax.scan over stacked blocks,
which copies every layer's weights per step).

Variants (linear / attention):
  bf16          XLA bf16 dot / cuDNN flash attention bf16
  bf16fused     bf16 with q/k/v (and cross k/v) fused into one GEMM
  fp8attn       bf16 / calibrated FP8 attention (cuDNN; static Q/K/V scales, delayed K mean)
  fp8attn_dyn   bf16 / dynamic FP8 attention (K mean and amax every call: the first FP8 path)
  fp8gemm       calibrated rowwise FP8 GEMM (E4M3 [N,K] per-channel weights, static per-tensor
                activation scales, fused q/k/v) / bf16
  fp8           fp8gemm + fp8attn  (the issue's target: >= 1.4x bf16)
  fp8tok        FP8 GEMM with dynamic per-token activation scales + fp8attn
  fp8xla        the first FP8 GEMM path (per-tensor amax + cast per linear) / bf16
  fp8block      kernels.quant FP8BlockWeight via ops.linear, as the project dispatches it (kernels.gemm:
                the Mosaic GPU FP8 block kernel on Hopper from 512 rows, x quantized 1x128 per call)
  fp8blockattn  fp8block + calibrated FP8 attention
  nvfp4         kernels.quant NVFP4Weight (W4A16) via ops.linear, as the project dispatches it
                (kernels.gemm: dequantize to bf16 + XLA dot from 512 rows)
  nvfp4a4       NVFP4 W4A4 via kernels.gemm.nvfp4_w4a4_matmul (Pallas quantizer with the calibrated
                activation scale + the kernels/nvfp4_matmul W4A4 kernel, emulated on Hopper; its
                GEMM time includes the activation quantization) / bf16, fused q/k/v
  bf16xla       bf16 compiled with XLA's default options (differs from bf16 only with --notriton_gemm)
Calibration (fp8*) runs the observed bf16 block on a different random draw than the timed input.
Quality: relative error and PSNR of the block output against the bf16 block on the same inputs.

  PYTHONPATH=. python3 experiments/bench_dit.py --config=1.3b --frames=81 --height=480 --width=832
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models import wan_dit
from jaxinfer.video import low_precision as lp

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "1.3b", ["1.3b", "14b", "tiny"], "DiT shape")
flags.DEFINE_integer("frames", 81, "video frames (1 + 4k)")
flags.DEFINE_integer("height", 480, "pixels")
flags.DEFINE_integer("width", 832, "pixels")
flags.DEFINE_integer("text_len", 512, "text tokens (Wan pads prompts to 512)")
flags.DEFINE_integer("iters", 10, "timed iterations per function (median)")
flags.DEFINE_list("variants", ["bf16", "fp8attn", "fp8gemm", "fp8", "nvfp4"], "variants")
flags.DEFINE_string("bf16_attn", "cudnn", "attention impl for bf16 (cudnn | xla)")
flags.DEFINE_bool("ceilings", True, "measure the bf16 / fp8 matmul ceilings first")
flags.DEFINE_list("full_step", [], "variants whose full forward (L blocks) is also timed")
flags.DEFINE_enum("full_step_mode", "layerwise", ["layerwise", "scan"],
                  "layerwise: wan_dit.forward_layerwise (the pipeline's default); scan: one jitted "
                  "forward over stacked blocks")
flags.DEFINE_integer("full_iters", 3, "timed iterations of the full forward")
flags.DEFINE_string("hlo_dir", "", "write the optimized HLO of each variant's block here")
flags.DEFINE_bool("triton_gemm", True, "let XLA emit GEMMs with Triton (autotuned; slow to compile "
                  "for FP8 dots). False: every GEMM goes to cuBLAS/cuBLASLt, for every variant except "
                  "bf16xla (bf16 compiled with XLA's defaults, to show the flag's effect on bf16)")
flags.DEFINE_string("out", "", "JSON path (default $OUT/dit.json)")
flags.DEFINE_list("sp_variants", ["bf16"], "variants (bf16, fp8) of the --sp one-layer forward")
flags.DEFINE_list("sp", [], "Ulysses axis sizes to time a one-layer forward on (e.g. 2,4,8); "
                  "needs that many devices")

VARIANTS = {  # name: (linear kind, attention kind)
    "bf16": ("bf16", "bf16"), "bf16fused": ("bf16fused", "bf16"), "fp8attn": ("bf16", "fp8"),
    "fp8attn_dyn": ("bf16", "fp8dyn"), "fp8gemm": ("fp8", "bf16"), "fp8": ("fp8", "fp8"),
    "fp8tok": ("fp8tok", "fp8"), "fp8xla": ("fp8xla", "bf16"), "fp8block": ("fp8block", "bf16"),
    "fp8blockattn": ("fp8block", "fp8"),
    "nvfp4": ("nvfp4", "bf16"), "nvfp4a4": ("nvfp4a4", "bf16"), "bf16xla": ("bf16", "bf16")}


_OPTS: dict = {}           # XLA compile options for every timed function (--triton_gemm)


def bench(fn, args, iters, opts=None):
  """Compiles jitted ``fn`` for ``args`` (with ``opts``, default the global options) and returns the
  median wall time of ``iters`` synchronous calls, the output, the executable and its compile time."""
  t0 = time.perf_counter()
  exe = fn.lower(*args).compile(compiler_options=_OPTS if opts is None else opts)
  compile_s = time.perf_counter() - t0
  out = exe(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(exe(*args))
    times.append(time.perf_counter() - t0)
  bench.last = (exe, compile_s)
  return statistics.median(times), out


def bench_eager(fn, args, iters):
  """Median wall time of ``iters`` synchronous calls of an un-jitted ``fn`` (e.g. the layerwise
  forward: many jitted calls) after one warm-up call that compiles; also the warm-up's time."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), first_s


def ceilings(iters):
  n = 8192
  k1, k2 = jax.random.split(jax.random.key(9))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  t_bf16, _ = bench(jax.jit(lambda a, b: a @ b), (a, b), iters)
  a8, b8 = a.astype(lp.F8), b.astype(lp.F8)                # b8 read as [N, K]
  f8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                preferred_element_type=jnp.bfloat16))
  t_fp8, _ = bench(f8, (a8, b8), iters)
  return {"bf16_tflops": 2 * n ** 3 / t_bf16 / 1e12, "fp8_tflops": 2 * n ** 3 / t_fp8 / 1e12}


def make_block(block, lin_kind, attn_kind, stats):
  """The variant's block params (quantized offline, outside the timed functions)."""
  if lin_kind in ("fp8", "fp8tok", "nvfp4a4"):
    qb = jax.jit(lp.quantize_block, static_argnums=1)(
        block, "fp8" if lin_kind == "fp8tok" else lin_kind, None if lin_kind == "fp8tok" else stats)
  else:
    qb = jax.jit(lp.quantize_block, static_argnums=1)(block, lin_kind)
  if attn_kind == "fp8":
    qb = lp.with_fp8_attention(qb, stats)
  return qb


def matrices(b):
  """(path, weight) of every projection of a (possibly fused / quantized) block, in block order."""
  out = []
  for part in ("self_attn", "cross_attn"):
    for n in ("wqkv", "wq", "wk", "wv", "wkv", "wo"):
      if n in b[part]:
        out.append((f"{part}.{n}", b[part][n]))
  return out + [("ffn_w1", b["ffn_w1"]), ("ffn_w2", b["ffn_w2"])]


def gemm_operands(b, x, h, ctx):
  """Per matrix: (weight, its input as the block feeds it: E4M3 codes for ScaledFP8Weight)."""
  ops = []
  for path, w in matrices(b):
    inp = h if path == "ffn_w2" else ctx if path.startswith("cross_attn.w") and path[-1] in "kv" else x
    if isinstance(w, lp.ScaledFP8Weight):
      inp = jax.jit(lambda w, a: w.quantize_input(a)[0])(w, inp)
    ops.append((w, inp))
  return ops


def gemms(ops):
  outs = []
  for w, a in ops:
    if isinstance(w, lp.ScaledFP8Weight):     # the raw FP8 dot (scales are applied by consumers)
      outs.append(lp.fp8_dot(a, w.w))
    else:
      outs.append(wan_dit.linear(a, w))
  return outs


def ulysses_scaling(cfg, grid, text_len, sizes, variant="bf16", stats=None):
  """One-layer forward on 1 device vs Ulysses over n devices; efficiency = t1 / (n · t_n).
  variant "fp8": calibrated FP8 GEMMs + FP8 attention (``stats`` of the block), head-sharded."""
  from sharding import ulysses  # pylint: disable=import-outside-toplevel
  one = dataclasses.replace(cfg, num_layers=1)
  params = wan_dit.init_params_on_device(one, jax.random.key(0), jnp.bfloat16)
  if variant == "fp8":
    params = lp.quantize_model(params, "fp8", [stats], fp8_attention=True)
  lat = jax.random.normal(jax.random.key(4), (1, *[g * p for g, p in zip(grid, cfg.patch_size)],
                                              cfg.in_channels), jnp.bfloat16)
  text = jax.random.normal(jax.random.key(5), (1, text_len, cfg.text_dim), jnp.bfloat16)
  t = jnp.array([500.0])
  attn = lambda q, k, v, quant=None: wan_dit.attention(q, k, v, FLAGS.bf16_attn, quant)
  t1, ref = bench(jax.jit(lambda p, *a: wan_dit.forward(p, *a, one, attn_impl=attn)),
                  (params, lat, t, text), FLAGS.iters)
  rows = {"1": {"ms": t1 * 1e3, "efficiency": 1.0}}
  for n in sizes:
    if n > len(jax.devices()):
      rows[str(n)] = {"error": f"needs {n} devices, have {len(jax.devices())}"}
      continue
    mesh = jax.make_mesh((n,), ("sp",), devices=jax.devices()[:n])
    try:
      sharded = ulysses.shard_params(params, mesh, "sp", fsdp=False)
      fn = jax.jit(lambda p, *a: ulysses.forward(p, *a, one, mesh, attn_impl=attn))
      tn, out = bench(fn, (sharded, lat, t, text), FLAGS.iters)
    except Exception as e:  # pylint: disable=broad-except
      rows[str(n)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
      continue
    err = float(np.linalg.norm(np.asarray(out, np.float32) - np.asarray(ref, np.float32)) /
                np.linalg.norm(np.asarray(ref, np.float32)))
    rows[str(n)] = {"ms": tn * 1e3, "efficiency": t1 / (n * tn), "rel_err_vs_1": err}
  for n, r in rows.items():
    print(f"ulysses {variant} sp={n}: {r}", flush=True)
  return rows


def main(_):
  cfg = {"1.3b": wan_dit.WanDiTConfig.wan21_1_3b(), "14b": wan_dit.WanDiTConfig.wan21_14b(),
         "tiny": wan_dit.WanDiTConfig(num_heads=2, head_dim=64, text_dim=64, freq_dim=32, ffn_dim=256,
                                      num_layers=2)}[FLAGS.config]
  grid = ((FLAGS.frames - 1) // 4 + 1, FLAGS.height // 16, FLAGS.width // 16)
  S, D, N = math.prod(grid), cfg.dim, cfg.num_heads
  L_text = FLAGS.text_len
  dev = jax.devices()[0]
  result = {"device": dev.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "config": FLAGS.config, "dim": D, "layers": cfg.num_layers, "heads": N,
            "ffn": cfg.ffn_dim, "frames": FLAGS.frames, "height": FLAGS.height, "width": FLAGS.width,
            "tokens": S, "text_len": L_text, "variants": {}}
  print(f"{dev.device_kind} jax {jax.__version__}: {FLAGS.config} {FLAGS.frames}x{FLAGS.height}x"
        f"{FLAGS.width} -> S={S} tokens, D={D}, L={cfg.num_layers}", flush=True)
  if not FLAGS.triton_gemm:
    _OPTS["xla_gpu_enable_triton_gemm"] = False
  result["compile_options"] = dict(_OPTS)
  if FLAGS.ceilings:
    result["ceilings"] = ceilings(FLAGS.iters)
    print("ceilings", result["ceilings"], flush=True)

  # One block's random weights + inputs, on device.
  one = dataclasses.replace(cfg, num_layers=1)
  params = wan_dit.init_params_on_device(one, jax.random.key(0), jnp.bfloat16)
  block = params["blocks"][0]
  ks = jax.random.split(jax.random.key(1), 5)
  x = jax.random.normal(ks[0], (1, S, D), jnp.bfloat16)
  ctx = jax.random.normal(ks[1], (1, L_text, D), jnp.bfloat16)
  tproj = 0.1 * jax.random.normal(ks[2], (1, 6, D), jnp.float32)
  h = jax.random.normal(ks[3], (1, S, cfg.ffn_dim), jnp.bfloat16)
  cos, sin = (jnp.asarray(a) for a in wan_dit.rope_3d(cfg, grid))
  bf16_attn = lambda q, k, v, quant=None: wan_dit.attention(q, k, v, FLAGS.bf16_attn, quant)
  dyn_attn = lp.fp8_cudnn_attention
  block_fn = lambda attn: jax.jit(lambda b, x, ctx, tp, c, s: wan_dit.block_forward(
      b, x, ctx, tp, c, s, cfg, attn, attn))

  stats = None
  if (any(VARIANTS[v][0] in ("fp8", "nvfp4a4") or VARIANTS[v][1] == "fp8" for v in FLAGS.variants)
      or (FLAGS.sp and "fp8" in FLAGS.sp_variants)):
    t0 = time.perf_counter()
    x_cal = jax.random.normal(ks[4], (1, S, D), jnp.bfloat16)   # calibrate on another draw
    cal = lp.calibrating(lambda b, *a: wan_dit.block_forward(b, *a, cfg, bf16_attn, bf16_attn))
    _, rec = cal(lp.observe_block(block, FLAGS.bf16_attn), x_cal, ctx, tproj, cos, sin)
    stats = lp.merge_stats([rec])
    result["calibration_s"] = time.perf_counter() - t0
    print(f"calibrated in {result['calibration_s']:.1f}s", flush=True)

  qkv = [jax.random.normal(k_, (1, S, N, cfg.head_dim), jnp.bfloat16)
         for k_ in jax.random.split(jax.random.key(2), 3)]
  kvc = [jax.random.normal(k_, (1, L_text, N, cfg.head_dim), jnp.bfloat16)
         for k_ in jax.random.split(jax.random.key(3), 2)]

  def attention_only(kind, opts):
    if kind == "bf16":
      fn = lambda q, k, v, kc, vc: (bf16_attn(q, k, v), bf16_attn(q, kc, vc))
      return bench(jax.jit(fn), (*qkv, *kvc), FLAGS.iters, opts)[0]
    if kind == "fp8dyn":
      fn = lambda q, k, v, kc, vc: (dyn_attn(q, k, v), dyn_attn(q, kc, vc))
      return bench(jax.jit(fn), (*qkv, *kvc), FLAGS.iters, opts)[0]
    # calibrated: the kernel alone on E4M3 codes (quantization is fused into q/k/v's producers)
    amax = lambda a: float(jnp.max(jnp.abs(a.astype(jnp.float32))))
    mk = lambda q, k, v: lp.FP8Attention.from_stats(
        {"q_amax": amax(q), "k_amax": amax(k), "v_amax": amax(v),
         "k_mean": np.zeros((N, cfg.head_dim), np.float32)})
    a_s, a_c = mk(*qkv), mk(qkv[0], *kvc)
    codes = (*a_s.quantize(*qkv), *a_c.quantize(qkv[0], *kvc))
    fn = lambda a_s, a_c, q, k, v, q2, kc, vc: (a_s.attend_quantized(q, k, v),
                                                a_c.attend_quantized(q2, kc, vc))
    return bench(jax.jit(fn), (a_s, a_c, *codes), FLAGS.iters, opts)[0]

  # Embedding + head: measured once (bf16), shared by every variant.
  lat = jax.random.normal(jax.random.key(4), (1, *[g * p for g, p in zip(grid, cfg.patch_size)],
                                              cfg.in_channels), jnp.bfloat16)
  text = jax.random.normal(jax.random.key(5), (1, L_text, cfg.text_dim), jnp.bfloat16)

  def embed_head(p, lat, text):
    xx, temb, _, c, g, _, _ = wan_dit.embed(p, lat, jnp.array([500.0]), text, cfg)
    return wan_dit.unpatchify(wan_dit.head(p, xx, temb, cfg), g, cfg), c
  t_eh, _ = bench(jax.jit(embed_head), (params, lat, text), FLAGS.iters)
  result["embed_head_ms"] = t_eh * 1e3

  ref_out = None
  gemm_ms, attn_ms = {}, {}          # one compile per linear kind / attention kind
  flops = wan_dit.step_flops(dataclasses.replace(cfg, num_layers=1), S, L_text)
  for name in FLAGS.variants:
    lin_kind, attn_kind = VARIANTS[name]
    opts = {} if name == "bf16xla" else None
    try:
      qb = make_block(block, lin_kind, attn_kind, stats)
      blk = block_fn(dyn_attn if attn_kind == "fp8dyn" else bf16_attn)
      args = (qb, x, ctx, tproj, cos, sin)
      t_blk, out = bench(blk, args, FLAGS.iters, opts)
      exe, compile_s = bench.last
      if FLAGS.hlo_dir:
        os.makedirs(FLAGS.hlo_dir, exist_ok=True)
        with open(os.path.join(FLAGS.hlo_dir, f"{FLAGS.config}_{name}_block.hlo.txt"), "w") as f:
          f.write(exe.as_text())
      key_g, key_a = (lin_kind, name == "bf16xla"), (attn_kind, name == "bf16xla")
      if key_g not in gemm_ms:
        ops = gemm_operands(qb, x, h, ctx)
        gemm_ms[key_g] = bench(jax.jit(gemms), (ops,), FLAGS.iters, opts)[0]
        del ops
      if key_a not in attn_ms:
        attn_ms[key_a] = attention_only(attn_kind, opts)
      t_gemm, t_attn = gemm_ms[key_g], attn_ms[key_a]
      row = {"block_ms": t_blk * 1e3, "gemm_ms": t_gemm * 1e3, "attention_ms": t_attn * 1e3,
             "rest_ms": (t_blk - t_gemm - t_attn) * 1e3,
             "step_ms": (cfg.num_layers * t_blk + t_eh) * 1e3,
             "gemm_tflops": flops["gemm"] / t_gemm / 1e12,
             "attention_tflops": flops["attention"] / t_attn / 1e12, "block_compile_s": compile_s}
      if name in FLAGS.full_step:
        attn = dyn_attn if attn_kind == "fp8dyn" else bf16_attn
        if FLAGS.full_step_mode == "scan":
          stacked = dict(params, blocks=jax.tree.map(
              lambda a: jnp.broadcast_to(a, (cfg.num_layers, *a.shape)), qb))
          step = jax.jit(lambda p, lat, text: wan_dit.forward(p, lat, jnp.array([500.0]), text, cfg,
                                                              attn_impl=attn))
          row["full_step_ms"] = bench(step, (stacked, lat, text), FLAGS.full_iters, opts)[0] * 1e3
          row["full_step_compile_s"] = bench.last[1]
          del stacked
        else:            # the same block's arrays L times: every call reads its own weights
          layers = dict(params, blocks=[qb] * cfg.num_layers)
          step = lambda p, lat, text: wan_dit.forward_layerwise(p, lat, jnp.array([500.0]), text,
                                                                cfg, attn_impl=attn)
          t_full, first_s = bench_eager(step, (layers, lat, text), FLAGS.full_iters)
          row["full_step_ms"], row["full_step_first_call_s"] = t_full * 1e3, first_s
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
      result["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      continue
    out = np.asarray(out, np.float32)
    if ref_out is None and name == "bf16":
      ref_out = out
    if ref_out is not None:
      diff = out.astype(np.float64) - ref_out
      row["rel_err_vs_bf16"] = float(np.linalg.norm(diff) / np.linalg.norm(ref_out))
      rng = float(ref_out.max() - ref_out.min())
      mse = float(np.mean(diff ** 2))
      row["psnr_vs_bf16_db"] = float("inf") if mse == 0 else 10 * math.log10(rng ** 2 / mse)
    result["variants"][name] = row
    print(name, {k: round(v, 4) for k, v in row.items()}, flush=True)
    write_json(result)

  if FLAGS.sp:
    for v in FLAGS.sp_variants:
      result.setdefault("ulysses", {})[v] = ulysses_scaling(cfg, grid, L_text,
                                                           [int(n) for n in FLAGS.sp], v, stats)
      write_json(result)

  base = result["variants"].get("bf16", {})
  print(f"\n{'variant':11s} {'step ms':>9s} {'full ms':>8s} {'block':>7s} {'gemm':>7s} {'attn':>7s} "
        f"{'rest':>7s} {'GEMM TF/s':>9s} {'attn TF/s':>9s} {'speedup':>7s} {'PSNR dB':>8s}")
  for name, r in result["variants"].items():
    if "error" in r:
      print(f"{name:11s} failed: {r['error'][:80]}")
      continue
    if base.get("step_ms"):
      r["speedup_vs_bf16"] = base["step_ms"] / r["step_ms"]
    if base.get("full_step_ms") and r.get("full_step_ms"):
      r["full_step_speedup_vs_bf16"] = base["full_step_ms"] / r["full_step_ms"]
    print(f"{name:11s} {r['step_ms']:9.1f} {r.get('full_step_ms', float('nan')):8.1f} "
          f"{r['block_ms']:7.2f} {r['gemm_ms']:7.2f} {r['attention_ms']:7.2f} {r['rest_ms']:7.2f} "
          f"{r['gemm_tflops']:9.0f} {r['attention_tflops']:9.0f} "
          f"{r.get('speedup_vs_bf16', float('nan')):7.2f} {r.get('psnr_vs_bf16_db', float('nan')):8.1f}")
  write_json(result)


def write_json(result):
  """Written after every variant too, so a run cut short by its time limit keeps what it measured."""
  path = FLAGS.out or os.path.join(os.environ.get("OUT", "."), "dit.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
