"""NVFP4 W4A16 decode GEMM on Mosaic GPU (Hopper): TMA pipeline, dequantized weight as wgmma's A.

Computes y[M, N] = x[M, K] @ dequant(W)^T for small M (decode, M <= 64) as y^T = W x^T, so the
dequantized weight tile is the wgmma's A operand, which Hopper reads from registers: the f16
weights never touch shared memory. x^T is the B operand ([K, Mp] in shared memory, Mp = M rounded
up to 8: wgmma's n dimension).

Weight layout (``to_mgpu_layout``: a one-time, exactly invertible repack of the ModelOpt bytes
``packed [N, K/2]`` + ``scale [N, K/16]``; ``from_mgpu_layout`` undoes it). N is padded to a
multiple of 64 (a "strip": one wgmma M tile) and K to a multiple of 256 (a "K tile") with zero
scales. Each (strip, K tile) is one contiguous 9216-byte record ``uint32 [N/64, K/256, 72, 32]``:
  * bytes [0, 8192): the 64 x 256 E2M1 codes, ordered so that a thread's 16-byte loads hold
    exactly its wgmma A fragment: thread t (of the warpgroup's 128) reads the 16 bytes at
    c * 2048 + 16 t for c = 0..3 (each load instruction of a warp: 512 contiguous bytes);
  * bytes [8192, 9216): the block scales (E4M3), 8 bytes per thread at 8192 + 8 t: every scale is
    read by exactly one thread (no replication).
  The K order inside a K tile is permuted (the same permutation is applied to x, ``x_for_mgpu``):
  wgmma fragment column p = 8 j + 2 q + e (j = 0..31, q = lane % 4, e = 0..1) holds logical
  k = 64 q + 2 j + e, so a thread's 64 columns per row are 4 whole 16-element scale groups.
  Thread t = 32 w + 4 r + q owns rows 16 w + r + 8 h (h = 0, 1) of the strip; its word u = 0..15
  (c = u // 4) covers row half h = u // 8, scale group g = (u // 2) % 4 (of its 4) and fragment
  columns j = 8 g + 4 (u % 2) + s for nibble slot s = 0..3, each slot holding the two elements
  e = 0, 1 (columns 8 j + 2 q + e). The 4 bits of element (s, e) are scattered over the word
  (``_BIT_POS``) so that the dequantization needs few instructions: the f16 bit pattern of
  value * 2^-14 has the sign at bit 15 and the 3 magnitude bits at 9..11 of each 16-bit half
  (exact, subnormals included), and per word
      slot 0: w & 0x8E008E00                      (the bits already sit there)
      slot 1: rotr(w, 3) & 0x8E008E00
      slot 2: (w << 6) & 0x0E000E00 | rotr(w, 1) & 0x80008000
      slot 3: (w << 3) & 0x0E000E00 | rotr(w, 2) & 0x80008000
  (11 ALU instructions per 8 elements: the integer pipe runs 64 lanes per clock per SM, so at
  ~1.4 per element it stays under the memory time), each times the splat f16 block scale
  (``mul.rn.f16x2``: exact, products are multiples of 2^-24 below 2^6). The scale bytes take one
  cvt.rn.f16x2.e4m3x2 per two scales.

Kernel structure (like kernels/mla_attention_mgpu.py): grid (N / (64 C S), split_k); per CTA
``consumers`` (C) warpgroups of ``strips`` (S) 64-row strips each plus one producer warpgroup
(40 registers) that streams, per K tile, the CTA's weight records and the [Mp, 256] x tile (f16,
128-byte swizzle) by TMA into ``stages`` shared-memory slots (mbarrier per slot, plus one
"consumed" barrier per slot that all consumers arrive on). A consumer waits for the slot,
dequantizes each strip's record into registers (inline_mgpu: the FragmentedArray is built
register by register in the WGMMA layout) and issues the wgmmas (m64 n=Mp k16, A from registers;
by default in two K halves, ``mma_parts=2``: half 0's wgmmas run while half 1 is converted),
waits for them and releases the slot (with ``overlap_pairs``, the default where x comes from the
XLA fusion: waits only for the previous step's, so the wgmmas run under the next
step's dequantization). x is either converted to that tile by the producer warpgroup from the raw
bf16 tile (``x_in_kernel``, default up to 16 rows and with split-K up to 32) or cast and permuted
by one XLA fusion before the kernel. Epilogue: y[m, n] = acc[n, m] * 2^14 * global scale stored
straight from registers (2-byte scattered stores; y is small at decode). Split-K (narrow N): f32
partials [split, M, N] summed (and cast) by XLA.

Target roofline (H100, 3.05 TB/s measured read): the NVFP4 bytes are N K (1/2 + 1/16): 33 MB for
K=4096, N=14336 -> 10.8 us; the issue's target is >= 75% of that rate (14.5 us) and >= 3x XLA's
bf16 dot. Per SM that is ~17.5 weight elements per clock: ~35-45 thread-instructions per clock
for the dequantization (~30% of the issue rate), and at M=64 the f16 wgmmas need ~50-70% of the
tensor cores. x is re-read from L2 by every CTA (Mp * 512 bytes per K tile).

Measured (H100, jax 0.11.2, benchmarks/gemm.md "Eighth session", 2026-11-24 W5, the defaults
below, each float64-checked on its timed output; GPU = every kernel of the call from a trace, per
GEMM, vs XLA's bf16 dot in the same run): M=1 14.4 / 16.1 us (K=4096 N=14336 / K=14336 N=4096,
the latter with XLA's split-K sum), 2.75x / 2.54x; M=8 14.6 / 15.8 us, 2.91x / 2.62x; M=32 17.3 /
18.9 us (with the x fusion), 2.74x / 2.41x; M=64 20.6 / 21.5 us, 2.38x / 2.34x. At M=1 N=14336
that is 2.30 TB/s of NVFP4 bytes, 75% of the read ceiling. Wall time adds 1-2 us of launch gap
per kernel. Where the rest goes (the ``probe`` runs): the stream alone (``probe="stream"``) takes
12.8 / 14.9 us (M=1), 13.2 / 15.0 (M=8), 15.6 / 17.4 (M=32), 16.9 / 19.2 (M=64) -- at N=4096 and
at M=64 already more than a third of XLA's time -- and the consumers alone
(``probe="compute"``, no streaming) 13.2 us at M=1 and 13.8 at M=8 (N=14336): the SMs are
issue-bound on the dequantization (~290 instructions per thread per 9 KB record), and stream and
compute overlap but not completely (~1.5 us).

Options measured in the sixth session (H100, windows W1-W4 of 2026-11-24, benchmarks/gemm.md; all
float64-checked on the GPU, all off by default because none was faster where a default could use
it): ``stream_k`` (persistent stream-K over 113-132 CTAs, shared row blocks combined in the kernel)
18.1-21.2 us of kernel time at M=8 K=4096 N=14336 vs 15.4 (the combine's latency chain at the
CTAs' ends outweighs the 15% better SM balance); ``split_combine="kernel"`` (split-K partials
combined through global memory) 16.05 us = the default's 14.8 + 1.4 us XLA sum at M=8 N=4096, and
slower at M=64; ``split_combine="cluster"`` (through a cluster's distributed shared memory) equal
at M=1 but 2x slower at M >= 8 (clusters of four 194 KB CTAs do not all fit at once); ``pdl``
(programmatic dependent launch, prefetching the weights before ``griddepcontrol.wait``) 3-4 us
slower (pdl=3, the grouped kernel's recipe, is not measured); ``hold_a`` (removed since) still
wrong at M=64. ``tile_major`` (K-tile-major weight) saves
0.7 us of kernel time at K=14336 N=4096 (M=8: 14.1 vs 14.8 us, W3 and W4; M=64: 17.6 vs 18.3) and
nothing at K=4096; it needs the weight stored transposed (``to_tile_major``), so the public op does
not use it. XLA's command buffers already hold the kernel (turning them off added 2.3 us per call).

Seventh session (H100, 2026-11-24 windows W2-W5, benchmarks/gemm.md "Seventh session"): why
``overlap_mma`` (the plain loop with wgmma_wait(1); removed in the eighth session) was wrong at
M=64: its PTX (W2 dump) redefines the A-fragment registers of the
wgmma inside the loop (e.g. ``mul.rn.f16x2 %r104, ...`` feeds ``wgmma ... {%r104, ...}``; after
``wgmma.wait_group 1`` the next iteration writes %r104 again while that wgmma may still read it)
-- undefined in the PTX model, a race on the GPU that the slow n=64 wgmmas lose (rel. error 3.8e3
in W2, reproduced); ``overlap_pairs`` unrolls the loop over two steps, so consecutive steps use
distinct PTX registers, and is right at every M (1.66e-3). ``x_convert=2`` (a warp per row,
conflict-free shared-memory access) made the in-kernel x conversion 3.5 / 2.6 us cheaper at M=32.

Interpret mode (CPU) runs the same pipeline (TMA, barriers, slots, split-K, masking) with a plain
jnp twin of the dequantization (the same values from the same bytes) and a jnp dot instead of
the register-A wgmma (which the interpreter does not run); the PTX and the fragment mapping are
checked by a NumPy emulation of the per-thread code in tests/test_nvfp4_matmul_mgpu.py.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxinfer.errors import ShapeError
from kernels.quant import nvfp4

STRIP = 64            # weight rows per wgmma M tile
TILE_K = 256          # K per pipeline step (one weight record)
RECORD_WORDS = 2304   # 9216 bytes: 8192 of codes + 1024 of scales, as uint32 [72, 32]
_CODE_ROWS = 64       # rows of 32 words holding the codes
_GLOBAL_FACTOR = 2.0 ** 14


@dataclasses.dataclass(frozen=True)
class MgpuTiling:
  """consumers: compute warpgroups per CTA; strips: 64-row strips per consumer (the CTA covers
  64 * consumers * strips rows of N and reads each x tile once for all of them); stages: K tiles
  in flight per CTA (shared memory: stages * (9216 * CTA strips + 512 * Mp) bytes);
  split_k: K ranges per output tile (grid dimension; f32 partials summed by XLA);
  k_interleave: the consumers share the CTA's strips (64 * strips rows) and take alternate K tiles
  instead (the partial sums are added through shared memory at the end): a CTA per strip, so
  narrow N fills the SMs without split-K (needs stages % consumers == 0);
  x_in_kernel: x goes to the kernel as it is (bf16 / f16 [M, K], K % 256 == 0): the producer
  warpgroup TMAs each raw [M, 256] tile into one of 2 staging slots and writes it, cast to f16
  and K-permuted, into the swizzled wgmma tile itself (rows M..Mp-1 of that tile are never
  written: they only reach accumulator columns that are not stored), instead of one XLA fusion
  (x_for_mgpu) before the kernel; no_auto_barriers: Pallas's unsafe_no_auto_barriers (no
  warpgroup barrier around this kernel's shared-memory loads and stores; safe here: no thread
  both reads and writes one region, the TMA-written tiles are only read, and the producer's
  converted x tiles are fenced by commit_smem before the barrier that publishes them);
  pdl: programmatic dependent launch (Hopper): 0 off; 1: the producer issues the TMA loads of the
  weight records of the first ``stages`` steps (the weights are never written by an earlier
  kernel), then ``griddepcontrol.wait`` (the grids before this one complete and their memory is
  visible), and only then reads x; y is written after x is read, so after the wait too; the
  kernel is launched with programmatic stream serialization, so it may start while the previous
  kernel of the stream still runs; 2: as 1, and every CTA also executes
  ``griddepcontrol.launch_dependents`` at its start, so that the next PDL kernel of the stream
  (e.g. the next GEMM) can be launched onto SMs this grid leaves free and prefetch its own
  weights while this one streams (its ``wait`` still orders it after this grid's end); 3: every
  thread executes ``launch_dependents`` and then ``wait`` at its start, before any load (no
  prefetch: the recipe of kernels/grouped_nvfp4_matmul_mgpu.py);
  stream_k: 0 off; G > 0: a persistent stream-K schedule of G CTAs (use the number of SMs)
  instead of the (row block, split) grid: the U = row blocks x K tiles work units, row-block
  major, are split into G contiguous ranges of U/G (+-1) units, so every SM streams the same
  number of records however N divides (split_k is ignored); a row block whose K range is split
  over several CTAs is summed in the kernel: each contributing thread writes its f32 fragment to
  a workspace slot and increments its own arrival counter (per block, strip and thread: release /
  acquire at GPU scope), and the last to arrive adds the slots and stores y (see
  ``streamk_plan`` and ``_streamk_fixup``);
  split_combine (split_k > 1): "xla" (f32 partials [split, M, N] summed by an XLA reduction) or
  "kernel" (the split CTAs of a row block combine in the kernel as stream-K's shared blocks do:
  workspace slot per split, per-thread arrival counters, the last adds and stores y) or
  "cluster" (the split CTAs of a row block form a thread-block cluster; each writes its partial
  sums to its own shared memory, the cluster's block 0 adds its peers' through distributed
  shared memory after a cluster barrier and stores y; no workspace, counters or memset);
  tile_major: the weight comes K-tile major, uint32 [K/256, N/64, 72, 32] (``to_tile_major``:
  to_mgpu_layout's array with its first two axes swapped), so the CTAs, which all stream the
  same K tile at about the same time, read neighbouring records (one contiguous region per K
  tile) instead of records 147 KB apart (K=4096);
  overlap_pairs (excludes k_interleave): a consumer issues step i's wgmmas, then waits only for
  step i-1's (wgmma_wait(strips)) and releases that slot, so step i's tensor-core work runs under
  step i+1's barrier wait and dequantization; the loop is unrolled over pairs of steps, so
  consecutive steps' A fragments are different registers already in the PTX. (The plain loop
  with wgmma_wait(1), the sixth session's ``overlap_mma``, removed in the eighth, redefined the
  same PTX registers every iteration: step i+1's dequantization wrote the A registers that step
  i's in-flight wgmmas still read -- undefined in the PTX model and a race on the GPU, lost
  when the wgmmas are slow: relative error 2e3-4e3 at M=64; benchmarks/gemm.md, seventh
  session.);
  x_convert (x_in_kernel): 1: the producer converts 16-element units (two 16-byte loads, eight
  4-byte stores: 8-way / 4-way shared-memory bank conflicts, 48 wavefronts per KB of x); 2: a
  warp converts a whole row (four conflict-free 4-byte loads and one 16-byte store per lane: 16
  wavefronts per KB, the minimum; ``_convert_x_rows_gpu``);
  k_per_step: K tiles per pipeline step (1 or 2; excludes k_interleave, stream_k and
  tile_major):
  each strip's k_per_step records of a step are contiguous in memory (one 18 KB TMA per strip
  for 2), half the barrier round trips per byte (the grouped kernel's +2%); a CTA whose K range
  has an odd number of tiles runs 1;
  x_multicast (x through the XLA fusion, i.e. x_in_kernel off; excludes k_interleave, stream_k
  and the in-kernel split combines): CTAs of neighbouring row blocks form clusters of 2 and each
  x tile is TMA-multicast to both (each CTA loads half): the x bytes read from L2 per step halve
  (at M=64 every CTA reads a 32 KB x tile per 18 KB of weights: 57 MB of L2 reads at N=14336);
  the slots' "consumed" barriers become cluster barriers (a slot is refilled once the consumers
  of both CTAs released it);
  mma_parts (1, 2 or 4): a record is dequantized and multiplied in this many K parts (of 256 /
  mma_parts columns, each its own wgmma group): part p's wgmmas are issued before part p + 1 is
  dequantized, so the tensor core works while the ALU still converts (the A registers stay
  distinct PTX values, as in one group); split_acc: each K part accumulates into its own
  accumulator (added at the end), so the parts' wgmmas are independent chains, not one chain
  through a single accumulator;
  probe (a measurement, not a product: y is wrong): "" off; "stream": the consumers release each
  slot as soon as it is full (no dequantization, no wgmma: the floor of this TMA pipeline and
  grid); "mma": the wgmmas run on a constant A fragment (no shared-memory loads of the record, no
  dequantization); "deq": the dequantization runs and its registers are kept live, no wgmma;
  "compute": the first ``stages`` records are loaded once and the consumers run every step on
  them (no streaming: the consumers' own time; GPU only, one consumer loop without
  overlap_pairs). The interpreter's stream-K path ignores probes.
  ``experiments/bench_gemm.py`` times them to split a kernel's time into stream, dequantization
  and MMA."""
  consumers: int = 2
  strips: int = 1
  stages: int = 4
  split_k: int = 1
  k_interleave: bool = False
  x_in_kernel: bool = False
  no_auto_barriers: bool = False
  pdl: int = 0
  stream_k: int = 0
  split_combine: str = "xla"
  tile_major: bool = False
  overlap_pairs: bool = False
  x_convert: int = 1
  k_per_step: int = 1
  x_multicast: bool = False
  mma_parts: int = 1
  split_acc: bool = False
  probe: str = ""

  def __post_init__(self):
    if self.consumers < 1 or self.strips < 1 or self.stages < 1 or self.split_k < 1:
      raise ValueError(f"every MgpuTiling field must be >= 1, got {self}")
    if self.k_interleave and self.stages % self.consumers:
      raise ValueError(f"k_interleave needs stages to be a multiple of consumers, got {self}")
    if self.pdl not in (0, 1, 2, 3):
      raise ValueError(f"pdl must be 0, 1, 2 or 3, got {self}")
    if self.split_combine not in ("xla", "kernel", "cluster"):
      raise ValueError(f"split_combine must be 'xla', 'kernel' or 'cluster', got {self}")
    if self.split_combine == "cluster" and (self.k_interleave or self.stream_k):
      raise ValueError(f"split_combine='cluster' excludes k_interleave and stream_k, got {self}")
    if self.stream_k < 0 or (self.stream_k and self.k_interleave):
      raise ValueError(f"stream_k must be >= 0 and excludes k_interleave, got {self}")
    if self.k_per_step not in (1, 2) or (self.k_per_step > 1 and (
        self.k_interleave or self.stream_k or self.tile_major)):
      raise ValueError(f"k_per_step must be 1 or 2 (2 excludes k_interleave, stream_k and "
                       f"tile_major), got {self}")
    if self.x_multicast and (self.x_in_kernel or self.k_interleave or self.stream_k
                             or self.split_combine != "xla"):
      raise ValueError(f"x_multicast excludes x_in_kernel, k_interleave, stream_k and the "
                       f"in-kernel split combines, got {self}")
    if self.x_convert not in (1, 2):
      raise ValueError(f"x_convert must be 1 or 2, got {self}")
    if self.mma_parts not in (1, 2, 4):
      raise ValueError(f"mma_parts must be 1, 2 or 4, got {self}")
    if self.split_acc and self.mma_parts == 1:
      raise ValueError(f"split_acc needs mma_parts > 1, got {self}")
    if self.probe not in ("", "stream", "mma", "deq", "compute") or (
        self.probe and self.k_interleave) or (self.probe == "compute" and (
            self.overlap_pairs or self.stream_k or self.pdl)):
      raise ValueError(f"probe must be '', 'stream', 'mma', 'deq' or 'compute' (excludes "
                       f"k_interleave; compute also overlap_pairs, stream_k and pdl), got {self}")
    if self.overlap_pairs and (self.k_interleave or self.stream_k):
      raise ValueError(f"overlap_pairs excludes k_interleave and stream_k, got {self}")

  @property
  def cta_strips(self) -> int:
    return self.strips if self.k_interleave else self.consumers * self.strips


_SMEM_LIMIT = 227 * 1024 - 2048


_X_RAW_SLOTS = 2    # staging slots of the raw x tiles (x_in_kernel): one converted per step


def smem_bytes(t: MgpuTiling, mp: int) -> int:
  red = (t.consumers - 1) * t.strips * STRIP * mp * 4 if t.k_interleave else 0
  kps = t.k_per_step
  raw = _X_RAW_SLOTS * mp * TILE_K * 2 * kps if t.x_in_kernel else 0
  if t.split_combine == "cluster" and t.split_k > 1:
    red += t.cta_strips * STRIP * mp * 4
  return (t.stages * kps * (RECORD_WORDS * 4 * t.cta_strips + mp * TILE_K * 2) + red + raw
          + 1024)


def padded_m(m: int) -> int:
  return -(-m // 8) * 8


@dataclasses.dataclass(frozen=True)
class StreamKPlan:
  """Static stream-K partition: ``units`` = blocks x tiles (row block major) over ``ctas`` CTAs,
  CTA c taking units [c U // G, (c + 1) U // G); ``segments``: the most row blocks one CTA
  touches; ``contrib[b]``: CTAs contributing to row block b (1: stored directly);
  ``max_contrib``: workspace slots per block."""
  ctas: int
  blocks: int
  tiles: int
  segments: int
  max_contrib: int
  contrib: tuple[int, ...]

  @property
  def units(self) -> int:
    return self.blocks * self.tiles

  def start(self, c: int) -> int:
    return c * self.units // self.ctas

  def cta_of(self, u):
    """The CTA whose range holds unit u (works on Python ints and traced int32 scalars)."""
    return ((u + 1) * self.ctas - 1) // self.units


def streamk_plan(blocks: int, tiles: int, ctas: int) -> StreamKPlan:
  units = blocks * tiles
  g = min(ctas, units)
  plan = StreamKPlan(g, blocks, tiles, 0, 0, ())
  segs = max((plan.start(c + 1) - 1) // tiles - plan.start(c) // tiles + 1 for c in range(g))
  contrib = tuple(plan.cta_of(b * tiles + tiles - 1) - plan.cta_of(b * tiles) + 1
                  for b in range(blocks))
  return dataclasses.replace(plan, segments=segs, max_contrib=max(contrib), contrib=contrib)


# Defaults from the H100 windows of 2026-11-24 (benchmarks/gemm.md; every variant float64-checked
# on its timed output): x converted by the producer warpgroup up to X_IN_KERNEL_MAX_M rows (at
# M=8 the XLA x-prep fusion cost 5-9 us of wall time; at M=64 the producer's conversion of 64-row
# tiles made the kernel 2x slower, so larger M keep the fusion); one consumer warpgroup up to
# ONE_CONSUMER_MAX_M rows (M=1: 15.9 / 17.6 us vs 19.9 / 20.5 us with two); no automatic
# warpgroup barriers before the producer's TMA issues (16.3 vs 17.3 us at M=8).
# Seventh session (W2/W3, GPU kernel time per GEMM): the conflict-free x conversion (x_convert=2)
# everywhere x is converted in the kernel (M=32: 19.6 vs 22.9-23.1 us at N=14336, 17.2 vs 19.7-19.8
# at N=4096; M=8: -0.15..-0.3 us); above X_FUSION_MIN_M rows without split-K (N=14336) x goes
# through the XLA fusion and the consumers overlap their wgmmas (overlap_pairs): M=32 16.6 + 1.6
# us vs 19.6 in the kernel; with split-K (N=4096) the fusion ties (15.2 + 1.9 vs 17.2) and x stays
# in the kernel; above X_IN_KERNEL_MAX_M rows overlap_pairs with 4 stages (up to the 225 KB
# shared-memory limit: it holds two slots per consumer): M=64 18.9-19.1 vs 19.6 us and 17.2 vs
# 18.5; two K tiles per step from ONE_CONSUMER_MAX_M + 1 to K_PER_STEP_MAX_M rows without split-K
# (M=8 N=14336: 14.9-15.0 vs 15.4-15.5 us with x_convert=2; with split-K (N=4096) it measured
# +0.2 us, and at M=1 N=14336 (one consumer, 224 CTAs) 17.8 vs 14.7 us in W4).
X_IN_KERNEL_MAX_M = 32
X_FUSION_MIN_M = 17   # between the measured M=8 (in the kernel) and M=32 (fusion); 9..31 unmeasured
K_PER_STEP_MAX_M = 8
X_CONVERT = 2
ONE_CONSUMER_MAX_M = 4
NO_AUTO_BARRIERS = True
PDL = 0   # MgpuTiling.pdl of the default tiling (pdl=1/2 measured slower, 3 no faster)
# Eighth session (W3/W4, GPU time per GEMM, float64-checked): a record's dequantization and
# wgmmas in two K parts (the tensor core starts on the first half while the ALU converts the
# second): M=1 14.08-14.37 vs 14.42-14.53 us (N=14336), 16.17 vs 17.06 (N=4096); M=8 14.65-14.74
# vs 14.92-14.95 / 15.96 vs 16.02; M=32 17.55 vs 18.16 / 18.95 vs 18.81; M=64 20.52 vs 20.72 /
# 21.55 vs 21.89. Four parts: no better.
MMA_PARTS = 2
_PAIRS_MIN_STAGES = 4   # overlap_pairs: one step in flight, one dequantized, two loading


def default_tiling(m: int, n: int, k: int, num_sms: int = 132, **overrides) -> MgpuTiling:
  """Two consumer warpgroups of one strip each (128 rows per CTA; one consumer for M <=
  ONE_CONSUMER_MAX_M or a single-strip N); split K until the CTAs cover the SMs (each split
  keeping >= 4 K tiles); x converted in the kernel (x_convert=2) up to X_IN_KERNEL_MAX_M rows,
  except from X_FUSION_MIN_M rows without split-K, where x comes from the XLA fusion; overlap_pairs
  wherever x comes from the fusion above K_PER_STEP_MAX_M rows; two K tiles per step from
  ONE_CONSUMER_MAX_M + 1 to K_PER_STEP_MAX_M rows without split-K; records in MMA_PARTS K parts;
  as many stages as fit 200 KB of shared memory (2..8; at least 4 under the hardware limit with
  overlap_pairs). ``overrides`` replace fields; the split
  and the stages are recomputed for overridden consumers / strips unless given too."""
  mp = padded_m(m)
  n_strips = -(-n // STRIP)
  consumers = overrides.pop("consumers", 2 if n_strips >= 2 and m > ONE_CONSUMER_MAX_M else 1)
  strips = overrides.pop("strips", 1)
  inter = overrides.pop("k_interleave", False)
  x_in = overrides.pop("x_in_kernel", None)
  nab = overrides.pop("no_auto_barriers", NO_AUTO_BARRIERS)
  pdl = overrides.pop("pdl", PDL)
  stream_k = overrides.pop("stream_k", 0)
  split_combine = overrides.pop("split_combine", "xla")
  tile_major = overrides.pop("tile_major", False)
  overlap_pairs = overrides.pop("overlap_pairs", None)
  x_convert = overrides.pop("x_convert", X_CONVERT)
  kps = overrides.pop("k_per_step", None)
  x_multicast = overrides.pop("x_multicast", False)
  probe = overrides.pop("probe", "")
  mma_parts = overrides.pop("mma_parts", MMA_PARTS)
  split_acc = overrides.pop("split_acc", False)
  ctas = -(-n_strips // (strips if inter else consumers * strips))
  tiles = -(-k // TILE_K)
  split = 1
  while ctas * split * 2 <= num_sms and tiles % (split * 2) == 0 and tiles // (split * 2) >= 4:
    split *= 2
  split = overrides.pop("split_k", split)
  if x_in is None:
    x_in = (not x_multicast and m <= X_IN_KERNEL_MAX_M
            and (m < X_FUSION_MIN_M or (split > 1 and not stream_k)))
  if overlap_pairs is None:
    overlap_pairs = (m > K_PER_STEP_MAX_M and not x_in
                     and not (inter or stream_k))
  if kps is None:
    kps = 2 if (ONE_CONSUMER_MAX_M < m <= K_PER_STEP_MAX_M and split == 1
                and not (inter or stream_k or tile_major)) else 1
  if (tiles // split) % kps:           # an odd number of K tiles per CTA: one per step
    kps = 1
  t = MgpuTiling(consumers=consumers, strips=strips, stages=consumers if inter else 1,
                 split_k=split, k_interleave=inter, x_in_kernel=x_in,
                 no_auto_barriers=nab, pdl=pdl, stream_k=stream_k,
                 split_combine=split_combine, tile_major=tile_major,
                 overlap_pairs=overlap_pairs, x_convert=x_convert, k_per_step=kps,
                 x_multicast=x_multicast, mma_parts=mma_parts, split_acc=split_acc,
                 probe=probe)
  stages = 8 - 8 % consumers if inter else 8
  step = consumers if inter else 1

  def fits(st, budget):
    return smem_bytes(dataclasses.replace(t, stages=st), mp) <= budget
  while stages - step >= max(2, step) and not fits(stages, 200 * 1024):
    stages -= step
  if overlap_pairs and stages < _PAIRS_MIN_STAGES and fits(_PAIRS_MIN_STAGES, _SMEM_LIMIT):
    stages = _PAIRS_MIN_STAGES
  t = dataclasses.replace(t, stages=overrides.pop("stages", stages))
  if overrides:
    raise TypeError(f"unknown MgpuTiling fields {sorted(overrides)}")
  return t


# ----- weight layout -----

# _BIT_POS[s][e] = word bit positions of (m, e0, e1, sign) of element (slot s, lane e): the bits
# each slot's PTX (_DEQ_PTX) moves to 9, 10, 11 and 15 of half e.
_BIT_POS = (((9, 10, 11, 15), (25, 26, 27, 31)),
            ((12, 13, 14, 18), (28, 29, 30, 2)),
            ((3, 4, 5, 16), (19, 20, 21, 0)),
            ((6, 7, 8, 17), (22, 23, 24, 1)))


def _pack_word(nib: jax.Array) -> jax.Array:
  """E2M1 codes [..., 4 (slot), 2 (lane)] (uint8) -> uint32 words [...] per _BIT_POS."""
  n = nib.astype(jnp.uint32)
  w = jnp.zeros(nib.shape[:-2], jnp.uint32)
  for s_, lanes in enumerate(_BIT_POS):
    for e, pos in enumerate(lanes):
      for b, p in enumerate(pos):
        w = w | (((n[..., s_, e] >> b) & 1) << p)
  return w


def _unpack_word(w: jax.Array) -> jax.Array:
  """Inverse of _pack_word: uint32 [...] -> codes uint8 [..., 4, 2]."""
  w = w.astype(jnp.uint32)
  out = []
  for lanes in _BIT_POS:
    row = []
    for pos in lanes:
      c = jnp.zeros(w.shape, jnp.uint32)
      for b, p in enumerate(pos):
        c = c | (((w >> p) & 1) << b)
      row.append(c)
    out.append(jnp.stack(row, axis=-1))
  return jnp.stack(out, axis=-2).astype(jnp.uint8)


def _pad_to(a: jax.Array, axis: int, size: int) -> jax.Array:
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad) if size != a.shape[axis] else a


def to_mgpu_layout(packed: jax.Array, scale: jax.Array) -> jax.Array:
  """ModelOpt NVFP4 bytes [N, K/2] + E4M3 scales [N, K/16] -> uint32 [ceil(N/64), ceil(K/256),
  72, 32] (see the module docstring; padding has zero codes and zero scales)."""
  nvfp4.check_layout(packed, scale)
  n, k = packed.shape[0], packed.shape[1] * 2
  s_n, t_k = -(-n // STRIP), -(-k // TILE_K)
  codes = nvfp4.unpack_nibbles(packed).astype(jnp.uint8)                      # [N, K]
  codes = _pad_to(_pad_to(codes, 0, s_n * STRIP), 1, t_k * TILE_K)
  # source dims: row = (S, w, h, r), k = (T, q, g_hi, g_lo, jb, s, e)
  c = codes.reshape(s_n, 4, 2, 8, t_k, 4, 2, 2, 2, 4, 2)
  #  0:S 1:w 2:h 3:r 4:T 5:q 6:g_hi 7:g_lo 8:jb 9:s 10:e
  # target words: [S, T, c=(h, g_hi), t=(w, r, q), v=(g_lo, jb)] of (slot s, lane e)
  c = c.transpose(0, 4, 2, 6, 1, 3, 5, 7, 8, 9, 10)
  words = _pack_word(c).reshape(s_n, t_k, 2048)
  codes_bytes = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(s_n, t_k, 8192)
  sc = jax.lax.bitcast_convert_type(scale, jnp.uint8)                          # [N, K/16]
  sc = _pad_to(_pad_to(sc, 0, s_n * STRIP), 1, t_k * (TILE_K // 16))
  # source dims: row = (S, w, h, r), group = (T, q, g); target [S, T, t=(w, r, q), (h, g)]
  sc = sc.reshape(s_n, 4, 2, 8, t_k, 4, 4).transpose(0, 4, 1, 3, 5, 2, 6)
  record = jnp.concatenate([codes_bytes, sc.reshape(s_n, t_k, 1024)], axis=-1)
  return jax.lax.bitcast_convert_type(record.reshape(s_n, t_k, RECORD_WORDS, 4),
                                      jnp.uint32).reshape(s_n, t_k, 72, 32)


def to_tile_major(w: jax.Array) -> jax.Array:
  """to_mgpu_layout's uint32 [N/64, K/256, 72, 32] -> [K/256, N/64, 72, 32] (for
  MgpuTiling.tile_major; a one-time copy)."""
  return jnp.swapaxes(w, 0, 1)


def _record_bytes(w: jax.Array) -> jax.Array:
  """uint32 [..., 72, 32] -> uint8 [..., 9216] (little-endian)."""
  return jax.lax.bitcast_convert_type(w, jnp.uint8).reshape(*w.shape[:-2], RECORD_WORDS * 4)


def from_mgpu_layout(w: jax.Array, n: int, k: int) -> tuple[jax.Array, jax.Array]:
  """Inverse of to_mgpu_layout: -> (packed uint8 [N, K/2], scale float8_e4m3fn [N, K/16])."""
  s_n, t_k = w.shape[:2]
  rec = _record_bytes(w)
  words = jax.lax.bitcast_convert_type(rec[..., :8192].reshape(s_n, t_k, 2048, 4), jnp.uint32)
  c = _unpack_word(words.reshape(s_n, t_k, 2, 2, 4, 8, 4, 2, 2))
  # [S, T, h, g_hi, w, r, q, g_lo, jb, s, e] -> (S, w, h, r, T, q, g_hi, g_lo, jb, s, e)
  c = c.transpose(0, 4, 2, 5, 1, 6, 3, 7, 8, 9, 10).reshape(s_n * STRIP, t_k * TILE_K)
  packed = nvfp4.pack_nibbles(c[:n, :k])
  sc = rec[..., 8192:].reshape(s_n, t_k, 4, 8, 4, 2, 4)      # [S, T, w, r, q, h, g]
  sc = sc.transpose(0, 2, 5, 3, 1, 4, 6).reshape(s_n * STRIP, t_k * 16)
  return packed, jax.lax.bitcast_convert_type(sc[:n, :k // 16], jnp.float8_e4m3fn)


def x_for_mgpu(x: jax.Array, k_pad: int) -> jax.Array:
  """x [M, K] -> f16 [Mp, k_pad]: rows padded to Mp = padded_m(M), K zero-padded to k_pad (a
  multiple of 256), columns of each 256-wide K tile in the kernel's order (column
  p = 8 j + 2 q + e holds k = 64 q + 2 j + e). One XLA fusion."""
  m, k = x.shape
  xp = jnp.pad(x.astype(jnp.float16), ((0, padded_m(m) - m), (0, k_pad - k)))
  t = k_pad // TILE_K
  return xp.reshape(-1, t, 4, 32, 2).transpose(0, 1, 3, 2, 4).reshape(-1, k_pad)


def dequant_record(rec_words: jax.Array) -> jax.Array:
  """One weight record uint32 [72, 32] -> f16 [64, 256]: the strip's K tile as the wgmma sees it
  (columns in the kernel's permuted order), equal to value * scale * 2^-14 exactly. The jnp twin
  of the in-register PTX dequantization."""
  b = jax.lax.bitcast_convert_type(rec_words, jnp.uint8).reshape(RECORD_WORDS * 4)
  words = rec_words.reshape(RECORD_WORDS)[:2048].reshape(2, 2, 4, 8, 4, 2, 2)
  codes = _unpack_word(words)          # [h, g_hi, w, r, q, g_lo, jb, s, e]
  # -> [w, h, r, g_hi, g_lo, jb, s, q, e] = rows (w, h, r), columns p = (j, q, e)
  codes = codes.transpose(2, 0, 3, 1, 5, 6, 7, 4, 8).reshape(STRIP, TILE_K)
  mag = (codes & 7).astype(jnp.uint16) << 9
  sign = (codes & 8).astype(jnp.uint16) << 12
  val = jax.lax.bitcast_convert_type(mag | sign, jnp.float16)          # value * 2^-14
  sc = jax.lax.bitcast_convert_type(b[8192:], jnp.float8_e4m3fn).astype(jnp.float16)
  sc = sc.reshape(4, 8, 4, 2, 4).transpose(0, 3, 1, 4, 2)              # [w, h, r, g, q]
  sc = jnp.broadcast_to(sc.reshape(4, 2, 8, 4, 1, 4, 1),
                        (4, 2, 8, 4, 8, 4, 2)).reshape(STRIP, TILE_K)  # (j = 8 g + ., q, e)
  return val * sc


# ----- in-register dequantization (GPU) -----

def _deq_word_ptx() -> str:
  """$0..$3: the 4 f16x2 of nibble slots 0..3 of word $4 (bits per _BIT_POS), times the splat
  scale $5."""
  return "\n".join([
      "{", ".reg .b32 t, u;",
      "and.b32 t, $4, 0x8E008E00;", "mul.rn.f16x2 $0, t, $5;",
      "shf.r.wrap.b32 t, $4, $4, 3;", "and.b32 t, t, 0x8E008E00;", "mul.rn.f16x2 $1, t, $5;",
      "shl.b32 t, $4, 6;", "and.b32 t, t, 0x0E000E00;", "shf.r.wrap.b32 u, $4, $4, 1;",
      "and.b32 u, u, 0x80008000;", "or.b32 t, t, u;", "mul.rn.f16x2 $2, t, $5;",
      "shl.b32 t, $4, 3;", "and.b32 t, t, 0x0E000E00;", "shf.r.wrap.b32 u, $4, $4, 2;",
      "and.b32 u, u, 0x80008000;", "or.b32 t, t, u;", "mul.rn.f16x2 $3, t, $5;", "}"])


# $0..$3: splat f16 pairs of the 4 E4M3 scale bytes of word $4 (byte i -> ($i, $i)).
_SCALE_PTX = "\n".join([
    "{", ".reg .b16 lo, hi;", ".reg .b32 a, b;", "mov.b32 {lo, hi}, $4;",
    "cvt.rn.f16x2.e4m3x2 a, lo;", "cvt.rn.f16x2.e4m3x2 b, hi;",
    "prmt.b32 $0, a, a, 0x1010;", "prmt.b32 $1, a, a, 0x3232;",
    "prmt.b32 $2, b, b, 0x1010;", "prmt.b32 $3, b, b, 0x3232;", "}"])
_DEQ_PTX = _deq_word_ptx()


def _dequant_regs(codes, scales, part: int = 0, parts: int = 1):
  """codes: uint32 [64, 32] (WG_STRIDED, 4 words per register), scales: uint32 [8, 32]
  (WG_STRIDED, 2 words) of one record -> f16 [64, 256 / parts]: fragment columns [256 part / parts,
  256 (part + 1) / parts) in the WGMMA layout (registers filled straight from the PTX results:
  register (j, h) = fragment columns 8 j + 2 q + (0, 1) of row half h). Part p uses only the
  words of its scale groups g (4 / parts of them)."""
  from jax._src.lib.mlir import ir                           # noqa: PLC0415
  from jax._src.lib.mlir.dialects import vector              # noqa: PLC0415
  from jax.experimental import mosaic as _mosaic             # noqa: PLC0415,F401
  from jax.experimental.mosaic import gpu as mgpu            # noqa: PLC0415
  from jax.experimental.mosaic.gpu import fragmented_array as fa  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import utils as mu        # noqa: PLC0415

  i32 = ir.IntegerType.get_signless(32)
  f16x2 = ir.VectorType.get((2,), ir.F16Type.get())

  def scalars(reg, n):
    return [vector.extract(reg, [], [i]) for i in range(n)]

  words = [w for reg in codes.registers.flat for w in scalars(reg, 4)]        # u = 4 c + v
  sw = scalars(scales.registers.flat[0], 2)                                    # h = 0, 1
  splat = {}
  for h in range(2):
    for g, r in enumerate(mu.inline_ptx(_SCALE_PTX, sw[h], result_types=[i32] * 4)):
      splat[h, g] = r
  groups = 4 // parts
  regs = np.empty(fa.WGMMA_LAYOUT.registers_shape((STRIP, TILE_K // parts)), dtype=object)
  for u in range(16):
    h, g, jb = u // 8, (u // 2) % 4, u % 2
    if g // groups != part:
      continue
    outs = mu.inline_ptx(_DEQ_PTX, words[u], splat[h, g], result_types=[i32] * 4)
    for s, o in enumerate(outs):
      regs[0, 8 * (g % groups) + 4 * jb + s, 0, 0, h, 0, 0, 0, 0] = mu.bitcast(o, f16x2)
  return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)


def _load_record(rec_ref):
  """A record's code and scale words into registers (each thread: its 16 + 2 words)."""
  codes = plgpu.load(rec_ref.at[pl.ds(0, _CODE_ROWS)],
                     layout=plgpu.Layout.WG_STRIDED((_CODE_ROWS, 32), vec_size=4))
  scales = plgpu.load(rec_ref.at[pl.ds(_CODE_ROWS, 8)],
                      layout=plgpu.Layout.WG_STRIDED((8, 32), vec_size=2))
  return codes, scales


def _dequant_part(codes, scales, part: int = 0, parts: int = 1):
  fn = plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WG_STRIDED((_CODE_ROWS, 32), vec_size=4),
                 plgpu.Layout.WG_STRIDED((8, 32), vec_size=2)),
      return_type=plgpu.ShapeDtypeStruct((STRIP, TILE_K // parts), jnp.float16,
                                         layout=plgpu.Layout.WGMMA),
  )(lambda ctx, c, s: _dequant_regs(c, s, part, parts))
  return fn(codes, scales)


