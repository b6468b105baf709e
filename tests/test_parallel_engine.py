"""A sharded Llama through the Python API (``LLM``: TP2, DP2xTP2) and the serving engine (TP2, PP2,
DP2xPP2 replicas), and DeepSeek-V3 through LLM (TP2xEP2, DP2xEP2), give the same greedy tokens as the
unsharded model, so ``shard_model`` and
``sharding.replicas`` slot into both without changing them."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine.engine import EngineConfig, LLMEngine
from jaxinfer.engine.toy_model import ByteTokenizer, toy_config
from jaxinfer.llm import LLM
from jaxinfer.loader import LoadedModel
from jaxinfer.sampling import SamplingParams
from llama_fixtures import random_params
from sharding.config import ParallelConfig
from sharding.model import shard_model
from sharding.replicas import DataParallelEngine, shard_replicas

CFG = toy_config(max_position_embeddings=128)
ENGINE = EngineConfig(num_pages=33, page_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                      chunk_size=8, min_token_bucket=32, min_seq_bucket=8, min_page_bucket=32)
PROMPTS = [[int(t) for t in np.random.RandomState(i).randint(3, CFG.vocab_size, 5 + 7 * i)]
           for i in range(3)]
GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
PARALLEL = [ParallelConfig(tp=2), ParallelConfig(pp=2)]


@pytest.fixture(scope="module")
def model():
  return LoadedModel("llama", CFG, random_params(CFG, 5), None, "random")


def _engine(params, forward, cache):
  return LLMEngine(params, forward, cache, vocab_size=CFG.vocab_size, max_model_len=128,
                   tokenizer=ByteTokenizer(), config=ENGINE)


def _engine_tokens(engine):
  ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
  finals = engine.run_to_completion()
  return [list(finals[i].token_ids) for i in ids]


@pytest.fixture(scope="module")
def reference(model):
  llm_tokens = [o.token_ids for o in LLM(model=model).generate(PROMPTS, GREEDY, use_tqdm=False)]
  from jaxinfer.engine.step import LlamaForward
  engine = _engine(model.params, LlamaForward(CFG),
                   model.create_cache(ENGINE.num_pages, ENGINE.page_size, jnp.float32))
  return llm_tokens, _engine_tokens(engine)


def test_sharded_model_through_llm(model, reference):
  llm = LLM(model=model, parallel=ParallelConfig(tp=2))
  wq = llm.model.params["layers"][0]["wq"]
  assert len(wq.sharding.device_set) == 2 and not wq.sharding.is_fully_replicated
  llm_tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
  ref_llm, _ = reference
  assert all(len(t) == GREEDY.max_tokens for t in ref_llm)
  assert [list(t) for t in llm_tokens] == [list(t) for t in ref_llm]


@pytest.mark.parametrize("parallel", PARALLEL, ids=[p.describe() for p in PARALLEL])
def test_sharded_model_through_engine(model, reference, parallel):
  sharded = shard_model(model, parallel)
  engine = _engine(sharded.params, sharded.step_forward,
                   sharded.create_cache(ENGINE.num_pages, ENGINE.page_size))
  tokens = _engine_tokens(engine)
  assert all(len(t) == GREEDY.max_tokens for t in tokens)
  assert tokens == reference[1]


def _devices(model):
  return frozenset(model.params["final_norm"].sharding.device_set)


def test_data_parallel_replicas_through_llm(model, reference):
  llm = LLM(model=model, parallel=ParallelConfig(dp=2, tp=2))
  assert isinstance(llm.engine, DataParallelEngine) and len(llm.engine.engines) == 2
  devices = [frozenset(e.params["final_norm"].sharding.device_set) for e in llm.engine.engines]
  assert len(devices[0]) == len(devices[1]) == 2 and not devices[0] & devices[1]
  llm_tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
  assert [list(t) for t in llm_tokens] == [list(t) for t in reference[0]]
  assert all(e.num_steps > 0 for e in llm.engine.engines)  # both replicas served requests


def test_data_parallel_pipeline_replicas_through_engine(model, reference):
  replicas = shard_replicas(model, ParallelConfig(dp=2, pp=2))
  assert _devices(replicas[0]).isdisjoint(_devices(replicas[1]))
  engine = DataParallelEngine([
      _engine(m.params, m.step_forward, m.create_cache(ENGINE.num_pages, ENGINE.page_size))
      for m in replicas])
  ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
  assert sorted({engine.replica_of(i) for i in ids}) == [0, 1]
  finals = engine.run_to_completion()
  assert [list(finals[i].token_ids) for i in ids] == reference[1]
  assert not engine.has_unfinished() and engine.replica_of(ids[0]) is None


def test_sharded_deepseek_through_llm():
  """DeepSeek-V3 (MLA + MoE, 1 dense + 1 MoE layer) under TP2 x EP2 and DP2 x EP2 replicas serves
  the unsharded model's greedy tokens through LLM and the engine."""
  import jax

  from jaxinfer.models import deepseek_v3 as ds
  cfg = ds.DeepseekV3Config(
      vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, q_lora_rank=None, kv_lora_rank=32,
      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=64,
      moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
      n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
      max_position_embeddings=128)
  params = jax.tree.map(lambda w: 5 * w if w.ndim >= 2 else w,
                        ds.init_params(cfg, jax.random.key(2), jnp.float32))
  model = LoadedModel("deepseek_v3", cfg, params, None, "random")
  prompts = [[int(t) for t in np.random.RandomState(10 + i).randint(0, 128, 6 + 5 * i)]
             for i in range(3)]
  llms = {}

  def run(parallel):
    llms[parallel] = LLM(model=model, parallel=parallel, engine_config=ENGINE)
    return [list(o.token_ids) for o in llms[parallel].generate(prompts, GREEDY, use_tqdm=False)]

  ref = run(None)
  assert all(len(t) == GREEDY.max_tokens for t in ref)
  tp_ep = ParallelConfig(tp=2, ep=2)
  assert run(tp_ep) == ref
  experts = llms[tp_ep].model.params["layers"][1]["experts_gate"]
  assert experts.addressable_shards[0].data.shape == (4, 64, 16)  # 8 experts over ep, I over tp
  assert run(ParallelConfig(dp=2, ep=2)) == ref
