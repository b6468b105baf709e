"""Low-precision variants of the Wan DiT: block weights as FP8 / NVFP4 types, FP8 attention.

  quantize_block(block, kind)   every 2-D matrix of a block -> "fp8xla" (XlaFP8Weight below),
                                "fp8block" / "nvfp4" (kernels.quant weight types); ops.linear
                                dispatches on them.
  fp8_cudnn_attention(q, k, v)  SageAttention-style FP8 attention on cuDNN (GPU only).

XlaFP8Weight is a stand-in until kernels/ has a large-M FP8 GEMM (kernels/gemm.py dequantizes to bf16
from 512 rows up): per-tensor E4M3 weight, activations quantized per tensor on the fly, written as the
dot(convert(a)·sa, convert(b)·sb) pattern that XLA rewrites into one cuBLASLt FP8 GEMM.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

E4M3_MAX = 448.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class XlaFP8Weight:
  """Per-tensor scaled E4M3 weight [K, N]; activations quantized per tensor on the fly. Written in the
  dot(convert(a)·sa, convert(b)·sb) pattern that XLA rewrites into one cuBLASLt FP8 GEMM."""
  w: jax.Array
  scale: jax.Array

  @classmethod
  def from_dense(cls, w):
    s = jnp.max(jnp.abs(w.astype(jnp.float32))) / E4M3_MAX
    return cls((w.astype(jnp.float32) / s).astype(jnp.float8_e4m3fn), s)

  def linear(self, x):
    sx = jnp.max(jnp.abs(x.astype(jnp.float32))) / E4M3_MAX
    xq = (x.astype(jnp.float32) / sx).astype(jnp.float8_e4m3fn)
    y = jnp.einsum("...k,kn->...n", xq.astype(jnp.bfloat16) * sx.astype(jnp.bfloat16),
                   self.w.astype(jnp.bfloat16) * self.scale.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def fp8_cudnn_attention(q, k, v):
  """SageAttention-style FP8 attention on cuDNN: smooth K, per-tensor E4M3 Q/K/V, P scaled by 256."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=import-outside-toplevel
  k = k - jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True).astype(k.dtype)
  amax = lambda a: jnp.max(jnp.abs(a.astype(jnp.float32))).reshape(1, 1, 1, 1)
  sq, sk, sv = amax(q) / E4M3_MAX, amax(k) / E4M3_MAX, amax(v) / E4M3_MAX
  quant = lambda a, s: (a.astype(jnp.float32) / s).astype(jnp.float8_e4m3fn)
  one = jnp.ones((1, 1, 1, 1), jnp.float32)
  scale_o = 1.0 / sv                                      # |o| <= max|v|
  params = {k_: one for k_ in cudnn.fp8_params_keys}
  params |= {"descale_q": sq, "descale_k": sk, "descale_v": sv, "descale_s": one / 256.0,
             "scale_s": one * 256.0, "scale_o": scale_o}
  out, _, _ = cudnn.dot_product_attention(
      quant(q, sq), quant(k, sk), quant(v, sv), fp8_params=params, scale=q.shape[-1] ** -0.5,
      use_fp8=True, qkv_layout="BTNH")
  return (out.astype(jnp.float32) / scale_o).astype(q.dtype)


def quantize_block(block, kind: str):
  """Replaces every projection matrix of a block (wq, wk, wv, wo, ffn_w1, ffn_w2) by the variant's
  weight type; norms, biases and the modulation table stay as they are."""
  if kind == "bf16":
    return block
  if kind == "fp8xla":
    make = XlaFP8Weight.from_dense
  else:
    from kernels.quant.weights import FP8BlockWeight, NVFP4Weight  # pylint: disable=import-outside-toplevel
    make = {"fp8block": FP8BlockWeight.from_dense, "nvfp4": NVFP4Weight.from_dense}[kind]
  is_matrix = lambda path: str(path[-1].key).startswith(("w", "ffn_w"))
  return jax.tree_util.tree_map_with_path(lambda path, w: make(w) if is_matrix(path) else w, block)
