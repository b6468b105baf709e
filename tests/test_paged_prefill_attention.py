"""Paged prefill attention (kernels/paged_prefill_attention.py) and its static-prefill dispatch,
in Pallas interpret mode, against float64 NumPy on fresh random inputs: mixed steps (prompt chunks
continuing a cached prefix, decode rows, padding tokens, odd lengths), FP8 and bf16 caches.

Interpret mode fills kernel outputs with NaN before the kernel runs, so an unwritten element shows
up as NaN: every check asserts finiteness, and padding tokens must come back as zeros.
"""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.attention import SeqChunk, build_batch, paged_attention
from jaxinfer.errors import ShapeError
from kernels.paged_prefill_attention import (PagedPrefillTiles, num_work_items,
                                             paged_prefill_attention, reference_paged_prefill,
                                             work_items)
from paged_reference import np_chunk_attention

F8 = jnp.float8_e4m3fn


def f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def mixed_case(rng, *, H, KV, D, page, spec, num_tokens, num_seqs, num_pages=48,
               dtype=jnp.bfloat16, k_scale=1.0, v_scale=1.0):
  """spec: (start, num_tokens) per sequence; pages drawn from a shuffled pool (no null page)."""
  pool = list(rng.permutation(np.arange(1, num_pages)))
  chunks = [SeqChunk([int(pool.pop()) for _ in range(-(-(s + n) // page))], s, n) for s, n in spec]
  pages_per_seq = max(len(c.pages) for c in chunks) + 1
  batch = build_batch(chunks, page, num_tokens=num_tokens, num_seqs=num_seqs,
                      pages_per_seq=pages_per_seq)
  kf = rng.standard_normal((num_pages, page, KV, D)).astype(np.float32)
  vf = rng.standard_normal((num_pages, page, KV, D)).astype(np.float32)
  kp = jnp.asarray(kf / k_scale, dtype)
  vp = jnp.asarray(vf / v_scale, dtype)
  q = jnp.asarray(rng.standard_normal((num_tokens, H, D)), jnp.bfloat16)
  return q, kp, vp, batch, chunks


# A chunk continuing a 21-token prefix across pages, two decode rows, a fresh odd prompt, a chunk
# continuing exactly one page; the step pads to 64 tokens and 8 sequences.
MIXED = [(21, 13), (40, 1), (0, 9), (5, 1), (16, 17)]


@pytest.mark.parametrize("H,KV,D,tiles", [
    (8, 2, 32, PagedPrefillTiles(block_q=4, block_k=16)),                     # GQA 4, page blocks
    (8, 2, 32, PagedPrefillTiles(block_q=8, block_k=32, small_items=True)),   # decode rows: 16
    (8, 2, 32, PagedPrefillTiles(block_q=2, block_k=32)),                     # 8 rows -> 16, gather
    (8, 1, 64, PagedPrefillTiles(block_q=4, block_k=8, sort_items=True)),     # GQA 8, 2 tiles/page
    (4, 4, 32, PagedPrefillTiles(block_q=16, block_k=16, page_blocks=False)),  # MHA, slot gather
])
def test_fp8_cache_mixed_step_matches_float64(H, KV, D, tiles):
  rng = np.random.default_rng(H * 10 + KV + tiles.block_q)
  q, kp, vp, batch, chunks = mixed_case(rng, H=H, KV=KV, D=D, page=16, spec=MIXED, num_tokens=64,
                                        num_seqs=8, dtype=F8, k_scale=0.5, v_scale=2.0)
  out = paged_prefill_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                                scale=D ** -0.5, k_scale=0.5, v_scale=2.0, tiles=tiles,
                                interpret=True)
  assert out.shape == q.shape and out.dtype == q.dtype
  got = f64(out)
  real = sum(c.num_tokens for c in chunks)
  want = np_chunk_attention(f64(q), f64(kp) * 0.5, f64(vp) * 2.0, chunks, 16, D ** -0.5)
  assert np.isfinite(got).all() and (got[real:] == 0).all()
  err = np.linalg.norm(got[:real] - want[:real]) / np.linalg.norm(want[:real])
  assert err < 1e-2, err    # bf16 q (f16 in the kernel), f16 P, bf16 output


@pytest.mark.parametrize("page,tiles", [(16, PagedPrefillTiles(block_q=8, block_k=16)),
                                        (8, PagedPrefillTiles(block_q=4, block_k=32))])
def test_bf16_cache_matches_float64_and_plain_jax_reference(page, tiles):
  rng = np.random.default_rng(page)
  spec = [(3, 30), (70, 1), (0, 1), (12, 5)]
  q, kp, vp, batch, chunks = mixed_case(rng, H=8, KV=2, D=32, page=page, spec=spec,
                                        num_tokens=48, num_seqs=6, num_pages=64)
  out = paged_prefill_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                                scale=0.2, tiles=tiles, interpret=True)
  got = f64(out)
  real = sum(c.num_tokens for c in chunks)
  want = np_chunk_attention(f64(q), f64(kp), f64(vp), chunks, page, 0.2)
  assert np.isfinite(got).all() and (got[real:] == 0).all()
  assert np.linalg.norm(got[:real] - want[:real]) / np.linalg.norm(want[:real]) < 1e-2
  ref = f64(reference_paged_prefill(q, kp, vp, batch.page_table, batch.seq_lens,
                                    batch.query_start, scale=0.2))
  assert np.linalg.norm(ref[:real] - want[:real]) / np.linalg.norm(want[:real]) < 1e-2
  assert (ref[real:] == 0).all()


def test_all_padding_and_full_steps():
  """A step of nothing but decode rows and padding, and one with no padding at all."""
  rng = np.random.default_rng(3)
  for spec, T in (([(9, 1), (30, 1), (1, 1)], 16), ([(0, 16), (7, 16)], 32)):
    q, kp, vp, batch, chunks = mixed_case(rng, H=4, KV=1, D=16, page=16, spec=spec, num_tokens=T,
                                          num_seqs=4, dtype=F8)
    out = f64(paged_prefill_attention(q, kp, vp, batch.page_table, batch.seq_lens,
                                      batch.query_start, scale=0.25,
                                      tiles=PagedPrefillTiles(block_q=4, block_k=16),
                                      interpret=True))
    real = sum(c.num_tokens for c in chunks)
    want = np_chunk_attention(f64(q), f64(kp), f64(vp), chunks, 16, 0.25)
    assert np.isfinite(out).all() and (out[real:] == 0).all()
    assert np.linalg.norm(out[:real] - want[:real]) / np.linalg.norm(want[:real]) < 1e-2


@pytest.mark.parametrize("block_q,sort", [(1, False), (3, True), (16, False), (16, True)])
def test_work_items_cover_every_token_once(block_q, sort):
  """Every real token in exactly one item of its sequence (first tokens block_q apart, positions
  right), every padding token in one padding item; sorted: heaviest first, padding last."""
  rng = np.random.default_rng(block_q + sort)
  for _ in range(20):
    T, B = int(rng.integers(8, 80)), int(rng.integers(1, 12))
    n = int(rng.integers(0, B + 1))
    lens = rng.multinomial(int(rng.integers(0, T + 1)), np.ones(n) / n) if n else np.zeros(0, int)
    qs = np.full(B + 1, lens.sum(), np.int32)
    qs[:n] = np.cumsum(lens) - lens
    seq_lens = np.zeros(B, np.int32)
    seq_lens[:n] = lens + rng.integers(0, 50, n)
    work = np.asarray(work_items(jnp.asarray(qs), jnp.asarray(seq_lens), T, block_q, sort))
    assert work.shape == (4, num_work_items(T, B, block_q))
    covered = np.zeros(T, int)
    for b, first, count, pos0 in work.T:
      if b >= 0:
        q_len = qs[b + 1] - qs[b]
        assert 1 <= count <= block_q and (first - qs[b]) % block_q == 0
        assert qs[b] <= first and first + count <= qs[b + 1]
        assert pos0 == seq_lens[b] - q_len + first - qs[b]
      else:
        assert qs[B] <= first and 0 <= count <= block_q and (count == 0 or first + count <= T)
      covered[first:first + count] += 1
    assert (covered == 1).all()
    real = work[:, work[0] >= 0]
    assert (work[0, real.shape[1]:] == -1).all()           # padding items last
    if sort:
      assert (np.diff(real[3] + real[2]) <= 0).all()
    else:
      assert (np.diff(real[0]) >= 0).all() and (np.diff(real[1]) > 0).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, F8])
def test_static_prefill_dispatch_uses_the_paged_kernel(dtype, monkeypatch):
  """attention.PAGED_PREFILL: static prefill steps run the paged kernel (no gather, no cond)."""
  import jaxinfer.attention as attention
  monkeypatch.setattr(attention, "PAGED_PREFILL", "1")
  monkeypatch.setattr(attention, "PAGED_PREFILL_TILES", "4,16,4,2")
  rng = np.random.default_rng(9)
  q, kp, vp, batch, chunks = mixed_case(rng, H=8, KV=2, D=32, page=16, spec=MIXED[:4],
                                        num_tokens=32, num_seqs=6, dtype=dtype, k_scale=0.7,
                                        v_scale=1.3)
  scales = (0.7, 1.3) if dtype == F8 else (1.0, 1.0)
  fn = lambda q, kp, vp, batch: paged_attention(q, kp, vp, batch, scale=0.2, k_scale=scales[0],
                                                v_scale=scales[1], impl="pallas",
                                                static_prefill=True)
  prims, kernels = set(), []

  def walk(jaxpr):   # the primitives outside the kernels, and the kernels' names
    for e in jaxpr.eqns:
      prims.add(e.primitive.name)
      if e.primitive.name == "gather" and e.invars[0].aval.ndim == 4:
        prims.add("page gather")
      if e.primitive.name == "pallas_call":
        kernels.append(e.params["name"])
        continue
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(q, kp, vp, batch).jaxpr)
  assert kernels == ["paged_prefill_attention"]
  assert "cond" not in prims and "page gather" not in prims, prims
  got = f64(fn(q, kp, vp, batch))
  real = sum(c.num_tokens for c in chunks)
  want = np_chunk_attention(f64(q), f64(kp) * scales[0], f64(vp) * scales[1], chunks, 16, 0.2)
  assert np.isfinite(got).all() and (got[real:] == 0).all()
  assert np.linalg.norm(got[:real] - want[:real]) / np.linalg.norm(want[:real]) < 1e-2


