"""Our Llama on HF checkpoints vs HF transformers' LlamaForCausalLM logits (goldens made by
tests/goldens/make_llama_goldens.py). Bound: top-1 identical at every position and
max |Δlogit| <= 1e-4 x the logits' max magnitude (both sides float32)."""
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.safetensors_llama import load_safetensors_llama
from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.errors import CheckpointError, UnsupportedModelError
from jaxinfer.models import llama

GOLDENS = Path(__file__).parent / "goldens" / "llama"


def _logits(cfg, params, input_ids: np.ndarray) -> np.ndarray:
  """All-position logits for a batch of equal-length sequences, run as one flattened step."""
  B, S = input_ids.shape
  page = 16
  per_seq = -(-S // page)
  chunks = [SeqChunk(list(range(1 + b * per_seq, 1 + (b + 1) * per_seq)), 0, S) for b in range(B)]
  batch = build_batch(chunks, page, num_tokens=B * S, num_seqs=B, pages_per_seq=per_seq)
  cache = llama.create_cache(cfg, num_pages=1 + B * per_seq, page_size=page, dtype=jnp.float32)
  logits, _ = llama.forward_jit(params, jnp.asarray(input_ids.reshape(-1)), cache, batch, cfg=cfg,
                                all_logits=True)
  return np.asarray(logits).reshape(B, S, -1)


@pytest.mark.parametrize("name", ["random", "random_tied"])
def test_logits_match_transformers(name):
  golden = np.load(GOLDENS / name / "logits.npz")
  cfg, params = load_safetensors_llama(GOLDENS / name, dtype=jnp.float32, progress=False)
  got = _logits(cfg, params, golden["input_ids"])
  want = golden["logits"]
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def _copy(tmp_path, name="random"):
  dst = tmp_path / name
  shutil.copytree(GOLDENS / name, dst)
  return dst


def test_missing_tensor_wrong_shape_and_corrupt_file(tmp_path):
  from safetensors.numpy import load_file, save_file
  folder = _copy(tmp_path)
  tensors = load_file(folder / "model.safetensors")
  del tensors["model.layers.2.mlp.up_proj.weight"]
  save_file(tensors, folder / "model.safetensors")
  with pytest.raises(CheckpointError, match="model.layers.2.mlp.up_proj.weight"):
    load_safetensors_llama(folder, progress=False)

  folder = _copy(tmp_path / "shape")
  tensors = load_file(folder / "model.safetensors")
  tensors["model.layers.0.self_attn.k_proj.weight"] = tensors[
      "model.layers.0.self_attn.k_proj.weight"][:-1]
  save_file(tensors, folder / "model.safetensors")
  with pytest.raises(CheckpointError, match="k_proj.weight.*shape"):
    load_safetensors_llama(folder, progress=False)

  folder = _copy(tmp_path / "corrupt")
  (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(1000))
  with pytest.raises(CheckpointError, match="not a readable safetensors"):
    load_safetensors_llama(folder, progress=False)


def test_unknown_architecture_and_missing_config(tmp_path):
  folder = _copy(tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
    load_safetensors_llama(folder, progress=False)
  (folder / "config.json").unlink()
  with pytest.raises(CheckpointError, match="no config.json"):
    load_safetensors_llama(folder, progress=False)
