"""A compressed-tensors QuantizationScheme, as resolved on one Linear, to the engine's QuantSpec,
or a one-line error naming the layer and what the fast backends take instead."""

from __future__ import annotations

from typing import Optional

import torch
from compressed_tensors.quantization import QuantizationStrategy

from .engine import QuantSpec
from .formats import FP8_BLOCK, FP8_PER_TENSOR, INT_GROUP_PER_ROW, MX_ELEMENTS, MX_GROUP, NVFP4_GROUP, SCALE_DTYPE_CODES

__all__ = ["spec_from_scheme"]

_SUPPORTED = ("NVFP4 (W4A4), NVFP4A16, MXFP4, MXFP4A16, MXFP8, MXFP8A16, FP8 weights per tensor, "
              f"channel or {FP8_BLOCK} x {FP8_BLOCK} block (FP8, FP8_DYNAMIC, FP8_BLOCK), and INT W2..W8 (sym or asym, per channel or grouped) with "
              "16-bit or dynamic per-token activations")


def _type_of(args) -> str:
    return getattr(args.type, "value", args.type)


def _is_mx(args) -> bool:
    """compressed-tensors' MX layout: float 4 or 8 bits, groups of 32, uint8 (e8m0) scales."""
    return (_type_of(args) == "float" and args.num_bits in MX_ELEMENTS and args.group_size == MX_GROUP
            and args.strategy == QuantizationStrategy.GROUP and args.scale_dtype == torch.uint8)


def _dynamic_per_token(args) -> bool:
    return args.dynamic is True and args.strategy == QuantizationStrategy.TOKEN


def _dynamic_fp8(args) -> bool:
    """FP8 activations scaled per token or per group as they come (FP8_DYNAMIC, FP8_BLOCK)."""
    return (_type_of(args) == "float" and args.num_bits == 8 and args.dynamic is True
            and args.strategy in (QuantizationStrategy.TOKEN, QuantizationStrategy.GROUP))


def _fp8_block(args) -> bool:
    return args.strategy == QuantizationStrategy.BLOCK and list(args.block_structure or []) == [FP8_BLOCK] * 2


def _static_fp8_per_tensor(args) -> bool:
    return (_type_of(args) == "float" and args.num_bits == 8 and args.dynamic is False
            and args.strategy == QuantizationStrategy.TENSOR)


def _float_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """A stored scale's dtype where the kernels take it, else fp32."""
    return dtype if dtype in SCALE_DTYPE_CODES else torch.float32


def _float_spec(w, act, weight_scale_dtype, input_scale_dtype, hint: str) -> QuantSpec:
    """NVFP4 or MX from float weights, with activations in the same format (or none); FP8 per
    tensor, channel or 128 x 128 block, without activations or with dynamic ones (tuned
    weight-only, as the stock path tunes dynamic activations); FP8 per tensor also with static
    per-tensor activations."""
    if w.num_bits == 4 and w.group_size == NVFP4_GROUP and w.strategy == QuantizationStrategy.TENSOR_GROUP:
        if act is not None and (_type_of(act) != "float" or act.num_bits != 4 or act.group_size != NVFP4_GROUP):
            raise ValueError(f"{hint}; got NVFP4 weights with activations {act}")
        return QuantSpec("nvfp4", act=act is not None)
    if _is_mx(w):
        if act is not None and not (_is_mx(act) and act.num_bits == w.num_bits and act.dynamic is True):
            raise ValueError(f"{hint}; got MXFP{w.num_bits} weights with activations {act}")
        return QuantSpec("mx", bits=w.num_bits, group_size=MX_GROUP, act=act is not None)
    if w.num_bits == 8 and _fp8_block(w):
        if act is not None and not _dynamic_fp8(act):
            raise ValueError(f"{hint}; FP8 block weights take 16-bit or dynamic FP8 activations, got {act}")
        return QuantSpec("fp8", bits=8, group_size=FP8_BLOCK, scale_dtype=_float_dtype(weight_scale_dtype))
    fp8_groups = {QuantizationStrategy.TENSOR: FP8_PER_TENSOR, QuantizationStrategy.CHANNEL: INT_GROUP_PER_ROW}
    if w.num_bits == 8 and w.strategy in fp8_groups:
        static = act is not None and _static_fp8_per_tensor(act)
        if act is not None and not (static or _dynamic_per_token(act)):
            raise ValueError(f"{hint}; FP8 weights take 16-bit, dynamic per-token or static per-tensor FP8 "
                             f"activations, got {act}")
        return QuantSpec("fp8", bits=8, group_size=fp8_groups[w.strategy], act=static,
                         scale_dtype=_float_dtype(weight_scale_dtype), act_scale_dtype=_float_dtype(input_scale_dtype))
    raise ValueError(f"{hint}; got float{w.num_bits} weights, strategy {w.strategy}, group {w.group_size}")


def spec_from_scheme(scheme, weight_scale_dtype: Optional[torch.dtype], layer: str, backend: str,
                     input_scale_dtype: Optional[torch.dtype] = None) -> QuantSpec:
    """The engine's QuantSpec for a compressed-tensors QuantizationScheme, or a clear error;
    the scale dtypes are those compressed-tensors stores the scales in. INT and FP8 weights with dynamic per-token activations (W8A8, W4AFP8, FP8_DYNAMIC, ...)
    tune weight-only, as the stock path does: llm-compressor hands auto-round such activations
    as 16-bit."""
    w = scheme.weights
    act = scheme.input_activations
    hint = f"layer {layer!r}: backend={backend!r} supports {_SUPPORTED}; try backend='auto_round' for others"
    if w is None or scheme.output_activations is not None:
        raise ValueError(f"{hint}; got weights={w}, output_activations={scheme.output_activations}")
    if _type_of(w) == "float":
        return _float_spec(w, act, weight_scale_dtype, input_scale_dtype, hint)
    if _type_of(w) == "int":
        if act is not None and not _dynamic_per_token(act):
            raise ValueError(f"{hint}; INT weights take 16-bit or dynamic per-token activations, got {act}")
        if w.strategy == QuantizationStrategy.GROUP:
            group = w.group_size
        elif w.strategy == QuantizationStrategy.CHANNEL:
            group = INT_GROUP_PER_ROW
        else:
            raise ValueError(f"{hint}; got INT strategy {w.strategy}")
        sd = weight_scale_dtype if weight_scale_dtype in SCALE_DTYPE_CODES else torch.float16
        return QuantSpec("int", bits=w.num_bits, group_size=group, sym=w.symmetric, scale_dtype=sd)
    raise ValueError(f"{hint}; got {_type_of(w)} weights")
