"""kernels.add_rms_norm (interpret mode) against a float64 NumPy reference, and its shape errors."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import ShapeError
from kernels.add_rms_norm import add_rms_norm, reference


def np_add_rms_norm(x, y, w, eps):
  s = x + y
  return s, w * s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("T,H,dtype", [(8, 64, jnp.bfloat16), (12, 128, jnp.bfloat16),
                                       (3, 32, jnp.float32)])
def test_add_rms_norm_matches_float64(T, H, dtype):
  rng = np.random.default_rng(T * H)
  x = jnp.asarray(rng.standard_normal((T, H)) * 3, dtype)
  y = jnp.asarray(rng.standard_normal((T, H)), dtype)
  w = jnp.asarray(rng.uniform(0.5, 1.5, H), dtype)
  s, h = add_rms_norm(x, y, w, eps=1e-5, interpret=True)
  f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  want_s, want_h = np_add_rms_norm(f64(x), f64(y), f64(w), 1e-5)
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(f64(s), want_s, rtol=tol, atol=tol)
  np.testing.assert_allclose(f64(h), want_h, rtol=2 * tol, atol=2 * tol)
  # and the same roundings as the two XLA ops it replaces
  ref_s, ref_h = reference(x, y, w, 1e-5)
  np.testing.assert_allclose(f64(h), f64(ref_h), rtol=tol, atol=tol)
  np.testing.assert_array_equal(f64(s), f64(ref_s))


def test_add_rms_norm_rejects_shapes_it_does_not_take():
  x = jnp.ones((4, 48), jnp.bfloat16)
  with pytest.raises(ShapeError):
    add_rms_norm(x, x, jnp.ones(48, jnp.bfloat16), eps=1e-5, interpret=True)   # H not a power of 2
  x = jnp.ones((4, 64), jnp.bfloat16)
  with pytest.raises(ShapeError):
    add_rms_norm(x, x.astype(jnp.float32), jnp.ones(64), eps=1e-5, interpret=True)
