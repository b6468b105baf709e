"""``shard_model(LoadedModel, ParallelConfig)``: params and KV cache placed on the mesh, forward sharded.

Llama: every layout below. DeepSeek-V3: TP / EP / TP+EP (``sharding.deepseek.ShardedForward``: the
routed experts move tokens by all-to-all or AG/RS), and dp as engine replicas.

TP (ep*tp ways for a dense model's attention and MLP) needs no change to the model: weights and
cache carry NamedShardings from the rule table, the forward is traced as is, and GSPMD inserts the
Megatron all-reduces (after Wo and W_down) and the vocab-parallel LM head's gather. The cache and
logits are pinned with ``with_sharding_constraint`` so the step's outputs keep the input layout.

PP, DP and attention-DP (which need one batch per rank) go through ``sharding.pipeline``: layer
weights and cache are stacked per stage. The returned model's ``forward(params, tokens, cache,
batch)`` keeps the single-batch signature the engine and ``generation`` call (one rank; the stages
run one after another, M=1); ``pipeline_forward`` takes [R, M] stacked microbatches for overlapped
stages and ranks. The engine serves dp > 1 as independent replicas (``sharding.replicas``).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinfer import attention
from jaxinfer.kv_cache import KVCache
from jaxinfer.loader import LoadedModel
from jaxinfer.models import deepseek_v3, llama
from sharding import deepseek, pipeline, rules
from sharding.config import ParallelConfig, ParallelConfigError


def llama_param_specs(cfg: llama.LlamaConfig, params: dict, parallel: ParallelConfig) -> dict:
  return rules.param_specs(
      params, {**llama.PARAM_AXES, "layers": pipeline.llama_layer_axes(cfg, parallel)}, parallel)


def _cache_shardings(mesh: Mesh, parallel: ParallelConfig, cache: KVCache, kv_heads: int):
  page = NamedSharding(mesh, rules.kv_cache_spec(parallel, kv_heads))
  rep = NamedSharding(mesh, P())
  return KVCache(tuple(page for _ in cache.k), tuple(page for _ in cache.v), rep, rep)


@dataclasses.dataclass(frozen=True)
class TensorParallelForward:
  """``forward(params, tokens, cache, batch)`` for TP meshes; hashable, traceable inside any jit."""
  cfg: llama.LlamaConfig
  parallel: ParallelConfig
  mesh: Mesh

  def __call__(self, params, tokens, cache: KVCache, batch: attention.AttentionBatch,
               all_logits: bool = False):
    logits, cache = llama.forward(params, tokens, cache, batch, self.cfg, all_logits)
    pin = lambda a, s: jax.lax.with_sharding_constraint(a, s)
    cache = jax.tree.map(pin, cache, _cache_shardings(self.mesh, self.parallel, cache,
                                                      self.cfg.num_kv_heads))
    return pin(logits, NamedSharding(self.mesh, P())), cache


@dataclasses.dataclass(frozen=True)
class PipelineForward:
  """Single-batch ``forward(params, tokens, cache, batch)`` over the pp stages (dp == 1, M = 1)."""
  cfg: llama.LlamaConfig
  parallel: ParallelConfig
  mesh: Mesh

  def __call__(self, params, tokens, cache: pipeline.StagedKVCache, batch: attention.AttentionBatch,
               all_logits: bool = False):
    one = dataclasses.replace(self.parallel, microbatches=1)
    fwd = pipeline.make_pipeline_forward(self.cfg, one, self.mesh, all_logits)
    logits, cache = fwd(params, tokens[None, None], cache, jax.tree.map(lambda a: a[None, None], batch))
    return logits[0, 0], cache


@dataclasses.dataclass
class ShardedModel(LoadedModel):
  parallel: ParallelConfig = ParallelConfig()
  mesh: Mesh | None = None

  @property
  def staged(self) -> bool:
    """Params and cache are stacked per stage (``sharding.pipeline``)."""
    return _staged(self.parallel)

  @property
  def step_forward(self):
    """The un-jitted, hashable forward for the engine's step (it jits the whole step itself)."""
    if self.architecture == "deepseek_v3":
      return deepseek.ShardedForward(self.config, self.parallel, self.mesh)
    if self.parallel.num_ranks > 1:
      raise ParallelConfigError(
          f"{self.parallel.describe()} needs one batch per rank: use pipeline_forward with stacked "
          "batches, or serve dp replicas with sharding.replicas (the single-batch engine step "
          "cannot feed ranks)")
    cls = PipelineForward if self.parallel.pp > 1 else TensorParallelForward
    return cls(self.config, self.parallel, self.mesh)

  @property
  def forward(self):
    return _jit_forward(self.step_forward)

  def pipeline_forward(self, all_logits: bool = False):
    """(params, tokens [R, M, T], StagedKVCache, batches [R, M, ...]) -> (logits [R, M, B, V], cache);
    R = ``parallel.num_ranks``."""
    return pipeline.make_pipeline_forward(self.config, self.parallel, self.mesh, all_logits)

  def create_cache(self, num_pages: int, page_size: int, dtype=None):
    dtype = dtype or self.params["final_norm"].dtype
    if self.architecture == "deepseek_v3":
      cache = deepseek_v3.create_cache(self.config, num_pages=num_pages, page_size=page_size,
                                       dtype=dtype)
      page, scale = deepseek.latent_cache_spec(self.parallel)
      return jax.device_put(cache, deepseek_v3.LatentCache(
          tuple(NamedSharding(self.mesh, page) for _ in cache.latent), NamedSharding(self.mesh, scale)))
    if self.staged:
      ranks = self.parallel.num_ranks
      if num_pages % ranks:
        raise ParallelConfigError(f"num_pages ({num_pages}) must be divisible by the data-parallel "
                                  f"ranks ({ranks}): each owns num_pages/{ranks} pages")
      cache = pipeline.StagedKVCache.from_cache(
          llama.create_cache(self.config, num_pages=num_pages, page_size=page_size, dtype=dtype),
          self.parallel.pp)
      spec = pipeline.staged_cache_spec(self.parallel, self.config.num_kv_heads)
      return jax.device_put(cache, rules.named(self.mesh, spec))
    cache = llama.create_cache(self.config, num_pages=num_pages, page_size=page_size, dtype=dtype)
    return jax.device_put(cache, _cache_shardings(self.mesh, self.parallel, cache,
                                                  self.config.num_kv_heads))

  def save(self, folder) -> None:
    raise NotImplementedError("save the unsharded LoadedModel")


