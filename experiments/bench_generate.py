"""Generation speed: compile time, prefill tokens/s, time to first token, decode step time and tokens/s,
against the decode roofline (weight bytes + KV bytes read per step over measured read bandwidth).

  python experiments/bench_generate.py                       # embedded default model (CPU or GPU)
  python experiments/bench_generate.py --shape=llama3_8b     # random Llama-3-8B-shaped weights (GPU)

Also reports, for a checkpoint model, import time vs restore time from jaxinfer's orbax format.
"""
from __future__ import annotations

import datetime
import functools
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxinfer import attention
from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.models import llama
from jaxinfer.sampling import SamplingBatch, SamplingParams, sample_jit

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "default", ["default", "llama3_8b"], "default: the embedded checkpoint")
flags.DEFINE_list("batch_sizes", ["1"], "decode batch sizes")
flags.DEFINE_integer("prompt_len", 512, "prompt tokens per sequence")
flags.DEFINE_integer("context", 1024, "cached context length during the decode timing")
flags.DEFINE_integer("decode_steps", 32, "timed decode steps")
flags.DEFINE_integer("page_size", 16, "KV page size")
flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "default: bf16 on GPU, f32 on CPU")
flags.DEFINE_string("out", None, "write results JSON here")
flags.DEFINE_bool("fuse_projections", True, "time the fused-projection layout (wqkv, w_gate_up: "
                  "llama.fuse_projections, what the serving engine runs on one device)")
flags.DEFINE_bool("fused_add_norm", True, "residual add + RMSNorm as one Pallas kernel on GPU")
flags.DEFINE_list("attention", ["auto"], "attention impls to time: auto (Pallas on GPU) and/or "
                  "reference (plain JAX)")

LLAMA3_8B = llama.LlamaConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                              num_kv_heads=8, head_dim=128, intermediate_size=14336,
                              rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)


