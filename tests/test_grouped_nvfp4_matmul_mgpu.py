"""kernels/grouped_nvfp4_matmul_mgpu: the persistent Mosaic GPU grouped NVFP4 decode GEMM on CPU.

* the stacked repack round-trips exactly; the work list (chunks of Mp rows per non-empty expert,
  zero chunks past the total) matches a NumPy construction for random routings;
* the kernel in the Mosaic GPU interpreter (persistent CTAs over the work list, TMA of x tiles at
  dynamic rows, barriers, slots, zero items; NaN-poisoned output) against float64 NumPy on fresh
  random inputs: empty groups, skewed groups and a group of > Mp rows, one expert taking every
  row, rows past the total, T < 8 and T not a multiple of 8, K a multiple of 16 but not 256, N
  not a multiple of 64;
* clear errors; the compiled path lowers to Mosaic GPU for the H100 on CPU.
The in-register dequantization (PTX) itself is checked in tests/test_nvfp4_matmul_mgpu.py.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from kernels import grouped_nvfp4_matmul_mgpu as gm

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def random_experts(rng, e, n, k):
  packed = rng.integers(0, 256, (e, n, k // 2), dtype=np.uint8)
  scale = rng.uniform(0.05, 400, (e, n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  gs = rng.uniform(1e-3, 1e-2, e).astype(np.float32)
  return packed, scale, gs


def np_dequant(packed, scale, gs):
  codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
  return E2M1[codes] * np.repeat(scale.astype(np.float64), 16, 1) * float(gs)


def np_grouped(x, packed, scale, gs, sizes):
  """float64 ragged_dot: rows past sum(sizes) are zero."""
  x64 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  y = np.zeros((x64.shape[0], packed.shape[1]))
  start = 0
  for i, c in enumerate(sizes):
    c = max(0, min(int(c), x64.shape[0] - start))
    if c:
      y[start:start + c] = x64[start:start + c] @ np_dequant(packed[i], scale[i], gs[i]).T
    start += c
  return y


def test_layout_round_trip(rng):
  packed, scale, _ = random_experts(rng, 3, 200, 272)
  w = gm.to_grouped_mgpu_layout(jnp.asarray(packed), jnp.asarray(scale))
  assert w.shape == (3, 4, 2, 72, 32) and w.dtype == jnp.uint32       # 4 strips: 200 -> 256
  p2, s2 = gm.from_grouped_mgpu_layout(w, 200, 272)
  np.testing.assert_array_equal(np.asarray(p2), packed)
  np.testing.assert_array_equal(np.asarray(s2).view(np.uint8), scale.view(np.uint8))
  assert gm.to_grouped_mgpu_layout(jnp.asarray(packed[:, :64]),
                                   jnp.asarray(scale[:, :64])).shape[1] == 2   # padded strip


@pytest.mark.parametrize("mp", [8, 16])
def test_work_list(rng, mp):
  for _ in range(20):
    e = int(rng.integers(1, 9))
    t = int(rng.integers(1, 70))
    sizes = rng.integers(0, 3 * t // e + 2, e)
    if rng.random() < 0.3:
      sizes[rng.integers(0, e)] = 0
    sched = np.asarray(gm.make_work_list(jnp.asarray(sizes, jnp.int32), t, mp))
    slots = -(-t // mp) + e
    assert sched.shape == (3, slots + 2)
    want, start = [], 0
    for g, s in enumerate(sizes):
      end = min(start + int(s), t)
      want += [(g, r, min(r + mp, end)) for r in range(start, end, mp)]
      start = end
    n_chunks, n_zero, total = sched[:, slots]
    assert n_chunks == len(want) and total == start
    assert n_zero == -(-(t - total) // mp)
    assert [tuple(c) for c in sched[:, :n_chunks].T] == want
    assert np.all(sched[0, n_chunks:slots] == -1)


CASES = [   # T, E, N, K, sizes, tiling
    # rows past the total, an empty group, N % 64 != 0, K % 256 != 0
    (12, 3, 200, 272, [5, 0, 6], gm.GroupedMgpuTiling(block_rows=8, stages=3, ctas=3)),
    # skewed: a group of 20 rows (3 chunks of 8), empty groups, one consumer per CTA
    (37, 5, 128, 512, [0, 20, 0, 9, 8], gm.GroupedMgpuTiling(8, consumers=1, stages=2, ctas=4,
                                                             work_list="kernel")),
    # one expert takes every row (T not a multiple of 8), 16-row chunks, more CTAs than items
    (21, 4, 64, 256, [21, 0, 0, 0], gm.GroupedMgpuTiling(16, stages=2, ctas=5)),
    # in-kernel work list: rows past the total, empty groups, K % 256 != 0
    (19, 6, 128, 272, [0, 9, 0, 1, 0, 4], gm.GroupedMgpuTiling(8, stages=3, ctas=3,
                                                                work_list="kernel")),
    # T < 8 (x padded to one tile)
    (5, 2, 128, 256, [2, 3], gm.GroupedMgpuTiling(8, stages=4, ctas=2, work_list="kernel")),
    # stream-K tail: 10 items of 4 K tiles over 4 CTAs (2 whole each, the last 2 split in 2
    # pieces; in-kernel list); 5 items of 4 K tiles over 7 CTAs (ranges of 2-3 tiles: up to 3
    # pieces per item, rows past the total); too few leftover tiles (12 items of 4 over 5 CTAs:
    # 8 < 5 x 2) -> whole
    (40, 2, 256, 1024, [40, 0], gm.GroupedMgpuTiling(8, stages=3, ctas=4, tail=True,
                                                     work_list="kernel")),
    (40, 1, 128, 1024, [37], gm.GroupedMgpuTiling(8, stages=2, ctas=7, tail=True)),
    (37, 5, 128, 1024, [0, 20, 0, 9, 8], gm.GroupedMgpuTiling(8, consumers=1, stages=2, ctas=5,
                                                              tail=True)),
    # fewer leftover K tiles (3 items x 3) than CTAs (11): the leftover items go whole
    (24, 2, 128, 768, [24, 0], gm.GroupedMgpuTiling(8, stages=2, ctas=11, tail=True)),
    # two K tiles per pipeline step (and K % 512 != 0: one per step), 16-row chunks
    (13, 3, 128, 1024, [6, 0, 7], gm.GroupedMgpuTiling(8, stages=2, ctas=3, k_per_step=2)),
    (9, 2, 128, 768, [9, 0], gm.GroupedMgpuTiling(16, stages=2, ctas=2, k_per_step=2)),
    (9, 2, 128, 768, [4, 5], gm.GroupedMgpuTiling(16, stages=2, ctas=2, k_per_step=4)),  # smem
    # two strips per consumer (items of 4 strips), a group of 10 rows
    (14, 3, 250, 512, [10, 0, 3], gm.GroupedMgpuTiling(8, stages=3, ctas=2, strips=2)),
]


@pytest.mark.parametrize("t,e,n,k,sizes,tiling", CASES)
def test_matches_float64(rng, t, e, n, k, sizes, tiling):
  packed, scale, gs = random_experts(rng, e, n, k)
  x = jnp.asarray(rng.standard_normal((t, k)) * 3, jnp.bfloat16)
  w = gm.to_grouped_mgpu_layout(jnp.asarray(packed), jnp.asarray(scale))
  gsz = jnp.asarray(sizes, jnp.int32)
  y = gm.grouped_w4a16_mgpu(x, w, jnp.asarray(gs), gsz, n=n, tiling=tiling, interpret=True)
  assert y.shape == (t, n) and y.dtype == jnp.bfloat16
  yy = np.asarray(y.astype(jnp.float32), np.float64)
  assert np.all(np.isfinite(yy)), "unwritten (NaN-poisoned) output"
  ref = np_grouped(x, packed, scale, gs, sizes)
  assert np.linalg.norm(yy - ref) / np.linalg.norm(ref) < 4e-3               # bf16 output
  total = sum(sizes)
  assert np.all(yy[total:] == 0)
  ref_jax = np.asarray(gm.grouped_w4a16_reference_mgpu(x, w, jnp.asarray(gs), gsz, n)
                       .astype(jnp.float32), np.float64)
  assert np.linalg.norm(yy - ref_jax) / np.linalg.norm(ref) < 4e-3


def test_f32_output_is_tight(rng):
  """f32 x and output: the only roundings are x's f16 cast and the f32 accumulation."""
  t, e, n, k, sizes = 9, 2, 128, 512, [4, 5]
  packed, scale, gs = random_experts(rng, e, n, k)
  x = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
  w = gm.to_grouped_mgpu_layout(jnp.asarray(packed), jnp.asarray(scale))
  y = gm.grouped_w4a16_mgpu(x, w, jnp.asarray(gs), jnp.asarray(sizes, jnp.int32), n=n,
                            tiling=gm.GroupedMgpuTiling(8, stages=2, ctas=2), interpret=True)
  assert y.dtype == jnp.float32
  ref = np_grouped(x.astype(jnp.float16), packed, scale, gs, sizes)
  assert np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref) < 1e-5


