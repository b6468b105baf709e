"""One DeepSeek-V3-shaped MoE layer on the GPU: time per layer split into parts, bf16 vs NVFP4 experts.

Shapes are V3/R1's (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128 / rope 64 / v 128,
256 routed experts of 2048, top-8 in 4 of 8 groups, one shared expert), cut to one MoE layer. Decode
steps of B sequences with ``--context`` cached tokens each, and one prefill of ``--prefill`` tokens.

Parts, each its own jitted function on the same inputs (the layer's own code paths):
  attention  norm + q/kv projections + latent cache write + MLA (absorbed kernel for decode,
             prefill form for prefill) + o_proj
  routing    router GEMM, sigmoid, group-limited top-k, sort by expert, row gather
  moe_gemms  the three grouped GEMMs on the sorted rows (kernels.gemm.grouped_matmul)
  rest       full layer - the three above (shared expert, norms, combine, residuals)
Timings: warm-up, then the median of --iters calls, each synchronised; the cache is donated and fed
back. Peaks of the same run: streamed read bandwidth and a bf16 8192^3 GEMM.

  PYTHONPATH=. python3 experiments/bench_deepseek.py --out=$OUT/deepseek.json
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.models import deepseek_v3 as ds
from jaxinfer.models import moe
from jaxinfer.ops import rms_norm
from kernels import grouped_matmul
from kernels.quant import GroupedNVFP4Weight

FLAGS = flags.DEFINE_string("out", "/tmp/deepseek_bench.json", "JSON results")
_BATCHES = flags.DEFINE_string("decode_batches", "1,16,64,128", "decode batch sizes")
_CONTEXT = flags.DEFINE_integer("context", 2048, "cached tokens per decode sequence")
_PREFILL = flags.DEFINE_integer("prefill", 4096, "prefill tokens (one sequence)")
_ITERS = flags.DEFINE_integer("iters", 10, "timed calls per measurement")
_TINY = flags.DEFINE_bool("tiny", False, "small shapes, for a CPU smoke run of this script")
_ONLY = flags.DEFINE_string("only", "", "run only the cases whose label contains this")
_PARTS = flags.DEFINE_list("parts", ["layer", "attention", "routing", "moe_gemms", "moe_block"],
                           "which parts to time (rest is derived only when all four are timed)")
_NVFP4_ALSO = flags.DEFINE_list("nvfp4_also", [], "extra NVFP4 decode B=64 cases with these "
                                "grouped-kernel dequant routes (kernels.nvfp4_matmul.DEQUANT_MODES)")
_KL = flags.DEFINE_bool("nvfp4_kl", True, "also run decode B=64 with the NVFP4 experts in the "
                        "kernel layout (GroupedNVFP4Weight.to_kernel_layout, the faster kernel)")
_LABELS = flags.DEFINE_list("labels", [], "run only the cases with exactly these labels")
_KL_TILING = flags.DEFINE_string(
    "kl_tiling", "", "grouped kernel-layout decode tiling, e.g. 'B128 asm w2 s3 t2' (B/A = weight "
    "as the MMA's B/A operand, block_n, dequant mode, w<warps>, s<stages>, t<K tiles per step>); "
    "empty: grouped_matmul.KL_DECODE as committed")
_PEAKS = flags.DEFINE_bool("peaks", True, "measure the read / bf16 GEMM peaks of this run first")
_COMPARE = flags.DEFINE_bool("compare", True, "kernel-layout case: also compare its MoE GEMM "
                             "output with the ModelOpt-layout kernel's (costs a compile)")
_PAGE = 64

CFG = ds.DeepseekV3Config(
    vocab_size=1024, hidden_size=7168, num_layers=1, num_heads=128, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, num_experts_per_tok=8,
    n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=0,
    rope_scaling=ds.YarnScaling(factor=40.0, original_max_position=4096, mscale=1.0,
                                mscale_all_dim=1.0), max_position_embeddings=163840)


def timeit(fn, *args, donate_first_out=False, iters=None):
  """Median seconds per call. With donate_first_out the call's second output replaces args[0]."""
  iters = iters or _ITERS.value
  args = list(args)
  times = []
  for i in range(iters + 2):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    if i >= 2:
      times.append(time.perf_counter() - t0)
    if donate_first_out:
      args[0] = out[1]
  return statistics.median(times)


