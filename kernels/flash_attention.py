"""Prefill (context) flash attention, bf16 and FP8, in Pallas Triton: causal, GQA/MQA, ragged, chunked.

Layout (the flattened-token layout of ``jaxinfer.attention``):
  q  [T, H, Dk]            tokens of sequence b are rows query_start[b] .. query_start[b+1]-1
  k  [B, S, KV, Dk], v [B, S, KV, Dv]   each sequence's keys (cached prefix + this chunk), contiguous
  query_start [B+1], kv_lens [B]        query row i of b sits at position kv_lens[b] - q_len_b + i
  out [T, H, Dv]           rows of no sequence (padding past query_start[B]) are left unwritten here
                           and zeroed by the public op.
Optional MLA-style rope part: q_rope [T, H, Dr], k_rope [B, S, KVr, Dr] (bf16, unscaled) adds
q_rope.k_rope to the scores (DeepSeek context MLA: Dk=128 nope + Dr=64 rope shared by all heads,
KVr=1); in FP8 mode only the nope part and V are FP8.

Precision modes, picked from the dtypes:
  * bf16/f16 q, k, v: bf16 tensor-core dots, f32 softmax and accumulator.
  * FP8 KV only (bf16 q, E4M3 k/v with scales): k/v upcast to f16 in registers after the (halved)
    load, q cast to f16.
  * full FP8 (E4M3 q, k, v with per-head scales q_scale [H], k_scale [KV], v_scale [KV]): QK^T as an
    FP8 dot, P (in [0, 1]) multiplied by 256 and quantized to E4M3 for the PV FP8 dot, bf16 output.
    Error: E4M3 has a 3-bit mantissa, so each operand carries <= 2^-4 relative rounding error;
    end-to-end ||out - ref|| / ||ref|| ~ 2-4e-2 against the float64 attention of the *unquantized*
    inputs, and <= 2e-2 against the float64 attention of the dequantized FP8 inputs.

Tiling: grid (H, q_blocks, B), heads fastest so the G query heads sharing a KV head run together and
hit L2 for its K/V; q blocks are visited heaviest (last) first. Each program holds a [block_q, D] query
tile and streams [block_k, D] K/V tiles: the blocks entirely below the causal diagonal of its first
row run without masking, the rest (diagonal band) with a position mask. Online softmax in base 2.

Target roofline (H100, B=4 S=4096 H=32/8 D=128 causal, 2.2 TFLOP of useful work): bf16 dense peak
~670-800 TFLOP/s, FP8 ~820 measured (1979 datasheet with sparsity excluded). FA3-class kernels reach
~75% (bf16) and ~1.2 PFLOP/s (FP8). Measured (H100, 2026-11-23, benchmarks/attention.md): this
Pallas Triton kernel 290 TFLOP/s bf16 and 250 FP8 (V transposed) against cuDNN bf16's 553 -- no
warp specialisation or TMA in Triton's lowering, so the softmax is not overlapped with the MMAs.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError
from jaxinfer.kv_cache import is_fp8

_LOG2E = math.log2(math.e)
_MASK = -1e30


def online_softmax(s, m_prev, l_prev, keep=None):
  """One online-softmax step (FlashAttention-2) over a tile of base-2 scores s [rows, keys]:
  (p, correction, m_new, l_new) with the running max m_new and sum l_new, p = exp2(s - m_new)
  (zero where ``keep`` is False, if given) and the factor by which the running output is
  rescaled before p @ v is added. Shared by the Triton attention kernels."""
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
  correction = jnp.exp2(m_prev - m_new)
  p = jnp.exp2(s - m_new[:, None])
  if keep is not None:
    p = jnp.where(keep, p, 0.0)
  l_new = l_prev * correction + jnp.sum(p, axis=1)
  return p, correction, m_new, l_new
# P is in [0, 1]; scaling it by 256 before the E4M3 cast keeps small probabilities out of the
# subnormal range (E4M3 max is 448).
_P_FP8_SCALE = 256.0


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
  block_q: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3


def _prefill_kernel(qs_ref, kvlen_ref, q_ref, k_ref, v_ref, qr_ref, kr_ref, qsc_ref, ksc_ref,
                    vsc_ref, o_ref, *, block_q: int, block_k: int, group: int, group_rope: int,
                    sm_scale: float, full_fp8: bool, kv_upcast, v_transposed: bool,
                    num_q_blocks: int):
  h = pl.program_id(0)
  qi = num_q_blocks - 1 - pl.program_id(1)   # heaviest causal blocks first
  b = pl.program_id(2)
  kvh = lax.div(h, group)
  q_start = qs_ref[b]
  q_len = qs_ref[b + 1] - q_start
  row0 = qi * block_q

  @pl.when(row0 < q_len)
  def _():
    kv_len = kvlen_ref[b]
    pos0 = kv_len - q_len + row0                       # position of the tile's first row
    rows = lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    row_ok = row0 + rows < q_len
    q_pos = pos0 + rows
    q = plgpu.load(q_ref.at[pl.ds(q_start + row0, block_q), h, :], mask=row_ok[:, None], other=0.0)
    score_scale = sm_scale * _LOG2E
    if full_fp8:
      score_scale = score_scale * qsc_ref[h] * ksc_ref[kvh]
    elif kv_upcast is not None:
      score_scale = score_scale * ksc_ref[kvh]
    qr = None
    if qr_ref is not None:
      krh = lax.div(h, group_rope)
      qr = plgpu.load(qr_ref.at[pl.ds(q_start + row0, block_q), h, :], mask=row_ok[:, None],
                      other=0.0)

    def body(kb, carry, *, masked: bool):
      acc, m_prev, l_prev = carry
      k0 = kb * block_k
      keys = k0 + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
      if masked:
        key_ok = keys < kv_len
        k = plgpu.load(k_ref.at[b, pl.ds(k0, block_k), kvh, :], mask=key_ok[:, None], other=0.0)
      else:
        k = k_ref[b, pl.ds(k0, block_k), kvh, :]
      if kv_upcast is not None:
        k = k.astype(kv_upcast)
      s = plgpu.dot(q, k, trans_b=True) * score_scale
      if qr is not None:
        if masked:
          kr = plgpu.load(kr_ref.at[b, pl.ds(k0, block_k), krh, :], mask=key_ok[:, None], other=0.0)
        else:
          kr = kr_ref[b, pl.ds(k0, block_k), krh, :]
        s = s + plgpu.dot(qr, kr.astype(qr.dtype), trans_b=True) * (sm_scale * _LOG2E)
      if masked:
        s = jnp.where(keys[None, :] <= q_pos[:, None], s, _MASK)
      p, correction, m_new, l_new = online_softmax(s, m_prev, l_prev)
      if v_transposed:
        if masked:
          v = plgpu.load(v_ref.at[b, kvh, :, pl.ds(k0, block_k)], mask=key_ok[None, :], other=0.0)
        else:
          v = v_ref[b, kvh, :, pl.ds(k0, block_k)]
      elif masked:
        v = plgpu.load(v_ref.at[b, pl.ds(k0, block_k), kvh, :], mask=key_ok[:, None], other=0.0)
      else:
        v = v_ref[b, pl.ds(k0, block_k), kvh, :]
      if full_fp8:
        p = (p * _P_FP8_SCALE).astype(v.dtype)
      elif kv_upcast is not None:
        v = v.astype(kv_upcast)
        p = p.astype(kv_upcast)
      else:
        p = p.astype(v.dtype)
      pv = plgpu.dot(p, v, trans_b=v_transposed)
      return acc * correction[:, None] + pv, m_new, l_new

    dv = o_ref.shape[-1]
    carry = (jnp.zeros((block_q, dv), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    last_pos = jnp.minimum(pos0 + block_q, kv_len) - 1
    num_blocks = lax.div(last_pos + block_k, block_k)
    num_full = jnp.minimum(lax.div(pos0 + 1, block_k), num_blocks)
    carry = lax.fori_loop(0, num_full, functools.partial(body, masked=False), carry)
    acc, _, l = lax.fori_loop(num_full, num_blocks, functools.partial(body, masked=True), carry)
    out_scale = 1.0
    if full_fp8:
      out_scale = vsc_ref[kvh] / _P_FP8_SCALE
    elif kv_upcast is not None:
      out_scale = vsc_ref[kvh]
    out = acc * (out_scale / l)[:, None]
    plgpu.store(o_ref.at[pl.ds(q_start + row0, block_q), h, :], out.astype(o_ref.dtype),
                mask=row_ok[:, None])


def _per_head_scale(scale, n: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (n,))


def check_prefill_shapes(q, k, v, query_start, kv_lens, q_rope=None, k_rope=None) -> None:
  if q.ndim != 3 or k.ndim != 4 or v.ndim != 4:
    raise ShapeError(f"expected q [T,H,D], k/v [B,S,KV,D]; got {q.shape}, {k.shape}, {v.shape}")
  T, H, Dk = q.shape
  B, S, KV, _ = k.shape
  if k.shape[-1] != Dk or v.shape[:3] != (B, S, KV):
    raise ShapeError(f"q {q.shape}, k {k.shape}, v {v.shape} disagree")
  if H % KV:
    raise ShapeError(f"query heads {H} not a multiple of KV heads {KV}")
  if query_start.shape != (B + 1,) or kv_lens.shape != (B,):
    raise ShapeError(f"query_start {query_start.shape} / kv_lens {kv_lens.shape} do not match B={B}")
  for d in (Dk, v.shape[-1]):
    if d < 16 or d & (d - 1):
      raise ShapeError(f"head dims must be powers of two >= 16, got {d}")
  if (q_rope is None) != (k_rope is None):
    raise ShapeError("q_rope and k_rope go together")
  if q_rope is not None:
    if q_rope.shape[:2] != (T, H) or k_rope.shape[:2] != (B, S) or H % k_rope.shape[2]:
      raise ShapeError(f"q_rope {q_rope.shape} / k_rope {k_rope.shape} do not match q/k")
    if is_fp8(q_rope.dtype) or is_fp8(k_rope.dtype):
      raise ShapeError("the rope part (q_rope, k_rope) must be bf16/f16/f32, not FP8")
  if is_fp8(q.dtype) and not (is_fp8(k.dtype) and is_fp8(v.dtype)):
    raise ShapeError("FP8 queries need FP8 keys and values")
  if not is_fp8(k.dtype) and not (q.dtype == k.dtype == v.dtype):
    raise ShapeError(f"q/k/v dtypes {q.dtype}/{k.dtype}/{v.dtype} differ (only FP8 K/V may)")


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret", "v_transposed"))
def flash_prefill(q: jax.Array, k: jax.Array, v: jax.Array, query_start: jax.Array,
                  kv_lens: jax.Array, *, scale: float, q_scale=1.0, k_scale=1.0, v_scale=1.0,
                  q_rope: jax.Array | None = None, k_rope: jax.Array | None = None,
                  tiles: PrefillTiles = PrefillTiles(), interpret: bool = False,
                  v_transposed: bool = False) -> jax.Array:
  """Causal flash attention over ragged sequences; see the module docstring for layouts.

  ``v_transposed``: pass v as [B, KV, Dv, S] (K-major for the PV product, which the FP8 tensor-core
  path wants). Returns [T, H, Dv] in bf16 for FP8 q, else q's dtype; padding rows are zero.
  """
  v_shape = (v.shape[0], v.shape[3], v.shape[1], v.shape[2]) if v_transposed else v.shape
  check_prefill_shapes(q, k, jax.ShapeDtypeStruct(v_shape, v.dtype), query_start, kv_lens,
                       q_rope, k_rope)
  T, H, _ = q.shape
  B, S, KV, _ = k.shape
  dv = v_shape[-1]
  if S < tiles.block_k:  # a tile wider than the whole key range: pad (tiny) K/V up to one tile
    pad = tiles.block_k - S
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, pad)) if v_transposed else
                ((0, 0), (0, pad), (0, 0), (0, 0)))
    if k_rope is not None:
      k_rope = jnp.pad(k_rope, ((0, 0), (0, pad), (0, 0), (0, 0)))
    S = tiles.block_k
  full_fp8 = is_fp8(q.dtype)
  # e4m3 -> f16 is one conversion instruction on Hopper (-> bf16 takes three); f16 holds every e4m3
  # value, so an FP8 cache is read against f16 queries.
  kv_upcast = jnp.float16 if (not full_fp8 and is_fp8(k.dtype)) else None
  out_dtype = jnp.bfloat16 if full_fp8 else q.dtype
  if kv_upcast is not None:
    q = q.astype(kv_upcast)
  max_q = min(T, S)
  num_q_blocks = pl.cdiv(max_q, tiles.block_q)
  group_rope = H // k_rope.shape[2] if k_rope is not None else 1
  kernel = functools.partial(
      _prefill_kernel, block_q=tiles.block_q, block_k=tiles.block_k, group=H // KV,
      group_rope=group_rope, sm_scale=scale, full_fp8=full_fp8, kv_upcast=kv_upcast,
      v_transposed=v_transposed, num_q_blocks=num_q_blocks)
  out = pl.pallas_call(
      kernel,
      grid=(H, num_q_blocks, B),
      out_shape=jax.ShapeDtypeStruct((T, H, dv), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages),
      interpret=interpret,
      name="flash_prefill",
  )(query_start.astype(jnp.int32), kv_lens.astype(jnp.int32), q, k, v, q_rope, k_rope,
    _per_head_scale(q_scale, H), _per_head_scale(k_scale, KV), _per_head_scale(v_scale, KV))
  valid = jnp.arange(T) < query_start[B]
  return jnp.where(valid[:, None, None], out, jnp.zeros((), out.dtype))


def reference_prefill(q, k, v, query_start, kv_lens, *, scale: float, q_scale=1.0, k_scale=1.0,
                      v_scale=1.0, q_rope=None, k_rope=None) -> jax.Array:
  """Plain-JAX float32 reference of ``flash_prefill`` (same layouts, v not transposed)."""
  T, H, _ = q.shape
  B, S, KV, _ = k.shape
  G = H // KV
  f32 = lambda x, s, n: x.astype(jnp.float32) * _per_head_scale(s, n)[:, None]
  qf = f32(q, q_scale, H)
  kf = k.astype(jnp.float32) * _per_head_scale(k_scale, KV)[:, None]
  vf = v.astype(jnp.float32) * _per_head_scale(v_scale, KV)[:, None]
  seq = jnp.clip(jnp.searchsorted(query_start, jnp.arange(T), side="right") - 1, 0, B - 1)
  q_len = query_start[seq + 1] - query_start[seq]
  pos = kv_lens[seq] - q_len + jnp.arange(T) - query_start[seq]
  kt = jnp.repeat(kf[seq], G, axis=2)                                  # [T, S, H, D]
  s = jnp.einsum("thd,tshd->ths", qf, kt)
  if q_rope is not None:
    krt = jnp.repeat(k_rope.astype(jnp.float32)[seq], H // k_rope.shape[2], axis=2)
    s = s + jnp.einsum("thd,tshd->ths", q_rope.astype(jnp.float32), krt)
  s = jnp.where((jnp.arange(S)[None, :] <= pos[:, None])[:, None, :], s * scale, -jnp.inf)
  o = jnp.einsum("ths,tshd->thd", jax.nn.softmax(s, axis=-1), jnp.repeat(vf[seq], G, axis=2))
  valid = jnp.arange(T) < query_start[B]
  return jnp.where(valid[:, None, None], o, 0.0)
