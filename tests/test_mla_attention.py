"""MLA (kernels/mla_attention.py): absorbed decode over the paged latent cache (reference, Pallas
kernel in interpret mode, public op) and FP8 context MLA, against float64 NumPy.

Interpret mode fills kernel outputs with NaN before the kernel runs (the poison); checks assert
finiteness and zeros for padding tokens.
"""
import numpy as np
import jax.numpy as jnp
import pytest

from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.errors import ShapeError
from kernels.flash_attention import PrefillTiles
from kernels.mla_attention import (MLATiles, mla_decode_pallas, mla_paged_attention,
                                   mla_prefill_attention, reference_mla_paged_attention)

F8 = jnp.float8_e4m3fn
R, DR, H, PS = 64, 16, 16, 16   # small kv_lora_rank / rope_dim / heads for CPU


def np_mla(q_latent, q_rope, latent_pages, page_table, seq_lens, query_start, scale):
  T = q_latent.shape[0]
  out = np.zeros(q_latent.shape)
  for b in range(page_table.shape[0]):
    lat = latent_pages[page_table[b]].reshape(-1, latent_pages.shape[-1])
    q0, q1 = query_start[b], query_start[b + 1]
    for t in range(q0, q1):
      pos = seq_lens[b] - (q1 - q0) + (t - q0)
      s = (lat[:pos + 1, :R] @ q_latent[t].T + lat[:pos + 1, R:] @ q_rope[t].T) * scale  # [S, H]
      p = np.exp(s - s.max(axis=0))
      out[t] = (p / p.sum(axis=0)).T @ lat[:pos + 1, :R]
  return out[:T]