def _dequant_gpu(rec_ref):
  """A whole record -> f16 [64, 256] in the WGMMA layout (kernels/grouped_nvfp4_matmul_mgpu.py)."""
  return _dequant_part(*_load_record(rec_ref))



def wgmma_thread_origin():
  """(tid, row0, q2), i32 MLIR values, of this thread in its warpgroup's WGMMA accumulator layout
  (for use inside ``plgpu.inline_mgpu`` bodies): thread ``tid`` (0..127) holds, for each 64-row
  tile, rows ``row0 + 8 h`` (h = 0, 1) and columns ``q2 + 8 j + {0, 1}``."""
  from jax._src.lib.mlir import ir                              # noqa: PLC0415
  from jax._src.lib.mlir.dialects import arith                  # noqa: PLC0415
  from jax.experimental.mosaic.gpu import utils as mu           # noqa: PLC0415
  i32 = ir.IntegerType.get_signless(32)
  tid = arith.remui(mu.thread_idx(), mu.c(128, i32))
  lane = arith.remui(tid, mu.c(32, i32))
  row0 = arith.addi(arith.muli(arith.divui(tid, mu.c(32, i32)), mu.c(16, i32)),
                    arith.divui(lane, mu.c(4, i32)))
  q2 = arith.muli(arith.remui(lane, mu.c(4, i32)), mu.c(2, i32))
  return tid, row0, q2

