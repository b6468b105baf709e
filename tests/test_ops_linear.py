"""ops.linear: 16-bit GEMMs of many rows ask for their output dtype directly (no float32 round trip
through a separate convert), with the values of the float32-then-round form; small ones keep it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import ops


@pytest.mark.parametrize("rows", [8, 512, 1024])
def test_linear_output_dtype_form_by_rows(rows):
  rng = np.random.default_rng(rows)
  x = jnp.asarray(rng.standard_normal((rows, 128)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((128, 96)) * 0.05, jnp.bfloat16)
  got = ops.linear(x, w)
  want = jnp.einsum("tk,kn->tn", x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  f64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), f64, rtol=2e-2, atol=2e-2)
  hlo = jax.jit(ops.linear).lower(x, w).as_text()
  dot = next(line for line in hlo.splitlines() if "dot_general" in line)
  native = rows >= ops.NATIVE_OUT_MIN_ROWS > 0
  assert ("-> tensor<%dx96xbf16>" % rows in dot) == native, dot
  # an explicit float32 output (the LM head) never takes the 16-bit form
  head = jax.jit(lambda a, b: ops.linear(a, b, jnp.float32)).lower(x, w).as_text()
  dot = next(line for line in head.splitlines() if "dot_general" in line)
  assert dot.split("->")[-1].strip().endswith("xf32>"), dot
