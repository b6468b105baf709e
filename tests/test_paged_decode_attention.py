"""Paged decode attention (kernels/paged_decode_attention.py) and the ``paged_attention`` dispatch,
in Pallas interpret mode, against float64 NumPy on fresh random inputs.

Interpret mode fills kernel outputs with NaN before the kernel runs (the poison); every check
asserts finiteness, and padding tokens must come back as zeros.
"""
import numpy as np
import jax.numpy as jnp
import pytest

from jaxinfer.attention import SeqChunk, build_batch, paged_attention
from jaxinfer.errors import ShapeError
from kernels.paged_decode_attention import (BF16_TILES, FP8_SHORT_TILES, FP8_TILES,
                                            SPLIT_K_FP8_SMALL_PAGE_TILES, SPLIT_K_FP8_TILES,
                                            SPLIT_K_TILES,
                                            DecodeTiles, default_tiles, e4m3_bits_to_f16,
                                            paged_decode_attention)

F8 = jnp.float8_e4m3fn


def np_paged(q, k_pages, v_pages, page_table, seq_lens, query_start):
  """float64; token i of sequence b at position seq_lens[b] - q_len + i, causal, scale D^-0.5."""
  T, H, D = q.shape
  _, ps, KV, _ = k_pages.shape
  out = np.zeros((T, H, D))
  for b in range(page_table.shape[0]):
    k = k_pages[page_table[b]].reshape(-1, KV, D)
    v = v_pages[page_table[b]].reshape(-1, KV, D)
    q0, q1 = query_start[b], query_start[b + 1]
    for t in range(q0, q1):
      pos = seq_lens[b] - (q1 - q0) + (t - q0)
      for h in range(H):
        s = k[:pos + 1, h // (H // KV)] @ q[t, h] * D ** -0.5
        p = np.exp(s - s.max())
        out[t, h] = p @ v[:pos + 1, h // (H // KV)] / p.sum()
  return out


def make_case(rng, *, H, KV, D, page_size, chunks, num_tokens, num_pages=40, dtype=jnp.bfloat16):
  """chunks: (start, num_tokens) per sequence; pages drawn from a shuffled pool (no null page)."""
  pool = list(rng.permutation(np.arange(1, num_pages)))
  seqs = []
  for start, n in chunks:
    need = -(-(start + n) // page_size)
    seqs.append(SeqChunk([int(pool.pop()) for _ in range(need)], start, n))
  pages_per_seq = max(len(c.pages) for c in seqs) + 1
  batch = build_batch(seqs, page_size, num_tokens=num_tokens, num_seqs=len(seqs) + 1,
                      pages_per_seq=pages_per_seq)
  kp = jnp.asarray(rng.standard_normal((num_pages, page_size, KV, D)), dtype)
  vp = jnp.asarray(rng.standard_normal((num_pages, page_size, KV, D)), dtype)
  q = jnp.asarray(rng.standard_normal((num_tokens, H, D)), jnp.bfloat16)
  return q, kp, vp, batch


def f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def check(out, ref, real_tokens, bound):
  out = f64(out)
  assert np.isfinite(out).all()
  assert np.all(out[real_tokens:] == 0), "padding tokens must be zero"
  err = np.linalg.norm(out[:real_tokens] - ref[:real_tokens]) / np.linalg.norm(ref[:real_tokens])
  assert err < bound, err


# (GQA ratio, page size, block_k, splits, page_blocks): page == block, block spanning 2 pages, page
# spanning 2 blocks (read as blocks, and slot by slot); one split, and split-K with uneven and empty
# splits.
@pytest.mark.parametrize("H,KV,page_size,block_k,splits,page_blocks", [
    (4, 4, 16, 16, 1, True), (8, 2, 8, 16, 3, True), (16, 2, 32, 16, 7, True),
    (8, 2, 32, 16, 2, False)])
def test_decode_bf16(H, KV, page_size, block_k, splits, page_blocks):
  rng = np.random.default_rng(H + page_size)
  D = 64
  # lengths 1, odd, not a multiple of the page or block
  q, kp, vp, batch = make_case(rng, H=H, KV=KV, D=D, page_size=page_size,
                               chunks=[(36, 1), (0, 1), (80, 1)], num_tokens=4)
  tiles = DecodeTiles(block_k, splits=splits, page_blocks=page_blocks)
  out = paged_decode_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                               scale=D ** -0.5, tiles=tiles,
                               interpret=True)
  ref = np_paged(f64(q), f64(kp), f64(vp), np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, 3, 1e-2)


def test_default_tiles_by_regime():
  """Split-K regimes (few sequences) take the split-K tiles when a tile fits in a page (FP8 over
  16-token pages: SPLIT_K_FP8_SMALL_PAGE_TILES); many sequences (one split, also for FP8's 4
  programs per SM) keep the per-dtype tiles; so do bf16 pages smaller than the split-K tile."""
  for fp8 in (False, True):
    assert default_tiles(fp8, 1, 8, 32768, 64) == (SPLIT_K_FP8_TILES if fp8 else SPLIT_K_TILES)
    assert default_tiles(fp8, 64, 8, 4096, 64) == (FP8_TILES if fp8 else BF16_TILES)
    assert default_tiles(fp8, 1, 8, 32768, 16) == (SPLIT_K_FP8_SMALL_PAGE_TILES if fp8
                                                   else BF16_TILES)
  assert default_tiles(True, 1, 8, 32768, 32) == SPLIT_K_FP8_TILES      # 32-key FP8 tiles
  assert default_tiles(False, 1, 8, 32768, 32) == BF16_TILES
  assert default_tiles(False, 1, 8, 64, 64) == BF16_TILES   # one 64-key block: nothing to split
  # FP8, one split, short contexts (the c=64 serving decode): every tile masked in one loop
  assert default_tiles(True, 64, 8, 256, 16) == FP8_SHORT_TILES
  assert default_tiles(True, 256, 8, 1024, 16) == FP8_SHORT_TILES
  assert default_tiles(True, 64, 8, 2048, 16) == FP8_TILES
  assert default_tiles(True, 1, 8, 256, 16) == SPLIT_K_FP8_SMALL_PAGE_TILES   # split-K
  assert default_tiles(True, 4, 8, 8192, 16) == SPLIT_K_FP8_SMALL_PAGE_TILES
  assert default_tiles(True, 32, 8, 256, 16) == FP8_SHORT_TILES   # one split (FP8_TILES: 2)
  assert default_tiles(True, 8, 8, 256, 16) == FP8_TILES          # 64 sequence-heads
  assert default_tiles(True, 8, 8, 2048, 16) == FP8_TILES
  assert default_tiles(False, 64, 8, 256, 16) == BF16_TILES


def test_decode_default_tiles_fp8_split_k_page_16():
  """tiles=None, FP8, few sequences over 16-token pages: SPLIT_K_FP8_SMALL_PAGE_TILES (2 warps,
  4 programs per SM, per-row combine), against float64."""
  rng = np.random.default_rng(23)
  q, kp, vp, batch = make_case(rng, H=8, KV=2, D=64, page_size=16, num_pages=30,
                               chunks=[(150, 1), (0, 1), (70, 1)], num_tokens=4,
                               dtype=jnp.float32)
  assert default_tiles(True, 4, 2, batch.page_table.shape[1] * 16, 16) == \
      SPLIT_K_FP8_SMALL_PAGE_TILES
  kp, vp = (kp / 0.5).astype(F8), (vp / 2.0).astype(F8)
  out = paged_decode_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                               scale=0.125, k_scale=0.5, v_scale=2.0, interpret=True)
  ref = np_paged(f64(q), f64(kp) * 0.5, f64(vp) * 2.0, np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, 3, 1.5e-2)


def test_short_tiles_switch(monkeypatch):
  import kernels.paged_decode_attention as pda
  monkeypatch.setattr(pda, "SHORT_TILES", False)
  assert default_tiles(True, 64, 8, 256, 16) == FP8_TILES


def test_decode_fp8_short_tiles_one_split():
  """FP8_SHORT_TILES (mask_tail off: every tile masked in one loop) with one split, ragged lengths
  (multiples of the tile and not, 1) and a padding row, against float64."""
  import dataclasses
  rng = np.random.default_rng(17)
  chunks = [(95, 1), (0, 1), (37, 1), (160, 1)]
  q, kp, vp, batch = make_case(rng, H=8, KV=2, D=64, page_size=16, num_pages=30, chunks=chunks,
                               num_tokens=5, dtype=jnp.float32)
  kp, vp = (kp / 0.5).astype(F8), (vp / 2.0).astype(F8)
  out = paged_decode_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                               scale=0.125, k_scale=0.5, v_scale=2.0, interpret=True,
                               tiles=dataclasses.replace(FP8_SHORT_TILES, splits=1))
  ref = np_paged(f64(q), f64(kp) * 0.5, f64(vp) * 2.0, np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, 4, 1.5e-2)


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_default_tiles_split_k(fp8):
  """tiles=None in the split-K regime (page 64): SPLIT_K_TILES / SPLIT_K_FP8_TILES (per-row
  combine), ragged lengths, against float64 (FP8: on the dequantized cache, with scales)."""
  rng = np.random.default_rng(21)
  q, kp, vp, batch = make_case(rng, H=8, KV=2, D=64, page_size=64, num_pages=12,
                               chunks=[(150, 1), (0, 1), (70, 1)], num_tokens=4,
                               dtype=jnp.float32 if fp8 else jnp.bfloat16)
  ks, vs = (0.5, 2.0) if fp8 else (1.0, 1.0)
  if fp8:
    kp, vp = (kp / ks).astype(F8), (vp / vs).astype(F8)
  out = paged_decode_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                               scale=64 ** -0.5, k_scale=ks, v_scale=vs, interpret=True)
  ref = np_paged(f64(q), f64(kp) * ks, f64(vp) * vs, np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, 3, 1.5e-2 if fp8 else 1e-2)


