"""One entry point that turns a model spec into a ready model: config, params, tokenizer, step fn.

Specs: ``None`` (the embedded default SmolLM2-135M-Instruct GGUF), a ``.gguf`` file, a HF checkpoint
folder (config.json + safetensors + tokenizer.json), or a jaxinfer orbax folder (``jaxinfer.json``).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

from checkpoints import orbax_store
from checkpoints.default_model import default_model_path
from jaxinfer.errors import CheckpointError, UnsupportedModelError
from jaxinfer.models import deepseek_v3, llama
from jaxinfer.tokenizer import Tokenizer


ARCHITECTURES = {"llama": llama, "deepseek_v3": deepseek_v3}


@dataclasses.dataclass
class LoadedModel:
  architecture: str
  config: llama.LlamaConfig | deepseek_v3.DeepseekV3Config
  params: dict
  tokenizer: Tokenizer | None
  source: str

  @property
  def module(self):
    """The model module: ``forward``, ``forward_jit`` and ``create_cache`` of this architecture."""
    return ARCHITECTURES[self.architecture]

  @functools.cached_property
  def forward(self) -> Callable:
    """(params, tokens [T], cache, batch) -> (logits [B, V] float32, cache); jitted, cache donated."""
    return functools.partial(self.module.forward_jit, cfg=self.config)

  @property
  def max_context(self) -> int:
    return self.config.max_position_embeddings

  def create_cache(self, num_pages: int, page_size: int, dtype=None):
    """The paged cache of this architecture (KVCache for Llama, LatentCache for DeepSeek-V3)."""
    dtype = dtype or self.params["final_norm"].dtype
    return self.module.create_cache(self.config, num_pages=num_pages, page_size=page_size,
                                    dtype=dtype)

  def save(self, folder: str | Path) -> None:
    """Writes the checkpoint layout: a Llama served with fused projections is unfused first."""
    params = self.params
    if self.architecture == "llama":
      params = llama.unfuse_projections(params, self.config)
    orbax_store.save(folder, self.architecture, self.config, params, self.tokenizer)


def default_dtype():
  """bfloat16 on accelerators; float32 on CPU, where bf16 is no faster and costs accuracy."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load_model(spec: str | Path | None = None, dtype=None, progress: bool = True) -> LoadedModel:
  start = time.perf_counter()
  dtype = dtype or default_dtype()
  path = default_model_path() if spec is None else Path(spec)
  if not path.exists():
    raise CheckpointError(f"{path}: no such checkpoint file or folder")
  if path.is_file():
    if path.suffix != ".gguf":
      raise CheckpointError(f"{path}: unknown checkpoint file type (expected .gguf or a folder)")
    from checkpoints.gguf_llama import load_gguf_llama  # importers load only when used
    cfg, params, tok = load_gguf_llama(path, dtype, progress)
    model = LoadedModel("llama", cfg, params, tok, str(path))
  elif orbax_store.is_orbax_checkpoint(path):
    model = _load_orbax(path, dtype)
  elif (path / "config.json").is_file():
    model = _load_hf(path, dtype, progress)
  else:
    raise CheckpointError(f"{path}: neither a GGUF file, a HF checkpoint folder (config.json) nor a "
                          "jaxinfer checkpoint (jaxinfer.json)")
  logging.info("loaded %s in %.2fs", path, time.perf_counter() - start)
  return model


def _load_hf(path: Path, dtype, progress: bool) -> LoadedModel:
  from checkpoints.hf_config import read_hf_config
  model_type = read_hf_config(path).get("model_type")
  if model_type == "llama":
    from checkpoints.safetensors_llama import load_safetensors_llama
    cfg, params = load_safetensors_llama(path, dtype, progress)
  elif model_type == "deepseek_v3":
    from checkpoints.deepseek_v3 import load_safetensors_deepseek_v3
    cfg, params = load_safetensors_deepseek_v3(path, dtype, progress)
  else:
    raise UnsupportedModelError(f"{path}: model_type {model_type!r} is not supported (expected one "
                                f"of {sorted(ARCHITECTURES)})")
  tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").exists() else None
  return LoadedModel(model_type, cfg, params, tok, str(path))


def _load_orbax(path: Path, dtype) -> LoadedModel:
  header = orbax_store.read_header(path)
  if header["architecture"] != "llama":
    raise UnsupportedModelError(f"{path}: architecture {header['architecture']!r} not supported")
  cfg = orbax_store.config_from_json(llama.LlamaConfig, header["config"])
  shapes = llama.param_shapes(cfg)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
  params = orbax_store.restore(path, abstract)
  return LoadedModel("llama", cfg, params, orbax_store.restore_tokenizer(path), str(path))
