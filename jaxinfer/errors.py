"""Typed errors raised by jaxinfer. Every bad input maps to one of these, with a message naming it."""


class JaxinferError(Exception):
  """Base class of every error jaxinfer raises on purpose."""


class CheckpointError(JaxinferError):
  """A checkpoint is missing, unreadable, corrupt, or does not match the model it claims."""


class UnsupportedModelError(JaxinferError):
  """The checkpoint's architecture (or a feature of it) is not one jaxinfer implements."""


class InvalidRequestError(JaxinferError, ValueError):
  """A generation request or sampling parameter is invalid (empty prompt, top_p outside (0, 1], ...)."""


class PromptTooLongError(InvalidRequestError):
  """The prompt (plus at least one generated token) does not fit the model's context or the KV cache."""


class ResourceExhaustedError(JaxinferError):
  """The engine cannot take more work right now (queue full, KV cache exhausted)."""


class RequestCancelledError(JaxinferError):
  """The request was cancelled before it finished."""


class ShapeError(JaxinferError, ValueError):
  """Arrays passed to a kernel or op have inconsistent shapes, dtypes or layouts."""


class EngineUnavailableError(JaxinferError):
  """The engine is not accepting requests (shutting down, or stopped after an internal failure)."""