def test_decode_several_query_tokens():
  """Speculative-style: up to 3 new tokens per sequence, causal among themselves."""
  rng = np.random.default_rng(5)
  q, kp, vp, batch = make_case(rng, H=8, KV=2, D=32, page_size=16,
                               chunks=[(20, 3), (0, 1), (45, 2)], num_tokens=8)
  out = paged_decode_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                               scale=32 ** -0.5, max_q=3, tiles=DecodeTiles(16, splits=2),
                               interpret=True)
  ref = np_paged(f64(q), f64(kp), f64(vp), np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, 6, 1e-2)


@pytest.mark.parametrize("upcast", ["cvt", "tile", "tile-v", "bits", "cvt-all-masked"])
def test_decode_fp8_kv(upcast):
  """E4M3 K/V with scalar scales: <= 1.5e-2 vs float64 on the dequantized cache, for each way of
  upcasting the tiles (and once with every tile masked, not only the tail)."""
  rng = np.random.default_rng(9)
  q, kp, vp, batch = make_case(rng, H=8, KV=2, D=64, page_size=16,
                               chunks=[(50, 1), (3, 1)], num_tokens=4, dtype=jnp.float32)
  kp8, vp8 = (kp / 0.25).astype(F8), (vp / 3.0).astype(F8)
  out = paged_decode_attention(q, kp8, vp8, batch.page_table, batch.seq_lens, batch.query_start,
                               scale=0.125, k_scale=0.25, v_scale=3.0,
                               tiles=DecodeTiles(16, splits=2, tile_upcast=upcast == "tile",
                                                 tile_upcast_v=upcast == "tile-v",
                                                 bits_upcast=upcast == "bits",
                                                 mask_tail=upcast != "cvt-all-masked"),
                               interpret=True)
  ref = np_paged(f64(q), f64(kp8) * 0.25, f64(vp8) * 3.0, np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, 2, 1.5e-2)


