"""Llama (GQA/MQA) as pure functions of (params, tokens, cache, batch).

For each layer l, with h the residual stream:
    a = RMSNorm(h) ;  q, k, v = a Wq, a Wk, a Wv ;  q, k = RoPE(q), RoPE(k)
    h = h + Attention(q, K_cache ∪ k, V_cache ∪ v) Wo
    m = RMSNorm(h) ;  h = h + (SiLU(m Wgate) ⊙ m Wup) Wdown
logits = RMSNorm(h) Wlm (Wlm = Embedᵀ when tied).

Layers are separate arrays looped over in Python inside one jit: a ``lax.scan`` over stacked weights
made XLA copy each layer's slice every step (see BASELINES.md), which this layout avoids by construction.
Weights are stored [in, out]. ``PARAM_AXES`` names each weight's logical axes for sharding rules.

Checkpoints and sharding use one weight per projection. ``fuse_projections`` is a load-time transform
for a single device: the projections that share an input become one GEMM each, ``wqkv`` = [Wq|Wk|Wv]
and ``w_gate_up`` = [Wgate|Wup] (fewer kernels per step, and a 1-token decode step has no small-N dot
for XLA to strength-reduce into a multiply+reduce). ``forward`` takes either layout.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import attention as attention_ops
from jaxinfer.errors import UnsupportedModelError
from jaxinfer.kv_cache import KVCache, is_fp8, write_kv
from jaxinfer.ops import (FP8Rows, FP8Weight, RowSplitWeight, ScaledRows, add_rms_norm,
                          add_rms_norm_fp8, apply_rope, linear, linear_deferred, rms_norm,
                          rope_cos_sin, rope_inv_freq)

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
    # Fused layout (``fuse_projections``): concatenated outputs do not split along one mesh axis the
    # way q/k/v heads or mlp columns do, so a fused weight that reaches the sharding rules stays whole.
    "wqkv": ("embed", None), "w_gate_up": ("embed", None),
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
                    batch: attention_ops.AttentionBatch, cfg: LlamaConfig):
  """One layer's attention with its residual: x [T, H] -> (x + Attention(RMSNorm(x)) Wo, k_pages,
  v_pages with this step's K/V written at ``batch.slots``). ``cos, sin`` come from ``rope_cos_sin``
  of ``batch.positions``. A building block: ``forward`` chains it with ``mlp_block`` per layer, and
  sharding/ runs the same blocks per pipeline stage or per attention-data-parallel rank."""
  o, k_pages, v_pages = self_attention(layer, rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps),
                                       cos, sin, k_pages, v_pages, k_scale, v_scale, batch, cfg)
  return x + o, k_pages, v_pages


def self_attention(layer: Params, h, cos, sin, k_pages, v_pages, k_scale, v_scale,
                   batch: attention_ops.AttentionBatch, cfg: LlamaConfig,
                   max_new_tokens: int | None = None, defer_output_scale: bool = False,
                   fused_rope_kv: bool = False, fp8_act_quant: bool = False,
                   static_prefill: bool = False):
  """Attention on normed activations h [T, H] (no residual): (Attention(q, k, v) Wo, k_pages,
  v_pages with this step's K/V written). ``max_new_tokens``: see ``attention.paged_attention``.
  ``defer_output_scale``: an FP8 Wo returns its unscaled product (``ops.ScaledRows``) for the
  residual norm to finish. ``fused_rope_kv``: with a fused ``wqkv``, RoPE and the K/V cache write
  as one kernel (``kernels.rope_kv_write``; Pallas interpret mode off GPU) where it takes the
  shapes, instead of XLA's RoPE fusion and two scatters: the same values. ``fp8_act_quant``: an FP8
  Wo's input quantized by one kernel (``kernels.fp8_act_quant.quantize_rows``; interpret mode off
  GPU) instead of XLA's amax reduction and cast: the same values. ``static_prefill``: see
  ``attention.paged_attention``."""
  T = h.shape[0]
  q = None
  dtype = h.dtype
  if fused_rope_kv and "wqkv" in layer:
    from kernels import rope_kv_write as rkw   # kernels import jaxinfer
    qkv = linear_deferred(h, layer["wqkv"])      # an FP8 product is scaled in the kernel
    raw, rs, cs = ((qkv.raw, qkv.row_scale, qkv.col_scale) if isinstance(qkv, ScaledRows)
                   else (qkv, None, None))
    # Over an FP8 cache the attention kernels take f16 queries: emit them so (no convert
    # kernel); the attention output is then f16 too, and the FP8 wo quantizes it as it is.
    f16_q = (is_fp8(k_pages.dtype) and fp8_act_quant and isinstance(layer["wo"], FP8Weight)
             and dtype == jnp.bfloat16)
    if rkw.supports(raw, k_pages, cfg.num_heads, cfg.num_kv_heads):
      q, k_pages, v_pages = rkw.rope_kv_write(
          raw, cos, sin, batch.slots, k_pages, v_pages, k_scale, v_scale,
          num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, row_scale=rs, col_scale=cs,
          q_dtype=jnp.float16 if f16_q else None, interpret=jax.default_backend() != "gpu")
  if q is None:
    q, k, v = qkv_projections(layer, h, cfg)
    q = q.reshape(T, cfg.num_heads, cfg.head_dim)
    k = k.reshape(T, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(T, cfg.num_kv_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_pages = write_kv(k_pages, k, batch.slots, k_scale)
    v_pages = write_kv(v_pages, v, batch.slots, v_scale)
  o = attention_ops.paged_attention(q, k_pages, v_pages, batch, scale=cfg.head_dim ** -0.5,
                                    k_scale=k_scale, v_scale=v_scale,
                                    max_new_tokens=max_new_tokens,
                                    static_prefill=static_prefill)
  proj = linear_deferred if defer_output_scale else linear
  o = o.reshape(T, -1)
  if fp8_act_quant and isinstance(layer["wo"], FP8Weight):
    from kernels import fp8_act_quant as aq   # kernels import jaxinfer
    if aq.supports(o, glu=False):
      o = FP8Rows(*aq.quantize_rows(o, interpret=jax.default_backend() != "gpu"), dtype)
  if not isinstance(o, FP8Rows):
    o = o.astype(dtype)
  return proj(o, layer["wo"]), k_pages, v_pages


def qkv_projections(layer: Params, h, cfg: LlamaConfig):
  """h [T, H] -> (q [T, Hq*D], k [T, Hkv*D], v [T, Hkv*D]), from ``wqkv`` or wq / wk / wv."""
  if "wqkv" not in layer:
    return linear(h, layer["wq"]), linear(h, layer["wk"]), linear(h, layer["wv"])
  nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  qkv = linear(h, layer["wqkv"])
  return qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]


def mlp(layer: Params, h, defer_output_scale: bool = False, fp8_act_quant: bool = False):
  """The SwiGLU on normed activations h [T, H] (no residual): (SiLU(h Wgate) * h Wup) Wdown.
  ``defer_output_scale``: as in ``self_attention``, for an FP8 Wdown. ``fp8_act_quant``: with FP8
  w_gate_up and w_down, the scaling of the w_gate_up product, the SwiGLU and w_down's input
  quantization as one kernel (``kernels.fp8_act_quant.silu_mul_quantize``; interpret mode off GPU;
  silu in float32, rounded once)."""
  proj = linear_deferred if defer_output_scale else linear
  if (fp8_act_quant and isinstance(layer.get("w_gate_up"), FP8Weight)
      and isinstance(layer["w_down"], FP8Weight) and len(h.shape) == 2):
    from kernels import fp8_act_quant as aq   # kernels import jaxinfer
    gu = layer["w_gate_up"].linear_deferred(h)
    if aq.supports(gu.raw, glu=True):
      q, sx = aq.silu_mul_quantize(gu.raw, gu.row_scale, gu.col_scale,
                                   interpret=jax.default_backend() != "gpu")
      return proj(FP8Rows(q, sx, gu.dtype), layer["w_down"])
  if "w_gate_up" in layer:
    gate_up = linear(h, layer["w_gate_up"])
    gate, up = jnp.split(gate_up, 2, axis=-1)
  else:
    gate, up = linear(h, layer["w_gate"]), linear(h, layer["w_up"])
  return proj(jax.nn.silu(gate) * up, layer["w_down"])


def mlp_block(layer: Params, x, cfg: LlamaConfig):
  """One layer's MLP with its residual: x [T, H] -> x + mlp(RMSNorm(x)) (a building block)."""
  return x + mlp(layer, rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps))


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) of the step's token positions, as ``attention_block`` takes them."""
  return rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))


