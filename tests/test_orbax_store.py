import jax
import numpy as np
import pytest

from checkpoints import orbax_store
from jaxinfer.errors import CheckpointError
from jaxinfer.loader import load_model
from llama_fixtures import TINY, random_params, write_llama_gguf


def test_save_and_restore_round_trip(tmp_path):
  params = random_params(TINY, seed=11)
  write_llama_gguf(tmp_path / "m.gguf", TINY, params)
  imported = load_model(tmp_path / "m.gguf", dtype=np.float32, progress=False)
  imported.save(tmp_path / "ours")
  restored = load_model(tmp_path / "ours", dtype=np.float32)
  assert restored.config == imported.config
  for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  text = "round trip"
  assert restored.tokenizer.encode(text) == imported.tokenizer.encode(text)


def test_corrupt_header_and_missing_params(tmp_path):
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / orbax_store.HEADER).write_text("{not json")
  with pytest.raises(CheckpointError, match="unreadable jaxinfer checkpoint header"):
    load_model(tmp_path / "bad")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / orbax_store.HEADER).write_text(
      '{"format": 1, "architecture": "llama", "config": ' +
      '{"vocab_size": 8, "hidden_size": 8, "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, '
      '"head_dim": 8, "intermediate_size": 8}}')
  with pytest.raises(CheckpointError, match="cannot restore params"):
    load_model(tmp_path / "empty")


def test_saving_a_served_model_writes_the_checkpoint_layout(tmp_path):
  """LLM serves Llama with fused projections; saving its model must still give a loadable checkpoint."""
  from jaxinfer.llm import LLM
  params = random_params(TINY, seed=12)
  write_llama_gguf(tmp_path / "m.gguf", TINY, params)
  imported = load_model(tmp_path / "m.gguf", dtype=np.float32, progress=False)
  served = LLM(imported, page_size=8, prefill_chunk=8, max_batch=2).model
  assert "wqkv" in served.params["layers"][0]
  served.save(tmp_path / "ours")
  restored = load_model(tmp_path / "ours", dtype=np.float32)
  assert set(restored.params["layers"][0]) == set(imported.params["layers"][0])
  for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
