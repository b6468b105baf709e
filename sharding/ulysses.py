"""DeepSpeed-Ulysses sequence parallelism for the Wan DiT, with FSDP-style weight sharding.

Tokens [B, S, D] are split along S over one mesh axis of size n. Everything per token (projections,
norms, FFN, cross-attention to the replicated text) runs on the local S/n tokens. Self-attention needs
every token, so around it two all-to-alls swap the split from sequence to heads and back:
    q, k, v [B, S/n, N, Dh] --all_to_all--> [B, S, N/n, Dh] --attention--> --all_to_all--> [B, S/n, N, Dh]
Per layer that moves 4·B·S·D·(n-1)/n² elements per device (q, k, v in, o out), independent of n·S² of
attention work, which is why Ulysses scales until the all-to-all bandwidth becomes the floor.
N must be divisible by n (Wan 1.3B: 12 heads -> n in {2, 3, 4, 6, 12}; 14B: 40 -> {2, 4, 5, 8, 10, 20}).

Quantized attention (blocks carrying "attn_quant", e.g. calibrated FP8Attention) runs on the head-split
tensors too: its per-head state (FP8Attention's K mean [N, Dh]) is sliced to the device's N/n heads
(``for_heads``); per-tensor scales apply unchanged.

FSDP: with ``fsdp=True`` each block's matrices are stored split along their first dim over the same
axis and all-gathered right before the block runs (ZeRO-3), so a 14B model's weights take 1/n of each
device's memory; the per-block gather is the price.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinfer.errors import ShapeError
from jaxinfer.models import wan_dit


def check_divisible(num_heads: int, seq_len: int, axis_size: int) -> None:
  if num_heads % axis_size:
    raise ShapeError(f"Ulysses needs the head count ({num_heads}) divisible by the sequence-parallel "
                     f"axis size ({axis_size}); pick an axis size that divides {num_heads}")
  if seq_len % axis_size:
    raise ShapeError(f"Ulysses needs the token count ({seq_len}) divisible by the sequence-parallel "
                     f"axis size ({axis_size}); change the frame count or resolution")


def seq_to_heads(x: jax.Array, axis_name: str) -> jax.Array:
  """[B, S/n, N, Dh] (sequence-split) -> [B, S, N/n, Dh] (head-split). Inside shard_map."""
  return jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x: jax.Array, axis_name: str) -> jax.Array:
  """[B, S, N/n, Dh] (head-split) -> [B, S/n, N, Dh] (sequence-split). Inside shard_map."""
  return jax.lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def local_heads(quant, axis_name: str, local_num_heads: int):
  """``quant`` restricted to this device's heads after ``seq_to_heads`` (device i holds heads
  [i·N/n, (i+1)·N/n)); quant objects without per-head state (no ``for_heads``) pass through."""
  if not hasattr(quant, "for_heads"):
    return quant
  return quant.for_heads(jax.lax.axis_index(axis_name) * local_num_heads, local_num_heads)


def ulysses_attention(attn_fn: wan_dit.AttentionFn, axis_name: str) -> wan_dit.AttentionFn:
  """Wraps a local attention fn(q, k, v[, quant=]) on [B, S, N, Dh] into its sequence-parallel form
  (inside shard_map over ``axis_name``)."""
  def fn(q, k, v, quant=None):
    q, k, v = (seq_to_heads(a, axis_name) for a in (q, k, v))
    if quant is None:
      o = attn_fn(q, k, v)
    else:
      o = attn_fn(q, k, v, quant=local_heads(quant, axis_name, q.shape[2]))
    return heads_to_seq(o, axis_name)
  return fn


def fsdp_spec(shape: tuple[int, ...], axis: str, axis_size: int) -> P:
  """Matrices split along dim 0 when it divides evenly; vectors and the rest replicated."""
  if len(shape) >= 2 and shape[0] % axis_size == 0:
    return P(axis, *([None] * (len(shape) - 1)))
  return P()


def fsdp_block_specs(blocks: Any, axis: str, axis_size: int) -> Any:
  return jax.tree.map(lambda w: fsdp_spec(w.shape, axis, axis_size), blocks)


def shard_params(params: wan_dit.Params, mesh: Mesh, axis: str, fsdp: bool) -> wan_dit.Params:
  """Places the params on the mesh: blocks FSDP-split (or replicated), the rest replicated."""
  n = mesh.shape[axis]
  rep = NamedSharding(mesh, P())
  out = {k: jax.device_put(v, rep) for k, v in params.items() if k != "blocks"}
  specs = fsdp_block_specs(params["blocks"], axis, n) if fsdp else jax.tree.map(lambda _: P(),
                                                                                params["blocks"])
  out["blocks"] = jax.tree.map(lambda w, s: jax.device_put(w, NamedSharding(mesh, s)),
                               params["blocks"], specs)
  return out


def _gather(p, spec: P, axis: str):
  return jax.lax.all_gather(p, axis, axis=0, tiled=True) if spec and spec[0] == axis else p


def forward(params: wan_dit.Params, latents: jax.Array, timestep: jax.Array, text: jax.Array,
            cfg: wan_dit.WanDiTConfig, mesh: Mesh, *, axis: str = "sp", fsdp: bool = False,
            attn_impl: str | wan_dit.AttentionFn = "xla", dtype=jnp.bfloat16) -> jax.Array:
  """``wan_dit.forward`` with the blocks run sequence-parallel over ``mesh`` axis ``axis``.
  ``attn_impl``: a name for ``wan_dit.attention`` or a local AttentionFn fn(q, k, v, quant=None)."""
  n = mesh.shape[axis]
  x, temb, tproj, ctx, grid, cos, sin = wan_dit.embed(params, latents, timestep, text, cfg, dtype)
  check_divisible(cfg.num_heads, x.shape[1], n)
  local_attn = attn_impl if callable(attn_impl) else (
      lambda q, k, v, quant=None: wan_dit.attention(q, k, v, attn_impl, quant))
  specs = fsdp_block_specs(params["blocks"], axis, n) if fsdp else jax.tree.map(lambda _: P(),
                                                                                params["blocks"])
  block_spec = specs[0]                 # every block has the same structure
  hook = (lambda p: jax.tree.map(lambda w, s: _gather(w, s, axis), p, block_spec)) if fsdp else None

  def body(blocks, head_params, x, ctx, tproj, temb, cos, sin):
    out, _ = wan_dit.blocks_forward({"blocks": blocks}, x, ctx, tproj, cos, sin, cfg,
                                    self_attn_fn=ulysses_attention(local_attn, axis),
                                    cross_attn_fn=local_attn, layer_hook=hook)
    return wan_dit.head(head_params, out, temb, cfg)          # per token: stays sequence-split

  tok = P(None, axis, None)
  head_params = {k: params[k] for k in ("out_modulation", "proj_out_w", "proj_out_b")}
  in_specs = (specs, jax.tree.map(lambda _: P(), head_params), tok, P(), P(), P(),
              P(axis, None), P(axis, None))
  args = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                      (params["blocks"], head_params, x, ctx, tproj, temb, cos, sin), in_specs)
  patches = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=tok, check_vma=False)(*args)
  patches = jax.device_put(patches, NamedSharding(mesh, P()))
  return wan_dit.unpatchify(patches, grid, cfg).astype(jnp.float32)
