"""Import a llama-architecture GGUF (llama.cpp) into jaxinfer's Llama params.

Tensors are dequantized one at a time by the ``gguf`` package (any type it knows: F32, F16, BF16,
Q8_0, Q4_0, Q4_1, K-quants, ...) from the memory-mapped file, so peak host memory is one tensor in
float32 plus the converted params. llama.cpp's converter permutes the rows of Wq and Wk so that RoPE
rotates interleaved pairs; we undo it to get HF's rotate-half layout, which our model uses.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxinfer.errors import CheckpointError, UnsupportedModelError
from jaxinfer.models.llama import LlamaConfig, param_shapes
from jaxinfer.tokenizer import Tokenizer

_LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
                "attn_output": "wo", "ffn_norm": "mlp_norm", "ffn_gate": "w_gate",
                "ffn_up": "w_up", "ffn_down": "w_down"}


def open_gguf(path: str | Path) -> gguf.GGUFReader:
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such GGUF file")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError/struct.error/... on corrupt files
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def read_fields(reader: gguf.GGUFReader) -> dict:
  fields = {}
  for name, field in reader.fields.items():
    try:
      fields[name] = field.contents()
    except Exception as e:
      raise CheckpointError(f"GGUF metadata {name!r} is unreadable: {e}") from e
  return fields


def config_from_fields(fields: dict, tensor_names: set[str]) -> LlamaConfig:
  arch = fields.get("general.architecture")
  if arch != "llama":
    raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (expected 'llama')")
  try:
    hidden, heads = fields["llama.embedding_length"], fields["llama.attention.head_count"]
    head_dim = fields.get("llama.attention.key_length", hidden // heads)
    vocab = fields.get("llama.vocab_size", len(fields.get("tokenizer.ggml.tokens", [])))
    if "rope_freqs.weight" in tensor_names:
      raise UnsupportedModelError("GGUF rope_freqs (llama3.1-style rope scaling baked as factors) is "
                                  "not supported yet; import the HF safetensors checkpoint instead")
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=fields["llama.block_count"],
        num_heads=heads, num_kv_heads=fields.get("llama.attention.head_count_kv", heads),
        head_dim=head_dim, intermediate_size=fields["llama.feed_forward_length"],
        rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=fields.get("llama.context_length", 4096))
  except KeyError as e:
    raise CheckpointError(f"GGUF metadata is missing {e.args[0]!r}") from e


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's ``permute``: rows [out] go from interleaved pairs to rotate-half."""
  out = w.shape[0]
  return w.reshape(num_heads, out // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t) -> np.ndarray:
  data = gguf.quants.dequantize(t.data, t.tensor_type)
  return np.asarray(data, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def load_gguf_llama(path: str | Path, dtype=jnp.bfloat16, progress: bool = True):
  """Returns (LlamaConfig, params, Tokenizer) from a llama GGUF file."""
  reader = open_gguf(path)
  fields = read_fields(reader)
  tensors = {t.name: t for t in reader.tensors}
  cfg = config_from_fields(fields, set(tensors))
  shapes = param_shapes(cfg)

  def take(name: str, shape: tuple, transform=lambda w: w):
    if name not in tensors:
      raise CheckpointError(f"GGUF {path}: missing tensor {name!r}")
    try:
      w = transform(_dequantize(tensors[name]))
    except (ValueError, NotImplementedError) as e:
      raise CheckpointError(f"GGUF {path}: cannot dequantize {name!r}: {e}") from e
    if w.shape != tuple(shape):
      raise CheckpointError(f"GGUF {path}: tensor {name!r} has shape {w.shape}, expected {shape}")
    return jnp.asarray(w, dtype)

  transposed = lambda w: w.T  # GGUF rows are output features; we store [in, out]
  params = {"embed": take("token_embd.weight", shapes["embed"]), "layers": []}
  for i in tqdm(range(cfg.num_layers), desc=f"importing {Path(path).name}", disable=not progress,
                unit="layer"):
    layer = {}
    for gguf_name, ours in _LAYER_NAMES.items():
      heads = {"wq": cfg.num_heads, "wk": cfg.num_kv_heads}.get(ours)
      if heads:
        fix = lambda w, h=heads: unpermute_rope_rows(w, h).T
      else:
        fix = transposed if ours.startswith("w") else (lambda w: w)
      layer[ours] = take(f"blk.{i}.{gguf_name}.weight", shapes["layers"][i][ours], fix)
    params["layers"].append(layer)
  params["final_norm"] = take("output_norm.weight", shapes["final_norm"])
  if not cfg.tie_word_embeddings:
    params["lm_head"] = take("output.weight", shapes["lm_head"], transposed)
  return cfg, params, Tokenizer.from_gguf_fields(fields)
