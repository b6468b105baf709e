"""Serving benchmark: concurrency sweep and Poisson arrivals through the jaxinfer engine, and the same
closed-loop sweep through HF transformers (static cache) as the peer.

  # on the GPU machine: one process per framework, one after the other (never overlapped: each
  # would contend for the GPU and the host cores of the other), then the report:
  python3 experiments/bench_serving.py --engine=hf  --out=$OUT/hf.json
  python3 experiments/bench_serving.py --engine=jax --out=$OUT/jax.json
  python3 experiments/bench_serving.py --engine=report --jax_json=... --hf_json=... --out=...

HF transformers auto-compiles the decode step when given a static cache; --hf_compile=false (the
default) passes ``disable_compile=True`` so the timed runs are eager and compile-free; with
--hf_compile the warm-up uses the timed lengths so the compiled graphs are reused.

Closed loop at concurrency c: c users, each sends its next request when the previous one finishes,
until ``requests_per_user * c`` requests are done. Poisson: open-loop arrivals at --poisson_rate.
Requests have --input_len random prompt tokens (a prompt set read with grain when --prompts names a
file of whitespace-separated token ids, one prompt a line) and generate exactly --output_len tokens
(ignore_eos). Reported per level: TTFT/TPOT/ITL p50/p99, output tokens/s per user and per GPU; the
report plots throughput per GPU against tokens/s per user (the Pareto view of the seeds).

The batch-1 roofline: a decode step must read every weight once (the embedding table only by rows),
so its floor is weight bytes over the device-to-device bandwidth measured in the same run.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags, logging

_ENGINE = flags.DEFINE_enum("engine", "jax", ["jax", "hf", "report"], "what to run")
_MODEL = flags.DEFINE_enum("model", "llama3-8b", ["llama3-8b", "toy"], "model shape (random weights)")
_CONC = flags.DEFINE_list("concurrency", ["1", "64"], "closed-loop levels run first, in order")
_EXTRA_CONC = flags.DEFINE_list("extra_concurrency", ["16", "256"],
                                "levels run afterwards while --time_budget_s allows")
_INPUT = flags.DEFINE_integer("input_len", 128, "prompt tokens")
_OUTPUT = flags.DEFINE_integer("output_len", 64, "generated tokens per request")
_PER_USER = flags.DEFINE_integer("requests_per_user", 2, "closed loop: requests per user")
_POISSON_RATE = flags.DEFINE_float("poisson_rate", 32.0, "requests/s (0: skip the Poisson run)")
_POISSON_N = flags.DEFINE_integer("poisson_requests", 128, "requests of the Poisson run")
_POISSON_CONC = flags.DEFINE_integer("poisson_max_batch", 64, "max batch of the Poisson run")
_PAGE = flags.DEFINE_integer("page_size", 16, "KV page size")
_KV_PAGES = flags.DEFINE_integer("kv_pages", 4096, "KV pages")
_BUDGET = flags.DEFINE_integer("max_num_batched_tokens", 1024, "step token budget")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", "bf16", ["bf16", "fp8"], "KV cache storage")
_PROMPTS = flags.DEFINE_string("prompts", None, "file of prompts (token ids), read with grain")
_TIME_BUDGET = flags.DEFINE_float("time_budget_s", 120.0, "skip extra levels past this")
_SEED = flags.DEFINE_integer("seed", 0, "seed")
_OUT = flags.DEFINE_string("out", "/tmp/bench_serving.json", "JSON output (report: .md/.png prefix)")
_JAX_JSON = flags.DEFINE_string("jax_json", None, "report: the jax run's JSON")
_HF_JSON = flags.DEFINE_string("hf_json", None, "report: the HF run's JSON")
_HF_COMPILE = flags.DEFINE_bool("hf_compile", False, "let transformers torch.compile the decode step")

T_START = time.perf_counter()


def llama_shape(name: str) -> dict:
  if name == "llama3-8b":
    return dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                head_dim=128, intermediate_size=14336, rope_theta=500000.0,
                max_position_embeddings=8192)
  return dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, intermediate_size=128, max_position_embeddings=1024)


def prompt_set(n: int, vocab: int, rng: np.random.Generator) -> list[list[int]]:
  """``n`` prompts of --input_len tokens: from --prompts through a grain pipeline, else random."""
  if _PROMPTS.value:
    import grain
    with open(_PROMPTS.value) as f:
      lines = [ln for ln in f.read().splitlines() if ln.strip()]
    ds = (grain.MapDataset.source(lines).shuffle(seed=_SEED.value)
          .map(lambda ln: [int(t) % vocab for t in ln.split()][:_INPUT.value]).repeat())
    return [ds[i] for i in range(n)]
  try:
    import grain
    ds = grain.MapDataset.range(n).map(
        lambda i: np.random.default_rng(i + 1000 * _SEED.value).integers(
            1, vocab, _INPUT.value).tolist())
    return [ds[i] for i in range(n)]
  except ImportError:  # the GPU image has no grain: the same prompts without it
    return [np.random.default_rng(i + 1000 * _SEED.value).integers(1, vocab, _INPUT.value).tolist()
            for i in range(n)]


def percentiles(xs) -> dict:
  xs = np.asarray(xs, np.float64)
  if xs.size == 0:
    return {"p50": None, "p99": None, "mean": None}
  return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99)),
          "mean": float(xs.mean())}


def summarize(records: list[dict], wall: float) -> dict:
  """records: per request {arrival, token_times}."""
  ttft = [r["token_times"][0] - r["arrival"] for r in records]
  tpot = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
          for r in records if len(r["token_times"]) > 1]
  itl = [b - a for r in records for a, b in zip(r["token_times"], r["token_times"][1:])]
  out_tokens = sum(len(r["token_times"]) for r in records)
  return {"requests": len(records), "output_tokens": out_tokens, "wall_s": wall,
          "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "itl_s": percentiles(itl),
          "tokens_per_s_per_gpu": out_tokens / wall,
          "tokens_per_s_per_user": float(np.median([1.0 / t for t in tpot])) if tpot else None}


# ---------------------------------------------------------------------------------------------
# jaxinfer


def measure_device_ceilings() -> dict:
  import jax
  import jax.numpy as jnp
  n = 1 << 29  # 1 GiB of bf16 per buffer; rotate 3 buffers (> 50 MB L2)
  bufs = [jax.random.normal(jax.random.key(i), (n,), jnp.bfloat16) for i in range(3)]
  add = jax.jit(lambda x: x + 1)
  jax.block_until_ready([add(b) for b in bufs])
  times = []
  for _ in range(5):  # 10 back-to-back launches per sample: the host sync is amortised
    t = time.perf_counter()
    jax.block_until_ready([add(bufs[i % 3]) for i in range(10)])
    times.append((time.perf_counter() - t) / 10)
  bw = 2 * n * 2 / float(np.median(times))
  del bufs
  m = 8192
  a = jax.random.normal(jax.random.key(7), (m, m), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(8), (m, m), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(mm(a, b))
  times = []
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready([mm(a, b) for _ in range(10)])
    times.append((time.perf_counter() - t) / 10)
  return {"hbm_bytes_per_s": bw, "bf16_flops_per_s": 2 * m ** 3 / float(np.median(times))}


def run_closed_loop(engine, prompts, concurrency: int, num_requests: int) -> tuple[dict, list]:
  from jaxinfer.sampling import SamplingParams
  params = SamplingParams(max_tokens=_OUTPUT.value, ignore_eos=True)
  records, live, steps = {}, 0, []
  next_i, done = 0, 0
  t0 = time.perf_counter()
  while done < num_requests:
    while live < concurrency and next_i < num_requests:
      rid = engine.add_request(prompts[next_i % len(prompts)], params, request_id=f"r{next_i}")
      records[rid] = {"arrival": engine.clock(), "token_times": []}
      next_i += 1
      live += 1
    ts = time.perf_counter()
    outs = engine.step()
    steps.append((time.perf_counter() - ts, engine.last_step))
    now = engine.clock()
    for o in outs:
      records[o.request_id]["token_times"] += [now] * len(o.new_token_ids)
      if o.finished:
        done += 1
        live -= 1
  return summarize(list(records.values()), time.perf_counter() - t0), steps


def run_poisson(engine, prompts, rate: float, num_requests: int) -> dict:
  from jaxinfer.sampling import SamplingParams
  params = SamplingParams(max_tokens=_OUTPUT.value, ignore_eos=True)
  rng = np.random.default_rng(_SEED.value)
  arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests))
  records, next_i, done = {}, 0, 0
  t0 = engine.clock()
  while done < num_requests:
    now = engine.clock() - t0
    while next_i < num_requests and arrivals[next_i] <= now:
      rid = engine.add_request(prompts[next_i % len(prompts)], params, request_id=f"p{next_i}")
      records[rid] = {"arrival": t0 + arrivals[next_i], "token_times": []}
      next_i += 1
    if not engine.has_unfinished():
      time.sleep(max(0.0, arrivals[next_i] - (engine.clock() - t0)))  # open loop: idle until next
      continue
    outs = engine.step()
    now = engine.clock()
    for o in outs:
      records[o.request_id]["token_times"] += [now] * len(o.new_token_ids)
      done += o.finished
  return summarize(list(records.values()), engine.clock() - t0) | {"rate_per_s": rate}


def run_jax() -> dict:
  import jax
  import jax.numpy as jnp

  from jaxinfer.engine import EngineConfig, LLMEngine
  from jaxinfer.engine.step import LlamaForward
  from jaxinfer.models import llama

  result = {"engine": "jaxinfer", "device": str(jax.devices()[0].device_kind),
            "jax_version": jax.__version__, "model": _MODEL.value,
            "input_len": _INPUT.value, "output_len": _OUTPUT.value, "kv_dtype": _KV_DTYPE.value,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  on_gpu = jax.default_backend() == "gpu"
  cfg = llama.LlamaConfig(**llama_shape(_MODEL.value))
  dtype = jnp.bfloat16
  t = time.perf_counter()
  params = llama.init_params(cfg, jax.random.key(_SEED.value), dtype)
  jax.block_until_ready(params)
  result["init_s"] = time.perf_counter() - t
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  embed_bytes = params["embed"].nbytes if not cfg.tie_word_embeddings else 0
  result["weight_bytes"], result["decode_read_bytes"] = weight_bytes, weight_bytes - embed_bytes
  kv_dtype = jnp.float8_e4m3fn if _KV_DTYPE.value == "fp8" else dtype
  cache = llama.create_cache(cfg, num_pages=_KV_PAGES.value, page_size=_PAGE.value, dtype=kv_dtype)
  pages_per_seq = -(-(_INPUT.value + _OUTPUT.value) // _PAGE.value)
  max_len = pages_per_seq * _PAGE.value

  def engine_for(c: int) -> LLMEngine:
    budget = max(c, min(_BUDGET.value, c * _INPUT.value))
    ec = EngineConfig(num_pages=_KV_PAGES.value, page_size=_PAGE.value, max_num_seqs=c,
                      max_num_batched_tokens=budget, chunk_size=_INPUT.value,
                      max_model_len=max_len, min_seq_bucket=c, min_page_bucket=pages_per_seq,
                      token_buckets=tuple(sorted({c, budget})), kv_dtype=kv_dtype)
    return LLMEngine(params, LlamaForward(cfg), cache, vocab_size=cfg.vocab_size,
                     max_model_len=max_len, config=ec)

  main_levels = [int(c) for c in _CONC.value]
  extra_levels = [int(c) for c in _EXTRA_CONC.value if int(c) not in main_levels]
  poisson_c = _POISSON_CONC.value
  # Compile every step shape of the main levels (and the Poisson run) concurrently, up front.
  t = time.perf_counter()
  warm = [engine_for(c) for c in sorted(set(main_levels + [poisson_c]))]
  shapes = [(e, s) for e in warm for s in e.buckets.all_shapes()]
  import concurrent.futures
  with concurrent.futures.ThreadPoolExecutor(len(shapes)) as pool:
    list(pool.map(lambda es: es[0].warmup([es[1]]), shapes))
  result["compile_s"] = time.perf_counter() - t
  result["compiled_shapes"] = [s for _, s in shapes]
  logging.info("compiled %d shapes in %.1fs", len(shapes), result["compile_s"])
  if on_gpu:
    result["ceilings"] = measure_device_ceilings()
    logging.info("ceilings %s", result["ceilings"])

  prompts = prompt_set(max(main_levels + extra_levels + [1]) * _PER_USER.value, cfg.vocab_size,
                       np.random.default_rng(_SEED.value))
  result["levels"] = {}
  for i, c in enumerate(main_levels + extra_levels):
    if i >= len(main_levels) and time.perf_counter() - T_START > _TIME_BUDGET.value:
      logging.info("time budget spent: skipping concurrency %d", c)
      result.setdefault("skipped_levels", []).append(c)
      continue
    engine = engine_for(c)
    if i >= len(main_levels):
      engine.warmup(num_threads=4)
    # one short untimed wave first (first-call dispatch costs), then the measured closed loop
    run_closed_loop(engine, prompts, c, c)
    summary, steps = run_closed_loop(engine, prompts, c, _PER_USER.value * c)
    cache = engine.cache
    decode_steps = [(dt, st) for dt, st in steps if st is not None and st.decode_only]
    summary["decode_step_s"] = percentiles([dt for dt, _ in decode_steps])
    # host part (schedule, batch build, dispatch) vs. waiting for the device, per decode step
    summary["decode_step_host_s"] = percentiles([st.host_s for _, st in decode_steps])
    summary["decode_step_wait_s"] = percentiles([st.wait_s for _, st in decode_steps])
    summary["steps"] = len(steps)
    result["levels"][str(c)] = summary
    logging.info("c=%d %s", c, json.dumps(summary))
    if c == 1 and on_gpu:
      floor = result["decode_read_bytes"] / result["ceilings"]["hbm_bytes_per_s"]
      result["batch1_decode"] = {"step_s_p50": summary["decode_step_s"]["p50"], "roofline_s": floor,
                                 "ratio": summary["decode_step_s"]["p50"] / floor}
  if _POISSON_RATE.value > 0:
    engine = engine_for(poisson_c)
    result["poisson"] = run_poisson(engine, prompts, _POISSON_RATE.value, _POISSON_N.value)
    result["poisson"]["max_batch"] = poisson_c
  result["total_s"] = time.perf_counter() - T_START
  return result


# ---------------------------------------------------------------------------------------------
# HF transformers peer


def run_hf() -> dict:
  import torch
  import transformers

  shape = llama_shape(_MODEL.value)
  config = transformers.LlamaConfig(
      vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
      num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
      num_key_value_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
      intermediate_size=shape["intermediate_size"], rope_theta=shape.get("rope_theta", 10000.0),
      max_position_embeddings=shape["max_position_embeddings"])
  torch.manual_seed(_SEED.value)
  torch.set_default_dtype(torch.bfloat16)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  with torch.device(device):
    model = transformers.LlamaForCausalLM(config).eval()
  result = {"engine": "hf-transformers", "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "model": _MODEL.value, "input_len": _INPUT.value, "output_len": _OUTPUT.value,
            "cache": "static", "torch_compile": _HF_COMPILE.value, "levels": {}}
  rng = np.random.default_rng(_SEED.value)

  def gen(ids, n):
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, cache_implementation="static",
                           pad_token_id=0, disable_compile=not _HF_COMPILE.value)
    sync()
    assert out.shape[1] == ids.shape[1] + n
    return time.perf_counter() - t

  levels = [int(c) for c in _CONC.value] + [int(c) for c in _EXTRA_CONC.value]
  for i, c in enumerate(levels):
    if i >= len(_CONC.value) and time.perf_counter() - T_START > _TIME_BUDGET.value:
      result.setdefault("skipped_levels", []).append(c)
      continue
    ids = torch.tensor(rng.integers(1, shape["vocab_size"], (c, _INPUT.value)), device=device)
    gen(ids, 1)                                 # warm-up (with --hf_compile: compiles these lengths)
    gen(ids, _OUTPUT.value)
    ttft = gen(ids, 1)
    total = gen(ids, _OUTPUT.value)
    tpot = (total - ttft) / (_OUTPUT.value - 1)
    result["levels"][str(c)] = {
        "requests": c, "output_tokens": c * _OUTPUT.value, "wall_s": total,
        "ttft_s": {"p50": ttft}, "tpot_s": {"p50": tpot},
        "tokens_per_s_per_gpu": c * _OUTPUT.value / total, "tokens_per_s_per_user": 1.0 / tpot}
    logging.info("hf c=%d %s", c, result["levels"][str(c)])
  result["total_s"] = time.perf_counter() - T_START
  return result


# ---------------------------------------------------------------------------------------------
# report


def report() -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = [json.load(open(p)) for p in (_JAX_JSON.value, _HF_JSON.value) if p and os.path.exists(p)]
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for run in runs:
    pts = sorted((int(c), v) for c, v in run["levels"].items())
    x = [v["tokens_per_s_per_user"] for _, v in pts]
    y = [v["tokens_per_s_per_gpu"] for _, v in pts]
    ax.plot(x, y, "o-", label=run["engine"])
    for (c, _), xi, yi in zip(pts, x, y):
      ax.annotate(f"c={c}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set_xlabel("interactivity: output tokens/s per user")
  ax.set_ylabel("throughput: output tokens/s per GPU")
  ax.set_title(f"Llama-3-8B-shaped, random bf16 weights ({runs[0].get('device', '?')})")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(_OUT.value.removesuffix(".json") + ".png", dpi=120)
  rows = ["| engine | c | out tok/s/GPU | tok/s/user | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
          "ITL p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
  ms = lambda d, k: "-" if d.get(k) is None else f"{1e3 * d[k]:.1f}"
  for run in runs:
    for c, v in sorted(run["levels"].items(), key=lambda kv: int(kv[0])):
      itl = v.get("itl_s", {})
      rows.append(f"| {run['engine']} | {c} | {v['tokens_per_s_per_gpu']:.0f} | "
                  f"{v['tokens_per_s_per_user']:.1f} | {ms(v['ttft_s'], 'p50')} / "
                  f"{ms(v['ttft_s'], 'p99')} | {ms(v['tpot_s'], 'p50')} / {ms(v['tpot_s'], 'p99')} | "
                  f"{ms(itl, 'p50')} / {ms(itl, 'p99')} |")
  table = "\n".join(rows)
  print(table)
  with open(_OUT.value, "w") as f:
    json.dump({"runs": runs}, f, indent=1)
  with open(_OUT.value.removesuffix(".json") + "_table.md", "w") as f:
    f.write(table + "\n")


def main(argv) -> None:
  del argv
  if _ENGINE.value == "report":
    report()
    return
  result = run_jax() if _ENGINE.value == "jax" else run_hf()
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=1)
  rows = [f"{result['engine']} {c:>4}: {v['tokens_per_s_per_gpu']:9.1f} tok/s/GPU "
          f"{v['tokens_per_s_per_user']:7.1f} tok/s/user  TTFT p50 {1e3 * v['ttft_s']['p50']:8.1f} ms"
          f"  TPOT p50 {1e3 * v['tpot_s']['p50']:7.2f} ms"
          for c, v in sorted(result["levels"].items(), key=lambda kv: int(kv[0]))]
  print("\n".join(rows))
  if "batch1_decode" in result:
    print("batch-1 decode:", result["batch1_decode"])


if __name__ == "__main__":
  app.run(main)
