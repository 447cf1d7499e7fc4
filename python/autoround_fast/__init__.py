"""autoround_fast: AutoRound's tuning loop on fused NVFP4 / INT fake-quantization kernels."""

from ._lib import has_cuda_kernels
from . import ops

__all__ = ["ops", "has_cuda_kernels"]
__version__ = "0.1.0"
