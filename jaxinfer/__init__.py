"""jaxinfer: JAX/XLA inference for LLMs and video DiTs with Pallas GPU kernels."""
from jaxinfer.errors import (CheckpointError, InvalidRequestError, JaxinferError, PromptTooLongError,
                             UnsupportedModelError)
from jaxinfer.llm import LLM
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.outputs import GenerationOutput
from jaxinfer.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "GenerationOutput", "LoadedModel", "load_model",
           "JaxinferError", "CheckpointError", "InvalidRequestError", "PromptTooLongError",
           "UnsupportedModelError", "generate"]


def generate(prompts, sampling_params=None, model=None):
  """One-shot convenience: loads ``model`` (default: the embedded SmolLM2) and generates."""
  return LLM(model).generate(prompts, sampling_params)
