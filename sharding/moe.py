"""MoE expert parallelism with shard_map: all-to-all vs all-gather/reduce-scatter dispatch and combine.

Experts ``w_gate, w_up [E, H, I]``, ``w_down [E, I, H]`` (SwiGLU) are split over ``ep`` (logical
"experts") and each expert's intermediate dim over ``tp`` ("moe_mlp"). Routing (``topk_idx [T, k]``,
``topk_weight [T, k]``) comes from the model's router; this module only moves tokens.

Token layout at entry: either replicated over ``ep`` (attention ran tensor-parallel, so every rank has
every token; each ep rank then takes its 1/ep share) or split over ``ep`` (attention-DP: each rank
has its own tokens). The output has the entry layout.

all_to_all (``comm="all_to_all"``): each rank packs its T·k (token, expert) pairs into a
``[ep, C, H]`` buffer by destination rank, ``all_to_all`` sends row block r to rank r, the rank runs
its local experts as one grouped GEMM (``lax.ragged_dot`` over rows sorted by local expert),
partial sums over ``tp`` are reduced, a second ``all_to_all`` returns the rows, and the sender
scales by the routing weight and sums over k. ``C`` is T·k (dropless) unless ``capacity_factor``
bounds it to ceil(cf·T·k/ep) (pairs past capacity are dropped).

ragged all-to-all (``comm="ragged_all_to_all"``): the same exchange, but each rank sorts its pairs
by destination and sends only the rows it has for each rank (``jax.lax.ragged_all_to_all``; send
and receive offsets from one all-gather of the per-destination counts), into a dropless receive
buffer of ep·T·k rows; the expert outputs return the same way. The fixed-buffer all-to-all sends
ep·C rows whatever the routing (C = T·k dropless), this one the (ep-1)/ep·T·k of the model.
``capacity_factor`` does not apply (it never drops). XLA:CPU cannot run the primitive, so on CPU
``ragged_all_to_all`` emulates it with the same semantics over a fixed-size all_to_all (the tests
check the offset bookkeeping through it; GPUs run the real collective).

allgather (``comm="allgather"``): tokens are all-gathered over ``ep`` (skipped when already
replicated), each rank computes its experts' weighted contribution for every token, and a
reduce-scatter over ``ep`` (an all-reduce when the entry layout is replicated) sums them.

Message-size model per rank, T tokens per rank, hidden H (elements):
    AG/RS       = (ep - 1) · T · H              (gather in, scatter out)
    all-to-all  = (ep - 1) / ep · top_k · T · H (each pair leaves its rank with prob. (ep-1)/ep)
so all-to-all wins when top_k < ep; at top_k = ep they tie and AG/RS (no packing, no sort) is taken.
Dispatch payloads can be quantized (``dispatch_dtype``): "fp8" (e4m3 with one f32 scale per 1x128
block, as the FP8 GEMMs take it) or "nvfp4" (e2m1 codes packed two per byte, e4m3 scale per 16,
f32 per-tensor scale per sender: the kernels' format); the combine stays in the activations' dtype.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxinfer.errors import ShapeError
from sharding.config import ParallelConfig, ParallelConfigError

MOE_AXES = {"w_gate": ("experts", "embed", "moe_mlp"), "w_up": ("experts", "embed", "moe_mlp"),
            "w_down": ("experts", "moe_mlp", "embed")}


COMMS = ("all_to_all", "ragged_all_to_all", "allgather")


def message_elements(comm: str, ep: int, tokens_per_rank: int, hidden: int, top_k: int) -> float:
  """Elements each rank sends for dispatch + combine under the message-size model."""
  if comm == "allgather":
    return (ep - 1) * tokens_per_rank * hidden
  if comm in ("all_to_all", "ragged_all_to_all"):
    return (ep - 1) / ep * top_k * tokens_per_rank * hidden
  raise ParallelConfigError(f"unknown MoE comm {comm!r}")


def choose_comm(ep: int, top_k: int, tokens_per_rank: int = 1, hidden: int = 1,
                override: str = "auto") -> str:
  """The message-size model's pick (``override`` other than "auto" wins)."""
  if override != "auto":
    if override not in COMMS:
      raise ParallelConfigError(f"moe_comm must be auto | {' | '.join(COMMS)}, got {override!r}")
    return override
  a2a = message_elements("all_to_all", ep, tokens_per_rank, hidden, top_k)
  agrs = message_elements("allgather", ep, tokens_per_rank, hidden, top_k)
  return "all_to_all" if a2a < agrs else "allgather"


