"""kernels/nvfp4_matmul_mgpu: the Mosaic GPU NVFP4 decode GEMM on CPU.

* the weight repack (to_mgpu_layout / from_mgpu_layout) round-trips exactly, odd N and K;
* the jnp twin of the dequantization (dequant_record) equals nvfp4.dequantize bit for bit, in the
  kernel's permuted column order, for every byte value and every finite E4M3 scale;
* the inline PTX the GPU runs, executed by a small PTX emulator per thread of the warpgroup, fills
  exactly the WGMMA-layout fragment the twin describes (the register <-> (row, column) map is
  checked against Mosaic's own WGMMA_LAYOUT tiling);
* the kernel in the Mosaic GPU interpreter (TMA, barriers, slots, split-K, masking; NaN-poisoned
  output) against float64 NumPy on fresh random inputs: M = 1, M not a multiple of 8, N not of
  64, K a multiple of 16 but not of 256; the sixth session's options: stream-K (row blocks stored
  directly and shared, a CTA spanning two blocks, uneven K ranges, M=1; the GPU's atomic combine is
  replaced by workspace slots the wrapper adds), the in-kernel split combine, the PDL load order
  (fewer steps than stages) and the K-tile-major weight; the stream-K partition vs brute force;
* clear errors; and the compiled-only path lowers to Mosaic GPU for the H100 on CPU.
"""
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.mosaic.gpu import fragmented_array as fa

from jaxinfer.errors import ShapeError
from kernels import nvfp4_matmul_mgpu as mg
from kernels.quant import nvfp4

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)
PERM = np.array([64 * q + 2 * j + e for j in range(32) for q in range(4) for e in range(2)])


def random_nvfp4(rng, n, k):
  packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
  scale = rng.uniform(0.05, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  return jnp.asarray(packed), jnp.asarray(scale), jnp.float32(rng.uniform(1e-3, 1e-2))


def np_dequant(packed, scale, gs=1.0):
  p = np.asarray(packed)
  codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[0], -1)
  s = np.asarray(jnp.asarray(scale, jnp.float32), np.float64)
  return E2M1[codes] * np.repeat(s, 16, 1) * float(gs)


