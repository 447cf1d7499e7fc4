"""The quantization formats' constants and grouping rules, defined once (csrc/formats.h is the C++ twin)."""

from __future__ import annotations

import math

import torch

NVFP4_GROUP = 16  # elements per NVFP4 scale group, along the input features
FP4_MAX = 6.0  # the largest FP4 (e2m1) magnitude
E4M3_MAX = 448.0  # the largest float8_e4m3fn magnitude, the range of an NVFP4 group scale
INT_GROUP_PER_ROW = -1  # the INT group_size that means one group per row

# c10::ScalarType codes of the INT scale dtypes: the ops' schemas take the scale dtype as an int.
SCALE_DTYPE_CODES = {torch.float16: 5, torch.float32: 6, torch.bfloat16: 15}


def nvfp4_num_groups(in_features: int) -> int:
    """NVFP4 groups per row: ceil(in_features / 16), the last one zero-padded."""
    return math.ceil(in_features / NVFP4_GROUP)


def int_num_groups(in_features: int, group_size: int) -> int:
    """Groups per row: one when group_size is -1 or exceeds the row (auto-round's rule)."""
    if group_size == INT_GROUP_PER_ROW or in_features < group_size:
        return 1
    return math.ceil(in_features / group_size)
