"""Offline quantizer: rule matching, formats per weight, orbax round trip of a quantized DeepSeek model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.quantize import parse_rules, quantize_params, restore_quantized, save_quantized
from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.errors import ShapeError
from jaxinfer.models import deepseek_v3 as ds
from kernels.quant import FP8BlockWeight, GroupedNVFP4Weight, NVFP4Weight

CFG = ds.DeepseekV3Config(
    vocab_size=128, hidden_size=128, num_layers=2, num_heads=2, q_lora_rank=128, kv_lora_rank=128,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=64, intermediate_size=256,
    moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1)
RULES = "layers.*.experts_*=nvfp4,layers.*.wo=nvfp4,layers.0.*=none,layers.*=fp8"


def _logits(params):
  cache = ds.create_cache(CFG, num_pages=3, page_size=8, dtype=jnp.float32)
  batch = build_batch([SeqChunk([1, 2], 0, 16)], 8, num_tokens=16, num_seqs=1, pages_per_seq=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, 16), jnp.int32)
  return np.asarray(ds.forward_jit(params, tokens, cache, batch, cfg=CFG, all_logits=True)[0])


def test_rules_pick_formats_and_round_trip_through_orbax(tmp_path):
  params = ds.init_params(CFG, jax.random.key(0), jnp.float32)
  qparams, chosen = quantize_params(params, parse_rules(RULES))
  layer0, layer1 = qparams["layers"]
  assert isinstance(layer1["experts_gate"], GroupedNVFP4Weight)
  assert isinstance(layer1["wo"], NVFP4Weight) and isinstance(layer0["wo"], NVFP4Weight)
  assert isinstance(layer1["wq_b"], FP8BlockWeight) and isinstance(layer1["shared_down"],
                                                                   FP8BlockWeight)
  assert isinstance(layer0["w_gate"], jax.Array)                  # layers.0.* = none
  for never in ("wkv_b", "router", "router_bias"):
    assert isinstance(layer1[never], jax.Array), never
  assert isinstance(qparams["embed"], jax.Array) and isinstance(qparams["lm_head"], jax.Array)
  assert chosen["layers.1.experts_down"] == "nvfp4" and chosen["layers.1.wkv_a"] == "fp8"
  assert "layers.1.wkv_b" not in chosen and "layers.0.w_up" not in chosen
  for path, fmt in chosen.items():
    _, i, name = path.split(".")
    w, ref = qparams["layers"][int(i)][name], params["layers"][int(i)][name]
    rel = float(jnp.linalg.norm(w.dequantize() - ref) / jnp.linalg.norm(ref))
    assert rel < (0.035 if fmt == "fp8" else 0.13), (path, rel)

  save_quantized(tmp_path / "q", "deepseek_v3", CFG, qparams, chosen)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  restored, quantization = restore_quantized(tmp_path / "q", abstract)
  assert quantization == chosen
  a, b = jax.tree.leaves(qparams), jax.tree.leaves(restored)
  assert jax.tree.structure(qparams) == jax.tree.structure(restored)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                  np.asarray(y).reshape(-1).view(np.uint8))
  got = _logits(restored)
  np.testing.assert_array_equal(got, _logits(qparams))
  ref = _logits(params)
  print(f"quantized ({RULES}) logits rel. error {np.linalg.norm(got - ref) / np.linalg.norm(ref):.3f}")
  assert np.isfinite(got).all()


def test_bad_rules_and_shapes_are_named():
  with pytest.raises(ValueError, match="int4"):
    parse_rules("layers.*=int4")
  params = {"layers": [{"w_down": jnp.ones((96, 128))}]}
  with pytest.raises(ShapeError, match=r"layers\.0\.w_down.*K % 128"):
    quantize_params(params, parse_rules("layers.*=fp8"))
