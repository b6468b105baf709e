"""kernels.fp8_act_quant_mgpu in the Mosaic GPU interpreter: the cluster-split row quantization
(alone and after SwiGLU with the FP8 product's scales) against float64 NumPy and bit for bit
against the plain-JAX references, and the shapes it does not take."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from jaxinfer.ops import E4M3_MAX, quantize_rows_fp8
from kernels import fp8_act_quant_mgpu as am
from kernels.fp8_act_quant import reference_silu_mul_quantize

f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _check(q, sx, want, ref):
  sx64 = f64(sx)
  np.testing.assert_allclose(sx64[:, 0], np.abs(want).max(axis=1) / E4M3_MAX, rtol=2e-2)
  np.testing.assert_allclose(f64(q) * sx64, want, rtol=0.07, atol=0.07 * np.abs(want).max())
  np.testing.assert_array_equal(f64(q), f64(ref[0]))
  np.testing.assert_array_equal(sx64, f64(ref[1]))


@pytest.mark.parametrize("cluster,direct", [(2, False), (4, False), (4, True)])
def test_silu_mul_quantize_cluster(cluster, direct):
  T, I = 3, 1024
  rng = np.random.default_rng(cluster)
  raw = jnp.asarray(rng.standard_normal((T, 2 * I)) * 40, jnp.bfloat16)
  rs = jnp.asarray(rng.uniform(0.01, 0.1, (T, 1)), jnp.float32)
  cs = jnp.asarray(rng.uniform(0.5, 2.0, 2 * I), jnp.float32)
  q, sx = am.silu_mul_quantize(raw, rs, cs, interpret=True,
                               tiling=am.ClusterTiling(cluster, direct))
  assert q.shape == (T, I) and q.dtype == jnp.float8_e4m3fn and sx.shape == (T, 1)
  y = f64(raw) * f64(rs) * f64(cs)
  g, u = y[:, :I], y[:, I:]
  _check(q, sx, g / (1 + np.exp(-g)) * u, reference_silu_mul_quantize(raw, rs, cs))


@pytest.mark.parametrize("cluster,direct", [(2, False), (8, False), (8, True)])
def test_quantize_rows_cluster(cluster, direct):
  T, K = 2, 2048
  rng = np.random.default_rng(10 + cluster)
  x = jnp.asarray(rng.standard_normal((T, K)) * rng.uniform(0.1, 10, (T, 1)), jnp.float16)
  q, sx = am.quantize_rows(x, interpret=True, tiling=am.ClusterTiling(cluster, direct))
  _check(q, sx, f64(x), quantize_rows_fp8(x))


def test_shapes_it_does_not_take():
  assert am.supports(jnp.ones((2, 2048), jnp.bfloat16), glu=True, cluster=8)
  assert not am.supports(jnp.ones((2, 2048), jnp.bfloat16), glu=True, cluster=16)
  assert not am.supports(jnp.ones((2, 3, 256)), glu=False)
  assert not am.supports(jnp.ones((2, 640)), glu=False, cluster=4)
  with pytest.raises(ShapeError):
    am.quantize_rows(jnp.ones((2, 640), jnp.bfloat16), interpret=True)


def test_triton_entry_points_dispatch_decode_calls_to_the_cluster_kernel(monkeypatch):
  """kernels.fp8_act_quant with JAXINFER_ACT_QUANT_CLUSTER set: SwiGLU calls of <= 64 rows on
  Hopper (not interpreted, no explicit tiling, a shape the cluster kernel takes) go to it;
  quantize_rows never does."""
  import kernels.fp8_act_quant as aq
  monkeypatch.setattr(aq, "CLUSTER", 4)
  monkeypatch.setattr(am, "on_hopper", lambda: True)
  x = jnp.ones((64, 2 * 14336), jnp.bfloat16)
  assert aq._cluster_for(x, True, False, None) == 4
  assert aq._cluster_for(jnp.ones((65, 2 * 14336), jnp.bfloat16), True, False, None) == 0
  assert aq._cluster_for(x, True, True, None) == 0
  assert aq._cluster_for(x, True, False, aq.Tiling()) == 0
  assert aq._cluster_for(jnp.ones((64, 640), jnp.bfloat16), True, False, None) == 0
  assert aq._cluster_for(jnp.ones((64, 4096), jnp.bfloat16), False, False, None) == 0  # rows
  monkeypatch.setattr(aq, "CLUSTER", 0)
  assert aq._cluster_for(x, True, False, None) == 0