def read_bandwidth() -> float:
  """Bytes/s of a read-only reduction over 4 GiB (f32), median of 10 (as in BASELINES.md; a 2 GiB
  probe read only 2.45 TB/s on the H100 where 4 GiB reads 3.0)."""
  x = jax.random.normal(jax.random.key(0), (1024 * 1024 * 1024,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  times = []
  for _ in range(10):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return x.nbytes / statistics.median(times)


def timed(fn, *args, reps: int):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def bench_model(model: LoadedModel, batch_size: int, bandwidth: float | None) -> dict:
  cfg, ps = model.config, FLAGS.page_size
  rng = np.random.default_rng(0)
  pages_per_seq = -(-(FLAGS.context + FLAGS.decode_steps + 8) // ps)
  cache = model.create_cache(num_pages=1 + batch_size * pages_per_seq, page_size=ps)
  pages = [list(range(1 + b * pages_per_seq, 1 + (b + 1) * pages_per_seq)) for b in range(batch_size)]
  forward = jax.jit(functools.partial(llama.forward, fused_add_norm=FLAGS.fused_add_norm),
                    static_argnames=("cfg",), donate_argnames=("cache",))

  # Prefill one prompt: compile time, then time to first token (prefill + sample) warm.
  prompt = rng.integers(0, cfg.vocab_size, FLAGS.prompt_len).astype(np.int32)
  pbatch = build_batch([SeqChunk(pages[0], 0, FLAGS.prompt_len)], ps, num_tokens=FLAGS.prompt_len,
                       num_seqs=1, pages_per_seq=pages_per_seq)
  sb1 = SamplingBatch.from_params([SamplingParams()], [0], 1)
  t = time.perf_counter()
  logits, cache = forward(model.params, jnp.asarray(prompt), cache, pbatch, cfg=cfg)
  jax.block_until_ready(sample_jit(logits, sb1))
  compile_prefill = time.perf_counter() - t
  ttft = []
  for _ in range(5):
    t = time.perf_counter()
    logits, cache = forward(model.params, jnp.asarray(prompt), cache, pbatch, cfg=cfg)
    jax.block_until_ready(sample_jit(logits, sb1))
    ttft.append(time.perf_counter() - t)
  ttft = statistics.median(ttft)

  # Decode: every sequence at position `context`, one token each per step.
  T = max(8, batch_size)
  dbatch = build_batch([SeqChunk(p, FLAGS.context, 1) for p in pages], ps, num_tokens=T,
                       num_seqs=batch_size, pages_per_seq=pages_per_seq)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, T).astype(np.int32))
  sb = SamplingBatch.from_params([SamplingParams()] * batch_size, [0] * batch_size, batch_size)
  t = time.perf_counter()
  logits, cache = forward(model.params, tokens, cache, dbatch, cfg=cfg)
  jax.block_until_ready(logits)
  compile_decode = time.perf_counter() - t

  def step(cache):
    logits, cache = forward(model.params, tokens, cache, dbatch, cfg=cfg)
    return sample_jit(logits, sb), cache

  step_times = []
  for _ in range(FLAGS.decode_steps):
    t = time.perf_counter()
    (new_tokens, _), cache = step(cache)
    new_tokens.block_until_ready()
    step_times.append(time.perf_counter() - t)
  step_s = statistics.median(step_times)

  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
  kv_bytes = batch_size * (FLAGS.context + 1) * cache.nbytes_per_token()
  result = {
      "batch": batch_size, "prompt_len": FLAGS.prompt_len, "context": FLAGS.context,
      "compile_prefill_s": compile_prefill, "compile_decode_s": compile_decode,
      "ttft_s": ttft, "prefill_tokens_per_s": FLAGS.prompt_len / ttft,
      "decode_step_s": step_s, "decode_tokens_per_s": batch_size / step_s,
      "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
  }
  if bandwidth:
    roofline = (weight_bytes + kv_bytes) / bandwidth
    result.update(read_bandwidth_Bps=bandwidth, decode_roofline_s=roofline,
                  decode_over_roofline=step_s / roofline)
  return result


def main(argv):
  del argv
  dtype = FLAGS.dtype and getattr(jnp, FLAGS.dtype)
  report = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "shape": FLAGS.shape, "runs": []}
  if FLAGS.shape == "default":
    t = time.perf_counter()
    model = load_model(None, dtype=dtype, progress=False)
    report["import_gguf_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
      model.save(d)
      t = time.perf_counter()
      load_model(d, dtype=dtype)
      report["restore_orbax_s"] = time.perf_counter() - t
  else:
    dtype = dtype or jnp.bfloat16
    params = llama.init_params(LLAMA3_8B, jax.random.key(0), dtype)
    model = LoadedModel("llama", LLAMA3_8B, params, None, "random llama3_8b")
  if FLAGS.fuse_projections and model.architecture == "llama":
    model = LoadedModel(model.architecture, model.config, llama.fuse_projections(model.params),
                        model.tokenizer, model.source)
  report["fused_projections"] = FLAGS.fuse_projections
  report["fused_add_norm"] = FLAGS.fused_add_norm
  bandwidth = read_bandwidth() if jax.default_backend() == "gpu" else None
  dispatch = attention.paged_attention
  for impl in FLAGS.attention:
    attention.paged_attention = functools.partial(dispatch, impl=impl)
    for b in FLAGS.batch_sizes:
      try:
        r = {"attention": impl, **bench_model(model, int(b), bandwidth)}
      except Exception as e:  # record and go on: one failing variant must not lose the run
        r = {"attention": impl, "batch": int(b), "error": f"{type(e).__name__}: {e}"[:2000]}
      report["runs"].append(r)
      print(json.dumps(r), flush=True)
  attention.paged_attention = dispatch
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(report, f, indent=1)
  print(f"\n{'attn':>9} {'batch':>5} {'TTFT ms':>8} {'prefill tok/s':>13} {'step ms':>8} {'decode tok/s':>12} "
        f"{'x roofline':>10}")
  for r in report["runs"]:
    if "error" in r:
      print(f"{r['attention']:>9} {r['batch']:>5} error: {r['error'][:200]}")
      continue
    print(f"{r['attention']:>9} {r['batch']:>5} {r['ttft_s'] * 1e3:8.1f} {r['prefill_tokens_per_s']:13.0f} "
          f"{r['decode_step_s'] * 1e3:8.2f} {r['decode_tokens_per_s']:12.1f} "
          f"{r.get('decode_over_roofline', float('nan')):10.2f}")


if __name__ == "__main__":
  app.run(main)
