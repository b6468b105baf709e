"""umT5 text encoder (the encoder half of UMT5, as Wan uses for prompts), pure functions.

Per layer (pre-norm, T5 RMSNorm without mean subtraction, no biases, no 1/√d score scaling):
    h = h + Attn(RMS(h) Wq, RMS(h) Wk, RMS(h) Wv; bias = relbias_l[bucket(j - i)], padding masked) Wo
    h = h + (GELU_tanh(RMS(h) Wi0) ⊙ RMS(h) Wi1) Wo
out = RMS(h). Unlike T5, every umT5 layer has its own relative-position bias table.
Weights are stored [in, out]; matches transformers' ``UMT5EncoderModel`` (tests/test_wan_umt5.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ShapeError
from jaxinfer.ops import linear

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  vocab_size: int = 256384
  d_model: int = 4096
  d_kv: int = 64
  num_heads: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6

  @classmethod
  def from_hf(cls, hf: dict) -> UMT5Config:
    return cls(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"],
               num_heads=hf["num_heads"], d_ff=hf["d_ff"], num_layers=hf["num_layers"],
               num_buckets=hf["relative_attention_num_buckets"],
               max_distance=hf["relative_attention_max_distance"],
               eps=hf.get("layer_norm_epsilon", 1e-6))


def param_shapes(cfg: UMT5Config) -> Params:
  inner = cfg.num_heads * cfg.d_kv
  layer = {"attn_norm": (cfg.d_model,), "wq": (cfg.d_model, inner), "wk": (cfg.d_model, inner),
           "wv": (cfg.d_model, inner), "wo": (inner, cfg.d_model),
           "rel_bias": (cfg.num_buckets, cfg.num_heads), "ffn_norm": (cfg.d_model,),
           "wi0": (cfg.d_model, cfg.d_ff), "wi1": (cfg.d_model, cfg.d_ff), "wff_o": (cfg.d_ff, cfg.d_model)}
  return {"embed": (cfg.vocab_size, cfg.d_model), "layers": [dict(layer) for _ in range(cfg.num_layers)],
          "final_norm": (cfg.d_model,)}


def init_params(cfg: UMT5Config, key: jax.Array, dtype=jnp.bfloat16) -> Params:
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  out = [jnp.ones(s, dtype) if len(s) == 1 else
         jnp.asarray(rng.standard_normal(s, np.float32) / math.sqrt(s[0] if s[0] != cfg.vocab_size else 1),
                     dtype) for s in leaves]
  return jax.tree.unflatten(treedef, out)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets [q_len, k_len] of (key position - query position)."""
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  log_ratio = np.log(np.maximum(rel, 1).astype(np.float32) / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


def _t5_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  out = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (out * w.astype(jnp.float32)).astype(x.dtype)


def encode(params: Params, input_ids: jax.Array, attention_mask: jax.Array, cfg: UMT5Config) -> jax.Array:
  """input_ids, attention_mask [B, L] -> last hidden state [B, L, d_model] (float32)."""
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ShapeError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be "
                     "equal [B, L]")
  B, L = input_ids.shape
  N, Dk = cfg.num_heads, cfg.d_kv
  x = params["embed"][input_ids]
  buckets = jnp.asarray(relative_position_buckets(L, L, cfg.num_buckets, cfg.max_distance))
  neg = jnp.finfo(jnp.float32).min
  key_mask = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg)            # [B, 1, 1, L]
  for p in params["layers"]:
    h = _t5_norm(x, p["attn_norm"], cfg.eps)
    q = linear(h, p["wq"]).reshape(B, L, N, Dk)
    k = linear(h, p["wk"]).reshape(B, L, N, Dk)
    v = linear(h, p["wv"]).reshape(B, L, N, Dk)
    bias = p["rel_bias"].astype(jnp.float32)[buckets].transpose(2, 0, 1)[None]     # [1, N, L, L]
    s = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) + bias + key_mask
    o = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)
    x = x + linear(o.reshape(B, L, N * Dk), p["wo"])
    h = _t5_norm(x, p["ffn_norm"], cfg.eps)
    ff = jax.nn.gelu(linear(h, p["wi0"]), approximate=True) * linear(h, p["wi1"])
    x = x + linear(ff, p["wff_o"])
  return _t5_norm(x, params["final_norm"], cfg.eps).astype(jnp.float32)


def encode_prompts(params: Params, input_ids: jax.Array, attention_mask: jax.Array,
                   cfg: UMT5Config) -> jax.Array:
  """Wan's prompt embeddings: the encoder output with every padding position set to zero."""
  out = encode(params, input_ids, attention_mask, cfg)
  return out * (attention_mask[..., None] > 0)
