"""Data-, pipeline- and attention-data-parallel Llama forward: one shard_map manual over ``dp`` and
``pp`` (and ``ep`` under attention_dp), ``tp`` left to GSPMD. The schedule (``gpipe``) is shared
with the DeepSeek pipeline (sharding/deepseek.py).

Layout: layer weights are stacked per stage, ``[pp, L/pp, ...]`` split over ``pp`` (logical axis
"stage"); the KV cache likewise, ``[pp, L/pp, num_pages, page, kv_heads, head_dim]``, with pages
split over the ranks (``dp``, and ``ep`` under attention_dp) so each rank attends only its own pages
(no KV duplication). Inputs of a step carry a leading ``[R, M]``: for each of the R ranks, M
microbatches, each a complete ``AttentionBatch`` (host-built, equal shapes; page ids local to the
rank's page shard).

Schedule (GPipe without backward): tick t = 0 .. M+pp-2, stage s runs microbatch t-s on the
activations it received from stage s-1 at the previous tick (``ppermute`` s -> s+1). Bubble ticks
write their K/V to the null page and their outputs are dropped. A long prompt split into M chunks
is *chunked pipeline prefill*: chunk c reaches stage s at tick c+s, after chunk c-1 has written
its K/V into that stage's cache at tick c-1+s, so causal attention over earlier chunks is exact.
Decode is the same with M groups of sequences (M=1: the stages simply run one after another).

Attention-DP (``attention_dp=True``, ep > 1): attention weights are replicated over ep and each ep
rank runs attention on its own sequences; the MLP either runs data parallel too
(``adp_mlp="dp"``, weights replicated over ep) or tensor parallel over ep*tp (``adp_mlp="tp"``:
tokens all-gathered over ep before the MLP, reduce-scattered after, ``mlp_tp_over_ep``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinfer import attention
from jaxinfer.kv_cache import KVCache
from jaxinfer.models import llama
from jaxinfer.ops import rms_norm
from sharding import moe, rules
from sharding.config import ParallelConfig, ParallelConfigError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StagedKVCache:
  k: jax.Array        # [pp, L/pp, num_pages, page_size, kv_heads, head_dim]
  v: jax.Array
  k_scale: jax.Array  # [pp, L/pp]
  v_scale: jax.Array

  @property
  def num_layers(self) -> int:
    return self.k.shape[0] * self.k.shape[1]

  @property
  def num_pages(self) -> int:
    return self.k.shape[2]

  @property
  def page_size(self) -> int:
    return self.k.shape[3]

  @property
  def dtype(self) -> jnp.dtype:
    return self.k.dtype

  @classmethod
  def from_cache(cls, cache: KVCache, pp: int) -> StagedKVCache:
    stage = lambda xs: jnp.stack(xs).reshape(pp, len(xs) // pp, *xs[0].shape)
    return cls(stage(cache.k), stage(cache.v), cache.k_scale.reshape(pp, -1),
               cache.v_scale.reshape(pp, -1))

  def to_cache(self) -> KVCache:
    flat = lambda a: tuple(a.reshape(-1, *a.shape[2:]))
    return KVCache(flat(self.k), flat(self.v), self.k_scale.reshape(-1), self.v_scale.reshape(-1))


def stage_params(params: dict, pp: int) -> dict:
  """{"layers": [L dicts]} -> {"stages": {name: [pp, L/pp, ...]}} (other weights unchanged)."""
  layers = params["layers"]
  if len(layers) % pp:
    raise ParallelConfigError(f"num_layers ({len(layers)}) must be divisible by pp ({pp})")
  stacked = {k: jnp.stack([l[k] for l in layers]).reshape(pp, len(layers) // pp, *layers[0][k].shape)
             for k in layers[0]}
  out = {k: v for k, v in params.items() if k != "layers"}
  out["stages"] = stacked
  return out


def llama_layer_axes(cfg: llama.LlamaConfig, parallel: ParallelConfig) -> dict:
  """``llama.LAYER_AXES``, with Wk/Wv replicated when there are fewer KV heads than attention ranks."""
  layer_axes = dict(llama.LAYER_AXES)
  if cfg.num_kv_heads % parallel.attention_tp:
    layer_axes.update(wk=("embed", None), wv=("embed", None))
  return layer_axes


def staged_param_specs(staged: dict, parallel: ParallelConfig,
                       layer_axes: dict = llama.LAYER_AXES) -> dict:
  top = {k: v for k, v in staged.items() if k != "stages"}
  specs = rules.param_specs(top, llama.PARAM_AXES, parallel)
  specs["stages"] = {k: rules.spec_for(("stage", None) + layer_axes[k], tuple(w.shape), parallel)
                     for k, w in staged["stages"].items()}
  return specs


def staged_cache_spec(parallel: ParallelConfig, kv_heads: int) -> StagedKVCache:
  page = rules.kv_cache_spec(parallel, kv_heads)
  kv = P("pp", None, *page)
  return StagedKVCache(kv, kv, P("pp", None), P("pp", None))


def stack_batches(batches) -> attention.AttentionBatch:
  """Nested lists [dp][M] of equal-shape AttentionBatches -> one with leading [dp, M] dims."""
  return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(len(batches), len(batches[0]), *xs[0].shape),
                      *[b for row in batches for b in row])


def _null_slots(batch: attention.AttentionBatch, valid) -> attention.AttentionBatch:
  return dataclasses.replace(batch, slots=jnp.where(valid, batch.slots, 0))


def manual_axes(parallel: ParallelConfig) -> set[str]:
  """Mesh axes a pipeline / data-parallel shard_map handles by hand: dp and pp, and ep under
  attention_dp (each ep rank its own sequences); the rest (tp, ep otherwise) stay with GSPMD."""
  return {"dp", "pp", "ep"} if parallel.attention_dp else {"dp", "pp"}


def rank_spec(parallel: ParallelConfig) -> P:
  """Spec of the leading per-rank dim of step inputs: [dp] or, under attention_dp, [dp*ep]."""
  ranks = tuple(a for a in ("dp", "ep") if a in manual_axes(parallel) and getattr(parallel, a) > 1)
  return P(ranks or None)


def manual_part(spec: P, manual: set[str]) -> P:
  """A global PartitionSpec reduced to the shard_map's manual axes (the automatic ones stay on the
  arrays' shardings)."""
  def keep(entry):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    axes = tuple(a for a in axes if a in manual)
    return None if not axes else axes[0] if len(axes) == 1 else axes
  return P(*(keep(e) for e in spec))


