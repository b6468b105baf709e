"""Multi-GPU sharding benchmark: MoE dispatch/combine, DeepSeek-V3-shaped decode, Llama-3-8B TP scaling.

Sections (``--sections``):
  comm      MoE dispatch + combine of all-to-all (fixed buffers, and ragged: jax.lax.ragged_all_to_all,
            first run on GPUs here, its rel_err checks it) vs AG/RS on ep = 2, 4, 8 devices, DeepSeek-V3
            shapes (hidden 7168, 256 experts, top-8), tokens per rank swept, bf16 / fp8 / nvfp4
            dispatch payloads. The expert GEMMs are replaced by an identity so only packing,
            (de)quantization and the collectives are timed. Next to each time: the message-size
            model's bytes per rank, the bytes actually sent (all-to-all sends fixed-capacity
            buffers: (ep-1)·C·H with C = ceil(cf·T·k/ep)), and the bandwidth those bytes imply.
            Tokens enter split over ep (attention-DP layout), as in ADP+EP serving.
  link      all-gather bus bandwidth on all devices: the ceiling the comm numbers are compared to.
  deepseek  decode step of a few DeepSeek-V3-shaped layers (first dense, rest MoE; random weights)
            under TP8, EP8 (attention TP8) and ADP8+EP8, B sequences of ctx cached tokens.
  deepseek  (also PP2+EP4 with M = 1 and 2 decode microbatches: the MoE layers over 2 stages)
  llama     Llama-3-8B-shaped decode step and prefill under TP1/2/4/8, scaling efficiency
            t(TP1) / (n · t(TPn)); decode under attention-DP over 8 ranks with the MLP data
            parallel or tensor parallel (ADP8+MLP-DP / ADP8+MLP-TP) at the same global batch.
Timing: compile, 2 warm-up calls, then ``--reps`` repetitions of ``--iters`` back-to-back calls;
median per call. Results go to ``--out`` (JSON) and a table on stdout.

  PYTHONPATH=. python3 experiments/bench_parallel.py --out=$OUT/parallel.json

Meant for nvidia-h200-x8 (not yet run on GPUs: the multi-GPU kinds were not lent). One device
command may run 600 s, so split the sections over calls, each under ``timeout`` with
``--budget_s`` a little below it (work past the budget is skipped, what ran is still written):
  timeout 590 python3 experiments/bench_parallel.py --sections=link,comm --budget_s=540 --out=$OUT/comm.json
  timeout 590 python3 experiments/bench_parallel.py --sections=deepseek --budget_s=540 --out=$OUT/ds.json
  timeout 590 python3 experiments/bench_parallel.py --sections=llama --budget_s=540 --out=$OUT/llama.json
``--device_counts=2,4`` on nvidia-h200-x2/x4 (the comm section uses the first ep devices).
CPU smoke run (tiny shapes, 8 virtual devices; the numbers mean nothing):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=. \
    python3 experiments/bench_parallel.py --smoke --out=/tmp/parallel_smoke.json
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
import traceback

from absl import app, flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxinfer import attention
from jaxinfer.loader import LoadedModel
from jaxinfer.models import deepseek_v3 as ds
from jaxinfer.models import llama
from sharding import deepseek, moe, rules
from sharding.config import ParallelConfig
from sharding.model import shard_model

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/parallel.json", "JSON results path")
flags.DEFINE_list("sections", ["link", "comm", "deepseek", "llama"], "sections to run")
flags.DEFINE_list("device_counts", ["2", "4", "8"], "ep sizes for the comm section")
flags.DEFINE_list("tokens", ["16", "64", "256", "1024", "4096"], "tokens per rank (comm)")
flags.DEFINE_list("payloads", ["bf16", "fp8", "nvfp4"], "dispatch payloads (comm)")
flags.DEFINE_float("capacity_factor", 1.25, "all-to-all buffer capacity factor (comm)")
flags.DEFINE_integer("ds_layers", 3, "DeepSeek-V3-shaped layers (1 dense + MoE)")
flags.DEFINE_list("ds_batch", ["64", "256"], "decode sequences per step (global)")
flags.DEFINE_integer("ctx", 2048, "cached tokens per sequence (decode)")
flags.DEFINE_integer("llama_layers", 32, "Llama-3-8B layers")
flags.DEFINE_list("llama_batch", ["1", "64"], "decode sequences per step (llama)")
flags.DEFINE_integer("prefill_tokens", 2048, "prefill tokens (llama, one sequence)")
flags.DEFINE_integer("reps", 7, "timed repetitions (median)")
flags.DEFINE_integer("iters", 5, "calls per repetition")
flags.DEFINE_float("budget_s", 540.0, "skip remaining work after this many seconds")
flags.DEFINE_bool("smoke", False, "tiny shapes (CPU check that everything runs)")

RESULTS: list[dict] = []
T0 = time.time()
PAYLOAD_BYTES = {"bf16": 2.0, "fp8": 1.0 + 4 / 128, "nvfp4": 0.5 + 1 / 16}  # per element, with scales
PAGE = 64


def over_budget() -> bool:
  return time.time() - T0 > FLAGS.budget_s


def record(**kw):
  RESULTS.append(kw)
  print(json.dumps(kw), flush=True)


def time_calls(step, state, reps=None, iters=None) -> tuple[float, object]:
  """step(state) -> state; median seconds per call."""
  reps, iters = reps or FLAGS.reps, iters or FLAGS.iters
  for _ in range(2):
    state = jax.block_until_ready(step(state))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(iters):
      state = step(state)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t) / iters)
  return statistics.median(times), state


# ---- link ceiling ----------------------------------------------------------------------------

def section_link():
  n = jax.device_count()
  if n < 2:
    return
  mesh = ParallelConfig(ep=n, attention_dp=True).make_mesh()
  rows = 64 if FLAGS.smoke else 64 * 1024
  x = jax.device_put(jnp.ones((n * rows, 1024), jnp.bfloat16), NamedSharding(mesh, P("ep")))
  gather = jax.jit(jax.shard_map(lambda a: jax.lax.all_gather(a, "ep", tiled=True)[:a.shape[0]] * 1,
                                 mesh=mesh, in_specs=P("ep"), out_specs=P("ep"),
                                 axis_names={"ep"}, check_vma=False))
  t, _ = time_calls(gather, x)
  nbytes = rows * 1024 * 2 * (n - 1)  # received per rank
  record(section="link", devices=n, op="all_gather", bytes_per_rank=nbytes, seconds=t,
         algbw_gbs=nbytes / t / 1e9)


# ---- MoE dispatch / combine ------------------------------------------------------------------

def _identity_experts(rows, local_expert, weights):
  return jnp.where((local_expert >= 0)[:, None], rows, 0)


def section_comm():
  H = 256 if FLAGS.smoke else 7168
  E, k = (16, 4) if FLAGS.smoke else (256, 8)
  for ep in (int(n) for n in FLAGS.device_counts):
    if ep > jax.device_count():
      print(f"skip ep={ep}: {jax.device_count()} devices")
      continue
    for T in (int(t) for t in FLAGS.tokens):
      for payload in FLAGS.payloads:
        for comm in moe.COMMS:
          if over_budget():
            return
          try:
            _one_comm(ep, T, H, E, k, payload, comm)
          except Exception as e:  # noqa: BLE001 - keep the sweep going, record why
            traceback.print_exc()
            record(section="comm", ep=ep, tokens_per_rank=T, payload=payload, comm=comm,
                   error=repr(e)[:300])


def _one_comm(ep, T, H, E, k, payload, comm):
  parallel = ParallelConfig(ep=ep, attention_dp=True, moe_dispatch_dtype=payload)
  mesh = parallel.make_mesh()
  key = jax.random.key(T)
  x = jax.random.normal(key, (ep * T, H), jnp.bfloat16)
  _, idx = jax.lax.top_k(jax.random.uniform(jax.random.fold_in(key, 1), (ep * T, E)), k)
  w = jnp.full((ep * T, k), 1.0 / k, jnp.float32)
  tok = NamedSharding(mesh, P("ep"))
  x, idx, w = (jax.device_put(a, tok) for a in (x, idx.astype(jnp.int32), w))
  weights = {n: jax.device_put(jnp.zeros((E, 1, 1), jnp.bfloat16), NamedSharding(mesh, P("ep")))
             for n in ("w_gate", "w_up", "w_down")}
  fn = jax.jit(lambda x: moe.moe_experts(x, idx, w, weights, parallel, mesh, comm=comm,
                                         capacity_factor=FLAGS.capacity_factor,
                                         grouped_fn=_identity_experts))
  # identity experts with weights 1/k return each token itself: the error is the payload's
  # quantization (plus dropped pairs for the capacity-bound fixed-buffer all-to-all)
  err = float(jnp.max(jnp.abs(fn(x).astype(jnp.float32) - x.astype(jnp.float32))) /
              jnp.max(jnp.abs(x.astype(jnp.float32))))
  t, _ = time_calls(fn, x)
  b = PAYLOAD_BYTES[payload]
  model_elems = moe.message_elements(comm, ep, T, H, k)
  model_bytes = model_elems * (b + 2.0) / 2  # dispatch leg in the payload, combine leg in bf16
  if comm == "all_to_all":
    cap = moe.local_capacity(T, k, ep, FLAGS.capacity_factor)
    sent_bytes = (ep - 1) * cap * H * (b + 2.0)
  else:
    sent_bytes = model_bytes
  record(section="comm", ep=ep, tokens_per_rank=T, hidden=H, top_k=k, payload=payload, comm=comm,
         seconds=t, model_bytes=model_bytes, sent_bytes=sent_bytes,
         model_pick=moe.choose_comm(ep, k, T, H), eff_gbs=sent_bytes / t / 1e9, rel_err=err)


# ---- DeepSeek-V3-shaped decode ---------------------------------------------------------------

def ds_config() -> ds.DeepseekV3Config:
  if FLAGS.smoke:
    return ds.DeepseekV3Config(
        vocab_size=256, hidden_size=128, num_layers=3, num_heads=8, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1)
  return ds.DeepseekV3Config(
      vocab_size=129280, hidden_size=7168, num_layers=FLAGS.ds_layers, num_heads=128,
      q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
      intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
      num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4,
      routed_scaling_factor=2.5, first_k_dense_replace=1)


def _decode_batch(num_seqs, ctx, page, first_page=1):
  pps = -(-ctx // page)
  chunks = [attention.SeqChunk(list(range(first_page + s * pps, first_page + (s + 1) * pps)),
                               ctx - 1, 1) for s in range(num_seqs)]
  n = max(8, num_seqs)
  return (jnp.zeros(n, jnp.int32),
          attention.build_batch(chunks, page, num_tokens=n, num_seqs=num_seqs, pages_per_seq=pps),
          num_seqs * pps + 1)


def section_deepseek():
  cfg = ds_config()
  n = min(8, jax.device_count())
  ctx = 64 if FLAGS.smoke else FLAGS.ctx
  page = 8 if FLAGS.smoke else PAGE
  layouts = {f"TP{n}": ParallelConfig(tp=n), f"EP{n}": ParallelConfig(ep=n),
             f"ADP{n}+EP{n}": ParallelConfig(ep=n, attention_dp=True)}
  if n >= 4:  # the MoE layers over 2 stages, EP inside each; M decode microbatches per step
    layouts.update({f"PP2+EP{n // 2} M={m}": ParallelConfig(pp=2, ep=n // 2, microbatches=m)
                    for m in (1, 2)})
  for B in (int(b) for b in FLAGS.ds_batch):
    for name, parallel in layouts.items():
      if over_budget():
        return
      try:
        mesh = parallel.make_mesh()
        specs = deepseek.param_specs(cfg, jax.eval_shape(lambda: ds.init_params(
            cfg, jax.random.key(0))), dataclasses.replace(parallel, pp=1))
        params = jax.jit(lambda: ds.init_params(cfg, jax.random.key(0)),
                         out_shardings=rules.named(mesh, specs))()
        if parallel.pp > 1:
          t = _deepseek_pipeline_decode(cfg, parallel, mesh, params, B, ctx, page)
          record(section="deepseek", layout=name, layers=cfg.num_layers, batch=B, ctx=ctx,
                 seconds=t, per_layer_ms=t / cfg.num_layers * 1e3)
          continue
        ranks = parallel.ep if parallel.attention_dp else 1
        tokens, batch, pages = _decode_batch(B // ranks, ctx, page)
        cache = ds.create_cache(cfg, num_pages=pages * ranks, page_size=page)
        params, cache = deepseek.place(cfg, params, cache, parallel, mesh)
        if ranks > 1:
          tokens = jnp.stack([tokens] * ranks)
          batch = jax.tree.map(lambda a: jnp.stack([a] * ranks), batch)
        fwd = deepseek.make_forward(cfg, parallel, mesh)
        step = lambda c: fwd(params, tokens, c, batch)[1]
        t, _ = time_calls(step, cache)
        record(section="deepseek", layout=name, layers=cfg.num_layers, batch=B, ctx=ctx, seconds=t,
               per_layer_ms=t / cfg.num_layers * 1e3)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        record(section="deepseek", layout=name, batch=B, error=repr(e)[:300])


def _deepseek_pipeline_decode(cfg, parallel, mesh, params, B, ctx, page) -> float:
  """Decode step time of ``deepseek.make_pipeline_forward``: B sequences in M microbatches."""
  M = parallel.num_microbatches
  pps = -(-ctx // page)
  groups = [_decode_batch(B // M, ctx, page, first_page=1 + m * (B // M) * pps) for m in range(M)]
  tokens = jnp.stack([t for t, _, _ in groups])[None]                  # [1, M, T]
  batch = jax.tree.map(lambda *a: jnp.stack(a)[None], *[b for _, b, _ in groups])
  cache = ds.create_cache(cfg, num_pages=B * pps + 1, page_size=page)
  staged, cache = deepseek.place_pipeline(cfg, params, cache, parallel, mesh)
  del params
  fwd = deepseek.make_pipeline_forward(cfg, parallel, mesh)
  t, _ = time_calls(lambda c: fwd(staged, tokens, c, batch)[1], cache)
  return t


# ---- Llama-3-8B TP scaling -------------------------------------------------------------------

def llama_config() -> llama.LlamaConfig:
  if FLAGS.smoke:
    return llama.LlamaConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=8,
                             num_kv_heads=8, head_dim=16, intermediate_size=256)
  return llama.LlamaConfig(vocab_size=128256, hidden_size=4096, num_layers=FLAGS.llama_layers,
                           num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
                           rope_theta=500000.0, max_position_embeddings=8192)


def section_llama():
  cfg = llama_config()
  ctx = 64 if FLAGS.smoke else FLAGS.ctx
  page = 8 if FLAGS.smoke else PAGE
  prefill = 64 if FLAGS.smoke else FLAGS.prefill_tokens
  base = LoadedModel("llama", cfg, jax.jit(lambda: llama.init_params(cfg, jax.random.key(0)))(),
                     None, "random")
  single: dict[str, float] = {}
  for tp in (1, 2, 4, 8):
    if tp > jax.device_count() or over_budget():
      break
    try:
      model = shard_model(base, ParallelConfig(tp=tp))
      cases = [(f"decode_b{b}", *_decode_batch(int(b), ctx, page)) for b in FLAGS.llama_batch]
      pre = attention.build_batch([attention.SeqChunk(list(range(1, 1 + prefill // page)), 0,
                                                      prefill)], page, num_tokens=prefill,
                                  num_seqs=1, pages_per_seq=prefill // page)
      cases.append(("prefill", jnp.zeros(prefill, jnp.int32), pre, prefill // page + 1))
      for name, tokens, batch, pages in cases:
        cache = model.create_cache(max(pages, 2), page)
        fwd = model.forward
        t, _ = time_calls(lambda c: fwd(model.params, tokens, c, batch)[1], cache)
        if tp == 1:
          single[name] = t
        eff = single[name] / (tp * t) if name in single else None
        record(section="llama", tp=tp, case=name, seconds=t, scaling_efficiency=eff)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      record(section="llama", tp=tp, error=repr(e)[:300])
  n = min(8, jax.device_count())
  if n > 1:
    _llama_attention_dp(base, n, ctx, page, single)


def _llama_attention_dp(base, n, ctx, page, single):
  """Decode under attention-DP over n ranks (each rank attends B/n sequences over its own KV pages),
  the MLP data parallel (weights replicated) or tensor parallel over the n ranks (all-gather before,
  reduce-scatter after); compared with the TP numbers above at the same global batch."""
  for mlp in ("dp", "tp"):
    parallel = ParallelConfig(ep=n, attention_dp=True, adp_mlp=mlp)
    layout = f"ADP{n}+MLP-{mlp.upper()}"
    for b in (int(b) for b in FLAGS.llama_batch):
      if b % n or over_budget():
        continue
      try:
        model = shard_model(base, parallel)
        tokens, batch, pages = _decode_batch(b // n, ctx, page)
        tokens = jnp.stack([tokens[None]] * n)                      # [R, M=1, T]
        batch = jax.tree.map(lambda a: jnp.stack([a[None]] * n), batch)
        cache = model.create_cache(pages * n, page)
        fwd = model.pipeline_forward()
        t, _ = time_calls(lambda c: fwd(model.params, tokens, c, batch)[1], cache)
        name = f"decode_b{b}"
        record(section="llama", layout=layout, case=name, seconds=t,
               scaling_efficiency=single[name] / (n * t) if name in single else None)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        record(section="llama", layout=layout, error=repr(e)[:300])


def main(_):
  meta = dict(devices=[str(d) for d in jax.devices()], jax=jax.__version__, smoke=FLAGS.smoke,
              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  print(json.dumps(meta))
  for name in FLAGS.sections:
    {"link": section_link, "comm": section_comm, "deepseek": section_deepseek,
     "llama": section_llama}[name]()
  with open(FLAGS.out, "w") as f:
    json.dump({"meta": meta, "results": RESULTS}, f, indent=1)
  print("\n%-9s %-34s %12s  %s" % ("section", "case", "time (us)", "notes"))
  for r in RESULTS:
    if "error" in r:
      print("%-9s %-34s %12s  %s" % (r["section"], "", "ERROR", r["error"][:80]))
      continue
    if r["section"] == "comm":
      case = f"ep{r['ep']} T={r['tokens_per_rank']} {r['payload']} {r['comm']}"
      note = (f"{r['eff_gbs']:.1f} GB/s sent; model picks {r['model_pick']}; "
              f"rel err {r['rel_err']:.1e}")
    elif r["section"] == "deepseek":
      case, note = f"{r['layout']} B={r['batch']}", f"{r['per_layer_ms']:.3f} ms/layer"
    elif r["section"] == "llama":
      case = f"{r.get('layout') or 'TP%d' % r['tp']} {r['case']}"
      note = "" if r["scaling_efficiency"] is None else f"eff {r['scaling_efficiency']:.2f}"
    else:
      case, note = f"{r['op']} x{r['devices']}", f"{r['algbw_gbs']:.1f} GB/s"
    print("%-9s %-34s %12.1f  %s" % (r["section"], case, r["seconds"] * 1e6, note))


if __name__ == "__main__":
  app.run(main)
