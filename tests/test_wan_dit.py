"""Wan DiT vs diffusers' WanTransformer3DModel (golden from tests/goldens/wan/make_goldens.py)."""
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from checkpoints import diffusers_wan
from jaxinfer.errors import CheckpointError, ShapeError
from jaxinfer.models import wan_dit

GOLDEN = Path(__file__).parent / "goldens" / "wan" / "dit.npz"
_forward = jax.jit(wan_dit.forward, static_argnums=4, static_argnames=("dtype", "return_cache"))


def _golden():
  z = np.load(GOLDEN)
  cfg = {k[len("config/"):]: z[k].tolist() for k in z.files if k.startswith("config/")}
  state = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
  return z, cfg, state


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_matches_diffusers_float32(tmp_path):
  z, hf_cfg, state = _golden()
  # Round-trip through a diffusers-layout folder so the streamed loader is what gets tested.
  folder = tmp_path / "transformer"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(
      {"_class_name": "WanTransformer3DModel", "qk_norm": "rms_norm_across_heads", **hf_cfg}))
  names = sorted(state)
  save_file({n: state[n] for n in names[: len(names) // 2]}, folder / "a.safetensors")
  save_file({n: state[n] for n in names[len(names) // 2:]}, folder / "b.safetensors")
  cfg, params = diffusers_wan.load_dit(tmp_path, dtype=jnp.float32)
  assert cfg.num_layers == 2 and cfg.head_dim == 12
  latents = jnp.asarray(z["hidden_states"].transpose(0, 2, 3, 4, 1))      # -> [B, F, H, W, C]
  out = _forward(params, latents, jnp.asarray(z["timestep"]), jnp.asarray(z["encoder_hidden_states"]),
                        cfg, dtype=jnp.float32)
  ref = z["output"].transpose(0, 2, 3, 4, 1)
  assert np.isfinite(np.asarray(out)).all()
  assert _rel(out, ref) < 2e-5, _rel(out, ref)


def test_bf16_close_to_float32():
  z, hf_cfg, state = _golden()
  cfg = wan_dit.WanDiTConfig.from_diffusers(hf_cfg)
  params = diffusers_wan.convert_dit(state.__getitem__, cfg, jnp.bfloat16)
  latents = jnp.asarray(z["hidden_states"].transpose(0, 2, 3, 4, 1))
  out = _forward(params, latents, jnp.asarray(z["timestep"]), jnp.asarray(z["encoder_hidden_states"]),
                        cfg, dtype=jnp.bfloat16)
  assert _rel(out, z["output"].transpose(0, 2, 3, 4, 1)) < 3e-2


def test_step_cache_reuses_deep_residual():
  """With a cache from the same inputs, the cached step equals the full step."""
  cfg = wan_dit.WanDiTConfig(num_heads=2, head_dim=12, in_channels=4, out_channels=4, text_dim=8,
                             freq_dim=8, ffn_dim=16, num_layers=3)
  params = wan_dit.init_params(cfg, jax.random.key(0), jnp.float32)
  k1, k2 = jax.random.split(jax.random.key(1))
  lat = jax.random.normal(k1, (1, 2, 4, 4, 4))
  text = jax.random.normal(k2, (1, 3, 8))
  t = jnp.array([500.0])
  full, cache = _forward(params, lat, t, text, cfg, dtype=jnp.float32, return_cache=True)
  cached = _forward(params, lat, t, text, cfg, dtype=jnp.float32, cache=cache)
  assert _rel(cached, full) < 1e-5
  other = _forward(params, lat, jnp.array([100.0]), text, cfg, dtype=jnp.float32, cache=cache)
  assert _rel(other, full) > 1e-3      # the cache does not make the step ignore its inputs


def test_bad_shapes_fail_clearly():
  cfg = wan_dit.WanDiTConfig(num_heads=2, head_dim=12, in_channels=4, out_channels=4, text_dim=8,
                             freq_dim=8, ffn_dim=16, num_layers=1)
  params = wan_dit.init_params(cfg, jax.random.key(0), jnp.float32)
  text = jnp.ones((1, 3, 8))
  with pytest.raises(ShapeError, match="multiples of the patch size"):
    wan_dit.forward(params, jnp.ones((1, 2, 5, 4, 4)), jnp.array([1.0]), text, cfg)
  with pytest.raises(ShapeError, match="channels"):
    wan_dit.forward(params, jnp.ones((1, 2, 4, 4, 3)), jnp.array([1.0]), text, cfg)
  with pytest.raises(ShapeError, match="text embeddings"):
    wan_dit.forward(params, jnp.ones((1, 2, 4, 4, 4)), jnp.array([1.0]), jnp.ones((1, 3, 9)), cfg)


def test_loader_rejects_wrong_shapes():
  _, hf_cfg, state = _golden()
  cfg = wan_dit.WanDiTConfig.from_diffusers(dict(hf_cfg, ffn_dim=40))
  with pytest.raises(CheckpointError, match="ffn.net.0.proj.weight"):
    diffusers_wan.convert_dit(state.__getitem__, cfg, jnp.float32)


def test_config_shapes():
  small, big = wan_dit.WanDiTConfig.wan21_1_3b(), wan_dit.WanDiTConfig.wan21_14b()
  assert (small.dim, small.num_layers, big.dim, big.num_layers) == (1536, 30, 5120, 40)
  n = sum(np.prod(s) for s in jax.tree.leaves(wan_dit.param_shapes(small),
                                              is_leaf=lambda s: isinstance(s, tuple)))
  assert 1.3e9 < n < 1.5e9


def _weight_copies(hlo: str, weight_shapes: set[str]) -> list[str]:
  """Per-layer weight copies in compiled HLO: copy ops of a weight's shape, and dynamic-slices that
  cut one layer's [1, K, N] slab out of a stacked weight (XLA materializes those: the fusion's root
  is the slice, a dot cannot read through it)."""
  copies = re.findall(r"= \w+\[([\d,]+)\]\{[^}]*\} copy\(", hlo)
  slices = re.findall(r"dynamic_slice_sizes=\{1,([\d,]+)\}", hlo)
  return [s for s in copies + slices if s in weight_shapes]


def test_layerwise_forward_has_no_per_layer_weight_copy():
  """BASELINES.md: a scan over stacked weights copied each layer's slice. The stacked DiT forward
  does (the detector finds them: this is what the default avoids); forward_layerwise runs one
  compiled block on each layer's own arrays: no copy, no loop, and the same numbers."""
  cfg = wan_dit.WanDiTConfig(num_heads=2, head_dim=16, in_channels=4, out_channels=4, text_dim=8,
                             freq_dim=8, ffn_dim=48, num_layers=4)
  params = wan_dit.init_params(cfg, jax.random.key(0), jnp.float32)
  lat = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 4))
  text = jax.random.normal(jax.random.key(2), (2, 3, 8))
  t = jnp.array([700.0, 300.0])
  shapes = {",".join(map(str, w.shape)) for w in jax.tree.leaves(params["blocks"][0]) if w.ndim == 2}
  fwd = jax.jit(lambda p: wan_dit.forward(p, lat, t, text, cfg, dtype=jnp.float32))
  stacked = wan_dit.stack_blocks(params)
  hlo_scan = fwd.lower(stacked).compile().as_text()
  assert " while(" in hlo_scan and _weight_copies(hlo_scan, shapes)

  x, _, tproj, ctx, _, cos, sin = wan_dit.embed(params, lat, t, text, cfg, jnp.float32)
  hlo_block = wan_dit.block_jit.lower(params["blocks"][1], x, ctx, tproj, cos, sin, cfg=cfg,
                                      attn_impl="xla").compile().as_text()
  assert not _weight_copies(hlo_block, shapes) and " while(" not in hlo_block

  ref, ref_cache = wan_dit.forward(params, lat, t, text, cfg, dtype=jnp.float32, return_cache=True)
  out, cache = wan_dit.forward_layerwise(params, lat, t, text, cfg, dtype=jnp.float32,
                                         return_cache=True)
  assert _rel(out, ref) < 1e-5 and _rel(cache.residual, ref_cache.residual) < 1e-5
  cached = wan_dit.forward_layerwise(params, lat, t, text, cfg, dtype=jnp.float32, cache=ref_cache)
  assert _rel(cached, ref) < 1e-5
  with pytest.raises(ShapeError, match="list of blocks"):
    wan_dit.forward_layerwise(stacked, lat, t, text, cfg)
