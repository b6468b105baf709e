"""Ulysses sequence parallelism on 8 virtual CPU devices equals the single-device DiT."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxinfer.errors import ShapeError
from jaxinfer.models import wan_dit
from sharding import ulysses

CFG = wan_dit.WanDiTConfig(num_heads=8, head_dim=12, in_channels=4, out_channels=4, text_dim=8,
                           freq_dim=8, ffn_dim=32, num_layers=2)


def _inputs(frames=2, h=8, w=8):
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  params = wan_dit.init_params(CFG, k1, jnp.float32)
  lat = jax.random.normal(k2, (2, frames, h, w, 4))
  text = jax.random.normal(k3, (2, 5, 8))
  return params, lat, jnp.array([900.0, 250.0]), text


@pytest.mark.parametrize("fsdp", [False, True])
def test_eight_devices_equal_one(fsdp):
  params, lat, t, text = _inputs()
  ref = jax.jit(wan_dit.forward, static_argnums=4, static_argnames="dtype")(
      params, lat, t, text, CFG, dtype=jnp.float32)
  mesh = jax.make_mesh((8,), ("sp",))
  sharded = ulysses.shard_params(params, mesh, "sp", fsdp)
  if fsdp:
    w = sharded["blocks"][0]["ffn_w1"]
    assert w.addressable_shards[0].data.shape == (CFG.dim // 8, CFG.ffn_dim)
  fwd = jax.jit(lambda p, *a: ulysses.forward(p, *a, CFG, mesh, fsdp=fsdp, dtype=jnp.float32))
  out = np.asarray(fwd(sharded, lat, t, text), np.float64)
  ref = np.asarray(ref, np.float64)
  assert np.isfinite(out).all()
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_all_to_all_round_trip():
  mesh = jax.make_mesh((8,), ("sp",))
  x = jax.random.normal(jax.random.key(0), (1, 16, 8, 4))
  def body(x):
    h = ulysses.seq_to_heads(x, "sp")
    assert h.shape == (1, 16, 1, 4)
    return ulysses.heads_to_seq(h, "sp")
  x = jax.device_put(x, NamedSharding(mesh, P(None, "sp")))
  y = jax.shard_map(body, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))(x)
  assert np.array_equal(np.asarray(y), np.asarray(x))


def test_bad_settings_fail_clearly():
  params, lat, t, text = _inputs()
  cfg12 = wan_dit.WanDiTConfig(num_heads=12, head_dim=12, in_channels=4, out_channels=4, text_dim=8,
                               freq_dim=8, ffn_dim=32, num_layers=1)
  mesh = jax.make_mesh((8,), ("sp",))
  p12 = wan_dit.init_params(cfg12, jax.random.key(0), jnp.float32)
  with pytest.raises(ShapeError, match=r"head count \(12\) divisible .* \(8\)"):
    ulysses.forward(p12, lat, t, text, cfg12, mesh, dtype=jnp.float32)
  with pytest.raises(ShapeError, match=r"token count \(18\)"):     # 2 frames of 3x3 patches
    ulysses.forward(params, jnp.ones((2, 2, 6, 6, 4)), t, text, CFG, mesh, dtype=jnp.float32)
