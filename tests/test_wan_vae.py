"""Wan VAE decoder vs diffusers' AutoencoderKLWan.decode (golden from tests/goldens/wan/make_goldens.py)."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import diffusers_wan
from jaxinfer.errors import ShapeError
from jaxinfer.models import wan_vae

GOLDEN = Path(__file__).parent / "goldens" / "wan" / "vae.npz"
CFG = wan_vae.WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                           latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.8, 1.2, 2.0))


def test_decoder_matches_diffusers():
  z = np.load(GOLDEN)
  state = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
  params = diffusers_wan.convert_vae(state.__getitem__, CFG, jnp.float32)
  latents = jnp.asarray(z["z"].transpose(0, 2, 3, 4, 1))                     # [B, T, h, w, C]
  out = jax.jit(wan_vae.decode_raw, static_argnums=2)(params, latents, CFG)
  ref = z["output"].transpose(0, 2, 3, 4, 1)
  assert out.shape == ref.shape == (1, CFG.num_frames(3), 32, 48, 3)
  assert np.isfinite(np.asarray(out)).all()
  err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
  assert err < 1e-5, err
  # frame-chunked decoding (frame 0 alone, then two latent frames with the carried conv caches)
  # equals the whole-sequence decode
  outc = wan_vae.decode_raw_chunked(params, latents, CFG, chunk=2)
  assert np.abs(np.asarray(outc) - np.asarray(out)).max() < 1e-5
  # denormalization: decode(latents) == decode_raw(latents·std + mean)
  normed = (latents - jnp.asarray(CFG.latents_mean)) / jnp.asarray(CFG.latents_std)
  out2 = jax.jit(wan_vae.decode, static_argnums=2)(params, normed, CFG)
  assert np.abs(np.asarray(out2) - np.asarray(out)).max() < 1e-4


def test_bad_latents_fail_clearly():
  with pytest.raises(ShapeError, match="latents must be"):
    wan_vae.decode_raw({}, jnp.ones((1, 2, 4, 4, 5)), CFG)


def test_frame_count():
  assert [CFG.num_frames(t) for t in (1, 2, 21)] == [1, 5, 81]
