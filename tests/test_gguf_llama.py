import dataclasses

import gguf
import jax
import numpy as np
import pytest

from checkpoints.gguf_llama import load_gguf_llama, unpermute_rope_rows
from jaxinfer.errors import CheckpointError, UnsupportedModelError
from llama_fixtures import TINY, llama_cpp_permute, random_params, write_llama_gguf

Q = gguf.GGMLQuantizationType


def test_unpermute_inverts_llama_cpp_permute():
  rng = np.random.default_rng(0)
  for heads, head_dim in [(4, 16), (3, 64), (1, 8)]:
    w = rng.standard_normal((heads * head_dim, 24))
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, heads), heads), w)


# Round trip through llama.cpp's layout; the bound is each type's own quantization error.
@pytest.mark.parametrize("qtype,rel_tol", [(Q.F32, 0), (Q.F16, 1e-3), (Q.Q8_0, 1e-2), (Q.Q4_1, 0.12)])
def test_gguf_round_trip(tmp_path, qtype, rel_tol):
  params = random_params(TINY, seed=int(qtype))
  path = tmp_path / "tiny.gguf"
  write_llama_gguf(path, TINY, params, qtype)
  cfg, loaded, tok = load_gguf_llama(path, np.float32, progress=False)
  assert cfg.rms_norm_eps == pytest.approx(TINY.rms_norm_eps)  # stored as float32
  assert dataclasses.replace(cfg, rms_norm_eps=TINY.rms_norm_eps) == dataclasses.replace(
      TINY, tie_word_embeddings="lm_head" not in params)
  for (kp, want), got in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(loaded)):
    want, got = np.asarray(want), np.asarray(got)
    assert got.shape == want.shape, kp
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= rel_tol + 1e-7, (jax.tree_util.keystr(kp), err)
  assert tok.decode(tok.encode("hello world")) == "hello world"


def test_missing_file_and_corrupt_file(tmp_path):
  with pytest.raises(CheckpointError, match="no such GGUF"):
    load_gguf_llama(tmp_path / "absent.gguf")
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(np.random.default_rng(1).bytes(4096))
  with pytest.raises(CheckpointError, match="not a readable GGUF"):
    load_gguf_llama(bad)


def test_unknown_architecture(tmp_path):
  path = tmp_path / "mamba.gguf"
  write_llama_gguf(path, TINY, random_params(TINY, 0), arch="mamba")
  with pytest.raises(UnsupportedModelError, match="'mamba'"):
    load_gguf_llama(path, progress=False)


def test_missing_tensor_is_named(tmp_path):
  path = tmp_path / "partial.gguf"
  write_llama_gguf(path, TINY, random_params(TINY, 0), skip=("blk.1.ffn_up.weight",))
  with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight"):
    load_gguf_llama(path, progress=False)
