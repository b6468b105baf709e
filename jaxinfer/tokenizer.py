"""Tokenizer and chat template: HF `tokenizers` built from a GGUF vocabulary or a tokenizer.json, and
the checkpoint's own chat template rendered with jinja2 the way transformers renders it."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxinfer.errors import CheckpointError, InvalidRequestError, UnsupportedModelError

_GGUF_CONTROL = 3  # llama.cpp token type of special/control tokens
# llama.cpp pre-tokenizer names whose splitting we reproduce (see llama-vocab.cpp).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                   r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str):
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("gpt2", "default", ""):
    return byte_level
  if pre in ("smollm", "starcoder", "refact"):
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in ("llama-bpe", "llama3", "smaug-bpe"):
    split = pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_PATTERN), behavior="isolated")
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                    use_regex=False)])
  raise UnsupportedModelError(f"unsupported GGUF pre-tokenizer {pre!r}")


@dataclasses.dataclass
class Tokenizer:
  backend: tokenizers.Tokenizer
  bos_token_id: int | None
  eos_token_ids: tuple[int, ...]
  add_bos: bool
  chat_template: str | None = None

  @classmethod
  def from_gguf_fields(cls, fields: dict) -> Tokenizer:
    """From GGUF metadata (``tokenizer.ggml.*`` values, already decoded to Python objects)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise UnsupportedModelError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level "
                                  "BPE, tokenizer.ggml.model == 'gpt2')")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
      raise CheckpointError("GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(fields.get("tokenizer.ggml.pre", "gpt2"))
    backend.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == _GGUF_CONTROL])
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    # HF's GPT-2 style tokenizers add no BOS; llama.cpp's flag is honoured only when it names a
    # real beginning-of-text token distinct from the chat markers.
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False)) and bos is not None and \
        tokens[bos] in ("<s>", "<|begin_of_text|>", "<bos>")
    return cls(backend, bos, (eos,) if eos is not None else (), add_bos,
               fields.get("tokenizer.chat_template"))

  @classmethod
  def from_hf_dir(cls, path: str | Path) -> Tokenizer:
    """From a HF checkpoint folder: tokenizer.json plus tokenizer_config.json / config.json."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
      raise CheckpointError(f"{path}: no tokenizer.json")
    backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tcfg = _read_json(path / "tokenizer_config.json")
    mcfg = _read_json(path / "config.json")
    token_id = lambda t: backend.token_to_id(t["content"] if isinstance(t, dict) else t) if t else None
    bos = token_id(tcfg.get("bos_token")) if "bos_token" in tcfg else mcfg.get("bos_token_id")
    eos_cfg = mcfg.get("eos_token_id")
    eos = tuple(eos_cfg) if isinstance(eos_cfg, list) else (
        (eos_cfg,) if eos_cfg is not None else ((token_id(tcfg.get("eos_token")),)
                                                 if tcfg.get("eos_token") else ()))
    # A post-processor (e.g. Llama-3's TemplateProcessing) adds BOS itself.
    add_bos = bool(tcfg.get("add_bos_token", False)) and backend.post_processor is None
    return cls(backend, bos, eos, add_bos, tcfg.get("chat_template"))

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    if not isinstance(text, str):
      raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}")
    ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
    if add_special_tokens and self.add_bos and self.bos_token_id is not None:
      ids = [self.bos_token_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_text(self, token_id: int) -> str:
    return self.backend.id_to_token(token_id) or ""

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Renders the checkpoint's chat template as transformers does (sandboxed jinja2, trimmed blocks)."""
    if not self.chat_template:
      raise InvalidRequestError("this model has no chat template")
    for m in messages:
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise InvalidRequestError(f"chat messages need 'role' and 'content', got {m!r}")
    return _compile_template(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=self.token_text(self.bos_token_id) if self.bos_token_id is not None else "",
        eos_token=self.token_text(self.eos_token_ids[0]) if self.eos_token_ids else "")


def _read_json(path: Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def _raise(message):
  raise InvalidRequestError(f"chat template error: {message}")


def _compile_template(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
  env.globals["raise_exception"] = _raise
  return env.from_string(source)
