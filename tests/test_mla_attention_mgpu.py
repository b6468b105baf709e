"""Mosaic GPU MLA decode (kernels/mla_attention_mgpu.py) in the Mosaic GPU interpreter vs float64
NumPy, plus a CPU-side lowering check of the compiled-only paths and the public op's selector.

The interpreter fills the kernel's output with NaN before the kernel runs (the poison), so a row the
kernel does not write shows up as NaN; every check asserts finiteness, and zeros for the padding
tokens. Shapes are small (64 heads = one CTA row block, kv_lora_rank 128 split 64 + 64 over the two
consumer warpgroups, rope 64) but cover odd lengths, length 1, lengths that are not a multiple of
the page or of the 64-key tile, several pages per tile (pages of 16/32), shuffled page tables and
more tiles than pipeline slots (slot reuse).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.errors import ShapeError
from kernels import mla_attention
from kernels.mla_attention_mgpu import MLAMgpuTiles, mla_decode_mgpu, supported

F8 = jnp.float8_e4m3fn
R, DR, H = 128, 64, 64
SCALE = 0.08


def np_mla(ql, qr, lat, page_table, seq_lens, query_start):
  """float64 absorbed MLA for the last token of each sequence (decode); other rows zero."""
  out = np.zeros(ql.shape)
  for b in range(page_table.shape[0]):
    q0, q1 = query_start[b], query_start[b + 1]
    if q1 == q0:
      continue
    t, n = q1 - 1, seq_lens[b]
    c = lat[page_table[b]].reshape(-1, lat.shape[-1])[:n]
    s = (c[:, :R] @ ql[t].T + c[:, R:] @ qr[t].T) * SCALE        # [n, H]
    p = np.exp(s - s.max(axis=0))
    out[t] = (p / p.sum(axis=0)).T @ c[:, :R]
  return out


def f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def make_case(seed, lens, page_size, num_tokens, dtype=jnp.bfloat16, stale=np.nan):
  """One new token per sequence (decode) at position len - 1, pages drawn from a shuffled pool;
  slots past each length hold ``stale`` (NaN: the kernel must not let them through)."""
  rng = np.random.default_rng(seed)
  num_pages = sum(-(-n // page_size) for n in lens) + 3
  pool = list(rng.permutation(np.arange(1, num_pages)))
  seqs = [SeqChunk([int(pool.pop()) for _ in range(-(-n // page_size))], n - 1, 1) for n in lens]
  batch = build_batch(seqs, page_size, num_tokens=num_tokens, num_seqs=len(seqs) + 1,
                      pages_per_seq=max(len(s.pages) for s in seqs))
  lat = rng.standard_normal((num_pages, page_size, R + DR)).astype(np.float32)
  for s, n in zip(seqs, lens):   # poison the unused tail of each sequence's last page
    lat[s.pages[-1], (n - 1) % page_size + 1:] = stale
  ql = jnp.asarray(rng.standard_normal((num_tokens, H, R)), jnp.bfloat16)
  qr = jnp.asarray(rng.standard_normal((num_tokens, H, DR)), jnp.bfloat16)
  return ql, qr, lat, batch


def check(out, ql, qr, lat64, batch, bound, pad_zero=True):
  ref = np_mla(f64(ql), f64(qr), lat64, *(np.asarray(x) for x in (
      batch.page_table, batch.seq_lens, batch.query_start)))
  real = int(batch.query_start[-1])
  out = f64(out)
  assert out.shape == ref.shape
  assert np.isfinite(out[:real]).all(), "unwritten (NaN) rows or stale slots leaking through"
  if pad_zero:
    assert np.all(out[real:] == 0), "padding tokens must be zero"
  err = np.linalg.norm(out[:real] - ref[:real]) / np.linalg.norm(ref[:real])
  assert err < bound, err


@pytest.mark.parametrize("page_size,tiles,lens", [
    (64, MLAMgpuTiles(stages=2), [1, 200]),     # length 1; 4 tiles through 2 slots, 8-key tail
    (16, MLAMgpuTiles(stages=1), [77, 130]),    # 4 pages per tile, one slot, odd lengths
    # Q.K^T(i+1) issued with P.V(i); a one-tile sequence, a full last tile, a 2-key tail
    (32, MLAMgpuTiles(stages=2, overlap=True), [40, 64, 130]),
])
def test_bf16_matches_float64(page_size, tiles, lens):
  ql, qr, lat, batch = make_case(page_size + len(lens), lens, page_size,
                                 num_tokens=len(lens) + 1)
  lat = jnp.asarray(lat, jnp.bfloat16)
  out = mla_decode_mgpu(ql, qr, lat, batch.page_table, batch.seq_lens, batch.query_start,
                        scale=SCALE, tiles=tiles,
                        interpret=plgpu.InterpretGPUParams(detect_races=True))
  assert out.dtype == jnp.bfloat16
  check(out, ql, qr, f64(lat), batch, 1e-2)
  assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize("page_size,tiles,lens", [
    # the producer widens; 2 pages per tile; 3 tiles through 2 raw slots
    (32, MLAMgpuTiles(stages=2, fp8_widen="producer"), [150, 3]),
    # exactly one tile; a 1-key tail tile; 4-byte widening loads
    (64, MLAMgpuTiles(stages=1, fp8_widen="producer", widen_layout="WGMMA_8BIT"), [64, 129]),
    # the consumers widen the tiles (each its own columns); 4 pages per tile
    (16, MLAMgpuTiles(stages=2, fp8_widen="consumers"), [77, 200, 1]),
    # Q.K^T as E4M3 MMAs on the raw tiles (hi + lo split Q), only V widened
    (32, MLAMgpuTiles(stages=2, fp8_qk="e4m3"), [150, 1, 64]),
])
def test_fp8_latent_matches_float64(page_size, tiles, lens):
  """E4M3 latent cache with a scalar scale: vs float64 on the dequantized cache only the f16 Q
  and P roundings and the bf16 output remain (<= 1e-2)."""
  ql, qr, lat, batch = make_case(7 + page_size, lens, page_size, num_tokens=len(lens) + 2)
  lat8 = jnp.asarray(lat / 0.5).astype(F8)
  out = mla_decode_mgpu(ql, qr, lat8, batch.page_table, batch.seq_lens, batch.query_start,
                        scale=SCALE, latent_scale=0.5, tiles=tiles,
                        interpret=plgpu.InterpretGPUParams(detect_races=True))
  check(out, ql, qr, f64(lat8) * 0.5, batch, 1e-2)
  assert not interpret_pallas_call.get_races().races_found


def test_lowers_for_hopper_on_cpu():
  """The compiled-only path (accumulators carried in registers across the key loop, the DeepSeek
  shape, every pipeline variant) lowers to Mosaic GPU without a GPU."""
  B, T, Hd, Rd, ps = 2, 2, 128, 512, 64
  common = (MLAMgpuTiles(), MLAMgpuTiles(stages=1), MLAMgpuTiles(zero_tail=False),
            MLAMgpuTiles(p_regs=True))
  fp8_only = (MLAMgpuTiles(fp8_widen="producer"), MLAMgpuTiles(widen_layout="WGMMA_8BIT"),
              MLAMgpuTiles(widen_layout="WGMMA_UPCAST_2X"), MLAMgpuTiles(fp8_qk="e4m3"))
  cases = ([(jnp.bfloat16, t) for t in common + (MLAMgpuTiles(overlap=True),)]
           + [(F8, t) for t in common + fp8_only])
  for dt, tiles in cases:
    args = (jax.ShapeDtypeStruct((T, Hd, Rd), jnp.bfloat16),
            jax.ShapeDtypeStruct((T, Hd, 64), jnp.bfloat16),
            jax.ShapeDtypeStruct((9, ps, Rd + 64), dt), jax.ShapeDtypeStruct((B, 4), jnp.int32),
            jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B + 1,), jnp.int32))
    fn = lambda *a, tiles=tiles: mla_decode_mgpu(*a, scale=0.1, tiles=tiles)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_public_op_selects_mosaic_only_on_gpu(monkeypatch):
  """mla_paged_attention takes the Mosaic kernel for a Hopper-shaped decode batch on GPU and keeps
  the reference on CPU (unchanged behaviour); shapes the kernel does not take are not offered."""
  ql, qr, lat, batch = make_case(3, [5, 70], 64, num_tokens=3, stale=0.0)
  lat = jnp.asarray(lat, jnp.bfloat16)
  args = (ql, qr, lat, batch.page_table, batch.seq_lens, batch.query_start)
  assert supported(*args)
  assert not supported(ql[:, :32], qr[:, :32], *args[2:])                 # 32 heads
  assert not supported(ql.astype(jnp.float16), qr, *args[2:])
  # 3 sequences x 1 head block: too few CTAs for the unsplit kernel by default
  assert not mla_attention.mosaic_decode_wanted(ql, qr, lat, batch, on_gpu=True, hopper=True)
  monkeypatch.setattr(mla_attention, "MOSAIC_MIN_CTAS", {"bf16": 3, "fp8": 3})
  assert mla_attention.mosaic_decode_wanted(ql, qr, lat, batch, on_gpu=True, hopper=True)
  assert not mla_attention.mosaic_decode_wanted(ql, qr, lat, batch, on_gpu=False, hopper=True)
  assert not mla_attention.mosaic_decode_wanted(ql, qr, lat, batch, on_gpu=True, hopper=False)
  calls = []
  monkeypatch.setattr(mla_attention, "_mosaic_decode", lambda *a, **k: calls.append(1))
  out = mla_attention.mla_paged_attention(ql, qr, lat, batch, scale=SCALE)   # CPU: reference
  assert not calls
  check(out, ql, qr, f64(lat), batch, 1e-2, pad_zero=False)   # the reference leaves padding as is


def test_shape_errors():
  ql, qr, lat, batch = make_case(0, [5], 64, num_tokens=2, stale=0.0)
  lat = jnp.asarray(lat, jnp.bfloat16)
  pt, lens, qs = batch.page_table, batch.seq_lens, batch.query_start
  with pytest.raises(ShapeError, match="multiple of 64"):
    mla_decode_mgpu(ql[:, :16], qr[:, :16], lat, pt, lens, qs, scale=0.1)
  with pytest.raises(ShapeError, match="do not match"):
    mla_decode_mgpu(ql, qr, lat[..., :-64], pt, lens, qs, scale=0.1)
  with pytest.raises(ShapeError, match="bf16"):
    mla_decode_mgpu(ql.astype(jnp.float32), qr, lat, pt, lens, qs, scale=0.1)
  with pytest.raises(ShapeError, match="page size"):
    mla_decode_mgpu(ql, qr, lat[:, :24], pt, lens, qs, scale=0.1)
  with pytest.raises(ValueError, match="block_k"):
    MLAMgpuTiles(block_k=32)
  with pytest.raises(ValueError, match="fp8_qk"):
    MLAMgpuTiles(fp8_qk="fp16")
  with pytest.raises(ValueError, match="widen_layout"):
    MLAMgpuTiles(widen_layout="TILED")
  with pytest.raises(ValueError, match="fp8_widen"):
    MLAMgpuTiles(fp8_widen="tma")
  with pytest.raises(ValueError, match="overlap"):
    MLAMgpuTiles(stages=1, overlap=True)