def topk_router(x: jax.Array, w_router: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """Softmax-then-top-k routing (weights renormalised): ([T, k] int32, [T, k] float32)."""
  probs = jax.nn.softmax(jnp.einsum("th,he->te", x.astype(jnp.float32), w_router.astype(jnp.float32)))
  w, idx = jax.lax.top_k(probs, top_k)
  return idx.astype(jnp.int32), w / jnp.sum(w, axis=-1, keepdims=True)


def experts_reference(x, topk_idx, topk_weight, weights: dict) -> jax.Array:
  """Dense reference: every expert on every token, then the routed weighted sum (float32)."""
  x32 = x.astype(jnp.float32)
  g = jnp.einsum("th,ehi->eti", x32, weights["w_gate"].astype(jnp.float32))
  u = jnp.einsum("th,ehi->eti", x32, weights["w_up"].astype(jnp.float32))
  y = jnp.einsum("eti,eih->eth", jax.nn.silu(g) * u, weights["w_down"].astype(jnp.float32))
  picked = y[topk_idx, jnp.arange(x.shape[0])[:, None]]                 # [T, k, H]
  return jnp.einsum("tkh,tk->th", picked, topk_weight.astype(jnp.float32))


# ---- dispatch payload quantization -----------------------------------------------------------

def _quantize(x: jax.Array, dtype: str):
  if dtype == "bf16":
    return (x,)
  if dtype == "fp8":
    from kernels.quant import fp8_block
    return fp8_block.quantize_activations(x)
  from kernels.quant import nvfp4
  packed, scale, global_scale = nvfp4.quantize(x)
  return packed, scale, global_scale


def _dequantize(parts, dtype: str, out_dtype):
  if dtype == "bf16":
    return parts[0]
  if dtype == "fp8":
    from kernels.quant import fp8_block
    return fp8_block.dequantize_activations(*parts).astype(out_dtype)
  from kernels.quant import nvfp4
  packed, scale, global_scale = parts
  return nvfp4.dequantize(packed, scale, global_scale[..., None, None], dtype=out_dtype)


def _check_payload(hidden: int, dtype: str) -> None:
  if dtype == "fp8" and hidden % 128:
    raise ShapeError(f"FP8 dispatch needs hidden % 128 == 0 (1x128 scale blocks), got {hidden}")
  if dtype == "nvfp4" and hidden % 16:
    raise ShapeError(f"NVFP4 dispatch needs hidden % 16 == 0, got {hidden}")


# ---- local expert compute --------------------------------------------------------------------

def _grouped_swiglu(rows: jax.Array, local_expert: jax.Array, weights: dict) -> jax.Array:
  """rows [R, H], local_expert [R] (-1: empty row) -> [R, H] partial over the local I slice."""
  num_local = weights["w_gate"].shape[0]
  key = jnp.where(local_expert < 0, num_local, local_expert)
  order = jnp.argsort(key, stable=True)
  sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
  xs = rows[order]
  dot = functools.partial(jax.lax.ragged_dot, group_sizes=sizes,
                          preferred_element_type=jnp.float32)
  h = jax.nn.silu(dot(xs, weights["w_gate"])) * dot(xs, weights["w_up"])
  y = dot(h.astype(rows.dtype), weights["w_down"])
  y = jnp.where((key[order] < num_local)[:, None], y, 0.0)
  return jnp.zeros_like(y).at[order].set(y)


# ---- the two schemes (inside shard_map over ep, tp) ---------------------------------------------

def _all_to_all_local(x, idx, w, weights, *, ep: int, tp: int, capacity: int, dispatch_dtype: str,
                      grouped_fn=None):
  T, H = x.shape
  k = idx.shape[1]
  num_local = weights["w_gate"].shape[0]
  flat_e = idx.reshape(-1)
  dest = flat_e // num_local
  onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)
  pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, dest[:, None], axis=1)[:, 0]
  keep = pos < capacity
  pos_c = jnp.where(keep, pos, capacity)  # out of range: dropped by mode="drop"
  src_rows = x[jnp.arange(T * k) // k]
  send = jnp.zeros((ep, capacity, H), x.dtype).at[dest, pos_c].set(src_rows, mode="drop")
  send_e = jnp.full((ep, capacity), -1, jnp.int32).at[dest, pos_c].set(flat_e % num_local,
                                                                         mode="drop")
  a2a = lambda a: jax.lax.all_to_all(a, "ep", 0, 0, tiled=True)
  parts = _quantize(send, dispatch_dtype)
  if dispatch_dtype == "nvfp4":  # the per-tensor scale travels by all-gather (one f32 per sender)
    recv_parts = (a2a(parts[0]), a2a(parts[1]), jax.lax.all_gather(parts[2], "ep"))
  else:
    recv_parts = tuple(a2a(p) for p in parts)
  recv = _dequantize(recv_parts, dispatch_dtype, x.dtype)
  recv_e = a2a(send_e)
  y = (grouped_fn or _grouped_swiglu)(recv.reshape(ep * capacity, H), recv_e.reshape(-1), weights)
  y = y.astype(reduce_dtype(x.dtype))  # combine in the activations' dtype
  if tp > 1:
    y = jax.lax.psum(y, "tp")
  back = a2a(y.reshape(ep, capacity, H))
  got = jnp.where(keep[:, None], back[dest, jnp.minimum(pos_c, capacity - 1)], 0)
  return jnp.einsum("tkh,tk->th", got.reshape(T, k, H).astype(jnp.float32),
                    w.astype(jnp.float32)).astype(x.dtype)


# None: emulate ragged_all_to_all exactly where XLA cannot run it (CPU); tests may force either.
EMULATE_RAGGED: bool | None = None


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                      axis_name: str):
  """``jax.lax.ragged_all_to_all`` (see its docstring for the offset semantics); on CPU an
  emulation with the same result: each rank's ragged slices padded to ``operand``'s rows, a plain
  all_to_all, and a scatter at the receiver-side offsets."""
  emulate = jax.default_backend() == "cpu" if EMULATE_RAGGED is None else EMULATE_RAGGED
  if not emulate:
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                     recv_sizes, axis_name=axis_name)
  n, ranks = operand.shape[0], input_offsets.shape[0]
  rows = jnp.arange(n)
  tail = (1,) * (operand.ndim - 1)

  def padded(offset, size):
    return jnp.where((rows < size).reshape(n, *tail),
                     operand[jnp.clip(offset + rows, 0, n - 1)], jnp.zeros((), operand.dtype))

  recv = jax.lax.all_to_all(jax.vmap(padded)(input_offsets, send_sizes), axis_name, 0, 0,
                            tiled=True)                                     # [ranks, n, ...]
  at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)     # where each lands here
  dst = jnp.where(rows[None] < recv_sizes[:, None], at[:, None] + rows[None], output.shape[0])
  return output.at[dst.reshape(-1)].set(recv.reshape(ranks * n, *operand.shape[1:]), mode="drop")


