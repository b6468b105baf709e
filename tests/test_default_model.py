"""The embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF) against HF transformers loading the
same GGUF (goldens from tests/goldens/make_llama_goldens.py): tokenizer ids, chat template, logits
and greedy generation.

Logit bound: top-1 identical at every position; max |Δlogit| <= 2e-3 x max |logit| at the last
position (float32 golden) and <= 1e-2 x max |logit| at every position (float16-stored golden, whose
own rounding is ~5e-4 relative)."""
from pathlib import Path

import numpy as np
import pytest

from jaxinfer.llm import LLM
from jaxinfer.sampling import SamplingParams
from test_safetensors_llama import _logits

GOLDEN = np.load(Path(__file__).parent / "goldens" / "llama" / "smollm2.npz")


@pytest.fixture(scope="module")
def llm():
  return LLM(dtype=np.float32)


@pytest.mark.parametrize("i", range(6))
def test_tokenizer_matches_hf(llm, i):
  text = str(GOLDEN[f"tok{i}_text"])
  ids = llm.tokenizer.encode(text)
  assert ids == GOLDEN[f"tok{i}_ids"].tolist()
  assert llm.tokenizer.decode(ids, skip_special_tokens=False) == str(GOLDEN[f"tok{i}_decoded"])


def test_special_tokens_match_hf(llm):
  names = GOLDEN["special_token_names"].tolist()
  ids = dict(zip(names, GOLDEN["special_token_ids"].tolist()))
  assert llm.tokenizer.bos_token_id == ids["bos"]
  assert ids["eos"] in llm.tokenizer.eos_token_ids
  for p in range(3):
    text = str(GOLDEN[f"prompt{p}_text"])
    assert llm.tokenizer.encode(text) == GOLDEN[f"prompt{p}_ids_with_special"].tolist()
    assert llm.tokenizer.encode(text, add_special_tokens=False) == \
        GOLDEN[f"prompt{p}_ids_no_special"].tolist()


def test_chat_template_renders_like_hf(llm):
  user = [{"role": "user", "content": "What is 2+2?"}]
  system = [{"role": "system", "content": "You are a terse assistant. Answer in one word."}] + user
  tok = llm.tokenizer
  assert tok.apply_chat_template(user) == str(GOLDEN["chat_user_only"])
  assert tok.apply_chat_template(user, add_generation_prompt=False) == \
      str(GOLDEN["chat_user_only_no_gen_prompt"])
  assert tok.apply_chat_template(system) == str(GOLDEN["chat_system_user"])


@pytest.mark.parametrize("p", [0, 1])
def test_logits_match_hf(llm, p):
  ids = GOLDEN[f"prompt{p}_input_ids"]
  got = _logits(llm.model.config, llm.model.params, ids[None])[0]
  want = GOLDEN[f"prompt{p}_logits"].astype(np.float32)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 1e-2 * scale
  last = GOLDEN[f"prompt{p}_logits_last_f32"]
  assert np.abs(got[-1] - last).max() <= 2e-3 * np.abs(last).max()


def test_greedy_generation_matches_hf(llm):
  prompts = [GOLDEN[f"prompt{p}_input_ids"].tolist() for p in range(3)]
  outs = llm.generate(prompts, SamplingParams(max_tokens=32), use_tqdm=False)
  for p, out in enumerate(outs):
    want = GOLDEN[f"prompt{p}_gen_ids"].tolist()
    if GOLDEN[f"prompt{p}_gen_stopped_at_eos"]:  # HF keeps the eos id; we report finish_reason
      assert want[-1] in llm.tokenizer.eos_token_ids and out.finish_reason == "stop"
      want = want[:-1]
    else:
      assert len(want) >= 16
    assert out.token_ids[:16] == want[:16], p
    assert out.token_ids == want, p
    assert out.text == str(GOLDEN[f"prompt{p}_gen_text"])


def test_chat_prompt_and_stop_string(llm):
  out = llm.generate([{"role": "user", "content": "What is 2+2?"}],
                     SamplingParams(max_tokens=32, stop=("math",)), use_tqdm=False)[0]
  assert out.text == "The answer to this classic " and out.finish_reason == "stop"
