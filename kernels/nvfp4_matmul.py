"""NVFP4 GEMMs in Pallas (Triton lowering): W4A16, W4A4 (emulated on Hopper), activation quantizer.

Computes y[M, N] = x[M, K] @ dequant(W)^T with W in ModelOpt layout (see kernels/quant/nvfp4.py):
packed uint8 [N, K/2] (K contiguous), block scales e4m3 [N, K/16], f32 global scale.

Kernel (W4A16). Grid (cdiv(M, bm), N / bn, split_k). Each program streams its [bn, bk/2] byte tile
and [bn, bk/16] scale tile over its K range, dequantizes in registers and feeds the MMA
(wgmma / mma.sync on Hopper via Triton) with an f32 accumulator. Dequantization routes
(``Tiling.dequant``, details at DEQUANT_MODES below); every route is exact, so the only rounding
is the MMA's (and, on the f16 routes, x's cast to f16):
  * "f32" (bf16 MMA): the 3 magnitude bits shifted into an f16's exponent/mantissa give
    value * 2^-14 exactly (subnormals included), -> f32, times the f32 block scale, -> bf16.
    ~10 ALU/convert instructions per element: this route plateaued at ~1 TB/s of NVFP4 bytes.
  * "e4m3" / "asm" (f16 MMA): the nibble placed as an E4M3 byte is value * 2^-6; Hopper converts
    two E4M3 to two f16 per instruction and the block scale multiplies two f16 per instruction.
    "asm" is that in inline PTX on 32-bit words (8 nibbles per ~17 instructions).
  * "f16" / "asm_f16" (f16 MMA): f16 bits assembled directly (value * 2^-14), no convert at all.
  * f16 routes cast x to f16: |x| must stay <= 65504 unless ``Tiling.x_scale`` pre-scales each
    row by a power of two (exact; one XLA reduction over x per call).
  * ``Tiling.w_as_a`` computes y^T = W x^T so the dequantized tile is the MMA's A operand, which
    wgmma can read from registers (B must come from shared memory); ``load_3d`` loads the bytes
    as [bn, bk/16, 8] so each block scale broadcasts along its own axis.
  * Low/high nibbles are joined (tt.join) and reshaped to the natural K order, as jax's own int4
    loads do, or (``x_even_odd``) dotted with x's even / odd columns.
  * The global scale multiplies the f32 accumulator once at the end.
  * Split-K (decode, few N tiles): partial f32 sums [split, M, N] reduced by XLA.
Rows past M are masked on load and store (fp8/e4m3 loads without a fill value: masked lanes only
reach output rows/columns that are never stored); N tiles past N are masked; K must be a multiple of 16 and
bk is the largest power of two <= the requested bk that divides K.

Target roofline (H100, 3.0 TB/s measured read, ~670-800 TFLOP/s bf16):
  decode (M <= 64): bytes = N*K/2 + N*K/16 (+ x, y) -> (4096 x 14336): 33 MB -> ~11 us at 3 TB/s,
    i.e. ~3.5x under the bf16 weight read (117 MB).
  prefill (M = 8192, K = N = 8192): 1.1 PFLOP -> ~1.4-1.6 ms at the bf16 MMA rate; the dequant ALU
    work is amortized over bm rows.

Kernel layout (``w4a16_matmul_kl``, the decode path for weights repacked once by
kernels/quant/nvfp4.to_kernel_layout; K % 256 == 0). Within each 256-wide K tile, byte j holds
element j in its low nibble and element 128 + j in its high nibble, so one [bn, 128] byte tile
dequantizes elementwise into two K-contiguous [bn, 128] halves, each dotted with a contiguous x
slice [bm, 128]: no interleave (join + reshape), no x shuffle, and Triton keeps the whole
dequant chain (cp.async'd bytes -> registers -> PTX E4M3 trick -> f16) in the MMA operand's own
register layout. Scales stay ModelOpt's [N, K/16]. SASS of the loop (Triton 3.9 for sm_90, the
same TTIR): ~3.0-3.5 instructions per weight element for bn = 128-256 with x in f16 (~1.9 of
them the dequant itself: 7 and/shift/or per 8 nibbles, 4 cvt.rn.f16x2.e4m3x2, 4 mul.f16x2),
against ~5.9 for the previous PTX route and ~9.7 for the f32 route; decode is issue-bound at
~1 TB/s on the old routes (benchmarks/gemm.md), so instruction count is the lever.

W4A4 on Hopper: both operands dequantized to bf16 in registers (exact), bf16 MMA, both global
scales applied to the accumulator. On Blackwell (compute capability >= 10) ``w4a4_blackwell`` calls
jax.nn.scaled_matmul, which XLA lowers to the block-scaled tensor-core path; untested on hardware.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxinfer.errors import ShapeError
from kernels.quant import nvfp4

_F16_TO_E2M1_SCALE = 2.0 ** 14


@dataclasses.dataclass(frozen=True)
class Tiling:
  block_m: int = 16
  block_n: int = 64
  block_k: int = 256
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 3
  # Dot x's even / odd K columns (strided loads) with the low / high nibbles instead of
  # interleaving the dequantized weight (saves the in-register join + reshape).
  x_even_odd: bool = False
  # Weight dequantization (see DEQUANT_MODES): "f32" (bf16 MMA), "e4m3" / "asm" (f16 MMA).
  dequant: str = "f32"
  # Compute y^T = W x^T: the dequantized weight tile is the MMA's A operand (which Hopper's
  # wgmma may take from registers) and x^T the B operand (bm >= 16 columns).
  w_as_a: bool = False
  # Load the packed weight as [bn, bk/16, 8] (one row of 8 bytes per scale group) so the block
  # scale broadcasts along a new axis instead of through a [bn, bk/16, 8] -> [bn, bk/2] reshape.
  load_3d: bool = False
  # f16 routes: scale each row of x by a power of two 2^-e (max |x| of the row -> [2^14, 2^15))
  # before the f16 cast and the output row by 2^e: exact, and removes the f16 range limit (costs
  # one XLA reduction over x per call).
  x_scale: bool = False


def k_block(k: int, block_k: int) -> tuple[int, bool]:
  """(bk, masked): the largest power of two <= block_k dividing K, never below 32 (Triton's dot
  needs K-tiles of >= 16 per half); when none divides, bk = 32 and the K tail is masked."""
  bk = _pow2_divisor(k, max(block_k, 32), at_least=32)
  return (bk, False) if k % bk == 0 else (32, True)


def _pow2_divisor(n: int, at_most: int, at_least: int = 16) -> int:
  """Largest power of two in [at_least, at_most] dividing n (at_least when none does)."""
  b = at_most
  while b > at_least and n % b:
    b //= 2
  return b


# Dequantization route, even/odd x split and x prescale of the decode tilings (m <= 64; see
# DEQUANT_MODES and Tiling). The PTX "asm" route with the even/odd split was float64-correct on
# the H100 at bm = 16 and 64 in both windows of the third session and 1.23x faster than the "f32"
# route in the same run (benchmarks/gemm.md); the PTX routes need the even/odd split
# (check_asm_layout). Larger M keeps the bf16-MMA "f32" route.
DECODE_DEQUANT = "asm"
DECODE_EVEN_ODD = True
DECODE_X_SCALE = False


def default_tiling(m: int, n: int, k: int, num_sms: int = 132) -> Tiling:
  """Decode (m <= 64): the shape heuristic below with DECODE_DEQUANT / DECODE_EVEN_ODD /
  DECODE_X_SCALE."""
  t = _decode_shape_tiling(m, n, k, num_sms)
  if m > 64:
    return t
  return dataclasses.replace(t, dequant=DECODE_DEQUANT, x_scale=DECODE_X_SCALE,
                             x_even_odd=t.x_even_odd or DECODE_EVEN_ODD)


def _decode_shape_tiling(m: int, n: int, k: int, num_sms: int) -> Tiling:
  """Chosen from the H100 sweep (benchmarks/gemm.md).

  Small M: wide-N matrices (>= 2 waves of 64-column tiles) stream bn=64, bk=256 without split-K
  up to M=32; narrow N splits K until the grid covers the SMs twice; M in (32, 64] (and M > 16 on
  narrow N) uses bn=128, bk=128 with the even/odd x split. Large M: 128x128x64 (but see
  kernels/gemm.PREFILL_DEQUANT_M: XLA's dot on a dequantized weight was faster there).
  """
  if m > 64:
    return Tiling(128, 128, 64, 1, 8, 3)
  bm = 16 if m <= 16 else (32 if m <= 32 else 64)
  wide = -(-n // 64) >= num_sms
  if wide and m <= 32:
    return Tiling(bm, 64, k_block(k, 256)[0], 1, 4, 4)
  bn, bk_req, even_odd = (32, 256, False) if m <= 16 else (128, 128, True)
  bk = k_block(k, bk_req)[0]
  tiles = -(-m // bm) * -(-n // bn)
  split = 1
  while tiles * split < 2 * num_sms and (k // bk) % (split * 2) == 0 and k // bk >= split * 4:
    split *= 2
  return Tiling(bm, bn, bk, split, 4, 4, x_even_odd=even_odd)


# Weight dequantization routes (Tiling.dequant):
#   "f32":  nibble -> f16 bits (value * 2^-14) -> f32, times the f32 block scale -> bf16; bf16 MMA
#           (the original route: ~10 ALU/convert instructions per element).
#   "e4m3": nibble -> E4M3 byte (value * 2^-6, exact incl. subnormals: the E2M1 bits s e1 e0 m
#           placed as s<<7 | (e1 e0 m)<<2) -> f16 (Hopper's packed cvt.rn.f16x2.e4m3x2), times the
#           E4M3 block scale in f16 (exact: <= 6 significant bits, magnitudes in [2^-16, 42]);
#           f16 MMA with x cast to f16, global scale * 2^6 on the accumulator. Plain jnp.
#   "asm":  the "e4m3" function as one PTX block on packed 32-bit words (8 nibbles: and/shift/or
#           on 4 bytes at once, 4 cvt.rn.f16x2.e4m3x2, 4 mul.f16x2), via elementwise_inline_asm.
#   "f16":  nibble -> f16 bits s<<15 | (e1 e0 m)<<9 (value * 2^-14, exact incl. subnormals),
#           times the E4M3 block scale in f16: exact too (products are multiples of 2^-24, the
#           smallest f16 subnormal, and below 0.17); f16 MMA, global scale * 2^14. Plain jnp.
#   "asm_f16": the "f16" function in PTX without any convert instruction: prmt spreads two bytes
#           into the two 16-bit lanes of a word, and/shift/or build two f16 per instruction.
# Interpret mode runs each PTX route's jnp twin, which computes the identical values.
# The f16 routes need |x| <= 65504 (F16_MAX; larger activations become inf) and lose precision
# for |x| < 2^-14 (f16 subnormals); the kernels do not check x (that would cost a pass over it).
DEQUANT_MODES = ("f32", "e4m3", "asm", "f16", "asm_f16")
_JNP_TWIN = {"asm": "e4m3", "asm_f16": "f16"}
_GLOBAL_FACTOR = {"f32": 1.0, "e4m3": 2.0 ** 6, "asm": 2.0 ** 6, "f16": 2.0 ** 14,
                  "asm_f16": 2.0 ** 14}
F16_MAX = 65504.0

# One inline-PTX block per half (jax's Pallas Triton lowering of elementwise_inline_asm takes a
# single result): $0, $1: the 4 f16 of that half (2 x f16x2); $2: 4 packed bytes; $3, $4: their
# 4 f16 block scales. Inputs are copied first so no output register can clobber a pending input.
# Per 4 bytes (8 nibbles) the two blocks take ~9 and/shift/or (+2 prmt for "asm_f16"),
# 4 cvt.rn.f16x2.e4m3x2 ("asm" only) and 4 mul.f16x2.
def _asm_block(mode: str, half: str) -> str:
  head = ("{\n.reg .b32 w, s0, s1, t, u, v, a0, a1;\n.reg .b16 l0, l1;\n"
          "mov.b32 w, $2;\nmov.b32 s0, $3;\nmov.b32 s1, $4;\n")
  tail = "mul.rn.f16x2 $0, a0, s0;\nmul.rn.f16x2 $1, a1, s1;\n}"
  if mode == "asm":   # bytes -> E4M3 bit patterns (4 per word) -> 2 x cvt.rn.f16x2.e4m3x2
    bits = ("and.b32 u, w, 0x07070707;\nshl.b32 u, u, 2;\n"
            "and.b32 t, w, 0x08080808;\nshl.b32 t, t, 4;\n" if half == "lo" else
            "shr.b32 u, w, 2;\nand.b32 u, u, 0x1C1C1C1C;\nand.b32 t, w, 0x80808080;\n")
    return (head + bits + "or.b32 u, u, t;\nmov.b32 {l0, l1}, u;\n"
            "cvt.rn.f16x2.e4m3x2 a0, l0;\ncvt.rn.f16x2.e4m3x2 a1, l1;\n" + tail)
  # "asm_f16": prmt puts bytes (0, 1) / (2, 3) into the low bytes of the two 16-bit lanes; per
  # lane: low nibble -> ((v & 7) << 9) | ((v & 8) << 12), high -> ((v & 0x70) << 5) | ((v & 0x80) << 8)
  m1, s1, m2, s2 = (("0x00070007", 9, "0x00080008", 12) if half == "lo" else
                    ("0x00700070", 5, "0x00800080", 8))
  body = "mov.b32 v, 0;\nprmt.b32 u, w, v, 0x4140;\nprmt.b32 v, w, v, 0x4342;\n" + "".join(
      f"and.b32 {d}, {src}, {m1};\nshl.b32 {d}, {d}, {s1};\n"
      f"and.b32 t, {src}, {m2};\nshl.b32 t, t, {s2};\nor.b32 {d}, {d}, t;\n"
      for d, src in [("a0", "u"), ("a1", "v")])
  return head + body + tail


_ASM = {mode: {half: _asm_block(mode, half) for half in ("lo", "hi")}
        for mode in ("asm", "asm_f16")}


def e2m1_to_e4m3_bytes(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """uint8 (two E2M1 codes) -> (low-nibble, high-nibble) uint8 E4M3 bit patterns whose values are
  exactly the E2M1 values * 2^-6."""
  b = packed.astype(jnp.uint8)
  lo = ((b & 0x07) << 2) | ((b & 0x08) << 4)
  hi = ((b >> 2) & 0x1C) | (b & 0x80)
  return lo, hi


def _e4m3_bits_to_f16(bits: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn).astype(jnp.float16)


def _e2m1_f16_bits(nibble_bits_u16: jax.Array) -> jax.Array:
  """uint16 holding an E2M1 code in bits 0..3 -> f16 bit pattern of value * 2^-14."""
  return ((nibble_bits_u16 & 0x8) << 12) | ((nibble_bits_u16 & 0x7) << 9)


def dequant_halves_f16(packed: jax.Array, scale: jax.Array, groups_ok: jax.Array | None = None,
                       *, mode: str = "e4m3") -> tuple[jax.Array, jax.Array]:
  """[rows, bk/2] uint8, [rows, bk/16] e4m3 -> (even-k, odd-k) f16 halves equal to
  value * scale / global_factor(mode), exactly (no rounding), for the f16 modes."""
  rows, groups = scale.shape
  s = scale.astype(jnp.float16)
  if groups_ok is not None:
    s = jnp.where(groups_ok[None, :], s, jnp.zeros_like(s))
  s = jnp.broadcast_to(s.reshape(rows, groups, 1), (rows, groups, 8))
  if packed.ndim == 2:    # else packed is [rows, groups, 8] (Tiling.load_3d)
    s = s.reshape(rows, groups * 8)
  if mode in _ASM:
    out = jax.ShapeDtypeStruct(packed.shape, jnp.float16)
    lo, hi = (plgpu.elementwise_inline_asm(
        _ASM[mode][half], args=[packed, s], constraints="=r,=r,r,r,r", pack=4,
        result_shape_dtypes=[out])[0] for half in ("lo", "hi"))
  elif mode == "e4m3":
    lo, hi = e2m1_to_e4m3_bytes(packed)
    lo, hi = _e4m3_bits_to_f16(lo) * s, _e4m3_bits_to_f16(hi) * s
  elif mode == "f16":
    b = packed.astype(jnp.uint16)
    lo = jax.lax.bitcast_convert_type(_e2m1_f16_bits(b), jnp.float16) * s
    hi = jax.lax.bitcast_convert_type(_e2m1_f16_bits(b >> 4), jnp.float16) * s
  else:
    raise ValueError(f"not an f16 dequant mode: {mode!r}")
  return lo.reshape(rows, groups * 8), hi.reshape(rows, groups * 8)


def _e2m1_f16_bits_to_f32(bits_u16: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(bits_u16, jnp.float16).astype(jnp.float32)


def dequant_halves(packed: jax.Array, scale: jax.Array, groups_ok: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """[rows, bk/2] uint8, [rows, bk/16] e4m3 -> (even-k, odd-k) bf16 halves [rows, bk/2] each.

  The global scale is not applied. ``groups_ok`` [bk/16] zeroes scale groups past K (their
  masked loads are undefined).
  """
  b = packed.astype(jnp.uint16)
  lo = _e2m1_f16_bits_to_f32(_e2m1_f16_bits(b))
  hi = _e2m1_f16_bits_to_f32(((b & 0x80) << 8) | ((b & 0x70) << 5))
  rows, groups = scale.shape
  s = scale.astype(jnp.float32) * _F16_TO_E2M1_SCALE
  if groups_ok is not None:
    s = jnp.where(groups_ok[None, :], s, 0.0)
  s = jnp.broadcast_to(s.reshape(rows, groups, 1), (rows, groups, 8)).reshape(rows, groups * 8)
  return (lo * s).astype(jnp.bfloat16), (hi * s).astype(jnp.bfloat16)


def even_odd_columns(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[rows, bk] -> (x[:, 0::2], x[:, 1::2]) via an in-register split (strided loads do not
  interpret)."""
  rows, cols = x.shape
  lo, hi = jnp.split(x.reshape(rows, cols // 2, 2), 2, axis=2)
  return lo.reshape(rows, cols // 2), hi.reshape(rows, cols // 2)


def dequant_tile(packed: jax.Array, scale: jax.Array, groups_ok: jax.Array | None = None
                 ) -> jax.Array:
  """[rows, bk/2] uint8 and [rows, bk/16] e4m3 -> [rows, bk] bf16 in K order (no global scale)."""
  return interleave(*dequant_halves(packed, scale, groups_ok))


def interleave(lo: jax.Array, hi: jax.Array) -> jax.Array:
  """(even-k, odd-k) halves [rows, bk/2] -> [rows, bk] in K order."""
  rows, half = lo.shape
  return jnp.stack([lo, hi], axis=-1).reshape(rows, half * 2)


def mode_for(dequant: str, interpret: bool) -> str:
  """The dequant mode that runs: a PTX route falls back to its identical jnp twin when
  interpreting (inline PTX cannot run on the CPU)."""
  if dequant not in DEQUANT_MODES:
    raise ValueError(f"dequant must be one of {DEQUANT_MODES}, got {dequant!r}")
  return _JNP_TWIN.get(dequant, dequant) if interpret else dequant


def weight_halves(wq: jax.Array, ws: jax.Array, groups_ok: jax.Array | None, mode: str
                  ) -> tuple[jax.Array, jax.Array]:
  """Dequantized (even-k, odd-k) weight halves in the MMA dtype of ``mode`` (bf16 for "f32",
  f16 * 2^-6 otherwise; see global_factor)."""
  if mode == "f32":
    return dequant_halves(wq.reshape(wq.shape[0], -1), ws, groups_ok)
  return dequant_halves_f16(wq, ws, groups_ok, mode=mode)


def check_asm_layout(mode: str, x_even_odd: bool) -> None:
  """The PTX routes gave wrong results on the H100 (relative error ~1, run 5 of
  benchmarks/gemm.md) when their halves were interleaved (x_even_odd=False); with the even/odd
  split they matched the reference. Refuse the unverified combination."""
  if mode in _ASM and not x_even_odd:
    raise NotImplementedError(f"dequant={mode!r} needs x_even_odd=True (the interleaved form "
                              "was measured wrong on the GPU)")


def mma_dtype(mode: str):
  return jnp.bfloat16 if mode == "f32" else jnp.float16


def global_factor(mode: str) -> float:
  """What the accumulator must be multiplied by (besides the global scale) for ``mode``."""
  return _GLOBAL_FACTOR[mode]


def row_scales(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(2^-e, 2^e), each f32 [M]: per row of x, e such that max|x_row| * 2^-e lies in
  [2^14, 2^15); e is clipped to [-100, 113] (2^113 covers bf16's largest finite values; rows
  below 2^-86 just keep fewer bits; rows of zeros get 2^100 / 2^-100, harmless)."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1)
  biased = (jax.lax.bitcast_convert_type(amax, jnp.uint32) >> 23).astype(jnp.int32)
  e = jnp.clip(biased - (127 + 14), -100, 113)
  return jnp.ldexp(jnp.float32(1), -e), jnp.ldexp(jnp.float32(1), e)


def tile_dot(acc: jax.Array, x: jax.Array, wq: jax.Array, ws: jax.Array,
             groups_ok: jax.Array | None, mode: str, x_even_odd: bool, w_as_a: bool,
             x_inv: jax.Array | None = None) -> jax.Array:
  """acc += x [bm, bk] @ dequant(W tile [bn, bk])^T ([bm, bn]; [bn, bm] when ``w_as_a``).

  ``x_inv`` [bm] (Tiling.x_scale): per-row power-of-two factors applied to x before its cast."""
  if x_inv is not None:
    x = x.astype(jnp.float32) * x_inv[:, None]
  x = x.astype(mma_dtype(mode))
  w_lo, w_hi = weight_halves(wq, ws, groups_ok, mode)

  def mm(xt, wt):
    return plgpu.dot(wt, xt, trans_b=True) if w_as_a else plgpu.dot(xt, wt, trans_b=True)

  if x_even_odd:
    x_lo, x_hi = even_odd_columns(x)
    return (acc + mm(x_lo, w_lo)) + mm(x_hi, w_hi)
  return acc + mm(x, interleave(w_lo, w_hi))


def _matmul_kernel(*refs, m, n, k, bm, bn, bk, k_steps, act_fp4, split, mask_k, x_even_odd,
                   mode, w_as_a, load_3d, x_scale):
  xinv_ref = xmul_ref = None
  if act_fp4:
    xq_ref, xs_ref, xgs_ref, wq_ref, ws_ref, wgs_ref, o_ref = refs
  elif x_scale:
    x_ref, xinv_ref, xmul_ref, wq_ref, ws_ref, wgs_ref, o_ref = refs
  else:
    x_ref, wq_ref, ws_ref, wgs_ref, o_ref = refs
  pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  m0, n0 = pid_m * bm, pid_n * bn
  row_ok = (m0 + jnp.arange(bm)) < m
  col_ok = (n0 + jnp.arange(bn)) < n
  k_base = pid_s * (k_steps * bk)
  x_inv = x_mul = None
  if xinv_ref is not None:
    x_inv = plgpu.load(xinv_ref.at[pl.ds(m0, bm)], mask=row_ok, other=1.0)
    x_mul = plgpu.load(xmul_ref.at[pl.ds(m0, bm)], mask=row_ok, other=1.0)

  def body(i, acc):
    k0 = pl.multiple_of(k_base + i * bk, bk)
    kp, ks = pl.multiple_of(k0 // 2, bk // 2), k0 // 16
    if mask_k:
      kp_ok = (kp + jnp.arange(bk // 2)) < k // 2
      ks_ok = (ks + jnp.arange(bk // 16)) < k // 16
      kx_ok = (k0 + jnp.arange(bk)) < k
    else:
      kp_ok = ks_ok = kx_ok = None

    def both(a, b):
      return a[:, None] if b is None else a[:, None] & b[None, :]

    if load_3d:   # wq_ref is [N, K/16, 8]
      wq_idx = (pl.ds(n0, bn), pl.ds(ks, bk // 16), slice(None))
      wq_mask = (None if not (n % bn or mask_k) else
                 jnp.broadcast_to(both(col_ok, ks_ok)[:, :, None], (bn, bk // 16, 8)))
    else:
      wq_idx = (pl.ds(n0, bn), pl.ds(kp, bk // 2))
      wq_mask = both(col_ok, kp_ok) if (n % bn or mask_k) else None
    if n % bn or mask_k:
      wq = plgpu.load(wq_ref.at[wq_idx], mask=wq_mask, other=0)
      ws = plgpu.load(ws_ref.at[pl.ds(n0, bn), pl.ds(ks, bk // 16)], mask=both(col_ok, ks_ok))
    else:
      wq = wq_ref[wq_idx]
      ws = ws_ref[pl.ds(n0, bn), pl.ds(ks, bk // 16)]
    if act_fp4:
      xq = plgpu.load(xq_ref.at[pl.ds(m0, bm), pl.ds(kp, bk // 2)], mask=both(row_ok, kp_ok),
                      other=0)
      xs = plgpu.load(xs_ref.at[pl.ds(m0, bm), pl.ds(ks, bk // 16)], mask=both(row_ok, ks_ok))
      x_lo, x_hi = dequant_halves(xq, xs, ks_ok)
      w_lo, w_hi = dequant_halves(wq, ws, ks_ok)
      return (acc + plgpu.dot(x_lo, w_lo, trans_b=True)) + plgpu.dot(x_hi, w_hi, trans_b=True)
    x = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], mask=both(row_ok, kx_ok), other=0)
    return tile_dot(acc, x, wq, ws, ks_ok, mode, x_even_odd, w_as_a, x_inv)

  acc_shape = (bn, bm) if w_as_a else (bm, bn)
  acc = jax.lax.fori_loop(0, k_steps, body, jnp.zeros(acc_shape, jnp.float32))
  scale = wgs_ref[0] * xgs_ref[0] if act_fp4 else wgs_ref[0] * global_factor(mode)
  acc = acc * scale
  if x_mul is not None:
    acc = acc * (x_mul[None, :] if w_as_a else x_mul[:, None])
  if w_as_a:
    acc = acc.T
  mask = row_ok[:, None] & col_ok[None, :]
  if split > 1:
    plgpu.store(o_ref.at[pid_s, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=mask)
  else:
    plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=mask)


def _check_weight(packed, scale, global_scale, k: int) -> None:
  nvfp4.check_layout(packed, scale)
  if packed.ndim != 2:
    raise ShapeError(f"NVFP4 weight must be [N, K/2], got {packed.shape}")
  if packed.shape[1] * 2 != k:
    raise ShapeError(f"x has K={k} but the NVFP4 weight has K={packed.shape[1] * 2}")
  if jnp.size(global_scale) != 1:
    raise ShapeError(f"NVFP4 global scale must be a scalar, got shape {jnp.shape(global_scale)}")


def _call(operands, m, n, k, out_dtype, tiling: Tiling, act_fp4: bool, interpret: bool):
  t = tiling
  bk, mask_k = k_block(k, t.block_k)
  steps = -(-k // bk)
  split = t.split_k if steps % t.split_k == 0 and not mask_k else 1
  grid = (pl.cdiv(m, t.block_m), pl.cdiv(n, t.block_n), split)
  out_shape = (jax.ShapeDtypeStruct((split, m, n), jnp.float32) if split > 1
               else jax.ShapeDtypeStruct((m, n), out_dtype))
  mode = "f32" if act_fp4 else mode_for(t.dequant, interpret)
  check_asm_layout(mode, t.x_even_odd)
  load_3d = t.load_3d and not act_fp4
  if load_3d:
    operands = (operands[0], operands[1].reshape(n, k // 16, 8), *operands[2:])
  x_scale = t.x_scale and mode != "f32"
  if x_scale:
    operands = (operands[0], *row_scales(operands[0]), *operands[1:])
  kernel = functools.partial(_matmul_kernel, m=m, n=n, k=k, bm=t.block_m, bn=t.block_n, bk=bk,
                             k_steps=steps // split, act_fp4=act_fp4, split=split, mask_k=mask_k,
                             x_even_odd=t.x_even_odd, mode=mode, w_as_a=t.w_as_a and not act_fp4,
                             load_3d=load_3d, x_scale=x_scale)
  out = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      name="nvfp4_w4a4" if act_fp4 else "nvfp4_w4a16",
  )(*operands)
  return out.sum(0).astype(out_dtype) if split > 1 else out


@functools.partial(jax.jit, static_argnames=("tiling", "interpret"))
def w4a16_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array, global_scale: jax.Array,
                 *, tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
  """x [M, K] (bf16/f16/f32) @ NVFP4 W [N, K]^T -> [M, N] in x's dtype."""
  if x.ndim != 2:
    raise ShapeError(f"x must be [M, K], got {x.shape}")
  m, k = x.shape
  _check_weight(packed, scale, global_scale, k)
  n = packed.shape[0]
  tiling = tiling or default_tiling(m, n, k)
  gs = jnp.asarray(global_scale, jnp.float32).reshape(1)
  return _call((x, packed, scale, gs), m, n, k, x.dtype, tiling, False, interpret)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiling", "interpret"))
def w4a4_matmul(x_packed: jax.Array, x_scale: jax.Array, x_global_scale: jax.Array,
                packed: jax.Array, scale: jax.Array, global_scale: jax.Array, *,
                out_dtype=jnp.bfloat16, tiling: Tiling | None = None,
                interpret: bool = False) -> jax.Array:
  """NVFP4 x [M, K/2] (+ scales) @ NVFP4 W [N, K/2]^T -> [M, N]; Hopper emulation via bf16 MMA."""
  nvfp4.check_layout(x_packed, x_scale)
  if x_packed.ndim != 2:
    raise ShapeError(f"x must be [M, K/2], got {x_packed.shape}")
  m, k = x_packed.shape[0], x_packed.shape[1] * 2
  _check_weight(packed, scale, global_scale, k)
  n = packed.shape[0]
  tiling = tiling or default_tiling(m, n, k)
  xgs = jnp.asarray(x_global_scale, jnp.float32).reshape(1)
  gs = jnp.asarray(global_scale, jnp.float32).reshape(1)
  return _call((x_packed, x_scale, xgs, packed, scale, gs), m, n, k, out_dtype, tiling, True,
               interpret)


# ----- decode kernel on the kernel layout (kernels/quant/nvfp4.to_kernel_layout) -----
#
# Per program: rows [m0, m0 + bm) of x, weight rows [n0, n0 + bn), K tiles of 256 (one byte tile
# [bn, 128] per step, pipelined by Triton's cp.async). The low nibbles of the byte tile are K
# elements [256t, 256t + 128) and the high nibbles [256t + 128, 256t + 256): each half is
# dequantized elementwise from the same bytes and dotted with a contiguous x slice, so there is no
# interleave, no x shuffle and no reshape of the weight; the only broadcast is each block scale
# over its 16 elements. Triton hoists the whole elementwise dequant chain into the MMA operand's
# register layout (bytes go global -> shared (cp.async) -> registers, never back through shared
# memory as f16). Default: the dequantized half is the MMA's B operand (mma.sync at bm = 16/32;
# at bm = 64 a wgmma, which reads B from shared memory). ``w_as_a`` makes it the A operand
# (y^T = W x^T, a wgmma taking A from registers): fewer x conversions but more byte shuffling,
# slower in every H100 measurement (benchmarks/gemm.md).
KL_DEQUANT_MODES = ("asm", "asm2", "asm_bytes", "e4m3", "f32")
_KL_JNP_TWIN = {"asm": "e4m3", "asm2": "e4m3", "asm_bytes": "e4m3"}
_KL_GLOBAL_FACTOR = {"asm": 2.0 ** 6, "asm2": 2.0 ** 6, "asm_bytes": 2.0 ** 6, "e4m3": 2.0 ** 6,
                     "f32": 1.0}

# "asm_bytes": only the nibble -> E4M3-byte step in PTX, u8 in and u8 out (4 bytes per 32-bit
# word, one operand and one result of the same width, so no packing question can arise between
# operands of different widths); Triton's own fp8 -> f16 conversion and the f16 scale multiply
# follow.
_ASM_BYTES = {
    "lo": ("{\n.reg .b32 t, u;\nand.b32 u, $1, 0x07070707;\nshl.b32 u, u, 2;\n"
           "and.b32 t, $1, 0x08080808;\nshl.b32 t, t, 4;\nor.b32 $0, u, t;\n}"),
    "hi": ("{\n.reg .b32 t, u;\nshr.b32 u, $1, 2;\nand.b32 u, u, 0x1C1C1C1C;\n"
           "and.b32 t, $1, 0x80808080;\nor.b32 $0, u, t;\n}"),
}


@dataclasses.dataclass(frozen=True)
class KLTiling:
  block_m: int = 16
  block_n: int = 128
  split_k: int = 1
  num_warps: int = 4
  num_stages: int = 4
  w_as_a: bool = False
  # "asm": PTX on 4 bytes (E4M3 bit trick, 2 cvt.rn.f16x2.e4m3x2, 2 mul.f16x2 per half);
  # "asm2": the same on 2 bytes (one cvt + one mul per half); "asm_bytes": only the bit trick in
  # PTX (u8 -> u8), Triton's cvt and multiply; "e4m3": all in jnp (f16 MMA);
  # "f32": f16-bit decode -> f32 scale multiply -> bf16 (bf16 MMA, no f16 cast of x).
  dequant: str = "asm"
  # 256-wide K tiles per loop step (more work between the pipeline's per-step waits/barriers).
  tiles_per_step: int = 1


# One half of 2 bytes: $0 = 2 f16 (f16x2), $1 = 2 bytes, $2 = their 2 f16 block scales.
def _asm2_block(half: str) -> str:
  bits = ("and.b16 u, w, 0x0707;\nshl.b16 u, u, 2;\nand.b16 t, w, 0x0808;\nshl.b16 t, t, 4;\n"
          if half == "lo" else
          "shr.b16 u, w, 2;\nand.b16 u, u, 0x1C1C;\nand.b16 t, w, 0x8080;\n")
  return ("{\n.reg .b16 w, t, u;\n.reg .b32 s, a;\nmov.b16 w, $1;\nmov.b32 s, $2;\n" + bits +
          "or.b16 u, u, t;\ncvt.rn.f16x2.e4m3x2 a, u;\nmul.rn.f16x2 $0, a, s;\n}")


_ASM2 = {half: _asm2_block(half) for half in ("lo", "hi")}


def kl_global_factor(mode: str) -> float:
  """What the accumulator must be multiplied by (besides the global scale) for ``mode``."""
  return _KL_GLOBAL_FACTOR[mode]


def kl_mode_for(dequant: str, interpret: bool) -> str:
  if dequant not in KL_DEQUANT_MODES:
    raise ValueError(f"dequant must be one of {KL_DEQUANT_MODES}, got {dequant!r}")
  return _KL_JNP_TWIN.get(dequant, dequant) if interpret else dequant


def kl_dequant_half(packed: jax.Array, scale: jax.Array, half: str, mode: str) -> jax.Array:
  """Kernel-layout bytes [rows, 128] and the half's block scales [rows, 8] -> [rows, 128] in the
  MMA dtype: the low (``half="lo"``) or high nibbles times their scales, over the mode's global
  factor (exact on every mode)."""
  rows, groups = scale.shape
  if mode == "f32":
    b = packed.astype(jnp.uint16)
    bits = _e2m1_f16_bits(b) if half == "lo" else ((b & 0x80) << 8) | ((b & 0x70) << 5)
    s = jnp.broadcast_to((scale.astype(jnp.float32) * _F16_TO_E2M1_SCALE)[:, :, None],
                         (rows, groups, 16)).reshape(rows, groups * 16)
    return (_e2m1_f16_bits_to_f32(bits) * s).astype(jnp.bfloat16)
  s = jnp.broadcast_to(scale.astype(jnp.float16)[:, :, None], (rows, groups, 16))
  s = s.reshape(rows, groups * 16)
  out = jax.ShapeDtypeStruct(packed.shape, jnp.float16)
  if mode == "asm":
    return plgpu.elementwise_inline_asm(_ASM["asm"][half], args=[packed, s],
                                        constraints="=r,=r,r,r,r", pack=4,
                                        result_shape_dtypes=[out])[0]
  if mode == "asm2":
    return plgpu.elementwise_inline_asm(_ASM2[half], args=[packed, s], constraints="=r,h,r",
                                        pack=2, result_shape_dtypes=[out])[0]
  if mode == "asm_bytes":
    bits = plgpu.elementwise_inline_asm(
        _ASM_BYTES[half], args=[packed], constraints="=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, jnp.int8)])[0]
    return _e4m3_bits_to_f16(bits) * s
  if mode != "e4m3":
    raise ValueError(f"not a kernel-layout dequant mode: {mode!r}")
  lo, hi = e2m1_to_e4m3_bytes(packed)
  return _e4m3_bits_to_f16(lo if half == "lo" else hi) * s


def kl_tile_dot(acc: jax.Array, load_x, wq: jax.Array, load_scale, mode: str, w_as_a: bool
                ) -> jax.Array:
  """acc += x [bm, 256] @ dequant(kernel-layout byte tile wq [bn, 128])^T, as two 128-deep dots.

  ``load_x(h)`` gives x's K slice [bm, 128] of half h, ``load_scale(h)`` that half's scales
  [bn, 8]; acc is [bn, bm] when ``w_as_a`` else [bm, bn]."""
  for h, half in enumerate(("lo", "hi")):
    w = kl_dequant_half(wq, load_scale(h), half, mode)
    x = load_x(h).astype(w.dtype)
    acc = acc + (plgpu.dot(w, x, trans_b=True) if w_as_a else plgpu.dot(x, w, trans_b=True))
  return acc


def _kl_kernel(x_ref, wq_ref, ws_ref, gs_ref, o_ref, *, m, n, bm, bn, k_steps, split, mode,
               w_as_a, tps):
  pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  m0, n0 = pid_m * bm, pid_n * bn
  row_ok = (m0 + jnp.arange(bm)) < m
  col_ok = (n0 + jnp.arange(bn)) < n
  half = nvfp4.KERNEL_TILE // 2
  groups = half // nvfp4.BLOCK_SIZE

  def one_tile(t, acc):
    kp = pl.multiple_of(t * half, half)
    if n % bn:
      wq = plgpu.load(wq_ref.at[pl.ds(n0, bn), pl.ds(kp, half)], mask=col_ok[:, None], other=0)
    else:
      wq = wq_ref[pl.ds(n0, bn), pl.ds(kp, half)]

    def load_scale(h):
      idx = (pl.ds(n0, bn), pl.ds(pl.multiple_of(t * 2 * groups + h * groups, groups), groups))
      return plgpu.load(ws_ref.at[idx], mask=col_ok[:, None]) if n % bn else ws_ref[idx]

    def load_x(h):
      k0 = pl.multiple_of(t * 2 * half + h * half, half)
      return plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, half)], mask=row_ok[:, None], other=0)

    return kl_tile_dot(acc, load_x, wq, load_scale, mode, w_as_a)

  def body(i, acc):
    for j in range(tps):
      acc = one_tile(pid_s * k_steps * tps + i * tps + j, acc)
    return acc

  acc = jax.lax.fori_loop(0, k_steps, body,
                          jnp.zeros((bn, bm) if w_as_a else (bm, bn), jnp.float32))
  acc = acc * (gs_ref[0] * kl_global_factor(mode))
  if w_as_a:
    acc = acc.T
  mask = row_ok[:, None] & col_ok[None, :]
  if split > 1:
    plgpu.store(o_ref.at[pid_s, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=mask)
  else:
    plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=mask)


def kl_split(m: int, n: int, k: int, bm: int, bn: int, num_sms: int = 132) -> int:
  """No split when the output tiles alone fill half the SMs (the split's f32 partials and their
  XLA reduction cost more than the idle SMs: 21.7 vs 26.2 us at M=8, N=14336 in window 2);
  otherwise split K (a power of two dividing the K-tile count, >= 4 tiles per program) until
  the grid covers the SMs."""
  tiles = -(-m // bm) * -(-n // bn)
  steps = k // nvfp4.KERNEL_TILE
  split = 1
  if tiles >= num_sms // 2:
    return split
  while tiles * split < num_sms and steps % (split * 2) == 0 and steps // (split * 2) >= 4:
    split *= 2
  return split


def default_kl_tiling(m: int, n: int, k: int, num_sms: int = 132, **overrides) -> KLTiling:
  """bm = 16 / 32 / 64 by M; the weight as the MMA's B operand, bn = 128, 4 warps; split-K by
  kl_split; 3 pipeline stages without split, 2 with it. These are the fastest float64-verified
  variants of the H100 sweeps (benchmarks/gemm.md, window 2) at every measured decode shape but
  M=1, K=14336 (5% behind). ``overrides`` replace fields (the split is recomputed for an
  overridden block_m / block_n unless split_k is given; stages follow the split unless given)."""
  bm = overrides.pop("block_m", 16 if m <= 16 else (32 if m <= 32 else 64))
  bn = overrides.pop("block_n", 128)
  split = overrides.pop("split_k", kl_split(m, n, k, bm, bn, num_sms))
  stages = overrides.pop("num_stages", 3 if split == 1 else 2)
  return KLTiling(bm, bn, split, num_stages=stages, **overrides)


@functools.partial(jax.jit, static_argnames=("tiling", "interpret", "out_dtype"))
def w4a16_matmul_kl(x: jax.Array, packed_kl: jax.Array, scale: jax.Array,
                    global_scale: jax.Array, *, tiling: KLTiling | None = None,
                    interpret: bool = False, out_dtype=None) -> jax.Array:
  """x [M, K] @ NVFP4 W [N, K]^T -> [M, N] (``out_dtype``, default x's), W's bytes in the kernel
  layout (kernels/quant/nvfp4.to_kernel_layout; K a multiple of 256), scales in the ModelOpt
  layout. An f16 x on the f16 routes skips the per-tile conversion in the K loop (the same
  round-to-nearest cast the kernel does: bit-identical results)."""
  if x.ndim != 2:
    raise ShapeError(f"x must be [M, K], got {x.shape}")
  m, k = x.shape
  _check_weight(packed_kl, scale, global_scale, k)
  nvfp4.check_kernel_k(k)
  n = packed_kl.shape[0]
  t = tiling or default_kl_tiling(m, n, k)
  steps = k // nvfp4.KERNEL_TILE
  split = t.split_k if steps % t.split_k == 0 else 1
  tps = t.tiles_per_step if (steps // split) % t.tiles_per_step == 0 else 1
  mode = kl_mode_for(t.dequant, interpret)
  out_dtype = out_dtype or x.dtype
  out_shape = (jax.ShapeDtypeStruct((split, m, n), jnp.float32) if split > 1
               else jax.ShapeDtypeStruct((m, n), out_dtype))
  gs = jnp.asarray(global_scale, jnp.float32).reshape(1)
  out = pl.pallas_call(
      functools.partial(_kl_kernel, m=m, n=n, bm=t.block_m, bn=t.block_n,
                        k_steps=steps // split // tps, split=split, mode=mode, w_as_a=t.w_as_a,
                        tps=tps),
      out_shape=out_shape, grid=(pl.cdiv(m, t.block_m), pl.cdiv(n, t.block_n), split),
      interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
      name="nvfp4_w4a16_kl",
  )(x, packed_kl, scale, gs)
  return out.sum(0).astype(out_dtype) if split > 1 else out


def w4a16_reference_kl(x, packed_kl, scale, global_scale) -> jax.Array:
  return w4a16_reference(x, nvfp4.from_kernel_layout(packed_kl), scale, global_scale)


def e2m1_round(q: jax.Array) -> jax.Array:
  """f32 (already scaled) -> E2M1 code 0..15 as int32; round-to-nearest-even, saturating at 6."""
  a = jnp.abs(q)
  mag = ((a > 0.25).astype(jnp.int32) + (a >= 0.75).astype(jnp.int32)
         + (a > 1.25).astype(jnp.int32) + (a >= 1.75).astype(jnp.int32)
         + (a > 2.5).astype(jnp.int32) + (a >= 3.5).astype(jnp.int32)
         + (a > 5.0).astype(jnp.int32))
  return mag + jnp.where(q < 0, 8, 0)


def _quantize_kernel(x_ref, gs_ref, q_ref, s_ref, *, m, k, bm, bk, mask_k):
  pid_m, pid_k = pl.program_id(0), pl.program_id(1)
  m0, k0 = pid_m * bm, pid_k * bk
  row_ok = (m0 + jnp.arange(bm)) < m
  g = bk // nvfp4.BLOCK_SIZE

  def mask(width):
    if not mask_k:
      return row_ok[:, None]
    return row_ok[:, None] & ((k0 * width // bk + jnp.arange(width)) < k * width // bk)[None, :]

  x = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], mask=mask(bk), other=0)
  x = x.astype(jnp.float32)
  gs = gs_ref[0]
  blocks = x.reshape(bm, g, nvfp4.BLOCK_SIZE)
  amax = jnp.max(jnp.abs(blocks), axis=-1)
  scale = jnp.clip(amax / (nvfp4.E2M1_MAX * gs), 0.0, nvfp4.E4M3_MAX).astype(jnp.float8_e4m3fn)
  denom = scale.astype(jnp.float32) * gs
  safe = jnp.where(denom > 0, denom, 1.0)
  q = jnp.where(denom > 0, 1.0, 0.0).reshape(bm, g, 1) * (blocks / safe.reshape(bm, g, 1))
  codes = e2m1_round(q).reshape(bm, bk // 2, 2)
  weight = 1 + 15 * jax.lax.broadcasted_iota(jnp.int32, (bm, bk // 2, 2), 2)
  packed = jnp.sum(codes * weight, axis=-1).astype(jnp.uint8)
  plgpu.store(q_ref.at[pl.ds(m0, bm), pl.ds(k0 // 2, bk // 2)], packed, mask=mask(bk // 2))
  plgpu.store(s_ref.at[pl.ds(m0, bm), pl.ds(k0 // 16, g)], scale, mask=mask(g))


@functools.partial(jax.jit, static_argnames=("block_m", "block_k", "interpret"))
def quantize_activations(x: jax.Array, global_scale: jax.Array, *, block_m: int = 16,
                         block_k: int = 256, interpret: bool = False
                         ) -> tuple[jax.Array, jax.Array]:
  """Fused bf16 -> NVFP4: x [M, K] -> (packed uint8 [M, K/2], scales e4m3 [M, K/16]).

  ``global_scale`` is the calibrated per-tensor ``input_scale`` (amax / (6 * 448)).
  """
  if x.ndim != 2:
    raise ShapeError(f"x must be [M, K], got {x.shape}")
  m, k = x.shape
  nvfp4.check_k(k)
  bk, mask_k = k_block(k, block_k)
  gs = jnp.asarray(global_scale, jnp.float32).reshape(1)
  return pl.pallas_call(
      functools.partial(_quantize_kernel, m=m, k=k, bm=block_m, bk=bk, mask_k=mask_k),
      out_shape=(jax.ShapeDtypeStruct((m, k // 2), jnp.uint8),
                 jax.ShapeDtypeStruct((m, k // 16), jnp.float8_e4m3fn)),
      grid=(pl.cdiv(m, block_m), pl.cdiv(k, bk)), interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      name="nvfp4_quantize",
  )(x, gs)


def w4a4_blackwell(x_packed, x_scale, x_global_scale, packed, scale, global_scale,
                   out_dtype=jnp.bfloat16) -> jax.Array:
  """Blackwell block-scaled tensor-core path (jax.nn.scaled_matmul, nvfp4). UNTESTED on hardware."""
  lhs = jax.lax.bitcast_convert_type(nvfp4.unpack_nibbles(x_packed).astype(jnp.uint4),
                                     jnp.float4_e2m1fn)
  rhs = jax.lax.bitcast_convert_type(nvfp4.unpack_nibbles(packed).astype(jnp.uint4),
                                     jnp.float4_e2m1fn)
  y = jax.nn.scaled_matmul(lhs[None], rhs[None], x_scale[None], scale[None],
                           preferred_element_type=jnp.float32)[0]
  return (y * (jnp.asarray(x_global_scale, jnp.float32) * global_scale)).astype(out_dtype)


# ----- plain-JAX references (also the CPU fallback of kernels/gemm.py) -----

def w4a16_reference(x, packed, scale, global_scale) -> jax.Array:
  w = nvfp4.dequantize(packed, scale, global_scale, jnp.float32)        # [N, K]
  y = jnp.einsum("mk,nk->mn", x.astype(jnp.float32), w, precision="highest")
  return y.astype(x.dtype)


def w4a4_reference(x_packed, x_scale, x_global_scale, packed, scale, global_scale,
                   out_dtype=jnp.bfloat16) -> jax.Array:
  x = nvfp4.dequantize(x_packed, x_scale, x_global_scale, jnp.float32)
  w = nvfp4.dequantize(packed, scale, global_scale, jnp.float32)
  return jnp.einsum("mk,nk->mn", x, w, precision="highest").astype(out_dtype)


def quantize_activations_reference(x, global_scale) -> tuple[jax.Array, jax.Array]:
  packed, scale, _ = nvfp4.quantize(x, global_scale)
  return packed, scale
