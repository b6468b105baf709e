"""A tiny random Llama and a byte-level tokenizer: a self-contained model for tests, demos and the
server's ``--model=toy`` (no checkpoint needed). Outputs are random-model gibberish."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxinfer.models import llama

BYTE_OFFSET = 3  # ids 0..2 are <pad>, <bos>, <eos>; byte b is id b + 3


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as tokens. ``decode`` replaces incomplete/invalid byte sequences with U+FFFD."""
  bos_token_id: int = 1
  eos_token_ids: tuple[int, ...] = (2,)
  vocab_size: int = 256 + BYTE_OFFSET

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
    return [self.bos_token_id, *ids] if add_special_tokens else ids

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")

  def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + "assistant: " if add_generation_prompt else text


def toy_config(max_position_embeddings: int = 512) -> llama.LlamaConfig:
  return llama.LlamaConfig(vocab_size=ByteTokenizer().vocab_size, hidden_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                           max_position_embeddings=max_position_embeddings)


def toy_params(cfg: llama.LlamaConfig, seed: int = 0, dtype=jnp.float32):
  return llama.init_params(cfg, jax.random.key(seed), dtype)
