"""Generation through the LLM API (on the serving engine) on the random HF golden model (no tokenizer: prompts
are token ids), and its errors."""
from pathlib import Path

import numpy as np
import pytest

from jaxinfer.errors import InvalidRequestError, PromptTooLongError
from jaxinfer.llm import LLM
from jaxinfer.loader import load_model
from jaxinfer.sampling import SamplingParams

GOLDEN = Path(__file__).parent / "goldens" / "llama" / "random"


@pytest.fixture(scope="module")
def llm():
  return LLM(load_model(GOLDEN, dtype=np.float32, progress=False), page_size=8, prefill_chunk=32)


def _prompts(seed, lengths, vocab=512):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


def test_batched_ragged_generation_equals_one_at_a_time(llm):
  # 45 tokens > prefill_chunk, so prompts are also split across steps.
  prompts = _prompts(0, [5, 45, 17, 1])
  params = SamplingParams(max_tokens=12, ignore_eos=True)
  batched = llm.generate(prompts, params, use_tqdm=False)
  for prompt, out in zip(prompts, batched):
    single = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.token_ids == single.token_ids
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_greedy_continuation_equals_argmax_of_full_forward(llm):
  """Each generated token is the argmax of the model on prompt + previous tokens (HF-checked logits)."""
  from test_safetensors_llama import _logits
  prompt = _prompts(1, [9])[0]
  out = llm.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
  seq = np.array([prompt + out.token_ids[:-1]])
  logits = _logits(llm.model.config, llm.model.params, seq)[0]
  np.testing.assert_array_equal(logits[len(prompt) - 1:].argmax(-1), out.token_ids)


def test_stop_token_ids_and_logprobs(llm):
  prompt = _prompts(2, [7])[0]
  free = llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
  stop_at = free.token_ids[3]
  first = free.token_ids.index(stop_at)
  out = llm.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=(stop_at,), logprobs=True,
                                              ignore_eos=True), use_tqdm=False)[0]
  assert out.token_ids == free.token_ids[:first] and out.finish_reason == "stop"
  assert len(out.logprobs) == first and all(lp <= 0 for lp in out.logprobs)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
  prompts = _prompts(3, [4, 11])
  p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=42, ignore_eos=True)
  a = llm.generate(prompts, p, use_tqdm=False)
  b = llm.generate(prompts[1:], p, use_tqdm=False)
  assert a[1].token_ids == b[0].token_ids


def test_bad_requests_raise_typed_errors(llm):
  ctx = llm.model.max_context
  with pytest.raises(InvalidRequestError, match="empty prompt"):
    llm.generate([[]], SamplingParams(), use_tqdm=False)
  with pytest.raises(InvalidRequestError, match="empty prompt"):
    llm.generate("", SamplingParams(), use_tqdm=False)
  with pytest.raises(PromptTooLongError, match=f"context is {ctx}"):
    llm.generate([[1] * ctx], SamplingParams(), use_tqdm=False)
  with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 512\)"):
    llm.generate([[3, 512]], SamplingParams(), use_tqdm=False)
  with pytest.raises(InvalidRequestError, match="no tokenizer"):
    llm.generate("hello", SamplingParams(), use_tqdm=False)
  with pytest.raises(InvalidRequestError, match="no prompts"):
    llm.generate([], SamplingParams(), use_tqdm=False)
  with pytest.raises(InvalidRequestError, match="max_tokens"):
    llm.generate([[1, 2]], SamplingParams(max_tokens=-1), use_tqdm=False)
  with pytest.raises(InvalidRequestError, match="top_p"):
    llm.generate([[1, 2]], SamplingParams(top_p=1.01), use_tqdm=False)
  # The engine still serves after bad requests.
  assert len(llm.generate([[1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids) <= 2


def test_generation_clipped_at_context(llm):
  ctx = llm.model.max_context
  out = llm.generate([[5] * (ctx - 3)], SamplingParams(max_tokens=50, ignore_eos=True),
                     use_tqdm=False)[0]
  assert len(out.token_ids) == 3 and out.finish_reason == "length"