def _takes_fp8_rows(layer: Params, names: tuple[str, ...]) -> bool:
  """Whether the projections fed by one norm (``names``, those present) are all FP8 weights."""
  ws = [layer[n] for n in names if n in layer]
  return bool(ws) and all(isinstance(w, FP8Weight) for w in ws)


def forward(params: Params, tokens: jax.Array, cache: KVCache, batch: attention_ops.AttentionBatch,
            cfg: LlamaConfig, all_logits: bool = False, fused_add_norm: bool = False,
            max_new_tokens: int | None = None, fp8_quant_in_norm: bool = False,
            fp8_scale_in_norm: bool = False, fused_rope_kv: bool = False,
            fp8_act_quant: bool = False, static_prefill: bool = False
            ) -> tuple[jax.Array, KVCache]:
  """One step over flattened tokens [T]. Returns float32 logits — [B, V] at ``batch.logit_indices``,
  or [T, V] for every token when ``all_logits`` — and the updated cache. Each residual add runs
  with the RMSNorm after it (``ops.add_rms_norm``; one Pallas kernel on GPU when
  ``fused_add_norm``). ``max_new_tokens``: a bound on every sequence's new tokens this step that
  the caller guarantees (1 for a decode-only step): attention then needs no runtime branch.
  ``fp8_quant_in_norm``: where the projections after a residual norm are FP8 weights
  (``quantize_projections_fp8``), the norm hands them rows already quantized
  (``ops.add_rms_norm_fp8``; with ``fused_add_norm`` on GPU one kernel instead of three).
  ``fp8_scale_in_norm``: FP8 wo / w_down leave their output scaling to the residual norm after them
  (``ops.ScaledRows``; the fused kernel applies it). The same math as without them; on GPU the
  Pallas kernel's reductions round like the fused add_rms_norm's, not XLA's. ``fused_rope_kv``:
  see ``self_attention`` (fused projections only). ``fp8_act_quant``: the FP8 wo and w_down
  inputs quantized by one kernel each (``self_attention``, ``mlp``). ``static_prefill``: attention
  takes its prefill path with no runtime branch (a step known to hold a prefill chunk; see
  ``attention.paged_attention``)."""
  eps, layers = cfg.rms_norm_eps, params["layers"]
  x = params["embed"][tokens]
  cos, sin = rope_tables(cfg, batch.positions)
  h = rms_norm(x, layers[0]["attn_norm"], eps)
  new_k, new_v = [], []
  k_scales, v_scales = layer_kv_scales(cache)

  def add_norm(x, y, w, next_layer, names):
    if fp8_quant_in_norm and next_layer is not None and _takes_fp8_rows(next_layer, names):
      return add_rms_norm_fp8(x, y, w, eps, fused_add_norm)
    return add_rms_norm(x, y, w, eps, fused_add_norm)

  for i, layer in enumerate(layers):
    o, k_pages, v_pages = self_attention(layer, h, cos, sin, cache.k[i], cache.v[i],
                                         k_scales[i], v_scales[i], batch, cfg,
                                         max_new_tokens, defer_output_scale=fp8_scale_in_norm,
                                         fused_rope_kv=fused_rope_kv,
                                         fp8_act_quant=fp8_act_quant,
                                         static_prefill=static_prefill)
    x, h = add_norm(x, o, layer["mlp_norm"], layer, ("w_gate_up", "w_gate", "w_up"))
    nxt = layers[i + 1] if i + 1 < len(layers) else None
    next_norm = nxt["attn_norm"] if nxt is not None else params["final_norm"]
    x, h = add_norm(x, mlp(layer, h, defer_output_scale=fp8_scale_in_norm,
                           fp8_act_quant=fp8_act_quant), next_norm, nxt,
                    ("wqkv", "wq", "wk", "wv"))
    new_k.append(k_pages)
    new_v.append(v_pages)
  if not all_logits:
    h = h[batch.logit_indices]
  return lm_head(params, h, cfg), dataclasses.replace(cache, k=tuple(new_k), v=tuple(new_v))


