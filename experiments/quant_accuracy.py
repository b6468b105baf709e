"""Quality cost of FP8 block-128 and NVFP4 weights: perplexity and top-1 agreement against bf16.

Corpus: the English text of Python's own reference documentation as shipped inside CPython's standard
library (``pydoc_data.topics``, the text ``help()`` shows), topics in sorted order, cut into
``--seq_len``-token windows. Models:
  * the default Llama (SmolLM2-135M-Instruct, embedded GGUF, dequantized to bf16: the bf16 baseline is
    the Q4_1 checkpoint's own values), its 30 layers' linears quantized by checkpoints/quantize.py;
  * a random DeepSeek-V3-shaped config (all K multiples of 128), bytes of the same text as tokens (the
    text is ASCII, vocab 128). Its perplexity means nothing (random weights); agreement and the logits'
    KL divergence from bf16 measure what quantization changes.
Variants: bf16 | fp8 (every linear whose K is a multiple of 128: the 1x128 activation blocks need it)
| nvfp4 (every linear) | nvfp4-moe (DeepSeek only: experts and o_proj NVFP4, the rest FP8 — the
nvidia/DeepSeek-R1-FP4 recipe). CPU is enough (plain-JAX references of the GEMMs).

  PYTHONPATH=. python3 experiments/quant_accuracy.py --out=benchmarks/deepseek_quant_accuracy.json
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from checkpoints.quantize import parse_rules, quantize_params
from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.loader import load_model
from jaxinfer.models import deepseek_v3 as ds
from jaxinfer.models import llama

_OUT = flags.DEFINE_string("out", "/tmp/quant_accuracy.json", "JSON results")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "tokens per window")
_WINDOWS = flags.DEFINE_integer("windows", 8, "windows per model")

DS_CFG = ds.DeepseekV3Config(
    vocab_size=128, hidden_size=256, num_layers=3, num_heads=4, q_lora_rank=256, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=512,
    moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1)

VARIANTS = {"fp8": "layers.*=fp8", "nvfp4": "layers.*=nvfp4",
            "nvfp4-moe": "layers.*.experts_*=nvfp4,layers.*.wo=nvfp4,layers.*=fp8"}


def corpus_text() -> str:
  import pydoc_data.topics as topics
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def windows(ids: np.ndarray, n: int, length: int) -> np.ndarray:
  usable = len(ids) // length
  pick = np.linspace(0, usable - 1, n).astype(int)
  return np.stack([ids[i * length:(i + 1) * length] for i in pick])


def evaluate(forward, params, cfg, cache_fn, seqs: np.ndarray) -> dict:
  """Per window: next-token NLL and all logits. Returns nll [N, L-1], argmax [N, L], logp."""
  L = seqs.shape[1]
  page = 16
  out_nll, out_top, out_logp = [], [], []
  for s in seqs:
    cache = cache_fn(cfg, num_pages=L // page + 1, page_size=page)
    batch = build_batch([SeqChunk(list(range(1, L // page + 1)), 0, L)], page, num_tokens=L,
                        num_seqs=1, pages_per_seq=L // page)
    logits, _ = forward(params, jnp.asarray(s, jnp.int32), cache, batch, cfg=cfg, all_logits=True)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    out_nll.append(-np.asarray(jnp.take_along_axis(logp[:-1], jnp.asarray(s[1:])[:, None], -1))[:, 0])
    out_top.append(np.asarray(jnp.argmax(logp, -1)))
    out_logp.append(np.asarray(logp))
  return {"nll": np.stack(out_nll), "top": np.stack(out_top), "logp": np.stack(out_logp)}


def compare(name: str, base: dict, runs: dict[str, dict], chosen: dict[str, int]) -> list[dict]:
  rows = []
  for variant, r in {"bf16": base, **runs}.items():
    p, q = np.exp(base["logp"]), r["logp"]
    kl = float(np.mean(np.sum(p * (base["logp"] - q), -1)))
    rows.append({"model": name, "variant": variant, "quantized_weights": chosen.get(variant, 0),
                 "perplexity": float(np.exp(r["nll"].mean())),
                 "top1_agreement_vs_bf16": float((r["top"] == base["top"]).mean()),
                 "kl_vs_bf16": kl})
  return rows


def run_model(name, params, cfg, forward, cache_fn, seqs, variants) -> list[dict]:
  base = evaluate(forward, params, cfg, cache_fn, seqs)
  runs, chosen = {}, {}
  for variant in variants:
    qp, ch = quantize_params(params, parse_rules(VARIANTS[variant]), skip_incompatible=True)
    runs[variant] = evaluate(forward, qp, cfg, cache_fn, seqs)
    chosen[variant] = len(ch)
  return compare(name, base, runs, chosen)


def main(_):
  start = time.time()
  text = corpus_text()
  rows = []
  model = load_model(None, dtype=jnp.bfloat16, progress=False)
  ids = np.asarray(model.tokenizer.encode(text) if hasattr(model.tokenizer, "encode")
                   else model.tokenizer.backend.encode(text).ids)
  seqs = windows(ids, _WINDOWS.value, _SEQ_LEN.value)
  cache_fn = lambda cfg, **kw: llama.create_cache(cfg, dtype=jnp.bfloat16, **kw)
  rows += run_model("SmolLM2-135M (default Llama)", model.params, model.config, llama.forward_jit,
                    cache_fn, seqs, ["fp8", "nvfp4"])
  del model
  params = ds.init_params(DS_CFG, jax.random.key(0), jnp.bfloat16)
  byte_ids = np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32) % 128
  seqs = windows(byte_ids, _WINDOWS.value, _SEQ_LEN.value)
  cache_fn = lambda cfg, **kw: ds.create_cache(cfg, dtype=jnp.bfloat16, **kw)
  rows += run_model("random DeepSeek-V3-shaped (3 layers)", params, DS_CFG, ds.forward_jit,
                    cache_fn, seqs, ["fp8", "nvfp4", "nvfp4-moe"])
  result = {"corpus": "CPython stdlib pydoc_data.topics (Python reference docs text)",
            "windows": _WINDOWS.value, "seq_len": _SEQ_LEN.value, "backend": jax.default_backend(),
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "seconds": round(time.time() - start, 1), "rows": rows}
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{'model':38s} {'variant':10s} {'#q':>4s} {'ppl':>9s} {'top1 agr':>9s} {'KL':>8s}")
  for r in rows:
    print(f"{r['model']:38s} {r['variant']:10s} {r['quantized_weights']:4d} {r['perplexity']:9.3f} "
          f"{r['top1_agreement_vs_bf16']:9.3f} {r['kl_vs_bf16']:8.4f}")


if __name__ == "__main__":
  app.run(main)