def gpipe(stage_fn, x: jax.Array, batches: attention.AttentionBatch, state, pp: int):
  """The GPipe schedule, inside a shard_map manual over "pp" (see the module docstring).

  x [M, T, H]: the microbatches' stage-0 inputs; batches: M stacked AttentionBatches;
  ``stage_fn(h, batch, state) -> (h, state)`` runs this stage's layers on one microbatch (``state``:
  its KV pages). Returns (the last stage's outputs [M, T, H], on every stage; state)."""
  stage = jax.lax.axis_index("pp")
  M = x.shape[0]
  carry = jnp.zeros_like(x[0])
  outs = jnp.zeros_like(x)
  for t in range(M + pp - 1):
    mb = t - stage
    valid = (mb >= 0) & (mb < M)
    mb_c = jnp.clip(mb, 0, M - 1)
    batch = _null_slots(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, mb_c, 0, False),
                                     batches), valid)
    h = jnp.where(stage == 0, x[min(t, M - 1)], carry)
    h, state = stage_fn(h, batch, state)
    last = (stage == pp - 1) & valid
    outs = outs.at[mb_c].set(jnp.where(last, h, outs[mb_c]))
    if pp > 1:
      carry = jax.lax.ppermute(h, "pp", [(s, s + 1) for s in range(pp - 1)])
  if pp > 1:  # only the last stage's is non-zero, so the sum is exact in any dtype
    outs = jax.lax.psum(outs.astype(moe.reduce_dtype(outs.dtype)), "pp").astype(outs.dtype)
  return outs, state


