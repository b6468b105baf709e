"""kernels/nvfp4_matmul: W4A16 / W4A4 Pallas kernels and the activation quantizer, interpret mode.

Interpret mode fills float outputs with NaN before the kernel runs (checked below), so every
"all finite and close to the float64 reference" assertion also proves each element was written.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental import pallas as pl

from jaxinfer.errors import ShapeError
from kernels import nvfp4_matmul as nk
from kernels.quant import nvfp4

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)


def np_dequant(packed, scale, gs):
  p = np.asarray(packed)
  codes = np.stack([p & 0xF, p >> 4], axis=-1).reshape(p.shape[0], -1)
  return E2M1[codes] * np.repeat(np.asarray(jnp.asarray(scale, jnp.float32), np.float64), 16, 1) * float(gs)


def random_nvfp4(rng, n, k):
  packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
  scale = rng.uniform(0.05, 400, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
  return jnp.asarray(packed), jnp.asarray(scale), jnp.float32(rng.uniform(1e-3, 1e-2))


def rel_err(y, ref):
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  assert np.all(np.isfinite(y)), "unwritten (NaN-poisoned) or non-finite output"
  return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def test_interpret_mode_poisons_outputs():
  def writes_nothing(x_ref, o_ref):
    del x_ref, o_ref
  out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8, 8), jnp.bfloat16),
                       interpret=True)(jnp.ones((8, 8)))
  assert np.all(np.isnan(np.asarray(out, np.float32)))


def test_dequant_tile_covers_every_byte_and_scale():
  """The f16-bit E2M1 decode matches the table for all 256 bytes and a spread of E4M3 scales."""
  packed = np.arange(256, dtype=np.uint8).reshape(16, 16)
  scale = np.array([2.0**-9, 0.013671875, 1.0, 448.0] * 8, ml_dtypes.float8_e4m3fn).reshape(16, 2)
  got = np.asarray(nk.dequant_tile(jnp.asarray(packed), jnp.asarray(scale)), np.float64)
  np.testing.assert_array_equal(got, np_dequant(packed, scale, 1.0))   # exact in bf16


@pytest.mark.parametrize("mode", ["e4m3", "f16"])
def test_f16_dequant_is_exact_for_every_byte_and_every_scale(mode):
  """The f16 decodes (nibble -> E4M3 byte = value * 2^-6, or f16 bits = value * 2^-14, times the
  E4M3 block scale in f16) equal the plain-JAX dequantize bit for bit, for all 256 bytes x all
  254 finite E4M3 scales (the PTX routes compute these same functions on packed words)."""
  scales = np.arange(256, dtype=np.uint8)
  scales = scales[(scales & 0x7F) != 0x7F].view(ml_dtypes.float8_e4m3fn)        # drop the NaNs
  packed = np.tile(np.arange(256, dtype=np.uint8), (scales.size, 1))            # [254, 256]
  scale = np.repeat(scales[:, None], 32, axis=1)                                # [254, 32]
  lo, hi = nk.dequant_halves_f16(jnp.asarray(packed), jnp.asarray(scale), mode=mode)
  assert lo.dtype == hi.dtype == jnp.float16
  got = np.asarray(nk.interleave(lo, hi), np.float64) * nk.global_factor(mode)
  want = np.asarray(nvfp4.dequantize(jnp.asarray(packed), jnp.asarray(scale), 1.0), np.float64)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.signbit(got), np.signbit(want))             # -0 stays -0
  np.testing.assert_array_equal(got, np_dequant(packed, scale, 1.0))


def test_e2m1_to_e4m3_bytes_bit_patterns():
  """Low / high nibble s e1 e0 m -> E4M3 byte s<<7 | (e1 e0 m)<<2 for every byte."""
  b = np.arange(256, dtype=np.uint8)
  lo, hi = nk.e2m1_to_e4m3_bytes(jnp.asarray(b))
  want = lambda nib: ((nib & 8) << 4) | ((nib & 7) << 2)   # noqa: E731
  np.testing.assert_array_equal(np.asarray(lo), want(b & 0xF))
  np.testing.assert_array_equal(np.asarray(hi), want(b >> 4))


def test_dequant_modes_interpret_twins():
  assert [nk.mode_for(m, interpret=True) for m in nk.DEQUANT_MODES] == [
      "f32", "e4m3", "e4m3", "f16", "f16"]
  assert [nk.mode_for(m, interpret=False) for m in nk.DEQUANT_MODES] == list(nk.DEQUANT_MODES)
  with pytest.raises(ValueError, match="dequant"):
    nk.mode_for("int8", interpret=True)
  with pytest.raises(NotImplementedError, match="x_even_odd"):   # measured wrong on the GPU
    nk.check_asm_layout("asm", x_even_odd=False)
  nk.check_asm_layout("asm", x_even_odd=True)
  nk.check_asm_layout("e4m3", x_even_odd=False)


def test_e2m1_round_matches_ml_dtypes(rng):
  ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0])
  q = np.concatenate([ties, -ties, rng.uniform(-7, 7, 2000)]).astype(np.float32)
  got = E2M1[np.asarray(nk.e2m1_round(jnp.asarray(q)))]
  want = np.clip(q, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m,n,k,tiling", [
    (1, 64, 48, nk.Tiling(16, 32, 64, 1, 4, 2, x_even_odd=True)),   # M=1, K % 32 != 0 (masked K)
    (37, 80, 512, nk.Tiling(16, 32, 128, 2, 4, 2)),                 # M, N tails; split-K
    (70, 64, 1040, nk.Tiling(32, 64, 256, 1, 4, 2)),                # K = 16 * 65
    # f16 routes ("asm" interprets as the identical "e4m3" jnp route), weight as MMA A operand
    (3, 80, 1040, nk.Tiling(16, 32, 256, 1, 4, 2, dequant="e4m3")),
    (1, 64, 48, nk.Tiling(16, 32, 64, 1, 4, 2, x_even_odd=True, dequant="asm", w_as_a=True)),
    (37, 80, 512, nk.Tiling(16, 32, 128, 2, 4, 2, dequant="asm", w_as_a=True)),
    (20, 64, 1040, nk.Tiling(16, 64, 256, 1, 4, 2, x_even_odd=True, dequant="asm_f16")),
    (17, 80, 1040, nk.Tiling(16, 32, 256, 1, 4, 2, dequant="asm", w_as_a=True, load_3d=True)),
])
def test_w4a16_matches_float64(rng, m, n, k, tiling):
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  packed, scale, gs = random_nvfp4(rng, n, k)
  y = nk.w4a16_matmul(x, packed, scale, gs, tiling=tiling, interpret=True)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  ref = np.asarray(x.astype(jnp.float32), np.float64) @ np_dequant(packed, scale, gs).T
  assert rel_err(y, ref) < 5e-3   # bf16 output rounding ~2e-3


@pytest.mark.parametrize("w_as_a", [False, True])
def test_w4a16_f16_route_x_scale_handles_any_bf16_range(rng, w_as_a):
  """x_scale: rows at 1e30, 1e6 (> f16 max), 1e-30 (< f16 subnormals), zeros and O(1) rows all
  come out right through the f16 MMA (the plain f16 cast gives inf / zeros on the first three)."""
  m, n, k = 6, 32, 256
  mags = np.array([1e30, 1e6, 1.0, 1e-30, 0.0, 3e4])[:, None]
  x = jnp.asarray(rng.standard_normal((m, k)) * mags, jnp.bfloat16)
  packed, scale, gs = random_nvfp4(rng, n, k)
  t = nk.Tiling(16, 32, 128, 1, 4, 2, dequant="asm", w_as_a=w_as_a, x_scale=True)
  y = np.asarray(nk.w4a16_matmul(x.astype(jnp.float32), packed, scale, gs, tiling=t,
                                 interpret=True), np.float64)
  ref = np.asarray(x.astype(jnp.float32), np.float64) @ np_dequant(packed, scale, gs).T
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(y[4], 0.0)
  for r in [0, 1, 2, 3, 5]:
    assert np.linalg.norm(y[r] - ref[r]) <= 1e-5 * np.linalg.norm(ref[r]), r
  plain = nk.w4a16_matmul(x, packed, scale, gs, interpret=True,
                          tiling=nk.Tiling(16, 32, 128, 1, 4, 2, dequant="asm"))
  assert not np.all(np.isfinite(np.asarray(plain, np.float32)[:2]))   # the limit x_scale removes


def test_w4a16_f16_route_f32_output_is_tight(rng):
  """With f32 x / output the f16 route's only errors are x's f16 rounding and f32 accumulation."""
  m, n, k = 5, 32, 256
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(jnp.float16).astype(jnp.float32)
  packed, scale, gs = random_nvfp4(rng, n, k)
  y = nk.w4a16_matmul(x, packed, scale, gs, interpret=True,
                      tiling=nk.Tiling(16, 32, 128, 1, 4, 2, dequant="asm", w_as_a=True))
  ref = np.asarray(x, np.float64) @ np_dequant(packed, scale, gs).T
  assert y.dtype == jnp.float32 and rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("m,k", [(1, 48), (19, 256)])
def test_quantize_activations_kernel_matches_reference(rng, m, k):
  x = jnp.asarray(rng.standard_normal((m, k)) * np.exp(rng.standard_normal((m, 1))), jnp.bfloat16)
  gs = nvfp4.global_scale_for(x)
  q, s = nk.quantize_activations(x, gs, interpret=True)
  rq, rs = nk.quantize_activations_reference(x, gs)
  np.testing.assert_array_equal(np.asarray(s).view(np.uint8), np.asarray(rs).view(np.uint8))
  np.testing.assert_array_equal(np_dequant(q, s, gs), np_dequant(rq, rs, gs))   # +-0 equal
  # And the quantization error bound against the float64 input.
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  amax = np.repeat(np.abs(x64).reshape(m, -1, 16).max(-1), 16, 1)
  assert np.all(np.abs(np_dequant(q, s, gs) - x64) <= amax / 6 * (1 + 1 / 16) + 1e-12)


def test_w4a4_matches_float64(rng):
  m, n, k = 21, 64, 512
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  xgs = nvfp4.global_scale_for(x)
  xq, xs = nk.quantize_activations_reference(x, xgs)
  packed, scale, gs = random_nvfp4(rng, n, k)
  y = nk.w4a4_matmul(xq, xs, xgs, packed, scale, gs, out_dtype=jnp.float32,
                     tiling=nk.Tiling(16, 32, 128, 1, 4, 2), interpret=True)
  ref = np_dequant(xq, xs, xgs) @ np_dequant(packed, scale, gs).T
  assert rel_err(y, ref) < 1e-5   # exact bf16 operands, f32 accumulation


@pytest.mark.parametrize("make", [
    lambda p, s, g: nk.w4a16_matmul(jnp.ones((2, 64), jnp.bfloat16), p, s, g),   # K mismatch
    lambda p, s, g: nk.w4a16_matmul(jnp.ones((2, 2, 128), jnp.bfloat16), p, s, g),  # x not 2-D
    lambda p, s, g: nk.w4a16_matmul(jnp.ones((2, 128), jnp.bfloat16), p.astype(jnp.int8), s, g),
    lambda p, s, g: nk.w4a16_matmul(jnp.ones((2, 128), jnp.bfloat16), p, s[:, :4], g),
    lambda p, s, g: nk.w4a16_matmul(jnp.ones((2, 128), jnp.bfloat16), p, s, jnp.ones(2)),
    lambda p, s, g: nk.w4a16_matmul(jnp.ones((2, 24), jnp.bfloat16), p[:, :12], s[:, :1], g),
    lambda p, s, g: nk.quantize_activations(jnp.ones((2, 40)), g),
])
def test_bad_inputs_raise_shape_error(rng, make):
  packed, scale, gs = random_nvfp4(rng, 32, 128)
  with pytest.raises(ShapeError):
    make(packed, scale, gs)


# ----- kernel layout (kernels/quant/nvfp4.to_kernel_layout) decode kernel -----

@pytest.mark.parametrize("m,n,k,tiling", [
    (1, 64, 512, None),                                                       # default tiling
    (5, 200, 768, nk.KLTiling(16, 64, 1, 4, 2, w_as_a=False, dequant="asm")),  # N tail, B form
    (40, 128, 1024, nk.KLTiling(64, 64, 2, 4, 2, dequant="asm2")),             # M tail, split-K
    (17, 96, 512, nk.KLTiling(32, 64, 2, 4, 2, w_as_a=False, dequant="f32")),  # bf16 MMA route
    (9, 64, 2048, nk.KLTiling(16, 64, 2, 4, 2, dequant="asm_bytes", tiles_per_step=2)),
])
def test_w4a16_kernel_layout_matches_float64(rng, m, n, k, tiling):
  """The PTX routes ("asm", "asm2") interpret as their identical jnp "e4m3" twin."""
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  packed, scale, gs = random_nvfp4(rng, n, k)
  y = nk.w4a16_matmul_kl(x, nvfp4.to_kernel_layout(packed), scale, gs, tiling=tiling,
                         interpret=True)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  ref = np.asarray(x.astype(jnp.float32), np.float64) @ np_dequant(packed, scale, gs).T
  assert rel_err(y, ref) < 5e-3


@pytest.mark.parametrize("split", [1, 2])
def test_w4a16_kernel_layout_f16_x_is_bit_identical(rng, split):
  """x cast to f16 by the caller (out_dtype bf16) gives exactly the bf16-x result on an f16
  route: the kernel casts each x tile the same way (gemm.KL_X_F16)."""
  m, n, k = 6, 128, 1024
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  packed, scale, gs = random_nvfp4(rng, n, k)
  pk = nvfp4.to_kernel_layout(packed)
  t = nk.KLTiling(16, 64, split, 4, 2, dequant="asm")
  a = nk.w4a16_matmul_kl(x, pk, scale, gs, tiling=t, interpret=True)
  b = nk.w4a16_matmul_kl(x.astype(jnp.float16), pk, scale, gs, tiling=t, interpret=True,
                         out_dtype=jnp.bfloat16)
  assert b.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("mode", ["e4m3", "f32"])
def test_kernel_layout_dequant_halves_are_exact(mode):
  """Both nibble halves of every byte, under every finite E4M3 scale, decode exactly."""
  scales = np.arange(256, dtype=np.uint8)
  scales = scales[(scales & 0x7F) != 0x7F].view(ml_dtypes.float8_e4m3fn)       # 254 finite
  packed = np.tile(np.arange(256, dtype=np.uint8).reshape(2, 128), (scales.size, 1))
  scale = np.repeat(np.repeat(scales, 2)[:, None], 8, axis=1)                   # [508, 8]
  codes = np.stack([packed & 0xF, packed >> 4])
  for h, half in enumerate(("lo", "hi")):
    got = nk.kl_dequant_half(jnp.asarray(packed), jnp.asarray(scale), half, mode)
    got = np.asarray(got.astype(jnp.float32), np.float64) * nk.kl_global_factor(mode)
    want = E2M1[codes[h]] * np.repeat(np.asarray(scale.astype(np.float32), np.float64), 16, 1)
    np.testing.assert_array_equal(got, want)


def test_kernel_layout_rejects_bad_k(rng):
  packed, scale, gs = random_nvfp4(rng, 64, 272)          # K = 272: multiple of 16, not of 256
  with pytest.raises(ShapeError):
    nk.w4a16_matmul_kl(jnp.ones((2, 272), jnp.bfloat16), packed, scale, gs, interpret=True)


def emulate_ptx(asm: str, args: dict[str, int]) -> dict[str, int]:
  """Runs the subset of PTX our inline blocks use on Python ints ($n operands by name)."""
  regs = dict(args)

  def val(tok):
    tok = tok.strip()
    return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.isdigit() else regs[tok])

  for line in asm.split("\n"):
    line = line.strip().rstrip(";")
    if line in ("{", "}", "") or line.startswith(".reg"):
      continue
    op, rest = line.split(None, 1)
    ops = [t.strip() for t in rest.split(",")] if not rest.startswith("{") else None
    base, bits = op.split(".")[0], int(op.rsplit(".b", 1)[1]) if ".b" in op else 32
    mask = (1 << bits) - 1
    if op == "mov.b32" and ops is None:                  # mov.b32 {lo, hi}, src
      lo, hi = line[line.index("{") + 1:line.index("}")].split(",")
      src = val(line.rsplit(",", 1)[1])
      regs[lo.strip()], regs[hi.strip()] = src & 0xFFFF, src >> 16
    elif base == "mov":
      regs[ops[0]] = val(ops[1])
    elif base in ("and", "or"):
      a, b = val(ops[1]), val(ops[2])
      regs[ops[0]] = (a & b if base == "and" else a | b) & mask
    elif base in ("shl", "shr"):
      a, s = val(ops[1]), val(ops[2])
      regs[ops[0]] = ((a << s) if base == "shl" else (a >> s)) & mask
    elif op == "cvt.rn.f16x2.e4m3x2":
      src = val(ops[1])
      halves = np.array([src & 0xFF, src >> 8], np.uint8).view(ml_dtypes.float8_e4m3fn)
      regs[ops[0]] = int(halves.astype(np.float16).view(np.uint16).astype(np.uint32) @ [1, 1 << 16])
    elif op == "mul.rn.f16x2":
      a = np.array([val(ops[1]) & 0xFFFF, val(ops[1]) >> 16], np.uint16).view(np.float16)
      b = np.array([val(ops[2]) & 0xFFFF, val(ops[2]) >> 16], np.uint16).view(np.float16)
      regs[ops[0]] = int((a * b).view(np.uint16).astype(np.uint32) @ [1, 1 << 16])
    else:
      raise NotImplementedError(line)
  return regs


def test_ptx_blocks_compute_their_jnp_twins(rng):
  """The kernel-layout PTX blocks ("asm", "asm2", "asm_bytes"), run by a small PTX emulator on
  random words, equal the jnp E4M3 decode that interpret mode runs in their place."""
  words = rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32)
  scales = rng.uniform(0.01, 400, (64, 4)).astype(ml_dtypes.float8_e4m3fn).astype(np.float16)
  for w, s in zip(words, scales):
    b = np.frombuffer(np.uint32(w).tobytes(), np.uint8)                       # 4 bytes, LE
    lo, hi = (np.asarray(v) for v in nk.e2m1_to_e4m3_bytes(jnp.asarray(b)))
    for half, want_bits in (("lo", lo), ("hi", hi)):
      got = emulate_ptx(nk._ASM_BYTES[half], {"$1": int(w)})["$0"]
      np.testing.assert_array_equal(np.frombuffer(np.uint32(got).tobytes(), np.uint8), want_bits)
      want = want_bits.view(ml_dtypes.float8_e4m3fn).astype(np.float16) * s
      s_words = s.view(np.uint16).astype(np.uint32)
      r = emulate_ptx(nk._ASM["asm"][half], {"$2": int(w), "$3": int(s_words[0] | s_words[1] << 16),
                                             "$4": int(s_words[2] | s_words[3] << 16)})
      out = np.array([r["$0"], r["$1"]], np.uint32).view(np.uint16).view(np.float16)
      np.testing.assert_array_equal(out, want)
      for pair in range(2):
        r = emulate_ptx(nk._ASM2[half], {"$1": int(w >> (16 * pair)) & 0xFFFF,
                                         "$2": int(s_words[2 * pair] | s_words[2 * pair + 1] << 16)})
        out = np.array([r["$0"]], np.uint32).view(np.uint16).view(np.float16)
        np.testing.assert_array_equal(out, want[2 * pair:2 * pair + 2])
