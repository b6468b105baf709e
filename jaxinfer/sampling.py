"""Per-request sampling parameters and one batched sampler that serves mixed requests in one step.

Each row of the logits batch carries its own temperature / top-k / top-p / key, so greedy and sampled
requests share one compiled function. Temperature 0 means greedy.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import InvalidRequestError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0            # 0: no top-k cut
  top_p: float = 1.0        # in (0, 1]
  seed: int | None = None
  stop_token_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()
  logprobs: bool = False
  ignore_eos: bool = False

  def __post_init__(self):
    if isinstance(self.stop, str):
      object.__setattr__(self, "stop", (self.stop,))
    object.__setattr__(self, "stop", tuple(self.stop))
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    if not isinstance(self.max_tokens, (int, np.integer)) or self.max_tokens <= 0:
      raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
    if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
      raise InvalidRequestError(f"temperature must be finite and >= 0, got {self.temperature!r}")
    if not (0.0 < self.top_p <= 1.0):
      raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if self.top_k < 0:
      raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
    if any(not s for s in self.stop):
      raise InvalidRequestError("stop strings must be non-empty")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  def resolved_seed(self) -> int:
    """The request's uint32 seed; a fresh random one when it set none."""
    return (self.seed if self.seed is not None else np.random.randint(0, 2**31)) & 0xFFFFFFFF


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
  """Per-row sampling settings as arrays: [B] each; ``keys`` is [B] typed PRNG keys."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  keys: jax.Array

  @classmethod
  def from_params(cls, params: Sequence[SamplingParams | None], steps: Sequence[int],
                  num_rows: int) -> SamplingBatch:
    """Rows past len(params) (or None) are padding and sample greedily. The key of a row is
    fold_in(key(seed), step), so a seeded request draws the same tokens however it is batched."""
    temp = np.zeros(num_rows, np.float32)
    top_k = np.zeros(num_rows, np.int32)
    top_p = np.ones(num_rows, np.float32)
    seeds = np.zeros(num_rows, np.uint32)
    step_arr = np.zeros(num_rows, np.uint32)
    for i, (p, s) in enumerate(zip(params, steps)):
      if p is None:
        continue
      temp[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
      seeds[i] = p.resolved_seed()
      step_arr[i] = s
    keys = _row_keys_jit(jnp.asarray(seeds), jnp.asarray(step_arr))
    return cls(jnp.asarray(temp), jnp.asarray(top_k), jnp.asarray(top_p), keys)


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
  """Per-row PRNG keys fold_in(key(seed), step) from uint32 [B] seeds and steps."""
  return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)


_row_keys_jit = jax.jit(row_keys)


def sample(logits: jax.Array, sb: SamplingBatch | None) -> tuple[jax.Array, jax.Array]:
  """logits [B, V] float32 -> (tokens [B] int32, logprobs of the chosen tokens [B]).

  Logprobs are of the model's distribution (before temperature and truncation), as vLLM reports them.
  An all-greedy batch skips the full-vocabulary sort (milliseconds at a 128k vocabulary): statically
  when ``sb`` is None (the caller knows every row is greedy), else by a runtime ``lax.cond`` (on GPU
  a conditional makes the host wait for the device to reach it: callers that know should say so).
  """
  logits = logits.astype(jnp.float32)
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if sb is None:
    tokens = greedy_tok
  else:
    tokens = jax.lax.cond(jnp.all(sb.temperature == 0), lambda: greedy_tok,
                          lambda: _draw(logits, sb, greedy_tok))
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
  return tokens, logprobs


def _draw(logits: jax.Array, sb: SamplingBatch, greedy_tok: jax.Array) -> jax.Array:
  """Temperature / top-k / top-p draws per row; greedy rows keep ``greedy_tok``."""
  V = logits.shape[-1]
  t = jnp.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
  scaled = logits / t
  sorted_desc = -jnp.sort(-scaled, axis=-1)
  k = jnp.where((sb.top_k <= 0) | (sb.top_k > V), V, sb.top_k)
  kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs       # mass of strictly better tokens
  keep_sorted = mass_before < sb.top_p[:, None]
  pth = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  masked = jnp.where((scaled >= kth) & (scaled >= pth), scaled, -jnp.inf)
  drawn = jax.vmap(jax.random.categorical)(sb.keys, masked)
  return jnp.where(sb.temperature > 0, drawn, greedy_tok).astype(jnp.int32)


sample_jit = jax.jit(sample)
