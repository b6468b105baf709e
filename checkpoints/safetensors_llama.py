"""Import a HF ``LlamaForCausalLM`` checkpoint folder (config.json + *.safetensors, sharded or not).

Tensors are read one at a time through ``safe_open`` (memory-mapped), converted, and dropped, so the
file is never held in memory twice. HF stores Linear weights [out, in]; we store [in, out].
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from checkpoints.hf_config import read_hf_config
from jaxinfer.errors import CheckpointError
from jaxinfer.models.llama import LlamaConfig, param_shapes

_LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "wq", "self_attn.k_proj": "wk",
                "self_attn.v_proj": "wv", "self_attn.o_proj": "wo",
                "post_attention_layernorm": "mlp_norm", "mlp.gate_proj": "w_gate",
                "mlp.up_proj": "w_up", "mlp.down_proj": "w_down"}


def tensor_index(folder: Path) -> dict[str, Path]:
  """Maps every tensor name to the shard holding it."""
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{folder}: no *.safetensors files")
  index = {}
  for f in files:
    try:
      with safe_open(f, framework="flax") as st:
        index.update({name: f for name in st.keys()})
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
  return index


def iter_tensors(index: dict[str, Path], names: list[str]) -> Iterator[tuple[str, jax.Array]]:
  """Yields (name, array) shard by shard, one tensor at a time."""
  by_file: dict[Path, list[str]] = {}
  for n in names:
    by_file.setdefault(index[n], []).append(n)
  for f, ns in by_file.items():
    with safe_open(f, framework="flax") as st:
      for n in ns:
        yield n, st.get_tensor(n)


def _hf_names(cfg: LlamaConfig) -> dict[str, tuple]:
  """HF tensor name -> our param path."""
  names = {"model.embed_tokens.weight": ("embed",), "model.norm.weight": ("final_norm",)}
  if not cfg.tie_word_embeddings:
    names["lm_head.weight"] = ("lm_head",)
  for i in range(cfg.num_layers):
    for hf, ours in _LAYER_NAMES.items():
      names[f"model.layers.{i}.{hf}.weight"] = ("layers", i, ours)
  return names


def load_safetensors_llama(folder: str | Path, dtype=jnp.bfloat16, progress: bool = True):
  """Returns (LlamaConfig, params) from a HF Llama checkpoint folder."""
  folder = Path(folder)
  cfg = LlamaConfig.from_hf(read_hf_config(folder))
  index = tensor_index(folder)
  names = _hf_names(cfg)
  missing = [n for n in names if n not in index]
  if missing:
    raise CheckpointError(f"{folder}: missing tensor {missing[0]!r} ({len(missing)} missing)")
  shapes = param_shapes(cfg)
  params: dict = {"layers": [{} for _ in range(cfg.num_layers)]}
  for name, w in tqdm(iter_tensors(index, list(names)), total=len(names), disable=not progress,
                      desc=f"importing {folder.name}", unit="tensor"):
    path = names[name]
    if w.ndim == 2 and path[0] != "embed":
      w = w.T
    expected = shapes["layers"][path[1]][path[2]] if path[0] == "layers" else shapes[path[0]]
    if tuple(w.shape) != tuple(expected):
      raise CheckpointError(f"{folder}: tensor {name!r} has shape {tuple(w.shape)}, "
                            f"expected {tuple(expected)}")
    w = jnp.asarray(w, dtype)
    if path[0] == "layers":
      params["layers"][path[1]][path[2]] = w
    else:
      params[path[0]] = w
  return cfg, params