def _store_transposed(acc, o_ref, m: int):
  """acc [64, Mp] (WGMMA layout) -> o_ref[m', r] = acc[r, m'] for m' < m (o_ref: [m, 64] view of
  the output), scattered element stores from registers."""
  mp = acc.shape[1]

  def body(ctx, a, ref):
    from jax._src.lib.mlir import ir                            # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, memref, vector  # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    index = ir.IndexType.get()
    i32 = ir.IntegerType.get_signless(32)
    _, row0, q2 = wgmma_thread_origin()
    for idx, reg in np.ndenumerate(a.registers):
      j, h = idx[1], idx[4]
      row = arith.index_cast(index, arith.addi(row0, mu.c(8 * h, i32)))
      for e in range(2):
        col32 = arith.addi(q2, mu.c(8 * j + e, i32))
        val = vector.extract(reg, [], [e])
        col = arith.index_cast(index, col32)
        if 8 * (j + 1) <= m:          # the whole column block is real rows of y
          memref.store(val, ref, [col, row])
        else:
          with mu.when(arith.cmpi(arith.CmpIPredicate.ult, col32, mu.c(m, i32))):
            memref.store(val, ref, [col, row])
    return ()

  del mp
  plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()), return_type=())(body)(
      acc, o_ref)


_ST_V2 = "{\n.reg .b64 a;\nadd.s64 a, $0, $1;\nst.global.v2.f32 [a], {$2, $3};\n}"
_LD_V2 = "{\n.reg .b64 a;\nadd.s64 a, $2, $3;\nld.global.cg.v2.f32 {$0, $1}, [a];\n}"
_ATOM_ADD = "{\n.reg .b64 a;\nadd.s64 a, $1, $2;\natom.acq_rel.gpu.global.add.u32 $0, [a], 1;\n}"
_ST_ZERO = ("{\n.reg .b64 a;\n.reg .b32 z;\nmov.b32 z, 0;\nadd.s64 a, $0, $1;\n"
            "st.relaxed.gpu.global.b32 [a], z;\n}")


