"""MoE dispatch/combine over ep x tp meshes (8 virtual CPU devices) against the dense all-experts
reference: all-to-all (fixed buffers or ragged) and AG/RS, tokens replicated (TP attention) or split (attention-DP), bf16 / FP8 /
NVFP4 dispatch payloads; the compiled HLO holds the chosen collectives; the message-size model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfer.errors import ShapeError
from kernels.quant import fp8_block, nvfp4
from sharding import moe, rules
from sharding.config import ParallelConfig, ParallelConfigError

E, H, I, T, K = 8, 128, 32, 16, 3


def _problem(seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (T, H), jnp.float32)
  weights = {"w_gate": 0.1 * jax.random.normal(ks[2], (E, H, I)),
             "w_up": 0.1 * jax.random.normal(ks[3], (E, H, I)),
             "w_down": 0.1 * jax.random.normal(ks[4], (E, I, H))}
  idx, w = moe.topk_router(x, jax.random.normal(ks[1], (H, E)), K)
  return x, idx, w, weights


def _run(parallel, comm, x, idx, w, weights, **kw):
  mesh = parallel.make_mesh()
  placed = jax.device_put(weights, rules.named(mesh, rules.param_specs(weights, moe.MOE_AXES,
                                                                        parallel)))
  fn = jax.jit(lambda *a: moe.moe_experts(*a, parallel, mesh, comm=comm, **kw))
  compiled = fn.lower(x, idx, w, placed).compile()
  out = compiled(x, idx, w, placed)
  return np.asarray(out, np.float64), compiled.as_text()


# (config, comm, collectives the HLO must hold)
CASES = [
    (ParallelConfig(ep=8), "all_to_all", ["all-to-all"]),                    # EP8, TP attention
    (ParallelConfig(ep=8), "allgather", ["all-reduce"]),                     # replicated: AG is free
    (ParallelConfig(ep=4, tp=2), "all_to_all", ["all-to-all", "all-reduce"]),  # TP+EP
    (ParallelConfig(tp=8), "auto", ["all-reduce"]),                          # TP8 experts
    (ParallelConfig(ep=8, attention_dp=True), "all_to_all", ["all-to-all"]),  # ADP8+EP8
    (ParallelConfig(ep=4, tp=2, attention_dp=True), "allgather", ["all-gather", "reduce-scatter"]),
    # ragged all-to-all (emulated on CPU over all_to_all): ADP8+EP8, and TP+EP with tokens replicated
    (ParallelConfig(ep=8, attention_dp=True), "ragged_all_to_all", ["all-to-all", "all-gather"]),
    (ParallelConfig(ep=4, tp=2), "ragged_all_to_all", ["all-to-all", "all-reduce"]),
]


@pytest.mark.parametrize("parallel, comm, collectives", CASES,
                         ids=[f"{c[0].describe()}-{c[1]}" for c in CASES])
def test_moe_matches_dense_all_experts_reference(parallel, comm, collectives):
  x, idx, w, weights = _problem()
  ref = np.asarray(moe.experts_reference(x, idx, w, weights), np.float64)
  out, hlo = _run(parallel, comm, x, idx, w, weights)
  assert np.abs(ref).max() > 0.05
  np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
  for c in collectives:
    assert c in hlo, c
  if comm == "allgather":
    assert "all-to-all" not in hlo


def _quantized_rows(x, dtype, ep):
  """What the receiver sees: per sender (1/ep of the tokens) quantized, then dequantized."""
  shares = jnp.split(x, ep)
  if dtype == "fp8":
    return jnp.concatenate([fp8_block.dequantize_activations(*fp8_block.quantize_activations(s))
                            for s in shares])
  return jnp.concatenate([nvfp4.dequantize(*nvfp4.quantize(s)) for s in shares])


@pytest.mark.parametrize("dtype, comm, adp", [("fp8", "all_to_all", False),
                                              ("nvfp4", "all_to_all", True),
                                              ("nvfp4", "allgather", True),
                                              ("fp8", "ragged_all_to_all", True),
                                              ("nvfp4", "ragged_all_to_all", True)])
def test_quantized_dispatch_matches_reference_on_quantized_tokens(dtype, comm, adp):
  x, idx, w, weights = _problem(1)
  parallel = ParallelConfig(ep=4, attention_dp=adp, moe_dispatch_dtype=dtype)
  out, _ = _run(parallel, comm, x, idx, w, weights)
  ref = np.asarray(moe.experts_reference(_quantized_rows(x, dtype, 4), idx, w, weights), np.float64)
  exact = np.asarray(moe.experts_reference(x, idx, w, weights), np.float64)
  np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
  assert np.abs(out - exact).max() > 0  # the payload really was quantized


def test_capacity_factor_drops_only_overflow():
  x, idx, w, weights = _problem(2)
  idx = jnp.zeros_like(idx).at[:, 1:].set(jnp.arange(1, K)[None] + 4)  # all tokens hit expert 0
  parallel = ParallelConfig(ep=8, attention_dp=True)
  full, _ = _run(parallel, "all_to_all", x, idx, w, weights)
  ref = np.asarray(moe.experts_reference(x, idx, w, weights), np.float64)
  np.testing.assert_allclose(full, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)  # dropless default
  capped, _ = _run(parallel, "all_to_all", x, idx, w, weights, capacity_factor=1.0)
  assert np.isfinite(capped).all() and np.abs(capped - ref).max() > 1e-3


def test_message_size_model_picks_all_to_all_only_when_top_k_below_ep():
  assert moe.message_elements("allgather", 8, 100, 7168, 8) == 7 * 100 * 7168
  assert moe.message_elements("all_to_all", 8, 100, 7168, 8) == pytest.approx(7 / 8 * 8 * 100 * 7168)
  assert moe.choose_comm(ep=8, top_k=8) == "allgather"   # tie: no packing, no sort
  assert moe.choose_comm(ep=16, top_k=8) == "all_to_all"
  assert moe.choose_comm(ep=4, top_k=8) == "allgather"
  assert moe.choose_comm(ep=4, top_k=2) == "all_to_all"
  assert moe.choose_comm(ep=4, top_k=8, override="all_to_all") == "all_to_all"
  with pytest.raises(ParallelConfigError, match="moe_comm must be"):
    moe.choose_comm(ep=4, top_k=8, override="ring")


def test_invalid_moe_shapes_name_the_constraint():
  x, idx, w, weights = _problem()
  mesh = ParallelConfig(ep=8).make_mesh()
  with pytest.raises(ParallelConfigError, match=r"routed experts \(6\) must be divisible by ep \(4\)"):
    p = ParallelConfig(ep=4)
    moe.moe_experts(x, idx % 6, w, {k: v[:6] for k, v in weights.items()}, p, p.make_mesh())
  with pytest.raises(ShapeError, match=r"token count \(12\) must be divisible by ep \(8\)"):
    moe.moe_experts(x[:12], idx[:12], w[:12], weights, ParallelConfig(ep=8), mesh)
  with pytest.raises(ShapeError, match="hidden % 128"):
    moe.moe_experts(x[:, :64], idx, w, {**weights, "w_gate": weights["w_gate"][:, :64]},
                    ParallelConfig(ep=8, moe_dispatch_dtype="fp8"), mesh)


def _ragged_on_two_ranks(*per_rank):
  """ragged_all_to_all over ep=2 with each argument given per rank (the docstring's example)."""
  mesh = ParallelConfig(ep=2, attention_dp=True).make_mesh()
  body = lambda *a: moe.ragged_all_to_all(*a, axis_name="ep")
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"),
                             axis_names={"ep"}, check_vma=False))
  return fn(*(jnp.concatenate([jnp.asarray(a) for a in arg]) for arg in per_rank))


def test_ragged_all_to_all_emulation_follows_the_primitive_semantics(monkeypatch):
  args = ([[1., 2, 2], [3., 4, 0]], [[0., 0, 0, 0], [0., 0, 0, 0]], [[0, 1], [0, 1]],
          [[1, 2], [1, 1]], [[0, 0], [1, 2]], [[1, 1], [2, 1]])
  out = np.asarray(_ragged_on_two_ranks(*args)).reshape(2, 4)
  np.testing.assert_array_equal(out, [[1, 3, 0, 0], [2, 2, 4, 0]])  # jax.lax.ragged_all_to_all doc
  # GPUs run the real collective: the same program lowers to it (XLA:CPU cannot execute it)
  monkeypatch.setattr(moe, "EMULATE_RAGGED", False)
  x, idx, w, weights = _problem()
  parallel = ParallelConfig(ep=8, attention_dp=True)
  mesh = parallel.make_mesh()
  text = jax.jit(lambda *a: moe.moe_experts(*a, parallel, mesh, comm="ragged_all_to_all")).lower(
      x, idx, w, weights).as_text()
  assert text.count("ragged_all_to_all") >= 2  # dispatch and combine