def mlp_tp_over_ep(layer: dict, x: jax.Array, cfg: llama.LlamaConfig) -> jax.Array:
  """Attention-DP with a tensor-parallel MLP (inside a shard_map manual over "ep"): this rank's
  tokens x [T, H] are all-gathered over ep, each rank applies its 1/ep of the MLP columns (its
  W_gate/W_up columns, W_down rows; tp splits further by GSPMD) to every rank's tokens, and a
  reduce-scatter returns each rank the sum for its own tokens."""
  h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
  y = llama.mlp(layer, jax.lax.all_gather(h, "ep", axis=0, tiled=True))
  y = jax.lax.psum_scatter(y.astype(moe.reduce_dtype(y.dtype)), "ep", scatter_dimension=0,
                           tiled=True)
  return x + y.astype(x.dtype)


def make_pipeline_forward(cfg: llama.LlamaConfig, parallel: ParallelConfig, mesh: Mesh,
                          all_logits: bool = False):
  """(staged params, tokens [R, M, T], StagedKVCache, batches [R, M, ...]) ->
  (logits [R, M, B, V] float32 (or [R, M, T, V] with ``all_logits``), cache); jitted, cache donated.
  R = dp ranks, or dp*ep under attention_dp (each rank attends its own sequences and pages)."""
  pp = parallel.pp
  layers_per_stage = cfg.num_layers // pp
  manual = manual_axes(parallel)
  layer_axes = llama_layer_axes(cfg, parallel)
  mlp_fn = (mlp_tp_over_ep if parallel.attention_dp and parallel.adp_mlp == "tp"
            else llama.mlp_block)
  cache_spec = staged_cache_spec(parallel, cfg.num_kv_heads)
  kv_spec = manual_part(cache_spec.k, manual)
  ranks = rank_spec(parallel)

  def stages(stage_w, x, k, v, k_scale, v_scale, batches):
    # Local views: stage_w [1, L/pp, ...]; x [1, M, T, H]; k [1, L/pp, pages, ...]; batches [1, M, ...]
    def stage_fn(h, batch, kv):
      k, v = list(kv[0]), list(kv[1])
      cos, sin = llama.rope_tables(cfg, batch.positions)
      for i in range(layers_per_stage):
        layer = {name: w[0, i] for name, w in stage_w.items()}
        h, k[i], v[i] = llama.attention_block(layer, h, cos, sin, k[i], v[i], k_scale[0, i],
                                              v_scale[0, i], batch, cfg)
        h = mlp_fn(layer, h, cfg)
      return h, (k, v)

    outs, (k, v) = gpipe(stage_fn, x[0], jax.tree.map(lambda a: a[0], batches),
                         (list(k[0]), list(v[0])), pp)
    return outs[None], jnp.stack(k)[None], jnp.stack(v)[None]

  def forward(params, tokens, cache: StagedKVCache, batches: attention.AttentionBatch):
    w_specs = {name: manual_part(rules.spec_for(("stage", None) + layer_axes[name], w.shape,
                                                parallel), manual)
               for name, w in params["stages"].items()}
    run_stages = jax.shard_map(
        stages, mesh=mesh, in_specs=(w_specs, ranks, kv_spec, kv_spec, P("pp"), P("pp"), ranks),
        out_specs=(ranks, kv_spec, kv_spec), axis_names=manual, check_vma=False)
    x = params["embed"][tokens]                                       # [R, M, T, H]
    h, k, v = run_stages(params["stages"], x, cache.k, cache.v, cache.k_scale, cache.v_scale,
                         batches)
    if not all_logits:
      h = jnp.take_along_axis(h, batches.logit_indices[..., None], axis=2)  # [R, M, B, H]
    return llama.lm_logits(params, h, cfg), dataclasses.replace(cache, k=k, v=v)

  return jax.jit(forward, donate_argnums=(2,),
                 out_shardings=(NamedSharding(mesh, ranks), rules.named(mesh, cache_spec)))