def _streamk_fixup(items, m: int, slot_stride: int, max_contrib: int):
  """Combine of the row-block strips a CTA shares with others (GPU; stream-K and
  split_combine="kernel"). ``items``: (acc, own_ref, slot0_ref, cnt_ref, n_ref, o_ref) per strip:
  acc [64, Mp] f32 (WGMMA layout, already times the global scale) is this CTA's partial sum,
  own_ref its workspace slot (f32 [64 Mp]), slot0_ref the block's slot 0 (slots
  ``slot_stride`` f32 apart), cnt_ref the strip's 128 per-thread arrival counters, n_ref[0] the
  number of contributors (0: nothing to do for this item), o_ref the [m, 64] view of y.
  Phases, each over all items (so their latencies overlap): (1) thread t writes its Mp/2 values
  to own_ref (value pair q at f32 offset 2 (128 q + t): a warp writes 256 contiguous bytes);
  (2) it increments its counter cnt_ref[t] (atom.acq_rel.gpu: its stores are released with
  it); (3) the thread that saw n - 1 is the last: it acquires the others' values (thread t of
  every contributor wrote the same fragment positions), adds the n slots, resets its counter to
  0 and stores y[m', r] = sum[r, m'] for m' < m, cast to o_ref's dtype."""
  def body(ctx, *flat):
    from jax._src.lib.mlir import ir                            # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, memref, vector  # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    index = ir.IndexType.get()
    i32 = ir.IntegerType.get_signless(32)
    i64 = ir.IntegerType.get_signless(64)
    f32 = ir.F32Type.get()
    tid, row0, q2 = wgmma_thread_origin()
    tid64 = arith.extui(i64, tid)
    groups = [flat[i:i + 6] for i in range(0, len(flat), 6)]
    state = []
    for a, own, slot0, cnt, nref, ref in groups:          # (1) partial sums out
      regs = list(np.ndenumerate(a.registers))
      n = memref.load(nref, [mu.c(0, index)])
      valid = arith.cmpi(arith.CmpIPredicate.sgt, n, mu.c(0, i32))
      own_p = mu.memref_ptr(own)
      with mu.when(valid):
        for q, (_, reg) in enumerate(regs):
          v0, v1 = (vector.extract(reg, [], [e]) for e in range(2))
          off = arith.muli(arith.addi(tid64, mu.c(128 * q, i64)), mu.c(8, i64))
          mu.inline_ptx(_ST_V2, own_p, off, v0, v1, has_side_effects=True)
      state.append((regs, n, valid))
    lasts = []
    for (a, own, slot0, cnt, nref, ref), (regs, n, valid) in zip(groups, state):   # (2) arrive
      cnt_p = mu.memref_ptr(cnt)
      coff = arith.muli(tid64, mu.c(4, i64))
      # invalid items count on their own (never read) counters: no branch around a result
      old = mu.inline_ptx(_ATOM_ADD, cnt_p, coff, result_types=i32, has_side_effects=True)
      last = arith.andi(valid, arith.cmpi(arith.CmpIPredicate.eq, old,
                                          arith.subi(n, mu.c(1, i32))))
      lasts.append((last, cnt_p, coff))
    for (a, own, slot0, cnt, nref, ref), (regs, n, valid), (last, cnt_p, coff) in zip(
        groups, state, lasts):                                                     # (3) combine
      out_ty = ir.MemRefType(ref.type).element_type
      with mu.when(last):
        mu.inline_ptx(_ST_ZERO, cnt_p, coff, has_side_effects=True)
        zero = mu.c(0.0, f32)
        sums = [[zero, zero] for _ in regs]
        p0 = mu.memref_ptr(slot0)
        for r in range(max_contrib):
          ok = arith.cmpi(arith.CmpIPredicate.slt, mu.c(r, i32), n)
          for q in range(len(regs)):
            o = arith.addi(arith.muli(arith.addi(tid64, mu.c(128 * q, i64)), mu.c(8, i64)),
                           mu.c(4 * r * slot_stride, i64))
            vals = mu.inline_ptx(_LD_V2, p0, o, result_types=[f32, f32], has_side_effects=True)
            for e in range(2):
              sums[q][e] = arith.addf(sums[q][e], arith.select(ok, vals[e], zero))
        for q, (idx, _) in enumerate(regs):
          j, h = idx[1], idx[4]
          row = arith.index_cast(index, arith.addi(row0, mu.c(8 * h, i32)))
          for e in range(2):
            col32 = arith.addi(q2, mu.c(8 * j + e, i32))
            val = sums[q][e]
            if out_ty != f32:
              val = arith.truncf(out_ty, val)
            col = arith.index_cast(index, col32)
            if 8 * (j + 1) <= m:
              memref.store(val, ref, [col, row])
            else:
              with mu.when(arith.cmpi(arith.CmpIPredicate.ult, col32, mu.c(m, i32))):
                memref.store(val, ref, [col, row])
    return ()

  flat = [v for item in items for v in item]
  types = (plgpu.Layout.WGMMA,) + (plgpu.RefType(),) * 5
  plgpu.inline_mgpu(arg_types=types * len(items), return_type=())(body)(*flat)


