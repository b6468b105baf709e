"""CPU-only smoke check that Pallas Triton kernels lower to Triton IR for an H100 (no GPU needed).

Patches the GPU-info lookup so ``jax.jit(...).lower(lowering_platforms=("cuda",))`` runs here; this
catches Pallas->Triton lowering errors before spending device time. PTX compilation is not checked.
"""
from jax._src.pallas.triton import gpu_info as _gpu_info
from jax._src.pallas.triton import pallas_call_registration as _reg

_H100 = _gpu_info.get_gpu_info_from_version(_gpu_info.GpuVersion.H100)
_reg.gpu_info_lib.get_gpu_info = lambda: _H100


def lower_for_cuda(fn, *args):
  import jax
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
