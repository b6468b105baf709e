"""kernels.fp8_act_quant (interpret mode): per-row E4M3 quantization, alone and after SwiGLU,
against float64 NumPy and bit for bit against the plain-JAX references."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from jaxinfer.ops import E4M3_MAX, quantize_rows_fp8
from kernels.fp8_act_quant import (Tiling, chunk_width, quantize_rows, reference_silu_mul,
                                   reference_silu_mul_quantize, silu_mul_quantize, supports)

f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _check_quantized(q, sx, want):
  """q * sx dequantizes to float64 ``want`` within E4M3's rounding; scales = row amax / 448."""
  assert q.dtype == jnp.float8_e4m3fn and sx.shape == (want.shape[0], 1)
  sx64 = f64(sx)
  assert np.isfinite(sx64).all() and (sx64 > 0).all()
  nz = np.abs(want).max(axis=1) > 0
  np.testing.assert_allclose(sx64[nz, 0], np.abs(want[nz]).max(axis=1) / E4M3_MAX, rtol=2e-2)
  deq = f64(q) * sx64
  np.testing.assert_allclose(deq, want, rtol=0.07, atol=0.07 * np.abs(want).max())
  assert np.abs(f64(q)).max() <= E4M3_MAX


@pytest.mark.parametrize("T,K,dtype", [(5, 256, jnp.bfloat16), (3, 96, jnp.float32),
                                       (4, 6144, jnp.bfloat16)])
def test_quantize_rows_matches_float64_and_xla(T, K, dtype):
  rng = np.random.default_rng(T * K)
  x = rng.standard_normal((T, K)) * rng.uniform(0.01, 30, (T, 1))
  x[1] = 0.0                                   # a zero row keeps a finite scale
  x = jnp.asarray(x, dtype)
  q, sx = quantize_rows(x, interpret=True)
  _check_quantized(q, sx, f64(x))
  assert (f64(q)[1] == 0).all()
  rq, rsx = quantize_rows_fp8(x)
  np.testing.assert_array_equal(f64(q), f64(rq))
  np.testing.assert_array_equal(f64(sx), f64(rsx))


@pytest.mark.parametrize("T,I,dtype,scaled", [(6, 96, jnp.bfloat16, False),
                                              (4, 512, jnp.bfloat16, True),
                                              (3, 48, jnp.float32, True),
                                              (2, 14336, jnp.bfloat16, True)])
def test_silu_mul_quantize_matches_float64_and_reference(T, I, dtype, scaled):
  rng = np.random.default_rng(T + I)
  raw = jnp.asarray(rng.standard_normal((T, 2 * I)) * (40 if scaled else 3), dtype)
  rs = jnp.asarray(rng.uniform(0.01, 0.1, (T, 1)), jnp.float32) if scaled else None
  cs = jnp.asarray(rng.uniform(0.5, 2.0, 2 * I), jnp.float32) if scaled else None
  q, sx = silu_mul_quantize(raw, rs, cs, interpret=True)
  assert q.shape == (T, I)
  y = f64(raw) * (f64(rs) * f64(cs) if scaled else 1.0)
  g, u = y[:, :I], y[:, I:]
  _check_quantized(q, sx, g / (1 + np.exp(-g)) * u)
  rq, rsx = reference_silu_mul_quantize(raw, rs, cs)
  np.testing.assert_array_equal(f64(q), f64(rq))
  np.testing.assert_array_equal(f64(sx), f64(rsx))


@pytest.mark.parametrize("tiling", [Tiling(amax_once=False), Tiling(interleave=True),
                                    Tiling(rows=2), Tiling(rows=4, reload=True),
                                    Tiling(split=2), Tiling(rows=2, split=4, num_warps=2)])
def test_tilings_give_the_same_codes(tiling):
  """Rows per program, reloading, and the two-kernel column split: float64-close and bit for bit
  the plain-JAX references (SwiGLU with the product's scales, and plain rows)."""
  T, I = 4, 7 * 64                                # 7 slices of 64 per row: odd slice counts
  rng = np.random.default_rng(17)
  raw = jnp.asarray(rng.standard_normal((T, 2 * I)) * 40, jnp.bfloat16)
  rs = jnp.asarray(rng.uniform(0.01, 0.1, (T, 1)), jnp.float32)
  cs = jnp.asarray(rng.uniform(0.5, 2.0, 2 * I), jnp.float32)
  q, sx = silu_mul_quantize(raw, rs, cs, interpret=True, tiling=tiling)
  y = f64(raw) * f64(rs) * f64(cs)
  g, u = y[:, :I], y[:, I:]
  _check_quantized(q, sx, g / (1 + np.exp(-g)) * u)
  rq, rsx = reference_silu_mul_quantize(raw, rs, cs)
  np.testing.assert_array_equal(f64(q), f64(rq))
  np.testing.assert_array_equal(f64(sx), f64(rsx))
  x = jnp.asarray(rng.standard_normal((T, I)) * rng.uniform(0.1, 10, (T, 1)), jnp.float16)
  q, sx = quantize_rows(x, interpret=True, tiling=tiling)
  _check_quantized(q, sx, f64(x))
  rq, rsx = quantize_rows_fp8(x)
  np.testing.assert_array_equal(f64(q), f64(rq))
  np.testing.assert_array_equal(f64(sx), f64(rsx))


