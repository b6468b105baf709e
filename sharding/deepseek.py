"""DeepSeek-V3 (MLA + MoE) on a mesh: TP, EP, TP+EP and attention-DP + EP, from outside the model.

The model's own blocks are reused (``deepseek_v3._attention_block``, its router ``models.moe.route``
and its shared-expert SwiGLU); only the routed experts are swapped for ``sharding.moe`` so that they
move tokens with all-to-all or AG/RS instead of GSPMD's gather of whole expert weights.

* ``attention_dp=False`` (TP8 / EP8 / TP2+EP4): attention heads split over ep*tp by GSPMD (the MLA
  latent cache has no head dim, so every attention rank holds the whole cache: the duplication
  attention-DP removes); experts over ep, each expert's intermediate over tp.
* ``attention_dp=True`` (ADP8+EP8): everything runs in one shard_map manual over ("dp", "ep"): each
  rank embeds, attends and keeps the latent pages of its own sequences (its share of the cache, no
  duplication), dense layers run locally, and the routed experts exchange tokens over ep. Inputs carry
  a leading [dp*ep] dim of per-rank batches (``pipeline.stack_batches``-style), page ids local to the
  rank's share. ``tp`` stays automatic inside (GSPMD splits heads and expert intermediates).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinfer.models import deepseek_v3 as ds
from jaxinfer.models import moe as model_moe
from jaxinfer.ops import linear, rms_norm, rope_cos_sin
from sharding import moe, rules
from sharding.config import ParallelConfig, ParallelConfigError

_EXPERT_KEYS = {"w_gate": "experts_gate", "w_up": "experts_up", "w_down": "experts_down"}


def param_specs(cfg: ds.DeepseekV3Config, params: dict, parallel: ParallelConfig) -> dict:
  parallel.validate(cfg)
  return rules.param_specs(params, {**ds.PARAM_AXES, "layers": ds.LAYER_AXES}, parallel)


def latent_cache_spec(parallel: ParallelConfig) -> ds.LatentCache:
  pages = tuple(a for a in rules.logical_rules(parallel)["pages"] if getattr(parallel, a) > 1)
  page = P(None if not pages else pages[0] if len(pages) == 1 else pages, None, None)
  return page, P()


def place(cfg: ds.DeepseekV3Config, params: dict, cache: ds.LatentCache, parallel: ParallelConfig,
          mesh: Mesh) -> tuple[dict, ds.LatentCache]:
  params = jax.device_put(params, rules.named(mesh, param_specs(cfg, params, parallel)))
  page, scale = latent_cache_spec(parallel)
  cache = ds.LatentCache(tuple(jax.device_put(l, NamedSharding(mesh, page)) for l in cache.latent),
                         jax.device_put(cache.scale, NamedSharding(mesh, scale)))
  return params, cache


def _ffn(layer, x, cfg: ds.DeepseekV3Config, experts_fn):
  h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
  if "router" not in layer:
    return x + ds._swiglu(h, layer["w_gate"], layer["w_up"], layer["w_down"])
  w, idx = model_moe.route(h, layer["router"], layer["router_bias"], top_k=cfg.num_experts_per_tok,
                           n_group=cfg.n_group, topk_group=cfg.topk_group,
                           norm_topk_prob=cfg.norm_topk_prob,
                           routed_scaling_factor=cfg.routed_scaling_factor)
  y = experts_fn(h, idx, w, {k: layer[v] for k, v in _EXPERT_KEYS.items()})
  if cfg.n_shared_experts:
    y = y + ds._swiglu(h, layer["shared_gate"], layer["shared_up"], layer["shared_down"])
  return x + y.astype(x.dtype)


def _layers(params, tokens, cache: ds.LatentCache, batch, cfg, experts_fn, all_logits, mla_form):
  if mla_form == "auto":
    mla_form = ds.choose_mla_form(batch.num_tokens, batch.num_seqs)
  x = params["embed"][tokens]
  inv_freq, attention_factor = ds.rope_parameters(cfg)
  cos, sin = rope_cos_sin(batch.positions, jnp.asarray(inv_freq))
  cos, sin = cos * attention_factor, sin * attention_factor
  latent = []
  for i, layer in enumerate(params["layers"]):
    x, pages = ds._attention_block(layer, x, cos, sin, cache.latent[i], cache.scale[i], batch, cfg,
                                   mla_form)
    x = _ffn(layer, x, cfg, experts_fn)
    latent.append(pages)
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  if not all_logits:
    x = x[batch.logit_indices]
  lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  return linear(x, lm_head).astype(jnp.float32), dataclasses.replace(cache, latent=tuple(latent))


def make_forward(cfg: ds.DeepseekV3Config, parallel: ParallelConfig, mesh: Mesh, *,
                 all_logits: bool = False, mla_form: str = "auto"):
  """Jitted forward, cache donated. Without attention_dp: (params, tokens [T], cache, batch) ->
  (logits [B, V], cache), T divisible by ep. With it: tokens [R, T], batches [R, ...] with
  R = dp*ep ranks -> logits [R, B, V]."""
  parallel.validate(cfg)
  if parallel.pp > 1:
    raise ParallelConfigError("pp > 1 is implemented for Llama (sharding.pipeline) only")
  top_k = cfg.num_experts_per_tok
  page, scale = latent_cache_spec(parallel)
  cache_shardings = lambda n: ds.LatentCache(tuple(NamedSharding(mesh, page) for _ in range(n)),
                                             NamedSharding(mesh, scale))

  if not parallel.attention_dp:
    if parallel.dp > 1:
      raise ParallelConfigError("dp > 1 for DeepSeek needs attention_dp=True (per-rank batches)")
    experts_fn = functools.partial(_replicated_experts, parallel=parallel, mesh=mesh)

    def forward(params, tokens, cache, batch):
      logits, cache = _layers(params, tokens, cache, batch, cfg, experts_fn, all_logits, mla_form)
      return logits, cache

    return jax.jit(forward, donate_argnums=(2,),
                   out_shardings=(NamedSharding(mesh, P()), cache_shardings(cfg.num_layers)))

  ranks = ("dp", "ep") if parallel.dp > 1 else "ep"

  def local(params, tokens, cache, batch):
    batch = jax.tree.map(lambda a: a[0], batch)
    T = tokens.shape[1]
    comm = moe.choose_comm(parallel.ep, top_k, T, cfg.hidden_size, parallel.moe_comm)
    experts_fn = functools.partial(moe.moe_local, ep=parallel.ep, tp=1, comm=comm,
                                   tokens_split=True, dispatch_dtype=parallel.moe_dispatch_dtype)
    logits, cache = _layers(params, tokens[0], cache, batch, cfg, experts_fn, all_logits, mla_form)
    return logits[None], cache

  expert_spec = {v: P("ep") for v in _EXPERT_KEYS.values()}
  layer_specs = [{k: expert_spec.get(k, P()) for k in layer} for layer in
                 (ds.layer_shapes(cfg, i) for i in range(cfg.num_layers))]
  param_in = {"embed": P(), "final_norm": P(), "layers": layer_specs}
  if not cfg.tie_word_embeddings:
    param_in["lm_head"] = P()
  cache_in = ds.LatentCache(tuple(P(ranks) for _ in range(cfg.num_layers)), P())
  body = jax.shard_map(local, mesh=mesh, in_specs=(param_in, P(ranks), cache_in, P(ranks)),
                       out_specs=(P(ranks), cache_in), axis_names={"dp", "ep"}, check_vma=False)
  return jax.jit(body, donate_argnums=(2,),
                 out_shardings=(NamedSharding(mesh, P(ranks)), cache_shardings(cfg.num_layers)))


def _replicated_experts(h, idx, w, weights, *, parallel: ParallelConfig, mesh: Mesh):
  return moe.moe_experts(h, idx, w, weights, parallel, mesh, tokens_split=False)
