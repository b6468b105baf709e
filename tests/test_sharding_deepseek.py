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
  return {c for c in ("all-to-all", "all-gather", "reduce-scatter", "all-reduce") if c in hlo}


CASES = [  # (config, collectives the compiled decode step must hold)
    (ParallelConfig(tp=8), {"all-reduce"}),
    (ParallelConfig(ep=8), {"all-to-all", "all-reduce"}),         # top-2 < ep: all-to-all chosen
    (ParallelConfig(ep=4, tp=2), {"all-to-all", "all-reduce"}),
    (ParallelConfig(ep=8, attention_dp=True), {"all-to-all"}),
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