# On one GPU, every layer's KV scale comes from one small kernel (kernels/scalar_split.py) instead
# of a slice of the scale vectors per layer, each of which XLA copies into a buffer of its own for
# the custom calls that take it (64 CUDA-graph memcpys, ~1.2 us each, per Llama-3-8B step). The
# same values (H100, 2-layer Llama-3-8B-shaped FP8 engine step: memcpy32_post 8 -> 4 per decode
# step and 7 -> 3 per prefill step, split_scalars 1.7 us, tokens and logprobs bit-identical). 0: off.
SPLIT_KV_SCALES = os.environ.get("JAXINFER_SPLIT_KV_SCALES", "1") not in ("", "0")


def layer_kv_scales(cache: KVCache) -> tuple[list, list]:
  """(k scales, v scales) of every layer, 0-d arrays: ``SPLIT_KV_SCALES`` on one GPU, else by
  indexing the cache's scale vectors."""
  n = cache.k_scale.shape[0]
  if (SPLIT_KV_SCALES and jax.default_backend() == "gpu" and jax.device_count() == 1
      and cache.k_scale.dtype == cache.v_scale.dtype == jnp.float32):
    from kernels.scalar_split import MAX_LEN, split_scalars   # kernels import jaxinfer
    if 0 < n <= MAX_LEN:
      s = split_scalars(cache.k_scale, cache.v_scale)
      return list(s[:n]), list(s[n:])
  return [cache.k_scale[i] for i in range(n)], [cache.v_scale[i] for i in range(n)]


