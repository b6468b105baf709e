"""What a finished generation request returns."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class GenerationOutput:
  prompt: str | None
  prompt_token_ids: list[int]
  text: str
  token_ids: list[int]
  finish_reason: str                    # "stop" (eos, stop id or stop string) | "length"
  logprobs: list[float] | None = None   # of each chosen token, when requested
