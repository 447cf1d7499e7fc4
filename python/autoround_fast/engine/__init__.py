"""The SignRound tuning engine: AutoRound for one decoder block, on autoround_fast's ops.

Data flows one way: the llm-compressor modifier (or the command line) hands a block and its
captured inputs to :func:`tune_block`; the engine calls the ops; the ops call the kernels.
docs/design.md says which module owns what.
"""

from .backends import SUPPORTED_BACKENDS, Backend, make_backend
from .block import BlockResult, tune_block
from .inputs import pack_samples, same_value
from .options import TuneOptions
from .spec import QuantSpec, fused_layer_groups

__all__ = ["QuantSpec", "TuneOptions", "BlockResult", "Backend", "make_backend", "tune_block",
           "pack_samples", "same_value", "fused_layer_groups", "SUPPORTED_BACKENDS"]
