"""load_model dispatches on the checkpoint's architecture; a DeepSeek-V3 checkpoint runs through LLM
(the serving engine, over its paged latent cache) like a Llama one."""
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.attention import SeqChunk, build_batch
from jaxinfer.errors import UnsupportedModelError
from jaxinfer.llm import LLM
from jaxinfer.loader import load_model
from jaxinfer.models import deepseek_v3
from jaxinfer.sampling import SamplingParams

TINY_DEEPSEEK = Path(__file__).parent / "goldens" / "deepseek_v3" / "tiny"


def test_deepseek_v3_through_llm_equals_argmax_of_full_forward():
  model = load_model(TINY_DEEPSEEK, dtype=jnp.float32, progress=False)
  assert model.architecture == "deepseek_v3"
  assert isinstance(model.create_cache(4, 8), deepseek_v3.LatentCache)
  llm = LLM(model, page_size=8, prefill_chunk=16)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (5, 19)]
  outs = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
  for prompt, out in zip(prompts, outs):
    seq = prompt + out.token_ids[:-1]
    cache = model.create_cache(1 + -(-len(seq) // 8), 8)
    batch = build_batch([SeqChunk(list(range(1, cache.num_pages)), 0, len(seq))], 8,
                        num_tokens=len(seq), num_seqs=1, pages_per_seq=cache.num_pages - 1)
    logits, _ = deepseek_v3.forward_jit(model.params, jnp.asarray(seq), cache, batch,
                                        cfg=model.config, all_logits=True)
    assert np.asarray(logits)[len(prompt) - 1:].argmax(-1).tolist() == out.token_ids


def test_unknown_model_type(tmp_path):
  folder = tmp_path / "m"
  shutil.copytree(TINY_DEEPSEEK, folder)
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
  with pytest.raises(UnsupportedModelError, match="'mamba'"):
    load_model(folder)
