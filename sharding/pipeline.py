"""Data- and pipeline-parallel Llama forward: shard_map manual over ``dp`` and ``pp``, ``tp`` left to GSPMD.

Layout: layer weights are stacked per stage, ``[pp, L/pp, ...]`` split over ``pp`` (logical axis
"stage"); the KV cache likewise, ``[pp, L/pp, num_pages, page, kv_heads, head_dim]``, with pages
split over ``dp`` so each replica attends only its own pages (no KV duplication). Inputs of a step
carry a leading ``[dp, M]``: for each replica, M microbatches, each a complete ``AttentionBatch``
(host-built, equal shapes; page ids local to the replica's page shard).

Schedule (GPipe without backward): tick t = 0 .. M+pp-2, stage s runs microbatch t-s on the
activations it received from stage s-1 at the previous tick (``ppermute`` s -> s+1). Bubble ticks
write their K/V to the null page and their outputs are dropped. A long prompt split into M chunks
is *chunked pipeline prefill*: chunk c reaches stage s at tick c+s, after chunk c-1 has written
its K/V into that stage's cache at tick c-1+s, so causal attention over earlier chunks is exact.
Decode is the same with M groups of sequences (M=1: the stages simply run one after another).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinfer import attention
from jaxinfer.kv_cache import KVCache
from jaxinfer.models import llama
from jaxinfer.ops import linear, rms_norm, rope_cos_sin, rope_inv_freq
from sharding import rules
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


def make_pipeline_forward(cfg: llama.LlamaConfig, parallel: ParallelConfig, mesh: Mesh,
                          all_logits: bool = False):
  """(staged params, tokens [dp, M, T], StagedKVCache, batches [dp, M, ...]) ->
  (logits [dp, M, B, V] float32 (or [dp, M, T, V] with ``all_logits``), cache); jitted, cache donated."""
  pp = parallel.pp
  layers_per_stage = cfg.num_layers // pp
  inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

  def stages(stage_w, x, k, v, k_scale, v_scale, batches):
    # Local views: stage_w [1, L/pp, ...]; x [1, M, T, H]; k [1, L/pp, pages, ...]; batches [1, M, ...]
    stage = jax.lax.axis_index("pp")
    x, batches = x[0], jax.tree.map(lambda a: a[0], batches)
    M = x.shape[0]
    k, v = list(k[0]), list(v[0])
    carry = jnp.zeros_like(x[0])
    outs = jnp.zeros_like(x)
    for t in range(M + pp - 1):
      mb = t - stage
      valid = (mb >= 0) & (mb < M)
      mb_c = jnp.clip(mb, 0, M - 1)
      batch = _null_slots(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, mb_c, 0, False),
                                       batches), valid)
      h = jnp.where(stage == 0, x[min(t, M - 1)], carry)
      cos, sin = rope_cos_sin(batch.positions, inv_freq)
      for i in range(layers_per_stage):
        layer = {name: w[0, i] for name, w in stage_w.items()}
        h, k[i], v[i] = llama._attention_block(layer, h, cos, sin, k[i], v[i], k_scale[0, i],
                                               v_scale[0, i], batch, cfg)
        h = llama._mlp_block(layer, h, cfg)
      last = (stage == pp - 1) & valid
      outs = outs.at[mb_c].set(jnp.where(last, h, outs[mb_c]))
      if pp > 1:
        carry = jax.lax.ppermute(h, "pp", [(s, s + 1) for s in range(pp - 1)])
    outs = jax.lax.psum(outs, "pp") if pp > 1 else outs  # only the last stage's is non-zero
    return outs[None], jnp.stack(k)[None], jnp.stack(v)[None]

  cache_spec = staged_cache_spec(parallel, cfg.num_kv_heads)
  manual = {"dp", "pp"}  # inside the manual region tp (and ep) stay automatic
  kv_spec = P("pp", None, "dp") if parallel.dp > 1 else P("pp")
  in_specs = ({k: P("pp") for k in llama.LAYER_AXES}, P("dp"), kv_spec, kv_spec, P("pp"), P("pp"),
              P("dp"))
  run_stages = jax.shard_map(stages, mesh=mesh, in_specs=in_specs,
                             out_specs=(P("dp"), in_specs[2], in_specs[3]), axis_names=manual,
                             check_vma=False)

  def forward(params, tokens, cache: StagedKVCache, batches: attention.AttentionBatch):
    x = params["embed"][tokens]                                       # [dp, M, T, H]
    h, k, v = run_stages(params["stages"], x, cache.k, cache.v, cache.k_scale, cache.v_scale,
                         batches)
    h = rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if not all_logits:
      h = jnp.take_along_axis(h, batches.logit_indices[..., None], axis=2)  # [dp, M, B, H]
    lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = linear(h, lm_head, out_dtype=jnp.float32)
    return logits, dataclasses.replace(cache, k=k, v=v)

  return jax.jit(forward, donate_argnums=(2,),
                 out_shardings=(NamedSharding(mesh, P("dp")),
                                rules.named(mesh, cache_spec)))
