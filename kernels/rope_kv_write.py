"""RoPE on q and k plus the paged K/V cache write, in one Pallas Triton kernel.

  rope_kv_write(qkv [T, (Hq + 2 Hkv) D], cos, sin [T, D], slots [T], k_pages, v_pages
                [N, page, Hkv, D], k_scale, v_scale) -> (q [T, Hq, D], k_pages, v_pages)

``qkv`` is a fused wqkv projection's output (``models.llama.fuse_projections``): per token the Hq
query heads, then the Hkv key heads, then the Hkv value heads, D each. The kernel rotates q and k
(rotate-half RoPE, HF layout, as ``jaxinfer.ops.apply_rope``: float32 math, rounded to qkv's dtype),
returns the rotated q and writes the rotated k and v into the pages at flat slot ``slots[t]``
(= page * page_size + offset, as ``jaxinfer.kv_cache.write_kv``; E4M3 pages store value / scale,
rounded from the dtype-rounded value). The pages are aliased in place (the cache is donated).
With an FP8 wqkv (``ops.FP8Weight``) qkv may come as its raw product with the row [T, 1] and column
scales still to apply (``ops.ScaledRows``): the kernel scales it on load, which saves XLA's
scaling kernel over [T, (Hq + 2 Hkv) D] as well; the raw product may be split-K partial sums,
float32 [S, T, (Hq + 2 Hkv) D] with S a power of two (``ops.fp8_dot_partials``, decode steps),
summed on load (no XLA reduction kernel over them).

Why: XLA:GPU runs the same work as one RoPE fusion (the rotate-half concatenate) plus a scatter per
cache (k and v): three small kernels per layer, 96 per Llama-3-8B decode step (H100 c=64 FP8 trace:
0.26 ms of a 5.35 ms step, each kernel a few us for a few hundred KB). One kernel per layer instead.

Measured (H100, Llama-3-8B FP8 c=64 serving, profiler, 2026-11-24 windows 1-4): 32 calls per decode
step 0.12 ms (bf16 product in) / 0.155 ms (split-K partials in) against 0.32 ms for the XLA
kernels it replaces; a 1024-token step 0.25 ms; bit-identical to the XLA ops on the GPU except for
the q rounding where XLA skips the intermediate bf16 rounding of a scaled FP8 product.

Tiling: grid (T, (Hq + 2 Hkv) / head_block): program (t, g) takes qkv heads g*hb .. g*hb + hb - 1
of token t (hb = ``head_block``, a power of two dividing Hkv; default ``HEAD_BLOCK`` = 8, clamped
to Hkv): q heads for g < Hq / hb, then k heads, then v heads. It loads its heads as two [hb, D/2]
halves (the rotate-half pairs) and the cos / sin halves [D/2], rotates in registers and stores q,
or the rotated k / the v heads at the token's slot (a scalar read of ``slots``; padding tokens all
write the null page's slot 0, whose contents nobody reads). head_block=0: grid (T,), one program
per token for all its heads. Hq, Hkv and D/2 must be powers of two (Triton block shapes).
Roofline: reads and writes ~2 (Hq + 2 Hkv) D elements per token (T = 64, Llama-3-8B: ~1.5 MB, well
under a microsecond of HBM time): launch- and latency-bound, like the kernels it replaces; the
head blocks give a decode step's 64 tokens 384 programs for the 132 SMs instead of 64. H100,
2026-11-24 (benchmarks/attention.md, helper "dattn"; profiler device time per call, FP8 cache, f16
q, bit-identical outputs): T=64 with wqkv's split-K partials 2.52 us (8 heads per program) vs 3.75
(one program per token), 2.96 with 4 heads; T=1024 (raw bf16 product with scales) 9.76 vs 10.6 us.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError
from kernels.add_rms_norm import check_product_scales
from jaxinfer.kv_cache import is_fp8, write_kv
from jaxinfer.ops import apply_rope


def reference(qkv: jax.Array, cos: jax.Array, sin: jax.Array, slots: jax.Array,
              k_pages: jax.Array, v_pages: jax.Array, k_scale, v_scale, *, num_heads: int,
              num_kv_heads: int, row_scale=None, col_scale=None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Plain JAX: split, ``ops.apply_rope`` on q and k, ``kv_cache.write_kv`` of k and v (what
  ``models.llama.self_attention`` runs unfused); qkv scaled first when given an FP8 product's
  scales (as ``ops.ScaledRows.apply``)."""
  if qkv.ndim == 3:                          # split-K partials of an FP8 product
    from jaxinfer.ops import ScaledRows
    qkv = ScaledRows(qkv, row_scale, col_scale, jnp.bfloat16).apply()
  elif row_scale is not None:
    qkv = (qkv.astype(jnp.float32) * row_scale * col_scale).astype(qkv.dtype)
  T = qkv.shape[0]
  D = k_pages.shape[-1]
  nq, nkv = num_heads * D, num_kv_heads * D
  q = qkv[:, :nq].reshape(T, num_heads, D)
  k = qkv[:, nq:nq + nkv].reshape(T, num_kv_heads, D)
  v = qkv[:, nq + nkv:].reshape(T, num_kv_heads, D)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  return q, write_kv(k_pages, k, slots, k_scale), write_kv(v_pages, v, slots, v_scale)


