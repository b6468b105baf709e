"""Mixture-of-experts feed-forward (DeepSeek-V3): group-limited sigmoid routing and dropless dispatch.

Routing, per token (float32):
    s = sigmoid(x Wr)                              scores, [E]
    c = s + e_score_correction_bias                choice scores (the bias only steers selection)
    groups: E experts in n_group groups; a group's score is the sum of its top-2 c; keep topk_group groups
    idx = top-k of c over the kept groups's experts
    w = s[idx] (/ sum, if norm_topk_prob) * routed_scaling_factor

Dispatch is dropless: the T*k (token, expert) pairs are sorted by expert, each expert's contiguous rows go
through one grouped (ragged) GEMM per projection, and the rows are unsorted and summed with their weights.
No capacity factor, no token is dropped. ``dense_moe_reference`` runs every expert on every token and is
a test reference only.

Expert weights are stacked [E, in, out] (or kernels.quant grouped NVFP4/FP8 types); the grouped GEMM
is kernels.gemm.grouped_matmul (Pallas kernels on GPU, ``jax.lax.ragged_dot`` elsewhere).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels import gemm


def route(x: jax.Array, router_w: jax.Array, bias: jax.Array, *, top_k: int, n_group: int,
          topk_group: int, norm_topk_prob: bool,
          routed_scaling_factor: float) -> tuple[jax.Array, jax.Array]:
  """x [T, H] -> (weights [T, k] float32, expert ids [T, k] int32)."""
  T = x.shape[0]
  E = router_w.shape[-1]
  logits = jnp.einsum("th,he->te", x.astype(jnp.float32), router_w.astype(jnp.float32))
  scores = jax.nn.sigmoid(logits)
  choice = scores + bias.astype(jnp.float32)[None, :]
  if n_group > 1 and topk_group < n_group:
    grouped = choice.reshape(T, n_group, E // n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)                       # [T, G]
    _, kept = jax.lax.top_k(group_scores, topk_group)                         # [T, topk_group]
    group_mask = jnp.zeros((T, n_group), bool).at[jnp.arange(T)[:, None], kept].set(True)
    expert_mask = jnp.repeat(group_mask, E // n_group, axis=1)                # [T, E]
    choice = jnp.where(expert_mask, choice, -jnp.inf)
  _, idx = jax.lax.top_k(choice, top_k)
  weights = jnp.take_along_axis(scores, idx, axis=-1)
  if norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * routed_scaling_factor, idx.astype(jnp.int32)


def grouped_linear(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
  """Rows of x [M, K] sorted by group; w [G, K, N] (or a quantized grouped type) -> [M, N]."""
  return gemm.grouped_matmul(x, w, group_sizes)


def sort_by_expert(idx: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """idx [T, k] -> (order [T*k]: pair ids sorted by expert, token of each sorted row, group_sizes [E])."""
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, order // idx.shape[1], group_sizes


def dispatch_moe(x: jax.Array, weights: jax.Array, idx: jax.Array, w_gate, w_up, w_down,
                 num_experts: int) -> jax.Array:
  """Dropless sorted dispatch: x [T, H], weights/idx [T, k] -> [T, H] (x's dtype)."""
  T, k = idx.shape
  order, token_of_row, group_sizes = sort_by_expert(idx, num_experts)
  xs = x[token_of_row]                                                        # [T*k, H]
  h = gemm.grouped_swiglu(xs, w_gate, w_up, group_sizes)     # silu(xs Wg) * (xs Wu)
  ys = grouped_linear(h, w_down, group_sizes)                                 # [T*k, H]
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  y = ys[inverse].reshape(T, k, -1).astype(jnp.float32)
  return jnp.einsum("tkh,tk->th", y, weights).astype(x.dtype)


def dense_moe_reference(x: jax.Array, weights: jax.Array, idx: jax.Array, w_gate: jax.Array,
                        w_up: jax.Array, w_down: jax.Array) -> jax.Array:
  """Every expert on every token (float32), combined with the routing weights. Tests only."""
  T = x.shape[0]
  E = w_gate.shape[0]
  full = jnp.zeros((T, E), jnp.float32).at[jnp.arange(T)[:, None], idx].add(weights)
  x32 = x.astype(jnp.float32)
  g = jnp.einsum("th,ehi->tei", x32, w_gate.astype(jnp.float32))
  u = jnp.einsum("th,ehi->tei", x32, w_up.astype(jnp.float32))
  y = jnp.einsum("tei,eih->teh", jax.nn.silu(g) * u, w_down.astype(jnp.float32))
  return jnp.einsum("teh,te->th", y, full).astype(x.dtype)
