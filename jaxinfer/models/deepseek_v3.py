"""DeepSeek-V3/R1: multi-head latent attention (MLA) and a DeepSeek MoE, as pure functions of
(params, tokens, cache, batch), over a paged cache of compressed latents.

For each layer l, with h the residual stream, H heads, R = kv_lora_rank:
    a = RMSNorm(h)
    q = RMSNorm(a Wq_a) Wq_b                 -> per head [q_nope (qk_nope), q_rope (qk_rope)]
    c, k_rope = split(a Wkv_a) ; c = RMSNorm(c)        c: [R] latent shared by all heads
    q_rope, k_rope = RoPE(q_rope), RoPE(k_rope)        YaRN frequencies, DeepSeek's interleaved layout
    cache slot <- [c, k_rope]                          one [R + qk_rope] row per token and layer
    k_nope, v = c Wkv_b (per head)
    h = h + softmax(scale * (q_nope.k_nope + q_rope.k_rope)) v Wo
    m = RMSNorm(h) ; h = h + FFN(m)         dense SwiGLU in the first ``first_k_dense_replace`` layers,
                                            else shared experts + routed experts (models/moe.py)

Two equal forms of the attention: the *prefill* form decompresses each sequence's cached latents into
per-head K/V (cheap per query when a step holds many tokens of few sequences); the *absorbed* form folds
W_UK into the query (q_latent = q_nope W_UK^T) and W_UV after the attention, so each step reads only the
latent cache (kernels/mla_attention.py) — the decode form.

Weights are stored [in, out]; Wkv_b is kept dense (bf16/f32) since both forms slice it per head. Expert
weights are stacked [E, in, out]. Any other weight may be a quantized type from kernels/quant (called
through ``ops.linear``). ``LAYER_AXES``/``PARAM_AXES`` name each weight's logical axes for sharding.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention
from jaxinfer.errors import UnsupportedModelError
from jaxinfer.kv_cache import is_fp8, write_kv
from jaxinfer.models import moe
from jaxinfer.ops import apply_rope, linear, rms_norm, rope_cos_sin
from kernels import flash_attention
from kernels.mla_attention import mla_paged_attention

Params = dict[str, Any]
# Routed-expert compute: (normed h [T, H], expert ids [T, k], routing weights [T, k] float32,
# {"w_gate", "w_up": [E, H, I], "w_down": [E, I, H]}) -> [T, H]. None: the local dropless dispatch.
ExpertsFn = Callable[[jax.Array, jax.Array, jax.Array, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """YaRN rope scaling as DeepSeek-V3 configures it (HF ``rope_scaling`` with type "yarn")."""
  factor: float
  original_max_position: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool = True


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  q_lora_rank: int | None
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  intermediate_size: int
  moe_intermediate_size: int
  n_routed_experts: int
  num_experts_per_tok: int
  n_shared_experts: int
  n_group: int
  topk_group: int
  routed_scaling_factor: float
  first_k_dense_replace: int
  norm_topk_prob: bool = True
  rope_theta: float = 10000.0
  rope_scaling: YarnScaling | None = None
  rope_interleave: bool = True
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096

  def __post_init__(self):
    if self.n_routed_experts % self.n_group:
      raise UnsupportedModelError(
          f"n_routed_experts ({self.n_routed_experts}) must be a multiple of n_group ({self.n_group})")
    if self.topk_group > self.n_group or self.num_experts_per_tok > self.n_routed_experts:
      raise UnsupportedModelError(f"topk_group {self.topk_group} / num_experts_per_tok "
                                  f"{self.num_experts_per_tok} exceed n_group / n_routed_experts")
    if self.qk_rope_head_dim % 2:
      raise UnsupportedModelError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def latent_dim(self) -> int:
    """Width of one cache slot: the compressed latent and the shared rope key."""
    return self.kv_lora_rank + self.qk_rope_head_dim

  @property
  def softmax_scale(self) -> float:
    scale = self.qk_head_dim ** -0.5
    if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
      m = yarn_get_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
      scale *= m * m
    return scale

  def is_moe_layer(self, layer: int) -> bool:
    return layer >= self.first_k_dense_replace

  @classmethod
  def from_hf(cls, hf: dict) -> DeepseekV3Config:
    """From a HF ``config.json`` dict of a DeepseekV3ForCausalLM (V3, R1, and their FP8/FP4 exports)."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if not ({"DeepseekV3ForCausalLM", "deepseek_v3"} & {*archs, hf.get("model_type")}):
      raise UnsupportedModelError(f"unsupported architecture {archs}; expected DeepseekV3ForCausalLM")
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
      raise UnsupportedModelError(f"unsupported routing scoring_func={hf.get('scoring_func')!r} "
                                  f"topk_method={hf.get('topk_method')!r} (expected sigmoid/noaux_tc)")
    if hf.get("attention_bias"):
      raise UnsupportedModelError("attention_bias=True is not supported")
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    scaling = None
    rope_type = (rs or {}).get("rope_type", (rs or {}).get("type"))
    if rope_type == "yarn":
      scaling = YarnScaling(
          factor=float(rs["factor"]),
          original_max_position=int(rs.get("original_max_position_embeddings")
                                    or hf["max_position_embeddings"]),
          beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
          mscale=rs.get("mscale"), mscale_all_dim=rs.get("mscale_all_dim"),
          attention_factor=rs.get("attention_factor"), truncate=bool(rs.get("truncate", True)))
    elif rope_type not in (None, "default"):
      raise UnsupportedModelError(f"unsupported rope scaling {rs}")
    theta = hf.get("rope_theta") or (rs or {}).get("rope_theta", 10000.0)
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf["moe_intermediate_size"], n_routed_experts=hf["n_routed_experts"],
        num_experts_per_tok=hf["num_experts_per_tok"], n_shared_experts=hf.get("n_shared_experts") or 0,
        n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        first_k_dense_replace=hf.get("first_k_dense_replace", 0),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)), rope_theta=float(theta),
        rope_scaling=scaling, rope_interleave=bool(hf.get("rope_interleave", True)),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 4096))


