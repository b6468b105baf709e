"""Run NVFP4 decode GEMMs a few times inside a CUDA profiler range, for Nsight Compute.

  ncu --profile-from-start off --clock-control none --section ... \
      python3 experiments/profile_gemm.py --shapes=8x4096x14336,64x14336x4096

Each shape (MxKxN) is compiled and run once outside the range (so compilation, input generation
and quantization kernels are not profiled), then ``--calls`` times between cuProfilerStart and
cuProfilerStop: every kernel of those calls is profiled (the GEMM kernel and, with split-K, XLA's
reduction of the partials). ``--impl`` picks the kernel: ``kl`` (nvfp4_matmul.w4a16_matmul_kl
with its default tiling and ``--kl_tiling`` overrides), ``mgpu`` (the Mosaic GPU decode kernel,
nvfp4_matmul_mgpu, ``--mgpu_tiling`` overrides), ``xla`` (the bf16 dot, for reference).
"""
from __future__ import annotations

import ctypes
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from kernels import nvfp4_matmul as nk
from kernels import nvfp4_matmul_mgpu as mgk
from kernels.quant import nvfp4

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["8x4096x14336", "8x14336x4096", "64x4096x14336", "64x14336x4096"],
                  "MxKxN decode shapes")
flags.DEFINE_list("impls", ["kl"], "kl, mgpu, xla (each shape runs every impl)")
flags.DEFINE_list("kl_tiling", [], "--impls=kl: key=value overrides of nvfp4_matmul.default_kl_tiling")
flags.DEFINE_list("mgpu_tiling", [],
                  "--impls=mgpu: key=value overrides of nvfp4_matmul_mgpu.default_tiling "
                  "(e.g. consumers=2,x_in_kernel=1)")
flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU dry run; implies --no_range)")
flags.DEFINE_integer("calls", 2, "profiled calls per shape and impl")
flags.DEFINE_bool("no_range", False, "do not call cuProfilerStart/Stop (profile from start)")


class _ProfilerRange:
  """cuProfilerStart/Stop on device 0's primary context (the one XLA uses)."""

  def __init__(self, enabled: bool):
    self.enabled = enabled
    if not enabled:
      return
    self.cu = ctypes.CDLL("libcuda.so.1")
    self.ctx = ctypes.c_void_p()
    dev = ctypes.c_int()
    for call in (lambda: self.cu.cuInit(0), lambda: self.cu.cuDeviceGet(ctypes.byref(dev), 0),
                 lambda: self.cu.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev)):
      rc = call()
      if rc:
        raise RuntimeError(f"CUDA driver call failed: {rc}")

  def _call(self, name: str) -> None:
    if not self.enabled:
      return
    self.cu.cuCtxPushCurrent(self.ctx)
    rc = getattr(self.cu, name)()
    popped = ctypes.c_void_p()
    self.cu.cuCtxPopCurrent(ctypes.byref(popped))
    if rc:
      print(f"{name} returned {rc}", flush=True)

  def start(self) -> None:
    self._call("cuProfilerStart")

  def stop(self) -> None:
    self._call("cuProfilerStop")


def _overrides(items: list[str]) -> dict:
  """["block_n=64", "dequant=asm", "x_in_kernel=1"] -> {"block_n": 64, ...} (ints where they parse;
  0/1 stay ints, which the frozen configs accept for their bool fields)."""
  out = {}
  for item in items:
    key, _, val = item.partition("=")
    try:
      out[key] = int(val)
    except ValueError:
      out[key] = val
  return out


def _fn(impl: str, m: int, k: int, n: int):
  if impl == "kl":
    t = nk.default_kl_tiling(m, n, k, **_overrides(FLAGS.kl_tiling))
    print(f"M{m} K{k} N{n} kl tiling {t}", flush=True)
    return jax.jit(lambda x, p, s, g: nk.w4a16_matmul_kl(x, p, s, g, tiling=t,
                                                             interpret=FLAGS.interpret))
  if impl == "mgpu":
    t = mgk.default_tiling(m, n, k, **_overrides(FLAGS.mgpu_tiling))
    print(f"M{m} K{k} N{n} mgpu tiling {t}", flush=True)
    return jax.jit(lambda x, w, g: mgk.w4a16_matmul_mgpu(x, w, g, n=n, tiling=t,
                                                           interpret=FLAGS.interpret))
  raise ValueError(impl)


def main(argv):
  del argv
  rng = _ProfilerRange(not (FLAGS.no_range or FLAGS.interpret))
  for spec in FLAGS.shapes:
    m, k, n = (int(v) for v in spec.split("x"))
    kx, kw = jax.random.split(jax.random.key(m * 7 + k + n))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    for impl in FLAGS.impls:
      if impl == "xla":
        w = jax.random.normal(kw, (k, n), jnp.bfloat16)
        f, args = jax.jit(lambda x, w: x @ w), (x, w)
      else:
        p, s, g = nvfp4.quantize(jax.random.normal(kw, (n, k)))
        f = _fn(impl, m, k, n)
        args = ((x, nvfp4.to_kernel_layout(p), s, g) if impl == "kl" else
                (x, mgk.to_mgpu_layout(p, s), g))
      jax.block_until_ready(f(*args))
      jax.block_until_ready(f(*args))
      rng.start()
      t0 = time.perf_counter()
      for _ in range(FLAGS.calls):
        y = f(*args)
      jax.block_until_ready(y)
      rng.stop()
      print(f"M{m} K{k} N{n} {impl}: {FLAGS.calls} profiled calls, "
            f"{(time.perf_counter() - t0) * 1e3:.1f} ms wall", flush=True)


if __name__ == "__main__":
  app.run(main)