# The split-K combines "rows" (one program per query row) and "fused" (the last split of each
# (sequence, KV head) merges the partials in the same kernel): GQA 1/4/8, splits not a power of two
# (the padded partial slots and the padding rows stay NaN-poisoned and must be masked), empty
# splits, FP8 with scales, several query tokens per sequence.
@pytest.mark.parametrize("combine", ["rows", "fused"])
@pytest.mark.parametrize("H,KV,page_size,block_k,warps,splits,fp8,max_q", [
    (4, 4, 16, 16, 4, 3, False, 1), (8, 2, 32, 16, 4, 5, False, 1), (16, 2, 16, 32, 4, 7, False, 1),
    (8, 2, 16, 16, 1, 19, False, 1), (8, 2, 16, 16, 4, 6, True, 1), (8, 2, 16, 16, 4, 4, False, 3)])
def test_decode_split_k_combine(combine, H, KV, page_size, block_k, warps, splits, fp8, max_q):
  rng = np.random.default_rng(H * splits + max_q)
  D = 32
  chunks = [(150, max_q), (0, 1), (37, 1)] if max_q > 1 else [(150, 1), (0, 1), (37, 1), (64, 1)]
  real = sum(n for _, n in chunks)
  q, kp, vp, batch = make_case(rng, H=H, KV=KV, D=D, page_size=page_size, chunks=chunks,
                               num_tokens=real + 2, num_pages=30,
                               dtype=jnp.float32 if fp8 else jnp.bfloat16)
  ks, vs = (0.25, 3.0) if fp8 else (1.0, 1.0)
  if fp8:
    kp, vp = (kp / ks).astype(F8), (vp / vs).astype(F8)
  tiles = DecodeTiles(block_k, num_warps=warps, splits=splits, combine=combine)
  out = paged_decode_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                               scale=D ** -0.5, k_scale=ks, v_scale=vs, max_q=max_q, tiles=tiles,
                               interpret=True)
  ref = np_paged(f64(q), f64(kp) * ks, f64(vp) * vs, np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, real, 1.5e-2 if fp8 else 1e-2)


