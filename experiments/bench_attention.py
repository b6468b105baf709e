"""Benchmark + on-GPU correctness of the attention kernels against cuDNN, XLA and jax's bundled Pallas ops.

One run does everything (device time is scarce): measures the ceilings (read bandwidth, bf16/fp8 GEMM),
checks every kernel against a float32 reference on the GPU, then times the issue's cases with a few
tile variants each. Prints a table at the end and writes JSON to --out.

  PYTHONPATH=. python3 experiments/bench_attention.py --out=$OUT/attention.json
  PYTHONPATH=. JAX_PLATFORMS=cpu python3 experiments/bench_attention.py --smoke   # logic check, CPU

Inputs are fresh normal draws (never zeros); page tables are shuffled. Every timed working set is larger
than the 50 MB L2 (prefill q/k/v 268 MB, decode KV 1.07 GB / 134 MB, MLA latents 151-302 MB), so no
input rotation is needed. Times are medians over repetitions of back-to-back calls (async dispatch,
one sync per repetition), after a warm-up call that compiles.
"""
from __future__ import annotations

import functools
import json
import statistics
import time
import traceback

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import SeqChunk, build_batch, paged_attention, reference_paged_attention
from kernels.flash_attention import PrefillTiles, flash_prefill, reference_prefill
from kernels.flash_attention_mgpu import MgpuTiles, flash_prefill_dense, prepare_v_fp8
from kernels.mla_attention import (MLATiles, mla_decode_pallas, mla_paged_attention,
                                   reference_mla_paged_attention)
from kernels.mla_attention_mgpu import MLAMgpuTiles, mla_decode_mgpu
from kernels.paged_decode_attention import (BF16_TILES, FP8_TILES, SPLIT_K_FP8_TILES,
                                            SPLIT_K_TILES, DecodeTiles, paged_decode_attention)

_SMOKE = flags.DEFINE_bool("smoke", False, "tiny shapes, interpret mode, no peers: checks the script")
_OUT = flags.DEFINE_string("out", "", "JSON output path")
_CHECK_DIMS = flags.DEFINE_integer("check_dims", 2, "how many head dims (128, 64) the checks cover")
_PEERS = flags.DEFINE_integer("decode_peer_configs", 2, "bundled paged_attention configs per case")
_ONLY = flags.DEFINE_list("only", [], "sections to run: ceilings,check,prefill,decode,decode_long,"
                          "mla,mla_mgpu")
_MLA_MGPU = flags.DEFINE_list("mla_mgpu", ["bf16:default", "fp8:default"],
                              "mla_mgpu section: dtype:variant pairs (variants: "
                              + "default, s1, nozt, ov, prod, prod_s1, w8, wu, wmma, prod_w8, pr, pr_w8, nopr, bfw, "
                              "qk8, qk8_w8; "
                              "dtypes bf16, fp8, f16 (f16 latents: an f16-MMA probe))")
_MLA_BATCH = flags.DEFINE_integer("mla_batch", 64, "mla_mgpu section: batch (sequences)")
_MLA_CTX = flags.DEFINE_integer("mla_ctx", 4096, "mla_mgpu section: context length")
_MLA_PAGE = flags.DEFINE_integer("mla_page", 64, "mla_mgpu section: page size")
_MLA_PROFILE = flags.DEFINE_string("mla_profile_dir", "", "mla_mgpu section: also run each dtype's "
                                    "first variant once under Mosaic GPU's profiler, traces here")
_MLA_PUBLIC = flags.DEFINE_bool("mla_public", False, "mla_mgpu section: also check and time the "
                                 "public op mla_paged_attention (its kernel selection) on the inputs")
_MLA_TRITON = flags.DEFINE_bool("mla_triton", True, "mla_mgpu section: also time the Triton kernel "
                                "(its measured-best tiles) on the same inputs")
_PREFILL_PEERS = flags.DEFINE_bool("prefill_peers", True, "also time jax's attention_mgpu, our "
                                   "Triton kernels and XLA at the prefill shape")
_DECODE_PEERS = flags.DEFINE_bool("decode_peers", True, "also time XLA and jax's bundled kernels "
                                  "in the decode cases")

F8 = jnp.float8_e4m3fn
RESULTS: dict = {"rows": [], "checks": [], "errors": []}


def _save():
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(RESULTS, f, indent=1)


