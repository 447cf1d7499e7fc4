"""autoround_fast: AutoRound's tuning loop on fused NVFP4 / INT fake-quantization kernels."""

from .ops import has_cuda_kernels
from . import ops


try:  # registers AutoRoundModifier(backend=...) with llm-compressor's ModifierFactory
    from .modifier import AutoRoundModifier
except ImportError as _err:  # the ops work without llm-compressor installed
    _IMPORT_ERROR = _err

    def __getattr__(name):
        if name == "AutoRoundModifier":
            raise ImportError(f"autoround_fast.AutoRoundModifier needs llmcompressor: {_IMPORT_ERROR}")
        raise AttributeError(name)


__all__ = ["ops", "has_cuda_kernels", "AutoRoundModifier"]
__version__ = "0.1.0"
