"""Offline quantizer: bf16/f32 params -> FP8 block-128 or NVFP4 weights for chosen layers, saved with orbax.

Rules are ``(glob, format)`` pairs over param paths written with dots (``layers.3.experts_gate``,
``layers.*.wo``, ``lm_head``); the first rule that matches a weight decides its format ("fp8" | "nvfp4" |
"none"). Linear weights [K, N] become kernels.quant.FP8BlockWeight / NVFP4Weight; stacked expert
weights [E, K, N] the grouped types. Weights a model reads densely (embeddings, norms, the router,
DeepSeek's kv_b) are never quantized, whatever the rules say.

Saved folders are jaxinfer orbax checkpoints (checkpoints/orbax_store.py) plus ``quantization.json``
(path -> format), from which ``restore_quantized`` rebuilds the abstract tree to restore into.

    params, chosen = quantize_params(params, parse_rules(
        "layers.*.experts_*=nvfp4,layers.*.wo=nvfp4,layers.*=fp8"))
    save_quantized(folder, "deepseek_v3", cfg, params, chosen, tokenizer)
"""
from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path

import jax

from checkpoints import orbax_store
from jaxinfer.errors import CheckpointError, ShapeError
from kernels.quant import FP8BlockWeight, GroupedFP8BlockWeight, GroupedNVFP4Weight, NVFP4Weight

FORMATS = ("fp8", "nvfp4", "none")
NEVER_QUANTIZED = ("embed", "router", "router_bias", "wkv_b")
QUANTIZATION_FILE = "quantization.json"
_TYPES = {("fp8", 2): FP8BlockWeight, ("fp8", 3): GroupedFP8BlockWeight,
          ("nvfp4", 2): NVFP4Weight, ("nvfp4", 3): GroupedNVFP4Weight}


def parse_rules(text: str) -> list[tuple[str, str]]:
  """'glob=fmt,glob=fmt' -> [(glob, fmt)]."""
  rules = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    glob, _, fmt = item.rpartition("=")
    if not glob or fmt not in FORMATS:
      raise ValueError(f"bad quantization rule {item!r}: want GLOB=fp8|nvfp4|none")
    rules.append((glob, fmt))
  return rules


def _path_str(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def format_for(path: str, rules: Sequence[tuple[str, str]]) -> str:
  if path.rsplit(".", 1)[-1] in NEVER_QUANTIZED:
    return "none"
  for glob, fmt in rules:
    if fnmatch.fnmatchcase(path, glob):
      return fmt
  return "none"


def _check(path: str, w, fmt: str) -> None:
  if w.ndim not in (2, 3):
    raise ShapeError(f"{path}: only [K, N] / [E, K, N] weights can be quantized, got {w.shape}")
  k = w.shape[-2]
  if fmt == "fp8" and k % 128:
    raise ShapeError(f"{path}: FP8 block-128 needs K % 128 == 0 (activations are quantized 1x128), "
                     f"got K={k}")
  if fmt == "nvfp4" and k % 16:
    raise ShapeError(f"{path}: NVFP4 needs K % 16 == 0, got K={k}")


def quantize_params(params, rules: Sequence[tuple[str, str]], skip_incompatible: bool = False
                    ) -> tuple[dict, dict[str, str]]:
  """Returns (params with the chosen weights quantized, {path: format} of those quantized).
  A matched weight whose K the format cannot take raises ShapeError, or stays dense when
  ``skip_incompatible``."""
  chosen: dict[str, str] = {}

  def one(path, w):
    p = _path_str(path)
    fmt = format_for(p, rules) if getattr(w, "ndim", 0) >= 2 else "none"
    if fmt == "none":
      return w
    try:
      _check(p, w, fmt)
    except ShapeError:
      if skip_incompatible:
        return w
      raise
    chosen[p] = fmt
    return _TYPES[(fmt, w.ndim)].from_dense(w)

  return jax.tree_util.tree_map_with_path(one, params), chosen


def save_quantized(folder: str | Path, architecture: str, config, params, quantization: dict,
                   tokenizer=None) -> None:
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / QUANTIZATION_FILE).write_text(json.dumps(quantization, indent=1))
  orbax_store.save(folder, architecture, config, params, tokenizer)  # header last: marks completion


def restore_quantized(folder: str | Path, abstract_dense_params):
  """Restores a saved quantized tree; ``abstract_dense_params``: ShapeDtypeStructs of the dense model."""
  path = Path(folder) / QUANTIZATION_FILE
  try:
    quantization = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: unreadable quantization map ({e})") from e
  rules = [(p, fmt) for p, fmt in quantization.items()]
  abstract = jax.eval_shape(lambda p: quantize_params(p, rules)[0], abstract_dense_params)
  return orbax_store.restore(folder, abstract), quantization