def _pow2(n: int) -> bool:
  return n >= 1 and not n & (n - 1)


def supports(qkv: jax.Array, k_pages: jax.Array, num_heads: int, num_kv_heads: int) -> bool:
  """2-D qkv of a 16/32-bit float dtype (or float32 split-K partials [S, T, W] of an FP8 product,
  S a power of two, whose q comes out bf16) with Hq, Hkv and D / 2 powers of two, the pages in
  q's dtype or E4M3 / E5M2."""
  partials = qkv.ndim == 3 and qkv.dtype == jnp.float32 and _pow2(qkv.shape[0])
  if not (qkv.ndim == 2 or partials) or k_pages.ndim != 4:
    return False
  D = k_pages.shape[-1]
  out_dtype = jnp.bfloat16 if partials else qkv.dtype
  return (qkv.shape[-1] == (num_heads + 2 * num_kv_heads) * D
          and k_pages.shape[2] == num_kv_heads
          and qkv.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) and D % 2 == 0
          and _pow2(num_heads) and _pow2(num_kv_heads) and _pow2(D // 2)
          and (is_fp8(k_pages.dtype) or k_pages.dtype == out_dtype))


def _kernel(slots_ref, qkv_ref, cos_ref, sin_ref, ks_ref, vs_ref, k_in_ref, v_in_ref, *refs,
            hq: int, hkv: int, d: int, fp8: bool, scaled: bool, dtype, head_block: int = 0):
  del k_in_ref, v_in_ref                       # aliased to k_ref / v_ref
  if scaled:
    rs_ref, cs_ref, *refs = refs
  q_ref, k_ref, v_ref = refs
  t = pl.program_id(0)
  half = d // 2
  lo, hi = pl.ds(0, half), pl.ds(half, half)
  c1, c2 = cos_ref[t, lo][None, :], cos_ref[t, hi][None, :]
  s1, s2 = sin_ref[t, lo][None, :], sin_ref[t, hi][None, :]

  def load(heads, cols):
    if len(qkv_ref.shape) == 4:                # split-K partials [S, T, heads, D]: their sum
      x = jnp.sum(qkv_ref[:, t, heads, cols], axis=0)
    else:
      x = qkv_ref[t, heads, cols]
    if scaled:   # an FP8 product: raw * row * col, rounded to the dtype (ScaledRows.apply)
      x = (x.astype(jnp.float32) * rs_ref[t, 0] * cs_ref[heads, cols]).astype(dtype)
    return x

  def rotated(heads):
    x1 = load(heads, lo).astype(jnp.float32)
    x2 = load(heads, hi).astype(jnp.float32)
    # apply_rope: x * cos + concat(-x2, x1) * sin, in float32, rounded to the input dtype
    return ((x1 * c1 + (-x2) * s1).astype(dtype), (x2 * c2 + x1 * s2).astype(dtype))

  def stored(x, scale_ref):
    if not fp8:
      return x.astype(k_ref.dtype)
    return (x.astype(jnp.float32) / scale_ref[0]).astype(k_ref.dtype)   # as write_kv

  if not head_block:                     # one program per token: all its heads
    q1, q2 = rotated(pl.ds(0, hq))       # rounded to dtype like the XLA path, then q's dtype
    q_ref[t, :, lo] = q1.astype(q_ref.dtype)
    q_ref[t, :, hi] = q2.astype(q_ref.dtype)
    slot = slots_ref[t]
    k1, k2 = rotated(pl.ds(hq, hkv))
    v = load(pl.ds(hq + hkv, hkv), pl.ds(0, d))
    k_ref[slot, :, lo] = stored(k1, ks_ref)
    k_ref[slot, :, hi] = stored(k2, ks_ref)
    v_ref[slot, :, :] = stored(v, vs_ref)
    return
  # head_block heads per program: program g of token t takes qkv heads g*hb .. (hb, a power of
  # two dividing Hkv): q heads for g < Hq/hb, then k heads, then v heads
  hb = head_block
  g = pl.program_id(1)
  nq, nk = hq // hb, hkv // hb
  src = pl.ds(pl.multiple_of(g * hb, hb), hb)

  @pl.when(g < nq)
  def _q():
    q1, q2 = rotated(src)
    q_ref[t, src, lo] = q1.astype(q_ref.dtype)
    q_ref[t, src, hi] = q2.astype(q_ref.dtype)

  @pl.when((g >= nq) & (g < nq + nk))
  def _k():
    k1, k2 = rotated(src)
    dst = pl.ds(pl.multiple_of((g - nq) * hb, hb), hb)
    slot = slots_ref[t]
    k_ref[slot, dst, lo] = stored(k1, ks_ref)
    k_ref[slot, dst, hi] = stored(k2, ks_ref)

  @pl.when(g >= nq + nk)
  def _v():
    v = load(src, pl.ds(0, d))
    dst = pl.ds(pl.multiple_of((g - nq - nk) * hb, hb), hb)
    v_ref[slots_ref[t], dst, :] = stored(v, vs_ref)