def test_default_tiling():
  t = gm.default_tiling(64, 32, k=7168)
  assert (t.block_rows, t.consumers, t.ctas, t.k_per_step, t.pdl) == (8, 2, 132, 2, True)
  assert 4 <= t.stages <= 8 and gm.smem_bytes(t) <= 200 * 1024
  assert gm.default_tiling(64, 32, k=768).k_per_step == 1        # 3 K tiles
  assert gm.default_tiling(64, 32, k=768).stages == 8
  assert gm.default_tiling(256, 8).block_rows == 32
  assert gm.default_tiling(64, 32, stages=3).stages == 3
  with pytest.raises(TypeError):
    gm.default_tiling(64, 32, block_n=3)
  with pytest.raises(ValueError):
    gm.GroupedMgpuTiling(block_rows=12)
  with pytest.raises(ValueError):
    gm.GroupedMgpuTiling(consumers=3)


def test_bad_inputs_raise(rng):
  packed, scale, gs = random_experts(rng, 2, 128, 512)
  w = gm.to_grouped_mgpu_layout(jnp.asarray(packed), jnp.asarray(scale))
  x = jnp.ones((4, 512), jnp.bfloat16)
  gsz = jnp.asarray([2, 2], jnp.int32)
  gs = jnp.asarray(gs)
  call = lambda *a, **kw: gm.grouped_w4a16_mgpu(*a, **{"n": 128, "interpret": True, **kw})
  with pytest.raises(ShapeError, match="multiple of 16"):
    call(jnp.ones((4, 500), jnp.bfloat16), w, gs, gsz)
  with pytest.raises(ShapeError, match="K tiles"):
    call(jnp.ones((4, 1024), jnp.bfloat16), w, gs, gsz)
  with pytest.raises(ShapeError, match="strips"):
    call(x, w, gs, gsz, n=300)
  with pytest.raises(ShapeError, match="to_grouped_mgpu_layout"):
    call(x, w.astype(jnp.int32), gs, gsz)
  with pytest.raises(ShapeError, match="group_sizes"):
    call(x, w, gs, jnp.asarray([4], jnp.int32))
  with pytest.raises(ShapeError, match="integer"):
    call(x, w, gs, jnp.asarray([2.0, 2.0]))
  with pytest.raises(ShapeError, match="global_scale"):
    call(x, w, gs[:1], gsz)
  with pytest.raises(ShapeError, match="shared memory"):
    call(x, w, gs, gsz, tiling=gm.GroupedMgpuTiling(block_rows=64, stages=8))
  with pytest.raises(ShapeError):
    gm.to_grouped_mgpu_layout(jnp.asarray(packed[0]), jnp.asarray(scale[0]))


