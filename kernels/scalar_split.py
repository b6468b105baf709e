"""Split small vectors into their scalars with one kernel launch: vectors [L] -> L 0-d arrays each.

  split_scalars(a [L], b [L], ...) -> (a[0], ..., a[L-1], b[0], ..., b[L-1])

Why: the FP8 KV cache keeps one scale per layer in a vector (``KVCache.k_scale`` / ``v_scale``
[num_layers]). Each layer's scale is an operand of custom calls (``rope_kv_write``, the paged
attention kernels), so XLA materialises every ``k_scale[i]`` as a buffer of its own: a slice copy,
a CUDA-graph memcpy node ("memcpy32_post", ~1.2 us of GPU time each on the H100): 64 per
Llama-3-8B step (H100 XLA dump of a 2-layer engine step, 2026-11-24: two per layer, feeding
rope_kv_write and paged_decode_attention). Here one Pallas Triton program writes all of them as
the outputs of one custom call, which XLA hands to the consumers as they are (a 0-d view of an
output buffer is a bitcast).

Layout: one program; inputs float32 (or any 32-bit) vectors of at most 256 elements each; output i
of vector v is a [1] buffer holding v[i], returned reshaped to (). Roofline: a few hundred bytes:
one launch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError

MAX_LEN = 256


def reference(*vectors: jax.Array) -> tuple[jax.Array, ...]:
  """Plain JAX: every element of every vector, in order, as a 0-d array."""
  return tuple(v[i] for v in vectors for i in range(v.shape[0]))


def _kernel(*refs, lengths: tuple[int, ...]):
  ins, outs = refs[:len(lengths)], refs[len(lengths):]
  k = 0
  for ref, n in zip(ins, lengths):
    for i in range(n):
      outs[k][...] = ref[pl.ds(i, 1)]
      k += 1


@functools.partial(jax.jit, static_argnames=("interpret",))
def split_scalars(*vectors: jax.Array, interpret: bool = False) -> tuple[jax.Array, ...]:
  """(v[0], ..., v[L-1] for each vector v), 0-d arrays, written by one kernel; see the module
  docstring."""
  for v in vectors:
    if v.ndim != 1 or not 0 < v.shape[0] <= MAX_LEN or jnp.dtype(v.dtype).itemsize != 4:
      raise ShapeError(f"split_scalars takes 1-D 32-bit vectors of 1..{MAX_LEN} elements; got "
                       f"{v.shape} {v.dtype}")
  lengths = tuple(v.shape[0] for v in vectors)
  out_shape = [jax.ShapeDtypeStruct((1,), v.dtype) for v in vectors for _ in range(v.shape[0])]
  outs = pl.pallas_call(
      functools.partial(_kernel, lengths=lengths),
      grid=(1,),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="split_scalars",
  )(*vectors)
  return tuple(o.reshape(()) for o in outs)
