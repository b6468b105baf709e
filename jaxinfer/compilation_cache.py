"""JAX's persistent compilation cache, on by default so a second run skips XLA compilation.

``JAXINFER_COMPILATION_CACHE`` overrides the folder (default ~/.cache/jaxinfer/xla); set it to ``0``
to turn the cache off.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

_enabled = False


def enable_compilation_cache() -> str | None:
  global _enabled
  setting = os.environ.get("JAXINFER_COMPILATION_CACHE", "")
  if setting == "0":
    return None
  folder = setting or str(Path.home() / ".cache" / "jaxinfer" / "xla")
  if not _enabled:
    Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    _enabled = True
  return folder