def test_lowers_for_hopper_on_cpu():
  """The compiled path (persistent loop, in-register dequantization into wgmma's A operand,
  masked transposed stores) lowers to Mosaic GPU for the issue's shape and the variants."""
  for t_rows, e, n, k, til in [(64, 32, 2048, 7168, None),
                               (64, 32, 2048, 7168, gm.GroupedMgpuTiling(16, 1, 4, 132, False)),
                               (12, 3, 200, 272, gm.GroupedMgpuTiling(8, 2, 3, 5)),
                               (64, 32, 2048, 7168, gm.GroupedMgpuTiling(8, 2, 4, strips=2)),
                               (64, 32, 2048, 7168, gm.GroupedMgpuTiling(work_list="kernel")),
                               (64, 32, 2048, 7168, gm.GroupedMgpuTiling(tail=True)),
                               (64, 32, 2048, 7168, gm.GroupedMgpuTiling(pdl=True)),
                               (64, 32, 2048, 7168, gm.default_tiling(64, 32, k_per_step=2)),
                               (64, 32, 2048, 7168, gm.GroupedMgpuTiling(8, 2, 4, strips=2,
                                                                         tail=True)),
                               (64, 256, 256, 512, gm.GroupedMgpuTiling(work_list="kernel"))]:
    s = -(-(-(-n // 64)) // 2) * 2
    args = (jax.ShapeDtypeStruct((t_rows, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((e, s, -(-k // 256), 72, 32), jnp.uint32),
            jax.ShapeDtypeStruct((e,), jnp.float32), jax.ShapeDtypeStruct((e,), jnp.int32))
    fn = lambda x, w, g, gsz, n=n, til=til: gm.grouped_w4a16_mgpu(x, w, g, gsz, n=n, tiling=til)
    assert "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_weight_layout_and_public_op_dispatch(rng, monkeypatch):
  """GroupedNVFP4Weight.to_mgpu_layout round-trips to the ModelOpt bytes; gemm.grouped_matmul
  gives the ModelOpt weight's result on CPU and on a (pretended) Hopper GPU runs the grouped
  Mosaic kernel (here interpreted) for decode-sized groups."""
  from kernels import gemm
  from kernels.quant import GroupedNVFP4Weight
  e, k, n = 3, 256, 128
  w = GroupedNVFP4Weight.from_dense(jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32))
  wm = w.to_mgpu_layout()
  assert wm.layout == "mgpu" and (wm.k, wm.n, wm.num_groups) == (k, n, e)
  assert wm.to_mgpu_layout() is wm and wm.packed.shape == (e, 2, 1, 72, 32)
  np.testing.assert_array_equal(np.asarray(wm.modelopt_packed()), np.asarray(w.packed))
  np.testing.assert_array_equal(np.asarray(wm.to_kernel_layout().packed),
                                np.asarray(w.to_kernel_layout().packed))
  x = jnp.asarray(rng.standard_normal((7, k)), jnp.bfloat16)
  sizes = jnp.asarray([3, 0, 3], jnp.int32)
  np.testing.assert_array_equal(np.asarray(gemm.grouped_matmul(x, wm, sizes), np.float32),
                                np.asarray(gemm.grouped_matmul(x, w, sizes), np.float32))
  calls = []
  kernel = gemm.grouped_mgpu_kernels.grouped_w4a16_mgpu

  def interpreted(*args, **kwargs):
    calls.append(args[0].shape)
    return kernel(*args, **kwargs, tiling=gm.GroupedMgpuTiling(stages=2, ctas=2),
                  interpret=True)

  monkeypatch.setattr(gemm, "_gpu_capability", lambda: 9.0)
  monkeypatch.setattr(gemm.grouped_mgpu_kernels, "grouped_w4a16_mgpu", interpreted)
  wd = np.asarray(w.dequantize(), np.float64)
  xf = np.asarray(x, np.float64)
  ref = np.zeros((7, n))
  ref[:3], ref[3:6] = xf[:3] @ wd[0], xf[3:6] @ wd[2]
  y = np.asarray(gemm.grouped_matmul(x, wm, sizes).astype(jnp.float32), np.float64)
  assert calls == [(7, k)] and np.linalg.norm(y - ref) / np.linalg.norm(ref) < 4e-3
  assert np.all(y[6] == 0)
  with pytest.raises(ShapeError, match="to_grouped_mgpu_layout"):
    GroupedNVFP4Weight(w.packed, w.scale, w.global_scale, layout="mgpu")
