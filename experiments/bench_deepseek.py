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
import functools
import json
import re
import statistics
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.gpu_trace import busy_ns, gpu_kernel_events, load_trace
from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.models import deepseek_v3 as ds
from jaxinfer.models import moe
from jaxinfer.ops import rms_norm
from kernels import gemm, grouped_matmul
from kernels.quant import GroupedNVFP4Weight, NVFP4Weight, nvfp4

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
_SWEEP = flags.DEFINE_list(
    "sweep", [], "grouped-GEMM variants timed alone on the decode B=64 routing of the NVFP4 "
    "kernel-layout experts, each '<proj>:<tiling>' with proj gate (= up's shape), down or glu "
    "(the fused gate/up + SwiGLU kernel) and tiling 'default' or e.g. 'B128 asm s3 t2' (see "
    "parse_tiling); each is checked against an f32 (precision highest) reference of its output")
_BUDGET = flags.DEFINE_float("budget_s", 0.0, "stop starting new sweep variants / layer cases "
                             "after this many seconds of the run (0: no limit)")
_RESERVE = flags.DEFINE_float("sweep_reserve_s", 0.0, "seconds of --budget_s the sweep leaves "
                              "for the layer cases listed after it (--after_sweep)")
_AFTER = flags.DEFINE_list("after_sweep", [], "labels measured after the sweep (the rest of "
                           "--labels before it)")
_PROFILE = flags.DEFINE_string("profile", "", "labels (comma-separated, or 'all') of the cases "
                               "whose whole layer is also traced (jax.profiler): device busy time "
                               "per layer call (device_ms) and per-kernel GPU time")
_DECODE_ONLY = flags.DEFINE_enum(
    "decode_only", "cond", ["cond", "static", "both"], "decode cases: the MLA kernel chosen by a "
    "runtime cond (cond: a device->host round trip per layer call), by the decode-only step's "
    "static bound max_new_tokens=1 (static: what a serving engine's decode-only step passes), or "
    "both timed (layer_cond_ms / layer_static_ms; layer_ms = static)")
PROFILES: dict = {}
_INTERPRET = flags.DEFINE_bool("interpret", False, "run the sweep's Pallas kernels in interpret "
                               "mode (CPU smoke runs)")
_KL_TILING_DOWN = flags.DEFINE_string(
    "kl_tiling_down", "", "as --kl_tiling, for K <= grouped_matmul.SHORT_K (the down projection): "
    "sets grouped_matmul.KL_DECODE_SHORT_K")
_KL_TILING_GLU = flags.DEFINE_string(
    "kl_tiling_glu", "", "as --kl_tiling, for the fused gate/up kernel: sets "
    "grouped_matmul.KL_DECODE_GLU")
_PAGE = 64
T_START = time.time()


def over_budget(reserve: float = 0.0) -> bool:
  return bool(_BUDGET.value) and time.time() - T_START > _BUDGET.value - reserve

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


def set_kl_tiling(name: str, target: dict | None = None) -> None:
  """'B128 asm w2 s3 t2' -> grouped_matmul.KL_DECODE (the grouped kernel-layout default), or
  into ``target`` (KL_DECODE_SHORT_K / KL_DECODE_GLU)."""
  parts = name.split()
  d = {"w_as_a": parts[0][0] == "A", "block_n": int(parts[0][1:]), "dequant": parts[1]}
  for p in parts[2:]:
    key = {"w": "num_warps", "s": "num_stages", "t": "block_k", "p": "programs"}[p[0]]
    d[key] = int(p[1:]) * (256 if p[0] == "t" else 1)
  (grouped_matmul.KL_DECODE if target is None else target).update(d)


