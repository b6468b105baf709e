"""jaxinfer's own checkpoint format: converted params saved with orbax-checkpoint, beside a JSON
header (architecture, config) and the tokenizer. Restoring skips dequantization and layout work, so it
is the fast path after a first import.

    <folder>/jaxinfer.json      {"format": 1, "architecture": "llama", "config": {...}}
    <folder>/tokenizer.json     HF tokenizers serialisation
    <folder>/tokenizer_meta.json  bos/eos ids, add_bos, chat template
    <folder>/params/            orbax StandardCheckpointer tree
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import orbax.checkpoint as ocp
import tokenizers

from jaxinfer.errors import CheckpointError, UnsupportedModelError
from jaxinfer.tokenizer import Tokenizer

HEADER = "jaxinfer.json"
FORMAT_VERSION = 1


def is_orbax_checkpoint(folder: str | Path) -> bool:
  return (Path(folder) / HEADER).is_file()


def save(folder: str | Path, architecture: str, config, params, tokenizer: Tokenizer | None) -> None:
  folder = Path(folder).absolute()
  folder.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(folder / "params", params, force=True)
  checkpointer.wait_until_finished()
  if tokenizer is not None:
    (folder / "tokenizer.json").write_text(tokenizer.backend.to_str())
    (folder / "tokenizer_meta.json").write_text(json.dumps({
        "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": list(tokenizer.eos_token_ids),
        "add_bos": tokenizer.add_bos, "chat_template": tokenizer.chat_template}))
  header = {"format": FORMAT_VERSION, "architecture": architecture,
            "config": _config_to_json(config)}
  (folder / HEADER).write_text(json.dumps(header, indent=1))  # written last: marks completion


def read_header(folder: str | Path) -> dict:
  path = Path(folder) / HEADER
  try:
    header = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: unreadable jaxinfer checkpoint header ({e})") from e
  if header.get("format") != FORMAT_VERSION:
    raise CheckpointError(f"{path}: unsupported format version {header.get('format')!r}")
  return header


def restore(folder: str | Path, abstract_params):
  """Restores params matching ``abstract_params`` (a pytree of jax.ShapeDtypeStruct)."""
  folder = Path(folder).absolute()
  try:
    return ocp.StandardCheckpointer().restore(folder / "params", abstract_params)
  except Exception as e:  # orbax raises many types for missing/corrupt/mismatched trees
    raise CheckpointError(f"{folder}: cannot restore params ({type(e).__name__}: {e})") from e


def restore_tokenizer(folder: str | Path) -> Tokenizer | None:
  folder = Path(folder)
  if not (folder / "tokenizer.json").is_file():
    return None
  meta = json.loads((folder / "tokenizer_meta.json").read_text())
  return Tokenizer(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")),
                   meta["bos_token_id"], tuple(meta["eos_token_ids"]), meta["add_bos"],
                   meta["chat_template"])


def _config_to_json(config) -> dict:
  return dataclasses.asdict(config)


def config_from_json(cls, data: dict):
  """Rebuilds a (possibly nested) frozen config dataclass from its asdict() form."""
  kwargs = {}
  hints = {f.name: f for f in dataclasses.fields(cls)}
  for name, value in data.items():
    if name not in hints:
      raise UnsupportedModelError(f"unknown config field {name!r} for {cls.__name__}")
    sub = _nested_dataclass(cls, name)
    kwargs[name] = config_from_json(sub, value) if sub and isinstance(value, dict) else (
        tuple(value) if isinstance(value, list) else value)
  return cls(**kwargs)


def _nested_dataclass(cls, field_name):
  import typing
  hint = typing.get_type_hints(cls).get(field_name)
  for arg in (*typing.get_args(hint), hint):
    if dataclasses.is_dataclass(arg):
      return arg
  return None
