"""Wan text-to-video: prompt embeddings -> flow-matching denoising with classifier-free guidance
(optionally step-cached) -> causal VAE decode -> frames in [-1, 1].

CFG runs the conditional and unconditional branch as one batch of 2 through the DiT:
    v = v_uncond + g · (v_cond - v_uncond).
Step cache (first-block cache / DeepCache style): on a full step the DiT also returns the residual that
blocks 1.. added; on a cached step only block 0 runs and that residual is reused. ``cache_interval=k``
runs full steps on the first ``cache_warmup`` steps, the last step and every k-th step; the rest are
cached (≈ (k-1)/k of the block work saved on them). Its quality cost is measured in experiments/t2v.py.
Text-to-image is ``num_frames=1``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import InvalidRequestError
from jaxinfer.models import wan_dit, wan_vae
from jaxinfer.video import schedulers


@dataclasses.dataclass(frozen=True)
class T2VConfig:
  num_frames: int = 81
  height: int = 480
  width: int = 832
  num_steps: int = 50
  guidance_scale: float = 5.0
  shift: float = 3.0
  scheduler: str = "unipc"
  cache_interval: int = 1          # 1: no step cache
  cache_warmup: int = 2
  seed: int = 0


def latent_shape(t2v: T2VConfig, dit: wan_dit.WanDiTConfig, vae: wan_vae.WanVAEConfig
                 ) -> tuple[int, int, int, int]:
  """(latent frames, h, w, channels); bad frame counts / resolutions fail with the rule to follow."""
  tf = 2 ** sum(vae.temporal_upsample)
  sf = vae.spatial_factor
  if t2v.num_frames < 1 or (t2v.num_frames - 1) % tf:
    raise InvalidRequestError(f"num_frames must be 1 + {tf}·k (1, {1 + tf}, ..., 81), got {t2v.num_frames}")
  mult = sf * max(dit.patch_size[1:])
  if t2v.height % mult or t2v.width % mult or t2v.height <= 0 or t2v.width <= 0:
    raise InvalidRequestError(f"height and width must be positive multiples of {mult}, got "
                              f"{t2v.height}x{t2v.width}")
  lt = (t2v.num_frames - 1) // tf + 1
  if lt % dit.patch_size[0]:
    raise InvalidRequestError(f"latent frames {lt} not a multiple of the temporal patch {dit.patch_size[0]}")
  return lt, t2v.height // sf, t2v.width // sf, dit.in_channels


def full_steps(num_steps: int, interval: int, warmup: int) -> list[bool]:
  """Which steps run every block (True) and which reuse the cached deep residual (False)."""
  if interval < 1:
    raise InvalidRequestError(f"cache_interval must be >= 1, got {interval}")
  return [interval == 1 or i < warmup or i == num_steps - 1 or (i - warmup) % interval == 0
          for i in range(num_steps)]


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "dtype", "guidance"))
def _full_step(params, x, t, ctx, *, cfg, attn_impl, dtype, guidance):
  v, cache = wan_dit.forward(params, *_cfg_batch(x, t, ctx, guidance), cfg, attn_impl=attn_impl,
                             dtype=dtype, return_cache=True)
  return _combine(v, guidance), cache


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl", "dtype", "guidance"))
def _cached_step(params, x, t, ctx, cache, *, cfg, attn_impl, dtype, guidance):
  v = wan_dit.forward(params, *_cfg_batch(x, t, ctx, guidance), cfg, attn_impl=attn_impl,
                      dtype=dtype, cache=cache)
  return _combine(v, guidance)


def _layerwise_step(params, x, t, ctx, cache, *, cfg, attn_impl, dtype, guidance):
  """A full step (cache None: also returns the new StepCache) or a cached one, one jitted block
  reused for every layer (wan_dit.forward_layerwise: no per-layer weight copy, one block compiled)."""
  out = wan_dit.forward_layerwise(params, *_cfg_batch(x, t, ctx, guidance), cfg, attn_impl=attn_impl,
                                  dtype=dtype, cache=cache, return_cache=cache is None)
  v, cache = out if cache is None else (out, cache)
  return _combine_jit(v, guidance), cache


def _cfg_batch(x, t, ctx, guidance):
  """ctx is [2, L, text_dim] (cond, uncond) with guidance, else [1, L, text_dim]."""
  n = ctx.shape[0]
  return jnp.broadcast_to(x, (n, *x.shape[1:])), jnp.full((n,), t, jnp.float32), ctx


def _combine(v, guidance):
  if v.shape[0] == 1:
    return v
  return v[1:] + guidance * (v[:1] - v[1:])


_combine_jit = jax.jit(_combine, static_argnums=1)


def denoise(params: wan_dit.Params, dit_cfg: wan_dit.WanDiTConfig, text: jax.Array,
            neg_text: jax.Array | None, latent_shape_: tuple[int, ...], t2v: T2VConfig, *,
            attn_impl: str = "xla", dtype=jnp.bfloat16, mesh=None, fsdp: bool = False) -> jax.Array:
  """Noise -> clean latents [1, T, h, w, C] (denoiser space) for one prompt.

  Blocks given as a list run layer by layer (``wan_dit.forward_layerwise``); stacked by
  ``wan_dit.stack_blocks`` they run in a lax.scan inside one jitted step (copies each layer's
  weights per step). With ``mesh`` (one axis named "sp") the DiT runs Ulysses sequence-parallel over
  it (sharding/ulysses.py; params placed with ``ulysses.shard_params``); no step cache then."""
  sched, timesteps = schedulers.make_scheduler(t2v.scheduler, t2v.num_steps, t2v.shift)
  guided = neg_text is not None and t2v.guidance_scale != 1.0
  ctx = jnp.concatenate([text, neg_text]) if guided else text
  g = float(t2v.guidance_scale) if guided else 1.0
  x = jax.random.normal(jax.random.key(t2v.seed), (1, *latent_shape_), jnp.float32)
  if mesh is not None:
    return _denoise_sp(params, dit_cfg, ctx, g, x, sched, timesteps, t2v, attn_impl, dtype, mesh, fsdp)
  cache = None
  kw = dict(cfg=dit_cfg, attn_impl=attn_impl, dtype=dtype, guidance=g)
  layerwise = isinstance(params["blocks"], (list, tuple))
  for i, (t, full) in enumerate(zip(timesteps, full_steps(t2v.num_steps, t2v.cache_interval,
                                                          t2v.cache_warmup))):
    if layerwise:
      v, cache = _layerwise_step(params, x, float(t), ctx, None if full else cache, **kw)
    elif full or cache is None:
      v, cache = _full_step(params, x, float(t), ctx, **kw)
    else:
      v = _cached_step(params, x, float(t), ctx, cache, **kw)
    x = sched.step(v, x, i)
  return x


def _denoise_sp(params, dit_cfg, ctx, g, x, sched, timesteps, t2v, attn_impl, dtype, mesh, fsdp):
  from sharding import ulysses  # pylint: disable=import-outside-toplevel
  if t2v.cache_interval != 1:
    raise InvalidRequestError("the step cache is not supported with sequence parallelism yet")

  @jax.jit
  def step(params, x, t, ctx):
    v = ulysses.forward(params, *_cfg_batch(x, t, ctx, g), dit_cfg, mesh, fsdp=fsdp,
                        attn_impl=attn_impl, dtype=dtype)
    return _combine(v, g)

  for i, t in enumerate(timesteps):
    x = sched.step(step(params, x, float(t), ctx), x, i)
  return x


def generate(dit_params: wan_dit.Params, dit_cfg: wan_dit.WanDiTConfig, vae_params: wan_vae.Params,
             vae_cfg: wan_vae.WanVAEConfig, text: jax.Array, neg_text: jax.Array | None,
             t2v: T2VConfig, *, attn_impl: str = "xla", dtype=jnp.bfloat16,
             vae_chunk: int | None = None, mesh=None, fsdp: bool = False) -> np.ndarray:
  """Prompt embeddings [1, L, text_dim] (and the negative prompt's) -> frames [T, H, W, 3] in [-1, 1].
  ``vae_chunk``: decode that many latent frames at a time (bounded memory) instead of all at once."""
  if text.ndim != 3 or text.shape[0] != 1:
    raise InvalidRequestError(f"text embeddings must be [1, L, text_dim], got {text.shape}")
  shape = latent_shape(t2v, dit_cfg, vae_cfg)
  latents = denoise(dit_params, dit_cfg, text, neg_text, shape, t2v, attn_impl=attn_impl, dtype=dtype,
                    mesh=mesh, fsdp=fsdp)
  if vae_chunk:
    frames = wan_vae.decode_raw_chunked(vae_params, wan_vae.denormalize(latents, vae_cfg), vae_cfg,
                                        chunk=vae_chunk)
  else:
    frames = jax.jit(wan_vae.decode, static_argnums=2)(vae_params, latents, vae_cfg)
  return np.asarray(frames[0])
