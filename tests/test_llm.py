"""LLM API on the serving engine: batched generate, the streaming iterator, interleaved streams and
early close (a tiny random model with a byte tokenizer; no checkpoint)."""
import pytest

from jaxinfer.engine.toy_model import ByteTokenizer, toy_config, toy_params
from jaxinfer.errors import InvalidRequestError
from jaxinfer.llm import LLM
from jaxinfer.loader import LoadedModel
from jaxinfer.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
  cfg = toy_config(max_position_embeddings=256)
  model = LoadedModel("llama", cfg, toy_params(cfg), ByteTokenizer(), "toy")
  return LLM(model, page_size=8, prefill_chunk=8, max_batch=8)  # one step shape: (8, 8, 32)


def test_generate_mixed_prompt_kinds_in_order(llm):
  prompts = ["hello", [{"role": "user", "content": "hi"}], [5, 6, 7, 8]]
  outs = llm.generate(prompts, GREEDY, use_tqdm=True)
  assert [o.prompt for o in outs] == ["hello", None, None]
  assert outs[0].prompt_token_ids == ByteTokenizer().encode("hello")
  assert outs[2].prompt_token_ids == [5, 6, 7, 8]
  for p, o in zip(prompts, outs):
    alone = llm.generate([p], GREEDY, use_tqdm=False)[0]
    assert o.token_ids == alone.token_ids and len(o.token_ids) == 10
    assert o.finish_reason == "length" and o.text == ByteTokenizer().decode(o.token_ids)
  assert llm.engine.allocator.num_used == 0


def test_stream_deltas_add_up_to_generate(llm):
  want = llm.generate("stream this", SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True),
                      use_tqdm=False)[0]
  deltas = list(llm.stream("stream this", SamplingParams(max_tokens=12, ignore_eos=True,
                                                         logprobs=True)))
  assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
  assert [t for d in deltas for t in d.new_token_ids] == want.token_ids
  assert "".join(d.new_text for d in deltas) == want.text
  assert [lp for d in deltas for lp in d.new_logprobs] == pytest.approx(want.logprobs, abs=1e-5)


def test_interleaved_streams_and_early_close(llm):
  a_want, b_want = (o.token_ids for o in llm.generate(["aaa", "bbbbbb"], GREEDY, use_tqdm=False))
  a, b = llm.stream("aaa", GREEDY), llm.stream("bbbbbb", GREEDY)
  got = {"a": [], "b": []}
  for _ in range(40):                                   # bounded: 10 tokens each
    for name, it in (("a", a), ("b", b)):
      out = next(it, None)
      if out is not None:
        got[name] += out.new_token_ids
  assert got["a"] == a_want and got["b"] == b_want
  # Closing a stream early cancels its request and frees its pages.
  c = llm.stream("ccc", SamplingParams(max_tokens=100, ignore_eos=True))
  assert not next(c).finished
  assert llm.engine.allocator.num_used > 0
  c.close()
  assert llm.engine.allocator.num_used == 0 and not llm.engine.has_unfinished()


def test_bad_requests_leave_the_engine_untouched(llm):
  with pytest.raises(InvalidRequestError):
    llm.generate(["fine", ""], GREEDY, use_tqdm=False)
  with pytest.raises(InvalidRequestError, match="sampling params"):
    llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
  assert not llm.engine.has_unfinished()
  assert llm.generate("still fine", GREEDY, use_tqdm=False)[0].token_ids


def test_llm_serves_the_fused_projection_layout_on_one_device(llm):
  """LLM fuses q/k/v and gate/up once (its model holds that layout, so the engine keeps no second
  copy); unfuse_projections gives the checkpoint layout back."""
  from jaxinfer.models import llama
  layer = llm.model.params["layers"][0]
  assert {"wqkv", "w_gate_up"} <= set(layer) and "wq" not in layer
  assert llm.engine.params["layers"][0]["wqkv"] is layer["wqkv"]
  back = llama.unfuse_projections(llm.model.params, llm.model.config)["layers"][0]
  assert back["wq"].shape == toy_params(llm.model.config)["layers"][0]["wq"].shape
