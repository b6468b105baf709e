"""Wan2.1 causal 3D VAE decoder (latents -> frames), channels-last [B, T, H, W, C].

Structure (diffusers ``AutoencoderKLWan`` decoder, dims = base·[4, 4, 4, 2, 1] for dim_mult [1, 2, 4, 4]):
    z -> post_quant 1³ conv -> conv_in 3³ -> mid (res, single-head spatial attention, res)
      -> up blocks (num_res_blocks+1 residual blocks each, then 2x upsampling: the first two also
         upsample time) -> RMS norm -> SiLU -> conv_out 3³ -> clamp to [-1, 1].
Every 3D conv is causal in time (2 zero frames in front, none behind). The reference decodes one latent
frame at a time with a cache of the last two frames per conv; that equals one causal conv over the
whole sequence, except that time upsampling leaves frame 0 alone and doubles only frames 1.. — so T
latent frames give 1 + 4(T-1) video frames. ``decode_raw`` runs the whole sequence at once;
``decode_raw_chunked`` carries each temporal conv's last input frames between chunks of latent frames
(same result, activation memory of one chunk: use it for 480p/720p × 81 frames).

Params are a flat dict keyed by the diffusers module names (``decoder.up_blocks.0.resnets.1.conv1``)
with conv kernels in [kt, kh, kw, in, out] layout; ``checkpoints/diffusers_wan.py`` converts them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ShapeError

Params = dict[str, Any]

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_upsample: tuple[bool, ...] = (True, True, False)   # reversed temperal_downsample
  out_channels: int = 3
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD

  @classmethod
  def from_diffusers(cls, cfg: dict) -> WanVAEConfig:
    from jaxinfer.errors import UnsupportedModelError  # pylint: disable=import-outside-toplevel
    if cfg.get("is_residual") or cfg.get("patch_size") or cfg.get("attn_scales"):
      raise UnsupportedModelError("only the Wan2.1 VAE (no residual blocks / patching / attn_scales)")
    base = cfg.get("decoder_base_dim") or cfg.get("base_dim", 96)
    return cls(base_dim=base, z_dim=cfg.get("z_dim", 16),
               dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
               num_res_blocks=cfg.get("num_res_blocks", 2),
               temporal_upsample=tuple(cfg.get("temperal_downsample", (False, True, True)))[::-1],
               out_channels=cfg.get("out_channels", 3),
               latents_mean=tuple(cfg.get("latents_mean", WAN21_LATENTS_MEAN)),
               latents_std=tuple(cfg.get("latents_std", WAN21_LATENTS_STD)))

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  def num_frames(self, latent_frames: int) -> int:
    return 1 + 2 ** sum(self.temporal_upsample) * (latent_frames - 1)


def _up_blocks(cfg: WanVAEConfig):
  """(in_dim, out_dim, upsample mode or None) of each up block."""
  dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
  out = []
  for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
    if i > 0:
      din //= 2
    mode = None
    if i != len(cfg.dim_mult) - 1:
      mode = "upsample3d" if cfg.temporal_upsample[i] else "upsample2d"
    out.append((din, dout, mode))
  return dims, out


def param_shapes(cfg: WanVAEConfig) -> dict[str, tuple[int, ...]]:
  """Every decoder weight's shape (conv kernels [kt, kh, kw, in, out] / [kh, kw, in, out])."""
  shapes: dict[str, tuple[int, ...]] = {}

  def conv3(name, i, o, k):
    shapes[f"{name}.weight"] = (k, k, k, i, o)
    shapes[f"{name}.bias"] = (o,)

  def res(name, i, o):
    shapes[f"{name}.norm1.gamma"] = (i,)
    conv3(f"{name}.conv1", i, o, 3)
    shapes[f"{name}.norm2.gamma"] = (o,)
    conv3(f"{name}.conv2", o, o, 3)
    if i != o:
      conv3(f"{name}.conv_shortcut", i, o, 1)

  dims, blocks = _up_blocks(cfg)
  conv3("post_quant_conv", cfg.z_dim, cfg.z_dim, 1)
  conv3("decoder.conv_in", cfg.z_dim, dims[0], 3)
  res("decoder.mid_block.resnets.0", dims[0], dims[0])
  res("decoder.mid_block.resnets.1", dims[0], dims[0])
  a = "decoder.mid_block.attentions.0"
  shapes |= {f"{a}.norm.gamma": (dims[0],), f"{a}.to_qkv.weight": (dims[0], 3 * dims[0]),
             f"{a}.to_qkv.bias": (3 * dims[0],), f"{a}.proj.weight": (dims[0], dims[0]),
             f"{a}.proj.bias": (dims[0],)}
  for b, (din, dout, mode) in enumerate(blocks):
    for r in range(cfg.num_res_blocks + 1):
      res(f"decoder.up_blocks.{b}.resnets.{r}", din if r == 0 else dout, dout)
    if mode:
      u = f"decoder.up_blocks.{b}.upsamplers.0"
      shapes[f"{u}.resample.1.weight"] = (3, 3, dout, dout // 2)
      shapes[f"{u}.resample.1.bias"] = (dout // 2,)
      if mode == "upsample3d":
        shapes[f"{u}.time_conv.weight"] = (3, 1, 1, dout, 2 * dout)
        shapes[f"{u}.time_conv.bias"] = (2 * dout,)
  shapes["decoder.norm_out.gamma"] = (dims[-1],)
  conv3("decoder.conv_out", dims[-1], cfg.out_channels, 3)
  return shapes


def init_params(cfg: WanVAEConfig, key: jax.Array, dtype=jnp.float32) -> Params:
  """Random weights (fan-in scaled kernels, unit gains) for tests and benchmarks."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  out = {}
  for name, s in param_shapes(cfg).items():
    if name.endswith("gamma"):
      out[name] = jnp.ones(s, dtype)
    elif name.endswith("bias"):
      out[name] = jnp.zeros(s, dtype)
    else:
      out[name] = jnp.asarray(rng.standard_normal(s, np.float32) / np.sqrt(np.prod(s[:-1])), dtype)
  return out


def _conv_time_valid(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  kh, kw = w.shape[1:3]
  x = jnp.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  y = jax.lax.conv_general_dilated(x, w.astype(x.dtype), (1, 1, 1), "VALID",
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                   preferred_element_type=jnp.float32)
  return (y + b.astype(jnp.float32)).astype(x.dtype)


def causal_conv3d(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """x [B, T, H, W, I], w [kt, kh, kw, I, O]: zero pad kt-1 frames in front, (k-1)/2 spatially."""
  x = jnp.pad(x, ((0, 0), (w.shape[0] - 1, 0), (0, 0), (0, 0), (0, 0)))
  return _conv_time_valid(x, w, b)


class _TimeCache:
  """The last kt-1 input frames of every temporal conv, in call order, carried between chunks of
  latent frames (None: the first chunk, zeros — the causal padding)."""

  def __init__(self, old: list[jax.Array] | None):
    self.old, self.new = old, []

  def _prev(self, x, n):
    if self.old is None:
      return jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
    return self.old[len(self.new)].astype(x.dtype)

  def conv(self, x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    kt = w.shape[0]
    if kt == 1:
      return _conv_time_valid(x, w, b)
    xx = jnp.concatenate([self._prev(x, kt - 1), x], axis=1)
    self.new.append(xx[:, -(kt - 1):])
    return _conv_time_valid(xx, w, b)

  def skip(self, x: jax.Array, n: int) -> None:
    """A conv that sees no frames this chunk: its cache passes through."""
    self.new.append(self._prev(x, n))


def _rms_norm(x: jax.Array, gamma: jax.Array) -> jax.Array:
  """F.normalize over channels (eps 1e-12) · √C · γ, in float32."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
  out = x32 / jnp.maximum(norm, 1e-12) * np.sqrt(x.shape[-1]) * gamma.astype(jnp.float32)
  return out.astype(x.dtype)


def _resblock(p: Params, name: str, x: jax.Array, tc: _TimeCache) -> jax.Array:
  h = tc.conv(x, p[f"{name}.conv_shortcut.weight"], p[f"{name}.conv_shortcut.bias"]) \
      if f"{name}.conv_shortcut.weight" in p else x
  x = jax.nn.silu(_rms_norm(x, p[f"{name}.norm1.gamma"]))
  x = tc.conv(x, p[f"{name}.conv1.weight"], p[f"{name}.conv1.bias"])
  x = jax.nn.silu(_rms_norm(x, p[f"{name}.norm2.gamma"]))
  x = tc.conv(x, p[f"{name}.conv2.weight"], p[f"{name}.conv2.bias"])
  return x + h


def _spatial_attention(p: Params, name: str, x: jax.Array) -> jax.Array:
  """Single-head attention among the pixels of each frame."""
  B, T, H, W, C = x.shape
  h = _rms_norm(x, p[f"{name}.norm.gamma"]).reshape(B * T, H * W, C)
  qkv = jnp.einsum("bsc,cd->bsd", h, p[f"{name}.to_qkv.weight"].astype(x.dtype)) + \
      p[f"{name}.to_qkv.bias"].astype(x.dtype)
  q, k, v = (a[:, :, None] for a in jnp.split(qkv, 3, axis=-1))
  o = jax.nn.dot_product_attention(q, k, v)[:, :, 0]
  o = jnp.einsum("bsc,cd->bsd", o, p[f"{name}.proj.weight"].astype(x.dtype)) + \
      p[f"{name}.proj.bias"].astype(x.dtype)
  return x + o.reshape(B, T, H, W, C)


def _upsample(p: Params, name: str, x: jax.Array, mode: str, tc: _TimeCache, first: bool
              ) -> jax.Array:
  """2x spatial; upsample3d also doubles time, except frame 0 of the video (``first`` chunk)."""
  B, T, H, W, C = x.shape
  if mode == "upsample3d":
    keep, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
    if rest.shape[1] == 0:
      tc.skip(x, 2)
    else:
      y = tc.conv(rest, p[f"{name}.time_conv.weight"], p[f"{name}.time_conv.bias"])
      n = rest.shape[1]
      y = y.reshape(B, n, H, W, 2, C).transpose(0, 1, 4, 2, 3, 5)   # channel halves -> 2 frames
      x = jnp.concatenate([keep, y.reshape(B, 2 * n, H, W, C)], axis=1)
  x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
  w = p[f"{name}.resample.1.weight"][None]                       # [1, 3, 3, C, C/2]
  return _conv_time_valid(x, w, p[f"{name}.resample.1.bias"])


def decode_chunk(params: Params, z: jax.Array, cfg: WanVAEConfig, caches: list | None, first: bool
                 ) -> tuple[jax.Array, list]:
  """Decodes latent frames z that follow the ones ``caches`` came from (None and ``first``: the
  video's start). Returns the chunk's frames (unclamped) and the caches for the next chunk."""
  if z.ndim != 5 or z.shape[-1] != cfg.z_dim:
    raise ShapeError(f"latents must be [B, T, H, W, {cfg.z_dim}], got {z.shape}")
  p, tc = params, _TimeCache(caches)
  x = tc.conv(z, p["post_quant_conv.weight"], p["post_quant_conv.bias"])
  x = tc.conv(x, p["decoder.conv_in.weight"], p["decoder.conv_in.bias"])
  x = _resblock(p, "decoder.mid_block.resnets.0", x, tc)
  x = _spatial_attention(p, "decoder.mid_block.attentions.0", x)
  x = _resblock(p, "decoder.mid_block.resnets.1", x, tc)
  _, blocks = _up_blocks(cfg)
  for b, (_, _, mode) in enumerate(blocks):
    for r in range(cfg.num_res_blocks + 1):
      x = _resblock(p, f"decoder.up_blocks.{b}.resnets.{r}", x, tc)
    if mode:
      x = _upsample(p, f"decoder.up_blocks.{b}.upsamplers.0", x, mode, tc, first)
  x = jax.nn.silu(_rms_norm(x, p["decoder.norm_out.gamma"]))
  x = tc.conv(x, p["decoder.conv_out.weight"], p["decoder.conv_out.bias"])
  return x, tc.new


def decode_raw(params: Params, z: jax.Array, cfg: WanVAEConfig) -> jax.Array:
  """Unnormalized latents z [B, T, h, w, z_dim] -> frames [B, 1+4(T-1), 8h, 8w, 3] in [-1, 1]."""
  x, _ = decode_chunk(params, z, cfg, None, True)
  return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


_decode_chunk_jit = jax.jit(decode_chunk, static_argnames=("cfg", "first"))


def decode_raw_chunked(params: Params, z: jax.Array, cfg: WanVAEConfig, chunk: int = 1) -> jax.Array:
  """``decode_raw`` over ``chunk`` latent frames at a time (frame 0 alone first, as the reference):
  the same result with activation memory for 4·chunk video frames instead of the whole video."""
  outs, caches = [], None
  starts = [0, 1] + list(range(1 + chunk, z.shape[1], chunk))
  for i, s in enumerate(starts):
    if s >= z.shape[1]:
      break
    e = starts[i + 1] if i + 1 < len(starts) else z.shape[1]
    x, caches = _decode_chunk_jit(params, z[:, s:e], cfg=cfg, caches=caches, first=(s == 0))
    outs.append(x)
  return jnp.clip(jnp.concatenate(outs, axis=1).astype(jnp.float32), -1.0, 1.0)


def denormalize(latents: jax.Array, cfg: WanVAEConfig) -> jax.Array:
  """Denoiser-space latents -> VAE latents: z = latents·std + mean."""
  mean = jnp.asarray(cfg.latents_mean, jnp.float32)
  std = jnp.asarray(cfg.latents_std, jnp.float32)
  return (latents.astype(jnp.float32) * std + mean).astype(latents.dtype)


def decode(params: Params, latents: jax.Array, cfg: WanVAEConfig) -> jax.Array:
  """Normalized (denoiser-space) latents -> frames in [-1, 1]."""
  return decode_raw(params, denormalize(latents, cfg), cfg)
