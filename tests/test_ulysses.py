"""Ulysses sequence parallelism on 8 virtual CPU devices equals the single-device DiT."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxinfer.errors import ShapeError
from jaxinfer.models import wan_dit
from jaxinfer.video import low_precision as lp
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


def _fp8_ref_attn(q, k, v, quant=None):
  """Calibrated FP8Attention's math on CPU (cuDNN runs it on the GPU)."""
  if quant is None:
    return wan_dit.attention(q, k, v, "xla")
  return lp.fp8_attention_reference(quant, q, k, v)


@pytest.mark.parametrize("fsdp", [False, True])
def test_fp8_attention_blocks_on_eight_devices_equal_one(fsdp):
  """Blocks with calibrated FP8 attention and FP8 GEMMs (the "fp8" variant) under Ulysses: each
  device quantizes its head shard with that shard's K mean, so the result is the one-device one."""
  params, lat, t, text = _inputs()
  x_cal = jax.random.normal(jax.random.key(8), lat.shape)
  stats = lp.calibrate_model(params, CFG, x_cal, [900.0, 250.0], text)
  # K's mean differs per head by design here: a device subtracting another shard's mean quantizes
  # different values (softmax is invariant to the mean, the E4M3 rounding is not)
  for st in stats:
    st["self_attn"]["k_mean"] = st["self_attn"]["k_mean"] + np.arange(CFG.num_heads)[:, None] * 0.37
  quant = lp.quantize_model(params, "fp8", stats, fp8_attention=True)
  fwd1 = jax.jit(lambda p: wan_dit.forward(p, lat, t, text, CFG, attn_impl=_fp8_ref_attn,
                                           dtype=jnp.float32))
  ref, plain = np.asarray(fwd1(quant), np.float64), np.asarray(fwd1(params), np.float64)
  mesh = jax.make_mesh((8,), ("sp",))
  sharded = ulysses.shard_params(quant, mesh, "sp", fsdp)
  out = jax.jit(lambda p: ulysses.forward(p, lat, t, text, CFG, mesh, fsdp=fsdp,
                                          attn_impl=_fp8_ref_attn, dtype=jnp.float32))(sharded)
  out = np.asarray(out, np.float64)
  err_fp8 = np.linalg.norm(ref - plain) / np.linalg.norm(plain)
  err_sp = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert np.isfinite(out).all() and 1e-3 < err_fp8 < 0.1, err_fp8   # the FP8 path did run
  assert err_sp < 0.02 * err_fp8, (err_sp, err_fp8)


def test_fp8_attention_head_shard():
  att = lp.FP8Attention.from_stats({"q_amax": 2.0, "k_amax": 3.0, "v_amax": 1.5,
                                    "k_mean": np.random.default_rng(0).normal(size=(8, 4))})
  part = jax.jit(lambda a, i: a.for_heads(i * 2, 2))(att, 3)
  np.testing.assert_array_equal(np.asarray(part.k_mean), np.asarray(att.k_mean)[6:8])
  assert float(part.sk) == float(att.sk)
