"""Shared test helpers: tiny Llama configs and a writer of llama.cpp-style GGUF files."""
from __future__ import annotations

from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import pre_tokenizers

from jaxinfer.models import llama

TINY = llama.LlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=96, rope_theta=10000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=128)


def random_params(cfg: llama.LlamaConfig, seed: int, dtype=jnp.float32, std: float = 0.1):
  params = llama.init_params(cfg, jax.random.key(seed), dtype)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  # Non-trivial norm weights too, so a swapped or dropped norm shows up in the logits.
  return jax.tree.map(lambda p: (p / 0.02 * std if p.ndim == 2 else
                                 1 + 0.2 * jax.random.normal(next(keys), p.shape)).astype(dtype),
                      params)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """What llama.cpp's convert_hf_to_gguf.py does to HF q/k rows (LlamaModel.permute)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, cfg: llama.LlamaConfig, params, qtype=gguf.GGMLQuantizationType.F32,
                     arch: str = "llama", skip: tuple[str, ...] = ()) -> None:
  """Writes params (our [in, out] layout) as a llama.cpp GGUF with a byte-level BPE vocabulary."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  w.add_token_list(alphabet[:cfg.vocab_size])
  w.add_token_types([1] * cfg.vocab_size)
  w.add_token_merges([])
  w.add_eos_token_id(0)

  def add(name, arr, quantize=True):
    if name in skip:
      return
    arr = np.ascontiguousarray(np.asarray(arr, np.float32))
    if quantize and arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
      if qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
      else:
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(name, arr)

  add("token_embd.weight", params["embed"])
  for i, layer in enumerate(params["layers"]):
    p = f"blk.{i}."
    add(p + "attn_norm.weight", layer["attn_norm"], False)
    add(p + "attn_q.weight", llama_cpp_permute(np.asarray(layer["wq"]).T, cfg.num_heads))
    add(p + "attn_k.weight", llama_cpp_permute(np.asarray(layer["wk"]).T, cfg.num_kv_heads))
    add(p + "attn_v.weight", np.asarray(layer["wv"]).T)
    add(p + "attn_output.weight", np.asarray(layer["wo"]).T)
    add(p + "ffn_norm.weight", layer["mlp_norm"], False)
    add(p + "ffn_gate.weight", np.asarray(layer["w_gate"]).T)
    add(p + "ffn_up.weight", np.asarray(layer["w_up"]).T)
    add(p + "ffn_down.weight", np.asarray(layer["w_down"]).T)
  add("output_norm.weight", params["final_norm"], False)
  if "lm_head" in params:
    add("output.weight", np.asarray(params["lm_head"]).T)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