def rope_parameters(cfg: DeepseekV3Config) -> tuple[np.ndarray, float]:
  """(inv_freq [qk_rope/2] float32, attention factor multiplying cos/sin), as HF's YaRN computes them."""
  dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extrapolation = (1.0 / pos_freqs).astype(np.float32)
  ys = cfg.rope_scaling
  if ys is None:
    return extrapolation, 1.0
  interpolation = (1.0 / (ys.factor * pos_freqs)).astype(np.float32)

  def correction_dim(rotations):
    return (dim * math.log(ys.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(ys.beta_fast), correction_dim(ys.beta_slow)
  if ys.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_factor = 1 - ramp
  inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
  attention_factor = ys.attention_factor
  if attention_factor is None:
    if ys.mscale and ys.mscale_all_dim:
      attention_factor = yarn_get_mscale(ys.factor, ys.mscale) / yarn_get_mscale(ys.factor,
                                                                                 ys.mscale_all_dim)
    else:
      attention_factor = yarn_get_mscale(ys.factor)
  return inv_freq.astype(np.float32), float(attention_factor)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache:
  """Paged MLA cache: ``latent[l]`` is [num_pages, page_size, kv_lora_rank + qk_rope_head_dim].

  Slot layout and the null page as in kv_cache.KVCache; one float32 scale per layer for FP8 storage
  (stored = value / scale).
  """
  latent: tuple[jax.Array, ...]
  scale: jax.Array  # [num_layers] float32

  @property
  def num_layers(self) -> int:
    return len(self.latent)

  @property
  def num_pages(self) -> int:
    return self.latent[0].shape[0]

  @property
  def page_size(self) -> int:
    return self.latent[0].shape[1]

  @property
  def dtype(self) -> jnp.dtype:
    return self.latent[0].dtype

  def nbytes_per_token(self) -> int:
    return self.num_layers * self.latent[0].shape[2] * jnp.dtype(self.dtype).itemsize

  @classmethod
  def create(cls, *, num_layers: int, num_pages: int, page_size: int, latent_dim: int,
             dtype=jnp.bfloat16, scale: float = 1.0) -> LatentCache:
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
    return cls(latent=tuple(jnp.zeros((num_pages, page_size, latent_dim), dtype)
                            for _ in range(num_layers)),
               scale=jnp.full((num_layers,), scale, jnp.float32))


def create_cache(cfg: DeepseekV3Config, *, num_pages: int, page_size: int,
                 dtype=jnp.bfloat16) -> LatentCache:
  return LatentCache.create(num_layers=cfg.num_layers, num_pages=num_pages, page_size=page_size,
                            latent_dim=cfg.latent_dim, dtype=dtype)


# Logical axes of each weight, mapped to mesh axes by one rule table in sharding/.
ATTN_AXES = {
    "attn_norm": ("embed",), "mlp_norm": ("embed",),
    "wq": ("embed", "q_heads"),                     # only when q_lora_rank is None
    "wq_a": ("embed", "q_lora"), "q_a_norm": ("q_lora",), "wq_b": ("q_lora", "q_heads"),
    "wkv_a": ("embed", "kv_lora"), "kv_a_norm": ("kv_lora",), "wkv_b": ("kv_lora", "q_heads"),
    "wo": ("q_heads", "embed"),
}
DENSE_MLP_AXES = {"w_gate": ("embed", "mlp"), "w_up": ("embed", "mlp"), "w_down": ("mlp", "embed")}
MOE_AXES = {
    "router": ("embed", None), "router_bias": (None,),
    "experts_gate": ("experts", "embed", "mlp"), "experts_up": ("experts", "embed", "mlp"),
    "experts_down": ("experts", "mlp", "embed"),
    "shared_gate": ("embed", "mlp"), "shared_up": ("embed", "mlp"), "shared_down": ("mlp", "embed"),
}
LAYER_AXES = {**ATTN_AXES, **DENSE_MLP_AXES, **MOE_AXES}
PARAM_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}


def layer_shapes(cfg: DeepseekV3Config, i: int) -> dict[str, tuple[int, ...]]:
  H, nH, R = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank
  s: dict[str, tuple[int, ...]] = {"attn_norm": (H,)}
  if cfg.q_lora_rank:
    s.update(wq_a=(H, cfg.q_lora_rank), q_a_norm=(cfg.q_lora_rank,),
             wq_b=(cfg.q_lora_rank, nH * cfg.qk_head_dim))
  else:
    s["wq"] = (H, nH * cfg.qk_head_dim)
  s.update(wkv_a=(H, R + cfg.qk_rope_head_dim), kv_a_norm=(R,),
           wkv_b=(R, nH * (cfg.qk_nope_head_dim + cfg.v_head_dim)), wo=(nH * cfg.v_head_dim, H),
           mlp_norm=(H,))
  if cfg.is_moe_layer(i):
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    s.update(router=(H, E), router_bias=(E,), experts_gate=(E, H, I), experts_up=(E, H, I),
             experts_down=(E, I, H))
    if cfg.n_shared_experts:
      Is = I * cfg.n_shared_experts
      s.update(shared_gate=(H, Is), shared_up=(H, Is), shared_down=(Is, H))
  else:
    I = cfg.intermediate_size
    s.update(w_gate=(H, I), w_up=(H, I), w_down=(I, H))
  return s


def param_shapes(cfg: DeepseekV3Config) -> Params:
  """Shapes of every weight: the checkpoint importers validate against these."""
  shapes: Params = {"embed": (cfg.vocab_size, cfg.hidden_size),
                    "layers": [layer_shapes(cfg, i) for i in range(cfg.num_layers)],
                    "final_norm": (cfg.hidden_size,)}
  if not cfg.tie_word_embeddings:
    shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
  return shapes


FLOAT32_PARAMS = ("router", "router_bias")  # routing is computed in float32, as the reference does


def init_params(cfg: DeepseekV3Config, key: jax.Array, dtype=jnp.bfloat16) -> Params:
  """Random weights (N(0, 0.02), norms near 1, small router bias) for tests and benchmarks."""
  shapes = param_shapes(cfg)
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes,
                                                        is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(key, len(paths))
  out = []
  for k, (path, s) in zip(keys, paths):
    name = path[-1].key
    if name.endswith("norm"):
      w = 1.0 + 0.1 * jax.random.normal(k, s)
    elif name == "router_bias":
      w = 0.05 * jax.random.normal(k, s)
    else:
      w = 0.02 * jax.random.normal(k, s)
    out.append(w.astype(jnp.float32 if name in FLOAT32_PARAMS else dtype))
  return jax.tree.unflatten(treedef, out)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
  """x [T, heads, D]. DeepSeek's interleaved pairs (x0, x1), (x2, x3)... are first laid out as
  [evens, odds], after which it is rotate-half RoPE (as HF does); q and k share the layout."""
  if interleave:
    x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
  return apply_rope(x, cos, sin)


def _queries(layer: Params, h: jax.Array, cfg: DeepseekV3Config) -> jax.Array:
  if cfg.q_lora_rank:
    q = linear(rms_norm(linear(h, layer["wq_a"]), layer["q_a_norm"], cfg.rms_norm_eps), layer["wq_b"])
  else:
    q = linear(h, layer["wq"])
  return q.reshape(h.shape[0], cfg.num_heads, cfg.qk_head_dim)


def _dequant_latent(pages: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  if is_fp8(pages.dtype):
    return (pages.astype(jnp.float32) * scale).astype(dtype)
  return pages.astype(dtype)


def mla_prefill_attention(q_nope: jax.Array, q_rope: jax.Array, latent_pages: jax.Array,
                          latent_scale: jax.Array, wkv_b: jax.Array, batch: attention.AttentionBatch,
                          cfg: DeepseekV3Config) -> jax.Array:
  """Decompressed form: each sequence's cached latents -> per-head K/V, then flash attention with the
  shared rope key as a separate score term (kernels/flash_attention's MLA mode; its plain-JAX reference
  off GPU). q_nope [T, H, nope], q_rope [T, H, rope] -> [T, H, v_head_dim]."""
  B, P = batch.page_table.shape
  R, nH = cfg.kv_lora_rank, cfg.num_heads
  lat = _dequant_latent(latent_pages[batch.page_table], latent_scale, q_nope.dtype)
  lat = lat.reshape(B, -1, lat.shape[-1])                                     # [B, S, R + rope]
  kv = jnp.einsum("bsr,rhd->bshd", lat[..., :R], wkv_b.reshape(R, nH, -1).astype(q_nope.dtype),
                  preferred_element_type=jnp.float32).astype(q_nope.dtype)    # [B, S, H, nope+v]
  k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
  k_rope = lat[..., None, R:]                                                 # [B, S, 1, rope]
  if jax.default_backend() == "gpu":
    return flash_attention.flash_prefill(q_nope, k_nope, v, batch.query_start, batch.seq_lens,
                                         scale=cfg.softmax_scale, q_rope=q_rope, k_rope=k_rope)
  return flash_attention.reference_prefill(q_nope, k_nope, v, batch.query_start, batch.seq_lens,
                                           scale=cfg.softmax_scale, q_rope=q_rope,
                                           k_rope=k_rope).astype(q_nope.dtype)


def mla_absorbed_attention(q_nope: jax.Array, q_rope: jax.Array, latent_pages: jax.Array,
                           latent_scale: jax.Array, wkv_b: jax.Array, batch: attention.AttentionBatch,
                           cfg: DeepseekV3Config, max_new_tokens: int | None = None) -> jax.Array:
  """Absorbed form: q_latent = q_nope W_UK^T, attention over the latent cache, then W_UV.
  ``max_new_tokens``: see kernels/mla_attention.mla_paged_attention (1: a decode-only step)."""
  R, nH, nope = cfg.kv_lora_rank, cfg.num_heads, cfg.qk_nope_head_dim
  w = wkv_b.reshape(R, nH, -1)
  w_uk, w_uv = w[..., :nope], w[..., nope:]
  q_latent = jnp.einsum("thn,rhn->thr", q_nope, w_uk.astype(q_nope.dtype),
                        preferred_element_type=jnp.float32).astype(q_nope.dtype)
  o_latent = mla_paged_attention(q_latent, q_rope, latent_pages, batch, scale=cfg.softmax_scale,
                                 latent_scale=latent_scale, max_new_tokens=max_new_tokens)
  return jnp.einsum("thr,rhv->thv", o_latent, w_uv.astype(o_latent.dtype),
                    preferred_element_type=jnp.float32).astype(q_nope.dtype)


def choose_mla_form(num_tokens: int, num_seqs: int) -> str:
  """Prefill form when a step holds many tokens per sequence: decompressing a sequence's latents costs
  about as much as absorbing ~160 queries (R * (nope + v) vs per-query (R - nope - v + rope) work)."""
  return "prefill" if num_tokens >= 128 * num_seqs else "absorbed"


def rope_tables(cfg: DeepseekV3Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) of the step's token positions with YaRN's attention factor folded in, as
  ``attention_block`` takes them."""
  inv_freq, attention_factor = rope_parameters(cfg)
  cos, sin = rope_cos_sin(positions, jnp.asarray(inv_freq))
  return cos * attention_factor, sin * attention_factor


def attention_block(layer: Params, x, cos, sin, latent_pages, latent_scale,
                    batch: attention.AttentionBatch, cfg: DeepseekV3Config, form: str,
                    max_new_tokens: int | None = None):
  """One layer's MLA with its residual: x [T, H] -> (x + MLA(RMSNorm(x)) Wo, latent_pages with this
  step's [latent, rope key] rows written at ``batch.slots``). ``form``: "prefill" | "absorbed"
  (``choose_mla_form``). A building block: ``forward`` chains it with ``ffn_block`` per layer, and
  sharding/ runs the same blocks per pipeline stage or per attention-data-parallel rank.
  ``max_new_tokens``: a bound on every sequence's new tokens the caller guarantees (1 for a
  decode-only step): the absorbed form then picks its decode kernel statically, without a
  runtime cond (kernels/mla_attention.mla_paged_attention)."""
  T, R = x.shape[0], cfg.kv_lora_rank
  h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
  q = _queries(layer, h, cfg)
  q_nope, q_rope = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
  kv = linear(h, layer["wkv_a"])
  c = rms_norm(kv[:, :R], layer["kv_a_norm"], cfg.rms_norm_eps)
  q_rope = _rope(q_rope, cos, sin, cfg.rope_interleave)
  k_rope = _rope(kv[:, None, R:], cos, sin, cfg.rope_interleave)[:, 0]
  latent_pages = write_kv(latent_pages, jnp.concatenate([c, k_rope], axis=-1), batch.slots,
                          latent_scale)
  if form == "prefill":
    o = mla_prefill_attention(q_nope, q_rope, latent_pages, latent_scale, layer["wkv_b"], batch,
                              cfg)
  else:
    o = mla_absorbed_attention(q_nope, q_rope, latent_pages, latent_scale, layer["wkv_b"], batch,
                               cfg, max_new_tokens)
  return x + linear(o.reshape(T, -1), layer["wo"]), latent_pages


def swiglu(h, w_gate, w_up, w_down):
  """(SiLU(h Wgate) * h Wup) Wdown: the dense MLP and the shared experts."""
  return linear(jax.nn.silu(linear(h, w_gate)) * linear(h, w_up), w_down)


def moe_ffn(layer: Params, h: jax.Array, cfg: DeepseekV3Config, impl: str = "dispatch",
            experts_fn: ExpertsFn | None = None) -> jax.Array:
  """Routed experts (+ shared experts) on normed h [T, H]. impl: dispatch | dense_reference.
  ``experts_fn`` replaces the routed experts' compute (sharding.moe moves tokens between devices)."""
  weights, idx = moe.route(h, layer["router"], layer["router_bias"], top_k=cfg.num_experts_per_tok,
                           n_group=cfg.n_group, topk_group=cfg.topk_group,
                           norm_topk_prob=cfg.norm_topk_prob,
                           routed_scaling_factor=cfg.routed_scaling_factor)
  if experts_fn is not None:
    y = experts_fn(h, idx, weights, {"w_gate": layer["experts_gate"], "w_up": layer["experts_up"],
                                     "w_down": layer["experts_down"]}).astype(h.dtype)
  elif impl == "dispatch":
    y = moe.dispatch_moe(h, weights, idx, layer["experts_gate"], layer["experts_up"],
                         layer["experts_down"], cfg.n_routed_experts)
  elif impl == "dense_reference":
    y = moe.dense_moe_reference(h, weights, idx, layer["experts_gate"], layer["experts_up"],
                                layer["experts_down"])
  else:
    raise ValueError(f"unknown MoE impl {impl!r}")
  if cfg.n_shared_experts:
    y = y + swiglu(h, layer["shared_gate"], layer["shared_up"], layer["shared_down"])
  return y


def ffn_block(layer: Params, x, cfg: DeepseekV3Config, moe_impl: str = "dispatch",
              experts_fn: ExpertsFn | None = None):
  """One layer's FFN with its residual: x + FFN(RMSNorm(x)), a dense SwiGLU or ``moe_ffn``
  (a building block, see ``attention_block``)."""
  h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
  if "router" in layer:
    return x + moe_ffn(layer, h, cfg, moe_impl, experts_fn)
  return x + swiglu(h, layer["w_gate"], layer["w_up"], layer["w_down"])


def forward(params: Params, tokens: jax.Array, cache: LatentCache, batch: attention.AttentionBatch,
            cfg: DeepseekV3Config, all_logits: bool = False, mla_form: str = "auto",
            moe_impl: str = "dispatch", experts_fn: ExpertsFn | None = None,
            max_new_tokens: int | None = None) -> tuple[jax.Array, LatentCache]:
  """One step over flattened tokens [T]. Returns float32 logits — [B, V] at ``batch.logit_indices``,
  or [T, V] for every token when ``all_logits`` — and the updated cache.

  ``mla_form``: auto | prefill | absorbed (both exact; auto picks by tokens per sequence).
  ``moe_impl``: dispatch | dense_reference (tests only). ``experts_fn``: see ``ExpertsFn``.
  ``max_new_tokens``: a bound on every sequence's new tokens that the caller guarantees (1 for a
  decode-only step: no runtime cond in the MLA kernel choice, see ``attention_block``)."""
  if mla_form == "auto":
    mla_form = choose_mla_form(batch.num_tokens, batch.num_seqs)
  if mla_form not in ("prefill", "absorbed"):
    raise ValueError(f"unknown mla_form {mla_form!r}")
  x = params["embed"][tokens]
  cos, sin = rope_tables(cfg, batch.positions)
  new_latent = []
  for i, layer in enumerate(params["layers"]):
    x, pages = attention_block(layer, x, cos, sin, cache.latent[i], cache.scale[i], batch, cfg,
                               mla_form, max_new_tokens)
    x = ffn_block(layer, x, cfg, moe_impl, experts_fn)
    new_latent.append(pages)
  if not all_logits:
    x = x[batch.logit_indices]
  return lm_logits(params, x, cfg), dataclasses.replace(cache, latent=tuple(new_latent))


def lm_logits(params: Params, x, cfg: DeepseekV3Config) -> jax.Array:
  """Final RMSNorm and LM head on residual rows x [..., H] -> float32 logits [..., V]."""
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  return linear(x, lm_head).astype(jnp.float32)


forward_jit = jax.jit(forward, static_argnames=("cfg", "all_logits", "mla_form", "moe_impl",
                                                "max_new_tokens"),
                      donate_argnames=("cache",))


def num_params(cfg: DeepseekV3Config) -> int:
  return sum(int(np.prod(s)) for s in jax.tree.leaves(
      param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple)))