def bench(fn, *args, reps: int = 7, iters: int = 10) -> float:
  """Median seconds per call; fewer calls per repetition for slow functions (~50 ms each)."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  iters = max(1, min(iters, int(0.05 / (time.perf_counter() - t0))))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters)
  return statistics.median(times)


def record(case: str, impl: str, fn, args, *, flops=None, nbytes=None, roof=None, **extra):
  try:
    reps, iters = (1, 1) if _SMOKE.value else (7, 10)
    t = bench(fn, *args, reps=reps, iters=iters)
  except Exception as e:  # a peer or variant failing must not end the run
    msg = f"{case} / {impl}: {type(e).__name__}: {str(e)[-600:]}"
    print("FAILED", msg)
    RESULTS["errors"].append(msg)
    _save()
    return None
  row = {"case": case, "impl": impl, "ms": t * 1e3, **extra}
  if flops:
    row["tflops"] = flops / t / 1e12
    if roof:
      row["of_roof"] = row["tflops"] / roof
  if nbytes:
    row["tbps"] = nbytes / t / 1e12
    if roof:
      row["of_roof"] = row["tbps"] / roof
  RESULTS["rows"].append(row)
  print(f"{case:28s} {impl:44s} {t * 1e3:9.3f} ms  " +
        (f"{row['tflops']:7.1f} TFLOP/s " if flops else "") +
        (f"{row['tbps']:6.2f} TB/s " if nbytes else "") +
        (f"({row['of_roof'] * 100:5.1f}% of roof)" if "of_roof" in row else ""), flush=True)
  _save()
  return t


def rel(a, b) -> float:
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def check(name: str, err: float, bound: float):
  ok = bool(np.isfinite(err) and err < bound)
  RESULTS["checks"].append({"name": name, "rel_err": err, "bound": bound, "ok": ok})
  print(f"CHECK {name:50s} rel_err={err:.2e} bound={bound:.0e} {'ok' if ok else 'FAIL'}", flush=True)
  _save()


def guarded(fn):
  @functools.wraps(fn)
  def wrapped(*a, **k):
    try:
      return fn(*a, **k)
    except Exception:
      msg = f"{fn.__name__}: {traceback.format_exc()[-1500:]}"
      print("SECTION FAILED", msg, flush=True)
      RESULTS["errors"].append(msg)
      _save()
  return wrapped


def normal(key, shape, dtype=jnp.bfloat16):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def paged_cache(key, *, B, ctx, page_size, KV, D, dtype):
  """Shuffled page table for B sequences of length ctx; pages [N, page, KV, D] (page 0 = null)."""
  pps = -(-ctx // page_size)
  n = B * pps + 1
  perm = np.random.default_rng(key).permutation(np.arange(1, n)).reshape(B, pps)
  kp = normal(key + 1, (n, page_size, KV, D), dtype)
  vp = normal(key + 2, (n, page_size, KV, D), dtype)
  return kp, vp, jnp.asarray(perm, jnp.int32)


# ----------------------------------------------------------------------------------------- ceilings
@guarded
def ceilings():
  n = (1 << 30) if not _SMOKE.value else (1 << 16)
  x = normal(0, (n,), jnp.float32)
  t = record("ceiling", "read: sum over f32 array", jax.jit(jnp.sum), (x,), nbytes=4 * n)
  RESULTS["read_tbps"] = 4 * n / t / 1e12 if t else 3.0
  del x
  if _ONLY.value and "prefill" not in _ONLY.value:
    return
  m = 8192 if not _SMOKE.value else 128
  a, b = normal(1, (m, m)), normal(2, (m, m))
  t = record("ceiling", "bf16 GEMM (XLA)", jax.jit(jnp.dot), (a, b), flops=2 * m ** 3)
  RESULTS["bf16_tflops"] = 2 * m ** 3 / t / 1e12 if t else 670.0
  fp8_dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  t = record("ceiling", "fp8 GEMM (XLA, f32 out)", fp8_dot, (a.astype(F8), b.T.astype(F8).T),
             flops=2 * m ** 3)
  RESULTS["fp8_tflops"] = 2 * m ** 3 / t / 1e12 if t else 820.0


# --------------------------------------------------------------------------------- correctness
@guarded
def gpu_checks():
  """Small ragged shapes on the compiled kernels vs the float32 references."""
  interp = _SMOKE.value
  HQ, HKV, HM = (8, 2, 16) if interp else (32, 8, 128)   # smoke: fewer heads, same logic
  rng = np.random.default_rng(0)
  # prefill: ragged, chunked, GQA 4, D 128 / 64
  for D in (128, 64)[:_CHECK_DIMS.value]:
    q_lens, kv_lens = [300, 1, 77, 128], [1000, 513, 77, 200]
    qs = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    T, S = 512, 1024
    q, k, v = normal(1, (T, HQ, D)), normal(2, (4, S, HKV, D)), normal(3, (4, S, HKV, D))
    lens = jnp.asarray(kv_lens, jnp.int32)
    ref = reference_prefill(q, k, v, qs, lens, scale=D ** -0.5)
    for tiles in (PrefillTiles(), PrefillTiles(128, 128, 8, 2)):
      out = flash_prefill(q, k, v, qs, lens, scale=D ** -0.5, tiles=tiles, interpret=interp)
      check(f"prefill bf16 D{D} {tiles.block_q}x{tiles.block_k}", rel(out, ref), 1e-2)
    qsc = jnp.full((HQ,), 0.5)
    ksc = jnp.asarray(rng.uniform(0.5, 2, HKV), jnp.float32)
    q8, k8, v8 = (q / 0.5).astype(F8), (k / ksc[:, None]).astype(F8), (v / 2).astype(F8)
    ref8 = reference_prefill(q8, k8, v8, qs, lens, scale=D ** -0.5, q_scale=qsc, k_scale=ksc,
                             v_scale=2.0)
    for vt in (False, True):
      v_in = jnp.transpose(v8, (0, 2, 3, 1)) if vt else v8
      out = flash_prefill(q8, k8, v_in, qs, lens, scale=D ** -0.5, q_scale=qsc, k_scale=ksc,
                          v_scale=2.0, v_transposed=vt, interpret=interp)
      check(f"prefill fp8 D{D} v_transposed={vt} (vs dequantized)", rel(out, ref8), 3e-2)
    out = flash_prefill(q, k8, v8, qs, lens, scale=D ** -0.5, k_scale=ksc, v_scale=2.0,
                        interpret=interp)
    ref_kv8 = reference_prefill(q, k8, v8, qs, lens, scale=D ** -0.5, k_scale=ksc, v_scale=2.0)
    check(f"prefill bf16 q / fp8 kv D{D}", rel(out, ref_kv8), 1.5e-2)
  # paged decode + dispatcher: ragged, shuffled pages, 1..3 tokens, page sizes 16/64
  for page_size in (16, 64):
    kp, vp, _ = paged_cache(10, B=1, ctx=4096, page_size=page_size, KV=HKV, D=128,
                            dtype=jnp.bfloat16)
    pool = list(np.random.default_rng(page_size).permutation(np.arange(1, kp.shape[0])))
    for chunks, T in (([(1000, 1), (0, 1), (2047, 1), (63, 1)], 4),
                      ([(1000, 3), (0, 1), (2047, 2), (63, 1)], 8),
                      ([(700, 300), (0, 1), (1500, 77)], 512) if not interp else
                      ([(70, 30), (0, 1), (150, 7)], 64)):
      seqs = [SeqChunk([int(pool[(i * 40 + j) % len(pool)]) for j in range(-(-(s + n) // page_size))],
                       s, n) for i, (s, n) in enumerate(chunks)]
      batch = build_batch(seqs, page_size, num_tokens=T, num_seqs=len(seqs) + 1,
                          pages_per_seq=-(-2048 // page_size) + 1)
      q = normal(T, (T, HQ, 128))
      real = int(batch.query_start[-1])
      ref = reference_paged_attention(q, kp, vp, batch, scale=128 ** -0.5)[:real]
      out = paged_attention(q, kp, vp, batch, scale=128 ** -0.5, impl="pallas")[:real]
      check(f"paged_attention dispatch page{page_size} T{T}", rel(out, ref), 1e-2)
      if T == 4:
        k8, v8 = (kp / 0.5).astype(F8), (vp / 0.5).astype(F8)
        ref8 = reference_paged_attention(q, k8, v8, batch, scale=128 ** -0.5, k_scale=0.5,
                                         v_scale=0.5)[:real]
        out = paged_decode_attention(q, k8, v8, batch.page_table, batch.seq_lens,
                                     batch.query_start, scale=128 ** -0.5, k_scale=0.5,
                                     v_scale=0.5, tiles=DecodeTiles(splits=4), interpret=interp)
        check(f"decode fp8 kv page{page_size} split4", rel(out[:real], ref8), 1.5e-2)
  # MLA decode
  lat = normal(20, (200, 64, 576))
  pool = list(np.random.default_rng(3).permutation(np.arange(1, 200)))
  chunks = [(1000, 1), (0, 1), (777, 2), (64, 1)]
  seqs = [SeqChunk([int(pool.pop()) for _ in range(-(-(s + n) // 64))], s, n) for s, n in chunks]
  batch = build_batch(seqs, 64, num_tokens=8, num_seqs=5, pages_per_seq=20)
  ql, qr = normal(21, (8, HM, 512)), normal(22, (8, HM, 64))
  real = int(batch.query_start[-1])
  for lat_in, sc, name in ((lat, 1.0, "bf16"), ((lat / 0.25).astype(F8), 0.25, "fp8")):
    ref = reference_mla_paged_attention(ql, qr, lat_in, batch, scale=0.07, latent_scale=sc)[:real]
    for tiles in (MLATiles(), MLATiles(16, 32, 4, 2), MLATiles(64, 32, 8, 2)):  # bh64 -> 32 (2 tokens)
      out = mla_decode_pallas(ql, qr, lat_in, batch.page_table, batch.seq_lens, batch.query_start,
                              scale=0.07, latent_scale=sc, max_q=2, tiles=tiles, interpret=interp)
      check(f"mla decode {name} bh{tiles.block_h} bk{tiles.block_k}", rel(out[:real], ref), 1e-2)


# ------------------------------------------------------------------------------------- prefill
# Mosaic GPU variants timed at the shape (kernels/flash_attention_mgpu.py):
# MgpuTiles(block_q, block_kv, stages, overlap); each list starts with default_tiles at this
# shape (FP8: 256-key steps, row sums by P.ones). The Triton kernel's tile sweep is in
# benchmarks/attention.md (run 1); only its best tiles are re-timed here, next to Mosaic GPU.
MGPU_BF16 = [MgpuTiles(64, 128, 2, False), MgpuTiles(persistent=132), MgpuTiles(64, 128, 2, True)]
MGPU_FP8 = [MgpuTiles(block_kv=256, persistent=132), MgpuTiles(block_kv=256), MgpuTiles(),
            MgpuTiles(rowsum_mma=False), MgpuTiles(64, 128, 2, True)]


def _mgpu_name(tiles: MgpuTiles, fp8: bool = True) -> str:
  return (f"bk{tiles.block_kv} st{tiles.stages} {'overlap' if tiles.overlap else 'serial'}" +
          ("" if tiles.pingpong else " no-pingpong") +
          (" rowsum-mma" if fp8 and tiles.rowsum_mma and not tiles.overlap else "") +
          (f" persistent{tiles.persistent}" if tiles.persistent else ""))


@guarded
def prefill():
  B, S, H, KV, D = (4, 4096, 32, 8, 128) if not _SMOKE.value else (1, 256, 2, 1, 128)
  case = f"prefill B{B} S{S} H{H}/{KV} D{D}"
  flops = 4 * B * S * S * H * D / 2
  q, k, v = normal(1, (B, S, H, D)), normal(2, (B, S, KV, D)), normal(3, (B, S, KV, D))
  bf16_roof, fp8_roof = RESULTS.get("bf16_tflops"), RESULTS.get("fp8_tflops")
  scale = D ** -0.5
  qs = jnp.arange(B + 1, dtype=jnp.int32) * S
  lens = jnp.full((B,), S, jnp.int32)
  qf = q.reshape(B * S, H, D)
  interp = _SMOKE.value
  # FP8: per-head scales from the absolute maxima (E4M3 max 448)
  amax = lambda x: jnp.max(jnp.abs(x.astype(jnp.float32)), axis=(0, 1, 3)) / 448.0
  qsc, ksc, vsc = amax(q), amax(k), amax(v)
  q8, k8, v8 = ((x / sc[:, None]).astype(F8) for x, sc in ((q, qsc), (k, ksc), (v, vsc)))
  deq = lambda x8, sc: (x8.astype(jnp.float32) * sc[:, None]).astype(jnp.bfloat16)
  attn = functools.partial(jax.nn.dot_product_attention, is_causal=True, scale=scale,
                           implementation="xla" if _SMOKE.value else "cudnn")
  ref, ref_deq = attn(q, k, v), attn(deq(q8, qsc), deq(k8, ksc), deq(v8, vsc))
  times = {}
  if not _SMOKE.value:
    times["cudnn"] = record(case, "cuDNN bf16 (jax.nn.dot_product_attention)", jax.jit(attn),
                            (q, k, v), flops=flops, roof=bf16_roof)
  # Mosaic GPU (dense batches): bf16
  best = {}
  for tiles in MGPU_BF16:
    fn = jax.jit(functools.partial(flash_prefill_dense, scale=scale, tiles=tiles,
                                   interpret=interp))
    name = f"ours Mosaic GPU bf16 {_mgpu_name(tiles, fp8=False)}"
    t = record(case, name, fn, (q, k, v), flops=flops, roof=bf16_roof)
    if t:
      check(f"{name} vs cuDNN", rel(fn(q, k, v), ref), 1e-2)
      if t < best.get("bf16", (1e9,))[0]:
        best["bf16"] = (t, name)
  # Mosaic GPU FP8: the V transpose + key permutation pre-pass runs inside the timed op
  fp8_args = (q8, k8, v8, qsc, ksc, vsc)
  for tiles in MGPU_FP8:
    if S < tiles.stages * tiles.block_kv:   # smoke shapes: the pipeline needs >= stages steps
      continue
    fn = jax.jit(lambda q, k, v, a, b, c, tiles=tiles: flash_prefill_dense(
        q, k, v, scale=scale, q_scale=a, k_scale=b, v_scale=c, tiles=tiles, interpret=interp))
    name = f"ours Mosaic GPU fp8 {_mgpu_name(tiles)} (incl. V pre-pass)"
    t = record(case, name, fn, fp8_args, flops=flops, roof=fp8_roof)
    if t:
      check(f"{name} vs cuDNN(dequantized q/k/v)", rel(fn(*fp8_args), ref_deq), 3e-2)
      if t < best.get("fp8", (1e9,))[0]:
        best["fp8"] = (t, name, tiles)
  if "fp8" in best:   # where the FP8 time goes: the pre-pass alone and the kernel alone
    for two_pass in (False, True):
      prep = jax.jit(functools.partial(prepare_v_fp8, two_pass=two_pass))
      record(case, f"  FP8 V pre-pass alone ({'two passes' if two_pass else 'one 7-D transpose'})",
             prep, (v8,), nbytes=2 * v8.size)
    tiles = best["fp8"][2]
    kernel = lambda q, k, v, a, b, c: flash_prefill_dense(
        q, k, v, scale=scale, q_scale=a, k_scale=b, v_scale=c, tiles=tiles, interpret=interp,
        v_prepared=True)
    name = _mgpu_name(tiles)
    record(case, f"  FP8 kernel alone (V prepared) {name}", jax.jit(kernel),
           (q8, k8, jax.jit(prepare_v_fp8)(v8), qsc, ksc, vsc), flops=flops, roof=fp8_roof)
    fn = jax.jit(lambda q, k, v, a, b, c: kernel(q, k, prepare_v_fp8(v, two_pass=True), a, b, c))
    name = f"ours Mosaic GPU fp8 {name} (incl. two-pass V pre-pass)"
    t = record(case, name, fn, fp8_args, flops=flops, roof=fp8_roof)
    if t:
      check(f"{name} vs cuDNN(dequantized q/k/v)", rel(fn(*fp8_args), ref_deq), 3e-2)
      if t < best["fp8"][0]:
        best["fp8"] = (t, name, tiles)
  if not _SMOKE.value:   # cuDNN again: its run-to-run spread is part of every ratio
    times["cudnn again"] = record(case, "cuDNN bf16 again (after ours)", jax.jit(attn), (q, k, v),
                                  flops=flops, roof=bf16_roof)
  if times.get("cudnn") and times.get("cudnn again"):
    derived = RESULTS.setdefault("derived", {})
    for kind, entry in best.items():
      derived[f"{case} best Mosaic GPU {kind} ({entry[1]}) / cuDNN bf16 again TFLOP/s"] = \
          times["cudnn again"] / entry[0]
  if not _PREFILL_PEERS.value:
    _prefill_ratios(case, times, best)
    return
  if not _SMOKE.value:   # peers after ours, so a slow compile cannot cost our rows
    try:   # its bf16 path fails in jax 0.11.2 (f16 scratch buffers); timed with f16 inputs
      from jax.experimental.pallas.ops.gpu import attention_mgpu
      cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                        causal=True)
      bundled = jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, cfg))
      times["bundled"] = record(case, "jax attention_mgpu f16 (bundled)", bundled,
                                tuple(x.astype(jnp.float16) for x in (q, k, v)), flops=flops,
                                roof=bf16_roof)
    except Exception as e:
      RESULTS["errors"].append(f"attention_mgpu: {e!r}"[:600])
  # Pallas Triton (ragged-capable, the portable path): its best tiles from run 1
  tri = PrefillTiles(128, 64, 8, 3) if not _SMOKE.value else PrefillTiles(64, 64, 4, 2)
  fn = jax.jit(functools.partial(flash_prefill, scale=scale, tiles=tri, interpret=interp))
  times["triton bf16"] = record(case, f"ours Triton bf16 q{tri.block_q} k{tri.block_k}", fn,
                                (qf, k, v, qs, lens), flops=flops, roof=bf16_roof)
  tri8 = PrefillTiles(128, 128, 8, 3) if not _SMOKE.value else PrefillTiles(64, 64, 4, 2)
  fn = jax.jit(lambda q, k, v, qs, lens, a, b, c: flash_prefill(
      q, k, v, qs, lens, scale=scale, q_scale=a, k_scale=b, v_scale=c, tiles=tri8,
      interpret=interp, v_transposed=True))
  v8t = jnp.transpose(v8, (0, 2, 3, 1))
  times["triton fp8"] = record(case, f"ours Triton fp8 q{tri8.block_q} k{tri8.block_k} vT", fn,
                               (q8.reshape(B * S, H, D), k8, v8t, qs, lens, qsc, ksc, vsc),
                               flops=flops, roof=fp8_roof)
  if not _SMOKE.value:
    xla = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, scale=scale,
                                    implementation="xla"))
    record(case, "XLA bf16 (jax.nn.dot_product_attention)", xla, (q, k, v), flops=flops,
           roof=bf16_roof)
  _prefill_ratios(case, times, best)


def _prefill_ratios(case: str, times: dict, best: dict):
  if times.get("cudnn"):
    derived = RESULTS.setdefault("derived", {})
    for kind, entry in best.items():
      derived[f"{case} best Mosaic GPU {kind} ({entry[1]}) / cuDNN bf16 TFLOP/s"] = \
          times["cudnn"] / entry[0]
    for kind in ("triton bf16", "triton fp8", "bundled"):
      if times.get(kind):
        derived[f"{case} {kind} / cuDNN bf16 TFLOP/s"] = times["cudnn"] / times[kind]
    _save()


# -------------------------------------------------------------------------------------- decode
# Tile variants timed per case (the first of each list is the kernel's default for that dtype).
# page_blocks=False: the slot-gather addressing of the previous kernels, for comparison.
DECODE_BF16 = [BF16_TILES, DecodeTiles(mask_tail=False), DecodeTiles(32, 2, 6),
               DecodeTiles(64, 4, 3)]
DECODE_FP8 = [FP8_TILES, DecodeTiles(32, 1, 5), DecodeTiles(32, 1, 6), DecodeTiles(16, 1, 10),
              DecodeTiles(32, 2, 5), DecodeTiles(16, 1, 8, bits_upcast=True),
              DecodeTiles(16, 1, 8, tile_upcast=True), DecodeTiles(32, 4, 4),
              DecodeTiles(32, 4, 4, mask_tail=False)]
LONG_BF16 = [SPLIT_K_TILES, DecodeTiles(64, 4, 3, combine="serial"), DecodeTiles(32, 4, 4),
             DecodeTiles(64, 4, 3, page_blocks=False)]
LONG_FP8 = [SPLIT_K_FP8_TILES, DecodeTiles(64, 4, 3), DecodeTiles(64, 4, 3, combine="serial"),
            FP8_TILES]
MLA_FP8 = [MLATiles(64, 32, 8, 2), MLATiles(16, 64, 4, 2, tile_upcast=True),
           MLATiles(32, 32, 8, 2, tile_upcast=True), MLATiles(16, 32, 8, 2, tile_upcast=True)]
MLA_BF16 = [MLATiles(16, 64, 4, 2), MLATiles(64, 64, 8, 2)]


def _tiles_name(t: DecodeTiles) -> str:
  return (f"bk{t.block_k} w{t.num_warps} s{t.num_stages} splits{t.splits or 'auto'}"
          + ("" if t.page_blocks else " slot-gather") + (" tile-upcast" if t.tile_upcast else "")
          + (" bits-upcast" if t.bits_upcast else "") + ("" if t.mask_tail else " mask-all")
          + f" {t.combine} combine" + (f" {t.programs_per_sm}/SM" if t.programs_per_sm != 2 else ""))


def _decode_case(B, ctx, page_size, bf16_variants, fp8_variants, label, peers=True):
  H, KV, D = 32, 8, 128
  kp, vp, pt = paged_cache(B + ctx, B=B, ctx=ctx, page_size=page_size, KV=KV, D=D,
                           dtype=jnp.bfloat16)
  q = normal(5, (B, H, D))
  lens = jnp.full((B,), ctx, jnp.int32)
  qs = jnp.arange(B + 1, dtype=jnp.int32)
  scale = D ** -0.5
  read = RESULTS.get("read_tbps", 3.0)
  nbytes = 2 * B * ctx * KV * D * 2
  case = f"{label} B{B} ctx{ctx} page{page_size}"
  interp = _SMOKE.value
  kp8, vp8 = kp.astype(F8), vp.astype(F8)
  xla = jax.jit(lambda q, k, v: jnp.einsum(
      "bkgs,bskd->bkgd", jax.nn.softmax(jnp.einsum(
          "bkgd,bskd->bkgs", q.reshape(B, KV, H // KV, D), k,
          preferred_element_type=jnp.float32) * scale, axis=-1).astype(v.dtype), v).reshape(B, H, D))
  contiguous = lambda pages: pages[pt].reshape(B, ctx, KV, D).astype(jnp.bfloat16)
  ref = xla(q, contiguous(kp), contiguous(vp))
  ref8 = xla(q, contiguous(kp8), contiguous(vp8))   # the FP8 cache, dequantized
  if peers and _DECODE_PEERS.value and not _SMOKE.value:
    kc, vc = contiguous(kp), contiguous(vp)
    record(case, "XLA einsum, contiguous KV bf16", xla, (q, kc, vc), nbytes=nbytes, roof=read)
    try:
      from jax.experimental.pallas.ops.gpu import decode_attention
      gqa = jax.jit(functools.partial(decode_attention.gqa, sm_scale=scale))
      record(case, "jax decode_attention.gqa (bundled, contiguous)", gqa, (q, kc, vc),
             nbytes=nbytes, roof=read)
    except Exception as e:
      RESULTS["errors"].append(f"decode_attention.gqa: {e!r}"[:600])
    del kc, vc
    try:
      from jax.experimental.pallas.ops.gpu import paged_attention as jpa
      kt, vt = jnp.transpose(kp, (2, 0, 1, 3)), jnp.transpose(vp, (2, 0, 1, 3))
      for ppcb, ks in ((max(1, 128 // page_size), 16), (max(1, 64 // page_size), 8))[:_PEERS.value]:
        if pt.shape[1] % ks or (pt.shape[1] // ks) % ppcb:
          continue
        fn = jax.jit(functools.partial(jpa.paged_attention, pages_per_compute_block=ppcb,
                                       k_splits=ks))
        record(case, f"jax paged_attention (bundled) ppcb{ppcb} splits{ks}", fn,
               (q, kt, vt, pt, lens), nbytes=nbytes, roof=read)
      del kt, vt
    except Exception as e:
      RESULTS["errors"].append(f"bundled paged_attention: {e!r}"[:600])
  best, default = {}, {}
  for name, variants, (k, v), expected, nb in (
      ("bf16", bf16_variants, (kp, vp), ref, nbytes), ("fp8 KV", fp8_variants, (kp8, vp8), ref8,
                                                       nbytes // 2)):
    for tiles in variants:
      fn = jax.jit(functools.partial(paged_decode_attention, scale=scale, tiles=tiles,
                                     interpret=interp))
      t = record(case, f"ours {name} {_tiles_name(tiles)}", fn, (q, k, v, pt, lens, qs),
                 nbytes=nb, roof=read)
      if t is None:
        continue
      check(f"{case} ours {name} {_tiles_name(tiles)} vs XLA", rel(fn(q, k, v, pt, lens, qs),
                                                                   expected), 1e-2)
      if name not in best or t < best[name]:
        best[name] = t
      default.setdefault(name, t)   # each list starts with the kernel's default tiles
  if len(best) == 2:
    RESULTS.setdefault("derived", {})[f"{case} fp8/bf16 step time"] = best["fp8 KV"] / best["bf16"]
    print(f"{case}: best fp8 step / best bf16 step = {best['fp8 KV'] / best['bf16']:.3f}")
  if len(default) == 2:
    RESULTS["derived"][f"{case} default fp8/bf16 step time"] = default["fp8 KV"] / default["bf16"]
    _save()


@guarded
def decode():
  if _SMOKE.value:
    return _decode_case(4, 256, 64, [DecodeTiles(64, 4, 2)], [DecodeTiles(64, 4, 2)], "decode")
  _decode_case(64, 4096, 64, DECODE_BF16, DECODE_FP8, "decode")
  _decode_case(64, 4096, 16, DECODE_BF16[:1], DECODE_FP8[:1], "decode", peers=False)


@guarded
def decode_long():
  if _SMOKE.value:
    return _decode_case(1, 1024, 64, [DecodeTiles(64, 4, 2, splits=4)],
                        [DecodeTiles(64, 4, 2, splits=4)], "decode split-K")
  _decode_case(1, 32768, 64, LONG_BF16, LONG_FP8, "decode split-K")


# ---------------------------------------------------------------------------------------- MLA
@guarded
def mla():
  B, ctx, H, R, Dr, ps = (64, 4096, 128, 512, 64, 64) if not _SMOKE.value else (2, 256, 16, 64,
                                                                                  16, 64)
  pps = ctx // ps
  lat = normal(30, (B * pps + 1, ps, R + Dr))
  pt = jnp.asarray(np.random.default_rng(1).permutation(np.arange(1, B * pps + 1)).reshape(B, pps),
                   jnp.int32)
  ql, qr = normal(31, (B, H, R)), normal(32, (B, H, Dr))
  lens = jnp.full((B,), ctx, jnp.int32)
  qs = jnp.arange(B + 1, dtype=jnp.int32)
  read = RESULTS.get("read_tbps", 3.0)
  flops = B * H * ctx * (2 * (R + Dr) + 2 * R)
  interp = _SMOKE.value
  batch = build_batch([SeqChunk(list(np.asarray(pt[b])), ctx - 1, 1) for b in range(B)], ps,
                      num_tokens=B, num_seqs=B, pages_per_seq=pps)
  for lat_in, sc, name, variants in ((lat.astype(F8), 0.5, "fp8", MLA_FP8),
                                     (lat, 1.0, "bf16", MLA_BF16)):
    if _SMOKE.value:
      variants = [MLATiles(16, 32, 4, 2)]
    case = f"MLA decode {name} B{B} ctx{ctx} H{H}"
    nbytes = B * ctx * (R + Dr) * lat_in.dtype.itemsize
    ref_fn = jax.jit(functools.partial(reference_mla_paged_attention, scale=0.07,
                                       latent_scale=sc))
    if not _SMOKE.value and name == "fp8":
      record(case, "XLA reference (gather + einsum, f32)", ref_fn, (ql, qr, lat_in, batch),
             nbytes=nbytes, roof=read, flops=flops)
    ref = ref_fn(ql, qr, lat_in, batch)
    for tiles in variants:
      fn = jax.jit(functools.partial(mla_decode_pallas, scale=0.07, latent_scale=sc, tiles=tiles,
                                     interpret=interp))
      t = record(case, f"ours bh{tiles.block_h} bk{tiles.block_k} w{tiles.num_warps} "
                 f"s{tiles.num_stages}{' tile-upcast' if tiles.tile_upcast else ''}", fn, (ql, qr, lat_in, pt, lens, qs), nbytes=nbytes,
                 roof=read, flops=flops)
      if t is not None:
        check(f"{case} ours bh{tiles.block_h} bk{tiles.block_k} vs reference",
              rel(fn(ql, qr, lat_in, pt, lens, qs), ref), 1e-2)


def summarize_mgpu_trace(path: str) -> dict:
  """Mean duration (trace units) and count per (warpgroup, named scope) of a Mosaic GPU profiler
  trace (Perfetto JSON), skipping each warpgroup's first instance of a scope (the prologue)."""
  with open(path) as f:
    events = json.load(f)
  events = events.get("traceEvents", events) if isinstance(events, dict) else events
  stacks, seen, acc, last_start, period = {}, set(), {}, {}, {}
  for e in events:
    if e.get("ph") not in ("B", "E"):
      continue
    tid = e["tid"]
    if e["ph"] == "B":
      stacks.setdefault(tid, []).append(e)
      k = (tid, e["name"])
      if k in last_start:   # start-to-start: the loop period as seen by this scope
        key = (f"wg{(tid - 1) % 3}", "period:" + e["name"])
        tot, cnt = period.get(key, (0.0, 0))
        period[key] = (tot + e["ts"] - last_start[k], cnt + 1)
      last_start[k] = e["ts"]
      continue
    if not stacks.get(tid):
      continue
    b = stacks[tid].pop()
    key = (f"wg{(tid - 1) % 3}", b["name"])
    if (tid, b["name"]) not in seen:
      seen.add((tid, b["name"]))
      continue
    tot, cnt = acc.get(key, (0.0, 0))
    acc[key] = (tot + e["ts"] - b["ts"], cnt + 1)
  acc.update(period)
  return {f"{w}/{n}": {"mean": tot / cnt, "count": cnt} for (w, n), (tot, cnt) in sorted(acc.items())}


