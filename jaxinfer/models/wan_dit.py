"""Wan2.1-style video DiT denoiser as pure functions of (params, latents, timestep, text).

Layout: latents are channels-last ``[B, F, H, W, C]`` (diffusers uses ``[B, C, F, H, W]``); the
patchified token sequence is ``[B, S, D]`` with tokens in (frame, row, column) order, S = F'·H'·W'.

Per block, with h the token stream and (shift, scale, gate) × 2 from the time embedding (AdaLN):
    a = LN(h)·(1+scale₁)+shift₁ ;  h = h + gate₁ · SelfAttn(RoPE3D(RMS(a Wq)), RoPE3D(RMS(a Wk)), a Wv) Wo
    h = h + CrossAttn(LN_affine(h) Wq, text Wk, text Wv) Wo
    m = LN(h)·(1+scale₂)+shift₂ ;  h = h + gate₂ · GELU_tanh(m W1) W2
The modulation, the three LayerNorms and the residual adds run in float32 as in the reference.

Weights are stored [in, out] and every matmul goes through ``jaxinfer.ops.linear`` so quantized weight
types drop in; attention goes through ``attention`` below (one dispatch point). Matches diffusers'
``WanTransformer3DModel`` (see tests/test_wan_dit.py and tests/goldens/wan/).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ShapeError, UnsupportedModelError
from jaxinfer.ops import linear

Params = dict[str, Any]
AttentionFn = Callable[..., jax.Array]   # fn(q, k, v) or, for blocks with "attn_quant", fn(q, k, v, quant=)


@dataclasses.dataclass(frozen=True)
class WanDiTConfig:
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_heads: int = 12
  head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 8960
  num_layers: int = 30
  cross_attn_norm: bool = True
  eps: float = 1e-6
  rope_max_seq_len: int = 1024
  rope_theta: float = 10000.0

  @property
  def dim(self) -> int:
    return self.num_heads * self.head_dim

  @classmethod
  def wan21_1_3b(cls) -> WanDiTConfig:
    return cls(num_heads=12, ffn_dim=8960, num_layers=30)

  @classmethod
  def wan21_14b(cls) -> WanDiTConfig:
    return cls(num_heads=40, ffn_dim=13824, num_layers=40)

  @classmethod
  def from_diffusers(cls, cfg: dict) -> WanDiTConfig:
    """From a diffusers ``transformer/config.json`` of a WanTransformer3DModel (text-to-video)."""
    if cfg.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
      raise UnsupportedModelError(f"unsupported class {cfg.get('_class_name')}")
    if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
      raise UnsupportedModelError("image-to-video Wan (image_dim / added_kv_proj_dim) is not implemented")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
      raise UnsupportedModelError(f"unsupported qk_norm {cfg.get('qk_norm')}")
    return cls(patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
               num_heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
               in_channels=cfg["in_channels"], out_channels=cfg.get("out_channels") or cfg["in_channels"],
               text_dim=cfg["text_dim"], freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn_dim"],
               num_layers=cfg["num_layers"], cross_attn_norm=cfg.get("cross_attn_norm", True),
               eps=cfg.get("eps", 1e-6), rope_max_seq_len=cfg.get("rope_max_seq_len", 1024))


def param_shapes(cfg: WanDiTConfig) -> Params:
  D, P = cfg.dim, math.prod(cfg.patch_size)
  attn = {"wq": (D, D), "bq": (D,), "wk": (D, D), "bk": (D,), "wv": (D, D), "bv": (D,),
          "wo": (D, D), "bo": (D,), "norm_q": (D,), "norm_k": (D,)}
  block = {"modulation": (6, D), "self_attn": dict(attn), "cross_attn": dict(attn),
           "ffn_w1": (D, cfg.ffn_dim), "ffn_b1": (cfg.ffn_dim,), "ffn_w2": (cfg.ffn_dim, D),
           "ffn_b2": (D,)}
  if cfg.cross_attn_norm:
    block |= {"norm2_w": (D,), "norm2_b": (D,)}
  return {
      "patch_w": (P * cfg.in_channels, D), "patch_b": (D,),
      "time_w1": (cfg.freq_dim, D), "time_b1": (D,), "time_w2": (D, D), "time_b2": (D,),
      "time_proj_w": (D, 6 * D), "time_proj_b": (6 * D,),
      "text_w1": (cfg.text_dim, D), "text_b1": (D,), "text_w2": (D, D), "text_b2": (D,),
      "blocks": [dict(block, self_attn=dict(attn), cross_attn=dict(attn))
                 for _ in range(cfg.num_layers)],
      "out_modulation": (2, D), "proj_out_w": (D, P * cfg.out_channels),
      "proj_out_b": (P * cfg.out_channels,),
  }


_ONE_INIT = ("norm_q", "norm_k", "norm2_w")


def _init_leaf(name: str, shape: tuple[int, ...], normal, xp=np):
  if name in _ONE_INIT:
    return xp.ones(shape, xp.float32)
  if name in ("modulation", "out_modulation"):
    return normal(shape) / math.sqrt(shape[-1])
  if len(shape) == 1:
    return 0.02 * normal(shape)
  return normal(shape) / math.sqrt(shape[0])


def init_params(cfg: WanDiTConfig, key: jax.Array, dtype=jnp.bfloat16) -> Params:
  """Random weights for tests: N(0, 1/fan_in) matrices, small biases, unit norm gains. Drawn on the
  host with NumPy (seeded from ``key``): one eager jax.random call per shape compiles too much on CPU."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  normal = lambda s: rng.standard_normal(s, dtype=np.float32)
  shapes = param_shapes(cfg)
  paths, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
  out = [jnp.asarray(_init_leaf(str(path[-1].key), shape, normal), dtype) for path, shape in paths]
  return jax.tree.unflatten(treedef, out)


