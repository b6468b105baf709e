"""FP8 E4M3 block-scaled GEMM (DeepSeek-V3 scheme) in Pallas Mosaic GPU (Hopper, sm_90a), FP8 wgmma.

y[M, N] = sum_kb (xq[:, kb] @ wq[:, kb]^T) * x_scale[:, kb] * w_scale_inv[n // 128, kb]

Layouts (kernels/quant/fp8_block.py): x is quantized on the fly into 1x128 blocks (xq e4m3 [M, K],
x_scale f32 [M, K/128]); weight e4m3 [N, K] (K contiguous: the K-major B operand that FP8 wgmma
requires, so the checkpoint layout is used as is) with weight_scale_inv f32 [N/128, K/128].
The kernel takes the scales transposed, K-block major: x_scale^T [K/128, M] (one TMA row of
cta_m scales per K step) and w_scale_inv^T [K/128, NBP] (NBP = N/128 rounded up to 32, i.e.
128-byte rows; the whole row, <= 256 blocks, is one TMA box per K step).

Structure (DeepGEMM's): a persistent grid of one CTA per SM walks the (M, N) output tiles in a
planar snake; per tile, a warp-specialized pipeline (plgpu.emit_pipeline_warp_specialized) has a
TMA producer warpgroup streaming the 128-wide K blocks of A, B and both scale rows through
`stages` SMEM slots, and 2 consumer warpgroups. Each consumer owns a (tile_m, tile_n) slice of the
CTA tile (split along M or N, `wg_dim`) and per K block issues its FP8 wgmma into a fresh f32
accumulator, waits, and promotes it into the main f32 accumulator held in registers:
acc += tmp * (sa[m] * sb). The promotion of one warpgroup overlaps the other warpgroup's wgmma.
tile_n <= 128 and 128-aligned, so a consumer's slice sees a single weight scale per K block.
Registers: tmp + acc = 2 * tile_m * tile_n / 128 f32 per thread (tile 64x128 -> 128 registers).
Epilogue: acc -> out dtype -> swizzled SMEM -> TMA store, overlapped with the next tile's
pipeline prologue.

Grouped (MoE, jax.lax.ragged_dot semantics, grouped_fp8_block_matmul): the quantized rows are
gathered (XLA) into a layout where each expert's rows start on a cta_m tile boundary; the same
kernel walks those tiles with the tile's expert's B operand and scales (a per-tile expert id read
from GMEM; unused tiles skipped), and the output rows are gathered back, rows past
sum(group_sizes) as zeros. (A first version stored unaligned group rows with a ladder of
power-of-two-row TMA stores, as jax's ragged_dot_mgpu does; it raised CUDA_ERROR_ILLEGAL_INSTRUCTION
on the H100 in run 1, so it was replaced by this aligned layout.)

Shapes: K % 128 == 0; N % cta_n == 0 (cta_n = 128 or 256); M is padded up to cta_m in the wrapper
(rows of zeros, scale 1) and sliced off. Other shapes use kernels/fp8_block_matmul.py (Triton).

Target roofline (H100 SXM): M = N = K = 8192 is 1.1 PFLOP; dense FP8 wgmma peak is ~1979 TFLOP/s
at boost clock (XLA's per-tensor-scaled FP8 dot measured 1247 TFLOP/s here); the issue's target
is 1.2x the XLA bf16 dot (~870 TFLOP/s, 1.26 ms). Operand traffic per CTA K step (cta 128x128):
32 KiB from L2 for 4.2 MFLOP; promotion is 1 FMA per accumulator element per 128-deep K block
(<1% of the MMA work, but it serializes each warpgroup's wgmma, which is why two consumers).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxinfer.errors import ShapeError
from kernels import fp8_block_matmul as triton_fp8
from kernels import grouped_matmul
from kernels.quant import fp8_block

BK = fp8_block.BLOCK
SUB_M = 64  # wgmma's M: rows per temporary accumulator strip
MAX_SCALE_ROW = 256  # TMA box limit: w_scale_inv^T rows of up to 256 N blocks (N <= 32768)

# The plain-JAX reference (the same 1x128 activation quantization, f32 math) is shared with the
# Triton kernel, as are the input checks.
fp8_block_reference = triton_fp8.fp8_block_reference
check_shapes = triton_fp8.check_shapes


@dataclasses.dataclass(frozen=True)
class Config:
  """Per-consumer-warpgroup tile (tile_m x tile_n); the CTA tile is two of them along wg_dim."""
  tile_m: int = 64
  tile_n: int = 128
  wg_dim: str = "m"          # "m": CTA tile (2*tile_m, tile_n); "n": (tile_m, 2*tile_n)
  stages: int = 4            # SMEM pipeline depth (K blocks in flight)
  grid_minor: str = "n"      # planar-snake minor dimension of the tile walk
  grid_tile_width: int = 8
  # "tmp": DeepGEMM promotion, each K block's wgmma into a fresh accumulator, acc += tmp * s.
  # "rescale": one accumulator kept in units of the current row scale s[m] = sa[m] * sb (one sb
  #   per consumer slice): acc *= s_prev / s before each wgmma, acc * s_last at the end; needs no
  #   temporary registers (so 128x128 slices fit) but overflows if consecutive block scales of a
  #   row differ by > ~1e30 (e.g. a K block of subnormal activations next to normal ones).
  promote: str = "tmp"
  k_sub: int = 1             # "tmp" only: 128-wide K blocks per pipeline step; with 2 the second
                             # block's wgmma runs while the first block is promoted
  lane: bool = False         # Mosaic GPU lowering semantics: Lane (True) or Warpgroup (False)

  @property
  def cta_m(self) -> int:
    return self.tile_m * (2 if self.wg_dim == "m" else 1)

  @property
  def cta_n(self) -> int:
    return self.tile_n * (2 if self.wg_dim == "n" else 1)


def default_config(m: int, n: int, k: int) -> Config:
  del k
  return Config(64, 128, "m")


def supported(m: int, n: int, k: int, cfg: Config | None = None) -> bool:
  """Whether the Mosaic GPU kernel handles this shape (else use the Triton kernel)."""
  cfg = cfg or default_config(m, n, k)
  return (m > 0 and k > 0 and k % (BK * cfg.k_sub) == 0 and n % cfg.cta_n == 0
          and _scale_row_width(n) <= MAX_SCALE_ROW)


def _scale_row_width(n: int) -> int:
  # Rounded up to 32 f32 = 128 bytes: 16-byte aligned rows for TMA, and a copy size divisible by
  # the warpgroup's 128 threads (Lane semantics requires that).
  nb = -(-n // BK)
  return -(-nb // 32) * 32


def _num_sms() -> int:
  try:
    return jax.devices()[0].core_count
  except AttributeError:
    return 4


def _fp8_transforms():
  # 128 fp8 elements = 128 bytes per row: 128-byte swizzle, (8, 128) tiles.
  return (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))


def _kernel(*refs, cfg: Config, m_iters: int, n: int, k: int, num_groups: int | None):
  """Dense (num_groups None): refs = a, a_scale^T, b, b_scale^T, out. Grouped: refs = tile_group,
  a, a_scale^T, b [E, N, K], b_scale^T [E, ...], out, where row tile i (rows i*cta_m ..) uses
  expert tile_group[i]'s weight, or is skipped when tile_group[i] < 0."""
  grouped = num_groups is not None
  if grouped:
    tile_group_gmem, a_gmem, as_gmem, b_gmem, bs_gmem, out_gmem = refs
    b_any, bs_any = b_gmem.at[0], bs_gmem.at[0]
  else:
    a_gmem, as_gmem, b_gmem, bs_gmem, out_gmem = refs
    b_any, bs_any = b_gmem, bs_gmem
  tile_m, tile_n, cta_m, cta_n = cfg.tile_m, cfg.tile_n, cfg.cta_m, cfg.cta_n
  out_dtype = out_gmem.dtype
  kb = BK * cfg.k_sub
  k_iters = k // kb
  n_iters = n // cta_n
  nbp = bs_any.shape[-1]
  out_bits = jnp.dtype(out_dtype).itemsize * 8
  out_swizzle = plgpu.find_swizzle(tile_n * out_bits)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle * 8 // out_bits)),
                    plgpu.SwizzleTransform(out_swizzle))

  def get_pipeline(body, compute_context):
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_iters,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_m, kb), lambda kk: (0, kk), transforms=_fp8_transforms(),
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec((cfg.k_sub, cta_m), lambda kk: (kk, 0), memory_space=plgpu.SMEM),
            plgpu.BlockSpec((cta_n, kb), lambda kk: (0, kk), transforms=_fp8_transforms(),
                            memory_space=plgpu.SMEM),
            plgpu.BlockSpec((cfg.k_sub, nbp), lambda kk: (kk, 0), memory_space=plgpu.SMEM),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.stages,
        compute_context=compute_context,
    )

  ignore = lambda *_, **__: None

  @functools.partial(
      pl.run_scoped,
      allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, as_gmem, b_any, bs_any),
      out_smem=plgpu.SMEM((2, tile_m, tile_n), out_dtype, transforms=out_transforms),
      collective_axes="wg",
  )
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tile_loop(info: plgpu.NDLoopInfo):
      (lin,) = info.index
      m_idx, n_idx = plgpu.planar_snake(
          lin, (m_iters, n_iters), 1 if cfg.grid_minor == "n" else 0, cfg.grid_tile_width)
      cta_m_slice = pl.ds(m_idx * cta_m, cta_m)
      cta_n_slice = pl.ds(n_idx * cta_n, cta_n)
      if cfg.wg_dim == "m":
        wg_m0, wg_n0 = wg * tile_m, 0
      else:
        wg_m0, wg_n0 = 0, wg * tile_n
      wg_m_slice = pl.ds(wg_m0, tile_m)
      wg_n_slice = pl.ds(wg_n0, tile_n)
      # This consumer's weight-scale block index along N (tile_n <= 128, 128-aligned).
      n_blk = (n_idx * cta_n + wg_n0) // BK

      # The "tmp" path works on 64-row strips of the consumer's slice (m_sub of them, one after
      # the other): each strip's temporary accumulator is 64 x tile_n f32.
      strip = SUB_M if cfg.promote == "tmp" else tile_m
      m_sub = tile_m // strip

      def store(accs):
        """This consumer's (tile_m, tile_n) result -> SMEM -> TMA to the output."""
        # The previous tile's TMA store out of this slot must have read it before we overwrite.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for h, acc in enumerate(accs):
          out_smem[wg, pl.ds(h * strip, strip)] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            out_smem.at[wg], out_gmem.at[cta_m_slice, cta_n_slice].at[wg_m_slice, wg_n_slice])

      def compute_context(eval_pipeline):
        zeros = plgpu.layout_cast(jnp.zeros((strip, tile_n), jnp.float32), plgpu.Layout.WGMMA)
        if cfg.promote == "rescale":
          ones = plgpu.layout_cast(jnp.ones((tile_m,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
          acc, c = eval_pipeline((zeros, ones))
          store((acc * bcast(c, strip),))
        else:
          store(eval_pipeline((zeros,) * m_sub))

      def row_scale(as_smem, bs_smem, j, h):
        rows = pl.ds(wg_m0 + h * strip, strip)
        sa = plgpu.load(as_smem.at[j, rows], layout=plgpu.Layout.WGMMA.reduce(1))
        return sa * bs_smem[j, n_blk]

      def operands(a_smem, b_smem, j, h):
        ks = pl.ds(j * BK, BK)
        return (a_smem.at[pl.ds(wg_m0 + h * strip, strip), ks],
                b_smem.at[wg_n_slice, ks].transpose((1, 0)))

      def bcast(v, rows):
        return lax.broadcast_in_dim(v, (rows, tile_n), [0])

      def mma_body(_, a_smem, as_smem, b_smem, bs_smem, carry):
        if cfg.promote == "rescale":
          acc, c = carry
          s = row_scale(as_smem, bs_smem, 0, 0)
          acc = acc * bcast(c / s, tile_m)

          def mma_into(acc_ref):
            acc_ref[...] = acc
            plgpu.wgmma(acc_ref, *operands(a_smem, b_smem, 0, 0))
            return acc_ref[...]

          return pl.run_scoped(mma_into, plgpu.ACC((tile_m, tile_n), jnp.float32)), s

        new = []
        for h in range(m_sub):
          scales = [row_scale(as_smem, bs_smem, j, h) for j in range(cfg.k_sub)]

          def mma(*tmp_refs, h=h, scales=scales):
            for j, ref in enumerate(tmp_refs):
              plgpu.wgmma(ref, *operands(a_smem, b_smem, j, h))
            acc = carry[h]
            for j, ref in enumerate(tmp_refs):
              tmp = plgpu.wgmma_accumulator_load(ref, wait_n=cfg.k_sub - 1 - j)
              acc = acc + tmp * bcast(scales[j], strip)
            return acc

          new.append(pl.run_scoped(mma, *[plgpu.ACC((strip, tile_n), jnp.float32)] * cfg.k_sub))
        return tuple(new)

      def run_pipeline(b_ref, bs_ref):
        get_pipeline(mma_body, compute_context)(
            a_gmem.at[cta_m_slice, :], as_gmem.at[:, cta_m_slice],
            b_ref.at[cta_n_slice, :], bs_ref,
            allocations=allocs)

      if not grouped:
        run_pipeline(b_gmem, bs_gmem)
      else:
        group = tile_group_gmem[m_idx]

        @pl.when(group >= 0)
        def _run():
          run_pipeline(b_gmem.at[group], bs_gmem.at[group])

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _call(operands, *, out_rows: int, m_iters: int, n: int, k: int, cfg: Config, out_dtype,
          num_groups: int | None, interpret: bool):
  kw = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
  f = plgpu.kernel(
      functools.partial(_kernel, cfg=cfg, m_iters=m_iters, n=n, k=k, num_groups=num_groups),
      out_type=jax.ShapeDtypeStruct((out_rows, n), out_dtype),
      grid=(2 if interpret else _num_sms(),),
      grid_names=("sm",),
      num_threads=3,
      thread_name="wg",
      kernel_name="fp8_block_matmul_mgpu" + ("_grouped" if num_groups is not None else ""),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Lane if cfg.lane
          else plgpu.LoweringSemantics.Warpgroup),
      **kw,
  )
  return f(*operands)


def _pad_rows(xq: jax.Array, xs: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
  """Append `rows` rows of zeros (scale 1) to the quantized activations; returns xq, xs^T."""
  if rows:
    xq = jnp.pad(xq, ((0, rows), (0, 0)))
    xs = jnp.pad(xs, ((0, rows), (0, 0)), constant_values=1.0)
  return xq, xs.T


def _scales_t(scale_inv: jax.Array, n: int) -> jax.Array:
  """w_scale_inv [..., N/128, K/128] -> [..., K/128, NBP] (K-block major, rows padded with 1)."""
  st = jnp.swapaxes(scale_inv, -1, -2)
  pad = [(0, 0)] * (st.ndim - 1) + [(0, _scale_row_width(n) - st.shape[-1])]
  return jnp.pad(st, pad, constant_values=1.0)


def _check_config(m: int, n: int, k: int, cfg: Config) -> None:
  if not supported(m, n, k, cfg):
    raise ShapeError(f"Mosaic FP8 block GEMM needs K % {BK * cfg.k_sub} == 0, "
                     f"N % {cfg.cta_n} == 0 and N <= {MAX_SCALE_ROW * BK}; got M={m}, N={n}, K={k}")


def quantized_matmul(xq: jax.Array, xs: jax.Array, weight: jax.Array, scale_inv: jax.Array, *,
                     out_dtype=jnp.bfloat16, config: Config | None = None,
                     interpret: bool = False) -> jax.Array:
  """Already-quantized x (e4m3 [M, K], f32 scales [M, K/128]) @ W^T -> [M, N] out_dtype."""
  m, k = xq.shape
  check_shapes(k, weight, scale_inv)
  if xq.dtype != jnp.float8_e4m3fn or xs.shape != (m, k // BK) or xs.dtype != jnp.float32:
    raise ShapeError(f"quantized x must be e4m3 [M, K] with f32 scales [M, K/128], got "
                     f"{xq.dtype}{list(xq.shape)}, {xs.dtype}{list(xs.shape)}")
  n = weight.shape[0]
  cfg = config or default_config(m, n, k)
  _check_config(m, n, k, cfg)
  m_pad = -(-m // cfg.cta_m) * cfg.cta_m
  xq, xs_t = _pad_rows(xq, xs, m_pad - m)
  out = _call((xq, xs_t, weight, _scales_t(scale_inv, n)), out_rows=m_pad,
              m_iters=m_pad // cfg.cta_m, n=n, k=k, cfg=cfg, out_dtype=out_dtype,
              num_groups=None, interpret=interpret)
  return out[:m] if m_pad != m else out


def group_padded_layout(group_sizes: jax.Array, num_rows: int, cta_m: int):
  """Rows sorted by group -> a layout where every group starts on a cta_m-row tile boundary.

  Returns (src [R], valid [R], tile_group [R / cta_m], dst [num_rows], row_ok [num_rows]) with the
  static bound R = (cdiv(num_rows, cta_m) + E) * cta_m: padded row p holds row src[p] when
  valid[p]; tile i belongs to expert tile_group[i] (-1: unused); row r lives at padded row
  dst[r], and row_ok[r] is False for rows past sum(group_sizes) (their output is zero).
  """
  e = group_sizes.shape[0]
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), num_rows)
  starts = jnp.minimum(jnp.cumsum(sizes) - sizes, num_rows)
  sizes = ends - starts                                     # clipped to the rows that exist
  tiles = (sizes + cta_m - 1) // cta_m
  tile_end = jnp.cumsum(tiles)
  pstart = (tile_end - tiles) * cta_m                       # padded start row of each group
  num_tiles = -(-num_rows // cta_m) + e
  tile = jnp.arange(num_tiles, dtype=jnp.int32)
  g_of_tile = jnp.searchsorted(tile_end, tile, side="right").astype(jnp.int32)
  tile_group = jnp.where(g_of_tile < e, g_of_tile, -1)
  p = jnp.arange(num_tiles * cta_m, dtype=jnp.int32)
  gp = jnp.minimum(g_of_tile[p // cta_m], e - 1)
  j = p - pstart[gp]
  valid = (tile_group[p // cta_m] >= 0) & (j < sizes[gp])
  src = jnp.where(valid, starts[gp] + j, 0)
  r = jnp.arange(num_rows, dtype=jnp.int32)
  gr = jnp.minimum(jnp.searchsorted(ends, r, side="right").astype(jnp.int32), e - 1)
  row_ok = r < ends[-1]
  dst = jnp.where(row_ok, pstart[gr] + r - starts[gr], 0)
  return src, valid, tile_group, dst, row_ok


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def grouped_fp8_block_matmul(x: jax.Array, weight: jax.Array, scale_inv: jax.Array,
                             group_sizes: jax.Array, *, config: Config | None = None,
                             interpret: bool = False) -> jax.Array:
  """ragged_dot(x [T, K], FP8 W [E, N, K] / scale_inv [E, N/128, K/128], group_sizes [E]) -> [T, N].

  Rows of x are sorted by group; rows past sum(group_sizes) come out as zeros. The quantized
  rows are gathered into a group-padded layout (group_padded_layout), the dense kernel runs over
  its tiles with each tile's expert weight, and the output rows are gathered back: two extra
  passes (over x in fp8 and over y), and a group of s rows costs cdiv(s, cta_m) full tiles of MMA.
  """
  check_shapes(x.shape[-1], weight, scale_inv, grouped=True)
  e, n, k = weight.shape
  grouped_matmul.check_grouped_inputs(x, group_sizes, e)
  t = x.shape[0]
  cfg = config or default_config(max(1, t // max(e, 1)), n, k)
  _check_config(max(t, 1), n, k, cfg)
  src, valid, tile_group, dst, row_ok = group_padded_layout(group_sizes, t, cfg.cta_m)
  xq, xs = fp8_block.quantize_activations(x)
  xq = jnp.where(valid[:, None], xq[src], jnp.zeros((), xq.dtype))
  xs = jnp.where(valid[:, None], xs[src], 1.0)
  out = _call((tile_group, xq, xs.T, weight, _scales_t(scale_inv, n)), out_rows=src.shape[0],
              m_iters=tile_group.shape[0], n=n, k=k, cfg=cfg, out_dtype=x.dtype, num_groups=e,
              interpret=interpret)
  return jnp.where(row_ok[:, None], out[dst], jnp.zeros((), x.dtype))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def fp8_block_matmul(x: jax.Array, weight: jax.Array, scale_inv: jax.Array, *,
                     config: Config | None = None, interpret: bool = False) -> jax.Array:
  """x [M, K] (bf16/f32) @ FP8 W [N, K]^T -> [M, N] in x's dtype; x quantized 1x128 on the fly."""
  if x.ndim != 2:
    raise ShapeError(f"x must be [M, K], got {x.shape}")
  check_shapes(x.shape[1], weight, scale_inv)
  xq, xs = fp8_block.quantize_activations(x)
  return quantized_matmul(xq, xs, weight, scale_inv, out_dtype=x.dtype, config=config,
                          interpret=interpret)