def make_batch(num_seqs, tokens_per_seq, context):
  pages_per_seq = -(-context // _PAGE)
  chunks = [SeqChunk(list(range(1 + b * pages_per_seq, 1 + (b + 1) * pages_per_seq)),
                     context - tokens_per_seq, tokens_per_seq) for b in range(num_seqs)]
  return build_batch(chunks, _PAGE, num_tokens=num_seqs * tokens_per_seq, num_seqs=num_seqs,
                     pages_per_seq=pages_per_seq), 1 + num_seqs * pages_per_seq


def layer_fns(form, max_new_tokens=None):
  """Jitted (layer, attention, routing, gemms, moe_block); ``max_new_tokens=1``: the decode-only
  step's static bound (the MLA kernel is chosen without a runtime cond)."""
  def full(pages, layer, x, batch):
    inv_freq, af = ds.rope_parameters(CFG)
    cos, sin = ds.rope_cos_sin(batch.positions, jnp.asarray(inv_freq))
    h, pages = ds.attention_block(layer, x, cos * af, sin * af, pages, jnp.float32(1), batch, CFG,
                                  form, max_new_tokens)
    return ds.ffn_block(layer, h, CFG, "dispatch"), pages

  def attn(pages, layer, x, batch):
    inv_freq, af = ds.rope_parameters(CFG)
    cos, sin = ds.rope_cos_sin(batch.positions, jnp.asarray(inv_freq))
    h, pages = ds.attention_block(layer, x, cos * af, sin * af, pages, jnp.float32(1), batch, CFG,
                                  form, max_new_tokens)
    return h, pages

  def routing(layer, x):
    h = rms_norm(x, layer["mlp_norm"], CFG.rms_norm_eps)
    w, idx = moe.route(h, layer["router"], layer["router_bias"], top_k=CFG.num_experts_per_tok,
                       n_group=CFG.n_group, topk_group=CFG.topk_group, norm_topk_prob=True,
                       routed_scaling_factor=CFG.routed_scaling_factor)
    order, rows, sizes = moe.sort_by_expert(idx, CFG.n_routed_experts)
    return h[rows], sizes, w, order

  def gemms(layer, xs, sizes):   # the model's path: gemm.grouped_swiglu, then the down GEMM
    h = gemm.grouped_swiglu(xs, layer["experts_gate"], layer["experts_up"], sizes)
    return moe.grouped_linear(h, layer["experts_down"], sizes)

  def moe_block(layer, x):
    return ds.ffn_block(layer, x, CFG, "dispatch")

  return (jax.jit(full, donate_argnums=0), jax.jit(attn, donate_argnums=0), jax.jit(routing),
          jax.jit(gemms), jax.jit(moe_block))


def measure(layer, num_seqs, tokens_per_seq, context, key, label):
  batch, num_pages = make_batch(num_seqs, tokens_per_seq, context)
  form = ds.choose_mla_form(batch.num_tokens, batch.num_seqs)
  T = batch.num_tokens
  x = jax.random.normal(key, (T, CFG.hidden_size), jnp.bfloat16)
  pages = jax.random.normal(key, (num_pages, _PAGE, CFG.latent_dim), jnp.bfloat16)
  decode = tokens_per_seq == 1
  bounds = {"cond": [None], "static": [1], "both": [None, 1]}[_DECODE_ONLY.value] if decode else [None]
  r = {"label": label, "tokens": T, "seqs": num_seqs, "context": context, "mla_form": form}
  parts = set(_PARTS.value)
  for bound in bounds:
    full, attn, routing, gemms, moe_block = layer_fns(form, bound)
    if "layer" in parts:   # (fresh pages: the timed calls donate theirs)
      pages = jax.random.normal(key, (num_pages, _PAGE, CFG.latent_dim), jnp.bfloat16)
      r["layer_static_ms" if bound else "layer_cond_ms"] = 1e3 * timeit(
          lambda p: full(p, layer, x, batch), pages, donate_first_out=True)
  if "layer" in parts:
    r["layer_ms"] = r["layer_static_ms" if bounds[-1] else "layer_cond_ms"]
    if _PROFILE.value and (_PROFILE.value == "all" or label in _PROFILE.value.split(",")):
      if not over_budget():
        prof = profile_layer(layer, key, bounds[-1])
        r["device_ms"] = prof.get("busy_ms")
        r["device_kernel_sum_ms"] = prof.get("kernel_sum_ms")
        PROFILES[label] = prof
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


def parse_tiling(name: str, block_m: int = 16) -> grouped_matmul.Tiling | None:
  """'B128 asm s3 t2 w4 m16' -> grouped Tiling (B/A = weight as the MMA's B/A operand, block_n;
  dequant mode; w<warps> s<stages> t<256-wide K tiles per step> m<block_m> p<programs per N
  tile, looping over the used tiles>); None for 'default' (the committed default_kl_tiling). An 'xf16' token (x cast to f16 outside) is ignored here."""
  parts = [p for p in name.split() if p != "xf16"]
  if parts == ["default"]:
    return None
  d = {"w_as_a": parts[0][0] == "A", "block_n": int(parts[0][1:]), "dequant": parts[1],
       "num_warps": 4, "num_stages": 3, "block_k": 512, "block_m": block_m, "programs": 0}
  for p in parts[2:]:
    key = {"w": "num_warps", "s": "num_stages", "t": "block_k", "m": "block_m",
           "p": "programs"}[p[0]]
    d[key] = int(p[1:]) * (256 if p[0] == "t" else 1)
  return grouped_matmul.Tiling(d["block_m"], d["block_n"], d["block_k"], d["num_warps"],
                               d["num_stages"], dequant=d["dequant"], w_as_a=d["w_as_a"],
                               programs=d["programs"])


def device_time(fn, *args, calls=10, reps=3) -> float:
  """Median over reps of (wall time of `calls` back-to-back calls) / calls, in seconds."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


@jax.jit
def _ref_chunk(x, packed_kl, scale, gs, start, sizes_c):
  """f32 (precision highest) rows of x through experts [c, c + C) (rows before them go through a
  zero expert, rows after them are past the total): ragged_dot on the dequantized chunk."""
  w = jnp.swapaxes(nvfp4.dequantize(nvfp4.from_kernel_layout(packed_kl), scale, gs,
                                    jnp.float32), 1, 2)
  w = jnp.concatenate([jnp.zeros((1, *w.shape[1:]), jnp.float32), w])
  sz = jnp.concatenate([start[None], sizes_c]).astype(jnp.int32)
  return jax.lax.ragged_dot(x.astype(jnp.float32), w, sz, precision="highest")


def grouped_reference_f32(x, w: GroupedNVFP4Weight, sizes, chunk: int = 32) -> jax.Array:
  """ragged_dot(x, dequant(w), sizes) in f32 on the device, 32 experts at a time (bounded
  memory); rows past the total are zero."""
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes)]).astype(jnp.int32)
  e = w.num_groups
  out = None
  for c in range(0, e, chunk):
    y = _ref_chunk(x, w.packed[c:c + chunk], w.scale[c:c + chunk], w.global_scale[c:c + chunk],
                   starts[c], sizes[c:c + chunk])
    out = y if out is None else out + y
  return out


def rel_err(y, ref) -> float:
  y = y.astype(jnp.float32)
  return float(jnp.linalg.norm(y - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def sweep_gemms(kl_layer, key, variants, results, save) -> None:
  """Each '<proj>:<tiling>' of --sweep timed alone (device_time) on the B=64 decode routing, with
  its relative error against grouped_reference_f32; results["sweep"] rows, saved as they come.
  Stops at the budget (leaving --sweep_reserve_s)."""
  _, _, routing, _, _ = layer_fns("absorbed")
  x = jax.random.normal(key, (64, CFG.hidden_size), jnp.bfloat16)
  xs, sizes, _, _ = routing(kl_layer, x)
  wg, wu, wd = kl_layer["experts_gate"], kl_layer["experts_up"], kl_layer["experts_down"]
  active = int(jnp.sum(sizes > 0))
  ref_g = grouped_reference_f32(xs, wg, sizes)
  ref_u = grouped_reference_f32(xs, wu, sizes)
  ref_glu = jax.nn.silu(ref_g) * ref_u
  h = ref_glu.astype(jnp.bfloat16)
  ref_d = grouped_reference_f32(h, wd, sizes)
  jax.block_until_ready((ref_g, ref_glu, ref_d))
  results["sweep_info"] = {"rows": int(xs.shape[0]), "active_experts": active,
                           "max_rows_per_expert": int(jnp.max(sizes)),
                           "reference": "f32 ragged_dot, precision highest, on the device"}
  interp = _INTERPRET.value
  for v in variants:
    if over_budget(_RESERVE.value):
      results.setdefault("sweep_skipped", []).append(v)
      continue
    proj, name = v.split(":", 1)
    row = {"variant": v, "proj": proj}
    try:
      tiling = parse_tiling(name)
      # xf16: x cast to f16 by XLA outside the timed kernel (in the model it fuses into the
      # producer), output still bf16
      cast = (lambda a: a.astype(jnp.float16)) if "xf16" in name.split() else (lambda a: a)
      if proj == "glu":
        fn = jax.jit(functools.partial(grouped_matmul.grouped_swiglu_nvfp4_kl, tiling=tiling,
                                       interpret=interp, out_dtype=jnp.bfloat16))
        args = (cast(xs), wg.packed, wg.scale, wg.global_scale, wu.packed, wu.scale,
                wu.global_scale, sizes)
        ref, w_list = ref_glu, (wg, wu)
      else:
        w, inp, ref = {"gate": (wg, xs, ref_g), "down": (wd, h, ref_d)}[proj]
        fn = jax.jit(functools.partial(grouped_matmul.grouped_matmul_nvfp4_kl, tiling=tiling,
                                       interpret=interp, out_dtype=jnp.bfloat16))
        args = (cast(inp), w.packed, w.scale, w.global_scale, sizes)
        w_list = (w,)
      t0 = time.time()
      y = jax.block_until_ready(fn(*args))
      row["compile_s"] = time.time() - t0
      row["rel_err"] = rel_err(y, ref)
      row["us"] = 1e6 * device_time(fn, *args, calls=3 if interp else 10, reps=1 if interp else 3)
      wbytes = sum(active * w.n * w.k * (0.5 + 1 / 16) for w in w_list)
      row["TBps"] = wbytes / (row["us"] * 1e-6) / 1e12
    except Exception as e:  # keep the other variants
      traceback.print_exc()
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    results.setdefault("sweep", []).append(row)
    print({k: (round(val, 4) if isinstance(val, float) else val) for k, val in row.items()},
          flush=True)
    save()


def kernel_breakdown(trace_dir: str, calls: int) -> dict:
  """Per-kernel GPU time per layer call from a jax.profiler trace (kernel name -> ms, count),
  plus the sum and the device-busy union."""
  pd = load_trace(trace_dir)
  if pd is None:
    return {"error": f"no xplane.pb under {trace_dir}"}
  kernels, intervals, _ = gpu_kernel_events(pd)
  if not intervals:
    return {"error": "no GPU kernel events"}
  busy = busy_ns(intervals)
  groups: dict[str, list] = {}
  for name, (ns, n) in kernels.items():
    g = groups.setdefault(re.sub(r"[._]\d+$", "", name)[:100], [0.0, 0])
    g[0] += ns / calls / 1e6
    g[1] += n / calls
  top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
  return {"calls": calls, "kernels_per_call": sum(v[1] for v in kernels.values()) / calls,
          "kernel_sum_ms": sum(v[0] for v in kernels.values()) / calls / 1e6,
          "busy_ms": busy / calls / 1e6,
          "by_group": {k: {"ms": v[0], "count": v[1]} for k, v in
                       sorted(groups.items(), key=lambda kv: -kv[1][0])[:40]},
          "top_kernels": [{"kernel": k[:140], "ms": v[0] / calls / 1e6, "count": v[1] / calls}
                          for k, v in top[:60]]}


def profile_layer(layer, key, max_new_tokens=None, calls: int = 5) -> dict:
  """Trace `calls` decode B=64 layer calls (after warm-up) and break the GPU time down."""
  batch, num_pages = make_batch(64, 1, _CONTEXT.value)
  form = ds.choose_mla_form(batch.num_tokens, batch.num_seqs)
  x = jax.random.normal(key, (batch.num_tokens, CFG.hidden_size), jnp.bfloat16)
  pages = jax.random.normal(key, (num_pages, _PAGE, CFG.latent_dim), jnp.bfloat16)
  full = layer_fns(form, max_new_tokens)[0]
  for _ in range(2):
    _, pages = jax.block_until_ready(full(pages, layer, x, batch))
  folder = tempfile.mkdtemp(prefix="ds_trace_")
  jax.profiler.start_trace(folder)
  for _ in range(calls):
    _, pages = full(pages, layer, x, batch)
  jax.block_until_ready(pages)
  jax.profiler.stop_trace()
  return kernel_breakdown(folder, calls)


def nvfp4_dense_layer(layer: dict, names) -> dict:
  """A copy of layer with the dense weights `names` ([K, N]) as NVFP4 in the kernel layout (the
  ModelOpt layout where K % 256 != 0)."""
  out = dict(layer)
  for name in names:
    w = NVFP4Weight.from_dense(layer[name])
    out[name] = w.to_kernel_layout() if w.k % nvfp4.KERNEL_TILE == 0 else w   # (--tiny shapes)
  return out


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
  batches = [int(b) for b in _BATCHES.value.split(",")]
  ctx = _CONTEXT.value
  # The headline comparison first, so that a run cut short still has it.
  cases = [(64, 1, ctx, "decode B=64 bf16"), (64, 1, ctx, "decode B=64 nvfp4-experts")]
  if _KL.value:
    cases[1:1] = [(64, 1, ctx, f"decode B=64 {what}") for what in (
        "nvfp4-experts kernel-layout", "nvfp4-experts kernel-layout prev-defaults",
        "nvfp4-v2 kernel-layout prev-defaults", "nvfp4-experts kernel-layout fused-glu",
        "nvfp4-experts kernel-layout xf16", "nvfp4-experts kernel-layout fused-glu xf16",
        "nvfp4-v2 kernel-layout", "nvfp4-v2 kernel-layout fused-glu",
        "nvfp4-v2 kernel-layout fused-glu xf16")]
  cases += [(64, 1, ctx, f"decode B=64 nvfp4-experts dequant={mode}")
            for mode in _NVFP4_ALSO.value]
  cases += [(b, 1, ctx, f"decode B={b} bf16") for b in batches if b != 64]
  cases.append((1, _PREFILL.value, _PREFILL.value, f"prefill {_PREFILL.value} bf16"))
  cases = [c for c in cases if _ONLY.value in c[3]]
  if _LABELS.value:   # in the order given
    by_label = {c[3]: c for c in cases}
    cases = [by_label[lb] for lb in _LABELS.value if lb in by_label]
  if _KL_TILING.value:
    set_kl_tiling(_KL_TILING.value)
  if _KL_TILING_DOWN.value:
    set_kl_tiling(_KL_TILING_DOWN.value, grouped_matmul.KL_DECODE_SHORT_K)
  if _KL_TILING_GLU.value:
    set_kl_tiling(_KL_TILING_GLU.value, grouped_matmul.KL_DECODE_GLU)
  results["grouped_kl_tiling"] = dict(grouped_matmul.KL_DECODE)
  results["grouped_kl_tiling_short_k"] = dict(grouped_matmul.KL_DECODE_SHORT_K)
  results["grouped_kl_tiling_glu"] = dict(grouped_matmul.KL_DECODE_GLU)
  results["fused_swiglu_default"] = gemm.FUSED_SWIGLU
  results["kl_x_f16_default"] = gemm.KL_X_F16
  layers: dict[str, dict] = {}

  def get_layer(label: str) -> dict:
    """bf16 / NVFP4 ModelOpt-layout experts / kernel-layout experts / 'v2' (kernel-layout
    experts + shared expert + wo in NVFP4, as ModelOpt's DeepSeek NVFP4 recipe with wo quant)."""
    if "nvfp4" not in label:
      return layer
    if "nv" not in layers:
      nv = dict(layer)
      for name in ("experts_gate", "experts_up", "experts_down"):
        nv[name] = to_nvfp4(layer[name])
      layers["nv"] = nv
    if "kernel-layout" not in label:
      return layers["nv"]
    if "kl" not in layers:
      kl = dict(layers["nv"])
      for name in ("experts_gate", "experts_up", "experts_down"):
        kl[name] = layers["nv"][name].to_kernel_layout()
      layers["kl"] = kl
    if "nvfp4-v2" not in label:
      return layers["kl"]
    if "v2" not in layers:
      layers["v2"] = nvfp4_dense_layer(layers["kl"],
                                       ("shared_gate", "shared_up", "shared_down", "wo"))
    return layers["v2"]

  def run_case(num_seqs, per_seq, context, label):
    if over_budget():
      results.setdefault("skipped", []).append(label)
      return
    fused_before, xf16_before = gemm.FUSED_SWIGLU, gemm.KL_X_F16
    short_k_before = dict(grouped_matmul.KL_DECODE_SHORT_K)
    try:
      lay = get_layer(label)
      gemm.FUSED_SWIGLU = "fused-glu" in label or (fused_before and "unfused" not in label)
      gemm.KL_X_F16 = label.endswith(" xf16") or (xf16_before and "xbf16" not in label)
      if label.endswith("prev-defaults"):   # the committed defaults before 2026-11-23 22:40 UTC
        gemm.FUSED_SWIGLU = gemm.KL_X_F16 = False
        grouped_matmul.KL_DECODE_SHORT_K.clear()
      if "kernel-layout" in label:
        r = measure(lay, num_seqs, per_seq, context, key, label)
        if _COMPARE.value and label.endswith("nvfp4-experts kernel-layout"):
          r["kl_vs_modelopt_rel_err"] = compare_gemms(layers["nv"], lay, num_seqs, key)
      elif "nvfp4" in label:
        default_mode = grouped_matmul.DECODE_DEQUANT
        if "dequant=" in label:   # the tiling is picked inside jitted functions: retrace
          grouped_matmul.DECODE_DEQUANT = label.split("dequant=")[1]
          jax.clear_caches()
        try:
          r = measure(lay, num_seqs, per_seq, context, key, label)
        finally:
          if grouped_matmul.DECODE_DEQUANT != default_mode:
            grouped_matmul.DECODE_DEQUANT = default_mode
            jax.clear_caches()
        r["grouped_dequant"] = label.split("dequant=")[1] if "dequant=" in label else default_mode
      else:
        r = measure(lay, num_seqs, per_seq, context, key, label)
      r["fused_swiglu"], r["kl_x_f16"] = gemm.FUSED_SWIGLU, gemm.KL_X_F16
      results["runs"].append(r)
      print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
      if label in PROFILES:
        results.setdefault("profiles", {})[label] = PROFILES[label]
    except Exception as e:  # keep the other measurements
      traceback.print_exc()
      results["errors"].append(f"{label}: {type(e).__name__}: {str(e)[:500]}")
    finally:
      gemm.FUSED_SWIGLU, gemm.KL_X_F16 = fused_before, xf16_before
      grouped_matmul.KL_DECODE_SHORT_K.clear()
      grouped_matmul.KL_DECODE_SHORT_K.update(short_k_before)
    save()

  after = [c for c in cases if c[3] in _AFTER.value]
  for c in cases:
    if c not in after:
      run_case(*c)
  if _SWEEP.value:
    try:
      sweep_gemms(get_layer("nvfp4-experts kernel-layout"), key, _SWEEP.value, results, save)
    except Exception as e:
      traceback.print_exc()
      results["errors"].append(f"sweep: {type(e).__name__}: {str(e)[:500]}")
    save()
  for c in after:
    run_case(*c)
  by = {r["label"]: r for r in results["runs"]}
  bf = by.get("decode B=64 bf16")
  results["speedups_B64"] = {}
  for lb, r in by.items():
    if bf is not None and lb.startswith("decode B=64 nvfp4"):
      results["speedups_B64"][lb] = {k: bf[k] / r[k] for k in
                                     ("layer_ms", "layer_cond_ms", "layer_static_ms", "device_ms",
                                      "moe_block_ms", "moe_gemms_ms")
                                     if bf.get(k) and r.get(k)}
  for nv_label, key_name in [("decode B=64 nvfp4-experts", "nvfp4_speedup_B64"),
                            ("decode B=64 nvfp4-experts kernel-layout", "nvfp4_kl_speedup_B64")]:
    if nv_label in results["speedups_B64"]:
      results[key_name] = results["speedups_B64"][nv_label]
  save()
  print(json.dumps({"peaks": results["peaks"], "speedups_B64": results["speedups_B64"],
                    "errors": results["errors"]}, indent=1))
  print(f"{'case':56s} {'layer':>7s} {'cond':>7s} {'static':>7s} {'device':>7s} {'gemms':>7s} "
        f"{'TB/s':>5s}")
  nan = float("nan")
  for r in results["runs"]:
    print(f"{r['label']:56s} {r.get('layer_ms', nan):7.3f} {r.get('layer_cond_ms', nan):7.3f} "
          f"{r.get('layer_static_ms', nan):7.3f} {r.get('device_ms') or nan:7.3f} "
          f"{r['moe_gemms_ms']:7.3f} {r['moe_gemm_weight_TBps']:5.2f}")
  for row in results.get("sweep", []):
    print(f"sweep {row['variant']:32s} {row.get('us', nan):9.1f} us "
          f"{row.get('TBps', nan):5.2f} TB/s err {row.get('rel_err', nan):.2e} "
          f"{row.get('error', '')}")


if __name__ == "__main__":
  app.run(main)
