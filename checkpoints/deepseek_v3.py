"""Import a HF DeepSeek-V3/R1 checkpoint folder (config.json + *.safetensors) in any of its layouts:

  bf16/f32       ``<linear>.weight`` [out, in]
  FP8 block-128  ``<linear>.weight`` e4m3 [out, in] + ``<linear>.weight_scale_inv`` f32
                 [ceil(out/128), ceil(in/128)]   (deepseek-ai/DeepSeek-V3, R1): kept in FP8 as
                 kernels.quant.FP8BlockWeight, never upcast
  NVFP4 ModelOpt ``<linear>.weight`` u8 [out, in/2] (two e2m1 per byte) + ``weight_scale`` e4m3
                 [out, in/16] + ``weight_scale_2`` f32 [] (+ ``input_scale``)  (nvidia/DeepSeek-R1-*-FP4):
                 kernels.quant.NVFP4Weight

The layout is detected per linear from the tensors present, so mixed checkpoints (NVFP4 experts and
o_proj, FP8 or bf16 elsewhere) import as they are. Experts are stacked [E, ...] into the grouped types.
``kv_b_proj`` is always dequantized (both MLA forms slice it per head); so are the embedding and norms.

Shards are read one at a time through a memory-mapped reader of the safetensors format (the
``safetensors`` package cannot hand FP8 to numpy); each tensor is copied out, converted and dropped, so
peak host memory is about one shard plus the imported params. Layers past ``num_hidden_layers`` (the
multi-token-prediction layer 61 of V3/R1) are ignored.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm import tqdm

from checkpoints.hf_config import read_hf_config
from jaxinfer.errors import CheckpointError, JaxinferError
from jaxinfer.models.deepseek_v3 import DeepseekV3Config, param_shapes
from kernels.quant import FP8BlockWeight, GroupedFP8BlockWeight, GroupedNVFP4Weight, NVFP4Weight

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "U8": np.uint8,
           "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}


class SafetensorsShard:
  """Memory-mapped reader of one .safetensors file: header metadata without reading data."""

  def __init__(self, path: Path):
    self.path = path
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    self.header = header
    self.data_start = 8 + n

  def keys(self) -> list[str]:
    return list(self.header)

  def dtype(self, name: str) -> np.dtype:
    code = self.header[name]["dtype"]
    if code not in _DTYPES:
      raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
    return np.dtype(_DTYPES[code])

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    begin, end = self.header[name]["data_offsets"]
    dtype, shape = self.dtype(name), self.shape(name)
    if end - begin != math.prod(shape) * dtype.itemsize:
      raise CheckpointError(f"{self.path}: tensor {name!r} byte size does not match {shape} {dtype}")
    mm = np.memmap(self.path, np.uint8, "r", offset=self.data_start + begin, shape=(end - begin,))
    return np.array(mm).view(dtype).reshape(shape)


def shard_index(folder: Path) -> dict[str, SafetensorsShard]:
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{folder}: no *.safetensors files")
  index: dict[str, SafetensorsShard] = {}
  for f in files:
    shard = SafetensorsShard(f)
    index.update({name: shard for name in shard.keys()})
  return index


_ATTN = {"input_layernorm": "attn_norm", "self_attn.q_proj": "wq", "self_attn.q_a_proj": "wq_a",
         "self_attn.q_a_layernorm": "q_a_norm", "self_attn.q_b_proj": "wq_b",
         "self_attn.kv_a_proj_with_mqa": "wkv_a", "self_attn.kv_a_layernorm": "kv_a_norm",
         "self_attn.kv_b_proj": "wkv_b", "self_attn.o_proj": "wo",
         "post_attention_layernorm": "mlp_norm"}
_DENSE_MLP = {"mlp.gate_proj": "w_gate", "mlp.up_proj": "w_up", "mlp.down_proj": "w_down"}
_SHARED = {"mlp.shared_experts.gate_proj": "shared_gate", "mlp.shared_experts.up_proj": "shared_up",
           "mlp.shared_experts.down_proj": "shared_down"}
_EXPERT = {"gate_proj": "experts_gate", "up_proj": "experts_up", "down_proj": "experts_down"}
_ALWAYS_DENSE = ("embed", "wkv_b")


def _modules(cfg: DeepseekV3Config) -> list[tuple[str, tuple, int | None]]:
  """(HF module prefix, our param path, expert index or None) for every weight-bearing module."""
  mods = [("model.embed_tokens", ("embed",), None), ("model.norm", ("final_norm",), None)]
  if not cfg.tie_word_embeddings:
    mods.append(("lm_head", ("lm_head",), None))
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}"
    attn = dict(_ATTN)
    if cfg.q_lora_rank:
      del attn["self_attn.q_proj"]
    else:
      for k in ("self_attn.q_a_proj", "self_attn.q_a_layernorm", "self_attn.q_b_proj"):
        del attn[k]
    for hf, ours in attn.items():
      mods.append((f"{p}.{hf}", ("layers", i, ours), None))
    if not cfg.is_moe_layer(i):
      mods += [(f"{p}.{hf}", ("layers", i, ours), None) for hf, ours in _DENSE_MLP.items()]
      continue
    mods.append((f"{p}.mlp.gate", ("layers", i, "router"), None))
    if cfg.n_shared_experts:
      mods += [(f"{p}.{hf}", ("layers", i, ours), None) for hf, ours in _SHARED.items()]
    for j in range(cfg.n_routed_experts):
      mods += [(f"{p}.mlp.experts.{j}.{hf}", ("layers", i, ours), j) for hf, ours in _EXPERT.items()]
  return mods


def _format(index: dict, prefix: str) -> str:
  if f"{prefix}.weight_scale_inv" in index:
    return "fp8"
  if f"{prefix}.weight_scale" in index and f"{prefix}.weight_scale_2" in index:
    return "nvfp4"
  return "dense"


_PARTS = {"dense": ("weight",), "fp8": ("weight", "weight_scale_inv"),
          "nvfp4": ("weight", "weight_scale", "weight_scale_2")}
_PART_DTYPES = {("fp8", "weight"): ml_dtypes.float8_e4m3fn, ("fp8", "weight_scale_inv"): np.float32,
                ("nvfp4", "weight"): np.uint8, ("nvfp4", "weight_scale"): ml_dtypes.float8_e4m3fn,
                ("nvfp4", "weight_scale_2"): np.float32, ("nvfp4", "input_scale"): np.float32}


def _expected_stored_shape(fmt: str, part: str, out_in: tuple[int, int]) -> tuple[int, ...]:
  n, k = out_in
  return {("dense", "weight"): (n, k), ("fp8", "weight"): (n, k),
          ("fp8", "weight_scale_inv"): (-(-n // 128), -(-k // 128)),
          ("nvfp4", "weight"): (n, k // 2), ("nvfp4", "weight_scale"): (n, k // 16)}.get(
              (fmt, part), ())


class _Slot:
  """One param being assembled: its parts, filled tensor by tensor (experts into [E, ...] buffers)."""

  def __init__(self, path: tuple, fmt: str, num_experts: int | None):
    self.path, self.fmt, self.num_experts = path, fmt, num_experts
    self.parts: dict[str, np.ndarray] = {}
    self.remaining = 0


def load_safetensors_deepseek_v3(folder: str | Path, dtype=jnp.bfloat16, progress: bool = True
                                 ) -> tuple[DeepseekV3Config, dict]:
  """Returns (DeepseekV3Config, params) from a HF DeepSeek-V3 checkpoint folder."""
  folder = Path(folder)
  cfg = DeepseekV3Config.from_hf(read_hf_config(folder))
  index = shard_index(folder)
  shapes = param_shapes(cfg)

  def shape_of(path):
    return shapes["layers"][path[1]][path[2]] if path[0] == "layers" else shapes[path[0]]

  # Plan: every tensor to read, the slot it fills, and its expected dtype/shape.
  slots: dict[tuple, _Slot] = {}
  plan: dict[str, tuple[_Slot, str, int | None]] = {}
  for prefix, path, expert in _modules(cfg):
    fmt = _format(index, prefix)
    shape = shape_of(path)
    if fmt != "dense" and (len(shape) == 1 or path[-1] in ("embed", "router")):
      raise CheckpointError(f"{folder}: {prefix} is stored {fmt}; only Linear weights may be")
    slot = slots.get(path)
    if slot is None:
      slot = slots[path] = _Slot(path, fmt, cfg.n_routed_experts if expert is not None else None)
    elif slot.fmt != fmt:
      raise CheckpointError(f"{folder}: {prefix} is {fmt} but other experts of {path} are {slot.fmt}")
    parts = list(_PARTS[fmt])
    if fmt == "nvfp4" and f"{prefix}.input_scale" in index:
      parts.append("input_scale")
    if path[-1] == "router":
      parts.append("e_score_correction_bias")
    for part in parts:
      name = f"{prefix}.{part}"
      if name not in index:
        raise CheckpointError(f"{folder}: missing tensor {name!r}")
      _check_tensor(index[name], name, fmt, part, path, shape, cfg)
      plan[name] = (slot, part, expert)
      slot.remaining += 1

  params: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
  names = list(plan)
  for name, arr in tqdm(_iter_by_shard(index, names), total=len(names), disable=not progress,
                        desc=f"importing {folder.name}", unit="tensor"):
    slot, part, expert = plan[name]
    if expert is None:
      slot.parts[part] = arr
    else:
      buf = slot.parts.get(part)
      if buf is None:
        buf = slot.parts[part] = np.empty((slot.num_experts, *arr.shape), arr.dtype)
      buf[expert] = arr
    slot.remaining -= 1
    if slot.remaining == 0:
      value = _convert(slot, dtype, name)
      slot.parts.clear()
      if slot.path[0] == "layers":
        if slot.path[2] == "router":
          params["layers"][slot.path[1]]["router"], params["layers"][slot.path[1]]["router_bias"] = value
        else:
          params["layers"][slot.path[1]][slot.path[2]] = value
      else:
        params[slot.path[0]] = value
  return cfg, params


def _iter_by_shard(index: dict, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
  by_shard: dict[Path, list[str]] = {}
  for n in names:
    by_shard.setdefault(index[n].path, []).append(n)
  for ns in by_shard.values():
    for n in ns:
      yield n, index[n].get(n)


def _check_tensor(shard: SafetensorsShard, name: str, fmt: str, part: str, path: tuple,
                  shape: tuple, cfg: DeepseekV3Config) -> None:
  """Dtype and shape of one stored tensor, from the header alone."""
  got_dtype, got_shape = shard.dtype(name), shard.shape(name)
  want_dtype = _PART_DTYPES.get((fmt, part))
  if want_dtype is not None and got_dtype != np.dtype(want_dtype):
    raise CheckpointError(f"{shard.path}: tensor {name!r} has dtype {got_dtype}, expected "
                          f"{np.dtype(want_dtype)} for a {fmt} {part}")
  if part == "e_score_correction_bias":
    want = (cfg.n_routed_experts,)
  elif part in ("weight_scale_2", "input_scale"):
    if math.prod(got_shape) != 1:
      raise CheckpointError(f"{shard.path}: tensor {name!r} has shape {got_shape}, expected a scalar")
    return
  elif len(shape) == 1:
    want = shape
  else:
    k, n = shape[-2:]
    out_in = (n, k)
    if path[-1] in ("embed",):
      out_in = shape                                   # [vocab, hidden] as stored
    elif path[-1] == "router":
      out_in = (shape[1], shape[0])
    want = _expected_stored_shape(fmt, part, out_in)
  if tuple(got_shape) != tuple(want):
    raise CheckpointError(f"{shard.path}: tensor {name!r} has shape {tuple(got_shape)}, expected "
                          f"{tuple(want)}")


def _convert(slot: _Slot, dtype, name: str):
  """Parts of one param -> our array or quantized weight ([in, out] / [E, in, out] logically)."""
  p, fmt, ours = slot.parts, slot.fmt, slot.path[-1]
  grouped = slot.num_experts is not None
  try:
    if ours == "router":
      return (jnp.asarray(p["weight"].astype(np.float32).T),
              jnp.asarray(p["e_score_correction_bias"].astype(np.float32)))
    if fmt == "fp8":
      w = (GroupedFP8BlockWeight if grouped else FP8BlockWeight).from_deepseek(
          p["weight"], p["weight_scale_inv"])
    elif fmt == "nvfp4":
      if grouped:
        w = GroupedNVFP4Weight.from_modelopt(p["weight"], p["weight_scale"],
                                             p["weight_scale_2"].reshape(-1), p.get("input_scale"))
      else:
        w = NVFP4Weight.from_modelopt(p["weight"], p["weight_scale"], p["weight_scale_2"],
                                      p.get("input_scale"))
    else:
      w = p["weight"]
      if w.ndim == 1 or ours == "embed":
        return jnp.asarray(w.astype(np.float32), dtype)
      return jnp.asarray(np.swapaxes(w, -1, -2).astype(np.float32), dtype)
  except JaxinferError as e:
    raise CheckpointError(f"tensor {name.rsplit('.', 1)[0]!r}: {e}") from e
  if ours in _ALWAYS_DENSE:
    return w.dequantize(jnp.float32).astype(dtype)
  return w
