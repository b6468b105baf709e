"""kernels/quant: NVFP4 and FP8 block formats, ModelOpt / DeepSeek layouts, weight pytrees."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxinfer import ops
from jaxinfer.errors import ShapeError
from kernels.quant import (FP8BlockWeight, GroupedFP8BlockWeight, GroupedNVFP4Weight, NVFP4Weight,
                           fp8_block, nvfp4)

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def np_dequant_nvfp4(packed, scale, global_scale):
  """Independent float64 decode of the ModelOpt layout: element 2i in the low nibble."""
  p = np.asarray(packed)
  codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
  s = np.asarray(jnp.asarray(scale, jnp.float32), np.float64)
  gs = np.asarray(global_scale, np.float64).reshape(np.shape(global_scale) + (1,) * (p.ndim - np.ndim(global_scale)))
  return E2M1[codes] * np.repeat(s, 16, axis=-1) * gs


def np_dequant_fp8(w, scale_inv):
  w64 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
  s = np.repeat(np.repeat(np.asarray(scale_inv, np.float64), 128, -2), 128, -1)
  return w64 * s[..., :w64.shape[-2], :w64.shape[-1]]


def test_nvfp4_round_trip_error_bounds(rng):
  x = rng.standard_normal((64, 512)) * np.exp(rng.standard_normal((64, 1)))
  packed, scale, gs = nvfp4.quantize(jnp.asarray(x, jnp.float32))
  assert packed.dtype == jnp.uint8 and packed.shape == (64, 256)
  assert scale.dtype == jnp.float8_e4m3fn and scale.shape == (64, 32)
  deq = np_dequant_nvfp4(packed, scale, gs)
  np.testing.assert_allclose(np.asarray(nvfp4.dequantize(packed, scale, gs), np.float64), deq,
                             rtol=1e-6)
  blocks_amax = np.repeat(np.abs(x).reshape(64, 32, 16).max(-1), 16, axis=-1)
  # Largest E2M1 half-step is 1 (between 4 and 6) in units of amax/6; the E4M3 block scale adds
  # at most 1/16 relative.
  assert np.all(np.abs(deq - x) <= blocks_amax / 6 * (1 + 1 / 16) + 1e-12)
  assert np.linalg.norm(deq - x) / np.linalg.norm(x) < 0.12


def test_nvfp4_exact_values_round_trip_bytes(rng):
  """Representable values (each block holds a +-6) re-quantize to the same ModelOpt bytes."""
  n, k = 8, 64
  codes = rng.integers(0, 16, (n, k))
  codes[:, ::16] = rng.choice([7, 15], (n, k // 16))
  packed = np.asarray(nvfp4.pack_nibbles(jnp.asarray(codes)))
  np.testing.assert_array_equal(packed & 0xF, codes[:, 0::2])
  np.testing.assert_array_equal(packed >> 4, codes[:, 1::2])
  scale = rng.uniform(0.5, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  gs = np.float32(0.0123)
  dense = np_dequant_nvfp4(packed, scale, gs)
  w = NVFP4Weight.from_dense(jnp.asarray(dense.T, jnp.float32), global_scale=jnp.float32(gs))
  got = w.to_modelopt()
  np.testing.assert_array_equal(
      np.asarray(nvfp4.unpack_nibbles(got["weight"])) & 7, codes & 7)  # -0 may become +0
  np.testing.assert_array_equal(np.asarray(got["weight_scale"]).view(np.uint8), scale.view(np.uint8))
  np.testing.assert_allclose(np.asarray(w.dequantize(), np.float64), dense.T, rtol=1e-6)


def test_modelopt_layout_round_trip(rng):
  n, k = 24, 96
  weight = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
  weight_scale = rng.uniform(0.01, 300, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  w = NVFP4Weight.from_modelopt(weight, weight_scale, np.array([0.5], np.float32),
                                np.float32(0.25))
  assert (w.k, w.n) == (k, n)
  out = w.to_modelopt()
  np.testing.assert_array_equal(np.asarray(out["weight"]), weight)
  np.testing.assert_array_equal(np.asarray(out["weight_scale"]).view(np.uint8),
                                weight_scale.view(np.uint8))
  assert float(out["weight_scale_2"]) == 0.5 and float(out["input_scale"]) == 0.25
  np.testing.assert_allclose(np.asarray(w.dequantize(), np.float64),
                             np_dequant_nvfp4(weight, weight_scale, 0.5).T, rtol=1e-6)


def test_fp8_block_round_trip_error_bounds(rng):
  w = rng.standard_normal((200, 300)) * np.exp(rng.standard_normal((200, 1)))
  q, s = fp8_block.quantize_weight(jnp.asarray(w, jnp.float32))
  assert q.dtype == jnp.float8_e4m3fn and s.shape == (2, 3) and s.dtype == jnp.float32
  deq = np_dequant_fp8(q, s)
  np.testing.assert_allclose(np.asarray(fp8_block.dequantize_weight(q, s), np.float64), deq,
                             rtol=1e-6)
  s_full = np.repeat(np.repeat(np.asarray(s, np.float64), 128, 0), 128, 1)[:200, :300]
  # E4M3: 3 mantissa bits -> relative half-ulp 2^-4; subnormal spacing 2^-9 in scale units.
  assert np.all(np.abs(deq - w) <= np.abs(w) * 2.0**-4 + s_full * 2.0**-10 + 1e-12)
  x = rng.standard_normal((5, 256))
  xq, xs = fp8_block.quantize_activations(jnp.asarray(x, jnp.float32))
  xd = np.asarray(fp8_block.dequantize_activations(xq, xs), np.float64)
  assert np.all(np.abs(xd - x) <= np.abs(x) * 2.0**-4 + np.repeat(np.asarray(xs), 128, 1) * 2.0**-10)


def test_deepseek_layout_round_trip(rng):
  q = rng.standard_normal((256, 384)).astype(ml_dtypes.float8_e4m3fn)
  s = rng.uniform(0.1, 2, (2, 3)).astype(np.float32)
  w = FP8BlockWeight.from_deepseek(q, s)
  np.testing.assert_array_equal(np.asarray(w.weight).view(np.uint8), q.view(np.uint8))
  np.testing.assert_allclose(np.asarray(w.dequantize(), np.float64), np_dequant_fp8(q, s).T)


@pytest.mark.parametrize("make", [
    lambda: nvfp4.quantize(jnp.ones((4, 40))),                                       # K % 16
    lambda: nvfp4.dequantize(jnp.zeros((4, 8), jnp.int8), jnp.zeros((4, 1), jnp.float8_e4m3fn), 1.0),
    lambda: nvfp4.dequantize(jnp.zeros((4, 8), jnp.uint8), jnp.zeros((4, 1), jnp.float32), 1.0),
    lambda: nvfp4.dequantize(jnp.zeros((4, 8), jnp.uint8), jnp.zeros((4, 2), jnp.float8_e4m3fn), 1.0),
    lambda: NVFP4Weight.from_modelopt(np.zeros((4, 8), np.uint8), np.zeros((4, 1), ml_dtypes.float8_e4m3fn),
                                      np.float64(1.0)),
    lambda: NVFP4Weight.from_modelopt(np.zeros((4, 8), np.uint8), np.zeros((4, 1), ml_dtypes.float8_e4m3fn),
                                      np.ones(2, np.float32)),
    lambda: FP8BlockWeight.from_deepseek(np.zeros((128, 128), np.float32), np.ones((1, 1), np.float32)),
    lambda: FP8BlockWeight.from_deepseek(np.zeros((130, 128), ml_dtypes.float8_e4m3fn),
                                         np.ones((1, 1), np.float32)),
    lambda: fp8_block.quantize_activations(jnp.ones((2, 100))),
    lambda: GroupedNVFP4Weight.from_modelopt(np.zeros((2, 4, 8), np.uint8),
                                             np.zeros((2, 4, 1), ml_dtypes.float8_e4m3fn),
                                             np.ones(3, np.float32)),
    lambda: ops.linear(jnp.ones((2, 48)), NVFP4Weight.from_dense(jnp.ones((32, 16)))),
])
def test_bad_inputs_raise_shape_error(make):
  with pytest.raises(ShapeError):
    make()


def test_weights_are_pytrees_and_linear_matches_float64(rng):
  k, n = 256, 48
  w_kn = rng.standard_normal((k, n))
  x = rng.standard_normal((2, 3, k))
  for w in [NVFP4Weight.from_dense(jnp.asarray(w_kn, jnp.float32)),
            FP8BlockWeight.from_dense(jnp.asarray(w_kn, jnp.float32))]:
    leaves, tree = jax.tree_util.tree_flatten(w)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    w2 = jax.tree_util.tree_unflatten(tree, leaves)
    y = jax.jit(ops.linear)(jnp.asarray(x, jnp.float32), w2)
    assert y.shape == (2, 3, n) and y.dtype == jnp.float32
    if isinstance(w, NVFP4Weight):
      ref = x @ np.asarray(w.dequantize(), np.float64)
    else:
      xq, xs = fp8_block.quantize_activations(jnp.asarray(x, jnp.float32))
      ref = np.asarray(fp8_block.dequantize_activations(xq, xs), np.float64) @ np.asarray(
          w.dequantize(), np.float64)
    err = np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
    assert err < 1e-5


def test_grouped_from_dense_per_expert_scales(rng):
  w = rng.standard_normal((3, 64, 32)) * np.array([1.0, 100.0, 0.01])[:, None, None]
  gw = GroupedNVFP4Weight.from_dense(jnp.asarray(w, jnp.float32))
  assert gw.packed.shape == (3, 32, 32) and gw.global_scale.shape == (3,)
  deq = np.asarray(gw.dequantize(), np.float64)
  np.testing.assert_allclose(
      deq, np.swapaxes(np_dequant_nvfp4(gw.packed, gw.scale, np.asarray(gw.global_scale)), 1, 2),
      rtol=1e-6)
  rel = np.linalg.norm(deq - w, axis=(1, 2)) / np.linalg.norm(w, axis=(1, 2))
  assert np.all(rel < 0.12)
  fw = GroupedFP8BlockWeight.from_dense(jnp.asarray(w, jnp.float32))
  assert fw.weight.shape == (3, 32, 64) and fw.scale_inv.shape == (3, 1, 1)
  rel = np.linalg.norm(np.asarray(fw.dequantize(), np.float64) - w, axis=(1, 2)) / np.linalg.norm(
      w, axis=(1, 2))
  assert np.all(rel < 0.05)


def test_nvfp4_kernel_layout_round_trip_and_semantics(rng):
  """Kernel layout: byte j of each 256-wide K tile holds elements j (low nibble) and 128 + j
  (high nibble); the weight type repacks once and still round-trips the ModelOpt bytes."""
  n, k = 8, 512
  weight = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
  weight_scale = rng.uniform(0.01, 300, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  kl = np.asarray(nvfp4.to_kernel_layout(jnp.asarray(weight)))
  codes = np.stack([weight & 0xF, weight >> 4], -1).reshape(n, k // 256, 2, 128)
  np.testing.assert_array_equal(kl.reshape(n, k // 256, 128) & 0xF, codes[:, :, 0])
  np.testing.assert_array_equal(kl.reshape(n, k // 256, 128) >> 4, codes[:, :, 1])
  np.testing.assert_array_equal(np.asarray(nvfp4.from_kernel_layout(jnp.asarray(kl))), weight)
  w = NVFP4Weight.from_modelopt(weight, weight_scale, np.float32(0.5))
  wk = w.to_kernel_layout()
  assert wk.layout == "kernel" and w.layout == "modelopt" and wk.to_kernel_layout() is wk
  np.testing.assert_array_equal(np.asarray(wk.packed), kl)
  np.testing.assert_array_equal(np.asarray(wk.to_modelopt()["weight"]), weight)
  np.testing.assert_array_equal(np.asarray(wk.to_modelopt_layout().packed), weight)
  np.testing.assert_array_equal(np.asarray(wk.dequantize()), np.asarray(w.dequantize()))
  leaves, treedef = jax.tree_util.tree_flatten(wk)            # layout is static metadata
  assert jax.tree_util.tree_unflatten(treedef, leaves).layout == "kernel"
  g = GroupedNVFP4Weight.from_dense(jnp.asarray(rng.standard_normal((3, k, 16)), jnp.float32))
  np.testing.assert_array_equal(np.asarray(g.to_kernel_layout().dequantize()),
                                np.asarray(g.dequantize()))
  with pytest.raises(ShapeError):
    nvfp4.to_kernel_layout(jnp.zeros((4, 136), jnp.uint8))      # K = 272
  with pytest.raises(ShapeError):
    NVFP4Weight(w.packed, w.scale, w.global_scale, layout="marlin")
