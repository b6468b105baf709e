"""kernels.add_rms_norm_mgpu in the Mosaic GPU interpreter: residual add + RMSNorm + FP8
quantization with rows split over a cluster, over f32 split-K partials with the product's scales
and over a plain bf16 y: float64-close, and the same sums / codes / scales as the XLA ops."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from jaxinfer.ops import E4M3_MAX, ScaledRows
from kernels import add_rms_norm_mgpu as nm
from kernels.add_rms_norm import reference_fp8

f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize("cluster,partials,direct", [(2, 4, False), (4, 2, False), (4, 0, False),
                                                     (2, 4, True), (4, 0, True)])
def test_add_rms_norm_fp8_cluster(cluster, partials, direct):
  T, H = 3, 1024
  rng = np.random.default_rng(cluster * 10 + partials)
  x = jnp.asarray(rng.standard_normal((T, H)) * 2, jnp.bfloat16)
  w = jnp.asarray(rng.uniform(0.5, 1.5, H), jnp.bfloat16)
  if partials:
    y = jnp.asarray(rng.standard_normal((partials, T, H)) * 20, jnp.float32)
    rs = jnp.asarray(rng.uniform(0.001, 0.05, (T, 1)), jnp.float32)
    cs = jnp.asarray(rng.uniform(0.5, 2.0, H), jnp.float32)
    yy = ScaledRows(y, rs, cs, jnp.bfloat16).apply()
    kw = dict(y_row_scale=rs, y_col_scale=cs)
  else:
    y = yy = jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16)
    kw = {}
  s, q, sx = nm.add_rms_norm_fp8(x, y, w, eps=1e-5, interpret=True,
                                 tiling=nm.ClusterTiling(cluster, direct), **kw)
  assert s.shape == q.shape == (T, H) and q.dtype == jnp.float8_e4m3fn and sx.shape == (T, 1)
  want_s = f64(x) + (f64(y).sum(0) * f64(kw["y_row_scale"]) * f64(kw["y_col_scale"])
                     if partials else f64(y))
  np.testing.assert_allclose(f64(s), want_s, rtol=1e-2, atol=1e-2 * np.abs(want_s).max())
  want_h = f64(w) * want_s / np.sqrt(np.mean(want_s ** 2, axis=-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(f64(sx)[:, 0], np.abs(want_h).max(axis=1) / E4M3_MAX, rtol=2e-2)
  np.testing.assert_allclose(f64(q) * f64(sx), want_h, rtol=0.07,
                             atol=0.07 * np.abs(want_h).max())
  for g, r in zip((s, q, sx), reference_fp8(x, yy, w, 1e-5)):
    np.testing.assert_array_equal(f64(g), f64(r))


def test_shapes_it_does_not_take():
  x = jnp.ones((2, 1024), jnp.bfloat16)
  w = jnp.ones((1024,), jnp.bfloat16)
  assert nm.supports(x, jnp.ones((4, 2, 1024), jnp.float32), w, 8)
  assert not nm.supports(x, jnp.ones((4, 2, 1024), jnp.bfloat16), w)
  assert not nm.supports(x, x, w, 16)
  with pytest.raises(ShapeError):
    nm.add_rms_norm_fp8(x[:, :640], x[:, :640], w[:640], eps=1e-5, interpret=True)