@pytest.mark.parametrize("combine", ["rows", "fused"])
def test_decode_split_k_combine_chunked(combine, monkeypatch):
  """A merge whose splits do not fit one load (4 / 2-split chunks here) loops over chunks; the
  combine kernel's programs take 16 of the 32 columns each."""
  import kernels.paged_decode_attention as pda
  monkeypatch.setattr(pda, "_MERGE_ELEMS", 4 * 32)
  monkeypatch.setattr(pda, "_COMBINE_COLS", 16)
  rng = np.random.default_rng(13)
  q, kp, vp, batch = make_case(rng, H=8, KV=2, D=32, page_size=16, num_pages=30,
                               chunks=[(200, 1), (9, 1), (0, 1)], num_tokens=4)
  out = paged_decode_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                               scale=32 ** -0.5, tiles=DecodeTiles(16, splits=13, combine=combine),
                               interpret=True)
  ref = np_paged(f64(q), f64(kp), f64(vp), np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, 3, 1e-2)


def test_e4m3_bits_to_f16_is_exact():
  """Every finite E4M3 byte (subnormals, zeros, both signs) -> f16 = value * 2^-8 exactly."""
  b = np.arange(256, dtype=np.uint8)
  b = b[(b & 0x7F) != 0x7F]                                   # drop the two NaN encodings
  want = np.asarray(jnp.asarray(b).view(F8).astype(jnp.float32), np.float64) / 256
  got = np.asarray(e4m3_bits_to_f16(jnp.asarray(b)).astype(jnp.float32), np.float64)
  np.testing.assert_array_equal(got, want)
  assert np.signbit(got[b == 0x80]).all()                    # -0 stays negative


@pytest.mark.parametrize("chunks,num_tokens,real", [
    ([(30, 1), (7, 1), (0, 1)], 4, 3),            # decode batch -> decode kernel
    ([(20, 11), (0, 1), (0, 9)], 32, 21)])        # chunked prefill + decode -> prefill kernel
def test_paged_attention_dispatch(chunks, num_tokens, real):
  rng = np.random.default_rng(num_tokens)
  q, kp, vp, batch = make_case(rng, H=8, KV=2, D=32, page_size=16, chunks=chunks,
                               num_tokens=num_tokens)
  out = paged_attention(q, kp, vp, batch, scale=32 ** -0.5, impl="pallas")
  ref = np_paged(f64(q), f64(kp), f64(vp), np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, real, 1e-2)


def test_short_steps_take_the_decode_kernel_without_a_runtime_cond():
  """A step of <= 8 tokens (the batch-1 decode bucket) cannot hold a prefill chunk longer than the
  decode kernel's 8 queries: no lax.cond is traced, and a 5-token chunk is still right."""
  import jax
  rng = np.random.default_rng(8)
  _, kp, vp, _ = make_case(rng, H=8, KV=2, D=32, page_size=16, chunks=[(20, 5)], num_tokens=8)
  batch = build_batch([SeqChunk([7, 3], 20, 5)], 16, num_tokens=8, num_seqs=1, pages_per_seq=2)
  q = jnp.asarray(rng.standard_normal((8, 8, 32)), jnp.bfloat16)
  fn = lambda q, kp, vp, batch: paged_attention(q, kp, vp, batch, scale=32 ** -0.5, impl="pallas")
  assert "branches=" not in str(jax.make_jaxpr(fn)(q, kp, vp, batch))   # no lax.cond
  out = fn(q, kp, vp, batch)
  ref = np_paged(f64(q), f64(kp), f64(vp), np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, 5, 1e-2)