def f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def make_case(rng, chunks, num_tokens, num_pages=32, dtype=jnp.bfloat16):
  pool = list(rng.permutation(np.arange(1, num_pages)))
  seqs = [SeqChunk([int(pool.pop()) for _ in range(-(-(s + n) // PS))], s, n) for s, n in chunks]
  batch = build_batch(seqs, PS, num_tokens=num_tokens, num_seqs=len(seqs) + 1,
                      pages_per_seq=max(len(c.pages) for c in seqs))
  lat = jnp.asarray(rng.standard_normal((num_pages, PS, R + DR)), dtype)
  ql = jnp.asarray(rng.standard_normal((num_tokens, H, R)), jnp.bfloat16)
  qr = jnp.asarray(rng.standard_normal((num_tokens, H, DR)), jnp.bfloat16)
  return ql, qr, lat, batch


def expected(ql, qr, lat_f64, batch):
  return np_mla(f64(ql), f64(qr), lat_f64, np.asarray(batch.page_table),
                np.asarray(batch.seq_lens), np.asarray(batch.query_start), 0.1)


def check(out, ref, real, bound):
  out = f64(out)
  assert np.isfinite(out).all()
  assert np.all(out[real:] == 0), "padding tokens must be zero"
  err = np.linalg.norm(out[:real] - ref[:real]) / np.linalg.norm(ref[:real])
  assert err < bound, err


def test_reference_matches_float64():
  rng = np.random.default_rng(1)
  ql, qr, lat, batch = make_case(rng, [(40, 1), (0, 7), (17, 2)], num_tokens=16)
  out = reference_mla_paged_attention(ql, qr, lat, batch, scale=0.1)
  ref = expected(ql, qr, f64(lat), batch)
  err = np.linalg.norm(f64(out)[:10] - ref[:10]) / np.linalg.norm(ref[:10])
  assert err < 1e-2


@pytest.mark.parametrize("tiles", [MLATiles(block_h=16, block_k=16, splits=1),
                                   MLATiles(block_h=8, block_k=32, splits=3)])
def test_decode_kernel_bf16(tiles):
  """Ragged lengths (1, odd, not a page multiple), shuffled pages, split-K with an empty split."""
  rng = np.random.default_rng(tiles.block_h)
  ql, qr, lat, batch = make_case(rng, [(44, 1), (0, 1), (70, 1)], num_tokens=4)
  out = mla_decode_pallas(ql, qr, lat, batch.page_table, batch.seq_lens, batch.query_start,
                          scale=0.1, tiles=tiles, interpret=True)
  check(out, expected(ql, qr, f64(lat), batch), 3, 1e-2)


@pytest.mark.parametrize("tile_upcast", [False, True])
def test_decode_kernel_fp8_latent_several_tokens(tile_upcast):
  """E4M3 latent cache with a scalar scale, 2 query tokens per sequence: <= 1.5e-2 vs float64 on
  the dequantized cache."""
  rng = np.random.default_rng(3)
  ql, qr, lat, batch = make_case(rng, [(30, 2), (0, 1), (51, 2)], num_tokens=8, dtype=jnp.float32)
  lat8 = (lat / 0.5).astype(F8)
  out = mla_decode_pallas(ql, qr, lat8, batch.page_table, batch.seq_lens, batch.query_start,
                          scale=0.1, latent_scale=0.5, max_q=2,
                          tiles=MLATiles(block_h=16, block_k=16, splits=2, tile_upcast=tile_upcast),
                          interpret=True)
  check(out, expected(ql, qr, f64(lat8) * 0.5, batch), 5, 1.5e-2)


def test_public_op_decode_batch():
  rng = np.random.default_rng(4)
  ql, qr, lat, batch = make_case(rng, [(25, 1), (3, 1)], num_tokens=3)
  out = mla_paged_attention(ql, qr, lat, batch, scale=0.1, impl="pallas")
  assert out.shape == (3, H, R) and out.dtype == ql.dtype
  check(out, expected(ql, qr, f64(lat), batch), 2, 1e-2)


def test_public_op_static_decode_bound():
  """max_new_tokens=1 (a decode-only step): the kernel runs without the runtime cond and gives
  the same result as with it."""
  rng = np.random.default_rng(7)
  ql, qr, lat, batch = make_case(rng, [(40, 1), (9, 1), (17, 1)], num_tokens=4)
  out = mla_paged_attention(ql, qr, lat, batch, scale=0.1, impl="pallas", max_new_tokens=1)
  np.testing.assert_array_equal(
      f64(out), f64(mla_paged_attention(ql, qr, lat, batch, scale=0.1, impl="pallas")))
  check(out, expected(ql, qr, f64(lat), batch), 3, 1e-2)


def test_context_mla_fp8():
  """Non-absorbed context MLA: FP8 nope part and V (per-head scales), bf16 rope part shared by all
  heads; <= 3e-2 vs float64 on the dequantized inputs."""
  rng = np.random.default_rng(6)
  T, B, S, Dn, Dv, Hc = 24, 2, 20, 32, 32, 4
  qs, kv_lens = np.asarray([0, 13, 20], np.int32), np.asarray([20, 7], np.int32)
  qn = rng.standard_normal((T, Hc, Dn)).astype(np.float32)
  kn = rng.standard_normal((B, S, Hc, Dn)).astype(np.float32)
  v = rng.standard_normal((B, S, Hc, Dv)).astype(np.float32)
  q_rope = jnp.asarray(rng.standard_normal((T, Hc, 16)), jnp.bfloat16)
  k_rope = jnp.asarray(rng.standard_normal((B, S, 1, 16)), jnp.bfloat16)
  sc = rng.uniform(0.5, 2, (3, Hc)).astype(np.float32)
  qn8, kn8, v8 = (jnp.asarray(x / s[:, None]).astype(F8) for x, s in zip((qn, kn, v), sc))
  out = mla_prefill_attention(qn8, q_rope, kn8, k_rope, v8, jnp.asarray(qs), jnp.asarray(kv_lens),
                              scale=0.15, q_scale=sc[0], k_scale=sc[1], v_scale=sc[2],
                              tiles=PrefillTiles(16, 16, 4, 2), interpret=True)
  qd, kd, vd = (f64(x) * s[:, None] for x, s in zip((qn8, kn8, v8), sc))
  ref = np.zeros((T, Hc, Dv))
  for b in range(B):
    for t in range(qs[b], qs[b + 1]):
      pos = kv_lens[b] - (qs[b + 1] - qs[b]) + t - qs[b]
      for h in range(Hc):
        s = (kd[b, :pos + 1, h] @ qd[t, h] + f64(k_rope)[b, :pos + 1, 0] @ f64(q_rope)[t, h]) * 0.15
        p = np.exp(s - s.max())
        ref[t, h] = p @ vd[b, :pos + 1, h] / p.sum()
  check(out, ref, 20, 3e-2)


def test_errors():
  rng = np.random.default_rng(0)
  ql, qr, lat, batch = make_case(rng, [(5, 1)], num_tokens=2, num_pages=4)
  with pytest.raises(ShapeError, match="kv_lora_rank"):
    mla_paged_attention(ql, qr, lat[..., :-1], batch, scale=0.1)
  with pytest.raises(ShapeError, match="q_rope"):
    mla_paged_attention(ql, qr[:, :4], lat, batch, scale=0.1)
  with pytest.raises(ShapeError, match="tokens"):
    mla_paged_attention(ql[:1], qr[:1], lat, batch, scale=0.1)
  with pytest.raises(ShapeError, match="dtype"):
    mla_decode_pallas(ql, qr, lat.astype(jnp.float32), batch.page_table, batch.seq_lens,
                      batch.query_start, scale=0.1, interpret=True)
  with pytest.raises(ShapeError, match="outside the cache"):
    bad = batch.page_table.at[0, 0].set(-1)
    mla_paged_attention(ql, qr, lat, batch.__class__(**{**batch.__dict__, "page_table": bad}),
                        scale=0.1, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    mla_paged_attention(ql, qr, lat, batch, scale=0.1, impl="flashmla")