def init_layer(key) -> dict:
  shapes = ds.layer_shapes(CFG, 0)

  layer = {}
  for i, (name, s) in enumerate(sorted(shapes.items())):
    k = jax.random.fold_in(key, i)
    if name.endswith("norm"):
      layer[name] = jnp.ones(s, jnp.bfloat16)
    elif name in ds.FLOAT32_PARAMS:
      layer[name] = 0.02 * jax.random.normal(k, s, jnp.float32)
    elif len(s) == 3:  # experts: chunk to bound the float32 temporary
      layer[name] = jnp.concatenate([
          (0.02 * jax.random.normal(jax.random.fold_in(k, c), (32, *s[1:]), jnp.bfloat16))
          for c in range(s[0] // 32)])
    else:
      layer[name] = (0.02 * jax.random.normal(k, s, jnp.bfloat16))
  return layer


def to_nvfp4(w_ekn):
  parts = [GroupedNVFP4Weight.from_dense(w_ekn[c:c + 32]) for c in range(0, w_ekn.shape[0], 32)]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def set_kl_tiling(name: str) -> None:
  """'B128 asm w2 s3 t2' -> grouped_matmul.KL_DECODE (the grouped kernel-layout default)."""
  parts = name.split()
  d = {"w_as_a": parts[0][0] == "A", "block_n": int(parts[0][1:]), "dequant": parts[1]}
  for p in parts[2:]:
    key = {"w": "num_warps", "s": "num_stages", "t": "block_k"}[p[0]]
    d[key] = int(p[1:]) * (256 if p[0] == "t" else 1)
  grouped_matmul.KL_DECODE.update(d)


def make_batch(num_seqs, tokens_per_seq, context):
  pages_per_seq = -(-context // _PAGE)
  chunks = [SeqChunk(list(range(1 + b * pages_per_seq, 1 + (b + 1) * pages_per_seq)),
                     context - tokens_per_seq, tokens_per_seq) for b in range(num_seqs)]
  return build_batch(chunks, _PAGE, num_tokens=num_seqs * tokens_per_seq, num_seqs=num_seqs,
                     pages_per_seq=pages_per_seq), 1 + num_seqs * pages_per_seq


def layer_fns(form):
  def full(pages, layer, x, batch):
    inv_freq, af = ds.rope_parameters(CFG)
    cos, sin = ds.rope_cos_sin(batch.positions, jnp.asarray(inv_freq))
    h, pages = ds._attention_block(layer, x, cos * af, sin * af, pages, jnp.float32(1), batch, CFG,
                                   form)
    return ds._ffn_block(layer, h, CFG, "dispatch"), pages

  def attn(pages, layer, x, batch):
    inv_freq, af = ds.rope_parameters(CFG)
    cos, sin = ds.rope_cos_sin(batch.positions, jnp.asarray(inv_freq))
    h, pages = ds._attention_block(layer, x, cos * af, sin * af, pages, jnp.float32(1), batch, CFG,
                                   form)
    return h, pages

  def routing(layer, x):
    h = rms_norm(x, layer["mlp_norm"], CFG.rms_norm_eps)
    w, idx = moe.route(h, layer["router"], layer["router_bias"], top_k=CFG.num_experts_per_tok,
                       n_group=CFG.n_group, topk_group=CFG.topk_group, norm_topk_prob=True,
                       routed_scaling_factor=CFG.routed_scaling_factor)
    order, rows, sizes = moe.sort_by_expert(idx, CFG.n_routed_experts)
    return h[rows], sizes, w, order

  def gemms(layer, xs, sizes):
    g = moe.grouped_linear(xs, layer["experts_gate"], sizes)
    u = moe.grouped_linear(xs, layer["experts_up"], sizes)
    return moe.grouped_linear(jax.nn.silu(g) * u, layer["experts_down"], sizes)

  def moe_block(layer, x):
    return ds._ffn_block(layer, x, CFG, "dispatch")

  return (jax.jit(full, donate_argnums=0), jax.jit(attn, donate_argnums=0), jax.jit(routing),
          jax.jit(gemms), jax.jit(moe_block))


def measure(layer, num_seqs, tokens_per_seq, context, key, label):
  batch, num_pages = make_batch(num_seqs, tokens_per_seq, context)
  form = ds.choose_mla_form(batch.num_tokens, batch.num_seqs)
  T = batch.num_tokens
  x = jax.random.normal(key, (T, CFG.hidden_size), jnp.bfloat16)
  pages = jax.random.normal(key, (num_pages, _PAGE, CFG.latent_dim), jnp.bfloat16)
  full, attn, routing, gemms, moe_block = layer_fns(form)
  r = {"label": label, "tokens": T, "seqs": num_seqs, "context": context, "mla_form": form}
  parts = set(_PARTS.value)
  if "layer" in parts:
    r["layer_ms"] = 1e3 * timeit(lambda p: full(p, layer, x, batch), pages, donate_first_out=True)
  if "attention" in parts:
    pages = jax.random.normal(key, (num_pages, _PAGE, CFG.latent_dim), jnp.bfloat16)
    r["attention_ms"] = 1e3 * timeit(lambda p: attn(p, layer, x, batch), pages,
                                     donate_first_out=True)
  if "routing" in parts:
    r["routing_ms"] = 1e3 * timeit(routing, layer, x)
  xs, sizes, _, _ = routing(layer, x)
  r["moe_gemms_ms"] = 1e3 * timeit(gemms, layer, xs, sizes)
  if "moe_block" in parts:
    r["moe_block_ms"] = 1e3 * timeit(moe_block, layer, x)
  if {"layer", "attention", "routing"} <= parts:
    r["rest_ms"] = r["layer_ms"] - r["attention_ms"] - r["routing_ms"] - r["moe_gemms_ms"]
  active = int(jnp.sum(sizes > 0))
  bytes_per_expert = 3 * CFG.hidden_size * CFG.moe_intermediate_size
  wbytes = active * bytes_per_expert * (0.5 + 1 / 16 if "nvfp4" in label else 2)
  r["active_experts"] = active
  r["moe_gemm_weight_TBps"] = wbytes / (r["moe_gemms_ms"] * 1e-3) / 1e12
  return r


def compare_gemms(layer_a, layer_b, num_seqs, key) -> float:
  """Relative difference of the three grouped GEMMs' output between two layers holding the same
  quantized experts (e.g. ModelOpt vs kernel layout: both dequantize exactly, so this is MMA /
  output rounding, ~1e-3)."""
  _, _, routing, gemms, _ = layer_fns("absorbed")
  x = jax.random.normal(key, (num_seqs, CFG.hidden_size), jnp.bfloat16)
  xs, sizes, _, _ = routing(layer_a, x)
  a = gemms(layer_a, xs, sizes).astype(jnp.float32)
  b = gemms(layer_b, xs, sizes).astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(a), 1e-30))


def peaks():
  x = jnp.ones((1 << (20 if _TINY.value else 30),), jnp.float32)
  read = timeit(jax.jit(jnp.sum), x, iters=5)
  n = 512 if _TINY.value else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  mm = timeit(jax.jit(lambda a, b: a @ b), a, a, iters=5)
  return {"read_TBps": x.nbytes / read / 1e12, "bf16_gemm_TFLOPs": 2 * n ** 3 / mm / 1e12}


def main(_):
  global CFG
  if _TINY.value:
    CFG = dataclasses.replace(CFG, hidden_size=256, num_heads=4, q_lora_rank=128, kv_lora_rank=128,
                              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                              moe_intermediate_size=256, n_routed_experts=64)
  results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "config": dataclasses.asdict(CFG), "runs": [], "errors": []}

  def save():
    with open(FLAGS.value, "w") as f:
      json.dump(results, f, indent=1, default=str)

  key = jax.random.key(0)
  results["peaks"] = peaks() if _PEAKS.value else {}
  save()
  layer = init_layer(key)
  jax.block_until_ready(layer)
  nv_layer = None
  batches = [int(b) for b in _BATCHES.value.split(",")]
  # The headline comparison first, so that a run cut short still has it.
  cases = [(64, 1, _CONTEXT.value, "decode B=64 bf16"), (64, 1, _CONTEXT.value,
                                                        "decode B=64 nvfp4-experts")]
  if _KL.value:
    cases.insert(1, (64, 1, _CONTEXT.value, "decode B=64 nvfp4-experts kernel-layout"))
  cases += [(64, 1, _CONTEXT.value, f"decode B=64 nvfp4-experts dequant={mode}")
            for mode in _NVFP4_ALSO.value]
  cases += [(b, 1, _CONTEXT.value, f"decode B={b} bf16") for b in batches if b != 64]
  cases.append((1, _PREFILL.value, _PREFILL.value, f"prefill {_PREFILL.value} bf16"))
  cases = [c for c in cases if _ONLY.value in c[3]]
  if _LABELS.value:
    cases = [c for c in cases if c[3] in _LABELS.value]
  if _KL_TILING.value:
    set_kl_tiling(_KL_TILING.value)
  results["grouped_kl_tiling"] = dict(grouped_matmul.KL_DECODE)
  kl_layer = None
  for num_seqs, per_seq, context, label in cases:
    try:
      if "nvfp4" in label and nv_layer is None:
        nv_layer = dict(layer)
        for name in ("experts_gate", "experts_up", "experts_down"):
          nv_layer[name] = to_nvfp4(layer[name])
      if "kernel-layout" in label:
        if kl_layer is None:
          kl_layer = dict(nv_layer)
          for name in ("experts_gate", "experts_up", "experts_down"):
            kl_layer[name] = nv_layer[name].to_kernel_layout()
        r = measure(kl_layer, num_seqs, per_seq, context, key, label)
        if _COMPARE.value:
          r["kl_vs_modelopt_rel_err"] = compare_gemms(nv_layer, kl_layer, num_seqs, key)
      elif "nvfp4" in label:
        default_mode = grouped_matmul.DECODE_DEQUANT
        if "dequant=" in label:   # the tiling is picked inside jitted functions: retrace
          grouped_matmul.DECODE_DEQUANT = label.split("dequant=")[1]
          jax.clear_caches()
        try:
          r = measure(nv_layer, num_seqs, per_seq, context, key, label)
        finally:
          if grouped_matmul.DECODE_DEQUANT != default_mode:
            grouped_matmul.DECODE_DEQUANT = default_mode
            jax.clear_caches()
        r["grouped_dequant"] = label.split("dequant=")[1] if "dequant=" in label else default_mode
      else:
        r = measure(layer, num_seqs, per_seq, context, key, label)
      results["runs"].append(r)
      print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    except Exception as e:  # keep the other measurements
      traceback.print_exc()
      results["errors"].append(f"{label}: {type(e).__name__}: {str(e)[:500]}")
    save()
  by = {r["label"]: r for r in results["runs"]}
  for nv_label, key_name in [("decode B=64 nvfp4-experts", "nvfp4_speedup_B64"),
                            ("decode B=64 nvfp4-experts kernel-layout", "nvfp4_kl_speedup_B64")]:
    if "decode B=64 bf16" in by and nv_label in by:
      bf, nv = by["decode B=64 bf16"], by[nv_label]
      results[key_name] = {k: bf[k] / nv[k] for k in ("layer_ms", "moe_block_ms", "moe_gemms_ms")
                           if k in bf and k in nv}
  save()
  print(json.dumps({"peaks": results["peaks"], "speedup": results.get("nvfp4_speedup_B64"),
                    "speedup_kl": results.get("nvfp4_kl_speedup_B64"),
                    "errors": results["errors"]}, indent=1))
  print(f"{'case':28s} {'layer':>8s} {'attn':>8s} {'route':>8s} {'gemms':>8s} {'rest':>8s} "
        f"{'moe':>8s} {'TB/s':>6s}")
  nan = float("nan")
  for r in results["runs"]:
    print(f"{r['label']:28s} {r.get('layer_ms', nan):8.3f} {r.get('attention_ms', nan):8.3f} "
          f"{r.get('routing_ms', nan):8.3f} {r['moe_gemms_ms']:8.3f} {r.get('rest_ms', nan):8.3f} "
          f"{r.get('moe_block_ms', nan):8.3f} {r['moe_gemm_weight_TBps']:6.2f}")


if __name__ == "__main__":
  app.run(main)