def lm_logits(params: Params, x, cfg: LlamaConfig) -> jax.Array:
  """Final RMSNorm and LM head on residual rows x [..., H] -> float32 logits [..., V]."""
  return lm_head(params, rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cfg)


def lm_head(params: Params, h, cfg: LlamaConfig) -> jax.Array:
  """The LM head on final-normed rows h [..., H] -> float32 logits [..., V]."""
  w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  return linear(h, w, out_dtype=jnp.float32)


_FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def _on_one_device(params: Params) -> bool:
  for x in jax.tree.leaves(params):
    sharding = getattr(x, "sharding", None)
    if sharding is not None and len(sharding.device_set) > 1:
      return False
  return True


def can_fuse_projections(params: Params) -> bool:
  """Whether ``fuse_projections`` applies: every weight on one device (a sharded model keeps one
  weight per projection, which its rule table splits by heads / mlp columns)."""
  return "layers" in params and _on_one_device(params)


def fuse_projections(params: Params) -> Params:
  """Load-time transform: each layer's wq/wk/wv -> ``wqkv`` [H, (Hq + 2 Hkv) D] and w_gate/w_up ->
  ``w_gate_up`` [H, 2 I] (outputs concatenated in that order). Layers already fused, and groups with a
  quantized weight (which carries its own ``linear``), are left as they are. Returns new dicts; each
  layer's unfused arrays are dropped from them as it is fused, so with no other reference to them the
  peak extra memory is one layer's projections."""
  layers = []
  for layer in params["layers"]:
    layer = dict(layer)
    for fused, parts in _FUSED.items():
      if fused in layer or not all(p in layer for p in parts):
        continue
      ws = [layer[p] for p in parts]
      if any(hasattr(w, "linear") or w.ndim != 2 for w in ws):
        continue
      layer[fused] = jnp.concatenate(ws, axis=1)
      for p in parts:
        del layer[p]
    layers.append(layer)
  return {**params, "layers": layers}


