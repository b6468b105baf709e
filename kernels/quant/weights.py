"""Quantized weight pytrees. Each computes ``x[..., K] @ W[K, N]`` in x's dtype via ``linear``.

Storage follows the checkpoints (K last): NVFP4 as ModelOpt ([N, K/2] uint8, [N, K/16] e4m3, f32),
FP8 as DeepSeek-V3 ([N, K] e4m3, [N/128, K/128] f32). ``from_modelopt`` / ``from_deepseek`` take
the checkpoint tensors byte-for-byte (no repacking); ``from_dense`` quantizes a [K, N] matrix.
NVFP4 weights carry a static ``layout``: "modelopt" (the checkpoint bytes), "kernel" (the same
codes K-permuted by kernels/quant/nvfp4.to_kernel_layout for the Triton decode kernels, K a
multiple of 256) or "mgpu" (codes and scales in the fragment-ordered records of the Mosaic GPU
decode kernels: dense kernels/nvfp4_matmul_mgpu.to_mgpu_layout, uint32 [N/64, K/256, 72, 32];
grouped kernels/grouped_nvfp4_matmul_mgpu.to_grouped_mgpu_layout, uint32 [E, S, K/256, 72, 32];
``scale`` keeps the ModelOpt copy); ``to_kernel_layout()`` / ``to_mgpu_layout()`` repack once,
``to_modelopt()`` / ``modelopt_packed()`` give the checkpoint bytes back exactly.
Grouped (MoE) variants stack experts on a leading axis E and are consumed by
``kernels.gemm.grouped_matmul``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ShapeError
from kernels.quant import fp8_block, nvfp4


def _as_f32_scale(s, shape: tuple[int, ...], name: str) -> jax.Array:
  """Checkpoint scalars come as [] or [1]; accept any shape of the right size."""
  dtype = s.dtype if hasattr(s, "dtype") else np.asarray(s).dtype
  if dtype != np.float32:
    raise ShapeError(f"{name} must be float32, got {dtype}")
  s = jnp.asarray(s)
  if s.dtype != jnp.float32:
    raise ShapeError(f"{name} must be float32, got {s.dtype}")
  if s.size != math.prod(shape):
    raise ShapeError(f"{name} must have {math.prod(shape)} element(s) {shape}, got shape {s.shape}")
  return s.reshape(shape)


NVFP4_LAYOUTS = ("modelopt", "kernel", "mgpu")


def _layout_field():
  return dataclasses.field(default="modelopt", metadata={"static": True})


def _check_nvfp4_layout(layout: str) -> None:
  if layout not in NVFP4_LAYOUTS:
    raise ShapeError(f"NVFP4 layout must be one of {NVFP4_LAYOUTS}, got {layout!r}")


class _NVFP4Layout:
  """Layout switching shared by the dense and grouped NVFP4 weights (fields ``packed``, ``layout``)."""

  def __post_init__(self):
    _check_nvfp4_layout(self.layout)

  def modelopt_packed(self) -> jax.Array:
    """The packed codes in the ModelOpt (checkpoint) layout."""
    if self.layout == "mgpu" and self.packed.ndim == 5:      # grouped records
      from kernels import grouped_nvfp4_matmul_mgpu   # noqa: PLC0415
      return grouped_nvfp4_matmul_mgpu.from_grouped_mgpu_layout(self.packed, self.n, self.k)[0]
    if self.layout == "mgpu":
      from kernels import nvfp4_matmul_mgpu   # noqa: PLC0415  (kernels import this module)
      return nvfp4_matmul_mgpu.from_mgpu_layout(self.packed, self.n, self.k)[0]
    return nvfp4.from_kernel_layout(self.packed) if self.layout == "kernel" else self.packed

  def to_kernel_layout(self):
    """The same weight with its bytes repacked for the decode kernels (K % 256 == 0)."""
    if self.layout == "kernel":
      return self
    return dataclasses.replace(self, packed=nvfp4.to_kernel_layout(self.modelopt_packed()),
                               layout="kernel")

  def to_modelopt_layout(self):
    if self.layout == "modelopt":
      return self
    return dataclasses.replace(self, packed=self.modelopt_packed(), layout="modelopt")


def _flatten_rows(x: jax.Array, k: int) -> jax.Array:
  if x.shape[-1] != k:
    raise ShapeError(f"activation last dim {x.shape[-1]} does not match weight K={k}")
  return x.reshape(-1, k)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NVFP4Weight(_NVFP4Layout):
  """NVFP4 Linear weight (ModelOpt layout). packed [N, K/2] u8, scale [N, K/16] e4m3, global f32 []."""
  packed: jax.Array
  scale: jax.Array
  global_scale: jax.Array
  input_scale: jax.Array | None = None
  layout: str = _layout_field()

  @property
  def k(self) -> int:
    return self.scale.shape[-1] * 16      # the scales keep the ModelOpt layout in every layout

  @property
  def n(self) -> int:
    return self.scale.shape[-2]

  def to_mgpu_layout(self) -> "NVFP4Weight":
    """The same weight repacked for the Mosaic GPU decode kernel (kernels/nvfp4_matmul_mgpu)."""
    if self.layout == "mgpu":
      return self
    from kernels import nvfp4_matmul_mgpu   # noqa: PLC0415
    return dataclasses.replace(
        self, packed=nvfp4_matmul_mgpu.to_mgpu_layout(self.modelopt_packed(), self.scale),
        layout="mgpu")

  @classmethod
  def from_dense(cls, w_kn: jax.Array, global_scale: jax.Array | None = None) -> "NVFP4Weight":
    if w_kn.ndim != 2:
      raise ShapeError(f"NVFP4Weight.from_dense wants a [K, N] matrix, got {w_kn.shape}")
    packed, scale, gs = nvfp4.quantize(w_kn.T, global_scale)
    return cls(packed, scale, gs)

  @classmethod
  def from_modelopt(cls, weight, weight_scale, weight_scale_2, input_scale=None) -> "NVFP4Weight":
    """ModelOpt tensors as stored: weight u8 [N, K/2], weight_scale e4m3 [N, K/16], f32 scalars."""
    weight, weight_scale = jnp.asarray(weight), jnp.asarray(weight_scale)
    if weight.ndim != 2:
      raise ShapeError(f"NVFP4 weight must be [N, K/2], got {weight.shape}")
    nvfp4.check_layout(weight, weight_scale)
    gs = _as_f32_scale(weight_scale_2, (), "weight_scale_2")
    ins = None if input_scale is None else _as_f32_scale(input_scale, (), "input_scale")
    return cls(weight, weight_scale, gs, ins)

  def to_modelopt(self) -> dict[str, jax.Array]:
    out = {"weight": self.modelopt_packed(), "weight_scale": self.scale,
           "weight_scale_2": self.global_scale}
    if self.input_scale is not None:
      out["input_scale"] = self.input_scale
    return out

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """Dense [K, N]."""
    return nvfp4.dequantize(self.modelopt_packed(), self.scale, self.global_scale, dtype).T

  def linear(self, x: jax.Array) -> jax.Array:
    from kernels import gemm
    y = gemm.nvfp4_matmul(_flatten_rows(x, self.k), self)
    return y.reshape(*x.shape[:-1], self.n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FP8BlockWeight:
  """DeepSeek-V3 FP8 Linear weight: weight e4m3 [N, K], scale_inv f32 [ceil(N/128), ceil(K/128)]."""
  weight: jax.Array
  scale_inv: jax.Array

  @property
  def k(self) -> int:
    return self.weight.shape[-1]

  @property
  def n(self) -> int:
    return self.weight.shape[-2]

  @classmethod
  def from_dense(cls, w_kn: jax.Array) -> "FP8BlockWeight":
    if w_kn.ndim != 2:
      raise ShapeError(f"FP8BlockWeight.from_dense wants a [K, N] matrix, got {w_kn.shape}")
    return cls(*fp8_block.quantize_weight(w_kn.T))

  @classmethod
  def from_deepseek(cls, weight, weight_scale_inv) -> "FP8BlockWeight":
    weight, weight_scale_inv = jnp.asarray(weight), jnp.asarray(weight_scale_inv)
    if weight.ndim != 2:
      raise ShapeError(f"FP8 weight must be [N, K], got {weight.shape}")
    fp8_block.check_weight_layout(weight, weight_scale_inv)
    return cls(weight, weight_scale_inv)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return fp8_block.dequantize_weight(self.weight, self.scale_inv, dtype).T

  def linear(self, x: jax.Array) -> jax.Array:
    from kernels import gemm
    y = gemm.fp8_block_matmul(_flatten_rows(x, self.k), self)
    return y.reshape(*x.shape[:-1], self.n)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupedNVFP4Weight(_NVFP4Layout):
  """Per-expert NVFP4: packed [E, N, K/2] u8, scale [E, N, K/16] e4m3, global_scale f32 [E]."""
  packed: jax.Array
  scale: jax.Array
  global_scale: jax.Array
  input_scale: jax.Array | None = None
  layout: str = _layout_field()

  def __post_init__(self):
    super().__post_init__()
    p = self.packed
    if self.layout == "mgpu" and hasattr(p, "ndim") and (p.ndim != 5 or p.dtype != jnp.uint32):
      raise ShapeError(f"a grouped NVFP4 weight in the Mosaic GPU ('mgpu') layout holds "
                       f"to_grouped_mgpu_layout's uint32 [E, S, K/256, 72, 32] records, got "
                       f"{p.dtype}{list(p.shape)}: repack with to_mgpu_layout() (ModelOpt bytes "
                       f"as the mgpu layout: valid for dense weights only)")

  @property
  def num_groups(self) -> int:
    return self.packed.shape[0]

  @property
  def k(self) -> int:
    return self.scale.shape[-1] * 16      # the scales keep the ModelOpt layout in every layout

  @property
  def n(self) -> int:
    return self.scale.shape[-2]

  def to_mgpu_layout(self) -> "GroupedNVFP4Weight":
    """The same weight repacked for the grouped Mosaic GPU decode kernel
    (kernels/grouped_nvfp4_matmul_mgpu)."""
    if self.layout == "mgpu":
      return self
    from kernels import grouped_nvfp4_matmul_mgpu   # noqa: PLC0415
    return dataclasses.replace(
        self, packed=grouped_nvfp4_matmul_mgpu.to_grouped_mgpu_layout(self.modelopt_packed(),
                                                                      self.scale),
        layout="mgpu")

  @classmethod
  def from_dense(cls, w_ekn: jax.Array) -> "GroupedNVFP4Weight":
    if w_ekn.ndim != 3:
      raise ShapeError(f"GroupedNVFP4Weight.from_dense wants [E, K, N], got {w_ekn.shape}")
    packed, scale, gs = jax.vmap(lambda w: nvfp4.quantize(w.T))(w_ekn)
    return cls(packed, scale, gs)

  @classmethod
  def from_modelopt(cls, weight, weight_scale, weight_scale_2, input_scale=None
                    ) -> "GroupedNVFP4Weight":
    """Experts' ModelOpt tensors stacked: [E, N, K/2] u8, [E, N, K/16] e4m3, [E] f32."""
    weight, weight_scale = jnp.asarray(weight), jnp.asarray(weight_scale)
    if weight.ndim != 3:
      raise ShapeError(f"grouped NVFP4 weight must be [E, N, K/2], got {weight.shape}")
    nvfp4.check_layout(weight, weight_scale)
    e = weight.shape[0]
    gs = _as_f32_scale(weight_scale_2, (e,), "weight_scale_2")
    ins = None if input_scale is None else jnp.asarray(input_scale, jnp.float32)
    return cls(weight, weight_scale, gs, ins)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """Dense [E, K, N]."""
    return jnp.swapaxes(nvfp4.dequantize(self.modelopt_packed(), self.scale, self.global_scale,
                                         dtype), 1, 2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupedFP8BlockWeight:
  """Per-expert DeepSeek FP8: weight e4m3 [E, N, K], scale_inv f32 [E, N/128, K/128]."""
  weight: jax.Array
  scale_inv: jax.Array

  @property
  def num_groups(self) -> int:
    return self.weight.shape[0]

  @property
  def k(self) -> int:
    return self.weight.shape[-1]

  @property
  def n(self) -> int:
    return self.weight.shape[-2]

  @classmethod
  def from_dense(cls, w_ekn: jax.Array) -> "GroupedFP8BlockWeight":
    if w_ekn.ndim != 3:
      raise ShapeError(f"GroupedFP8BlockWeight.from_dense wants [E, K, N], got {w_ekn.shape}")
    return cls(*fp8_block.quantize_weight(jnp.swapaxes(w_ekn, 1, 2)))

  @classmethod
  def from_deepseek(cls, weight, weight_scale_inv) -> "GroupedFP8BlockWeight":
    weight, weight_scale_inv = jnp.asarray(weight), jnp.asarray(weight_scale_inv)
    if weight.ndim != 3:
      raise ShapeError(f"grouped FP8 weight must be [E, N, K], got {weight.shape}")
    fp8_block.check_weight_layout(weight, weight_scale_inv)
    return cls(weight, weight_scale_inv)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return jnp.swapaxes(fp8_block.dequantize_weight(self.weight, self.scale_inv, dtype), 1, 2)