# Mosaic GPU MLA decode (kernels/mla_attention_mgpu.py): named variants, the first the default.
MLA_MGPU_VARIANTS = {"default": None, "s1": MLAMgpuTiles(stages=1),  # (3 slots do not fit smem)
                     "nozt": MLAMgpuTiles(zero_tail=False), "ov": MLAMgpuTiles(overlap=True),
                     "prod": MLAMgpuTiles(fp8_widen="producer"),
                     "prod_s1": MLAMgpuTiles(stages=1, fp8_widen="producer"),
                     "w8": MLAMgpuTiles(widen_layout="WGMMA_8BIT"),
                     "wu": MLAMgpuTiles(widen_layout="WGMMA_UPCAST_2X"),
                     "wmma": MLAMgpuTiles(widen_layout="WGMMA"),
                     "prod_w8": MLAMgpuTiles(fp8_widen="producer", widen_layout="WGMMA_8BIT"),
                     "pr": MLAMgpuTiles(p_regs=True),
                     "pr_w8": MLAMgpuTiles(p_regs=True, widen_layout="WGMMA_8BIT"),
                     "nopr": MLAMgpuTiles(p_regs=False),
                     "bfw": MLAMgpuTiles(fp8_mma="bf16"),
                     "qk8": MLAMgpuTiles(fp8_qk="e4m3"),
                     "qk8_w8": MLAMgpuTiles(fp8_qk="e4m3", widen_layout="WGMMA_8BIT")}


