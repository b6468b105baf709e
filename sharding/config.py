"""ParallelConfig: how a model is laid out over devices, validated, and the named mesh it builds.

Mesh axes, outermost first (``tp`` innermost so tensor-parallel collectives stay on the fastest links):

    dp  full-model replicas, each with its own sequences and KV cache pages
    pp  pipeline stages (consecutive blocks of layers), activations passed with ppermute
    ep  expert parallelism; for attention this axis is either more tensor parallelism
        (``attention_dp=False``: heads split over ep x tp) or data parallelism
        (``attention_dp=True``: each ep rank runs attention on its own tokens and KV pages,
        which is how MLA avoids duplicating its head-less latent cache)
    tp  tensor parallelism (Megatron: heads / MLP columns, and each expert's intermediate dim)

Devices used: dp * pp * ep * tp (the first that many of ``jax.devices()``). The configurations of the
issue on 8 devices: TP8 = (tp=8); EP8 = (ep=8) [attention TP8]; TP+EP = (ep=4, tp=2) [attention TP8,
experts 4-way, each expert 2-way TP]; ADP8+EP8 = (ep=8, attention_dp=True); PP4xTP2 = (pp=4, tp=2);
DP2xTP4 = (dp=2, tp=4). A dense model (Llama) takes ep only with attention_dp: ADP4 + MLP TP4 =
(ep=4, attention_dp=True, adp_mlp="tp").
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxinfer.errors import UnsupportedModelError

MESH_AXES = ("dp", "pp", "ep", "tp")


class ParallelConfigError(UnsupportedModelError, ValueError):
  """A ParallelConfig does not fit the devices or the model; the message names the constraint."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  dp: int = 1
  pp: int = 1
  tp: int = 1
  ep: int = 1
  attention_dp: bool = False
  # MoE dispatch/combine: "auto" (message-size model), "all_to_all" (fixed buffers),
  # "ragged_all_to_all" (only the routed rows) or "allgather" (AG/RS).
  moe_comm: str = "auto"
  # Payload of the MoE dispatch all-to-all: "bf16" (the activations' dtype), "fp8" or "nvfp4".
  moe_dispatch_dtype: str = "bf16"
  microbatches: int = 0  # pipeline microbatches per step; 0: pp
  # With attention_dp, a dense MLP runs "dp" (weights replicated over ep, each rank its own tokens)
  # or "tp" (split over ep*tp; tokens all-gathered over ep before it, reduce-scattered after).
  adp_mlp: str = "dp"

  def __post_init__(self):
    for name in ("dp", "pp", "tp", "ep"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ParallelConfigError(f"{name} must be a positive integer, got {v!r}")
    if self.attention_dp and self.ep == 1:
      raise ParallelConfigError("attention_dp=True runs attention data parallel over the ep axis: "
                                "it needs ep > 1")
    if self.moe_comm not in ("auto", "all_to_all", "ragged_all_to_all", "allgather"):
      raise ParallelConfigError("moe_comm must be auto | all_to_all | ragged_all_to_all | "
                                f"allgather, got {self.moe_comm!r}")
    if self.moe_dispatch_dtype not in ("bf16", "fp8", "nvfp4"):
      raise ParallelConfigError(
          f"moe_dispatch_dtype must be bf16 | fp8 | nvfp4, got {self.moe_dispatch_dtype!r}")
    if self.adp_mlp not in ("dp", "tp"):
      raise ParallelConfigError(f"adp_mlp must be dp | tp, got {self.adp_mlp!r}")
    if self.microbatches < 0:
      raise ParallelConfigError(f"microbatches must be >= 0, got {self.microbatches}")

  @property
  def num_devices(self) -> int:
    return self.dp * self.pp * self.ep * self.tp

  @property
  def attention_tp(self) -> int:
    """Ways each attention layer's heads are split."""
    return self.tp if self.attention_dp else self.ep * self.tp

  @property
  def attention_tp_axes(self) -> tuple[str, ...]:
    return ("tp",) if self.attention_dp else ("ep", "tp")

  @property
  def mlp_tp_axes(self) -> tuple[str, ...]:
    """Mesh axes a dense MLP's intermediate dim is split over."""
    return ("ep", "tp") if self.attention_dp and self.adp_mlp == "tp" else self.attention_tp_axes

  @property
  def num_ranks(self) -> int:
    """Data-parallel ranks, each with its own sequences and KV pages: dp, times ep under
    attention_dp."""
    return self.dp * (self.ep if self.attention_dp else 1)

  @property
  def num_microbatches(self) -> int:
    return self.microbatches or self.pp

  def describe(self) -> str:
    parts = [f"{k}{getattr(self, k)}" for k in ("dp", "pp", "tp", "ep") if getattr(self, k) > 1]
    if self.attention_dp:
      parts.append(f"adp{self.ep}" + ("-mlptp" if self.adp_mlp == "tp" else ""))
    if self.moe_comm != "auto":
      parts.append(self.moe_comm)
    return "+".join(parts) or "single"

  def validate(self, model_config: Any = None, num_devices: int | None = None) -> None:
    """Raises ParallelConfigError naming the first violated constraint."""
    available = jax.device_count() if num_devices is None else num_devices
    if self.num_devices > available:
      raise ParallelConfigError(
          f"dp*pp*ep*tp = {self.dp}*{self.pp}*{self.ep}*{self.tp} = {self.num_devices} devices "
          f"needed, but only {available} are available")
    if model_config is not None:
      check_model(self, model_config)

  def make_mesh(self, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    self.validate(num_devices=len(devices))
    grid = np.asarray(devices[:self.num_devices], dtype=object).reshape(
        self.dp, self.pp, self.ep, self.tp)
    return Mesh(grid, MESH_AXES)


def _divides(what: str, n: int, name: str, ways: int) -> None:
  if n % ways:
    raise ParallelConfigError(f"{what} ({n}) must be divisible by {name} ({ways})")


def check_model(parallel: ParallelConfig, cfg: Any) -> None:
  """Model-shape constraints: heads by the attention TP, experts by ep, layers by pp, ..."""
  atp = parallel.attention_tp
  atp_name = ("tp" if parallel.attention_dp or parallel.ep == 1 else
              "ep*tp (attention is tensor parallel over ep and tp without attention_dp)")
  num_layers = cfg.num_layers
  dense_prefix = getattr(cfg, "first_k_dense_replace", 0) if parallel.pp > 1 else 0
  if dense_prefix:  # DeepSeek: the dense layers run on stage 0, the MoE layers split over stages
    num_moe = num_layers - min(dense_prefix, num_layers)
    _divides("the number of MoE layers (num_layers - first_k_dense_replace)", num_moe, "pp",
             parallel.pp)
    if num_moe == 0:
      raise ParallelConfigError(f"pp={parallel.pp} splits the MoE layers over stages, but this "
                                "model has none")
  else:
    _divides("num_layers", num_layers, "pp", parallel.pp)
  _divides("num_heads", cfg.num_heads, atp_name, atp)
  kv_heads = getattr(cfg, "num_kv_heads", None)
  if kv_heads is not None and not getattr(cfg, "kv_lora_rank", None):
    if kv_heads % atp and atp % kv_heads:  # fewer KV heads than ranks: they are replicated
      raise ParallelConfigError(f"num_kv_heads ({kv_heads}) must be divisible by {atp_name} ({atp}) "
                                f"or divide it (KV heads are then replicated)")
  dense_mlp = getattr(cfg, "intermediate_size", None)
  if dense_mlp:
    mlp_ways = parallel.ep * parallel.tp if parallel.mlp_tp_axes == ("ep", "tp") else atp
    _divides("intermediate_size", dense_mlp, "ep*tp" if mlp_ways != atp else atp_name, mlp_ways)
  experts = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None)
  if parallel.ep > 1 and not experts and not parallel.attention_dp:
    raise ParallelConfigError(
        f"ep={parallel.ep} shards experts, but this model ({type(cfg).__name__}) has none; "
        "use tp for a dense model (or attention_dp=True: attention data parallel over ep)")
  if experts:
    _divides("the number of routed experts", experts, "ep", parallel.ep)
    moe_mlp = getattr(cfg, "moe_intermediate_size", None)
    if moe_mlp:
      _divides("moe_intermediate_size", moe_mlp, "tp", parallel.tp)
