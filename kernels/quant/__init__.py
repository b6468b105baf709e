"""Low-bit weight formats (NVFP4, FP8 block-scaled) and their weight pytrees."""
from kernels.quant.weights import (FP8BlockWeight, GroupedFP8BlockWeight, GroupedNVFP4Weight,
                                   NVFP4Weight)

__all__ = ["NVFP4Weight", "FP8BlockWeight", "GroupedNVFP4Weight", "GroupedFP8BlockWeight"]
