"""Reading a HF / diffusers checkpoint folder's ``config.json`` with typed errors."""
from __future__ import annotations

import json
from pathlib import Path

from jaxinfer.errors import CheckpointError


def read_hf_config(folder: str | Path) -> dict:
  path = Path(folder) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{folder}: no config.json")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from e
