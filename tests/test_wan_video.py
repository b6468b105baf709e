"""Wan text-to-video pipeline: samplers vs diffusers, step-cache schedule, tiny end-to-end video file."""
from pathlib import Path

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.models import wan_dit, wan_vae
from jaxinfer.video import pipeline, quality, schedulers, writer

GOLDEN = Path(__file__).parent / "goldens" / "wan" / "unipc.npz"


def test_unipc_matches_diffusers():
  z = np.load(GOLDEN)
  sigmas, timesteps = schedulers.flow_sigmas(10, 3.0)
  assert np.abs(sigmas - z["sigmas"]).max() < 1e-7 and (timesteps == z["timesteps"]).all()
  sched, x = schedulers.UniPCFlow(sigmas), jnp.asarray(z["samples"][0])
  for i, t in enumerate(timesteps):
    v = 0.7 * np.asarray(x, np.float64) - z["c"] * np.cos(t / 300.0)
    x = sched.step(jnp.asarray(v, jnp.float32), x, i)
    ref = z["samples"][i + 1]
    assert np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref) < 1e-6, i


def test_euler_integrates_straight_flow_exactly():
  """For v = ε - x₀ with fixed x₀, ε, Euler lands on x₀ (the flow is a straight line)."""
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  sigmas, _ = schedulers.flow_sigmas(7, 5.0)
  sched = schedulers.EulerFlow(sigmas)
  x = jnp.asarray(sigmas[0] * eps + (1 - sigmas[0]) * x0, jnp.float32)
  for i in range(7):
    x = sched.step(jnp.asarray(eps - x0, jnp.float32), x, i)
  assert np.abs(np.asarray(x) - x0).max() < 1e-5


def test_cache_schedule():
  assert pipeline.full_steps(8, 1, 2) == [True] * 8
  assert pipeline.full_steps(8, 2, 2) == [True, True, True, False, True, False, True, True]
  with pytest.raises(InvalidRequestError):
    pipeline.full_steps(8, 0, 2)


def _tiny():
  dit_cfg = wan_dit.WanDiTConfig(num_heads=2, head_dim=12, in_channels=4, out_channels=4, text_dim=8,
                                 freq_dim=8, ffn_dim=16, num_layers=2)
  vae_cfg = wan_vae.WanVAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                                 latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
  return dit_cfg, vae_cfg


def test_tiny_end_to_end_writes_video(tmp_path):
  dit_cfg, vae_cfg = _tiny()
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  dit_p = wan_dit.init_params(dit_cfg, k1, jnp.float32)
  vae_p = wan_vae.init_params(vae_cfg, k2)
  text, neg = jax.random.normal(k3, (1, 4, 8)), jax.random.normal(k4, (1, 4, 8))
  t2v = pipeline.T2VConfig(num_frames=5, height=32, width=48, num_steps=3, guidance_scale=4.0,
                           cache_interval=2, cache_warmup=1)
  frames = pipeline.generate(dit_p, dit_cfg, vae_p, vae_cfg, text, neg, t2v, dtype=jnp.float32)
  assert frames.shape == (5, 32, 48, 3) and np.isfinite(frames).all()
  assert frames.min() >= -1 and frames.max() <= 1 and frames.std() > 1e-3
  path = writer.write_video(frames, tmp_path / "out.gif", fps=8)
  back = iio.imread(path)
  assert back.shape[0] == 5 and back.shape[1:3] == (32, 48)
  with pytest.raises(InvalidRequestError, match="one frame"):
    writer.write_video(frames, tmp_path / "out.png")


def test_bad_frames_and_resolution_fail_clearly():
  dit_cfg, vae_cfg = _tiny()
  with pytest.raises(InvalidRequestError, match="num_frames must be 1"):
    pipeline.latent_shape(pipeline.T2VConfig(num_frames=80, height=32, width=48), dit_cfg, vae_cfg)
  with pytest.raises(InvalidRequestError, match="multiples of 16"):
    pipeline.latent_shape(pipeline.T2VConfig(num_frames=5, height=40, width=48), dit_cfg, vae_cfg)
  assert pipeline.latent_shape(pipeline.T2VConfig(), wan_dit.WanDiTConfig.wan21_1_3b(),
                               wan_vae.WanVAEConfig()) == (21, 60, 104, 16)
  assert pipeline.latent_shape(pipeline.T2VConfig(num_frames=1), dit_cfg, vae_cfg)[0] == 1


def test_quality_metrics():
  rng = np.random.default_rng(1)
  a = np.clip(rng.normal(size=(2, 24, 24, 3)) * 0.3, -1, 1)
  assert quality.psnr(a, a) == float("inf") and abs(quality.ssim(a, a) - 1) < 1e-12
  b = a + rng.normal(size=a.shape) * 0.02
  assert 38 < quality.psnr(a, b) < 42       # mse 4e-4 on range 2 -> 40 dB
  assert quality.ssim(a, b) < quality.ssim(a, a + (b - a) * 0.1) < 1


def test_fp8_weight_linear_close_to_float64():
  from jaxinfer.ops import linear
  from jaxinfer.video.low_precision import XlaFP8Weight
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 16, 64)).astype(np.float32)
  w = (rng.normal(size=(64, 32)) / 8).astype(np.float32)
  out = np.asarray(linear(jnp.asarray(x, jnp.bfloat16), XlaFP8Weight.from_dense(jnp.asarray(w))),
                   np.float64)
  ref = x.astype(np.float64) @ w
  err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert np.isfinite(out).all() and err < 6e-2, err      # two E4M3 operands: ~2^-4 each, random signs


def test_sequence_parallel_denoise_equals_single_device():
  from sharding import ulysses
  dit_cfg = wan_dit.WanDiTConfig(num_heads=4, head_dim=12, in_channels=4, out_channels=4, text_dim=8,
                                 freq_dim=8, ffn_dim=16, num_layers=1)
  params = wan_dit.init_params(dit_cfg, jax.random.key(2), jnp.float32)
  text, neg = jax.random.normal(jax.random.key(3), (2, 1, 4, 8))
  t2v = pipeline.T2VConfig(num_steps=2, guidance_scale=3.0, scheduler="euler")
  shape = (2, 4, 4, 4)                                       # 2 latent frames of 4x4 -> 8 tokens
  ref = pipeline.denoise(params, dit_cfg, text, neg, shape, t2v, dtype=jnp.float32)
  mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])
  sharded = ulysses.shard_params(params, mesh, "sp", fsdp=True)
  out = pipeline.denoise(sharded, dit_cfg, text, neg, shape, t2v, dtype=jnp.float32, mesh=mesh,
                         fsdp=True)
  ref = np.asarray(ref, np.float64)
  assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) < 1e-5


def test_layerwise_denoise_equals_scanned():
  """The default (blocks list: one jitted block per layer) and the stacked lax.scan step agree,
  step cache included."""
  dit_cfg, _ = _tiny()
  params = wan_dit.init_params(dit_cfg, jax.random.key(5), jnp.float32)
  text, neg = jax.random.normal(jax.random.key(6), (2, 1, 4, 8))
  t2v = pipeline.T2VConfig(num_steps=4, guidance_scale=3.0, cache_interval=2, cache_warmup=1)
  shape = (2, 4, 4, 4)
  ref = pipeline.denoise(wan_dit.stack_blocks(params), dit_cfg, text, neg, shape, t2v,
                         dtype=jnp.float32)
  out = pipeline.denoise(params, dit_cfg, text, neg, shape, t2v, dtype=jnp.float32)
  ref = np.asarray(ref, np.float64)
  assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) < 1e-5
