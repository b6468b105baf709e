"""One Wan DiT denoising step (one forward, batch 1) split into GEMM / attention / rest, per precision.

The blocks are identical, so one block is compiled and timed and the step is L × block + embed/head
(compiling the unrolled 30/40-layer forward per variant costs more than the whole device budget).
Per variant three jitted functions run on the same random inputs: the whole block, only its matmuls
(self q/k/v/o + cross q/o on S tokens, cross k/v on the text, FFN), and only its two attentions;
rest = block - GEMM - attention (norms, modulation, RoPE, residuals, quantization passes).

Variants (linear / attention):
  bf16          XLA bf16 dot / cuDNN flash attention bf16
  fp8xla        per-tensor scaled E4M3 dot through XLA (cuBLASLt FP8; the scaled-dot pattern) / bf16
  fp8attn       bf16 / cuDNN FP8 attention, SageAttention-style: K smoothed (mean over tokens
                subtracted, softmax-invariant), per-tensor scaled E4M3 Q, K, V, P
  fp8           fp8xla + fp8attn  (the issue's target: >= 1.4x bf16)
  fp8block      kernels.quant FP8BlockWeight via ops.linear, as the project dispatches it
  nvfp4         kernels.quant NVFP4Weight (W4A16) via ops.linear, as the project dispatches it
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
from jaxinfer.video.low_precision import fp8_cudnn_attention, quantize_block

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "1.3b", ["1.3b", "14b", "tiny"], "DiT shape")
flags.DEFINE_integer("frames", 81, "video frames (1 + 4k)")
flags.DEFINE_integer("height", 480, "pixels")
flags.DEFINE_integer("width", 832, "pixels")
flags.DEFINE_integer("text_len", 512, "text tokens (Wan pads prompts to 512)")
flags.DEFINE_integer("iters", 10, "timed iterations per function (median)")
flags.DEFINE_list("variants", ["bf16", "fp8xla", "fp8attn", "fp8", "fp8block", "nvfp4"], "variants")
flags.DEFINE_string("bf16_attn", "cudnn", "attention impl for bf16 (cudnn | xla)")
flags.DEFINE_bool("ceilings", True, "measure the bf16 / fp8 matmul ceilings first")
flags.DEFINE_string("out", "", "JSON path (default $OUT/dit.json)")
flags.DEFINE_list("sp", [], "Ulysses axis sizes to time a one-layer bf16 forward on (e.g. 2,4,8); "
                  "needs that many devices")

VARIANTS = {  # name: (linear kind, attention kind)
    "bf16": ("bf16", "bf16"), "fp8xla": ("fp8xla", "bf16"), "fp8attn": ("bf16", "fp8"),
    "fp8": ("fp8xla", "fp8"), "fp8block": ("fp8block", "bf16"), "nvfp4": ("nvfp4", "bf16")}


def bench(fn, args, iters):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def ceilings(iters):
  n = 8192
  k1, k2 = jax.random.split(jax.random.key(9))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  t_bf16, _ = bench(jax.jit(lambda a, b: a @ b), (a, b), iters)
  a8, b8 = a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn)
  one = jnp.ones((), jnp.bfloat16)
  f8 = jax.jit(lambda a, b: jnp.dot(a.astype(jnp.bfloat16) * one, b.astype(jnp.bfloat16) * one,
                                    preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  t_fp8, _ = bench(f8, (a8, b8), iters)
  return {"bf16_tflops": 2 * n ** 3 / t_bf16 / 1e12, "fp8_tflops": 2 * n ** 3 / t_fp8 / 1e12}


def ulysses_scaling(cfg, grid, text_len, sizes):
  """One-layer bf16 forward on 1 device vs Ulysses over n devices; efficiency = t1 / (n · t_n)."""
  from sharding import ulysses  # pylint: disable=import-outside-toplevel
  one = dataclasses.replace(cfg, num_layers=1)
  params = wan_dit.init_params_on_device(one, jax.random.key(0), jnp.bfloat16)
  lat = jax.random.normal(jax.random.key(4), (1, *[g * p for g, p in zip(grid, cfg.patch_size)],
                                              cfg.in_channels), jnp.bfloat16)
  text = jax.random.normal(jax.random.key(5), (1, text_len, cfg.text_dim), jnp.bfloat16)
  t = jnp.array([500.0])
  attn = FLAGS.bf16_attn
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
    print(f"ulysses sp={n}: {r}", flush=True)
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
            "frames": FLAGS.frames, "height": FLAGS.height, "width": FLAGS.width, "tokens": S,
            "text_len": L_text, "variants": {}}
  print(f"{dev.device_kind} jax {jax.__version__}: {FLAGS.config} {FLAGS.frames}x{FLAGS.height}x"
        f"{FLAGS.width} -> S={S} tokens, D={D}, L={cfg.num_layers}", flush=True)
  if FLAGS.ceilings:
    result["ceilings"] = ceilings(FLAGS.iters)
    print("ceilings", result["ceilings"], flush=True)

  # One block's random weights + inputs, on device.
  one = dataclasses.replace(cfg, num_layers=1)
  params = wan_dit.init_params_on_device(one, jax.random.key(0), jnp.bfloat16)
  block = params["blocks"][0]
  ks = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(ks[0], (1, S, D), jnp.bfloat16)
  ctx = jax.random.normal(ks[1], (1, L_text, D), jnp.bfloat16)
  tproj = 0.1 * jax.random.normal(ks[2], (1, 6, D), jnp.float32)
  cos, sin = (jnp.asarray(a) for a in wan_dit.rope_3d(cfg, grid))
  bf16_attn = lambda q, k, v: wan_dit.attention(q, k, v, FLAGS.bf16_attn)
  attn_fns = {"bf16": bf16_attn, "fp8": fp8_cudnn_attention}

  def gemms(b, x, ctx):
    sa, ca = b["self_attn"], b["cross_attn"]
    lin = wan_dit.linear
    outs = [lin(x, sa[n]) for n in ("wq", "wk", "wv", "wo")] + [lin(x, ca["wq"]), lin(x, ca["wo"])]
    outs += [lin(ctx, ca["wk"]), lin(ctx, ca["wv"])]
    h = lin(x, b["ffn_w1"])
    outs.append(lin(h, b["ffn_w2"]))
    return [o.sum(dtype=jnp.float32) for o in outs]           # keep every product live, tiny output

  def attns(attn, q, k, v, kc, vc):
    return attn(q, k, v), attn(q, kc, vc)

  qkv = [jax.random.normal(k_, (1, S, N, cfg.head_dim), jnp.bfloat16)
         for k_ in jax.random.split(jax.random.key(2), 3)]
  kvc = [jax.random.normal(k_, (1, L_text, N, cfg.head_dim), jnp.bfloat16)
         for k_ in jax.random.split(jax.random.key(3), 2)]

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
    try:
      qb = jax.jit(quantize_block, static_argnums=1)(block, lin_kind)
      attn = attn_fns[attn_kind]
      blk = jax.jit(lambda b, x, ctx, tp, c, s: wan_dit.block_forward(
          b, x, ctx, tp, c, s, cfg, attn, attn))
      t_blk, out = bench(blk, (qb, x, ctx, tproj, cos, sin), FLAGS.iters)
      if lin_kind not in gemm_ms:
        gemm_ms[lin_kind] = bench(jax.jit(gemms), (qb, x, ctx), FLAGS.iters)[0]
      if attn_kind not in attn_ms:
        attn_ms[attn_kind] = bench(jax.jit(lambda *a: attns(attn, *a)), (*qkv, *kvc), FLAGS.iters)[0]
      t_gemm, t_attn = gemm_ms[lin_kind], attn_ms[attn_kind]
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
      result["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      continue
    out = np.asarray(out, np.float32)
    row = {"block_ms": t_blk * 1e3, "gemm_ms": t_gemm * 1e3, "attention_ms": t_attn * 1e3,
           "rest_ms": (t_blk - t_gemm - t_attn) * 1e3,
           "step_ms": (cfg.num_layers * t_blk + t_eh) * 1e3,
           "gemm_tflops": flops["gemm"] / t_gemm / 1e12,
           "attention_tflops": flops["attention"] / t_attn / 1e12}
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

  if FLAGS.sp:
    result["ulysses"] = ulysses_scaling(cfg, grid, L_text, [int(n) for n in FLAGS.sp])

  base = result["variants"].get("bf16", {}).get("step_ms")
  print(f"\n{'variant':10s} {'step ms':>9s} {'block':>7s} {'gemm':>7s} {'attn':>7s} {'rest':>7s} "
        f"{'GEMM TF/s':>9s} {'attn TF/s':>9s} {'speedup':>7s} {'PSNR dB':>8s}")
  for name, r in result["variants"].items():
    if "error" in r:
      print(f"{name:10s} failed: {r['error'][:80]}")
      continue
    sp = base / r["step_ms"] if base else float("nan")
    r["speedup_vs_bf16"] = sp
    print(f"{name:10s} {r['step_ms']:9.1f} {r['block_ms']:7.2f} {r['gemm_ms']:7.2f} "
          f"{r['attention_ms']:7.2f} {r['rest_ms']:7.2f} {r['gemm_tflops']:9.0f} "
          f"{r['attention_tflops']:9.0f} {sp:7.2f} {r.get('psnr_vs_bf16_db', float('nan')):8.1f}")
  path = FLAGS.out or os.path.join(os.environ.get("OUT", "."), "dit.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
