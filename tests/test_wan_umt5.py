"""umT5 encoder vs transformers' UMT5EncoderModel (golden from tests/goldens/wan/make_goldens.py)."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import diffusers_wan
from jaxinfer.errors import ShapeError
from jaxinfer.models import umt5

GOLDEN = Path(__file__).parent / "goldens" / "wan" / "umt5.npz"
CFG = umt5.UMT5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=4, d_ff=24, num_layers=2,
                      num_buckets=8, max_distance=16)


def test_matches_transformers():
  z = np.load(GOLDEN)
  state = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
  params = diffusers_wan.convert_umt5(state.__getitem__, CFG, jnp.float32)
  ids, mask = jnp.asarray(z["input_ids"]), jnp.asarray(z["attention_mask"])
  out = np.asarray(jax.jit(umt5.encode, static_argnums=3)(params, ids, mask, CFG), np.float64)
  ref = z["output"]
  real = np.asarray(mask, bool)              # padding rows are garbage in both; compare real tokens
  err = np.linalg.norm(out[real] - ref[real]) / np.linalg.norm(ref[real])
  assert err < 1e-5, err
  emb = np.asarray(umt5.encode_prompts(params, ids, mask, CFG))
  assert (emb[~real] == 0).all() and np.allclose(emb[real], out[real], rtol=1e-4, atol=1e-5)


def test_buckets_match_t5_rule():
  b = umt5.relative_position_buckets(5, 5, num_buckets=8, max_distance=16)
  # bidirectional: keys after the query land in the upper half; |d| < 2 exact, then log-spaced
  assert b[0].tolist() == [0, 5, 6, 6, 6] and b[4].tolist() == [2, 2, 2, 1, 0]


def test_bad_inputs_fail_clearly():
  params = umt5.init_params(CFG, jax.random.key(0), jnp.float32)
  with pytest.raises(ShapeError):
    umt5.encode(params, jnp.ones((2, 3), jnp.int32), jnp.ones((2, 4), jnp.int32), CFG)