def test_caller_bound_on_new_tokens_takes_the_decode_kernel_without_a_runtime_cond():
  """The engine's decode-only steps pass max_new_tokens=1: a 4-token step over 4 sequences (which
  could otherwise hold one 4-token chunk) then needs no lax.cond."""
  import jax
  rng = np.random.default_rng(4)
  q, kp, vp, batch = make_case(rng, H=8, KV=2, D=32, page_size=16,
                               chunks=[(30, 1), (7, 1), (0, 1)], num_tokens=4)
  fn = lambda bound: (lambda q, kp, vp, batch: paged_attention(
      q, kp, vp, batch, scale=32 ** -0.5, impl="pallas", max_new_tokens=bound))
  assert "branches=" in str(jax.make_jaxpr(fn(None))(q, kp, vp, batch))
  assert "branches=" not in str(jax.make_jaxpr(fn(1))(q, kp, vp, batch))
  out = fn(1)(q, kp, vp, batch)
  ref = np_paged(f64(q), f64(kp), f64(vp), np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, 3, 1e-2)


def test_errors():
  rng = np.random.default_rng(0)
  q, kp, vp, batch = make_case(rng, H=8, KV=2, D=32, page_size=16, chunks=[(5, 1)], num_tokens=2,
                               num_pages=8)
  args = (batch.page_table, batch.seq_lens, batch.query_start)
  with pytest.raises(ShapeError, match="v_pages"):
    paged_decode_attention(q, kp, vp[..., :16], *args, scale=1.0, interpret=True)
  with pytest.raises(ShapeError, match="does not fit"):
    paged_decode_attention(q[:, :7], kp, vp, *args, scale=1.0, interpret=True)
  with pytest.raises(ShapeError, match="dtype"):
    paged_decode_attention(q.astype(jnp.float32), kp, vp, *args, scale=1.0, interpret=True)
  with pytest.raises(ShapeError, match="divide"):
    paged_decode_attention(q, kp, vp, *args, scale=1.0, tiles=DecodeTiles(24), interpret=True)
  with pytest.raises(ShapeError, match="outside the cache"):
    bad = batch.page_table.at[0, 0].set(8)
    paged_attention(q, kp, vp, batch.__class__(**{**batch.__dict__, "page_table": bad}),
                    scale=1.0, impl="pallas")
  with pytest.raises(ValueError, match="impl"):
    paged_attention(q, kp, vp, batch, scale=1.0, impl="xqa")


def scaled_case(seed, chunks, *, fp8, num_tokens, D=32):
  """make_case (8/2 heads, page 16, 30 pages); FP8: the cache stored as E4M3 with scales 0.25 / 3."""
  q, kp, vp, batch = make_case(np.random.default_rng(seed), H=8, KV=2, D=D, page_size=16,
                               chunks=chunks, num_tokens=num_tokens, num_pages=30,
                               dtype=jnp.float32 if fp8 else jnp.bfloat16)
  ks, vs = (0.25, 3.0) if fp8 else (1.0, 1.0)
  if fp8:
    kp, vp = (kp / ks).astype(F8), (vp / vs).astype(F8)
  return q, kp, vp, batch, ks, vs


def run_checked(case, tiles, *, real, fp8, max_q=1):
  """The kernel (interpret mode) on a scaled_case, checked against float64; returns its output."""
  q, kp, vp, batch, ks, vs = case
  out = paged_decode_attention(q, kp, vp, batch.page_table, batch.seq_lens, batch.query_start,
                               scale=q.shape[-1] ** -0.5, k_scale=ks, v_scale=vs, max_q=max_q,
                               tiles=tiles, interpret=True)
  ref = np_paged(f64(q), f64(kp) * ks, f64(vp) * vs, np.asarray(batch.page_table),
                 np.asarray(batch.seq_lens), np.asarray(batch.query_start))
  check(out, ref, real, 1.5e-2 if fp8 else 1e-2)
  return out


