"""kernels.scalar_split (interpret mode): vectors split into 0-d arrays by one kernel, equal to
indexing; and llama.layer_kv_scales' indexing path."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from kernels.scalar_split import reference, split_scalars


def test_split_scalars_equals_indexing():
  rng = np.random.default_rng(5)
  k = jnp.asarray(rng.uniform(0.01, 3.0, 32), jnp.float32)
  v = jnp.asarray(rng.uniform(0.01, 3.0, 7), jnp.float32)
  got = split_scalars(k, v, interpret=True)
  want = reference(k, v)
  assert len(got) == 39 and all(g.shape == () and g.dtype == jnp.float32 for g in got)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(got[:32]), np.asarray(k))


def test_split_scalars_rejects():
  with pytest.raises(ShapeError):
    split_scalars(jnp.ones((2, 2), jnp.float32), interpret=True)
  with pytest.raises(ShapeError):
    split_scalars(jnp.ones((4,), jnp.bfloat16), interpret=True)


def test_layer_kv_scales_off_gpu_indexes():
  from jaxinfer.kv_cache import KVCache
  from jaxinfer.models.llama import layer_kv_scales
  cache = KVCache.create(num_layers=3, num_pages=2, page_size=4, kv_heads=1, head_dim=8,
                         dtype=jnp.float8_e4m3fn, k_scale=0.5, v_scale=0.25)
  ks, vs = layer_kv_scales(cache)
  assert [float(k) for k in ks] == [0.5] * 3 and [float(v) for v in vs] == [0.25] * 3
