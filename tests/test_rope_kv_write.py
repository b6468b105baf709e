"""kernels.rope_kv_write (interpret mode) against float64 NumPy and against the XLA ops it
replaces (split, ops.apply_rope, kv_cache.write_kv)."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from jaxinfer.ops import rope_cos_sin, rope_inv_freq
from kernels.rope_kv_write import reference, rope_kv_write, supports

f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _inputs(T, hq, hkv, D, pages, page, dtype, kv_dtype, seed):
  rng = np.random.default_rng(seed)
  qkv = jnp.asarray(rng.standard_normal((T, (hq + 2 * hkv) * D)) * 2, dtype)
  positions = rng.integers(0, 500, T)
  cos, sin = rope_cos_sin(jnp.asarray(positions), rope_inv_freq(D, 10000.0))
  # distinct slots for the first T - 2 tokens, the last two padding (both to slot 0, the null page)
  slots = rng.choice(np.arange(page, pages * page), T, replace=False)
  slots[-2:] = 0
  k_pages = jnp.asarray(rng.standard_normal((pages, page, hkv, D)), kv_dtype)
  v_pages = jnp.asarray(rng.standard_normal((pages, page, hkv, D)), kv_dtype)
  return qkv, cos, sin, jnp.asarray(slots, jnp.int32), k_pages, v_pages, positions


def assert_same_at_slots(got, wants, slots):
  """(q, k_pages, v_pages) bit-equal to each of wants: q everywhere, the pages at the real tokens'
  slots (the last two tokens are padding, both written to the null page's slot 0)."""
  real = np.asarray(slots)[:-2]
  pick = lambda a: (f64(a).reshape(-1, *a.shape[2:])[real] if a.ndim == 4 else f64(a))
  for want in wants:
    for g, w in zip(got, want):
      np.testing.assert_array_equal(pick(g), pick(w))


def np_rope(x, positions, D):
  inv = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
  ang = positions[:, None, None] * inv[None, None, :]
  x1, x2 = x[..., :D // 2], x[..., D // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


# head_block: 0 one program per token; else that many heads per program (2 of Hkv=2 and 4: one
# and two programs for k and for v; 8 is clamped to Hkv)
@pytest.mark.parametrize("T,hq,hkv,D,dtype,kv_dtype,scales,head_block", [
    (8, 4, 2, 16, jnp.bfloat16, jnp.bfloat16, (1.0, 1.0), 0),
    (12, 8, 2, 32, jnp.bfloat16, jnp.float8_e4m3fn, (0.5, 2.0), 0),
    (6, 4, 4, 16, jnp.float32, jnp.float32, (1.0, 1.0), 0),
    (12, 8, 2, 32, jnp.bfloat16, jnp.float8_e4m3fn, (0.5, 2.0), 2),
    (6, 4, 4, 16, jnp.float32, jnp.float32, (1.0, 1.0), 2),
    (8, 4, 2, 16, jnp.bfloat16, jnp.bfloat16, (1.0, 1.0), 8),
])
def test_rope_kv_write_matches_float64_and_xla(T, hq, hkv, D, dtype, kv_dtype, scales, head_block):
  qkv, cos, sin, slots, k_pages, v_pages, positions = _inputs(T, hq, hkv, D, 16, 4, dtype,
                                                              kv_dtype, seed=T * D)
  ks, vs = scales
  q, k_new, v_new = rope_kv_write(qkv, cos, sin, slots, k_pages, v_pages, ks, vs, num_heads=hq,
                                  num_kv_heads=hkv, interpret=True, head_block=head_block)
  rq, rk, rv = reference(qkv, cos, sin, slots, k_pages, v_pages, jnp.float32(ks), jnp.float32(vs),
                         num_heads=hq, num_kv_heads=hkv)
  assert q.shape == (T, hq, D) and q.dtype == dtype
  assert k_new.dtype == kv_dtype and k_new.shape == k_pages.shape
  # the XLA ops it replaces: the same roundings (padding tokens' slot 0 aside: last writer wins;
  # float32 values may differ in the last bit, where one side contracts a * b + c into an FMA)
  same = (np.testing.assert_array_equal if dtype != jnp.float32 else
          lambda a, b: np.testing.assert_allclose(a, b, rtol=3e-7, atol=3e-7))
  same(f64(q), f64(rq))
  keep = np.ones(k_pages.shape[0] * k_pages.shape[1], bool)
  keep[0] = False
  flat = lambda a: f64(a).reshape(-1, hkv, D)[keep]
  same(flat(k_new), flat(rk))
  same(flat(v_new), flat(rv))
  # float64: the rotation, and the pages at the real tokens' slots (untouched elsewhere)
  x = f64(qkv).reshape(T, hq + 2 * hkv, D)
  tol = {jnp.bfloat16: 2e-2, jnp.float32: 1e-5}[dtype]
  np.testing.assert_allclose(f64(q), np_rope(x[:, :hq], positions, D), rtol=tol, atol=tol)
  real = np.asarray(slots)[:-2]
  kv_tol = 0.07 if kv_dtype == jnp.float8_e4m3fn else tol
  np.testing.assert_allclose(f64(k_new).reshape(-1, hkv, D)[real] * ks,
                             np_rope(x[:-2, hq:hq + hkv], positions[:-2], D), rtol=kv_tol,
                             atol=kv_tol * 4)
  np.testing.assert_allclose(f64(v_new).reshape(-1, hkv, D)[real] * vs, x[:-2, hq + hkv:],
                             rtol=kv_tol, atol=kv_tol * 4)
  untouched = np.ones_like(keep)
  untouched[np.asarray(slots)] = False
  np.testing.assert_array_equal(f64(k_new).reshape(-1, hkv, D)[untouched],
                                f64(k_pages).reshape(-1, hkv, D)[untouched])


def test_rope_kv_write_rejects_shapes_it_does_not_take():
  qkv, cos, sin, slots, k_pages, v_pages, _ = _inputs(4, 4, 2, 16, 8, 4, jnp.bfloat16,
                                                      jnp.bfloat16, seed=1)
  assert supports(qkv, k_pages, 4, 2)
  assert not supports(qkv, k_pages, 3, 2)            # heads not matching the row
  assert not supports(qkv.reshape(4, 8, 16), k_pages, 4, 2)
  assert not supports(qkv, k_pages.astype(jnp.float32), 4, 2)
  with pytest.raises(ShapeError):
    rope_kv_write(qkv, cos, sin, slots, k_pages, v_pages, num_heads=3, num_kv_heads=2,
                  interpret=True)
  with pytest.raises(ShapeError):
    rope_kv_write(qkv, cos[:2], sin, slots, k_pages, v_pages, num_heads=4, num_kv_heads=2,
                  interpret=True)


@pytest.mark.parametrize("head_block", [0, 1])
def test_rope_kv_write_scales_an_fp8_product(head_block):
  """qkv given as an FP8 projection's raw product with row / column scales (ops.ScaledRows): the
  kernel scales on load, bit for bit as scaling first with XLA ops."""
  from jaxinfer.ops import ScaledRows
  T, hq, hkv, D = 6, 4, 2, 32
  qkv, cos, sin, slots, k_pages, v_pages, _ = _inputs(T, hq, hkv, D, 16, 4, jnp.bfloat16,
                                                      jnp.float8_e4m3fn, seed=5)
  rng = np.random.default_rng(5)
  raw = (qkv.astype(jnp.float32) * 30).astype(jnp.bfloat16)
  rs = jnp.asarray(rng.uniform(0.01, 0.05, (T, 1)), jnp.float32)
  cs = jnp.asarray(rng.uniform(0.5, 2.0, (hq + 2 * hkv) * D), jnp.float32)
  got = rope_kv_write(raw, cos, sin, slots, k_pages, v_pages, 0.5, 2.0, num_heads=hq,
                      num_kv_heads=hkv, row_scale=rs, col_scale=cs, interpret=True,
                      head_block=head_block)
  want = reference(ScaledRows(raw, rs, cs, jnp.bfloat16).apply(), cos, sin, slots, k_pages,
                   v_pages, jnp.float32(0.5), jnp.float32(2.0), num_heads=hq, num_kv_heads=hkv)
  want2 = reference(raw, cos, sin, slots, k_pages, v_pages, jnp.float32(0.5), jnp.float32(2.0),
                    num_heads=hq, num_kv_heads=hkv, row_scale=rs, col_scale=cs)
  assert_same_at_slots(got, [want, want2], slots)
  with pytest.raises(ShapeError):
    rope_kv_write(raw, cos, sin, slots, k_pages, v_pages, num_heads=hq, num_kv_heads=hkv,
                  row_scale=rs, col_scale=cs[:-1], interpret=True)


@pytest.mark.parametrize("kv_dtype,fp8_weights", [(jnp.float32, False),
                                                  (jnp.float8_e4m3fn, False),
                                                  (jnp.bfloat16, True)])
def test_llama_forward_with_fused_rope_kv_gives_the_same_logits_and_cache(kv_dtype, fp8_weights):
  """llama.forward(fused_rope_kv=True) over fused projections: the kernel (interpret mode here)
  in place of RoPE + write_kv, the same logits and cache as the XLA ops; a prefill chunk then a
  decode step, so the decode step reads what the fused write stored. FP8 weights: the kernel
  takes wqkv's unscaled product."""
  from jaxinfer.attention import SeqChunk, build_batch
  from jaxinfer.models import llama
  from llama_fixtures import TINY, random_params
  dtype = jnp.bfloat16 if fp8_weights else jnp.float32
  params = llama.fuse_projections(random_params(TINY, seed=31, dtype=dtype))
  if fp8_weights:
    params = llama.quantize_projections_fp8(params)
  toks = np.random.default_rng(31).integers(0, TINY.vocab_size, 8).tolist()
  runs = []
  for fused in (False, True):
    cache = llama.create_cache(TINY, num_pages=16, page_size=4, dtype=kv_dtype)
    outs = []
    for start, n in ((0, 7), (7, 1)):
      batch = build_batch([SeqChunk([3, 9], start, n)], 4, num_tokens=8, num_seqs=2,
                          pages_per_seq=4)
      flat = jnp.asarray(toks[start:start + n] + [0] * (8 - n), jnp.int32)
      logits, cache = llama.forward_jit(params, flat, cache, batch, cfg=TINY,
                                        fused_rope_kv=fused)
      outs.append(np.asarray(logits))
    runs.append((outs, cache))
  (want, want_cache), (got, got_cache) = runs
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  for g, w in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
    np.testing.assert_allclose(f64(g)[1:], f64(w)[1:], rtol=1e-6, atol=1e-6)  # page 0: padding


def test_rope_kv_write_f16_queries_and_the_fp8_forward():
  """q_dtype=float16: the rotated q rounded as before (to qkv's dtype), then to f16: exact; an FP8
  Llama over an FP8 cache with fused_rope_kv + fp8_act_quant takes that path (f16 queries into
  attention, its f16 output quantized for wo) with logits close to the unfused forward's."""
  qkv, cos, sin, slots, kp, vp, _ = _inputs(6, 4, 2, 32, 16, 4, jnp.bfloat16, jnp.float8_e4m3fn,
                                            seed=9)
  q16, _, _ = rope_kv_write(qkv, cos, sin, slots, kp, vp, num_heads=4, num_kv_heads=2,
                            q_dtype=jnp.float16, interpret=True)
  q, _, _ = rope_kv_write(qkv, cos, sin, slots, kp, vp, num_heads=4, num_kv_heads=2,
                          interpret=True)
  assert q16.dtype == jnp.float16
  np.testing.assert_array_equal(f64(q16), f64(q))

  from jaxinfer.attention import SeqChunk, build_batch
  from jaxinfer.models import llama
  from llama_fixtures import TINY, random_params
  import kernels.rope_kv_write as rkw
  params = llama.quantize_projections_fp8(llama.fuse_projections(
      random_params(TINY, seed=33, dtype=jnp.bfloat16)))
  toks = np.random.default_rng(33).integers(0, TINY.vocab_size, 7).tolist()
  batch = build_batch([SeqChunk([3, 9], 0, 7)], 4, num_tokens=8, num_seqs=2, pages_per_seq=4)
  flat = jnp.asarray(toks + [0], jnp.int32)
  seen = []
  real = rkw.rope_kv_write
  rkw.rope_kv_write = lambda *a, **k: seen.append(k.get("q_dtype")) or real(*a, **k)
  try:
    outs = []
    for fused in (False, True):
      cache = llama.create_cache(TINY, num_pages=16, page_size=4, dtype=jnp.float8_e4m3fn)
      logits, _ = llama.forward(params, flat, cache, batch, TINY, all_logits=True,
                                fused_rope_kv=fused, fp8_act_quant=True)
      outs.append(f64(logits)[:7])
  finally:
    rkw.rope_kv_write = real
  assert seen == [jnp.float16] * TINY.num_layers
  rel = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
  assert rel < 0.05, rel


@pytest.mark.parametrize("head_block", [1, 2])
def test_rope_kv_write_head_blocks_sum_partials_like_one_program(head_block):
  """Split-K partials of an FP8 product (the decode path) with a few heads per program: bit for bit
  the one-program-per-token kernel and the XLA ops (sum, scale, RoPE, cache write)."""
  from jaxinfer.ops import ScaledRows
  T, hq, hkv, D, S = 5, 4, 2, 32, 2
  rng = np.random.default_rng(head_block)
  parts = jnp.asarray(rng.standard_normal((S, T, (hq + 2 * hkv) * D)) * 10, jnp.float32)
  rs = jnp.asarray(rng.uniform(0.01, 0.05, (T, 1)), jnp.float32)
  cs = jnp.asarray(rng.uniform(0.5, 2.0, (hq + 2 * hkv) * D), jnp.float32)
  _, cos, sin, slots, kp, vp, _ = _inputs(T, hq, hkv, D, 16, 4, jnp.bfloat16, jnp.float8_e4m3fn,
                                          seed=head_block)
  run = lambda hb: rope_kv_write(parts, cos, sin, slots, kp, vp, 0.5, 2.0, num_heads=hq,
                                 num_kv_heads=hkv, row_scale=rs, col_scale=cs, q_dtype=jnp.float16,
                                 interpret=True, head_block=hb)
  got, one = run(head_block), run(0)
  want = reference(ScaledRows(parts, rs, cs, jnp.bfloat16).apply(), cos, sin, slots, kp, vp,
                   jnp.float32(0.5), jnp.float32(2.0), num_heads=hq, num_kv_heads=hkv)
  assert_same_at_slots(got, [one, want], slots)