@pytest.mark.parametrize("n,k", [(64, 256), (200, 272), (130, 1040)])
def test_layout_round_trip(rng, n, k):
  p, s, _ = random_nvfp4(rng, n, k)
  w = mg.to_mgpu_layout(p, s)
  assert w.shape == (-(-n // 64), -(-k // 256), 72, 32) and w.dtype == jnp.uint32
  p2, s2 = mg.from_mgpu_layout(w, n, k)
  np.testing.assert_array_equal(np.asarray(p2), np.asarray(p))
  np.testing.assert_array_equal(np.asarray(s2).view(np.uint8), np.asarray(s).view(np.uint8))


def test_dequant_twin_is_exact_for_every_byte_and_scale():
  """dequant_record(record) * 2^14 == dequantize, columns in the kernel's order, for all 256 byte
  values at every position and all 254 finite E4M3 scales (and the padding is zero)."""
  scales = np.arange(256, dtype=np.uint8)
  scales = scales[(scales & 0x7F) != 0x7F].view(ml_dtypes.float8_e4m3fn)          # 254 finite
  n, k = 128, 4096                                  # 2 strips x 16 K tiles = 32 records
  rows = np.arange(n)[:, None]
  packed = ((rows * 7 + np.arange(k // 2)[None, :]) % 256).astype(np.uint8)
  scale = scales[(rows * 5 + np.arange(k // 16)[None, :]) % scales.size]
  w = mg.to_mgpu_layout(jnp.asarray(packed), jnp.asarray(scale))
  want = np_dequant(packed, scale)
  for si in range(2):
    for t in range(16):
      got = np.asarray(mg.dequant_record(w[si, t]), np.float64) * 2.0**14
      ref = want[64 * si:64 * (si + 1), 256 * t:256 * (t + 1)][:, PERM]
      np.testing.assert_array_equal(got, ref)
      np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))            # -0 stays -0


def test_x_for_mgpu_pads_casts_and_permutes(rng):
  x = jnp.asarray(rng.standard_normal((5, 272)), jnp.bfloat16)
  xk = np.asarray(mg.x_for_mgpu(x, 512), np.float64)
  assert xk.shape == (8, 512)
  full = np.zeros((8, 512))
  full[:5, :272] = np.asarray(x.astype(jnp.float16), np.float64)
  for t in range(2):
    np.testing.assert_array_equal(xk[:, 256 * t:256 * (t + 1)], full[:, 256 * t + PERM])


# ----- the inline PTX, emulated -----

def _f16x2(v):
  return np.array([v & 0xFFFF, v >> 16], np.uint16).view(np.float16)


def _u32(h):
  b = np.asarray(h, np.float16).view(np.uint16).astype(np.uint32)
  return int(b[0] | (b[1] << 16))


def run_ptx(ptx: str, args: list[int], n_out: int) -> list[int]:
  """Executes the PTX subset the kernel uses on Python ints ($0..$n_out-1 outputs, then inputs)."""
  regs = {f"${n_out + i}": a for i, a in enumerate(args)}

  def val(tok):
    tok = tok.strip()
    return int(tok, 0) if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok) else regs[tok]

  for line in ptx.splitlines():
    line = line.strip().rstrip(";")
    if line in ("{", "}") or line.startswith(".reg"):
      continue
    op, rest = line.split(None, 1)
    if rest.startswith("{"):                                   # mov.b32 {lo, hi}, src
      lo, hi = re.match(r"\{\s*(\w+),\s*(\w+)\s*\},\s*(\S+)", rest).groups()[:2]
      src = val(rest.split(",")[-1])
      regs[lo], regs[hi] = src & 0xFFFF, src >> 16
      continue
    ops = [o.strip() for o in rest.split(",")]
    d, srcs = ops[0], ops[1:]
    m32 = 0xFFFFFFFF
    if op == "mov.b32":
      regs[d] = val(srcs[0])
    elif op == "shl.b32":
      regs[d] = (val(srcs[0]) << val(srcs[1])) & m32
    elif op == "shf.r.wrap.b32":                              # funnel shift of (b:a) = rotate
      a, n = val(srcs[0]), val(srcs[2]) & 31
      assert val(srcs[1]) == a
      regs[d] = ((a >> n) | (a << (32 - n))) & m32
    elif op == "shr.b32":
      regs[d] = val(srcs[0]) >> val(srcs[1])
    elif op == "and.b32":
      regs[d] = val(srcs[0]) & val(srcs[1])
    elif op == "or.b32":
      regs[d] = val(srcs[0]) | val(srcs[1])
    elif op == "mul.rn.f16x2":
      regs[d] = _u32(_f16x2(val(srcs[0])) * _f16x2(val(srcs[1])))
    elif op == "cvt.rn.f16x2.e4m3x2":                         # byte i -> half i
      b = val(srcs[0])
      e4 = np.array([b & 0xFF, b >> 8], np.uint8).view(ml_dtypes.float8_e4m3fn)
      regs[d] = _u32(e4.astype(np.float16))
    elif op == "cvt.rn.f16x2.f32":                           # a -> upper half, b -> lower
      f = [np.array([val(v)], np.uint32).view(np.float32)[0] for v in srcs[:2]]
      with np.errstate(over="ignore"):
        regs[d] = _u32(np.array([f[1], f[0]], np.float32).astype(np.float16))
    elif op == "prmt.b32":
      a, b, sel = val(srcs[0]), val(srcs[1]), val(srcs[2])
      pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
      regs[d] = sum(pool[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))
    else:
      raise NotImplementedError(line)
  return [regs[f"${i}"] for i in range(n_out)]


def test_bit_positions_cover_the_word():
  """Every bit of a word belongs to exactly one (slot, lane, bit) of _BIT_POS, and packing is
  inverted by unpacking for all 2^32 patterns' building blocks (all 16 codes at every place)."""
  pos = [p for lanes in mg._BIT_POS for bits in lanes for p in bits]
  assert sorted(pos) == list(range(32))
  codes = np.zeros((16 * 8, 4, 2), np.uint8)
  for i in range(16 * 8):
    codes[i].reshape(-1)[i // 16] = i % 16
  w = mg._pack_word(jnp.asarray(codes))
  np.testing.assert_array_equal(np.asarray(mg._unpack_word(w)), codes)


def test_wgmma_layout_fragment_map():
  """Register (j, h) of thread 32 w + l of Mosaic's WGMMA_LAYOUT (f16, [64, 256]) holds row
  16 w + 8 h + l // 4, columns 8 j + 2 (l % 4) + (0, 1): the map _dequant_regs fills."""
  tiling = fa.WGMMA_LAYOUT.tiling
  tiled = tiling.tile_shape((64, 256))
  strides = tiling.tile_strides((256, 1))
  assert tiled == (1, 32, 4, 1, 2, 1, 8, 4, 2)
  assert fa.WGMMA_LAYOUT.registers_shape((64, 256)) == (1, 32, 1, 1, 2, 1, 1, 1, 1)
  for w, l, j, h, e in [(0, 0, 0, 0, 0), (3, 31, 31, 1, 1), (1, 6, 5, 1, 0), (2, 13, 17, 0, 1)]:
    idx = (0, j, w, 0, h, 0, l // 4, l % 4, e)
    flat = sum(i * s for i, s in zip(idx, strides))
    assert divmod(flat, 256) == (16 * w + 8 * h + l // 4, 8 * j + 2 * (l % 4) + e)


def test_inline_ptx_builds_the_twin_fragment(rng):
  """Every thread's PTX (scale splats, then the 16 code words), emulated, gives the fragment the
  jnp twin computes, bit for bit; random records cover all byte values and many scales."""
  p, s, _ = random_nvfp4(rng, 64, 512)
  for rec in mg.to_mgpu_layout(p, s)[0]:
    words = np.asarray(rec).reshape(-1).astype(np.int64)
    want = np.asarray(mg.dequant_record(rec)).view(np.uint16)
    got = np.zeros((64, 256), np.uint16)
    for t in range(128):
      w_, l = divmod(t, 32)
      code = [int(words[c * 512 + 4 * t + v]) for c in range(4) for v in range(4)]
      sw = [int(words[2048 + 2 * t + h]) for h in range(2)]
      splat = {(h, g): r for h in range(2)
               for g, r in enumerate(run_ptx(mg._SCALE_PTX, [sw[h]], 4))}
      for u in range(16):
        h, g, jb = u // 8, (u // 2) % 4, u % 2
        for sl, out in enumerate(run_ptx(mg._DEQ_PTX, [code[u], splat[h, g]], 4)):
          j = 8 * g + 4 * jb + sl
          row, col = 16 * w_ + 8 * h + l // 4, 8 * j + 2 * (l % 4)
          got[row, col], got[row, col + 1] = out & 0xFFFF, out >> 16
    np.testing.assert_array_equal(got, want)


def test_bf16_to_f16_ptx_rounds_like_astype(rng):
  """The in-kernel x conversion (x_in_kernel) gives x.astype(f16) for bf16 pairs, including
  values that round, overflow to inf, and f16 subnormals."""
  v = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 6, 2000),
                      [70000.0, -1e-7, 3e-5, 0.0, -0.0]]).astype(ml_dtypes.bfloat16)
  v = v[: v.size // 2 * 2]
  words = v.view(np.uint16).astype(np.uint32).reshape(-1, 2)
  got = np.array([run_ptx(mg._BF16X2_TO_F16X2, [int(lo | (hi << 16))], 1)[0]
                  for lo, hi in words], np.uint32)
  got = np.stack([got & 0xFFFF, got >> 16], axis=-1).astype(np.uint16).reshape(-1)
  np.testing.assert_array_equal(got.view(np.float16), v.astype(np.float16))


# ----- the kernel (interpreter) -----

CASES = [
    (1, 64, 256, None),
    (5, 200, 272, mg.MgpuTiling(consumers=2, strips=1, stages=2, split_k=1)),
    (13, 384, 2048, mg.MgpuTiling(consumers=2, strips=2, stages=2, split_k=2)),
    (40, 128, 768, None),
    (8, 256, 1024, mg.MgpuTiling(consumers=1, strips=1, stages=3, split_k=4)),
    (9, 200, 1280, mg.MgpuTiling(consumers=2, strips=1, stages=2, k_interleave=True)),
    (16, 128, 2048, mg.MgpuTiling(consumers=3, strips=2, stages=3, split_k=2,
                                  k_interleave=True)),
    (3, 192, 1536, mg.MgpuTiling(consumers=2, strips=1, stages=2, x_in_kernel=True)),
    (24, 128, 2048, mg.MgpuTiling(consumers=2, strips=1, stages=4, split_k=2,
                                  k_interleave=True, x_in_kernel=True)),
    # pdl: the first `stages` weight loads issued before the loop (fewer steps than stages too)
    (5, 200, 512, mg.MgpuTiling(consumers=2, strips=1, stages=4, pdl=2)),
    # stream-K: 2 blocks x 5 tiles over 3 CTAs (every block shared, a CTA spanning two blocks)
    (5, 200, 1280, mg.MgpuTiling(consumers=2, strips=1, stages=3, stream_k=3)),
    # 6 blocks x 4 tiles over 5 CTAs (blocks stored directly and shared), x in kernel, M=1 strip
    (9, 384, 1024, mg.MgpuTiling(consumers=1, strips=1, stages=2, stream_k=5, x_in_kernel=True,
                                 pdl=2)),
    (1, 64, 768, mg.MgpuTiling(consumers=1, strips=1, stages=2, stream_k=2)),
    # split-K partials combined in the kernel (no XLA reduction), k-interleaved consumers too
    (5, 200, 2048, mg.MgpuTiling(consumers=2, strips=1, stages=2, split_k=4,
                                 split_combine="kernel")),
    (3, 128, 1024, mg.MgpuTiling(consumers=2, strips=1, stages=2, split_k=2, k_interleave=True,
                                 split_combine="kernel")),
    # K-tile-major weight (N padded to whole CTAs along the second axis), split-K
    (6, 200, 1024, mg.MgpuTiling(consumers=2, strips=1, stages=2, split_k=2, tile_major=True)),
    # overlap_pairs (the interpreter runs its data path; the GPU schedule is lowered below)
    (5, 200, 1280, mg.MgpuTiling(consumers=2, strips=1, stages=2, overlap_pairs=True)),
    # two K tiles per step: x in the kernel (split-K) and x through the XLA fusion; 5 K tiles
    # (odd: falls back to one per step)
    (9, 200, 2048, mg.MgpuTiling(consumers=2, strips=1, stages=2, split_k=2, x_in_kernel=True,
                                 k_per_step=2, overlap_pairs=True)),
    (3, 128, 1024, mg.MgpuTiling(consumers=1, strips=2, stages=2, k_per_step=2, pdl=2)),
    (4, 128, 1280, mg.MgpuTiling(consumers=2, strips=1, stages=2, x_in_kernel=True,
                                 k_per_step=2)),
    # x_multicast (the interpreter runs plain per-CTA copies: odd CTA count padded)
    (7, 320, 1024, mg.MgpuTiling(consumers=2, strips=1, stages=2, x_multicast=True)),
]


@pytest.mark.parametrize("m,n,k,tiling", CASES)
def test_matches_float64(rng, m, n, k, tiling):
  p, s, g = random_nvfp4(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)) * 3, jnp.bfloat16)
  w = mg.to_mgpu_layout(p, s)
  wk = mg.to_tile_major(w) if tiling is not None and tiling.tile_major else w
  y = mg.w4a16_matmul_mgpu(x, wk, g, n=n, tiling=tiling, interpret=True)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  ref = np.asarray(x, np.float64) @ np_dequant(p, s, g).T
  yy = np.asarray(y.astype(jnp.float32), np.float64)
  assert np.all(np.isfinite(yy)), "unwritten (NaN-poisoned) output"
  assert np.linalg.norm(yy - ref) / np.linalg.norm(ref) < 4e-3                    # bf16 output
  ref_jax = np.asarray(mg.w4a16_reference_mgpu(x, w, g, n).astype(jnp.float32), np.float64)
  assert np.linalg.norm(yy - ref_jax) / np.linalg.norm(ref) < 4e-3


def test_f32_output_is_tight(rng):
  """With an f32 output the only rounding is x's f16 cast and the f32 accumulation."""
  m, n, k = 3, 128, 512
  p, s, g = random_nvfp4(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  y = mg.w4a16_matmul_mgpu(x, mg.to_mgpu_layout(p, s), g, n=n, interpret=True)
  assert y.dtype == jnp.float32
  xf = np.asarray(x.astype(jnp.float16), np.float64)
  ref = xf @ np_dequant(p, s, g).T
  assert np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("probe", ["stream", "deq", "mma"])
def test_probes_leave_out_their_parts(rng, probe):
  """The probes run the pipeline without its math: "stream" and "deq" never add to the
  accumulators (y = 0); "mma" multiplies by a constant A of ones, so y = 2^14 gs * row sums of
  x (x cast to f16, exactly as the kernel's operand)."""
  m, n, k = 5, 200, 1280
  p, s, g = random_nvfp4(rng, n, k)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  for split in (1, 2):
    t = mg.default_tiling(m, n, k, probe=probe, split_k=split)
    y = np.asarray(mg.w4a16_matmul_mgpu(x, mg.to_mgpu_layout(p, s), g, n=n, tiling=t,
                                        interpret=True), np.float64)
    want = np.zeros((m, n))
    if probe == "mma":
      rows = np.asarray(x.astype(jnp.float16), np.float64).sum(1, keepdims=True)
      want = np.broadcast_to(rows * 2.0 ** 14 * float(g), (m, n))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-3)
  with pytest.raises(ValueError, match="probe"):
    mg.MgpuTiling(probe="dma")
  with pytest.raises(ValueError, match="GPU only"):
    mg.w4a16_matmul_mgpu(x, mg.to_mgpu_layout(p, s), g, n=n, interpret=True,
                         tiling=mg.default_tiling(m, n, k, probe="compute"))


@pytest.mark.parametrize("blocks,tiles,ctas", [(112, 16, 132), (32, 56, 132), (224, 16, 264),
                                               (6, 4, 5), (3, 2, 10), (7, 3, 7)])
def test_streamk_plan_partitions_the_units(blocks, tiles, ctas):
  """Every unit belongs to exactly one CTA's range; cta_of inverts the ranges; segments and
  contributors are the true maxima / counts."""
  plan = mg.streamk_plan(blocks, tiles, ctas)
  g = plan.ctas
  assert g == min(ctas, blocks * tiles)
  owner = np.concatenate([np.full(plan.start(c + 1) - plan.start(c), c) for c in range(g)])
  assert len(owner) == plan.units and np.all(np.diff(owner) >= 0)
  assert all(plan.cta_of(u) == owner[u] for u in range(plan.units))
  by_block = owner.reshape(blocks, tiles)
  assert plan.contrib == tuple(len(set(r)) for r in by_block)
  assert plan.max_contrib == max(plan.contrib)
  assert plan.segments == max(len(set(np.nonzero(owner == c)[0] // tiles)) for c in range(g))


def test_default_tiling_fills_the_h100():
  for m, n, k in [(1, 14336, 4096), (8, 4096, 14336), (64, 14336, 4096), (64, 4096, 14336)]:
    t = mg.default_tiling(m, n, k)
    ctas = -(-n // (64 * t.consumers * t.strips)) * t.split_k
    assert 100 <= ctas <= 132 or t.split_k == 1
    # 200 KB, or the hardware limit for overlap_pairs' 4 stages (M=64)
    assert mg.smem_bytes(t, mg.padded_m(m)) <= (mg._SMEM_LIMIT if t.overlap_pairs else 200 * 1024)
    assert t.overlap_pairs == (m == 64) and (t.stages >= 4 or not t.overlap_pairs)
    assert (k // 256) % t.split_k == 0
  assert mg.default_tiling(8, 4096, 14336, stages=2).stages == 2
  # the seventh session's rules: x through the XLA fusion + overlap_pairs from 9 rows without
  # split-K, in the kernel (x_convert=2) with split-K; two K tiles per step up to 8 rows unsplit
  t32, t32s = mg.default_tiling(32, 14336, 4096), mg.default_tiling(32, 4096, 14336)
  assert (not t32.x_in_kernel and t32.overlap_pairs and t32.split_k == 1
          and t32s.x_in_kernel and t32s.x_convert == 2 and not t32s.overlap_pairs)
  assert mg.default_tiling(8, 14336, 4096).k_per_step == 2
  assert mg.default_tiling(8, 4096, 14336).k_per_step == 1          # split-K
  assert mg.default_tiling(1, 14336, 4096).k_per_step == 1          # one consumer
  assert not mg.default_tiling(64, 14336, 4096, stream_k=132).overlap_pairs
  with pytest.raises(TypeError):
    mg.default_tiling(8, 4096, 14336, block_n=3)


def test_bad_inputs_raise(rng):
  p, s, g = random_nvfp4(rng, 128, 512)
  w = mg.to_mgpu_layout(p, s)
  x = jnp.ones((4, 512), jnp.bfloat16)
  with pytest.raises(ShapeError, match="multiple of 16"):
    mg.w4a16_matmul_mgpu(jnp.ones((4, 500), jnp.bfloat16), w, g, n=128, interpret=True)
  with pytest.raises(ShapeError, match="K tiles"):
    mg.w4a16_matmul_mgpu(jnp.ones((4, 1024), jnp.bfloat16), w, g, n=128, interpret=True)
  with pytest.raises(ShapeError, match="strips"):
    mg.w4a16_matmul_mgpu(x, w, g, n=300, interpret=True)
  with pytest.raises(ShapeError, match="to_mgpu_layout"):
    mg.w4a16_matmul_mgpu(x, w.astype(jnp.int32), g, n=128, interpret=True)
  with pytest.raises(ShapeError, match="M <= 256"):
    mg.w4a16_matmul_mgpu(jnp.ones((300, 512), jnp.bfloat16), w, g, n=128, interpret=True)
  with pytest.raises(ShapeError, match="shared memory"):
    mg.w4a16_matmul_mgpu(x, w, g, n=128, interpret=True,
                         tiling=mg.MgpuTiling(consumers=2, strips=4, stages=8))
  with pytest.raises(ValueError):
    mg.MgpuTiling(stages=0)
  with pytest.raises(ValueError, match="split_combine"):
    mg.MgpuTiling(split_combine="atomic")
  with pytest.raises(ValueError, match="excludes k_interleave and stream_k"):
    mg.MgpuTiling(split_k=2, stream_k=132, split_combine="cluster")
  with pytest.raises(ValueError, match="excludes k_interleave"):
    mg.MgpuTiling(consumers=2, stages=2, k_interleave=True, stream_k=132)
  with pytest.raises(ValueError, match="multiple of consumers"):
    mg.MgpuTiling(consumers=2, stages=3, k_interleave=True)
  with pytest.raises(ValueError, match="k_per_step must be"):
    mg.MgpuTiling(k_per_step=2, tile_major=True)
  with pytest.raises(ValueError, match="x_multicast excludes"):
    mg.MgpuTiling(x_multicast=True, x_in_kernel=True)
  with pytest.raises(ValueError, match="x_convert must be"):
    mg.MgpuTiling(x_convert=3)
  with pytest.raises(ValueError, match="overlap_pairs excludes"):
    mg.MgpuTiling(overlap_pairs=True, stream_k=132)
  with pytest.raises(ValueError, match="mma_parts must be"):
    mg.MgpuTiling(mma_parts=3)
  with pytest.raises(ValueError, match="split_acc needs"):
    mg.MgpuTiling(split_acc=True)
  with pytest.raises(ValueError, match="compute also"):
    mg.MgpuTiling(probe="compute", overlap_pairs=True)
  with pytest.raises(ShapeError):
    mg.to_mgpu_layout(p[:, :100], s)


def test_lowers_for_hopper_on_cpu():
  """The compiled path (inline_mgpu dequantization into wgmma's register operand, transposed
  register stores) lowers to Mosaic GPU for every decode shape of the issue and the variants."""
  cases = [(m, n, k, None) for m in (1, 8, 32, 64) for k, n in ((4096, 14336), (14336, 4096))]
  cases += [(5, 200, 272, mg.MgpuTiling(2, 2, 2, 2)), (64, 4096, 14336, mg.MgpuTiling(1, 1, 4, 8)),
            (8, 4096, 14336, mg.MgpuTiling(2, 1, 8, 1, k_interleave=True)),
            (64, 4096, 14336, mg.MgpuTiling(3, 1, 3, 1, k_interleave=True)),
            (1, 14336, 4096, mg.MgpuTiling(2, 1, 8, 1, x_in_kernel=True)),
            (8, 4096, 14336, mg.MgpuTiling(2, 1, 8, 2, True, True)),
            (64, 14336, 4096, mg.MgpuTiling(2, 1, 2, 1, x_in_kernel=True)),
            (8, 14336, 4096, mg.MgpuTiling(2, 1, 8, 1, x_in_kernel=True,
                                           no_auto_barriers=True)),
            (8, 4096, 14336, mg.MgpuTiling(2, 1, 8, 4, x_in_kernel=True, pdl=2)),
            (8, 14336, 4096, mg.MgpuTiling(2, 1, 8, 1, x_in_kernel=True, stream_k=132)),
            (1, 4096, 14336, mg.MgpuTiling(1, 1, 8, 1, x_in_kernel=True, pdl=2,
                                           stream_k=132)),
            (64, 4096, 14336, mg.MgpuTiling(2, 1, 3, 1, stream_k=132)),
            (8, 4096, 14336, mg.MgpuTiling(2, 1, 8, 4, x_in_kernel=True,
                                           split_combine="kernel")),
            (8, 14336, 4096, mg.MgpuTiling(2, 1, 8, 1, x_in_kernel=True, tile_major=True)),
            (8, 4096, 14336, mg.MgpuTiling(2, 1, 8, 4, x_in_kernel=True,
                                           split_combine="cluster", tile_major=True)),
            (64, 4096, 14336, mg.MgpuTiling(2, 1, 3, 4, split_combine="cluster")),
            (8, 14336, 4096, mg.MgpuTiling(2, 1, 8, 1, x_in_kernel=True, pdl=3)),
            (64, 14336, 4096, mg.MgpuTiling(2, 1, 4, 1, pdl=1)),
            # overlap_pairs: even (16, 14) and odd (7: the unpaired last step) steps per CTA
            (64, 14336, 4096, mg.MgpuTiling(2, 1, 3, 1, overlap_pairs=True)),
            (64, 4096, 14336, mg.MgpuTiling(2, 1, 3, 4, overlap_pairs=True)),
            (32, 14336, 4096, mg.MgpuTiling(2, 1, 4, 1, x_in_kernel=True, overlap_pairs=True)),
            (1, 4096, 14336, mg.MgpuTiling(1, 1, 8, 8, x_in_kernel=True, overlap_pairs=True)),
            (8, 4096, 14336, mg.MgpuTiling(2, 2, 2, 4, overlap_pairs=True)),
            # the conflict-free x conversion; two K tiles per step
            (32, 14336, 4096, mg.MgpuTiling(2, 1, 4, 1, x_in_kernel=True, x_convert=2)),
            (5, 200, 512, mg.MgpuTiling(2, 1, 4, 1, x_in_kernel=True, x_convert=2)),
            (8, 14336, 4096, mg.MgpuTiling(2, 1, 4, 1, x_in_kernel=True, k_per_step=2,
                                           x_convert=2, overlap_pairs=True)),
            (64, 4096, 14336, mg.MgpuTiling(2, 1, 1, 4, k_per_step=2)),
            # x tiles multicast to clusters of two CTAs (odd CTA count padded: 5 strips, M=5)
            (64, 14336, 4096, mg.MgpuTiling(2, 1, 3, 1, x_multicast=True, overlap_pairs=True)),
            (8, 4096, 14336, mg.MgpuTiling(2, 1, 4, 4, x_multicast=True, k_per_step=2)),
            (5, 300, 512, mg.MgpuTiling(1, 1, 4, 1, x_multicast=True)),
            # records dequantized and multiplied in K parts (with k_per_step=2, overlap_pairs)
            (1, 14336, 4096, mg.default_tiling(1, 14336, 4096, mma_parts=2)),
            (8, 14336, 4096, mg.default_tiling(8, 14336, 4096, mma_parts=4)),
            (64, 4096, 14336, mg.default_tiling(64, 4096, 14336, mma_parts=2)),
            (8, 14336, 4096, mg.default_tiling(8, 14336, 4096, mma_parts=2, probe="mma")),
            # an accumulator per K part (plain loop, overlap_pairs, two strips per consumer)
            (1, 4096, 14336, mg.default_tiling(1, 4096, 14336, mma_parts=4, split_acc=True)),
            (64, 14336, 4096, mg.default_tiling(64, 14336, 4096, split_acc=True)),
            (8, 14336, 4096, mg.MgpuTiling(1, 2, 4, 1, mma_parts=2, split_acc=True)),
            (8, 4096, 14336, mg.default_tiling(8, 4096, 14336, stream_k=132)),
            (1, 14336, 4096, mg.default_tiling(1, 14336, 4096, stream_k=132, probe="stream")),
            (8, 14336, 4096, mg.default_tiling(8, 14336, 4096, probe="compute")),
            (1, 4096, 14336, mg.default_tiling(1, 4096, 14336, probe="compute")),
            # the measurement probes (stream only, constant-A wgmmas, dequantization only)
            (8, 4096, 14336, mg.default_tiling(8, 4096, 14336, probe="stream")),
            (64, 14336, 4096, mg.default_tiling(64, 14336, 4096, probe="mma")),
            (1, 14336, 4096, mg.default_tiling(1, 14336, 4096, probe="deq"))]
  for m, n, k, t in cases:
    wshape = (-(-n // 64), -(-k // 256), 72, 32)
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
            jax.ShapeDtypeStruct(wshape[1::-1] + wshape[2:] if t and t.tile_major else wshape,
                                 jnp.uint32),
            jax.ShapeDtypeStruct((), jnp.float32))
    fn = lambda x, w, g, n=n, t=t: mg.w4a16_matmul_mgpu(x, w, g, n=n, tiling=t)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_weight_layout_and_public_op_dispatch(rng, monkeypatch):
  """NVFP4Weight.to_mgpu_layout round-trips to the ModelOpt bytes; the public op gives the
  ModelOpt weight's result on CPU, and on a (pretended) Hopper GPU runs the Mosaic kernel (here
  interpreted) up to MGPU_DECODE_MAX_M rows, dequantize + dot above."""
  from kernels import gemm
  from kernels.quant import GroupedNVFP4Weight, NVFP4Weight
  k, n = 512, 192
  w = NVFP4Weight.from_dense(jnp.asarray(rng.standard_normal((k, n)), jnp.float32))
  wm = w.to_mgpu_layout()
  assert wm.layout == "mgpu" and (wm.k, wm.n) == (k, n) and wm.to_mgpu_layout() is wm
  np.testing.assert_array_equal(np.asarray(wm.modelopt_packed()), np.asarray(w.packed))
  np.testing.assert_array_equal(np.asarray(wm.to_kernel_layout().packed),
                                np.asarray(w.to_kernel_layout().packed))
  x = jnp.asarray(rng.standard_normal((5, k)), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(gemm.nvfp4_matmul(x, wm), np.float32),
                                np.asarray(gemm.nvfp4_matmul(x, w), np.float32))
  calls = []
  kernel = gemm.nvfp4_mgpu_kernels.w4a16_matmul_mgpu

  def interpreted(*args, **kwargs):
    calls.append(args[0].shape)
    return kernel(*args, **kwargs, interpret=True)

  monkeypatch.setattr(gemm, "_gpu_capability", lambda: 9.0)
  monkeypatch.setattr(gemm.nvfp4_mgpu_kernels, "w4a16_matmul_mgpu", interpreted)
  ref = np.asarray(x, np.float64) @ np.asarray(w.dequantize(), np.float64)
  y = np.asarray(gemm.nvfp4_matmul(x, wm).astype(jnp.float32), np.float64)
  assert calls == [(5, k)] and np.linalg.norm(y - ref) / np.linalg.norm(ref) < 4e-3
  monkeypatch.setattr(gemm, "MGPU_DECODE_MAX_M", 4)
  y = np.asarray(gemm.nvfp4_matmul(x, wm).astype(jnp.float32), np.float64)
  assert calls == [(5, k)] and np.linalg.norm(y - ref) / np.linalg.norm(ref) < 4e-3
  with pytest.raises(ShapeError, match="dense weights only"):
    GroupedNVFP4Weight(jnp.zeros((2, 64, 128), jnp.uint8),
                       jnp.zeros((2, 64, 16), jnp.float8_e4m3fn), jnp.ones((2,)), layout="mgpu")
