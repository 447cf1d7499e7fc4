"""How one Linear is quantized (QuantSpec), and which Linears inference fuses into one GEMM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..formats import (
    FP8_BLOCK,
    FP8_PER_TENSOR,
    INT_GROUP_PER_ROW,
    MX_ELEMENTS,
    MX_GROUP,
    NVFP4_GROUP,
    fp8_block_grid,
    int_num_groups,
    mx_num_groups,
    nvfp4_num_groups,
)

FP8_GROUPS = (FP8_PER_TENSOR, INT_GROUP_PER_ROW, FP8_BLOCK)  # an fp8 QuantSpec's group_size
FUSED_SUFFIXES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(frozen=True)
class QuantSpec:
    """How one Linear is quantized.

    kind: "nvfp4" (FP4 e2m1 groups of 16, e4m3 scales, an fp32 global scale), "mx" (MXFP4
    or MXFP8 by ``bits``: e2m1 or e4m3 groups of 32, power-of-two e8m0 scales), "fp8" (e4m3,
    one scale per tensor, group_size 0, per output channel, -1, or per 128 x 128 block, 128)
    or "int".
    act: the activations too, in the weights' format: NVFP4 (W4A4) with a static global scale
    from the calibration max, MX dynamically (each group's scale from its own maximum), FP8
    statically per tensor (the calibration max times a tuned max_scale).
    act_scale_dtype: FP8 only, the dtype the static activation scale is stored in.
    scale_dtype: INT and FP8, the dtype the scale is stored in; fake quantization rounds the
    scale to it, so the checkpoint reproduces the tuned weights exactly.
    """

    kind: str
    bits: int = 4
    group_size: int = NVFP4_GROUP
    sym: bool = True
    act: bool = False
    scale_dtype: torch.dtype = None  # default: INT fp16, FP8 fp32 (auto-round's)
    act_scale_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.scale_dtype is None:
            object.__setattr__(self, "scale_dtype", torch.float32 if self.kind == "fp8" else torch.float16)
        if self.kind not in ("nvfp4", "mx", "fp8", "int"):
            raise ValueError(f"QuantSpec.kind must be 'nvfp4', 'mx', 'fp8' or 'int', got {self.kind!r}")
        if self.kind == "fp8" and (self.bits != 8 or self.group_size not in FP8_GROUPS):
            raise ValueError(f"QuantSpec: fp8 takes bits 8 and group_size {FP8_PER_TENSOR} (per tensor), "
                             f"{INT_GROUP_PER_ROW} (per channel) or {FP8_BLOCK} (per {FP8_BLOCK} x {FP8_BLOCK} "
                             f"block), got bits={self.bits}, group_size={self.group_size}")
        if self.kind == "fp8" and self.act and self.group_size == FP8_BLOCK:
            raise ValueError("QuantSpec.act: FP8 block weights take 16-bit or dynamic activations, which "
                             "tune weight-only (act=False)")
        if self.kind == "mx" and (self.bits not in MX_ELEMENTS or self.group_size != MX_GROUP):
            raise ValueError(f"QuantSpec: mx takes bits in {sorted(MX_ELEMENTS)} and group_size "
                             f"{MX_GROUP}, got bits={self.bits}, group_size={self.group_size}")
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be in 2..8 for int, got {self.bits}")
        if self.kind == "int" and not (self.group_size == INT_GROUP_PER_ROW or self.group_size > 0):
            raise ValueError(f"QuantSpec.group_size must be -1 or positive, got {self.group_size}")
        if self.act and self.kind == "int":
            raise ValueError("QuantSpec.act (activation quantization) is supported for nvfp4, mx and fp8, not int")

    def num_groups(self, in_features: int) -> int:
        """Scale groups per output row of a Linear with ``in_features`` inputs."""
        if self.kind == "nvfp4":
            return nvfp4_num_groups(in_features)
        if self.kind == "mx":
            return mx_num_groups(in_features)
        if self.kind == "fp8":
            return 1
        return int_num_groups(in_features, self.group_size)

    @property
    def fp8_per_tensor(self) -> bool:
        """FP8 with one weight scale for the whole tensor."""
        return self.kind == "fp8" and self.group_size == FP8_PER_TENSOR

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """The shape of max_scale (and min_scale) for a Linear of this shape: one per group of
        each row; one in all for an FP8 tensor scale, one per block for FP8 blocks."""
        if self.fp8_per_tensor:
            return (1, 1)
        if self.kind == "fp8" and self.group_size == FP8_BLOCK:
            return fp8_block_grid(out_features, in_features)
        return (out_features, self.num_groups(in_features))

    @property
    def weighted_rtn(self) -> bool:
        """iters=0's scale search weights the error by the imatrix (NVFP4, symmetric INT); MX's
        is unweighted, asymmetric INT and FP8 take plain RTN (auto-round's)."""
        return self.kind == "nvfp4" or (self.kind == "int" and self.sym)

    @property
    def static_act(self) -> bool:
        """The activations take a scale from the calibrated maximum (NVFP4's input global scale,
        FP8's static scale)."""
        return self.act and self.kind in ("nvfp4", "fp8")


def fused_layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Linears that inference fuses into one GEMM (q/k/v, gate/up under one parent), which
    must share an NVFP4 global scale; groups of one are left out."""
    groups = []
    for suffixes in FUSED_SUFFIXES:
        by_parent: dict[str, list[str]] = {}
        for n in names:
            parent, _, leaf = n.rpartition(".")
            if leaf in suffixes:
                by_parent.setdefault(parent, []).append(n)
        groups += [g for g in by_parent.values() if len(g) > 1]
    return groups
