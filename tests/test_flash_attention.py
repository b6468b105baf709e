"""Prefill flash attention (kernels/flash_attention.py) in Pallas interpret mode vs float64 NumPy.

Interpret mode fills kernel outputs with NaN before the kernel runs, so an unwritten element shows up
as NaN; every check below also asserts the output is finite.
"""
import numpy as np
import jax.numpy as jnp
import pytest

from jaxinfer.errors import ShapeError
from kernels.flash_attention import PrefillTiles, flash_prefill

F8 = jnp.float8_e4m3fn
TILES = PrefillTiles(block_q=16, block_k=16, num_warps=4, num_stages=2)


def np_prefill(q, k, v, query_start, kv_lens, scale, q_rope=None, k_rope=None):
  """float64: query row i of sequence b at position kv_lens[b] - q_len + i, causal."""
  T, H, _ = q.shape
  B, S, KV, _ = k.shape
  out = np.zeros((T, H, v.shape[-1]))
  for b in range(B):
    q0, q1 = query_start[b], query_start[b + 1]
    for t in range(q0, q1):
      pos = kv_lens[b] - (q1 - q0) + (t - q0)
      for h in range(H):
        s = k[b, :pos + 1, h // (H // KV)] @ q[t, h]
        if q_rope is not None:
          s = s + k_rope[b, :pos + 1, h // (H // k_rope.shape[2])] @ q_rope[t, h]
        p = np.exp(scale * s - np.max(scale * s))
        out[t, h] = p @ v[b, :pos + 1, h // (H // KV)] / p.sum()
  return out


def ragged_case(rng, H, KV, D, dtype=jnp.bfloat16):
  q_lens, kv_lens, T, S = [17, 1, 5], [40, 9, 5], 32, 40   # a chunk after a 23-token prefix,
  qs = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)  # one decode token, a prefill
  q = jnp.asarray(rng.standard_normal((T, H, D)), dtype)
  k = jnp.asarray(rng.standard_normal((3, S, KV, D)), dtype)
  v = jnp.asarray(rng.standard_normal((3, S, KV, D)), dtype)
  return q, k, v, qs, np.asarray(kv_lens, np.int32)


def f64(x, scale=1.0, axis_heads=None):
  x = np.asarray(x.astype(jnp.float32), np.float64)
  return x if axis_heads is None else x * np.asarray(scale)[:, None]


def rel_err(out, ref, rows):
  out = np.asarray(out.astype(jnp.float32), np.float64)
  assert np.isfinite(out).all()
  assert np.all(out[rows:] == 0), "padding rows must be zero"
  return np.linalg.norm(out[:rows] - ref[:rows]) / np.linalg.norm(ref[:rows])


@pytest.mark.parametrize("H,KV,D", [(4, 4, 64), (8, 2, 128), (8, 1, 32)])  # GQA 1, 4, 8
def test_bf16_ragged_chunked(H, KV, D):
  rng = np.random.default_rng(H * 100 + KV)
  q, k, v, qs, kv_lens = ragged_case(rng, H, KV, D)
  out = flash_prefill(q, k, v, jnp.asarray(qs), jnp.asarray(kv_lens), scale=D ** -0.5,
                      tiles=TILES, interpret=True)
  ref = np_prefill(f64(q), f64(k), f64(v), qs, kv_lens, D ** -0.5)
  assert out.shape == (32, H, D) and out.dtype == jnp.bfloat16
  assert rel_err(out, ref, qs[-1]) < 1e-2   # bf16 operands, bf16 P and output


@pytest.mark.parametrize("v_transposed", [False, True])
def test_fp8_per_head_scales(v_transposed):
  """E4M3 q/k/v, per-head scales, P in E4M3: <= 3e-2 vs float64 on the dequantized inputs."""
  rng = np.random.default_rng(7)
  H, KV, D = 8, 2, 64
  q, k, v, qs, kv_lens = ragged_case(rng, H, KV, D, jnp.float32)
  qsc = rng.uniform(0.5, 2, H).astype(np.float32)
  ksc, vsc = (rng.uniform(0.5, 2, KV).astype(np.float32) for _ in range(2))
  q8 = (q / qsc[:, None]).astype(F8)
  k8 = (k / ksc[:, None]).astype(F8)
  v8 = (v / vsc[:, None]).astype(F8)
  v_in = jnp.transpose(v8, (0, 2, 3, 1)) if v_transposed else v8
  out = flash_prefill(q8, k8, v_in, jnp.asarray(qs), jnp.asarray(kv_lens), scale=D ** -0.5,
                      q_scale=qsc, k_scale=ksc, v_scale=vsc, tiles=TILES, interpret=True,
                      v_transposed=v_transposed)
  assert out.dtype == jnp.bfloat16
  ref = np_prefill(f64(q8, qsc, 1), np.asarray(k8.astype(jnp.float32), np.float64) * ksc[:, None],
                   np.asarray(v8.astype(jnp.float32), np.float64) * vsc[:, None], qs, kv_lens,
                   D ** -0.5)
  assert rel_err(out, ref, qs[-1]) < 3e-2


def test_fp8_kv_bf16_queries():
  """bf16 queries over an E4M3 cache with scalar scales (the FP8 KV cache): <= 1.5e-2."""
  rng = np.random.default_rng(11)
  q, k, v, qs, kv_lens = ragged_case(rng, 8, 2, 64, jnp.float32)
  k8, v8 = (k / 0.5).astype(F8), (v / 2.0).astype(F8)
  out = flash_prefill(q.astype(jnp.bfloat16), k8, v8, jnp.asarray(qs), jnp.asarray(kv_lens),
                      scale=0.125, k_scale=0.5, v_scale=2.0, tiles=TILES, interpret=True)
  ref = np_prefill(f64(q.astype(jnp.bfloat16)), f64(k8) * 0.5, f64(v8) * 2.0, qs, kv_lens, 0.125)
  assert rel_err(out, ref, qs[-1]) < 1.5e-2


def test_shape_errors():
  q = jnp.ones((8, 4, 64), jnp.bfloat16)
  k = jnp.ones((2, 16, 2, 64), jnp.bfloat16)
  qs, lens = jnp.asarray([0, 4, 8]), jnp.asarray([16, 16])
  with pytest.raises(ShapeError, match="disagree"):
    flash_prefill(q, k[..., :32], k, qs, lens, scale=1.0, interpret=True)
  with pytest.raises(ShapeError, match="multiple"):
    flash_prefill(jnp.ones((8, 3, 64), jnp.bfloat16), k, k, qs, lens, scale=1.0, interpret=True)
  with pytest.raises(ShapeError, match="query_start"):
    flash_prefill(q, k, k, jnp.asarray([0, 8]), lens, scale=1.0, interpret=True)
  with pytest.raises(ShapeError, match="FP8 queries"):
    flash_prefill(q.astype(F8), k, k, qs, lens, scale=1.0, interpret=True)
  with pytest.raises(ShapeError, match="dtypes"):
    flash_prefill(q.astype(jnp.float32), k, k, qs, lens, scale=1.0, interpret=True)
  with pytest.raises(ShapeError, match="powers of two"):
    flash_prefill(q[..., :48], k[..., :48], k[..., :48], qs, lens, scale=1.0, interpret=True)