def _ragged_local(x, idx, w, weights, *, ep: int, tp: int, dispatch_dtype: str, grouped_fn=None):
  T, H = x.shape
  k = idx.shape[1]
  n = T * k
  num_local = weights["w_gate"].shape[0]
  me = jax.lax.axis_index("ep")
  flat_e = idx.reshape(-1)
  dest = flat_e // num_local
  order = jnp.argsort(dest, stable=True)                      # pairs grouped by destination rank
  send_sizes = jnp.bincount(dest, length=ep).astype(jnp.int32)
  send_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
  sizes = jax.lax.all_gather(send_sizes, "ep")                # [sender, receiver]
  land = (jnp.cumsum(sizes, axis=0) - sizes)[me].astype(jnp.int32)  # my rows' offset at each receiver
  recv_sizes = sizes[:, me]
  recv_offsets = (jnp.cumsum(recv_sizes) - recv_sizes).astype(jnp.int32)
  send = functools.partial(ragged_all_to_all, input_offsets=send_offsets, send_sizes=send_sizes,
                           output_offsets=land, recv_sizes=recv_sizes, axis_name="ep")
  cap = ep * n  # dropless: every pair of every rank could pick this rank's experts
  parts = _quantize(x[order // k], dispatch_dtype)
  recv_parts = tuple(send(p, jnp.zeros((cap, *p.shape[1:]), p.dtype)) for p in parts[:2])
  if dispatch_dtype == "nvfp4":  # per-sender tensor scale: each received row takes its sender's
    sender = jnp.searchsorted(jnp.cumsum(recv_sizes), jnp.arange(cap), side="right")
    scales = jax.lax.all_gather(parts[2], "ep")
    recv = nvfp4_dequantize_rows(recv_parts, scales[jnp.minimum(sender, ep - 1)], x.dtype)
  else:
    recv = _dequantize(recv_parts, dispatch_dtype, x.dtype)
  recv_e = send((flat_e % num_local)[order], jnp.full((cap,), -1, jnp.int32))
  y = (grouped_fn or _grouped_swiglu)(recv, recv_e, weights).astype(reduce_dtype(x.dtype))
  if tp > 1:
    y = jax.lax.psum(y, "tp")
  # back to the senders, into their destination-sorted order, then unsorted
  back = ragged_all_to_all(y, jnp.zeros((n, H), y.dtype), recv_offsets, recv_sizes,
                           jax.lax.all_gather(send_offsets, "ep")[:, me], send_sizes, "ep")
  got = jnp.zeros_like(back).at[order].set(back)
  return jnp.einsum("tkh,tk->th", got.reshape(T, k, H).astype(jnp.float32),
                    w.astype(jnp.float32)).astype(x.dtype)


def nvfp4_dequantize_rows(parts, row_scale, out_dtype):
  """NVFP4 rows (packed [R, H/2], block scales [R, H/16]) with one tensor scale per row [R]."""
  from kernels.quant import nvfp4
  return nvfp4.dequantize(parts[0], parts[1], row_scale[:, None, None], dtype=out_dtype)


def _allgather_local(x, idx, w, weights, *, ep: int, tp: int, gathered: bool, dispatch_dtype: str,
                     grouped_fn=None):
  num_local = weights["w_gate"].shape[0]
  if not gathered and ep > 1:
    parts = _quantize(x, dispatch_dtype)
    parts = tuple(jax.lax.all_gather(p, "ep", tiled=p.ndim > 0) for p in parts)
    x = _dequantize(parts, dispatch_dtype, x.dtype) if dispatch_dtype != "nvfp4" else \
        _dequantize_gathered_nvfp4(parts, ep, x.dtype)
    idx = jax.lax.all_gather(idx, "ep", tiled=True)
    w = jax.lax.all_gather(w, "ep", tiled=True)
  T, k = idx.shape
  me = jax.lax.axis_index("ep")
  local = jnp.where(idx // num_local == me, idx % num_local, -1).reshape(-1)
  y = (grouped_fn or _grouped_swiglu)(x[jnp.arange(T * k) // k], local, weights)
  y = jnp.einsum("tkh,tk->th", y.reshape(T, k, -1), w.astype(jnp.float32))
  if gathered:  # replicated entry layout: all-reduce over the whole MoE group
    axes = tuple(a for a, n in (("ep", ep), ("tp", tp)) if n > 1)
    y = y.astype(reduce_dtype(x.dtype))  # combine in the activations' dtype
    return (jax.lax.psum(y, axes) if axes else y).astype(x.dtype)
  y = y.astype(reduce_dtype(x.dtype))
  if tp > 1:
    y = jax.lax.psum(y, "tp")
  return jax.lax.psum_scatter(y, "ep", scatter_dimension=0, tiled=True).astype(x.dtype)


def reduce_dtype(dtype):
  """The activations' dtype, except float32 for 16-bit floats on CPU, where XLA's
  AllReducePromotion pass aborts on bf16 reductions (jax 0.11.2)."""
  if jax.default_backend() == "cpu" and jnp.dtype(dtype).itemsize < 4:
    return jnp.float32
  return dtype


def _dequantize_gathered_nvfp4(parts, ep: int, out_dtype):
  packed, _, global_scale = parts                 # [T, H/2], [T, H/16], [ep]
  return nvfp4_dequantize_rows(parts, jnp.repeat(global_scale, packed.shape[0] // ep), out_dtype)


def local_capacity(tokens_per_rank: int, top_k: int, ep: int, capacity_factor: float | None) -> int:
  if capacity_factor is None:
    return tokens_per_rank * top_k
  return min(tokens_per_rank * top_k, max(1, math.ceil(capacity_factor * tokens_per_rank * top_k / ep)))


def moe_local(x, idx, w, weights: dict, *, ep: int, tp: int, comm: str, tokens_split: bool,
              dispatch_dtype: str = "bf16", capacity_factor: float | None = None,
              grouped_fn=None) -> jax.Array:
  """The per-device body (inside a shard_map manual over "ep", and over "tp" when ``tp`` > 1;
  with ``tp=1`` a "tp" axis left automatic splits the expert GEMMs by GSPMD instead). x, idx, w are
  this rank's tokens (``tokens_split``) or all tokens (replicated); weights its local experts.
  ``grouped_fn(rows, local_expert, weights)`` replaces the expert GEMMs (benchmarks time the
  communication alone with an identity)."""
  top_k = idx.shape[1]

  def exchange(x, idx, w):
    if comm == "ragged_all_to_all":
      return _ragged_local(x, idx, w, weights, ep=ep, tp=tp, dispatch_dtype=dispatch_dtype,
                           grouped_fn=grouped_fn)
    return _all_to_all_local(x, idx, w, weights, ep=ep, tp=tp,
                             capacity=local_capacity(x.shape[0], top_k, ep, capacity_factor),
                             dispatch_dtype=dispatch_dtype, grouped_fn=grouped_fn)

  if not tokens_split and comm != "allgather" and ep > 1:
    share_len = x.shape[0] // ep
    r = jax.lax.axis_index("ep")
    share = lambda a: jax.lax.dynamic_slice_in_dim(a, r * share_len, share_len, 0)
    return jax.lax.all_gather(exchange(share(x), share(idx), share(w)), "ep", tiled=True)
  if comm != "allgather":
    return exchange(x, idx, w)
  return _allgather_local(x, idx, w, weights, ep=ep, tp=tp, gathered=not tokens_split,
                          dispatch_dtype=dispatch_dtype, grouped_fn=grouped_fn)


def check_moe(num_tokens: int, hidden: int, weights: dict, parallel: ParallelConfig) -> None:
  ep, tp = parallel.ep, parallel.tp
  num_experts = weights["w_gate"].shape[0]
  if num_experts % ep:
    raise ParallelConfigError(f"the number of routed experts ({num_experts}) must be divisible by "
                              f"ep ({ep})")
  if weights["w_gate"].shape[2] % tp:
    raise ParallelConfigError(f"moe_intermediate_size ({weights['w_gate'].shape[2]}) must be "
                              f"divisible by tp ({tp})")
  if num_tokens % ep:
    raise ShapeError(f"MoE token count ({num_tokens}) must be divisible by ep ({ep}); pad the step")
  _check_payload(hidden, parallel.moe_dispatch_dtype)


W_SPECS = {"w_gate": P("ep", None, "tp"), "w_up": P("ep", None, "tp"), "w_down": P("ep", "tp", None)}


def moe_experts(x: jax.Array, topk_idx: jax.Array, topk_weight: jax.Array, weights: dict,
                parallel: ParallelConfig, mesh: Mesh | None, *, tokens_split: bool | None = None,
                comm: str | None = None, capacity_factor: float | None = None,
                grouped_fn=None) -> jax.Array:
  """Routed-expert output [T, H] for tokens x [T, H] (global view; call inside or outside jit).

  ``tokens_split``: tokens enter split over ep (default: ``parallel.attention_dp``) instead of
  replicated. ``comm`` overrides ``parallel.moe_comm``; "auto" asks the message-size model.
  ``mesh=None``: the context mesh, as inside another shard_map (the pipeline's, manual over dp/pp).
  """
  T, H = x.shape
  check_moe(T, H, weights, parallel)
  tokens_split = parallel.attention_dp if tokens_split is None else tokens_split
  comm = choose_comm(parallel.ep, topk_idx.shape[1], T // parallel.ep, H, comm or parallel.moe_comm)
  body = functools.partial(moe_local, ep=parallel.ep, tp=parallel.tp, comm=comm,
                           tokens_split=tokens_split, dispatch_dtype=parallel.moe_dispatch_dtype,
                           capacity_factor=capacity_factor, grouped_fn=grouped_fn)
  tok = P("ep") if tokens_split else P()
  fn = jax.shard_map(body, mesh=mesh if mesh is not None else jax.sharding.get_abstract_mesh(), in_specs=(tok, tok, tok, W_SPECS), out_specs=tok,
                     axis_names={"ep", "tp"}, check_vma=False)
  return fn(x, topk_idx, topk_weight, {k: weights[k] for k in W_SPECS})