def test_reference_silu_mul_is_the_models_swiglu():
  """reference_silu_mul (silu in float32, rounded once) against llama.mlp's jax.nn.silu(gate) * up
  in bf16: within bf16 rounding."""
  import jax
  rng = np.random.default_rng(3)
  gu = jnp.asarray(rng.standard_normal((4, 256)) * 3, jnp.bfloat16)
  gate, up = jnp.split(gu, 2, axis=-1)
  np.testing.assert_allclose(f64(reference_silu_mul(gu)), f64(jax.nn.silu(gate) * up),
                             rtol=2e-2, atol=2e-2)


def test_shapes_it_does_not_take():
  assert chunk_width(14336) == 2048 and chunk_width(96) == 32 and chunk_width(4096) == 2048
  assert chunk_width(40) is None and chunk_width(2048 * 33) is None
  assert supports(jnp.ones((2, 192)), glu=True) and not supports(jnp.ones((2, 80)), glu=True)
  assert not supports(jnp.ones((2, 3, 64)), glu=False)
  with pytest.raises(ShapeError):
    quantize_rows(jnp.ones((2, 40), jnp.bfloat16), interpret=True)
  with pytest.raises(ShapeError):
    silu_mul_quantize(jnp.ones((2, 64), jnp.bfloat16), jnp.ones((3, 1)), jnp.ones(64),
                      interpret=True)


def test_llama_forward_with_fp8_act_quant(monkeypatch):
  """llama.forward(fp8_act_quant=True) over FP8 fused projections: the kernels (interpret mode)
  quantize the wo and w_down inputs. With the model's SwiGLU computed as the kernel rounds it
  (silu in float32, rounded once: reference_silu_mul) the logits are bit-identical to the XLA
  path, with and without the norms' quantization; with jax.nn.silu in bf16 (two roundings) they
  differ by what a bf16 ulp turns into after E4M3 rounding. bf16 weights ignore the option."""
  import jax
  from jaxinfer.attention import SeqChunk, build_batch
  from jaxinfer.models import llama
  from llama_fixtures import TINY, random_params
  import kernels.fp8_act_quant as aq
  params = llama.fuse_projections(random_params(TINY, seed=41, dtype=jnp.bfloat16))
  q = llama.quantize_projections_fp8(params)
  toks = np.random.default_rng(41).integers(0, TINY.vocab_size, 9).tolist()
  batch = build_batch([SeqChunk([1, 2, 3], 0, 9)], 4, num_tokens=16, num_seqs=2, pages_per_seq=4)
  flat = jnp.asarray(toks + [0] * 7, jnp.int32)

  def logits(p, **kw):
    cache = llama.create_cache(TINY, num_pages=8, page_size=4, dtype=jnp.bfloat16)
    out, _ = llama.forward(p, flat, cache, batch, TINY, all_logits=True, **kw)
    return f64(out)[:9]

  seen = []
  real_rows, real_glu = aq.quantize_rows, aq.silu_mul_quantize
  monkeypatch.setattr(aq, "quantize_rows", lambda *a, **k: seen.append("rows") or
                      real_rows(*a, **k))
  monkeypatch.setattr(aq, "silu_mul_quantize", lambda *a, **k: seen.append("glu") or
                      real_glu(*a, **k))
  got = {n: logits(q, fp8_quant_in_norm=n, fp8_act_quant=True) for n in (False, True)}
  assert seen == ["rows", "glu"] * TINY.num_layers * 2, seen
  for in_norm in (False, True):
    rel = np.linalg.norm(got[in_norm] - logits(q, fp8_quant_in_norm=in_norm))
    assert rel / np.linalg.norm(got[in_norm]) < 0.1, rel
  f32_silu = lambda g: (g.astype(jnp.float32) * jax.nn.sigmoid(g.astype(jnp.float32))).astype(
      g.dtype)
  monkeypatch.setattr(llama.jax.nn, "silu", f32_silu)
  for in_norm in (False, True):
    np.testing.assert_array_equal(got[in_norm], logits(q, fp8_quant_in_norm=in_norm))
  np.testing.assert_array_equal(logits(params, fp8_act_quant=True), logits(params))
