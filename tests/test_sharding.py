"""Sharded Llama on 8 virtual CPU devices: every mesh gives the single-device logits and greedy tokens;
the compiled HLO holds the collectives the config implies; invalid configs name their constraint."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfer import attention
from jaxinfer.loader import LoadedModel
from jaxinfer.models import llama
from llama_fixtures import TINY, random_params
from sharding import pipeline, rules
from sharding.config import ParallelConfig, ParallelConfigError
from sharding.model import shard_model

PAGE = 8
CFG = TINY  # 4 heads, 2 KV heads, 2 layers
PROMPTS = [[5, 17, 99, 3, 250, 41, 8, 77, 120, 6, 64], [200, 1, 2, 33, 90, 14]]
DECODE_STEPS = 2
ATOL = 2e-5  # float32 logits of magnitude ~1: only reduction order differs between layouts


@pytest.fixture(scope="module")
def model():
  return LoadedModel("llama", CFG, random_params(CFG, 3), None, "random")


def _greedy(model, forward, cache):
  """Prefill both prompts in one step, then decode greedily; returns (logits per step, tokens)."""
  pages = [[1, 2], [3, 4]]
  chunks = [attention.SeqChunk(p, 0, len(t)) for p, t in zip(pages, PROMPTS)]
  tokens = jnp.asarray(sum(PROMPTS, []) + [0] * (32 - sum(map(len, PROMPTS))))
  batch = attention.build_batch(chunks, PAGE, num_tokens=32, num_seqs=2, pages_per_seq=2)
  all_logits, seqs = [], [list(p) for p in PROMPTS]
  for step in range(DECODE_STEPS + 1):
    logits, cache = forward(model.params, tokens, cache, batch)
    logits = np.asarray(logits)
    all_logits.append(logits)
    nxt = logits.argmax(-1)
    for s, t in zip(seqs, nxt):
      s.append(int(t))
    chunks = [attention.SeqChunk(p, len(s) - 1, 1) for p, s in zip(pages, seqs)]
    tokens = jnp.asarray([s[-1] for s in seqs] + [0] * 6)
    batch = attention.build_batch(chunks, PAGE, num_tokens=8, num_seqs=2, pages_per_seq=2)
  return np.stack(all_logits), [s[len(p):] for s, p in zip(seqs, PROMPTS)]


@pytest.fixture(scope="module")
def reference(model):
  cache = model.create_cache(num_pages=8, page_size=PAGE)
  return _greedy(model, model.forward, cache)


# (config, collectives its compiled decode step must hold, collectives it must not)
TP_PP_CASES = [(ParallelConfig(tp=2), ["all-reduce"], ["collective-permute"]),
               (ParallelConfig(tp=4), ["all-reduce"], ["collective-permute"]),  # KV heads replicated
               (ParallelConfig(pp=2, tp=2), ["all-reduce", "collective-permute"], [])]


@pytest.mark.parametrize("parallel, present, absent", TP_PP_CASES,
                         ids=[c[0].describe() for c in TP_PP_CASES])
def test_sharded_model_matches_single_device(model, reference, parallel, present, absent):
  sharded = shard_model(model, parallel)
  cache = sharded.create_cache(num_pages=8, page_size=PAGE)
  logits, tokens = _greedy(sharded, sharded.forward, cache)
  ref_logits, ref_tokens = reference
  assert np.abs(ref_logits).max() > 0.1
  np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
  assert tokens == ref_tokens
  hlo = _decode_hlo(sharded)
  assert all(c in hlo for c in present), present
  assert not any(c in hlo for c in absent), absent


def test_tp_params_and_cache_are_split_over_the_mesh(model):
  sharded = shard_model(model, ParallelConfig(tp=2))
  assert isinstance(sharded, LoadedModel) and sharded.mesh.shape == {"dp": 1, "pp": 1, "ep": 1, "tp": 2}
  wq = sharded.params["layers"][0]["wq"]
  assert wq.sharding.spec == P(None, "tp")
  assert wq.addressable_shards[0].data.shape == (CFG.hidden_size, CFG.num_heads * CFG.head_dim // 2)
  assert sharded.params["layers"][0]["wo"].sharding.spec == P("tp", None)
  assert sharded.params["lm_head"].sharding.spec == P(None, "tp")  # vocab-parallel head
  cache = sharded.create_cache(num_pages=8, page_size=PAGE)
  assert cache.k[0].addressable_shards[0].data.shape == (8, PAGE, CFG.num_kv_heads // 2, CFG.head_dim)


def _pipeline_inputs(prompts, chunk):
  """Rank r prefills prompts[r] as len/chunk microbatches (chunked pipeline prefill)."""
  toks, bats = [], []
  for p in prompts:
    toks.append([jnp.asarray(p[c:c + chunk]) for c in range(0, len(p), chunk)])
    bats.append([attention.build_batch([attention.SeqChunk([1, 2], c, chunk)], PAGE,
                                       num_tokens=chunk, num_seqs=1, pages_per_seq=2)
                 for c in range(0, len(p), chunk)])
  return jnp.stack([jnp.stack(t) for t in toks]), pipeline.stack_batches(bats)


# Ranks (dp, times ep under attention_dp) each prefill their own 16-token prompt in M chunks.
# (config, collectives the compiled step must hold, collectives it must not)
RANK_CASES = [
    (ParallelConfig(dp=2, pp=2, tp=2, microbatches=4), {"collective-permute", "all-reduce"},
     {"reduce-scatter", "all-to-all"}),
    # attention-DP over ep=4 (attention TP2 inside each rank), MLP tensor parallel over ep*tp = 8
    (ParallelConfig(ep=4, tp=2, attention_dp=True, adp_mlp="tp", microbatches=2),
     {"all-gather", "reduce-scatter", "all-reduce"}, {"collective-permute", "all-to-all"}),
    # attention-DP over ep=2 with a data-parallel MLP, 2 pipeline stages, TP2 inside
    (ParallelConfig(ep=2, pp=2, tp=2, attention_dp=True, microbatches=2),
     {"collective-permute", "all-reduce"}, {"reduce-scatter", "all-to-all"}),
]


@pytest.mark.parametrize("parallel, present, absent", RANK_CASES,
                         ids=[c[0].describe() for c in RANK_CASES])
def test_pipeline_and_data_parallel_ranks_match_single_device(model, parallel, present, absent):
  prompts = [PROMPTS[0][:8] + [9, 10, 11, 12, 13, 14, 15, 16], [7] * 4 + PROMPTS[1] + [30] * 6,
             PROMPTS[1] + PROMPTS[0][:10], [3, 1, 4, 1, 5, 9, 2, 6] + PROMPTS[0][3:11]]
  ranks = parallel.num_ranks
  chunk = 16 // parallel.num_microbatches
  ref = []
  for p in prompts[:ranks]:
    cache = model.create_cache(num_pages=4, page_size=PAGE)
    b = attention.build_batch([attention.SeqChunk([1, 2], 0, 16)], PAGE, num_tokens=16, num_seqs=1,
                              pages_per_seq=2)
    ref.append(np.asarray(llama.forward(model.params, jnp.asarray(p), cache, b, CFG,
                                        all_logits=True)[0]))
  sharded = shard_model(model, parallel)
  cache = sharded.create_cache(num_pages=4 * ranks, page_size=PAGE)
  tokens, batches = _pipeline_inputs(prompts[:ranks], chunk)
  forward = sharded.pipeline_forward(all_logits=True)
  hlo = forward.lower(sharded.params, tokens, cache, batches).compile().as_text()
  logits, cache = forward(sharded.params, tokens, cache, batches)
  logits = np.asarray(logits).reshape(ranks, 16, -1)
  for r in range(ranks):
    np.testing.assert_allclose(logits[r], ref[r], atol=ATOL, rtol=0)
  assert isinstance(cache, pipeline.StagedKVCache)
  assert cache.k.sharding.spec[0] == "pp"
  # each rank holds only its own pages: no KV duplication across ranks
  assert cache.k.addressable_shards[0].data.shape[2] == 4
  assert all(c in hlo for c in present), present
  assert not any(c in hlo for c in absent), absent


def _decode_hlo(sharded):
  """Compiled HLO of the decode-step shape (the jit cache already holds it)."""
  cache = sharded.create_cache(num_pages=8, page_size=PAGE)
  batch = attention.build_batch([attention.SeqChunk([1], 0, 1)] * 2, PAGE, num_tokens=8,
                                num_seqs=2, pages_per_seq=2)
  tokens = jnp.zeros(8, jnp.int32)
  return sharded.forward.lower(sharded.params, tokens, cache, batch).compile().as_text()


def test_single_device_step_has_no_collectives(model, reference):
  hlo = _decode_hlo(shard_model(model, ParallelConfig()))
  assert not any(c in hlo for c in ("all-reduce", "all-gather", "collective-permute"))


@pytest.mark.parametrize("parallel, constraint", [
    (ParallelConfig(tp=16), "only 8 are available"),
    (ParallelConfig(tp=8), "num_heads (4) must be divisible by tp (8)"),
    (ParallelConfig(pp=4), "num_layers (2) must be divisible by pp (4)"),
    (ParallelConfig(ep=2), "has none; use tp for a dense model"),
    (ParallelConfig(ep=4, attention_dp=True, adp_mlp="tp", tp=4), "only 8 are available"),
], ids=["devices", "heads", "layers", "ep-dense", "adp-devices"])
def test_invalid_configs_name_the_constraint(model, parallel, constraint):
  with pytest.raises(ParallelConfigError, match=constraint.replace("(", r"\(").replace(")", r"\)")
                     .replace("*", r"\*")):
    shard_model(model, parallel)


def test_attention_dp_mlp_split_names_its_constraint():
  cfg = dataclasses.replace(CFG, intermediate_size=100)
  ParallelConfig(ep=8, attention_dp=True).validate(cfg)  # data-parallel MLP: no constraint
  with pytest.raises(ParallelConfigError, match=r"intermediate_size \(100\) must be divisible by "
                                                r"ep\*tp \(8\)"):
    ParallelConfig(ep=8, attention_dp=True, adp_mlp="tp").validate(cfg)


@pytest.mark.parametrize("kwargs, constraint", [
    (dict(tp=0), "tp must be a positive integer"),
    (dict(attention_dp=True), "needs ep > 1"),
    (dict(moe_comm="ring"), "moe_comm must be"),
    (dict(moe_dispatch_dtype="int8"), "moe_dispatch_dtype must be"),
    (dict(ep=2, attention_dp=True, adp_mlp="ep"), "adp_mlp must be dp | tp"),
])
def test_invalid_fields_name_the_constraint(kwargs, constraint):
  with pytest.raises(ParallelConfigError, match=constraint):
    ParallelConfig(**kwargs)


def test_rule_table_maps_logical_axes_to_mesh_axes():
  tp_ep = ParallelConfig(ep=4, tp=2)
  assert rules.spec_for(("embed", "q_heads"), (64, 64), tp_ep) == P(None, ("ep", "tp"))
  assert rules.spec_for(("experts", "embed", "moe_mlp"), (8, 64, 32), tp_ep) == P("ep", None, "tp")
  adp = ParallelConfig(ep=8, attention_dp=True)
  assert rules.spec_for(("embed", "q_heads"), (64, 64), adp) == P(None, None)  # replicated over ep
  assert rules.spec_for(("tokens", "embed"), (16, 64), adp) == P("ep", None)
  assert rules.spec_for(("vocab", "embed"), (250, 64), ParallelConfig(tp=4)) == P(None, None)
  with pytest.raises(ParallelConfigError, match=r"q_heads \(12\) must be divisible by tp \(8\)"):
    rules.spec_for(("embed", "q_heads"), (64, 12), ParallelConfig(tp=8))