def unfuse_projections(params: Params, cfg: LlamaConfig) -> Params:
  """Inverse of ``fuse_projections`` (the checkpoint / sharding layout)."""
  nq, nkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  splits = {"wqkv": (nq, nq + nkv), "w_gate_up": (cfg.intermediate_size,)}
  layers = []
  for layer in params["layers"]:
    layer = dict(layer)
    for fused, parts in _FUSED.items():
      if fused in layer:
        w = layer.pop(fused)
        layer.update(zip(parts, jnp.split(w, splits[fused], axis=1)))
    layers.append(layer)
  return {**params, "layers": layers}


def _is_projection(name: str, w) -> bool:
  return not name.endswith("norm") and not hasattr(w, "linear")


def quantize_projections_fp8(params: Params, lm_head: bool = False) -> Params:
  """Every layer projection (fused or not) as an ``ops.FP8Weight`` (E4M3, per-output-channel weight
  scales, dynamic per-row activation scales): half the weight bytes a decode step reads. The
  embedding and the norms stay in their dtype; the LM head too unless ``lm_head`` (an untied
  ``params["lm_head"]`` only: a tied head is the embedding table, which stays as it is). Llama-3-8B's
  bf16 head is 1.05 GB of a decode step's 8.0 GB read with FP8 layers."""
  def quantize(name, w):
    return FP8Weight.from_dense(w) if _is_projection(name, w) else w
  layers = [{name: quantize(name, w) for name, w in layer.items()} for layer in params["layers"]]
  out = {**params, "layers": layers}
  if lm_head and "lm_head" in params and _is_projection("lm_head", params["lm_head"]):
    out["lm_head"] = FP8Weight.from_dense(params["lm_head"])
  return out


def quantize_projections_nvfp4(params: Params, prefill_fp8: bool = False,
                               max_decode_rows: int = 64) -> Params:
  """Every layer projection as an NVFP4 weight (``kernels.quant.weights.NVFP4Weight``: E2M1 codes,
  E4M3 scales per 16 inputs, one f32 global scale; ~0.56 bytes per weight), in the kernel layout
  when K % 256 == 0 (the W4A16 decode kernels of ``kernels.gemm.nvfp4_matmul``; ModelOpt layout
  otherwise). Embedding, norms and LM head stay in their dtype.

  ``prefill_fp8``: each projection becomes an ``ops.RowSplitWeight`` holding the NVFP4 form for
  calls of at most ``max_decode_rows`` rows (decode steps: weight-read-bound) and an
  ``ops.FP8Weight`` of the same dense weight for larger ones (prefill: FP8 tensor cores); memory is
  both (~1.56 bytes per weight, 12.5 GB for Llama-3-8B's layers)."""
  from kernels.quant.weights import NVFP4Weight   # kernels import jaxinfer

  def quantize(name, w):
    if not _is_projection(name, w):
      return w
    q = NVFP4Weight.from_dense(w)
    if q.k % 256 == 0:
      q = q.to_kernel_layout()
    if prefill_fp8:
      return RowSplitWeight(q, FP8Weight.from_dense(w), max_decode_rows)
    return q
  layers = [{name: quantize(name, w) for name, w in layer.items()} for layer in params["layers"]]
  return {**params, "layers": layers}


forward_jit = jax.jit(forward, static_argnames=("cfg", "all_logits", "fused_add_norm",
                                               "max_new_tokens", "fp8_quant_in_norm",
                                               "fp8_scale_in_norm", "fused_rope_kv",
                                               "fp8_act_quant", "static_prefill"),
                      donate_argnames=("cache",))


def num_params(cfg: LlamaConfig) -> int:
  return sum(int(np.prod(s)) for s in jax.tree.leaves(
      param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple)))