def _profile_mla(ql, qr, lat_in, pt, lens, qs, sc, tiles, label):
  import glob, os
  d = os.path.join(_MLA_PROFILE.value, label)
  os.makedirs(d, exist_ok=True)
  try:
    fn = jax.jit(functools.partial(mla_decode_mgpu, scale=0.07, latent_scale=sc, tiles=tiles,
                                   profile_dir=d))
    jax.block_until_ready(fn(ql, qr, lat_in, pt, lens, qs))
    jax.effects_barrier()
    traces = sorted(glob.glob(os.path.join(d, "*.json")))
    summary = summarize_mgpu_trace(traces[-1])
    RESULTS.setdefault("profiles", {})[label] = summary
    print(f"PROFILE {label}: " + json.dumps(summary), flush=True)
  except Exception:
    msg = f"profile {label}: {traceback.format_exc()[-2000:]}"
    print("FAILED", msg, flush=True)
    RESULTS["errors"].append(msg)
  _save()


@guarded
def mla_mgpu():
  """The Mosaic GPU MLA decode kernel next to the Triton one, same inputs; each variant is checked
  against the f32 reference on the GPU before it is timed (a variant that fails to compile is
  recorded as an error and the next one runs)."""
  if _SMOKE.value:
    B, ctx, H, R, Dr, ps = 3, 200, 64, 128, 64, 16
  else:
    B, ctx, H, R, Dr, ps = _MLA_BATCH.value, _MLA_CTX.value, 128, 512, 64, _MLA_PAGE.value
  pps = -(-ctx // ps)
  lat = normal(40, (B * pps + 1, ps, R + Dr))
  pt = jnp.asarray(np.random.default_rng(2).permutation(np.arange(1, B * pps + 1)).reshape(B, pps),
                   jnp.int32)
  ql, qr = normal(41, (B, H, R)), normal(42, (B, H, Dr))
  # ragged in the smoke run (a tail tile, length 1); every sequence at ctx in the timed case
  lens = (jnp.asarray([ctx, 1, ctx - 37], jnp.int32) if _SMOKE.value
          else jnp.full((B,), ctx, jnp.int32))
  qs = jnp.arange(B + 1, dtype=jnp.int32)
  read = RESULTS.get("read_tbps", 3.0)
  flops = B * H * ctx * (2 * (R + Dr) + 2 * R)
  interp = _SMOKE.value
  batch = build_batch([SeqChunk(list(np.asarray(pt[b])), int(lens[b]) - 1, 1) for b in range(B)],
                      ps, num_tokens=B, num_seqs=B, pages_per_seq=pps)
  ref_fn = jax.jit(functools.partial(reference_mla_paged_attention, scale=0.07))
  # a ragged batch on the same pages for a second check: length 1, odd lengths, tail tiles
  rlens = np.random.default_rng(3).integers(1, ctx + 1, B)
  rlens[0] = 1
  rlens = jnp.asarray(rlens, jnp.int32)
  rbatch = build_batch([SeqChunk(list(np.asarray(pt[b])), int(rlens[b]) - 1, 1) for b in range(B)],
                       ps, num_tokens=B, num_seqs=B, pages_per_seq=pps)
  by_dtype: dict = {}
  for spec in _MLA_MGPU.value:
    name, variant = spec.split(":")
    by_dtype.setdefault(name, []).append(variant)
  for name, variants in by_dtype.items():
    sc = 0.5 if name == "fp8" else 1.0
    lat_in = ((lat / sc).astype(F8) if name == "fp8" else
              lat.astype(jnp.float16) if name == "f16" else lat)   # f16: the f16-MMA probe
    case = f"MLA decode {name} B{B} ctx{ctx} H{H} page{ps}"
    nbytes = B * ctx * (R + Dr) * lat_in.dtype.itemsize
    ref = ref_fn(ql, qr, lat_in, batch, latent_scale=sc)
    rref = ref_fn(ql, qr, lat_in, rbatch, latent_scale=sc)
    best = {}
    mosaic_default = None
    for variant in variants:
      tiles = MLA_MGPU_VARIANTS[variant]
      fn = jax.jit(functools.partial(mla_decode_mgpu, scale=0.07, latent_scale=sc, tiles=tiles,
                                     interpret=interp))
      label = f"Mosaic GPU {variant}"
      try:
        out = fn(ql, qr, lat_in, pt, lens, qs)
        err = rel(out, ref)
        rerr = rel(fn(ql, qr, lat_in, pt, rlens, qs), rref)
      except Exception as e:   # a Mosaic compile error must not end the run
        msg = f"{case} / {label}: {type(e).__name__}: {traceback.format_exc()[-3000:]}"
        print("FAILED", msg, flush=True)
        RESULTS["errors"].append(msg)
        _save()
        continue
      check(f"{case} {label} vs reference", err, 1e-2)
      check(f"{case} {label} ragged lengths vs reference", rerr, 1e-2)
      if variant == "default":
        mosaic_default = out
      t = record(case, label, fn, (ql, qr, lat_in, pt, lens, qs), nbytes=nbytes, roof=read,
                 flops=flops)
      if t is not None:
        best["mosaic"] = min(best.get("mosaic", t), t)
      if _MLA_PROFILE.value and variant == variants[0] and not interp:
        _profile_mla(ql, qr, lat_in, pt, lens, qs, sc, tiles, f"{name}_{variant}")
    if _MLA_PUBLIC.value and name != "f16":
      # the public op as the model calls it (selector, runtime cond / static decode bound)
      for mnt in (None, 1):
        label = f"public op mla_paged_attention max_new_tokens={mnt}"
        pfn = jax.jit(functools.partial(mla_paged_attention, scale=0.07, latent_scale=sc,
                                        max_new_tokens=mnt))
        try:
          check(f"{case} {label} vs reference", rel(pfn(ql, qr, lat_in, batch), ref), 1e-2)
          check(f"{case} {label} ragged vs reference", rel(pfn(ql, qr, lat_in, rbatch), rref), 1e-2)
          if mosaic_default is not None:   # which kernel the selector took
            same = bool(jnp.array_equal(pfn(ql, qr, lat_in, batch), mosaic_default))
            RESULTS.setdefault("derived", {})[f"{case} {label} == Mosaic default"] = same
            print(f"{case} {label}: bitwise equal to the Mosaic default: {same}", flush=True)
        except Exception:
          msg = f"{case} / {label}: {traceback.format_exc()[-3000:]}"
          print("FAILED", msg, flush=True)
          RESULTS["errors"].append(msg)
          continue
        record(case, label, pfn, (ql, qr, lat_in, batch), nbytes=nbytes, roof=read, flops=flops)
    if _MLA_TRITON.value and name != "f16":
      tiles = (MLATiles(16, 32, 4, 2) if _SMOKE.value else
               MLA_FP8[0] if name == "fp8" else MLA_BF16[0])
      fn = jax.jit(functools.partial(mla_decode_pallas, scale=0.07, latent_scale=sc, tiles=tiles,
                                     interpret=interp))
      label = f"Triton bh{tiles.block_h} bk{tiles.block_k} w{tiles.num_warps}"
      check(f"{case} {label} vs reference", rel(fn(ql, qr, lat_in, pt, lens, qs), ref), 1e-2)
      t = record(case, label, fn, (ql, qr, lat_in, pt, lens, qs), nbytes=nbytes, roof=read,
                 flops=flops)
      if t is not None:
        best["triton"] = t
    if len(best) == 2:
      RESULTS.setdefault("derived", {})[f"{case} triton/mosaic time"] = best["triton"] / best["mosaic"]
      _save()


SECTIONS = {"ceilings": ceilings, "check": gpu_checks, "prefill": prefill, "decode": decode,
            "decode_long": decode_long, "mla": mla, "mla_mgpu": mla_mgpu}


def main(argv):
  del argv
  RESULTS["device"] = str(jax.devices()[0].device_kind)
  RESULTS["jax"] = jax.__version__
  RESULTS["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
  print(RESULTS["device"], RESULTS["jax"], RESULTS["date"], flush=True)
  for name, fn in SECTIONS.items():
    if not _ONLY.value or name in _ONLY.value:
      t0 = time.time()
      fn()
      print(f"-- section {name} took {time.time() - t0:.0f} s", flush=True)
  print("\n== summary ==")
  for r in RESULTS["rows"]:
    perf = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r.get('tbps', 0):.2f} TB/s"
    roof = f" {r['of_roof'] * 100:.0f}%" if "of_roof" in r else ""
    print(f"{r['case']:30s} {r['impl']:46s} {r['ms']:8.3f} ms {perf}{roof}")
  bad = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
  print(f"checks: {len(RESULTS['checks']) - len(bad)} ok, failed: {bad}")
  print(f"errors: {len(RESULTS['errors'])}")
  for e in RESULTS["errors"]:
    print("  ", e[-400:].replace("\n", " | "))
  print("derived:", RESULTS.get("derived"))
  _save()


if __name__ == "__main__":
  app.run(main)
