"""Llama (GQA/MQA) as pure functions of (params, tokens, cache, batch).

For each layer l, with h the residual stream:
    a = RMSNorm(h) ;  q, k, v = a Wq, a Wk, a Wv ;  q, k = RoPE(q), RoPE(k)
    h = h + Attention(q, K_cache ∪ k, V_cache ∪ v) Wo
    m = RMSNorm(h) ;  h = h + (SiLU(m Wgate) ⊙ m Wup) Wdown
logits = RMSNorm(h) Wlm (Wlm = Embedᵀ when tied).

Layers are separate arrays looped over in Python inside one jit: a ``lax.scan`` over stacked weights
made XLA copy each layer's slice every step (see BASELINES.md), which this layout avoids by construction.
Weights are stored [in, out]. ``PARAM_AXES`` names each weight's logical axes for sharding rules.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention
from jaxinfer.errors import UnsupportedModelError
from jaxinfer.kv_cache import KVCache, write_kv
from jaxinfer.ops import apply_rope, linear, rms_norm, rope_cos_sin, rope_inv_freq

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """llama3-style frequency-dependent RoPE scaling."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  rope_scaling: RopeScaling | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise UnsupportedModelError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

  @classmethod
  def from_hf(cls, hf: dict) -> LlamaConfig:
    """From a HF ``config.json`` dict of a LlamaForCausalLM."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if not ({"LlamaForCausalLM", "llama"} & {*archs, hf.get("model_type")}):
      raise UnsupportedModelError(f"unsupported architecture {archs}; expected LlamaForCausalLM")
    scaling = None
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
      scaling = RopeScaling(rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                            rs["original_max_position_embeddings"])
    elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
      raise UnsupportedModelError(f"unsupported rope scaling {rs}")
    theta = hf.get("rope_theta") or (rs or {}).get("rope_theta", 10000.0)
    heads = hf["num_attention_heads"]
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"], rope_theta=float(theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 4096), rope_scaling=scaling)


# Logical axes of each weight, mapped to mesh axes by one rule table in sharding/.
LAYER_AXES = {
    "attn_norm": ("embed",), "mlp_norm": ("embed",),
    "wq": ("embed", "q_heads"), "wk": ("embed", "kv_heads"), "wv": ("embed", "kv_heads"),
    "wo": ("q_heads", "embed"),
    "w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed"),
}
PARAM_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}


def param_shapes(cfg: LlamaConfig) -> Params:
  """Shapes of every weight: the checkpoint importers validate against these."""
  H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  layer = {"attn_norm": (H,), "wq": (H, cfg.num_heads * D), "wk": (H, cfg.num_kv_heads * D),
           "wv": (H, cfg.num_kv_heads * D), "wo": (cfg.num_heads * D, H), "mlp_norm": (H,),
           "w_gate": (H, I), "w_up": (H, I), "w_down": (I, H)}
  shapes = {"embed": (cfg.vocab_size, H), "layers": [dict(layer) for _ in range(cfg.num_layers)],
            "final_norm": (H,)}
  if not cfg.tie_word_embeddings:
    shapes["lm_head"] = (H, cfg.vocab_size)
  return shapes


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.bfloat16) -> Params:
  """Random weights (N(0, 0.02); norms at 1) for tests and benchmarks."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(key, len(leaves))
  out = [jnp.ones(s, dtype) if len(s) == 1 else (0.02 * jax.random.normal(k, s)).astype(dtype)
         for k, s in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def create_cache(cfg: LlamaConfig, *, num_pages: int, page_size: int, dtype=jnp.bfloat16) -> KVCache:
  return KVCache.create(num_layers=cfg.num_layers, num_pages=num_pages, page_size=page_size,
                        kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype)


def attention_block(layer: Params, x, cos, sin, k_pages, v_pages, k_scale, v_scale,
                    batch: attention.AttentionBatch, cfg: LlamaConfig):
  """One layer's attention with its residual: x [T, H] -> (x + Attention(RMSNorm(x)) Wo, k_pages,
  v_pages with this step's K/V written at ``batch.slots``). ``cos, sin`` come from ``rope_cos_sin``
  of ``batch.positions``. A building block: ``forward`` chains it with ``mlp_block`` per layer, and
  sharding/ runs the same blocks per pipeline stage or per attention-data-parallel rank."""
  T = x.shape[0]
  h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
  q = linear(h, layer["wq"]).reshape(T, cfg.num_heads, cfg.head_dim)
  k = linear(h, layer["wk"]).reshape(T, cfg.num_kv_heads, cfg.head_dim)
  v = linear(h, layer["wv"]).reshape(T, cfg.num_kv_heads, cfg.head_dim)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  k_pages = write_kv(k_pages, k, batch.slots, k_scale)
  v_pages = write_kv(v_pages, v, batch.slots, v_scale)
  o = attention.paged_attention(q, k_pages, v_pages, batch, scale=cfg.head_dim ** -0.5,
                                k_scale=k_scale, v_scale=v_scale)
  return x + linear(o.reshape(T, -1), layer["wo"]), k_pages, v_pages


def mlp(layer: Params, h):
  """The SwiGLU on normed activations h [T, H] (no residual): (SiLU(h Wgate) * h Wup) Wdown."""
  return linear(jax.nn.silu(linear(h, layer["w_gate"])) * linear(h, layer["w_up"]), layer["w_down"])


def mlp_block(layer: Params, x, cfg: LlamaConfig):
  """One layer's MLP with its residual: x [T, H] -> x + mlp(RMSNorm(x)) (a building block)."""
  return x + mlp(layer, rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps))


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) of the step's token positions, as ``attention_block`` takes them."""
  return rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))


def forward(params: Params, tokens: jax.Array, cache: KVCache, batch: attention.AttentionBatch,
            cfg: LlamaConfig, all_logits: bool = False) -> tuple[jax.Array, KVCache]:
  """One step over flattened tokens [T]. Returns float32 logits — [B, V] at ``batch.logit_indices``,
  or [T, V] for every token when ``all_logits`` — and the updated cache."""
  x = params["embed"][tokens]
  cos, sin = rope_tables(cfg, batch.positions)
  new_k, new_v = [], []
  for i, layer in enumerate(params["layers"]):
    x, k_pages, v_pages = attention_block(layer, x, cos, sin, cache.k[i], cache.v[i],
                                          cache.k_scale[i], cache.v_scale[i], batch, cfg)
    x = mlp_block(layer, x, cfg)
    new_k.append(k_pages)
    new_v.append(v_pages)
  if not all_logits:
    x = x[batch.logit_indices]
  return lm_logits(params, x, cfg), dataclasses.replace(cache, k=tuple(new_k), v=tuple(new_v))


def lm_logits(params: Params, x, cfg: LlamaConfig) -> jax.Array:
  """Final RMSNorm and LM head on residual rows x [..., H] -> float32 logits [..., V]."""
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  return linear(x, lm_head, out_dtype=jnp.float32)


forward_jit = jax.jit(forward, static_argnames=("cfg", "all_logits"), donate_argnames=("cache",))


def num_params(cfg: LlamaConfig) -> int:
  return sum(int(np.prod(s)) for s in jax.tree.leaves(
      param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple)))