def init_params_on_device(cfg: WanDiTConfig, key: jax.Array, dtype=jnp.bfloat16) -> Params:
  """The same distribution drawn on the default device, one compiled draw for all blocks: for
  benchmarks of the full-size shapes, where host generation and transfer would dominate."""
  shapes = param_shapes(cfg)

  def drawer(tree_shapes):
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree_shapes,
                                                          is_leaf=lambda s: isinstance(s, tuple))

    def draw(k):
      keys = jax.random.split(k, len(paths))
      leaves = [_init_leaf(str(path[-1].key), shape,
                           lambda s, kk=kk: jax.random.normal(kk, s, jnp.float32),
                           xp=jnp).astype(dtype) for kk, (path, shape) in zip(keys, paths)]
      return jax.tree.unflatten(treedef, leaves)
    return jax.jit(draw)

  keys = jax.random.split(key, cfg.num_layers + 1)
  out = drawer({k: v for k, v in shapes.items() if k != "blocks"})(keys[0])
  draw_block = drawer(shapes["blocks"][0])
  out["blocks"] = [draw_block(keys[i + 1]) for i in range(cfg.num_layers)]
  return out


# ----------------------------------------------------------------------------------------------
# Attention dispatch

def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla", quant=None) -> jax.Array:
  """Non-causal multi-head attention, q [B, Sq, N, Dh], k/v [B, Sk, N, Dh] -> [B, Sq, N, Dh].

  ``impl``: "xla" (jax.nn.dot_product_attention, lets XLA pick) or "cudnn" (cuDNN flash attention).
  ``quant``: a quantized attention carried by the block params (``attn_quant``, e.g.
  jaxinfer.video.low_precision.FP8Attention with calibrated scales); when given it runs instead.
  kernels/flash_attention.py is causal-only (ragged LLM prefill), so it is not wired here yet.
  """
  if quant is not None:
    return quant(q, k, v)
  if impl == "xla":
    return jax.nn.dot_product_attention(q, k, v)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  raise UnsupportedModelError(f"unknown attention impl {impl!r}")


# ----------------------------------------------------------------------------------------------
# Embeddings

