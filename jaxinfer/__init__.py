"""jaxinfer: JAX/XLA inference for LLMs and video DiTs with Pallas GPU kernels.

The public API is imported lazily, so ``import jaxinfer.errors`` (used by checkpoints/ and kernels/)
does not pull in the model loader.
"""
from jaxinfer.errors import (CheckpointError, InvalidRequestError, JaxinferError, PromptTooLongError,
                             UnsupportedModelError)

_LAZY = {"LLM": "jaxinfer.llm", "SamplingParams": "jaxinfer.sampling",
         "GenerationOutput": "jaxinfer.outputs", "LoadedModel": "jaxinfer.loader",
         "load_model": "jaxinfer.loader"}

__all__ = [*_LAZY, "JaxinferError", "CheckpointError", "InvalidRequestError", "PromptTooLongError",
           "UnsupportedModelError", "generate"]


def __getattr__(name: str):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")


def generate(prompts, sampling_params=None, model=None):
  """One-shot convenience: loads ``model`` (default: the embedded SmolLM2) and generates."""
  from jaxinfer.llm import LLM
  return LLM(model).generate(prompts, sampling_params)