# peel_tail: the masked tail tiles as straight-line code loaded before the unmasked loop. Lengths
# a multiple of the tile (no tail: the peeled tile lies past the end), not, 1, and a padding row;
# one split (the serving shape's grid) and split-K (splits with no tail, empty splits, the fused
# and per-row combines), several query tokens (n_tail > 1), FP8 with scales and bf16.
@pytest.mark.parametrize("block_k,warps,splits,combine,max_q,fp8", [
    (16, 1, 1, "rows", 1, True), (16, 1, 1, "rows", 1, False), (16, 1, 3, "fused", 1, True),
    (32, 2, 2, "rows", 1, True), (16, 4, 1, "rows", 3, False), (16, 1, 5, "fused", 3, True)])
def test_decode_peel_tail(block_k, warps, splits, combine, max_q, fp8):
  chunks = ([(96 - max_q, max_q), (0, 1), (37, 1), (15, 1)] if max_q > 1
            else [(63, 1), (0, 1), (37, 1), (95, 1), (16, 1)])
  real = sum(n for _, n in chunks)
  case = scaled_case(block_k + splits + max_q, chunks, fp8=fp8, num_tokens=real + 2)
  run_checked(case, DecodeTiles(block_k, num_warps=warps, splits=splits, combine=combine,
                                peel_tail=True), real=real, fp8=fp8, max_q=max_q)


# zero_pad: no zeros buffer aliased into the output; program b writes zeros into row b when it is a
# padding token (T <= B). Padding rows after the real ones, T < B, and T > B (falls back to the
# zeros buffer); one split and the fused split-K combine (the rows combine keeps the buffer).
@pytest.mark.parametrize("num_tokens,splits,combine,fp8", [
    (5, 1, "rows", True), (5, 3, "fused", True), (4, 1, "rows", False), (8, 1, "rows", False),
    (5, 2, "rows", False)])
def test_decode_zero_pad(num_tokens, splits, combine, fp8):
  chunks = [(63, 1), (0, 1), (37, 1), (16, 1)] if num_tokens != 4 else [(63, 1), (20, 1)]
  case = scaled_case(num_tokens + splits, chunks, fp8=fp8, num_tokens=num_tokens)
  run_checked(case, DecodeTiles(16, num_warps=1, splits=splits, combine=combine, peel_tail=True,
                                zero_pad=True), real=len(chunks), fp8=fp8)


# pt_regs: the page-table row in registers (pages_per_seq a power of two <= pt_regs), one split and
# split-K, FP8 and bf16; pages_per_seq not a power of two (5) falls back to a load per tile.
@pytest.mark.parametrize("chunks,splits,fp8,in_regs", [
    ([(100, 1), (0, 1), (37, 1), (63, 1)], 1, True, True), ([(40, 1), (0, 1), (20, 1)], 3, False, True),
    ([(63, 1), (20, 1), (47, 1)], 2, True, False)])
def test_decode_pt_regs(chunks, splits, fp8, in_regs, monkeypatch):
  import kernels.paged_decode_attention as pda
  calls = []
  real_load = pda.load_page_row
  monkeypatch.setattr(pda, "load_page_row", lambda *a: calls.append(a) or real_load(*a))
  case = scaled_case(len(chunks) + splits, chunks, fp8=fp8, num_tokens=len(chunks) + 1)
  run_checked(case, DecodeTiles(16, num_warps=1, splits=splits, combine="fused", zero_pad=True,
                                pt_regs=64), real=len(chunks), fp8=fp8)
  assert bool(calls) == in_regs


@pytest.mark.parametrize("splits,max_q,fp8", [(1, 1, True), (3, 1, False), (2, 3, True)])
def test_decode_lazy_rescale_is_bit_identical(splits, max_q, fp8):
  """lazy_rescale skips the accumulator's rescale in tiles where no row's max grew (the factor is
  exactly 1 there): the same bits as the eager rescale, and float64-close."""
  chunks = [(96 - max_q, max_q), (0, 1), (37, 1), (150, 1)]
  real = sum(n for _, n in chunks)
  case = scaled_case(splits + max_q, chunks, fp8=fp8, num_tokens=real + 2)
  tiles = lambda lazy: DecodeTiles(16, num_warps=1, splits=splits, combine="fused",
                                   lazy_rescale=lazy)
  out = run_checked(case, tiles(True), real=real, fp8=fp8, max_q=max_q)
  np.testing.assert_array_equal(f64(out), f64(run_checked(case, tiles(False), real=real, fp8=fp8,
                                                          max_q=max_q)))