def test_auto_dispatch_by_page_table_span(monkeypatch):
  """PAGED_PREFILL="auto": the paged kernel where page tables span <= PAGED_PREFILL_MAX_KEYS keys,
  else gather + flash_prefill; "0" never."""
  import jaxinfer.attention as attention
  rng = np.random.default_rng(4)
  q, kp, vp, batch, _ = mixed_case(rng, H=8, KV=2, D=32, page=16, spec=MIXED[:4], num_tokens=32,
                                   num_seqs=6, dtype=F8)
  span = batch.page_table.shape[1] * 16

  def kernels():   # a fresh function each time: traces are cached per function
    fn = lambda q, kp, vp, batch: paged_attention(q, kp, vp, batch, scale=0.2, impl="pallas",
                                                  static_prefill=True)
    text = str(jax.make_jaxpr(fn)(q, kp, vp, batch))
    return "paged_prefill_attention" in text, "flash_prefill" in text

  for mode, max_keys, want in (("auto", span, (True, False)), ("auto", span - 1, (False, True)),
                               ("0", 10 ** 6, (False, True)), ("1", 0, (True, False))):
    monkeypatch.setattr(attention, "PAGED_PREFILL", mode)
    monkeypatch.setattr(attention, "PAGED_PREFILL_MAX_KEYS", max_keys)
    assert kernels() == want, (mode, max_keys)


def test_shape_errors():
  q = jnp.ones((8, 4, 32), jnp.bfloat16)
  kp = jnp.ones((4, 16, 2, 32), jnp.bfloat16)
  pt, lens, qs = jnp.ones((2, 2), jnp.int32), jnp.asarray([8, 8]), jnp.asarray([0, 4, 8])
  with pytest.raises(ShapeError, match="divide"):
    paged_prefill_attention(q, kp, kp, pt, lens, qs, scale=1.0,
                            tiles=PagedPrefillTiles(block_k=24), interpret=True)
  with pytest.raises(ShapeError):
    paged_prefill_attention(q.astype(jnp.float32), kp, kp, pt, lens, qs, scale=1.0,
                            interpret=True)
  with pytest.raises(ShapeError):
    paged_prefill_attention(q[:, :3], kp, kp, pt, lens, qs, scale=1.0, interpret=True)
