"""The notebook-facing API: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from jaxinfer import generation
from jaxinfer.compilation_cache import enable_compilation_cache
from jaxinfer.errors import InvalidRequestError
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.outputs import GenerationOutput
from jaxinfer.sampling import SamplingParams


class LLM:
  """A loaded model ready to generate. ``model``: None (embedded default), a .gguf file, a HF folder,
  a jaxinfer orbax folder, or an already loaded ``LoadedModel``."""

  def __init__(self, model: str | LoadedModel | None = None, *, dtype=None,
               page_size: int = 16, prefill_chunk: int = 512):
    enable_compilation_cache()
    self.model = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype)
    self.tokenizer = self.model.tokenizer
    self.page_size = page_size
    self.prefill_chunk = prefill_chunk

  def encode_prompt(self, prompt: str | Sequence[int] | Sequence[dict]) -> list[int]:
    """A string, token ids, or a chat (list of {'role', 'content'} messages)."""
    if isinstance(prompt, str):
      if not prompt:
        raise InvalidRequestError("empty prompt")
      return self._tok().encode(prompt)
    prompt = list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
      text = self._tok().apply_chat_template(prompt, add_generation_prompt=True)
      return self._tok().encode(text, add_special_tokens=False)
    if all(isinstance(t, int) for t in prompt):
      return prompt
    raise InvalidRequestError("a prompt is a string, a list of token ids, or a list of chat messages")

  def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
               *, use_tqdm: bool = True) -> list[GenerationOutput]:
    """Generates for one prompt or a list of prompts (strings, token id lists or chats)."""
    single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict)))
    prompts = [prompts] if single else list(prompts)
    if not prompts:
      raise InvalidRequestError("no prompts given")
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
      sampling_params = [sampling_params or SamplingParams()] * len(prompts)
    ids = [self.encode_prompt(p) for p in prompts]
    eos = self.tokenizer.eos_token_ids if self.tokenizer else ()
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not use_tqdm)
    outputs = generation.generate(
        self.model, ids, list(sampling_params), page_size=self.page_size,
        prefill_chunk=self.prefill_chunk, eos_token_ids=eos,
        decode=self.tokenizer.decode if self.tokenizer else None, on_finish=lambda i: bar.update())
    bar.close()
    for out, p in zip(outputs, prompts):
      out.prompt = p if isinstance(p, str) else None
    return outputs

  def _tok(self):
    if self.tokenizer is None:
      raise InvalidRequestError("this checkpoint has no tokenizer: pass token ids")
    return self.tokenizer
