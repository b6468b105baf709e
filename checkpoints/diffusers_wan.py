"""Streamed loader of a diffusers-layout Wan2.1 text-to-video folder (``Wan-AI/Wan2.1-T2V-*-Diffusers``):

    transformer/  config.json + diffusion_pytorch_model*.safetensors  -> models.wan_dit
    vae/          config.json + diffusion_pytorch_model.safetensors   -> models.wan_vae (decoder only)
    text_encoder/ config.json + model*.safetensors (UMT5EncoderModel) -> models.umt5
    tokenizer/    tokenizer.json

Tensors are read one at a time through ``safe_open`` (memory-mapped), converted (Linear [out, in] ->
[in, out], conv kernels to channels-last), cast and put on device, then dropped: the host never holds
more than one tensor. The converters take any ``get(name) -> np.ndarray`` so tests feed them goldens.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from checkpoints.hf_config import read_hf_config
from jaxinfer.errors import CheckpointError
from jaxinfer.models import umt5, wan_dit, wan_vae

Getter = Callable[[str], np.ndarray]


class SafetensorsFolder:
  """name -> tensor over every *.safetensors file of a folder, opened lazily, one tensor per call."""

  def __init__(self, folder: Path):
    self.folder = Path(folder)
    files = sorted(self.folder.glob("*.safetensors"))
    if not files:
      raise CheckpointError(f"{folder}: no *.safetensors files")
    self._index: dict[str, Path] = {}
    for f in files:
      try:
        with safe_open(f, framework="numpy") as st:
          self._index.update({n: f for n in st.keys()})
      except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
    self._open: dict[Path, Any] = {}

  def keys(self) -> list[str]:
    return list(self._index)

  def __call__(self, name: str) -> np.ndarray:
    if name not in self._index:
      raise CheckpointError(f"{self.folder}: tensor {name!r} missing")
    f = self._index[name]
    if f not in self._open:
      self._open[f] = safe_open(f, framework="numpy")
    return self._open[f].get_tensor(name)


def _checked(get: Getter, name: str, shape: tuple[int, ...]) -> np.ndarray:
  a = np.asarray(get(name))
  if a.shape != tuple(shape):
    raise CheckpointError(f"tensor {name!r} has shape {a.shape}, expected {tuple(shape)}")
  return a


def _put(a: np.ndarray, dtype) -> jax.Array:
  return jnp.asarray(np.asarray(a, np.float32) if a.dtype.kind == "V" else a, dtype=dtype)


def convert_dit(get: Getter, cfg: wan_dit.WanDiTConfig, dtype=jnp.bfloat16) -> wan_dit.Params:
  """diffusers WanTransformer3DModel state -> wan_dit params."""
  D, P = cfg.dim, int(np.prod(cfg.patch_size))
  lin = lambda n, i, o: _put(_checked(get, f"{n}.weight", (o, i)).T, dtype)
  vec = lambda n, s: _put(_checked(get, n, (s,)), dtype)
  pw = _checked(get, "patch_embedding.weight", (D, cfg.in_channels, *cfg.patch_size))
  params = {
      "patch_w": _put(pw.transpose(2, 3, 4, 1, 0).reshape(P * cfg.in_channels, D), dtype),
      "patch_b": vec("patch_embedding.bias", D),
      "time_w1": lin("condition_embedder.time_embedder.linear_1", cfg.freq_dim, D),
      "time_b1": vec("condition_embedder.time_embedder.linear_1.bias", D),
      "time_w2": lin("condition_embedder.time_embedder.linear_2", D, D),
      "time_b2": vec("condition_embedder.time_embedder.linear_2.bias", D),
      "time_proj_w": lin("condition_embedder.time_proj", D, 6 * D),
      "time_proj_b": vec("condition_embedder.time_proj.bias", 6 * D),
      "text_w1": lin("condition_embedder.text_embedder.linear_1", cfg.text_dim, D),
      "text_b1": vec("condition_embedder.text_embedder.linear_1.bias", D),
      "text_w2": lin("condition_embedder.text_embedder.linear_2", D, D),
      "text_b2": vec("condition_embedder.text_embedder.linear_2.bias", D),
      "out_modulation": _put(_checked(get, "scale_shift_table", (1, 2, D))[0], dtype),
      "proj_out_w": lin("proj_out", D, P * cfg.out_channels),
      "proj_out_b": vec("proj_out.bias", P * cfg.out_channels),
      "blocks": [],
  }
  for i in range(cfg.num_layers):
    b = f"blocks.{i}"

    def attn(a):
      return {"wq": lin(f"{a}.to_q", D, D), "bq": vec(f"{a}.to_q.bias", D),
              "wk": lin(f"{a}.to_k", D, D), "bk": vec(f"{a}.to_k.bias", D),
              "wv": lin(f"{a}.to_v", D, D), "bv": vec(f"{a}.to_v.bias", D),
              "wo": lin(f"{a}.to_out.0", D, D), "bo": vec(f"{a}.to_out.0.bias", D),
              "norm_q": vec(f"{a}.norm_q.weight", D), "norm_k": vec(f"{a}.norm_k.weight", D)}

    block = {"modulation": _put(_checked(get, f"{b}.scale_shift_table", (1, 6, D))[0], dtype),
             "self_attn": attn(f"{b}.attn1"), "cross_attn": attn(f"{b}.attn2"),
             "ffn_w1": lin(f"{b}.ffn.net.0.proj", D, cfg.ffn_dim),
             "ffn_b1": vec(f"{b}.ffn.net.0.proj.bias", cfg.ffn_dim),
             "ffn_w2": lin(f"{b}.ffn.net.2", cfg.ffn_dim, D), "ffn_b2": vec(f"{b}.ffn.net.2.bias", D)}
    if cfg.cross_attn_norm:
      block["norm2_w"] = vec(f"{b}.norm2.weight", D)
      block["norm2_b"] = vec(f"{b}.norm2.bias", D)
    params["blocks"].append(block)
  return params


def convert_vae(get: Getter, cfg: wan_vae.WanVAEConfig, dtype=jnp.float32) -> wan_vae.Params:
  """diffusers AutoencoderKLWan state (decoder + post_quant_conv) -> wan_vae params."""
  out = {}
  for name, shape in wan_vae.param_shapes(cfg).items():
    if name.endswith("gamma"):
      a = _checked(get, name, (shape[0], 1, 1) if ".attentions." in name else (shape[0], 1, 1, 1))
      a = a.reshape(shape)
    elif name.endswith("bias"):
      a = _checked(get, name, shape)
    elif ".attentions." in name:                                   # 1x1 Conv2d [out, in, 1, 1]
      a = _checked(get, name, (shape[1], shape[0], 1, 1))[:, :, 0, 0].T
    elif len(shape) == 4:                                          # Conv2d [out, in, kh, kw]
      a = _checked(get, name, (shape[3], shape[2], shape[0], shape[1])).transpose(2, 3, 1, 0)
    else:                                                          # Conv3d [out, in, kt, kh, kw]
      a = _checked(get, name, (shape[4], shape[3], *shape[:3])).transpose(2, 3, 4, 1, 0)
    out[name] = _put(a, dtype)
  return out


def convert_umt5(get: Getter, cfg: umt5.UMT5Config, dtype=jnp.bfloat16) -> umt5.Params:
  """transformers UMT5EncoderModel state -> umt5 params."""
  inner, d = cfg.num_heads * cfg.d_kv, cfg.d_model
  lin = lambda n, i, o: _put(_checked(get, f"{n}.weight", (o, i)).T, dtype)
  layers = []
  for i in range(cfg.num_layers):
    b = f"encoder.block.{i}.layer"
    layers.append({
        "attn_norm": _put(_checked(get, f"{b}.0.layer_norm.weight", (d,)), dtype),
        "wq": lin(f"{b}.0.SelfAttention.q", d, inner), "wk": lin(f"{b}.0.SelfAttention.k", d, inner),
        "wv": lin(f"{b}.0.SelfAttention.v", d, inner), "wo": lin(f"{b}.0.SelfAttention.o", inner, d),
        "rel_bias": _put(_checked(get, f"{b}.0.SelfAttention.relative_attention_bias.weight",
                                  (cfg.num_buckets, cfg.num_heads)), jnp.float32),
        "ffn_norm": _put(_checked(get, f"{b}.1.layer_norm.weight", (d,)), dtype),
        "wi0": lin(f"{b}.1.DenseReluDense.wi_0", d, cfg.d_ff),
        "wi1": lin(f"{b}.1.DenseReluDense.wi_1", d, cfg.d_ff),
        "wff_o": lin(f"{b}.1.DenseReluDense.wo", cfg.d_ff, d)})
  return {"embed": _put(_checked(get, "shared.weight", (cfg.vocab_size, d)), dtype), "layers": layers,
          "final_norm": _put(_checked(get, "encoder.final_layer_norm.weight", (d,)), dtype)}


def load_dit(folder: Path, dtype=jnp.bfloat16) -> tuple[wan_dit.WanDiTConfig, wan_dit.Params]:
  folder = Path(folder) / "transformer" if (Path(folder) / "transformer").is_dir() else Path(folder)
  cfg = wan_dit.WanDiTConfig.from_diffusers(read_hf_config(folder))
  return cfg, convert_dit(SafetensorsFolder(folder), cfg, dtype)


def load_vae(folder: Path, dtype=jnp.float32) -> tuple[wan_vae.WanVAEConfig, wan_vae.Params]:
  folder = Path(folder) / "vae" if (Path(folder) / "vae").is_dir() else Path(folder)
  cfg = wan_vae.WanVAEConfig.from_diffusers(read_hf_config(folder))
  return cfg, convert_vae(SafetensorsFolder(folder), cfg, dtype)


def load_text_encoder(folder: Path, dtype=jnp.bfloat16) -> tuple[umt5.UMT5Config, umt5.Params]:
  folder = Path(folder) / "text_encoder" if (Path(folder) / "text_encoder").is_dir() else Path(folder)
  cfg = umt5.UMT5Config.from_hf(read_hf_config(folder))
  return cfg, convert_umt5(SafetensorsFolder(folder), cfg, dtype)
