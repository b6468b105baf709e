"""The one logical-axis -> mesh-axis rule table, and the param / cache / activation shardings built from it.

Models declare beside their weights which logical axis each dimension is (``llama.LAYER_AXES``:
``wq: ("embed", "q_heads")`` ...). ``logical_rules`` maps those names onto the mesh axes of
``sharding.config``; everything else here only applies the table.

    logical axis   mesh axes                      meaning
    vocab          tp (if it divides)             vocab-parallel embedding / LM head
    embed          -                              the residual stream stays whole
    q_heads        ep,tp  (tp with attention_dp)  Megatron column split of Wq, row split of Wo
    kv_heads       ep,tp  (tp with attention_dp)  Wk/Wv columns and the KV cache's head dim
    mlp            ep,tp  (tp with attention_dp,  dense MLP: column-parallel gate/up, row-parallel down
                   ep,tp again with adp_mlp="tp")
    experts        ep                             routed experts
    moe_mlp        tp                             each expert's intermediate dim (TP inside EP);
                                                  "mlp" in a weight that also has "experts" means this
    q_lora,kv_lora -                              MLA's low-rank projections stay whole
    stage          pp                             the stacked per-stage layer dim of pipeline params
    pages          dp (+ep with attention_dp)     KV cache pages: each replica owns its own pages
    tokens         dp (+ep with attention_dp)     flattened tokens of a step

Under ``attention_dp`` the attention weights are replicated over ``ep`` (each ep rank attends its own
tokens), so nothing is split over ``ep`` except experts, pages and tokens.
"""
from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.config import ParallelConfig, ParallelConfigError

# Logical axes where a size the mesh does not divide falls back to replication instead of an error.
_REPLICATE_IF_UNEVEN = ("vocab",)


def logical_rules(parallel: ParallelConfig) -> dict[str, tuple[str, ...]]:
  attn = parallel.attention_tp_axes
  data = ("dp", "ep") if parallel.attention_dp else ("dp",)
  return {
      "vocab": ("tp",), "embed": (), "q_heads": attn, "kv_heads": attn, "mlp": parallel.mlp_tp_axes,
      "experts": ("ep",), "moe_mlp": ("tp",), "stage": ("pp",), "pages": data, "tokens": data,
      "q_lora": (), "kv_lora": (),
  }


def _axis_size(mesh_axes: tuple[str, ...], parallel: ParallelConfig) -> int:
  return math.prod(getattr(parallel, a) for a in mesh_axes)


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...],
             parallel: ParallelConfig) -> P:
  """PartitionSpec of an array with these logical axes; size-1 mesh axes are left out."""
  rules = logical_rules(parallel)
  if "experts" in logical:  # an expert's own intermediate dim: TP inside EP, never over ep again
    logical = tuple("moe_mlp" if a == "mlp" else a for a in logical)
  if len(logical) != len(shape):
    raise ParallelConfigError(f"logical axes {logical} do not match shape {shape}")
  out = []
  for name, dim in zip(logical, shape):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ParallelConfigError(f"no sharding rule for logical axis {name!r}")
    axes = tuple(a for a in rules[name] if getattr(parallel, a) > 1)
    ways = _axis_size(axes, parallel)
    if dim % ways:
      if name in _REPLICATE_IF_UNEVEN:
        axes = ()
      else:
        raise ParallelConfigError(f"{name} ({dim}) must be divisible by {'*'.join(axes)} ({ways})")
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_specs(params: Any, axes: Any, parallel: ParallelConfig, prefix: tuple = ()) -> Any:
  """PartitionSpecs mirroring ``params``. ``axes`` mirrors its dict structure down to logical-axis
  tuples; a list of layers is matched against one axes dict. Unlisted weights are replicated."""
  if isinstance(params, dict):
    return {k: param_specs(v, (axes or {}).get(k) if isinstance(axes, dict) else None, parallel,
                           prefix + (k,)) for k, v in params.items()}
  if isinstance(params, (list, tuple)):
    return type(params)(param_specs(v, axes, parallel, prefix) for v in params)
  if isinstance(axes, tuple) and hasattr(params, "shape"):
    return spec_for(axes, tuple(params.shape), parallel)
  return P()


def named(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def kv_cache_spec(parallel: ParallelConfig, kv_heads: int) -> P:
  """Paged K/V [num_pages, page_size, kv_heads, head_dim]; num_pages is checked where pages exist."""
  rules = logical_rules(parallel)
  pages = tuple(a for a in rules["pages"] if getattr(parallel, a) > 1)
  heads = () if kv_heads == 1 else tuple(a for a in rules["kv_heads"] if getattr(parallel, a) > 1)
  if kv_heads % _axis_size(heads, parallel):
    heads = ()  # fewer KV heads than ranks (MQA): replicate rather than split a head
  pick = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes
  return P(pick(pages), None, pick(heads), None)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
