"""DeepSeek-V3 (MLA + MoE) on a mesh: TP, EP, TP+EP and attention-DP + EP, from outside the model.

The model's own forward and building blocks are reused (``deepseek_v3.forward``, ``attention_block``,
``ffn_block``); only the routed experts are swapped for ``sharding.moe`` (the model's ``experts_fn``
hook) so that they move tokens with all-to-all or AG/RS instead of GSPMD's gather of whole expert
weights.

* ``attention_dp=False`` (TP8 / EP8 / TP2+EP4): attention heads split over ep*tp by GSPMD (the MLA
  latent cache has no head dim, so every attention rank holds the whole cache: the duplication
  attention-DP removes); experts over ep, each expert's intermediate over tp.
* ``attention_dp=True`` (ADP8+EP8): everything runs in one shard_map manual over ("dp", "ep"): each
  rank embeds, attends and keeps the latent pages of its own sequences (its share of the cache, no
  duplication), dense layers run locally, and the routed experts exchange tokens over ep. Inputs carry
  a leading [dp*ep] dim of per-rank batches (``pipeline.stack_batches``-style), page ids local to the
  rank's share. ``tp`` stays automatic inside (GSPMD splits heads and expert intermediates).
* ``pp > 1`` (with tp, ep, dp): ``make_pipeline_forward`` runs the MoE layers split over stages on
  ``pipeline.gpipe`` (microbatches moved with ppermute, chunked pipeline prefill, decode across
  stages); the dense first layers run on stage 0 (see the section below).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinfer.models import deepseek_v3 as ds
from sharding import moe, pipeline, rules
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


def make_forward(cfg: ds.DeepseekV3Config, parallel: ParallelConfig, mesh: Mesh, *,
                 all_logits: bool = False, mla_form: str = "auto"):
  """Jitted forward, cache donated. Without attention_dp: (params, tokens [T], cache, batch) ->
  (logits [B, V], cache), T divisible by ep. With it: tokens [R, T], batches [R, ...] with
  R = dp*ep ranks -> logits [R, B, V]."""
  parallel.validate(cfg)
  if parallel.pp > 1:
    raise ParallelConfigError("pp > 1 takes microbatched inputs: use make_pipeline_forward")
  _check_adp(parallel)
  top_k = cfg.num_experts_per_tok
  page, scale = latent_cache_spec(parallel)
  cache_shardings = lambda n: ds.LatentCache(tuple(NamedSharding(mesh, page) for _ in range(n)),
                                             NamedSharding(mesh, scale))

  if not parallel.attention_dp:
    if parallel.dp > 1:
      raise ParallelConfigError("dp > 1 for DeepSeek needs attention_dp=True (per-rank batches)")
    forward = functools.partial(ShardedForward(cfg, parallel, mesh, mla_form),
                                all_logits=all_logits)
    return jax.jit(forward, donate_argnums=(2,),
                   out_shardings=(NamedSharding(mesh, P()), cache_shardings(cfg.num_layers)))

  ranks = ("dp", "ep") if parallel.dp > 1 else "ep"

  def local(params, tokens, cache, batch):
    batch = jax.tree.map(lambda a: a[0], batch)
    T = tokens.shape[1]
    comm = moe.choose_comm(parallel.ep, top_k, T, cfg.hidden_size, parallel.moe_comm)
    experts_fn = functools.partial(moe.moe_local, ep=parallel.ep, tp=1, comm=comm,
                                   tokens_split=True, dispatch_dtype=parallel.moe_dispatch_dtype)
    logits, cache = ds.forward(params, tokens[0], cache, batch, cfg, all_logits, mla_form,
                               experts_fn=experts_fn)
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
  """Routed experts for tokens replicated over ep (attention ran tensor parallel); a token count
  the ep ranks do not divide is padded with zero-weight rows."""
  T = h.shape[0]
  pad = -T % parallel.ep
  if pad:
    h, idx, w = (jnp.pad(a, ((0, pad), (0, 0))) for a in (h, idx, w))
  return moe.moe_experts(h, idx, w, weights, parallel, mesh, tokens_split=False)[:T]


@dataclasses.dataclass(frozen=True)
class ShardedForward:
  """``forward(params, tokens, cache, batch)`` under TP / EP / TP+EP (no attention_dp, dp = pp = 1):
  the model's own forward with the routed experts through ``sharding.moe``; hashable and traceable
  inside any jit (the engine's step), with the cache and logits pinned to their layouts."""
  cfg: ds.DeepseekV3Config
  parallel: ParallelConfig
  mesh: Mesh
  mla_form: str = "auto"

  def __call__(self, params, tokens, cache: ds.LatentCache, batch, all_logits: bool = False):
    experts_fn = functools.partial(_replicated_experts, parallel=self.parallel, mesh=self.mesh)
    logits, cache = ds.forward(params, tokens, cache, batch, self.cfg, all_logits, self.mla_form,
                               experts_fn=experts_fn)
    page, scale = latent_cache_spec(self.parallel)
    pin = lambda a, spec: jax.lax.with_sharding_constraint(a, NamedSharding(self.mesh, spec))
    cache = ds.LatentCache(tuple(pin(l, page) for l in cache.latent), pin(cache.scale, scale))
    return pin(logits, P()), cache


def _check_adp(parallel: ParallelConfig) -> None:
  if parallel.attention_dp and parallel.adp_mlp != "dp":
    raise ParallelConfigError("under attention_dp DeepSeek runs its dense MLPs and shared experts "
                              "data parallel: adp_mlp='tp' is implemented for Llama only")


# ---- pipeline parallel ------------------------------------------------------------------------
#
# DeepSeek's layers are not all alike: the first ``first_k_dense_replace`` (k) have a dense MLP, the
# rest MoE. The n = L - k MoE layers are split evenly over the stages (stacked [pp, n/pp, ...] over
# "pp", so no stage holds another's experts); the k dense layers, a small share of the weights
# (3 of 61 layers in V3), run at the start of stage 0 under ``lax.cond`` (only stage 0 computes
# them) with their weights replicated over pp. Each stage's latent cache has k + n/pp layer slots:
# stage 0's first k hold the dense layers' pages, the other stages leave those k slots unused.


def _pp_layout(cfg: ds.DeepseekV3Config, pp: int) -> tuple[int, int]:
  """(k dense prefix layers, MoE layers per stage)."""
  k = min(cfg.first_k_dense_replace, cfg.num_layers)
  return k, (cfg.num_layers - k) // pp


def _slot(cfg: ds.DeepseekV3Config, pp: int, layer: int) -> tuple[int, int]:
  """(stage, cache slot) of a global layer."""
  k, per = _pp_layout(cfg, pp)
  if layer < k:
    return 0, layer
  return (layer - k) // per, k + (layer - k) % per


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StagedLatentCache:
  latent: jax.Array  # [pp, k + n/pp, num_pages, page_size, latent_dim]
  scale: jax.Array   # [pp, k + n/pp] float32

  @property
  def num_pages(self) -> int:
    return self.latent.shape[2]

  @property
  def page_size(self) -> int:
    return self.latent.shape[3]

  @classmethod
  def from_cache(cls, cache: ds.LatentCache, cfg: ds.DeepseekV3Config, pp: int) -> StagedLatentCache:
    k, per = _pp_layout(cfg, pp)
    latent = [[jnp.zeros_like(cache.latent[0])] * (k + per) for _ in range(pp)]
    scale = [[jnp.ones((), jnp.float32)] * (k + per) for _ in range(pp)]
    for layer in range(cfg.num_layers):
      s, j = _slot(cfg, pp, layer)
      latent[s][j], scale[s][j] = cache.latent[layer], cache.scale[layer]
    return cls(jnp.stack([jnp.stack(row) for row in latent]),
               jnp.stack([jnp.stack(row) for row in scale]))

  def to_cache(self, cfg: ds.DeepseekV3Config) -> ds.LatentCache:
    pp = self.latent.shape[0]
    slots = [_slot(cfg, pp, layer) for layer in range(cfg.num_layers)]
    return ds.LatentCache(tuple(self.latent[s, j] for s, j in slots),
                          jnp.stack([self.scale[s, j] for s, j in slots]))


def stage_params(cfg: ds.DeepseekV3Config, params: dict, pp: int) -> dict:
  """{"layers": [L dicts]} -> {"prefix": [k dense layers], "stages": {name: [pp, n/pp, ...]}}."""
  k, per = _pp_layout(cfg, pp)
  moe_layers = params["layers"][k:]
  out = {key: v for key, v in params.items() if key != "layers"}
  out["prefix"] = list(params["layers"][:k])
  out["stages"] = {name: jnp.stack([l[name] for l in moe_layers]).reshape(
      pp, per, *moe_layers[0][name].shape) for name in moe_layers[0]}
  return out


def staged_param_specs(staged: dict, parallel: ParallelConfig) -> dict:
  top = {key: v for key, v in staged.items() if key != "stages"}
  specs = rules.param_specs(top, {**ds.PARAM_AXES, "prefix": ds.LAYER_AXES}, parallel)
  specs["stages"] = {name: rules.spec_for(("stage", None) + ds.LAYER_AXES[name], tuple(w.shape),
                                          parallel) for name, w in staged["stages"].items()}
  return specs


def staged_cache_spec(parallel: ParallelConfig) -> StagedLatentCache:
  page, _ = latent_cache_spec(parallel)
  return StagedLatentCache(P("pp", None, *page), P("pp", None))


def place_pipeline(cfg: ds.DeepseekV3Config, params: dict, cache: ds.LatentCache,
                   parallel: ParallelConfig, mesh: Mesh) -> tuple[dict, StagedLatentCache]:
  """Stages params and cache (``stage_params``, ``StagedLatentCache``) and places them on the mesh."""
  parallel.validate(cfg)
  staged = stage_params(cfg, params, parallel.pp)
  staged = jax.device_put(staged, rules.named(mesh, staged_param_specs(staged, parallel)))
  cache = StagedLatentCache.from_cache(cache, cfg, parallel.pp)
  return staged, jax.device_put(cache, rules.named(mesh, staged_cache_spec(parallel)))


def make_pipeline_forward(cfg: ds.DeepseekV3Config, parallel: ParallelConfig, mesh: Mesh, *,
                          all_logits: bool = False, mla_form: str = "auto"):
  """Pipeline-parallel (and dp) forward over ``pipeline.gpipe``: (staged params, tokens [dp, M, T],
  StagedLatentCache, batches [dp, M, ...]) -> (logits [dp, M, B, V] float32, or [dp, M, T, V] with
  ``all_logits``; cache), jitted, cache donated. Attention runs tensor parallel over ep*tp inside
  each stage, the routed experts through ``sharding.moe`` over ep (nested shard_map), T divisible
  by ep. M microbatches: chunks of long prompts (chunked pipeline prefill) or groups of decode
  sequences (M=1: the stages run one after another)."""
  parallel.validate(cfg)
  if parallel.attention_dp:
    raise ParallelConfigError("pp > 1 with attention_dp is not implemented for DeepSeek; "
                              "use pp with tp and ep")
  pp = parallel.pp
  k, per = _pp_layout(cfg, pp)
  manual = pipeline.manual_axes(parallel)
  ranks = pipeline.rank_spec(parallel)
  cache_spec = staged_cache_spec(parallel)
  latent_spec = pipeline.manual_part(cache_spec.latent, manual)
  experts_fn = functools.partial(moe.moe_experts, parallel=parallel, mesh=None, tokens_split=False)

  def stages(prefix_w, stage_w, x, latent, scale, batches):
    stage = jax.lax.axis_index("pp")

    def stage_fn(h, batch, lat):
      lat = list(lat)
      form = ds.choose_mla_form(batch.num_tokens, batch.num_seqs) if mla_form == "auto" else mla_form
      cos, sin = ds.rope_tables(cfg, batch.positions)

      def block(w, h, pages, i):
        h, pages = ds.attention_block(w, h, cos, sin, pages, scale[0, i], batch, cfg, form)
        return ds.ffn_block(w, h, cfg, experts_fn=experts_fn), pages

      def prefix(h, pages):
        pages = list(pages)
        for i in range(k):
          h, pages[i] = block(prefix_w[i], h, pages[i], i)
        return h, pages

      if k:  # only stage 0 runs the dense layers
        h, lat[:k] = jax.lax.cond(stage == 0, prefix, lambda h, pages: (h, list(pages)), h, lat[:k])
      for j in range(per):
        h, lat[k + j] = block({name: w[0, j] for name, w in stage_w.items()}, h, lat[k + j], k + j)
      return h, lat

    outs, lat = pipeline.gpipe(stage_fn, x[0], jax.tree.map(lambda a: a[0], batches),
                               list(latent[0]), pp)
    return outs[None], jnp.stack(lat)[None]

  def forward(params, tokens, cache: StagedLatentCache, batches):
    w_specs = {name: pipeline.manual_part(rules.spec_for(("stage", None) + ds.LAYER_AXES[name],
                                                         w.shape, parallel), manual)
               for name, w in params["stages"].items()}
    run = jax.shard_map(stages, mesh=mesh,
                        in_specs=(jax.tree.map(lambda _: P(), params["prefix"]), w_specs, ranks,
                                  latent_spec, P("pp"), ranks),
                        out_specs=(ranks, latent_spec), axis_names=manual, check_vma=False)
    x = params["embed"][tokens]                                       # [dp, M, T, H]
    h, latent = run(params["prefix"], params["stages"], x, cache.latent, cache.scale, batches)
    if not all_logits:
      h = jnp.take_along_axis(h, batches.logit_indices[..., None], axis=2)  # [dp, M, B, H]
    return ds.lm_logits(params, h, cfg), dataclasses.replace(cache, latent=latent)

  return jax.jit(forward, donate_argnums=(2,),
                 out_shardings=(NamedSharding(mesh, ranks), rules.named(mesh, cache_spec)))
