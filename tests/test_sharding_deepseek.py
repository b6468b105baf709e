"""Small DeepSeek-V3 (MLA + MoE) on 8 virtual CPU devices: TP8, EP8, TP2+EP4, ADP8+EP8 and
ADP4+TP2+EP4 (AG/RS) give the single-device logits and greedy tokens over prefill + decode;
the compiled HLO holds the collectives each layout implies."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import attention
from jaxinfer.models import deepseek_v3 as ds
from sharding import deepseek
from sharding.config import ParallelConfig, ParallelConfigError

CFG = ds.DeepseekV3Config(
    vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, q_lora_rank=None, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=64,
    moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1)  # dense, then MoE
PAGE, SEQS, TOKENS_PER_SEQ = 8, 8, 16
PROMPTS = [list(np.random.RandomState(i).randint(0, 128, 7 + i)) for i in range(SEQS)]
ATOL = 3e-5  # float32 logits of magnitude ~3; only reduction order differs


@pytest.fixture(scope="module")
def params():
  p = ds.init_params(CFG, jax.random.key(0), jnp.float32)
  return jax.tree.map(lambda w: 5 * w if w.ndim >= 2 else w, p)  # logits well above rounding


def _step_inputs(seqs, start):
  """One step for these sequences (pages 1.. local to whoever runs them): prefill when start is
  None, else one decode token each."""
  pages = [[1 + 2 * i, 2 + 2 * i] for i in range(len(seqs))]
  if start is None:
    chunks = [attention.SeqChunk(p, 0, len(s)) for p, s in zip(pages, seqs)]
    flat = sum(seqs, [])
  else:
    chunks = [attention.SeqChunk(p, len(s) - 1, 1) for p, s in zip(pages, seqs)]
    flat = [s[-1] for s in seqs]
  n = TOKENS_PER_SEQ * len(seqs) if start is None else 8 * (-(-len(seqs) // 8))
  tokens = jnp.asarray(flat + [0] * (n - len(flat)), jnp.int32)
  return tokens, attention.build_batch(chunks, PAGE, num_tokens=n, num_seqs=len(seqs),
                                       pages_per_seq=2)


def _greedy(step, seqs, decode_steps=2):
  """step(list of seqs, start) -> logits [len(seqs), V]; returns (stacked logits, new tokens)."""
  seqs = [list(s) for s in seqs]
  out = []
  for i in range(decode_steps + 1):
    logits = step(seqs, None if i == 0 else True)
    out.append(logits)
    for s, t in zip(seqs, logits.argmax(-1)):
      s.append(int(t))
  return np.stack(out), [s[-(decode_steps + 1):] for s in seqs]


@pytest.fixture(scope="module")
def reference(params):
  state = {"cache": ds.create_cache(CFG, num_pages=2 * SEQS + 1, page_size=PAGE, dtype=jnp.float32)}

  def step(seqs, start):
    tokens, batch = _step_inputs(seqs, start)
    logits, state["cache"] = ds.forward_jit(params, tokens, state["cache"], batch, cfg=CFG)
    return np.asarray(logits)
  return _greedy(step, PROMPTS)


def _collectives(hlo):
  return {c for c in ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
          if c in hlo}


CASES = [  # (config, collectives the compiled decode step must hold)
    (ParallelConfig(tp=8), {"all-reduce"}),
    (ParallelConfig(ep=8), {"all-to-all", "all-reduce"}),         # top-2 < ep: all-to-all chosen
    (ParallelConfig(ep=4, tp=2), {"all-to-all", "all-reduce"}),
    (ParallelConfig(ep=8, attention_dp=True), {"all-to-all"}),
    (ParallelConfig(ep=8, attention_dp=True, moe_comm="ragged_all_to_all"), {"all-to-all"}),
    (ParallelConfig(ep=4, tp=2, attention_dp=True, moe_comm="allgather"),
     {"all-gather", "reduce-scatter"}),
]


@pytest.mark.parametrize("parallel, collectives", CASES, ids=[c[0].describe() for c in CASES])
def test_deepseek_mesh_matches_single_device(params, reference, parallel, collectives):
  mesh = parallel.make_mesh()
  ranks = parallel.ep * parallel.dp if parallel.attention_dp else 1
  per_rank = SEQS // ranks
  cache = ds.create_cache(CFG, num_pages=(2 * per_rank + 1) * ranks, page_size=PAGE,
                          dtype=jnp.float32)
  placed, cache = deepseek.place(CFG, params, cache, parallel, mesh)
  forward = deepseek.make_forward(CFG, parallel, mesh)
  state = {"cache": cache}
  hlo = []

  def step(seqs, start):
    if not parallel.attention_dp:
      tokens, batch = _step_inputs(seqs, start)
    else:  # rank r runs sequences r*per_rank.. with its own pages
      per = [_step_inputs(seqs[r * per_rank:(r + 1) * per_rank], start) for r in range(ranks)]
      tokens = jnp.stack([t for t, _ in per])
      batch = jax.tree.map(lambda *a: jnp.stack(a), *[b for _, b in per])
    if start is not None and not hlo:
      hlo.append(forward.lower(placed, tokens, state["cache"], batch).compile().as_text())
    logits, state["cache"] = forward(placed, tokens, state["cache"], batch)
    return np.asarray(logits).reshape(SEQS, -1)

  logits, tokens = _greedy(step, PROMPTS)
  ref_logits, ref_tokens = reference
  assert np.abs(ref_logits).max() > 0.5
  np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
  assert tokens == ref_tokens
  assert collectives <= _collectives(hlo[0]), _collectives(hlo[0])
  if parallel.moe_comm == "allgather" or parallel.ep == 1:
    assert "all-to-all" not in hlo[0]


def test_deepseek_invalid_configs_name_the_constraint():
  with pytest.raises(ParallelConfigError, match=r"num_heads \(8\) must be divisible by tp \(3\)"):
    ParallelConfig(tp=3).validate(CFG)
  with pytest.raises(ParallelConfigError, match=r"routed experts \(8\) must be divisible by ep \(3\)"):
    ParallelConfig(ep=3, attention_dp=True).validate(CFG)
  with pytest.raises(ParallelConfigError, match=r"moe_intermediate_size \(32\) must be divisible"):
    ParallelConfig(tp=64).validate(dataclasses.replace(CFG, num_heads=64, intermediate_size=128),
                                   num_devices=64)
  with pytest.raises(ParallelConfigError, match=r"num_heads \(8\) must be divisible by ep\*tp"):
    ParallelConfig(ep=4, tp=4).validate(CFG, num_devices=16)


# ---- pipeline parallel: 1 dense + 2 MoE layers; the MoE layers split over 2 stages -----------

PP_CFG = dataclasses.replace(CFG, num_layers=3)
PP_SEQS_PER_RANK, PP_PROMPT, PP_PAGES = 2, 16, 3   # pages per sequence: 16 prompt + decode tokens


def _pp_batch(seqs, start, chunk, pages_base=0):
  """One microbatch: ``chunk`` tokens of each sequence from ``start`` (or one decode token each at
  its end when start is None), padded to a multiple of 8 tokens."""
  pages = [[pages_base + 1 + PP_PAGES * i + j for j in range(PP_PAGES)] for i in range(len(seqs))]
  if start is None:
    chunks = [attention.SeqChunk(p, len(s) - 1, 1) for p, s in zip(pages, seqs)]
    flat = [s[-1] for s in seqs]
  else:
    chunks = [attention.SeqChunk(p, start, chunk) for p in pages]
    flat = sum((s[start:start + chunk] for s in seqs), [])
  n = 8 * (-(-len(flat) // 8))
  return (jnp.asarray(flat + [0] * (n - len(flat)), jnp.int32),
          attention.build_batch(chunks, PAGE, num_tokens=n, num_seqs=len(seqs),
                                pages_per_seq=PP_PAGES))


def _pp_prompts(n):
  return [list(np.random.RandomState(100 + i).randint(0, 128, PP_PROMPT)) for i in range(n)]


def _stack(rows):
  """[R][M] of (tokens, batch) -> (tokens [R, M, T], batches [R, M, ...])."""
  tokens = jnp.stack([jnp.stack([t for t, _ in row]) for row in rows])
  batches = jax.tree.map(lambda *a: jnp.stack(a).reshape(len(rows), len(rows[0]), *a[0].shape),
                         *[b for row in rows for _, b in row])
  return tokens, batches


PP_CASES = [  # (config, collectives the compiled decode step must hold)
    (ParallelConfig(pp=2, ep=4), {"collective-permute", "all-to-all"}),
    (ParallelConfig(dp=2, pp=2, tp=2), {"collective-permute", "all-reduce"}),
]


@pytest.mark.parametrize("parallel, collectives", PP_CASES, ids=[c[0].describe() for c in PP_CASES])
def test_deepseek_pipeline_matches_single_device(parallel, collectives):
  params = jax.tree.map(lambda w: 5 * w if w.ndim >= 2 else w,
                        ds.init_params(PP_CFG, jax.random.key(1), jnp.float32))
  ranks, M = parallel.dp, 2
  prompts = _pp_prompts(ranks * PP_SEQS_PER_RANK)
  # single device: every sequence prefilled in one step, then greedy decode
  ref_cache = ds.create_cache(PP_CFG, num_pages=PP_PAGES * len(prompts) + 1, page_size=PAGE,
                              dtype=jnp.float32)
  ref_seqs, ref_logits = [list(p) for p in prompts], []
  for step in range(3):
    tokens, batch = _pp_batch(ref_seqs, 0 if step == 0 else None, PP_PROMPT)
    logits, ref_cache = ds.forward_jit(params, tokens, ref_cache, batch, cfg=PP_CFG)
    ref_logits.append(np.asarray(logits))
    for s, t in zip(ref_seqs, ref_logits[-1].argmax(-1)):
      s.append(int(t))
  # pipeline: each dp rank prefills its sequences in M chunks (chunked pipeline prefill), then
  # decodes them as M microbatches of one sequence each, across the stages
  mesh = parallel.make_mesh()
  per_rank_pages = PP_PAGES * PP_SEQS_PER_RANK + 1
  cache = ds.create_cache(PP_CFG, num_pages=per_rank_pages * ranks, page_size=PAGE,
                          dtype=jnp.float32)
  placed, cache = deepseek.place_pipeline(PP_CFG, params, cache, parallel, mesh)
  forward = deepseek.make_pipeline_forward(PP_CFG, parallel, mesh)
  seqs = [list(p) for p in prompts]
  rank_seqs = lambda r: seqs[r * PP_SEQS_PER_RANK:(r + 1) * PP_SEQS_PER_RANK]
  chunk = PP_PROMPT // M
  prefill = _stack([[_pp_batch(rank_seqs(r), c * chunk, chunk) for c in range(M)]
                    for r in range(ranks)])
  logits, cache = forward(placed, *prefill[:1], cache, prefill[1])
  got = [np.asarray(logits)[:, -1].reshape(len(seqs), -1)]      # the last chunk ends each prompt
  for s, t in zip(seqs, got[-1].argmax(-1)):
    s.append(int(t))
  for step in range(2):
    decode = _stack([[_pp_batch([s], None, 1, pages_base=PP_PAGES * i)
                      for i, s in enumerate(rank_seqs(r))] for r in range(ranks)])
    if step == 0:
      hlo = forward.lower(placed, decode[0], cache, decode[1]).compile().as_text()
    logits, cache = forward(placed, decode[0], cache, decode[1])
    got.append(np.asarray(logits).reshape(len(seqs), -1))
    for s, t in zip(seqs, got[-1].argmax(-1)):
      s.append(int(t))
  assert np.abs(ref_logits[0]).max() > 0.5
  np.testing.assert_allclose(np.stack(got), np.stack(ref_logits), atol=ATOL, rtol=0)
  assert seqs == ref_seqs
  assert collectives <= _collectives(hlo), _collectives(hlo)
  assert "conditional" in hlo  # the dense first layer runs on stage 0 only
  assert isinstance(cache, deepseek.StagedLatentCache) and cache.latent.sharding.spec[0] == "pp"
  # stage-local experts: each device holds 1/pp of the MoE layers and 1/ep of their experts
  w = placed["stages"]["experts_gate"]
  assert w.addressable_shards[0].data.shape[:3] == (1, 1, CFG.n_routed_experts // parallel.ep)


def test_deepseek_pipeline_invalid_configs_name_the_constraint():
  with pytest.raises(ParallelConfigError, match=r"MoE layers \(num_layers - first_k_dense_replace\) "
                                                r"\(1\) must be divisible by pp \(2\)"):
    ParallelConfig(pp=2).validate(CFG)
  with pytest.raises(ParallelConfigError, match="not implemented for DeepSeek"):
    deepseek.make_pipeline_forward(PP_CFG, ParallelConfig(pp=2, ep=2, attention_dp=True),
                                   ParallelConfig(pp=2, ep=2, attention_dp=True).make_mesh())
  with pytest.raises(ParallelConfigError, match="adp_mlp='tp' is implemented for Llama only"):
    deepseek.make_forward(CFG, ParallelConfig(ep=2, attention_dp=True, adp_mlp="tp"),
                          ParallelConfig(ep=2, attention_dp=True).make_mesh())
