"""One projection of an MoE layer's experts tuned as one stack.

Within :func:`stacked_tunables`, the E experts' weights of a projection and their TunedLinears'
V and clipping scales live in [E * out, ...] tensors, the experts' rows one after another, and
each expert's Linear and TunedLinear hold views of their rows. A TunedLinear over the stacked
weight (the stack) then fake-quantizes all experts in one call of the op (one kernel launch
where there were E), and the loop keeps its best weight in one copy and steps its tunables in
one call (the weight backward's step, or sign_step_). Once stacked, the memory is what it
was: each expert's weight, V and scales move into the stack (while one projection moves, in
and out, its weights, and on the way in its V, are there twice).

Each row of these ops comes from its own rows of W and V, its own groups' scales and (NVFP4)
its row's global scale, each expert's repeated over its rows: the stack gives every expert the
bits it gets alone. INT, MX, NVFP4, and FP8 per row or per 128 x 128 block where an expert's
rows are whole blocks stack; FP8 with a weight scale or a static activation scale per expert
stays per expert (experts.py stacks their fake-quantized weights instead).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..formats import FP8_BLOCK
from .linear import TunedLinear
from .spec import QuantSpec

_STACKED = ("v", "min_scale", "max_scale")  # the TunedLinear tunables a stack holds


class _Rows(nn.Module):
    """What a TunedLinear reads of its Linear, for the stacked weight: the weight, no bias."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.bias = None


def stackable(tuned: list[TunedLinear]) -> bool:
    """Whether one projection's experts (one spec and shape) can be tuned as a stack (their
    biases, not tuned, stay with the grouped forward)."""
    return stacks(tuned[0].spec, tuned[0].linear.weight.shape[0])


def stacks(spec: QuantSpec, out_features: int) -> bool:
    """Whether experts of this spec and width stack: not with a weight scale or a static
    activation scale per expert (FP8 per tensor, FP8 static activations), nor FP8 blocks
    that an expert's rows do not fill."""
    if spec.kind in ("int", "mx", "nvfp4"):
        return True
    if spec.kind == "fp8" and not spec.fp8_per_tensor and not spec.act:
        return spec.group_size != FP8_BLOCK or out_features % FP8_BLOCK == 0
    return False


def _stack(tuned: list[TunedLinear]) -> TunedLinear:
    """The TunedLinear over the experts' weights stacked by rows, holding their tunables; each
    expert's weight and tunables become views of its rows."""
    first = tuned[0]
    out_features = first.linear.weight.shape[0]
    with torch.no_grad():
        weight = torch.cat([tl.linear.weight.detach() for tl in tuned])
        global_scale = (None if first.global_scale is None else
                        torch.cat([tl.global_scale.expand(out_features) for tl in tuned]))
        stack = TunedLinear(_Rows(weight), first.spec, first.backend, global_scale, None)
        for tl, rows in zip(tuned, weight.split(out_features)):
            tl.linear.weight.data = rows
        for name in _STACKED:
            parts = [getattr(tl, name) for tl in tuned]
            if parts[0] is None:
                continue
            for tl, part, rows in zip(tuned, parts, getattr(stack, name).detach().split(parts[0].shape[0])):
                rows.copy_(part)
                setattr(tl, name, nn.Parameter(rows))
    return stack


def _unstack(tuned: list[TunedLinear]) -> None:
    """Each expert's weight in storage of its own again (its tunables stay views of the
    stack's, which the TunedLinears drop with the block)."""
    with torch.no_grad():
        for tl in tuned:
            tl.linear.weight.data = tl.linear.weight.data.clone()


@contextlib.contextmanager
def stacked_tunables(tuned: list[TunedLinear]):
    """Within the ``with``, the experts of one projection as one stack: yields the stack's
    TunedLinear, or None where the experts cannot be stacked (:func:`stackable`)."""
    if not stackable(tuned):
        yield None
        return
    try:
        yield _stack(tuned)
    finally:  # also where _stack raised part way: every weight gets storage of its own
        _unstack(tuned)