def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [B, dim] as cat(cos, sin) (diffusers Timesteps, flip_sin_to_cos=True)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_3d(cfg: WanDiTConfig, grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
  """cos/sin [S, head_dim/2] for tokens of a (F', H', W') grid, computed on the host in float64.

  The head dim splits into frame / row / column parts (t = Dh - 2·2⌊Dh/6⌋, h = w = 2⌊Dh/6⌋); each part
  rotates adjacent channel pairs (2i, 2i+1) by position · θ^(-2i/part).
  """
  f, h, w = grid
  if max(grid) > cfg.rope_max_seq_len:
    raise ShapeError(f"latent grid {grid} exceeds rope_max_seq_len {cfg.rope_max_seq_len}")
  hd = wd = 2 * (cfg.head_dim // 6)
  td = cfg.head_dim - hd - wd
  parts = []
  for size, n, axis in ((td, f, 0), (hd, h, 1), (wd, w, 2)):
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, size, 2, dtype=np.float64)[: size // 2] / size)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None]          # [n, size/2]
    shape = [1, 1, 1, size // 2]
    shape[axis] = n
    parts.append(np.broadcast_to(ang.reshape(shape), (f, h, w, size // 2)))
  ang = np.concatenate(parts, axis=-1).reshape(f * h * w, cfg.head_dim // 2)
  return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Interleaved-pair RoPE on x [B, S, N, Dh] with cos/sin [S, Dh/2], in float32."""
  x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x1, x2 = x32[..., 0], x32[..., 1]
  c, s = cos[None, :, None], sin[None, :, None]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def _layer_norm(x: jax.Array, eps: float, weight=None, bias=None) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mu = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
  out = (x32 - mu) * jax.lax.rsqrt(var + eps)
  if weight is not None:
    out = out * weight.astype(jnp.float32) + bias.astype(jnp.float32)
  return out


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  out = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (out * weight.astype(jnp.float32)).astype(x.dtype)


def _dense(x, w, b):
  return linear(x, w) + b.astype(x.dtype)


def patchify(latents: jax.Array, cfg: WanDiTConfig) -> tuple[jax.Array, tuple[int, int, int]]:
  """[B, F, H, W, C] -> patches [B, S, pt·ph·pw·C] (patch-major, channel-minor) and the grid."""
  B, F, H, W, C = latents.shape
  pt, ph, pw = cfg.patch_size
  if C != cfg.in_channels:
    raise ShapeError(f"latents have {C} channels, the model takes {cfg.in_channels}")
  if F % pt or H % ph or W % pw:
    raise ShapeError(f"latent frames/height/width {(F, H, W)} must be multiples of the patch size "
                     f"{cfg.patch_size}")
  grid = (F // pt, H // ph, W // pw)
  x = latents.reshape(B, grid[0], pt, grid[1], ph, grid[2], pw, C)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(B, math.prod(grid), pt * ph * pw * C), grid


def unpatchify(tokens: jax.Array, grid: tuple[int, int, int], cfg: WanDiTConfig) -> jax.Array:
  """[B, S, pt·ph·pw·C_out] -> [B, F, H, W, C_out]."""
  B = tokens.shape[0]
  pt, ph, pw = cfg.patch_size
  x = tokens.reshape(B, *grid, pt, ph, pw, cfg.out_channels)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(B, grid[0] * pt, grid[1] * ph, grid[2] * pw, cfg.out_channels)


def condition(params: Params, timestep: jax.Array, text: jax.Array, cfg: WanDiTConfig, dtype):
  """Time embedding temb [B, D] (f32), its 6-way projection [B, 6, D] (f32), text tokens [B, L, D]."""
  t = timestep_embedding(timestep, cfg.freq_dim)
  temb = _dense(jax.nn.silu(_dense(t, params["time_w1"], params["time_b1"])),
                params["time_w2"], params["time_b2"])
  temb = temb.astype(dtype).astype(jnp.float32)
  tproj = _dense(jax.nn.silu(temb), params["time_proj_w"], params["time_proj_b"])
  tproj = tproj.astype(dtype).astype(jnp.float32).reshape(-1, 6, cfg.dim)
  ctx = text.astype(dtype)
  ctx = _dense(jax.nn.gelu(_dense(ctx, params["text_w1"], params["text_b1"]), approximate=True),
               params["text_w2"], params["text_b2"])
  return temb, tproj, ctx


def _attention_layer(p: Params, x, ctx, cos, sin, cfg: WanDiTConfig, attn_fn: AttentionFn):
  """Self- (ctx None) or cross-attention. Projections may be fused (``fuse_projections``): "wqkv"
  [D, 3D] for self-attention, "wkv" [D, 2D] for the cross-attention's text keys/values; one GEMM
  then reads (and a quantized weight quantizes) the shared input once."""
  B, S, _ = x.shape
  N, Dh = cfg.num_heads, cfg.head_dim
  kv_in = x if ctx is None else ctx
  if "wqkv" in p:
    q, k, v = jnp.split(_dense(x, p["wqkv"], p["bqkv"]), 3, axis=-1)
  else:
    q = _dense(x, p["wq"], p["bq"])
    if "wkv" in p:
      k, v = jnp.split(_dense(kv_in, p["wkv"], p["bkv"]), 2, axis=-1)
    else:
      k, v = _dense(kv_in, p["wk"], p["bk"]), _dense(kv_in, p["wv"], p["bv"])
  q = _rms_norm(q, p["norm_q"], cfg.eps).reshape(B, S, N, Dh)
  k = _rms_norm(k, p["norm_k"], cfg.eps).reshape(B, -1, N, Dh)
  v = v.reshape(B, -1, N, Dh)
  if cos is not None:
    q, k = apply_rope_pairs(q, cos, sin), apply_rope_pairs(k, cos, sin)
  quant = p.get("attn_quant")
  o = attn_fn(q, k, v) if quant is None else attn_fn(q, k, v, quant=quant)
  o = o.astype(x.dtype).reshape(B, S, N * Dh)
  return _dense(o, p["wo"], p["bo"])


def fuse_projections(block: Params) -> Params:
  """Block params with self-attention q/k/v fused into "wqkv" [D, 3D] (+ "bqkv") and the
  cross-attention's k/v into "wkv" [D, 2D] (+ "bkv"): same math, one GEMM per shared input."""
  sa, ca = dict(block["self_attn"]), dict(block["cross_attn"])
  if "wqkv" not in sa:
    sa["wqkv"] = jnp.concatenate([sa.pop("wq"), sa.pop("wk"), sa.pop("wv")], axis=1)
    sa["bqkv"] = jnp.concatenate([sa.pop("bq"), sa.pop("bk"), sa.pop("bv")])
  if "wkv" not in ca:
    ca["wkv"] = jnp.concatenate([ca.pop("wk"), ca.pop("wv")], axis=1)
    ca["bkv"] = jnp.concatenate([ca.pop("bk"), ca.pop("bv")])
  return dict(block, self_attn=sa, cross_attn=ca)


def block_forward(p: Params, x: jax.Array, ctx: jax.Array, tproj: jax.Array, cos, sin,
                  cfg: WanDiTConfig, self_attn_fn: AttentionFn, cross_attn_fn: AttentionFn):
  """One transformer block on tokens x [B, S, D]; tproj [B, 6, D] float32."""
  mod = p["modulation"].astype(jnp.float32)[None] + tproj                  # [B, 6, D]
  shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i, None] for i in range(6))
  dtype = x.dtype
  a = (_layer_norm(x, cfg.eps) * (1 + scale1) + shift1).astype(dtype)
  x = (x.astype(jnp.float32) + _attention_layer(p["self_attn"], a, None, cos, sin, cfg, self_attn_fn)
       * gate1).astype(dtype)
  c = (_layer_norm(x, cfg.eps, p["norm2_w"], p["norm2_b"]) if cfg.cross_attn_norm
       else x).astype(dtype)
  x = x + _attention_layer(p["cross_attn"], c, ctx, None, None, cfg, cross_attn_fn)
  m = (_layer_norm(x, cfg.eps) * (1 + scale2) + shift2).astype(dtype)
  ff = _dense(jax.nn.gelu(_dense(m, p["ffn_w1"], p["ffn_b1"]), approximate=True),
              p["ffn_w2"], p["ffn_b2"])
  return (x.astype(jnp.float32) + ff.astype(jnp.float32) * gate2).astype(dtype)


def head(params: Params, x: jax.Array, temb: jax.Array, cfg: WanDiTConfig) -> jax.Array:
  """Final AdaLN + projection to patch values [B, S, pt·ph·pw·C_out]."""
  mod = params["out_modulation"].astype(jnp.float32)[None] + temb[:, None]
  shift, scale = mod[:, 0, None], mod[:, 1, None]
  x = (_layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(x.dtype)
  return _dense(x, params["proj_out_w"], params["proj_out_b"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepCache:
  """First-block cache: the residual the blocks after the first added on the last full step."""
  residual: jax.Array        # [B, S, D]


def embed(params: Params, latents: jax.Array, timestep: jax.Array, text: jax.Array,
          cfg: WanDiTConfig, dtype=jnp.bfloat16):
  """Everything before the blocks: tokens [B, S, D], temb, tproj, text ctx, grid, rope cos/sin."""
  patches, grid = patchify(latents.astype(dtype), cfg)
  x = _dense(patches, params["patch_w"], params["patch_b"])
  temb, tproj, ctx = condition(params, timestep, text, cfg, dtype)
  cos, sin = rope_3d(cfg, grid)
  return x, temb, tproj, ctx, grid, jnp.asarray(cos), jnp.asarray(sin)


def stack_blocks(params: Params) -> Params:
  """``params`` with "blocks" as one pytree of [L, ...] leaves: blocks_forward then runs them in a
  lax.scan, so a full forward compiles one block instead of L (quantized weight types stack too).

  Cost: XLA slices each layer's weights out of the stack with a dynamic-slice that it materializes
  (a copy of every weight per layer per call; tests/test_wan_dit.py finds them in the compiled HLO).
  ``forward_layerwise`` compiles one block too, without the copies."""
  blocks = params["blocks"]
  if not isinstance(blocks, (list, tuple)):
    return params
  return dict(params, blocks=jax.tree.map(lambda *a: jnp.stack(a), *blocks))


def blocks_forward(params: Params, x, ctx, tproj, cos, sin, cfg: WanDiTConfig, *,
                   self_attn_fn: AttentionFn, cross_attn_fn: AttentionFn,
                   cache: StepCache | None = None, layer_hook=None):
  """Runs the blocks (a list, or stacked by ``stack_blocks``: then a lax.scan over blocks 1..).
  With ``cache`` only block 0 runs and the cached deeper residual is added.

  Returns (tokens, residual of blocks 1.. for a new StepCache). ``layer_hook(p)`` maps each block's
  params before use (the FSDP all-gather under sequence parallelism)."""
  hook = layer_hook or (lambda p: p)
  blocks = params["blocks"]
  stacked = not isinstance(blocks, (list, tuple))
  run = lambda p, x: block_forward(hook(p), x, ctx, tproj, cos, sin, cfg, self_attn_fn, cross_attn_fn)
  x = run(jax.tree.map(lambda a: a[0], blocks) if stacked else blocks[0], x)
  if cache is not None:
    return (x.astype(jnp.float32) + cache.residual).astype(x.dtype), cache.residual
  first = x
  if stacked:
    def body(x, i):
      return run(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                              blocks), x), None
    x, _ = jax.lax.scan(body, x, jnp.arange(1, jax.tree.leaves(blocks)[0].shape[0]))
  else:
    for p in blocks[1:]:
      x = run(p, x)
  return x, x.astype(jnp.float32) - first.astype(jnp.float32)


def forward(params: Params, latents: jax.Array, timestep: jax.Array, text: jax.Array,
            cfg: WanDiTConfig, *, attn_impl: str | AttentionFn = "xla", dtype=jnp.bfloat16,
            cache: StepCache | None = None, return_cache: bool = False):
  """Flow velocity [B, F, H, W, C_out] for latents [B, F, H, W, C_in], timestep [B] (0..1000) and
  text embeddings [B, L, text_dim]. With ``return_cache`` also returns a StepCache for later steps.
  ``attn_impl``: a name for ``attention`` or an AttentionFn; blocks carrying "attn_quant" run that."""
  if text.ndim != 3 or text.shape[-1] != cfg.text_dim:
    raise ShapeError(f"text embeddings must be [B, L, {cfg.text_dim}], got {text.shape}")
  if timestep.shape != (latents.shape[0],):
    raise ShapeError(f"timestep must be [B={latents.shape[0]}], got {timestep.shape}")
  x, temb, tproj, ctx, grid, cos, sin = embed(params, latents, timestep, text, cfg, dtype)
  attn_fn = attn_impl if callable(attn_impl) else (
      lambda q, k, v, quant=None: attention(q, k, v, attn_impl, quant))
  x, residual = blocks_forward(params, x, ctx, tproj, cos, sin, cfg, self_attn_fn=attn_fn,
                               cross_attn_fn=attn_fn, cache=cache)
  out = unpatchify(head(params, x, temb, cfg), grid, cfg).astype(jnp.float32)
  return (out, StepCache(residual)) if return_cache else out


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _embed_jit(top: Params, latents, timestep, text, *, cfg: WanDiTConfig, dtype):
  x, temb, tproj, ctx, _, cos, sin = embed(top, latents, timestep, text, cfg, dtype)
  return x, temb, tproj, ctx, cos, sin


@functools.partial(jax.jit, static_argnames=("cfg", "attn_impl"))
def block_jit(p: Params, x, ctx, tproj, cos, sin, *, cfg: WanDiTConfig, attn_impl):
  """One block as its own executable: every layer's weights are this call's arguments (no slicing)."""
  attn_fn = attn_impl if callable(attn_impl) else (
      lambda q, k, v, quant=None: attention(q, k, v, attn_impl, quant))
  return block_forward(p, x, ctx, tproj, cos, sin, cfg, attn_fn, attn_fn)


@functools.partial(jax.jit, static_argnames=("cfg", "grid"))
def _head_jit(top: Params, x, temb, *, cfg: WanDiTConfig, grid):
  return unpatchify(head(top, x, temb, cfg), grid, cfg).astype(jnp.float32)


@jax.jit
def _residual(x, first):
  return x.astype(jnp.float32) - first.astype(jnp.float32)


@jax.jit
def _add_residual(x, residual):
  return (x.astype(jnp.float32) + residual).astype(x.dtype)


def forward_layerwise(params: Params, latents: jax.Array, timestep: jax.Array, text: jax.Array,
                      cfg: WanDiTConfig, *, attn_impl: str | AttentionFn = "xla", dtype=jnp.bfloat16,
                      cache: StepCache | None = None, return_cache: bool = False):
  """``forward`` for a blocks list, not traced as a whole: embedding, each block and the head are
  separate calls of jitted functions (call it outside jit). Every block reuses one compiled block
  (``block_jit``) on its own weight arrays, so unlike a lax.scan over stacked blocks no layer's
  weights are sliced / copied, and unlike one jitted forward over the list only one block compiles.
  The price is a dispatch per block (tens of µs, overlapped with the previous block's kernels)."""
  blocks = params["blocks"]
  if not isinstance(blocks, (list, tuple)):
    raise ShapeError("forward_layerwise takes params with a list of blocks (not stack_blocks')")
  if text.ndim != 3 or text.shape[-1] != cfg.text_dim:
    raise ShapeError(f"text embeddings must be [B, L, {cfg.text_dim}], got {text.shape}")
  if timestep.shape != (latents.shape[0],):
    raise ShapeError(f"timestep must be [B={latents.shape[0]}], got {timestep.shape}")
  top = {k: v for k, v in params.items() if k != "blocks"}
  grid = tuple(int(n) // p for n, p in zip(latents.shape[1:4], cfg.patch_size))
  x, temb, tproj, ctx, cos, sin = _embed_jit(top, latents, timestep, text, cfg=cfg, dtype=dtype)
  run = lambda p, x: block_jit(p, x, ctx, tproj, cos, sin, cfg=cfg, attn_impl=attn_impl)
  x = run(blocks[0], x)
  if cache is not None:
    x, residual = _add_residual(x, cache.residual), cache.residual
  else:
    first = x
    for p in blocks[1:]:
      x = run(p, x)
    residual = _residual(x, first) if return_cache else None
  out = _head_jit(top, x, temb, cfg=cfg, grid=grid)
  return (out, StepCache(residual)) if return_cache else out


def step_flops(cfg: WanDiTConfig, seq_len: int, text_len: int = 512, batch: int = 1) -> dict[str, float]:
  """Matmul FLOPs of one forward, split into linear layers and attention (QKᵀ + PV)."""
  D, L = cfg.dim, cfg.num_layers
  per_tok = 2 * (4 * D * D + 2 * D * D + 2 * D * cfg.ffn_dim)   # self qkvo, cross q+o, ffn
  gemm = batch * L * (seq_len * per_tok + text_len * 2 * 2 * D * D)
  attn = batch * L * (4 * seq_len * seq_len * D + 4 * seq_len * text_len * D)
  return {"gemm": float(gemm), "attention": float(attn)}
