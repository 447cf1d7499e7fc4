"""autoround_fast: AutoRound's tuning loop on fused NVFP4 / INT fake-quantization kernels."""

from .ops import has_cuda_kernels
from . import ops


def _import_llmcompressor_quietly():
    """Import llm-compressor with its logger off, then configure the logger as its own import
    does. On a machine without a GPU its import warns "No accelerator available! Compressing
    model on CPU instead" while it merely picks a constant's dtype, before anything is
    compressed: noise in every `import autoround_fast`, `--help` included. A user who set
    LLM_COMPRESSOR_LOG_DISABLED, or imported llm-compressor first, keeps their setting."""
    import os
    import sys

    if "llmcompressor" in sys.modules or "LLM_COMPRESSOR_LOG_DISABLED" in os.environ:
        import llmcompressor  # noqa: F401
        return
    os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = "true"
    try:
        import llmcompressor
    finally:
        del os.environ["LLM_COMPRESSOR_LOG_DISABLED"]
    llmcompressor.configure_logger(llmcompressor.LoggerConfig())


try:  # registers AutoRoundModifier(backend=...) with llm-compressor's ModifierFactory
    _import_llmcompressor_quietly()
    from .modifier import AutoRoundModifier
    from .moe_checkpoint import load_quantized
except ImportError as _err:  # the ops work without llm-compressor installed
    _IMPORT_ERROR = _err

    def __getattr__(name):
        if name in ("AutoRoundModifier", "load_quantized"):
            raise ImportError(f"autoround_fast.{name} needs llmcompressor: {_IMPORT_ERROR}")
        raise AttributeError(name)


__all__ = ["ops", "has_cuda_kernels", "AutoRoundModifier", "load_quantized"]
__version__ = "0.1.0"