# Heads per program (clamped to Hkv; 0: one program per token, all heads): 8 measured fastest on
# the H100 at T=64 and T=1024 (module docstring). JAXINFER_ROPE_KV_HEAD_BLOCK overrides it.
HEAD_BLOCK = int(os.environ.get("JAXINFER_ROPE_KV_HEAD_BLOCK", "8"))


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "q_dtype", "interpret",
                                             "head_block"))
def rope_kv_write(qkv: jax.Array, cos: jax.Array, sin: jax.Array, slots: jax.Array,
                  k_pages: jax.Array, v_pages: jax.Array, k_scale=1.0, v_scale=1.0, *,
                  num_heads: int, num_kv_heads: int, row_scale=None, col_scale=None,
                  q_dtype=None, interpret: bool = False, head_block: int | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(q rotated [T, Hq, D], k_pages, v_pages with this step's rotated k and v written at
  ``slots``); see the module docstring. ``k_scale`` / ``v_scale``: the FP8 cache's scalar scales.
  ``row_scale`` [T, 1] / ``col_scale`` [(Hq + 2 Hkv) D]: qkv is an FP8 projection's raw product
  (``ops.ScaledRows``), scaled here as its ``apply`` would. ``q_dtype``: the rotated q's dtype
  (default: qkv's, bf16 for partials), e.g. float16 for the attention kernels over an FP8 cache,
  which take f16 queries (no XLA convert kernel in between); k and v round to the default dtype
  either way. ``head_block``: heads per program (None: ``HEAD_BLOCK``; 0: all of a token's heads in
  one program, grid (T,)); else grid (T, (Hq + 2 Hkv) / head_block), a power of two dividing Hkv
  (clamped to Hkv): more, smaller programs for a few tokens (decode), the same values."""
  if not supports(qkv, k_pages, num_heads, num_kv_heads):
    raise ShapeError(f"rope_kv_write takes qkv [T, (Hq + 2 Hkv) D] and pages [N, page, Hkv, D] "
                     f"with Hq, Hkv, D/2 powers of two; got qkv {qkv.shape} {qkv.dtype}, pages "
                     f"{k_pages.shape} {k_pages.dtype}, Hq={num_heads}, Hkv={num_kv_heads}")
  if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
    raise ShapeError(f"k_pages {k_pages.shape} {k_pages.dtype} != v_pages {v_pages.shape} "
                     f"{v_pages.dtype}")
  partials = qkv.ndim == 3
  T = qkv.shape[-2]
  N, page, hkv, D = k_pages.shape
  out_dtype = jnp.bfloat16 if partials else qkv.dtype
  if partials and row_scale is None:
    raise ShapeError("rope_kv_write: split-K partials need the FP8 product's scales")
  if cos.shape != (T, D) or sin.shape != (T, D) or slots.shape != (T,):
    raise ShapeError(f"cos / sin must be [T={T}, D={D}] and slots [T]; got {cos.shape}, "
                     f"{sin.shape}, {slots.shape}")
  scaled = check_product_scales("rope_kv_write:", row_scale, col_scale, T, qkv.shape[-1])
  heads = num_heads + 2 * hkv
  hb = HEAD_BLOCK if head_block is None else head_block
  if hb:
    hb = min(hb, hkv)
    if not _pow2(hb):
      raise ShapeError(f"rope_kv_write: head_block must be a power of two, got {hb}")
  extra = ((row_scale.astype(jnp.float32), col_scale.astype(jnp.float32).reshape(heads, D))
           if scaled else ())
  flat = (N * page, hkv, D)
  out_shape = [jax.ShapeDtypeStruct((T, num_heads, D), q_dtype or out_dtype),
               jax.ShapeDtypeStruct(flat, k_pages.dtype),
               jax.ShapeDtypeStruct(flat, v_pages.dtype)]
  scalar = lambda s: jnp.asarray(s, jnp.float32).reshape(1)
  q, k_flat, v_flat = pl.pallas_call(
      functools.partial(_kernel, hq=num_heads, hkv=hkv, d=D, fp8=is_fp8(k_pages.dtype),
                        scaled=scaled, dtype=out_dtype, head_block=hb),
      grid=(T, heads // hb) if hb else (T,),
      out_shape=out_shape,
      input_output_aliases={6: 1, 7: 2},
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="rope_kv_write",
  )(slots.astype(jnp.int32), qkv.reshape(*qkv.shape[:-1], heads, D), cos.astype(jnp.float32),
    sin.astype(jnp.float32), scalar(k_scale), scalar(v_scale), k_pages.reshape(flat),
    v_pages.reshape(flat), *extra)
  return q, k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape)
