"""Low-precision Wan DiT: FP8 GEMMs on XLA's native FP8 dot, FP8 attention on cuDNN, NVFP4 weights.

The FP8 path (``quantize_block(block, "fp8", stats)``) is built so that quantization adds no pass over
the activations:

  * weights are quantized offline: E4M3 stored [N, K] (K minor, cuBLASLt's FP8 "TN" layout, so no
    transpose at run time) with one f32 scale per output channel;
  * q/k/v share one input and are one GEMM ("wqkv" [D, 3D]); the cross-attention's text k/v too;
  * activation scales are static, calibrated (Transformer-Engine / TensorRT style): one calibration
    forward records max|x| of every linear's input and the Q / K / V statistics of every attention
    (``calibrating`` + ``merge_stats``). Quantizing is then ``clip(x · 1/s)`` → E4M3, an elementwise op
    that XLA fuses into the op producing x (LayerNorm + modulation, GELU, RoPE, the bias add), which
    then writes 1 byte per value instead of 2;
  * the dot is ``dot_general(E4M3, E4M3) -> bf16`` (cuBLASLt FP8, f32 accumulation); the per-tensor
    activation scale × per-channel weight scale is applied to its output by the consumer (bias add,
    RMSNorm, GELU, gated residual), which reads that output anyway.
  ``stats=None`` gives dynamic per-token activation scales instead (rowwise FP8: a row amax before each
  GEMM, computed where XLA can fuse it into the producer).

FP8 attention (``FP8Attention``, SageAttention-style): K is smoothed by subtracting its mean over
tokens (softmax-invariant: q·(k − m) differs from q·k by a per-row constant), Q / K / V / P are per-
tensor E4M3. With calibrated scales and a calibrated (delayed) mean there is no reduction over Q, K or
V at run time: the subtraction and the casts fuse into the RoPE / bias fusions that produce q, k, v.
``fp8_cudnn_attention`` is the dynamic version (amax and mean each step: extra passes).

Also: "fp8xla" (XlaFP8Weight: per-tensor scales computed on the fly, the old path kept for
comparison), "fp8block" / "nvfp4" (kernels.quant weight types through ops.linear: W4A16, which
kernels.gemm runs as dequantize + XLA dot from 512 rows), and "nvfp4a4" (NVFP4W4A4Weight: W4A4 through
kernels.gemm.nvfp4_w4a4_matmul, the NVFP4 GEMM proper: x quantized to NVFP4 with a calibrated global
scale by the Pallas quantizer, then the kernels/nvfp4_matmul W4A4 kernel, which Hopper emulates by
dequantizing both operands to bf16 in registers; Blackwell has the native block-scaled MMA).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.models import wan_dit
from jaxinfer.ops import E4M3_MAX, fp8_dot, quantize_fp8_per_channel

_TINY = 1e-12
F8 = jnp.float8_e4m3fn


def quantize_e4m3(x: jax.Array, scale) -> jax.Array:
  """E4M3 codes of x / scale, saturated at ±448 (a static scale can be exceeded; E4M3FN has no inf)."""
  return jnp.clip(x.astype(jnp.float32) * (1.0 / scale), -E4M3_MAX, E4M3_MAX).astype(F8)


# ----------------------------------------------------------------------------------------------
# FP8 GEMM (the dot and the per-channel weight quantization are jaxinfer.ops')

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaledFP8Weight:
  """E4M3 weight [N, K] with a per-output-channel scale [N]; ``x_scale`` is the static per-tensor
  activation scale (calibrated amax / 448) or None for dynamic per-token scales.

  linear(x) = (E4M3(x / sx) · E4M3(W / sw)ᵀ) · sx · sw, the dot in cuBLASLt FP8 with f32 accumulation
  and bf16 output."""
  w: jax.Array
  w_scale: jax.Array
  x_scale: jax.Array | None

  @classmethod
  def from_dense(cls, w, x_amax=None):
    """w [K, N] (any float dtype); ``x_amax`` the calibrated max|x| of this linear's input."""
    x_scale = None if x_amax is None else jnp.maximum(jnp.asarray(x_amax, jnp.float32), _TINY) / E4M3_MAX
    return cls(*quantize_fp8_per_channel(w), x_scale)

  def qdot(self, xq: jax.Array, sx, out_dtype=jnp.bfloat16) -> jax.Array:
    """Already-quantized xq [..., K] (E4M3) with its scale (scalar or [..., 1]) -> [..., N]."""
    y = fp8_dot(xq, self.w)
    return (y.astype(jnp.float32) * (sx * self.w_scale)).astype(out_dtype)

  def quantize_input(self, x: jax.Array):
    if self.x_scale is not None:
      return quantize_e4m3(x, self.x_scale), self.x_scale
    sx = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True), _TINY) / E4M3_MAX
    return quantize_e4m3(x, sx), sx

  def linear(self, x: jax.Array) -> jax.Array:
    return self.qdot(*self.quantize_input(x), out_dtype=x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class XlaFP8Weight:
  """Per-tensor scaled E4M3 weight [K, N]; activations quantized per tensor on the fly (an amax pass
  and a cast pass per linear). Written in the dot(convert(a)·sa, convert(b)·sb) pattern that XLA
  rewrites into one cuBLASLt FP8 GEMM. The first FP8 path, kept for comparison."""
  w: jax.Array
  scale: jax.Array

  @classmethod
  def from_dense(cls, w):
    s = jnp.max(jnp.abs(w.astype(jnp.float32))) / E4M3_MAX
    return cls((w.astype(jnp.float32) / s).astype(F8), s)

  def linear(self, x):
    sx = jnp.max(jnp.abs(x.astype(jnp.float32))) / E4M3_MAX
    xq = (x.astype(jnp.float32) / sx).astype(F8)
    y = jnp.einsum("...k,kn->...n", xq.astype(jnp.bfloat16) * sx.astype(jnp.bfloat16),
                   self.w.astype(jnp.bfloat16) * self.scale.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NVFP4W4A4Weight:
  """NVFP4 weight whose linear quantizes x to NVFP4 too (W4A4, kernels.gemm.nvfp4_w4a4_matmul).
  ``w.input_scale`` is the calibrated activation global scale (amax / (6 · 448)); None: amax per call."""
  w: Any

  @classmethod
  def from_dense(cls, w, x_amax=None):
    from kernels.quant import nvfp4  # pylint: disable=import-outside-toplevel
    from kernels.quant.weights import NVFP4Weight  # pylint: disable=import-outside-toplevel
    qw = NVFP4Weight.from_dense(jnp.asarray(w))
    if x_amax is not None:
      amax = jnp.maximum(jnp.asarray(x_amax, jnp.float32), _TINY)
      qw = dataclasses.replace(qw, input_scale=amax / (nvfp4.E2M1_MAX * nvfp4.E4M3_MAX))
    return cls(qw)

  def linear(self, x: jax.Array) -> jax.Array:
    from kernels import gemm  # pylint: disable=import-outside-toplevel
    y = gemm.nvfp4_w4a4_matmul(x.reshape(-1, x.shape[-1]), self.w)
    return y.reshape(*x.shape[:-1], self.w.n)


# ----------------------------------------------------------------------------------------------
# FP8 attention

def _cudnn_fp8(qq, kq, vq, sq, sk, sv, head_dim: int, out_dtype):
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=import-outside-toplevel
  as4 = lambda s: jnp.asarray(s, jnp.float32).reshape(1, 1, 1, 1)
  one = jnp.ones((1, 1, 1, 1), jnp.float32)
  params = {k_: one for k_ in cudnn.fp8_params_keys}
  params |= {"descale_q": as4(sq), "descale_k": as4(sk), "descale_v": as4(sv),
             "descale_s": one / 256.0, "scale_s": one * 256.0, "scale_o": 1.0 / as4(sv)}
  out, _, _ = cudnn.dot_product_attention(qq, kq, vq, fp8_params=params, scale=head_dim ** -0.5,
                                          use_fp8=True, qkv_layout="BTNH")
  return (out.astype(jnp.float32) * jnp.asarray(sv, jnp.float32)).astype(out_dtype)   # |o| <= max|v|


def fp8_cudnn_attention(q, k, v, quant=None):
  """Dynamic SageAttention-style FP8 attention on cuDNN: K mean and Q/K/V amax computed every call."""
  if quant is not None:
    return quant(q, k, v)
  k = k - jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True).astype(k.dtype)
  amax = lambda a: jnp.max(jnp.abs(a.astype(jnp.float32))) / E4M3_MAX
  sq, sk, sv = amax(q), amax(k), amax(v)
  return _cudnn_fp8(quantize_e4m3(q, sq), quantize_e4m3(k, sk), quantize_e4m3(v, sv), sq, sk, sv,
                    q.shape[-1], q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FP8Attention:
  """Calibrated FP8 attention (cuDNN): per-tensor scales of Q, smoothed K, V and K's mean [N, Dh]."""
  sq: jax.Array
  sk: jax.Array
  sv: jax.Array
  k_mean: jax.Array

  @classmethod
  def from_stats(cls, st):
    s = lambda a: jnp.maximum(jnp.asarray(a, jnp.float32), _TINY) / E4M3_MAX
    return cls(s(st["q_amax"]), s(st["k_amax"]), s(st["v_amax"]), jnp.asarray(st["k_mean"], jnp.float32))

  def quantize(self, q, k, v):
    km = self.k_mean.astype(jnp.float32)
    return (quantize_e4m3(q, self.sq), quantize_e4m3(k.astype(jnp.float32) - km, self.sk),
            quantize_e4m3(v, self.sv))

  def for_heads(self, start, count: int) -> "FP8Attention":
    """The same attention on heads [start, start + count) (Ulysses: a device's head shard after the
    all-to-all; ``start`` may be traced). Only K's mean is per head."""
    return dataclasses.replace(
        self, k_mean=jax.lax.dynamic_slice_in_dim(self.k_mean, start, count, axis=0))

  def attend_quantized(self, qq, kq, vq, out_dtype=jnp.bfloat16):
    """The cuDNN FP8 kernel alone on E4M3 codes from ``quantize`` (benchmarks)."""
    return _cudnn_fp8(qq, kq, vq, self.sq, self.sk, self.sv, qq.shape[-1], out_dtype)

  def __call__(self, q, k, v):
    return self.attend_quantized(*self.quantize(q, k, v), out_dtype=q.dtype)


def fp8_attention_reference(att: FP8Attention, q, k, v):
  """Plain-JAX (any backend) evaluation of what FP8Attention computes: the same E4M3 Q/K/V codes,
  f32 softmax(QKᵀ)V. Probabilities are not quantized here (cuDNN quantizes P to E4M3 ×256)."""
  qq, kq, vq = att.quantize(q, k, v)
  deq = lambda a, s: a.astype(jnp.float32) * s
  out = jax.nn.dot_product_attention(deq(qq, att.sq), deq(kq, att.sk), deq(vq, att.sv))
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Calibration

_RECORDERS: list[dict[str, list[dict[str, jax.Array]]]] = []


def _record(name: str, **stats):
  if not _RECORDERS:
    raise RuntimeError(f"observer {name!r} ran outside a function made by calibrating()")
  _RECORDERS[-1].setdefault(name, []).append(stats)


def _amax(x):
  return jnp.max(jnp.abs(x.astype(jnp.float32)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ObservedWeight:
  """A bf16 weight [K, N] that records max|x| of its input (name: the linear's path in the block)."""
  w: jax.Array
  name: str = dataclasses.field(metadata={"static": True})

  def linear(self, x):
    _record(self.name, amax=_amax(x))
    return jnp.einsum("...k,kn->...n", x, self.w.astype(x.dtype), preferred_element_type=jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ObservedAttention:
  """Records max|q|, K's mean over tokens [N, Dh], max|k − mean|, max|v|; returns bf16 attention."""
  name: str = dataclasses.field(metadata={"static": True})
  impl: str | None = dataclasses.field(default=None, metadata={"static": True})

  def __call__(self, q, k, v):
    k_mean = jnp.mean(k.astype(jnp.float32), axis=(0, 1))
    _record(self.name, q_amax=_amax(q), k_amax=_amax(k.astype(jnp.float32) - k_mean),
            v_amax=_amax(v), k_mean=k_mean)
    return jax.nn.dot_product_attention(q, k, v, implementation=self.impl)


def _is_matrix(path) -> bool:
  return str(path[-1].key).startswith(("w", "ffn_w"))


def _path_name(path) -> str:
  return ".".join(str(p.key) for p in path)


def observe_block(block, attn_impl: str | None = None):
  """The block with fused projections whose linears and attentions record input statistics when run
  inside ``calibrating``; its outputs are the bf16 block's."""
  b = wan_dit.fuse_projections(block)
  b = jax.tree_util.tree_map_with_path(
      lambda path, w: ObservedWeight(w, _path_name(path)) if _is_matrix(path) else w, b)
  return dict(b, self_attn=dict(b["self_attn"], attn_quant=ObservedAttention("self_attn", attn_impl)),
              cross_attn=dict(b["cross_attn"], attn_quant=ObservedAttention("cross_attn", attn_impl)))


def calibrating(fn):
  """jit(fn) that also returns the statistics its observers recorded: ``out, stats = f(*args)``,
  stats {name: [per-call dict of arrays]} (host NumPy)."""
  def traced(*args):
    rec: dict[str, list[dict[str, jax.Array]]] = {}
    _RECORDERS.append(rec)
    try:
      out = fn(*args)
    finally:
      _RECORDERS.pop()
    return out, rec
  jitted = jax.jit(traced)

  def run(*args):
    out, rec = jitted(*args)
    return out, jax.device_get(rec)
  return run


def merge_stats(records: list[dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, np.ndarray]]:
  """Several calibration runs (e.g. timesteps) -> one stats dict: amax by max, k_mean by mean."""
  out: dict[str, dict[str, list]] = {}
  for rec in records:
    for name, calls in rec.items():
      for call in calls:
        for stat, val in call.items():
          out.setdefault(name, {}).setdefault(stat, []).append(np.asarray(val, np.float32))
  return {name: {stat: (np.mean(v, axis=0) if stat == "k_mean" else np.max(v, axis=0))
                 for stat, v in d.items()} for name, d in out.items()}


# ----------------------------------------------------------------------------------------------
# Block conversion

def quantize_block(block, kind: str, stats: dict | None = None):
  """Replaces every projection matrix of a block by the variant's weight type; norms, biases and the
  modulation table stay as they are.

  kind "fp8": projections fused (wan_dit.fuse_projections), ScaledFP8Weight with the calibrated
  activation scale from ``stats`` (``merge_stats`` of an ``observe_block`` run), or dynamic per-token
  scales when ``stats`` is None. "nvfp4a4": fused too, NVFP4W4A4Weight with the calibrated input
  scale (or per-call amax). "bf16fused": fusion only. "fp8xla", "fp8block", "nvfp4": as above."""
  if kind == "bf16":
    return block
  if kind in ("fp8", "nvfp4a4", "bf16fused"):
    b = wan_dit.fuse_projections(block)
    if kind == "bf16fused":
      return b
    make = ScaledFP8Weight.from_dense if kind == "fp8" else NVFP4W4A4Weight.from_dense
    amax = lambda path: None if stats is None else stats[_path_name(path)]["amax"]
    return jax.tree_util.tree_map_with_path(
        lambda path, w: make(w, amax(path)) if _is_matrix(path) else w, b)
  if kind == "fp8xla":
    make = XlaFP8Weight.from_dense
  else:
    from kernels.quant.weights import FP8BlockWeight, NVFP4Weight  # pylint: disable=import-outside-toplevel
    make = {"fp8block": FP8BlockWeight.from_dense, "nvfp4": NVFP4Weight.from_dense}[kind]
  return jax.tree_util.tree_map_with_path(lambda path, w: make(w) if _is_matrix(path) else w, block)


def with_fp8_attention(block, stats: dict):
  """The block's self- and cross-attention run as calibrated FP8Attention."""
  return dict(block, self_attn=dict(block["self_attn"],
                                    attn_quant=FP8Attention.from_stats(stats["self_attn"])),
              cross_attn=dict(block["cross_attn"],
                              attn_quant=FP8Attention.from_stats(stats["cross_attn"])))


# ----------------------------------------------------------------------------------------------
# Whole model

def calibrate_model(params, cfg, latents, timesteps, text, attn_impl: str | None = None):
  """Per-block stats (list, one per block) from bf16 forwards of ``latents`` [B, F, H, W, C] at each
  of ``timesteps`` with text embeddings ``text`` [B, L, text_dim], block by block (one compile)."""
  attn = lambda q, k, v, quant=None: wan_dit.attention(q, k, v, attn_impl or "xla", quant)
  cal = calibrating(lambda b, *a: wan_dit.block_forward(b, *a, cfg, attn, attn))
  blocks = params["blocks"]
  recs: list[list] = [[] for _ in blocks]
  for t in timesteps:
    t_arr = jnp.full((latents.shape[0],), t, jnp.float32)
    x, _, tproj, ctx, _, cos, sin = wan_dit.embed(params, latents, t_arr, text, cfg, latents.dtype)
    for i, b in enumerate(blocks):
      x, rec = cal(observe_block(b, attn_impl), x, ctx, tproj, cos, sin)
      recs[i].append(rec)
  return [merge_stats(r) for r in recs]


def quantize_model(params, lin_kind: str, stats: list | None = None, fp8_attention: bool = False):
  """``params`` with every block converted: ``lin_kind`` as in quantize_block ("fp8" uses the block's
  calibrated stats, "fp8tok" is "fp8" with per-token scales), plus calibrated FP8 attention."""
  blocks = []
  for i, b in enumerate(params["blocks"]):
    st = None if stats is None else stats[i]
    b = quantize_block(b, "fp8", None) if lin_kind == "fp8tok" else quantize_block(b, lin_kind, st)
    blocks.append(with_fp8_attention(b, st) if fp8_attention else b)
  return dict(params, blocks=blocks)
