"""A generation request's state inside the engine, and the outputs the engine reports for it."""
from __future__ import annotations

import dataclasses
import enum

from jaxinfer.sampling import SamplingParams


class RequestStatus(enum.Enum):
  WAITING = "waiting"      # queued, or preempted and waiting to recompute
  RUNNING = "running"      # owns KV pages and is scheduled every step
  FINISHED = "finished"


class FinishReason(str, enum.Enum):
  STOP = "stop"            # a stop token id or EOS (not included in the output), or a stop string
  LENGTH = "length"        # max_tokens, the model's context, or the whole KV cache
  CANCELLED = "cancelled"


@dataclasses.dataclass(eq=False)
class Request:
  request_id: str
  prompt_token_ids: list[int]
  params: SamplingParams
  arrival_time: float
  max_output_tokens: int            # params.max_tokens clipped to the model's context
  stop_token_ids: frozenset[int]    # params.stop_token_ids plus EOS unless ignore_eos
  output_token_ids: list[int] = dataclasses.field(default_factory=list)
  output_logprobs: list[float] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)
  num_computed: int = 0             # tokens whose K/V are in the cache
  status: RequestStatus = RequestStatus.WAITING
  finish_reason: FinishReason | None = None
  num_preemptions: int = 0
  first_token_time: float | None = None
  last_token_time: float | None = None
  text: str = ""                    # detokenized output (stop string excluded), when a tokenizer is set
  num_text_sent: int = 0            # chars of ``text`` already streamed
  prefix_offset: int = 0            # incremental detokenization window (see LLMEngine._detokenize)
  read_offset: int = 0
  text_final: bool = False          # a stop string cut ``text``: nothing more is appended
  num_tokens_sent: int = 0          # output tokens already streamed
  # Async scheduling: rows of the in-flight step whose sampled token (not yet on the host) is this
  # request's next output token, oldest first. Counted in ``num_tokens``, so the scheduler schedules
  # them; the step reads them from the previous step's device output (``step.PENDING``).
  pending_rows: list[int] = dataclasses.field(default_factory=list)

  @property
  def num_tokens(self) -> int:
    """Known tokens (prompt and output) plus tokens sampled but not yet on the host."""
    return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.pending_rows)

  @property
  def num_output_tokens(self) -> int:
    """Output tokens, pending ones included (what ``max_output_tokens`` bounds)."""
    return len(self.output_token_ids) + len(self.pending_rows)

  def tokens(self, start: int, stop: int) -> list[int]:
    """Token ids of positions [start, stop); a pending token (sampled by row r of the in-flight
    step) is given as ``-(r + 1)``."""
    n = len(self.prompt_token_ids)
    if stop <= n:
      return self.prompt_token_ids[start:stop]
    known = n + len(self.output_token_ids)
    ids = (self.prompt_token_ids[start:] + self.output_token_ids[:stop - n] if start < n
           else self.output_token_ids[start - n:stop - n])
    if stop > known:
      ids += [-(r + 1) for r in self.pending_rows[max(start, known) - known:stop - known]]
    return ids

  @property
  def finished(self) -> bool:
    return self.status is RequestStatus.FINISHED


@dataclasses.dataclass(frozen=True)
class RequestOutput:
  """What one step produced for one request: the tokens (and text) new since the last output, and
  once ``finished``, the reason. ``token_ids``/``text`` of a finished output are the whole output."""
  request_id: str
  new_token_ids: tuple[int, ...]
  new_logprobs: tuple[float, ...] | None
  new_text: str
  finished: bool
  finish_reason: FinishReason | None = None
  token_ids: tuple[int, ...] = ()
  text: str = ""
  logprobs: tuple[float, ...] | None = None
  num_prompt_tokens: int = 0