_LD_PEER_V2 = ("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, $2, $3;\n"
               "ld.shared::cluster.v2.f32 {$0, $1}, [ra];\n}")


def _cluster_peer_sum(acc, red_ref, peers: int):
  """acc [64, Mp] f32 (WGMMA layout) plus the same fragment positions of ``red_ref`` (this CTA's
  shared f32 [64, Mp], row-major) in cluster blocks 1 .. peers-1, read through distributed
  shared memory (mapa + ld.shared::cluster)."""
  def body(ctx, a, ref):
    from jax._src.lib.mlir import ir                            # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, llvm, vector  # noqa: PLC0415
    from jax.experimental import mosaic as _mosaic             # noqa: PLC0415,F401
    from jax.experimental.mosaic import gpu as mgpu            # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    i32 = ir.IntegerType.get_signless(32)
    f32 = ir.F32Type.get()
    mp = ir.MemRefType(ref.type).shape[1]
    _, row0, q2 = wgmma_thread_origin()
    base = llvm.ptrtoint(i32, mu.memref_ptr(ref))
    regs = np.empty(a.registers.shape, dtype=object)
    for idx, reg in np.ndenumerate(a.registers):
      j, h = idx[1], idx[4]
      row = arith.addi(row0, mu.c(8 * h, i32))
      col = arith.addi(q2, mu.c(8 * j, i32))
      addr = arith.addi(base, arith.muli(arith.addi(arith.muli(row, mu.c(mp, i32)), col),
                                         mu.c(4, i32)))
      v = [vector.extract(reg, [], [e]) for e in range(2)]
      for p in range(1, peers):
        got = mu.inline_ptx(_LD_PEER_V2, addr, mu.c(p, i32), result_types=[f32, f32],
                            has_side_effects=True)
        v = [arith.addf(v[e], got[e]) for e in range(2)]
      out = vector.broadcast(ir.VectorType.get((2,), f32), v[0])
      regs[idx] = vector.insert(v[1], out, [], [1])
    return mgpu.FragmentedArray(_registers=regs, _layout=a.layout, _is_signed=None)

  return plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct(acc.shape, jnp.float32, layout=plgpu.Layout.WGMMA),
  )(body)(acc, red_ref)


def _fence_cluster():
  """fence.acq_rel.cluster (orders this thread's shared-memory writes / reads against the cluster
  barrier's arrive / wait, which alone are CTA-scoped)."""
  def body(ctx):
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    mu.inline_ptx("fence.acq_rel.cluster;", has_side_effects=True)
    return ()

  plgpu.inline_mgpu(arg_types=(), return_type=())(body)()


def _keep_alive(a):
  """An empty inline asm reading every register of the WGMMA-layout f16 array ``a`` (has side
  effects: neither removed nor moved across the wgmma_wait before it)."""
  def body(ctx, arr):
    from jax._src.lib.mlir import ir                            # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    i32 = ir.IntegerType.get_signless(32)
    regs = [mu.bitcast(r, i32) for r in arr.registers.flat]
    for c0 in range(0, len(regs), 16):
      chunk = regs[c0:c0 + 16]
      mu.inline_ptx("// keep " + " ".join(f"${i}" for i in range(len(chunk))), *chunk,
                    has_side_effects=True)
    return ()

  plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=())(body)(a)


def _permute_x_tile(x: jax.Array) -> jax.Array:
  """[rows, 256] in natural K order -> the kernel's column order (x_for_mgpu's permutation)."""
  return x.reshape(x.shape[0], 4, 32, 2).transpose(0, 2, 1, 3).reshape(x.shape[0], TILE_K)


# bf16 pair -> f16 pair (both through f32: exact widening, one rounding): $0 = f16x2, $1 = bf16x2
_BF16X2_TO_F16X2 = ("{\n.reg .b32 lo, hi;\nshl.b32 lo, $1, 16;\nand.b32 hi, $1, 0xFFFF0000;\n"
                    "cvt.rn.f16x2.f32 $0, hi, lo;\n}")