def _staged(parallel: ParallelConfig) -> bool:
  return parallel.pp > 1 or parallel.num_ranks > 1


@functools.lru_cache(maxsize=None)
def _jit_forward(fwd):
  return jax.jit(fwd, static_argnames=("all_logits",), donate_argnums=(2,))


def shard_model(model: LoadedModel, parallel: ParallelConfig, devices=None) -> ShardedModel:
  """Validates ``parallel`` against the model and devices, places params on the mesh."""
  if model.architecture not in ("llama", "deepseek_v3"):
    raise ParallelConfigError(f"shard_model supports llama and deepseek_v3; got "
                              f"{model.architecture!r}")
  parallel.validate(model.config, None if devices is None else len(devices))
  mesh = parallel.make_mesh(devices)
  cfg = model.config
  if model.architecture == "deepseek_v3":
    if _staged(parallel):
      raise ParallelConfigError(
          f"{parallel.describe()}: DeepSeek-V3 through shard_model (LLM, the engine) runs TP / EP / "
          "TP+EP; attention-DP and PP take per-rank microbatches (sharding.deepseek.make_forward, "
          "make_pipeline_forward), and dp runs as engine replicas (LLM with dp > 1)")
    params = jax.device_put(model.params,
                            rules.named(mesh, deepseek.param_specs(cfg, model.params, parallel)))
    return ShardedModel(model.architecture, cfg, params, model.tokenizer, model.source,
                        parallel=parallel, mesh=mesh)
  if _staged(parallel):
    params = pipeline.stage_params(model.params, parallel.pp)
    specs = pipeline.staged_param_specs(params, parallel, pipeline.llama_layer_axes(cfg, parallel))
  else:
    params, specs = model.params, llama_param_specs(cfg, model.params, parallel)
  params = jax.device_put(params, rules.named(mesh, specs))
  return ShardedModel(model.architecture, cfg, params, model.tokenizer, model.source,
                      parallel=parallel, mesh=mesh)
