"""The quantization formats' constants and grouping rules, defined once (csrc/formats.h is the C++ twin)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NVFP4_GROUP = 16  # elements per NVFP4 scale group, along the input features
FP4_MAX = 6.0  # the largest FP4 (e2m1) magnitude
E4M3_MAX = 448.0  # the largest float8_e4m3fn magnitude, the range of an NVFP4 group scale
INT_GROUP_PER_ROW = -1  # the INT group_size that means one group per row
FP8_PER_TENSOR = 0  # the FP8 group_size that means one scale for the whole tensor
FP8_BLOCK = 128  # the FP8 group_size that means square weight blocks of this edge (FP8_BLOCK)
FP8_SCALE_MIN = 1.0 / (E4M3_MAX * 512.0)  # the FP8 scale floor (auto-round's, from vLLM)
MX_GROUP = 32  # elements per MX (MXFP4, MXFP8) group, which share one power-of-two scale
E8M0_EXP_MAX = 127  # |shared exponent| bound of an MX scale (e8m0, bias 127)

# c10::ScalarType codes of the INT scale dtypes: the ops' schemas take the scale dtype as an int.
SCALE_DTYPE_CODES = {torch.float16: 5, torch.float32: 6, torch.bfloat16: 15}


@dataclass(frozen=True)
class MxElement:
    """An MX element format (OCP MX spec): exponent bits, explicit mantissa bits, the
    smallest normal exponent, the largest normal exponent (emax) and the largest magnitude."""

    ebits: int
    mbits: int
    min_exp: int
    emax: int
    max_norm: float


MX_ELEMENTS = {  # by the scheme's bit width
    4: MxElement(ebits=2, mbits=1, min_exp=0, emax=2, max_norm=FP4_MAX),  # FP4 e2m1
    8: MxElement(ebits=4, mbits=3, min_exp=-6, emax=8, max_norm=E4M3_MAX),  # FP8 e4m3
}


def fp8_block_grid(rows: int, cols: int) -> tuple[int, int]:
    """FP8 128 x 128 weight blocks along (rows, cols), the last ones zero-padded."""
    return math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)


def mx_num_groups(in_features: int) -> int:
    """MX groups per row: ceil(in_features / 32)."""
    return math.ceil(in_features / MX_GROUP)


def nvfp4_num_groups(in_features: int) -> int:
    """NVFP4 groups per row: ceil(in_features / 16), the last one zero-padded."""
    return math.ceil(in_features / NVFP4_GROUP)


def int_num_groups(in_features: int, group_size: int) -> int:
    """Groups per row: one when group_size is -1 or exceeds the row (auto-round's rule)."""
    if group_size == INT_GROUP_PER_ROW or in_features < group_size:
        return 1
    return math.ceil(in_features / group_size)
