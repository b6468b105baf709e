"""Tokenizer built from a HF folder (tokenizer.json + tokenizer_config.json), checked against the ids
HF transformers produced for the default model (tests/goldens/llama/smollm2.npz)."""
import json
from pathlib import Path

import numpy as np
import pytest

from checkpoints.default_model import default_model_path
from checkpoints.gguf_llama import open_gguf, read_fields
from jaxinfer.errors import CheckpointError, InvalidRequestError
from jaxinfer.tokenizer import Tokenizer

GOLDEN = np.load(Path(__file__).parent / "goldens" / "llama" / "smollm2.npz")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """The default model's vocabulary written out as a HF tokenizer folder."""
  gguf_tok = Tokenizer.from_gguf_fields(read_fields(open_gguf(default_model_path())))
  folder = tmp_path_factory.mktemp("hf_tok")
  (folder / "tokenizer.json").write_text(gguf_tok.backend.to_str())
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
      "chat_template": str(GOLDEN["chat_template"])}))
  (folder / "config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
  return folder


def test_hf_folder_tokenizer_matches_hf_ids(hf_folder):
  tok = Tokenizer.from_hf_dir(hf_folder)
  assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
  for i in range(6):
    assert tok.encode(str(GOLDEN[f"tok{i}_text"])) == GOLDEN[f"tok{i}_ids"].tolist()
  chat = [{"role": "user", "content": "What is 2+2?"}]
  assert tok.apply_chat_template(chat) == str(GOLDEN["chat_user_only"])


def test_bad_inputs(hf_folder, tmp_path):
  tok = Tokenizer.from_hf_dir(hf_folder)
  with pytest.raises(InvalidRequestError, match="role"):
    tok.apply_chat_template([{"content": "no role"}])
  with pytest.raises(InvalidRequestError, match="must be a string"):
    tok.encode(b"bytes")
  with pytest.raises(CheckpointError, match="no tokenizer.json"):
    Tokenizer.from_hf_dir(tmp_path)
  bare = Tokenizer(tok.backend, None, (), False, chat_template=None)
  with pytest.raises(InvalidRequestError, match="no chat template"):
    bare.apply_chat_template([{"role": "user", "content": "hi"}])
