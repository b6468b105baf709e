import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import InvalidRequestError
from jaxinfer.sampling import SamplingBatch, SamplingParams, sample_jit


def _draws(logits, params, n):
  rows = np.repeat(logits[None], n, axis=0)
  sb = SamplingBatch.from_params([params] * n, list(range(n)), n)
  tokens, _ = sample_jit(jnp.asarray(rows), sb)
  return np.asarray(tokens)


def test_greedy_picks_argmax_and_reports_logprob():
  logits = np.random.default_rng(0).standard_normal((5, 40)).astype(np.float32)
  sb = SamplingBatch.from_params([SamplingParams()] * 5, [0] * 5, 8)
  tokens, logprobs = sample_jit(jnp.asarray(np.pad(logits, ((0, 3), (0, 0)))), sb)
  np.testing.assert_array_equal(np.asarray(tokens)[:5], logits.argmax(-1))
  ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(logprobs)[:5], ref[np.arange(5), logits.argmax(-1)], rtol=1e-5)
  # the static all-greedy path (no SamplingBatch: no sort, no runtime branch) gives the same
  tokens, logprobs = sample_jit(jnp.asarray(logits), None)
  np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))
  np.testing.assert_allclose(np.asarray(logprobs), ref[np.arange(5), logits.argmax(-1)], rtol=1e-5)


def test_top_k_and_top_p_restrict_support():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal(30).astype(np.float32) * 2
  order = np.argsort(-logits)
  assert set(_draws(logits, SamplingParams(temperature=1.0, top_k=3, seed=5), 256)) <= set(order[:3])
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.6) + 1]  # smallest set with mass >= p
  drawn = set(_draws(logits, SamplingParams(temperature=1.0, top_p=0.6, seed=6), 512))
  assert drawn <= set(nucleus) and len(drawn) > 1


def test_temperature_sampling_matches_distribution():
  logits = np.array([2.0, 1.0, 0.0, -1.0], np.float32)
  draws = _draws(logits, SamplingParams(temperature=2.0, seed=9), 4000)
  want = np.exp(logits / 2) / np.exp(logits / 2).sum()
  got = np.bincount(draws, minlength=4) / len(draws)
  np.testing.assert_allclose(got, want, atol=0.03)


def test_seed_makes_draws_reproducible():
  logits = np.random.default_rng(2).standard_normal(50).astype(np.float32)
  p = SamplingParams(temperature=1.0, seed=1234)
  np.testing.assert_array_equal(_draws(logits, p, 16), _draws(logits, p, 16))


@pytest.mark.parametrize("kwargs,match", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": -1.0}, "temperature"),
    ({"top_k": -1}, "top_k"), ({"stop": ("",)}, "stop")])
def test_invalid_params_raise_typed_errors(kwargs, match):
  with pytest.raises(InvalidRequestError, match=match):
    SamplingParams(**kwargs)
