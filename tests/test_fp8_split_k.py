"""FP8 decode products as explicit split-K partial sums (ops.FP8_SPLIT_K_MAX_ROWS): the batched dot,
ScaledRows over partials, and the consumers that sum them (add_rms_norm kernels, rope_kv_write) in
interpret mode, bit for bit against summing first with XLA ops and close to float64."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import ops
from kernels import add_rms_norm as arn
from kernels import rope_kv_write as rkw

f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def test_split_rule(monkeypatch):
  monkeypatch.setattr(ops, "FP8_SPLIT_K_MAX_ROWS", 64)
  assert ops.fp8_split_k(64, 4096, 6144) == 4 and ops.fp8_split_k(64, 4096, 4096) == 8
  assert ops.fp8_split_k(64, 14336, 4096) == 8 and ops.fp8_split_k(64, 4096, 28672) == 1
  assert ops.fp8_split_k(65, 4096, 4096) == 1 and ops.fp8_split_k(8, 768, 4096) == 2
  # one row: XLA:GPU's one-row batched FP8 dot is wrong on the H100, so the plain dot
  assert ops.fp8_split_k(1, 4096, 4096) == 1 and ops.fp8_split_k(2, 4096, 4096) == 8
  x1 = jnp.asarray(np.random.default_rng(2).standard_normal((1, 1024)), jnp.bfloat16)
  w1 = ops.FP8Weight.from_dense(jnp.asarray(np.random.default_rng(3).standard_normal((1024, 256)),
                                            jnp.bfloat16))
  assert not w1.linear_deferred(x1).partials
  monkeypatch.setattr(ops, "FP8_SPLIT_K_MAX_ROWS", 0)
  assert ops.fp8_split_k(64, 4096, 4096) == 1


def test_fp8_linear_with_partials_matches_float64(monkeypatch):
  rng = np.random.default_rng(1)
  w = ops.FP8Weight.from_dense(jnp.asarray(rng.standard_normal((2048, 512)), jnp.bfloat16))
  x = jnp.asarray(rng.standard_normal((16, 2048)), jnp.bfloat16)
  plain = ops.linear(x, w)
  monkeypatch.setattr(ops, "FP8_SPLIT_K_MAX_ROWS", 64)
  deferred = w.linear_deferred(x)
  assert deferred.partials and deferred.raw.shape == (8, 16, 512) and deferred.shape == (16, 512)
  split = ops.linear(x, w)
  xq, sx = ops.quantize_rows_fp8(x)
  want = (f64(xq) * f64(sx)) @ f64(w.dequantize())
  for got in (plain, split):
    np.testing.assert_allclose(f64(got), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
  # the split sums in float32 before one rounding: within a bf16 ulp of the plain form
  np.testing.assert_allclose(f64(split), f64(plain), rtol=1e-2, atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("quantize", [False, True])
def test_add_rms_norm_sums_partials(quantize):
  T, H, S = 6, 128, 8
  rng = np.random.default_rng(2 + quantize)
  x = jnp.asarray(rng.standard_normal((T, H)) * 2, jnp.bfloat16)
  parts = jnp.asarray(rng.standard_normal((S, T, H)) * 20, jnp.float32)
  rs = jnp.asarray(rng.uniform(0.001, 0.05, (T, 1)), jnp.float32)
  cs = jnp.asarray(rng.uniform(0.5, 2.0, H), jnp.float32)
  w = jnp.asarray(rng.uniform(0.5, 1.5, H), jnp.bfloat16)
  assert arn.supports(x, parts, w) and not arn.supports(x, parts[:3], w)
  y = ops.ScaledRows(parts, rs, cs, jnp.bfloat16).apply()
  fn, ref = (arn.add_rms_norm_fp8, arn.reference_fp8) if quantize else (arn.add_rms_norm,
                                                                        arn.reference)
  got = fn(x, parts, w, eps=1e-5, y_row_scale=rs, y_col_scale=cs, interpret=True)
  for g, r in zip(got, ref(x, y, w, 1e-5)):
    np.testing.assert_array_equal(f64(g), f64(r))
  y64 = f64(parts).sum(0) * f64(rs) * f64(cs)
  np.testing.assert_allclose(f64(got[0]), f64(x) + y64, rtol=2e-2, atol=2e-2)


def test_rope_kv_write_sums_partials():
  from jaxinfer.ops import rope_cos_sin, rope_inv_freq
  T, hq, hkv, D, S = 5, 4, 2, 32, 4
  rng = np.random.default_rng(3)
  parts = jnp.asarray(rng.standard_normal((S, T, (hq + 2 * hkv) * D)) * 10, jnp.float32)
  rs = jnp.asarray(rng.uniform(0.01, 0.05, (T, 1)), jnp.float32)
  cs = jnp.asarray(rng.uniform(0.5, 2.0, (hq + 2 * hkv) * D), jnp.float32)
  cos, sin = rope_cos_sin(jnp.asarray(rng.integers(0, 100, T)), rope_inv_freq(D, 10000.0))
  slots = jnp.asarray(rng.choice(np.arange(4, 64), T, replace=False), jnp.int32)
  kp = jnp.asarray(rng.standard_normal((16, 4, hkv, D)), jnp.float8_e4m3fn)
  vp = jnp.asarray(rng.standard_normal((16, 4, hkv, D)), jnp.float8_e4m3fn)
  assert rkw.supports(parts, kp, hq, hkv)
  got = rkw.rope_kv_write(parts, cos, sin, slots, kp, vp, 1.0, 1.0, num_heads=hq,
                          num_kv_heads=hkv, row_scale=rs, col_scale=cs, interpret=True)
  qkv = ops.ScaledRows(parts, rs, cs, jnp.bfloat16).apply()
  want = rkw.reference(qkv, cos, sin, slots, kp, vp, jnp.float32(1.0), jnp.float32(1.0),
                       num_heads=hq, num_kv_heads=hkv)
  assert got[0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(f64(got[0]), f64(want[0]))
  s = np.asarray(slots)
  for g, w in zip(got[1:], want[1:]):
    np.testing.assert_array_equal(f64(g).reshape(-1, hkv, D)[s], f64(w).reshape(-1, hkv, D)[s])


def test_llama_forward_with_split_k(monkeypatch):
  """An FP8 Llama with split-K partials in its small steps (the fused RoPE kernel, interpret mode,
  sums wqkv's partials; XLA sums the others on CPU): as close to the unquantized model's logits as
  the plain FP8 forward (the two differ where an E4M3 rounding of a later layer's input flips)."""
  import dataclasses
  from jaxinfer.attention import SeqChunk, build_batch
  from jaxinfer.models import llama
  from llama_fixtures import TINY, random_params
  cfg = dataclasses.replace(TINY, hidden_size=256, intermediate_size=256, num_heads=4,
                            num_kv_heads=2, head_dim=64)
  dense = llama.fuse_projections(random_params(cfg, seed=4, dtype=jnp.bfloat16))
  params = llama.quantize_projections_fp8(dense)
  toks = np.random.default_rng(4).integers(0, cfg.vocab_size, 7).tolist()
  batch = build_batch([SeqChunk([1, 2, 3], 0, 7)], 4, num_tokens=8, num_seqs=2, pages_per_seq=4)
  flat = jnp.asarray(toks + [0], jnp.int32)

  def logits(p):
    cache = llama.create_cache(cfg, num_pages=8, page_size=4, dtype=jnp.bfloat16)
    out, _ = llama.forward(p, flat, cache, batch, cfg, all_logits=True, fused_rope_kv=True,
                           fp8_quant_in_norm=True)
    return f64(out)[:7]

  ref, plain = logits(dense), logits(params)
  monkeypatch.setattr(ops, "FP8_SPLIT_K_MAX_ROWS", 64)
  seen = []
  real = rkw.rope_kv_write
  monkeypatch.setattr(rkw, "rope_kv_write", lambda qkv, *a, **k: seen.append(qkv.shape) or
                      real(qkv, *a, **k))
  split = logits(params)
  assert seen == [(2, 8, 512)] * cfg.num_layers, seen     # K = 256: two 128-wide slices
  assert not np.array_equal(split, plain)
  err = lambda a: np.linalg.norm(a - ref) / np.linalg.norm(ref)
  assert err(split) < 1.5 * err(plain) + 0.02, (err(split), err(plain))