def _convert_x_units(raw_ref, dst_ref, m: int, mp: int, x_transforms, units_per_row: int,
                     unit):
  """The producer warpgroup's x conversion, raw [m, 256] (bf16 or f16, natural K order, plain
  shared memory) -> dst [Mp, 256] f16 in the kernel's K order, 128-byte swizzled (8 x 64 tiles),
  rows >= m untouched: m * units_per_row units spread over the 128 threads (the last round
  guarded); ``unit(raw, dst, u, types)`` emits the conversion of unit u (an i32 MLIR value),
  types = the MLIR (index, i32, f16, raw element) types."""
  def body(ctx, raw, dst):
    from jax._src.lib.mlir import ir                            # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith                # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    i32 = ir.IntegerType.get_signless(32)
    types = (ir.IndexType.get(), i32, ir.F16Type.get(), ir.MemRefType(raw.type).element_type)
    if list(ir.MemRefType(dst.type).shape) != [mp // 8, TILE_K // 64, 8, 64]:
      raise NotImplementedError(f"unexpected x tile memref {dst.type}")
    tid = arith.remui(mu.thread_idx(), mu.c(128, i32))
    units = m * units_per_row
    for it in range(-(-units // 128)):
      u = arith.addi(tid, mu.c(it * 128, i32))
      if (it + 1) * 128 <= units:
        unit(raw, dst, u, types)
      else:
        with mu.when(arith.cmpi(arith.CmpIPredicate.ult, u, mu.c(units, i32))):
          unit(raw, dst, u, types)
    return ()

  plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(transforms=x_transforms)),
                    return_type=())(body)(raw_ref, dst_ref)


def _convert_x_gpu(raw_ref, dst_ref, m: int, mp: int, x_transforms):
  """_convert_x_units with 16 units per row: a unit = (row, q, jg), 16 consecutive source
  elements k = 64 q + 16 jg + (0..15) -> 8 f16 pairs at the fragment columns p = 64 jg + 8 i + 2 q
  (i = 0..7: chunk i of tile jg)."""
  def unit(raw, dst, u, types):
    from jax._src.lib.mlir import ir                            # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, vector        # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    index, i32, f16, src_ty = types
    q = arith.remui(u, mu.c(4, i32))
    jg = arith.remui(arith.divui(u, mu.c(4, i32)), mu.c(4, i32))
    row = arith.divui(u, mu.c(16, i32))
    col = arith.addi(arith.muli(q, mu.c(64, i32)), arith.muli(jg, mu.c(16, i32)))
    words = []
    for half in range(2):
      v = vector.load(ir.VectorType.get((8,), src_ty), raw,
                      [arith.index_cast(index, row),
                       arith.index_cast(index, arith.addi(col, mu.c(8 * half, i32)))])
      v = vector.bitcast(ir.VectorType.get((4,), i32), v)
      words += [vector.extract(v, [], [i]) for i in range(4)]
    r8 = arith.remui(row, mu.c(8, i32))
    tr = arith.index_cast(index, arith.divui(row, mu.c(8, i32)))
    for i, w in enumerate(words):
      if src_ty != f16:
        w = mu.inline_ptx(_BF16X2_TO_F16X2, w, result_types=i32)
      chunk = arith.xori(r8, mu.c(i, i32))                     # 128-byte swizzle
      c = arith.addi(arith.muli(chunk, mu.c(8, i32)), arith.muli(q, mu.c(2, i32)))
      vector.store(mu.bitcast(w, ir.VectorType.get((2,), f16)), dst,
                   [tr, arith.index_cast(index, jg), arith.index_cast(index, r8),
                    arith.index_cast(index, c)])

  _convert_x_units(raw_ref, dst_ref, m, mp, x_transforms, 16, unit)


def _convert_x_rows_gpu(raw_ref, dst_ref, m: int, mp: int, x_transforms):
  """As _convert_x_gpu, with shared-memory-friendly access (MgpuTiling.x_convert=2): a warp
  converts one whole row; lane j reads the four 4-byte words k = 64 q + 2 j + (0, 1), q = 0..3
  (a warp's load touches 32 consecutive words: one wavefront, no bank conflict), converts them
  and writes them as one 16-byte chunk, fragment columns p = 8 j + 0..7 (tile j // 8, 128-byte
  swizzled chunk (j % 8) ^ (row % 8): a warp's store covers 4 tiles x 8 chunks, four wavefronts
  for 512 bytes, no conflict). _convert_x_gpu's 2 x 16-byte loads and 8 x 4-byte stores per 16
  elements hit 8-way / 4-way conflicts (48 vs 16 wavefronts per KB of x)."""
  def unit(raw, dst, u, types):
    from jax._src.lib.mlir import ir                            # noqa: PLC0415
    from jax._src.lib.mlir.dialects import arith, vector        # noqa: PLC0415
    from jax.experimental.mosaic.gpu import utils as mu         # noqa: PLC0415
    index, i32, f16, src_ty = types
    j = arith.remui(u, mu.c(32, i32))
    row = arith.divui(u, mu.c(32, i32))
    row_i = arith.index_cast(index, row)
    words = []
    for q in range(4):
      col = arith.addi(arith.muli(j, mu.c(2, i32)), mu.c(64 * q, i32))
      v = vector.load(ir.VectorType.get((2,), src_ty), raw,
                      [row_i, arith.index_cast(index, col)])
      w = vector.extract(vector.bitcast(ir.VectorType.get((1,), i32), v), [], [0])
      if src_ty != f16:
        w = mu.inline_ptx(_BF16X2_TO_F16X2, w, result_types=i32)
      words.append(w)
    vec = vector.broadcast(ir.VectorType.get((4,), i32), words[0])
    for q in range(1, 4):
      vec = vector.insert(words[q], vec, [], [q])
    r8 = arith.remui(row, mu.c(8, i32))
    chunk = arith.xori(arith.remui(j, mu.c(8, i32)), r8)             # 128-byte swizzle
    vector.store(vector.bitcast(ir.VectorType.get((8,), f16), vec), dst,
                 [arith.index_cast(index, arith.divui(row, mu.c(8, i32))),
                  arith.index_cast(index, arith.divui(j, mu.c(8, i32))),
                  arith.index_cast(index, r8),
                  arith.index_cast(index, arith.muli(chunk, mu.c(8, i32)))])

  _convert_x_units(raw_ref, dst_ref, m, mp, x_transforms, 32, unit)


# ----- the kernel -----

def _kernel(x_ref, w_ref, gs_ref, o_ref, scoped, *, m: int, mp: int, consumers: int,
            strips: int, stages: int, steps: int, split: int, k_interleave: bool,
            x_in_kernel: bool, x_transforms, interpret: bool,
            pdl: int = 0, plan: StreamKPlan | None = None, tab_ref=None, ws_ref=None,
            fused_split: bool = False, n_blocks: int = 0,
            tile_major: bool = False, cluster_split: bool = False, cl_scoped=None,
            overlap_pairs: bool = False, x_convert: int = 1, kps: int = 1,
            multicast: bool = False, probe: str = "", parts: int = 1,
            split_acc: bool = False):
  (w_smem, x_smem, red_smem, x_raw), (full, free, red_bar, raw_bar) = scoped
  wg = lax.axis_index("wg")
  cta_strips = strips if k_interleave else consumers * strips
  # x_multicast: the grid indexes clusters of two CTAs (neighbouring row blocks)
  cta = lax.axis_index("n") * 2 + lax.axis_index("c") if multicast else lax.axis_index("n")
  strip0 = cta * cta_strips
  sk = lax.axis_index("s")
  t0 = sk * steps
  if plan is not None:   # stream-K: this CTA's units [u0, u1), row block major
    u0 = lax.axis_index("n") * plan.units // plan.ctas
    u1 = (lax.axis_index("n") + 1) * plan.units // plan.ctas
    steps = plan.units // plan.ctas            # the fewest any CTA runs (static: prefetch)
    n_steps = u1 - u0
    tile_of = lambda i: lax.rem(u0 + i, plan.tiles)
    row_of = lambda i: lax.div(u0 + i, plan.tiles) * cta_strips
  else:
    n_steps = steps
    tile_of = lambda i: t0 + i
    row_of = lambda i: strip0

  # Register split as in kernels/mla_attention_mgpu.py, for the 3-warpgroup CTA only (its launch
  # allocation is 168 per thread: 2 x 128 x (232 - 168) = 128 x (168 - 40)); with 1 or 3+
  # consumers the compiler's own allocation stands (an increase below it would be undefined).
  rebalance = consumers == 2 and not interpret

  def x_cols(i, h=0):
    return pl.ds(pl.multiple_of((tile_of(i) * kps + h) * TILE_K, TILE_K), TILE_K)

  def kh(ref, h):
    """Sub-tile h of a step's shared-memory slot view (k_per_step > 1)."""
    return ref if kps == 1 else ref.at[h]

  def convert(i):
    """x_in_kernel: raw tile of step i -> the wgmma tile of its slot, then release that slot's
    x half of the `full` barrier."""
    r = lax.rem(i, jnp.int32(_X_RAW_SLOTS))
    slot = lax.rem(i, jnp.int32(stages))
    plgpu.barrier_wait(raw_bar.at[r])
    for h in range(kps):
      src, dst = kh(x_raw.at[r], h), kh(x_smem.at[slot], h)
      if interpret:
        dst[pl.ds(0, m)] = _permute_x_tile(src[...].astype(jnp.float16))
      else:
        (_convert_x_rows_gpu if x_convert == 2 else _convert_x_gpu)(
            src, dst, m, mp, x_transforms)
    plgpu.commit_smem()
    plgpu.barrier_arrive(full.at[slot])

  # (the interpreter runs the same load order, without the grid dependency instructions)
  if pdl in (2, 3) and not interpret:
    plgpu.griddepcontrol_launch_dependents()
  if pdl == 3 and not interpret:
    plgpu.griddepcontrol_wait()
  prefetch = min(stages, steps) if pdl in (1, 2) else 0

  def load_w(i):
    slot = lax.rem(i, jnp.int32(stages))
    if tile_major:
      src = w_ref.at[tile_of(i), pl.ds(row_of(i), cta_strips)]
    elif kps > 1:
      src = w_ref.at[pl.ds(row_of(i), cta_strips),
                     pl.ds(pl.multiple_of(tile_of(i) * kps, kps), kps)]
    else:
      src = w_ref.at[pl.ds(row_of(i), cta_strips), tile_of(i)]
    plgpu.copy_gmem_to_smem(src, w_smem.at[slot], full.at[slot])

  @pl.when(wg == consumers)
  def _producer():
    if rebalance:
      plgpu.set_max_registers(40, action="decrease")
    if prefetch:   # weight records first (no earlier kernel writes them), then wait for the grids
      for i in range(prefetch):   # before this one (x, and y's buffer) to complete
        load_w(jnp.int32(i))
      if not interpret:
        plgpu.griddepcontrol_wait()

    n_load = min(stages, n_steps) if probe == "compute" else n_steps

    @pl.loop(0, n_load)
    def _(i):
      slot = lax.rem(i, jnp.int32(stages))
      pl.when(i >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
      if prefetch:
        pl.when(i >= prefetch)(lambda: load_w(i))
      else:
        load_w(i)
      if x_in_kernel:
        # the raw tile of step i lands while step i-1's is converted (its slot was freed when
        # step i-2 was converted, one iteration ago)
        r = lax.rem(i, jnp.int32(_X_RAW_SLOTS))
        for h in range(kps):   # (a TMA box is <= 256 elements per dimension)
          plgpu.copy_gmem_to_smem(x_ref.at[:, x_cols(i, h)], kh(x_raw.at[r], h), raw_bar.at[r])
        pl.when(i >= 1)(lambda: convert(i - 1))
      else:
        for h in range(kps):
          plgpu.copy_gmem_to_smem(x_ref.at[:, x_cols(i, h)], kh(x_smem.at[slot], h),
                                  full.at[slot], collective_axes="c" if multicast else None)

    if x_in_kernel:
      convert(jnp.asarray(n_load - 1, jnp.int32))

    @pl.loop(jnp.maximum(n_load - stages, 0), n_load if probe != "compute" else 0)
    def _(i):   # observe the last releases too, so no barrier phase is left unobserved
      plgpu.barrier_wait(free.at[lax.rem(i, jnp.int32(stages))])

  gfac = gs_ref[0] * _GLOBAL_FACTOR
  # k_interleave: every consumer works on all the CTA's strips, consumer c on the K tiles
  # i = c, c + C, ... (so slot i % stages is always the same consumer's: stages % C == 0)
  first, stride = (wg, consumers) if k_interleave else (0, 1)
  my_steps = (steps - first + stride - 1) // stride
  strip_of = (lambda j: j) if k_interleave else (lambda j: wg * strips + j)

  def out_view(j):
    n0 = pl.multiple_of((strip0 + strip_of(j)) * STRIP, STRIP)
    return (o_ref.at[sk, :, pl.ds(n0, STRIP)] if split > 1 and not fused_split else
            o_ref.at[:, pl.ds(n0, STRIP)])

  def finish(accs, load):
    """k_interleave: consumers >= 1 hand their partial sums to consumer 0 through shared memory;
    the consumer(s) owning the strips store y."""
    if k_interleave and consumers > 1:
      @pl.when(wg > 0)
      def _():
        for j, acc in enumerate(accs):
          red_smem[wg - 1, j] = acc
        plgpu.commit_smem()
        plgpu.barrier_arrive(red_bar)

      @pl.when(wg == 0)
      def _():
        plgpu.barrier_wait(red_bar)
        total = list(accs)
        for c in range(1, consumers):
          for j in range(strips):
            total[j] = total[j] + load(red_smem.at[c - 1, j])
        store(total)
    else:
      store(accs)

  def store(accs):
    if cluster_split:   # split_combine="cluster": block 0 of the cluster adds its peers' sums
      red_cl, (ready, done) = cl_scoped
      vals = [acc * gfac for acc in accs]
      for j, val in enumerate(vals):
        red_cl[strip_of(j)] = val
      plgpu.commit_smem()
      if not interpret:
        _fence_cluster()
      plgpu.barrier_arrive(ready)

      @pl.when(sk == 0)
      def _():
        plgpu.barrier_wait(ready)
        if not interpret:
          _fence_cluster()
        total = list(vals)
        for j in range(len(total)):
          if interpret:
            for p in range(1, split):
              total[j] = total[j] + plgpu.cluster_ref(red_cl, {"s": p}).at[strip_of(j)][...]
          else:
            total[j] = _cluster_peer_sum(plgpu.layout_cast(total[j], plgpu.Layout.WGMMA),
                                         red_cl.at[strip_of(j)], split)
        for j, tot in enumerate(total):
          view = o_ref.at[:, pl.ds(pl.multiple_of((strip0 + strip_of(j)) * STRIP, STRIP),
                                   STRIP)]
          if interpret:
            view[...] = tot.T[:m].astype(o_ref.dtype)
          else:
            _store_transposed(plgpu.layout_cast(tot.astype(o_ref.dtype), plgpu.Layout.WGMMA),
                              view, m)

      pl.when(sk != 0)(lambda: plgpu.barrier_wait(ready))
      plgpu.barrier_arrive(done)     # block 0 after its reads: peers keep their memory till then
      plgpu.barrier_wait(done)
      return
    if fused_split:   # split_combine="kernel": the split CTAs of this row block combine here
      b = lax.axis_index("n")
      items = []
      for j, acc in enumerate(accs):
        st = strip_of(j)
        n0 = pl.multiple_of((strip0 + st) * STRIP, STRIP)
        if interpret:
          ws_ref[b, sk, st] = (acc * gfac).reshape(STRIP * mp)
        else:
          c0 = pl.multiple_of((b * cta_strips + st) * 128, 128)
          items.append((plgpu.layout_cast(acc * gfac, plgpu.Layout.WGMMA), ws_ref.at[b, sk, st],
                        ws_ref.at[b, 0, st], cnt.at[pl.ds(c0, 128)], tab_ref.at[pl.ds(b, 1)],
                        o_ref.at[:, pl.ds(n0, STRIP)]))
      if items:
        _streamk_fixup(items, m, cta_strips * STRIP * mp, split)
      return
    for j, acc in enumerate(accs):
      if interpret:
        out_view(j)[...] = (acc * gfac).T[:m].astype(o_ref.dtype)
      else:
        out = plgpu.layout_cast((acc * gfac).astype(o_ref.dtype), plgpu.Layout.WGMMA)
        _store_transposed(out, out_view(j), m)

  if plan is not None:
    n_blocks = plan.blocks
  cnt = (pl.get_global(plgpu.SemaphoreType.REGULAR(((n_blocks * cta_strips + 1) * 128,)))
         if (plan is not None or fused_split) and not interpret else None)

  def streamk_consumer():
    """Stream-K: the CTA's units cover up to plan.segments row blocks (segments may be empty:
    zero-trip loops); per block the accumulators restart; a block the CTA ran whole is stored at
    once, and the partial sums of the shared blocks (the first and the last segment) are
    combined together at the end (_streamk_fixup, its latencies overlapped; the interpreter
    writes them to workspace slots the wrapper adds), so no combine stalls the stream."""
    c = lax.axis_index("n")
    b_first = u0 // plan.tiles
    items, ws_items = [], []
    for seg in range(plan.segments):
      b = b_first + seg
      lo = jnp.maximum(u0, b * plan.tiles)
      hi = jnp.minimum(u1, (b + 1) * plan.tiles)
      nonempty = lo < hi
      whole = (lo == b * plan.tiles) & (hi == (b + 1) * plan.tiles)
      shared = nonempty & jnp.logical_not(whole)
      r = c - plan.cta_of(b * plan.tiles)
      bc = jnp.minimum(b, plan.blocks - 1)        # an empty last segment may lie past the end

      def view(j, b=bc):
        n0 = pl.multiple_of((b * cta_strips + strip_of(j)) * STRIP, STRIP)
        return o_ref.at[:, pl.ds(n0, STRIP)]

      if interpret:
        def step(i, accs):
          slot = lax.rem(i, jnp.int32(stages))
          plgpu.barrier_wait(full.at[slot])
          xt = x_smem[slot].astype(jnp.float32)
          new = [acc + jnp.dot(dequant_record(w_smem[slot, strip_of(j)]).astype(jnp.float32),
                               xt.T, precision=lax.Precision.HIGHEST)
                 for j, acc in enumerate(accs)]
          plgpu.barrier_arrive(free.at[slot])
          return tuple(new)
        accs = lax.fori_loop(lo - u0, jnp.maximum(hi, lo) - u0, step,
                             tuple(jnp.zeros((STRIP, mp), jnp.float32) for _ in range(strips)))
        for j, acc in enumerate(accs):
          val = acc * gfac
          pl.when(nonempty & whole)(lambda j=j, val=val, view=view: view(j).__setitem__(
              Ellipsis, val.T[:m].astype(o_ref.dtype)))
          pl.when(shared)(lambda j=j, val=val, bc=bc, r=r: ws_ref.__setitem__(
              (bc, r, strip_of(j)), val.reshape(STRIP * mp)))
        continue

      def run(acc_refs, lo=lo, hi=hi):
        @pl.loop(lo - u0, hi - u0)
        def _(i):
          slot = lax.rem(i, jnp.int32(stages))
          plgpu.barrier_wait(full.at[slot])
          for j in range(strips):
            mma((acc_refs[j],), w_smem.at[slot, strip_of(j)], x_smem.at[slot])
          plgpu.wgmma_wait(0)
          plgpu.barrier_arrive(free.at[slot])
        return [ref[...] for ref in acc_refs]

      accs = pl.run_scoped(lambda *refs, run=run: run(list(refs)),
                           *[plgpu.ACC((STRIP, mp), jnp.float32) for _ in range(strips)])
      for j, acc in enumerate(accs):
        val = acc * gfac

        @pl.when(nonempty & whole)
        def _(j=j, val=val, view=view):
          out = plgpu.layout_cast(val.astype(o_ref.dtype), plgpu.Layout.WGMMA)
          _store_transposed(out, view(j), m)

        st = strip_of(j)
        # not shared: the item points at the zero entry of the table and the spare counters
        c0 = pl.multiple_of(jnp.where(shared, bc * cta_strips + st, plan.blocks * cta_strips)
                            * 128, 128)
        items.append((plgpu.layout_cast(val, plgpu.Layout.WGMMA),
                      ws_ref.at[bc, jnp.clip(r, 0, plan.max_contrib - 1), st],
                      ws_ref.at[bc, 0, st], cnt.at[pl.ds(c0, 128)],
                      tab_ref.at[pl.ds(jnp.where(shared, bc, plan.blocks), 1)], view(j)))
    if items:
      _streamk_fixup(items, m, cta_strips * STRIP * mp, plan.max_contrib)

  def mma(accs, rec_ref, x_tile):
    """acc += dequant(record) @ x_tile^T as ``parts`` wgmma groups, one per K part, part p into
    accs[p % len(accs)] (the probes leave pieces out)."""
    if probe == "stream":
      return
    words = _load_record(rec_ref) if probe != "mma" else None
    width = TILE_K // parts
    for p in range(parts):
      if probe == "mma":
        a = plgpu.layout_cast(jnp.full((STRIP, width), 1.0, jnp.float16), plgpu.Layout.WGMMA)
      else:
        a = _dequant_part(*words, p, parts)
      if probe == "deq":
        _keep_alive(a)
      else:
        xv = x_tile if parts == 1 else x_tile.at[:, pl.ds(p * width, width)]
        plgpu.wgmma(accs[p % len(accs)], a, xv.T)

  @pl.when(wg < consumers)
  def _consumer():
    if plan is not None:
      if rebalance:
        plgpu.set_max_registers(232, action="increase")
      streamk_consumer()
      return
    if interpret:
      def step(ii, accs):
        i = first + ii * stride
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(full.at[slot])
        new = list(accs)
        for h in range(kps):
          xt = kh(x_smem.at[slot], h)[...].astype(jnp.float32)
          for j in range(len(new) if probe in ("", "mma") else 0):
            a = (jnp.ones((STRIP, TILE_K), jnp.float32) if probe == "mma" else
                 dequant_record(kh(w_smem.at[slot, strip_of(j)], h)[...]).astype(jnp.float32))
            new[j] = new[j] + jnp.dot(a, xt.T, precision=lax.Precision.HIGHEST)
        plgpu.barrier_arrive(free.at[slot])
        return tuple(new)
      accs = lax.fori_loop(0, my_steps, step,
                           tuple(jnp.zeros((STRIP, mp), jnp.float32) for _ in range(strips)))
      finish(accs, lambda ref: ref[...])
      return

    if rebalance:
      plgpu.set_max_registers(232, action="increase")

    n_acc = parts if split_acc else 1

    def acc_group(acc_refs, j):
      return acc_refs[j * n_acc:(j + 1) * n_acc] if n_acc > 1 else (acc_refs[j],)

    def collect(acc_refs):
      """Each strip's accumulator (the sum of its per-part accumulators with split_acc)."""
      vals = [r[...] for r in acc_refs]
      return [sum(vals[j * n_acc + 1:(j + 1) * n_acc], vals[j * n_acc]) for j in range(strips)]

    def run_pairs(acc_refs):
      """overlap_pairs: step ii's wgmmas are waited for after step ii+1's are issued; the loop
      body is two steps, so the two steps' A fragments are distinct PTX registers (a step's
      dequantization never writes registers an in-flight wgmma reads)."""
      def issue(ii):
        i = first + ii * stride
        slot = lax.rem(i, jnp.int32(stages))
        plgpu.barrier_wait(full.at[slot])
        for h in range(kps):
          for j in range(strips):
            mma(acc_group(acc_refs, j), kh(w_smem.at[slot, strip_of(j)], h),
                kh(x_smem.at[slot], h))
        plgpu.wgmma_wait(strips * kps * parts)   # step ii-1's groups (per strip, K tile, part)
        prev = lax.rem(i - stride + stages, jnp.int32(stages))
        pl.when(ii > 0)(lambda: plgpu.barrier_arrive(free.at[prev]))

      assert isinstance(my_steps, int), my_steps      # static without k_interleave

      @pl.loop(0, my_steps // 2)
      def _(pp):
        issue(2 * pp)
        issue(2 * pp + 1)

      if my_steps % 2:
        issue(jnp.int32(my_steps - 1))
      plgpu.wgmma_wait(0)
      if my_steps:
        plgpu.barrier_arrive(free.at[(first + (my_steps - 1) * stride) % stages])
      return collect(acc_refs)

    def run(acc_refs):
      if overlap_pairs:
        return run_pairs(acc_refs)

      @pl.loop(0, my_steps)
      def _(ii):
        i = first + ii * stride
        slot = lax.rem(i, jnp.int32(stages))
        if probe == "compute":   # the first `stages` records, loaded once, over and over
          pl.when(ii < stages)(lambda: plgpu.barrier_wait(full.at[slot]))
        else:
          plgpu.barrier_wait(full.at[slot])
        for h in range(kps):
          for j in range(strips):
            mma(acc_group(acc_refs, j), kh(w_smem.at[slot, strip_of(j)], h),
                kh(x_smem.at[slot], h))
        plgpu.wgmma_wait(0)
        if probe != "compute":
          plgpu.barrier_arrive(free.at[slot])

      return collect(acc_refs)

    accs = pl.run_scoped(lambda *refs: run(refs),
                         *[plgpu.ACC((STRIP, mp), jnp.float32) for _ in range(strips * n_acc)])
    finish(accs, lambda ref: plgpu.load(ref, layout=plgpu.Layout.WGMMA))


def _check(x, w, global_scale, n):
  if x.ndim != 2:
    raise ShapeError(f"x must be [M, K], got {x.shape}")
  if w.ndim != 4 or w.shape[2:] != (72, 32) or w.dtype != jnp.uint32:
    raise ShapeError(f"the weight must be to_mgpu_layout's uint32 [N/64, K/256, 72, 32], got "
                     f"{w.dtype}{list(w.shape)}")
  m, k = x.shape
  nvfp4.check_k(k)
  if -(-k // TILE_K) != w.shape[1]:
    raise ShapeError(f"x has K={k} but the weight holds {w.shape[1]} K tiles of {TILE_K}")
  if not 0 < n <= w.shape[0] * STRIP or -(-n // STRIP) != w.shape[0]:
    raise ShapeError(f"n={n} does not match the weight's {w.shape[0]} strips of {STRIP}")
  if m > 256:
    raise ShapeError(f"the Mosaic decode kernel takes M <= 256 rows (wgmma n), got {m}")
  if jnp.shape(global_scale) not in ((), (1,)):
    raise ShapeError(f"global_scale must be a scalar, got shape {jnp.shape(global_scale)}")
  if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ShapeError(f"x must be bf16, f16 or f32, got {x.dtype}")


@functools.partial(jax.jit, static_argnames=("n", "tiling", "interpret", "out_dtype"))
def w4a16_matmul_mgpu(x: jax.Array, w: jax.Array, global_scale: jax.Array, *, n: int,
                      tiling: MgpuTiling | None = None, interpret: bool = False,
                      out_dtype=None) -> jax.Array:
  """x [M, K] @ NVFP4 W [N, K]^T -> [M, N] (``out_dtype``, default x's) with W repacked by
  ``to_mgpu_layout`` (K a multiple of 16, any N; with ``tiling.tile_major`` the weight is
  ``to_tile_major``'s [K/256, N/64, 72, 32]). x is cast to f16 (|x| <= 65504) and K-permuted by
  one XLA fusion (``x_for_mgpu``) or, with ``x_in_kernel``, by the producer warpgroup."""
  t = tiling or default_tiling(x.shape[0], n, x.shape[1])
  _check(x, jnp.swapaxes(w, 0, 1) if t.tile_major else w, global_scale, n)
  if interpret and t.probe == "compute":
    raise ValueError("probe='compute' runs on the GPU only")
  m, k = x.shape
  s_n, t_k = w.shape[:2][::-1] if t.tile_major else w.shape[:2]
  mp = padded_m(m)
  rows = t.cta_strips
  split = t.split_k if t_k % t.split_k == 0 and not t.stream_k else 1
  if (t_k // split) % t.k_per_step:    # K tiles per step must divide the CTA's K tiles
    t = dataclasses.replace(t, k_per_step=1)
  kps = t.k_per_step
  out_dtype = out_dtype or x.dtype
  if t.x_in_kernel and x.dtype not in (jnp.bfloat16, jnp.float16):
    x = x.astype(jnp.float16)      # the same rounding x_for_mgpu does
  if smem_bytes(t, mp) > _SMEM_LIMIT:
    raise ShapeError(f"{t} needs {smem_bytes(t, mp)} bytes of shared memory at M={m}")
  # whole CTAs: pad the strips (zero records) to a multiple of the CTA's rows
  mc = t.x_multicast and not interpret     # (the interpreter: plain per-CTA x copies)
  ctas = -(-s_n // rows)
  if mc:
    ctas += ctas % 2
  if ctas * rows != s_n:
    pad = ((0, ctas * rows - s_n), (0, 0))
    w = jnp.pad(w, (pad[::-1] if t.tile_major else pad) + ((0, 0), (0, 0)))
  n_out = ctas * rows * STRIP
  x_in = t.x_in_kernel and k % TILE_K == 0
  xk = x if x_in else x_for_mgpu(x, t_k * TILE_K)
  gs = jnp.asarray(global_scale, jnp.float32).reshape(1)
  # the interpreter has no distributed shared memory: "cluster" runs the "kernel" combine there
  fused = split > 1 and (t.split_combine == "kernel" or
                         (t.split_combine == "cluster" and bool(interpret)))
  clustered = split > 1 and t.split_combine == "cluster" and not interpret
  out_shape = (jax.ShapeDtypeStruct((split, m, n_out), jnp.float32)
               if split > 1 and not (fused or clustered) else
               jax.ShapeDtypeStruct((m, n_out), out_dtype))
  plan = streamk_plan(ctas, t_k, t.stream_k) if t.stream_k else None
  if fused:   # the same combine as stream-K's, every row block shared by its split CTAs
    combine_plan = StreamKPlan(ctas * split, ctas, t_k, 1, split, (split,) * ctas)
  else:
    combine_plan = plan
  extra_in = ()
  if combine_plan is not None:   # outputs y and the f32 workspace; input: contributors per block
    out_shape = (out_shape, jax.ShapeDtypeStruct(
        (combine_plan.blocks, combine_plan.max_contrib, rows, STRIP * mp), jnp.float32))
    extra_in = (jnp.asarray(np.array(combine_plan.contrib + (0,), np.int32)),)
  x_transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  kernel = functools.partial(_kernel, m=m, mp=mp, consumers=t.consumers, strips=t.strips,
                             stages=t.stages, steps=t_k // split // kps, split=split,
                             k_interleave=t.k_interleave, x_in_kernel=x_in,
                             x_transforms=x_transforms, interpret=bool(interpret), pdl=t.pdl,
                             plan=plan, fused_split=fused, n_blocks=ctas,
                             tile_major=t.tile_major, cluster_split=clustered,
                             overlap_pairs=t.overlap_pairs, x_convert=t.x_convert, kps=kps,
                             multicast=mc, probe=t.probe, parts=t.mma_parts,
                             split_acc=t.split_acc)

  def entry(x_ref, w_ref, gs_ref, *refs):
    if combine_plan is not None:
      tab_ref, o_ref, ws_ref = refs
      body = functools.partial(kernel, tab_ref=tab_ref, ws_ref=ws_ref)
    else:
      (o_ref,) = refs
      body = kernel
    red = t.k_interleave and t.consumers > 1
    ks = () if kps == 1 else (kps,)
    smem = (plgpu.SMEM((t.stages, rows, *ks, 72, 32), jnp.uint32),
            plgpu.SMEM((t.stages, *ks, mp, TILE_K), jnp.float16, transforms=x_transforms),
            plgpu.SMEM((t.consumers - 1, t.strips, STRIP, mp), jnp.float32) if red else None,
            plgpu.SMEM((_X_RAW_SLOTS, *ks, m, TILE_K), x.dtype) if x_in else None)
    # full: the weight TMA + (the producer's conversion | one x TMA per K tile)
    bars = (plgpu.Barrier(num_arrivals=2 if x_in else 1 + kps, num_barriers=t.stages),
            (plgpu.ClusterBarrier(collective_axes=("c",), num_arrivals=t.consumers,
                                  num_barriers=t.stages) if mc else
             plgpu.Barrier(num_arrivals=1 if t.k_interleave else t.consumers,
                           num_barriers=t.stages)),
            plgpu.Barrier(num_arrivals=t.consumers - 1) if red else None,
            plgpu.Barrier(num_arrivals=kps, num_barriers=_X_RAW_SLOTS) if x_in else None)
    if clustered:
      cl = (plgpu.SMEM((rows, STRIP, mp), jnp.float32),
            (plgpu.ClusterBarrier(collective_axes=("s",), num_arrivals=t.consumers),
             plgpu.ClusterBarrier(collective_axes=("s",), num_arrivals=t.consumers)))
      pl.run_scoped(lambda *scoped: body(x_ref, w_ref, gs_ref, o_ref, scoped[:2],
                                         cl_scoped=scoped[2]), smem, bars, cl,
                    collective_axes="wg")
    else:
      pl.run_scoped(lambda *scoped: body(x_ref, w_ref, gs_ref, o_ref, scoped), smem, bars,
                    collective_axes="wg")

  if clustered:
    grid_kw = dict(grid=(ctas,), grid_names=("n",), cluster=(split,), cluster_names=("s",))
  elif mc:
    grid_kw = dict(grid=(ctas // 2, split), grid_names=("n", "s"), cluster=(2,),
                   cluster_names=("c",))
  else:
    grid_kw = dict(grid=(plan.ctas if plan else ctas, split), grid_names=("n", "s"))
  out = plgpu.kernel(
      entry, out_type=out_shape, **grid_kw,
      num_threads=t.consumers + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=0,
                                           unsafe_no_auto_barriers=t.no_auto_barriers),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(xk, w, gs, *extra_in)
  if combine_plan is not None:
    out, ws = out
    if interpret:   # the interpreter's combine: partial blocks are the sum of their slots
      out = _streamk_combine_interpret(out, ws, combine_plan, m, mp, rows)
  elif split > 1 and not clustered:
    out = out.sum(0).astype(out_dtype)
  return out[:, :n] if n_out != n else out


def _streamk_combine_interpret(y: jax.Array, ws: jax.Array, plan: StreamKPlan, m: int, mp: int,
                               rows: int) -> jax.Array:
  """y with every row block that several CTAs shared replaced by the sum of its workspace slots
  (ws f32 [blocks, max_contrib, rows, 64 Mp], each slot [64, Mp] row-major per strip)."""
  contrib = np.array(plan.contrib)
  used = np.arange(plan.max_contrib)[None, :] < contrib[:, None]          # [blocks, slots]
  tot = jnp.where(jnp.asarray(used)[:, :, None, None], ws, 0.0).sum(1)   # [blocks, rows, 64 Mp]
  tot = tot.reshape(plan.blocks * rows * STRIP, mp).T[:m].astype(y.dtype)
  shared = jnp.asarray(np.repeat(contrib > 1, rows * STRIP))
  return jnp.where(shared[None, :], tot, y)


def w4a16_reference_mgpu(x: jax.Array, w: jax.Array, global_scale: jax.Array, n: int
                         ) -> jax.Array:
  """Plain-JAX reference on the repacked weight (undoes the repack, f32 'highest' einsum)."""
  from kernels import nvfp4_matmul   # noqa: PLC0415
  packed, scale = from_mgpu_layout(w, n, x.shape[1])
  return nvfp4_matmul.w4a16_reference(x, packed, scale, global_scale)
