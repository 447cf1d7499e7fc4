"""The tuned Linear: its weight fake-quantized from the tunables (V, the clipping scales) on
every forward, and, under W4A4, its input fake-quantized too."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .. import ops, reference
from ..formats import FP8_BLOCK
from .backends import Backend
from .remade import Remade, RemadeInBackward, owns_storage, remade_with_grad
from .spec import QuantSpec, fused_layer_groups


@dataclass
class Stepper:
    """What a TunedLinear's backward needs to take SignRound's step itself: the best copies of
    its scales (the loop keeps no copy of V), the iteration's improved flag and learning rate
    (device tensors the loop fills before the backward), and the set the backward adds the
    Linear to when it ran."""

    best: list
    improved: torch.Tensor
    lr: torch.Tensor
    ran: set
    key: object

    def args(self):
        return self.best, self.improved, self.lr, self.mark

    def mark(self):
        self.ran.add(self.key)


class ActMemo:
    """The last input one group of TunedLinears quantized, and the result (see
    TunedLinear.quantize_input). Holding the input keeps its identity unique while compared."""

    def __init__(self):
        self.source: Optional[torch.Tensor] = None
        self.result: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self.source = self.result = None


class TunedLinear(nn.Module):
    """A Linear whose weight is fake-quantized from the tunables on every forward."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, backend: Backend,
                 global_scale: Optional[torch.Tensor], act_global_scale: Optional[torch.Tensor],
                 act_max: Optional[torch.Tensor] = None):
        super().__init__()
        self.linear = linear
        self.spec = spec
        self.backend = backend
        out_f, in_f = linear.weight.shape
        dev = linear.weight.device
        self.v = nn.Parameter(torch.zeros(out_f, in_f, device=dev, dtype=torch.float32))
        shape = spec.scale_shape(out_f, in_f)
        self.max_scale = nn.Parameter(torch.ones(shape, device=dev, dtype=torch.float32))
        self.min_scale = (nn.Parameter(torch.ones(shape, device=dev, dtype=torch.float32))
                          if spec.kind == "int" else None)
        # NVFP4: one, or one per row (experts stacked by rows, engine/expert_stack.py)
        self.register_buffer("global_scale", None if global_scale is None else global_scale.reshape(-1).to(dev))
        self.register_buffer("act_global_scale",
                             None if act_global_scale is None else act_global_scale.reshape(1).to(dev))
        # FP8 with one weight scale: max|W|, which the weight keeps while tuned (a pass over W
        # less in each of the kernels' forwards and backwards)
        self.register_buffer("weight_amax", ops.fp8_weight_amax(linear.weight) if spec.fp8_per_tensor else None)
        # FP8 static activations: the calibrated maximum, and the tuned max_scale on it
        fp8_act = spec.kind == "fp8" and spec.act
        self.register_buffer("act_max", act_max.reshape(1).to(dev, torch.float32) if fp8_act else None)
        self.act_max_scale = nn.Parameter(torch.ones(1, device=dev, dtype=torch.float32)) if fp8_act else None
        # Shared by Linears that read the same input under the same activation global scale
        # (q/k/v, gate/up): see quantize_input.
        self.act_memo: Optional[ActMemo] = None
        # Set by the loop when the sign step runs inside this Linear's backward (Stepper).
        self.stepper: Optional[Stepper] = None
        self.forwards = 0  # forwards with gradients (the loop checks that there is one per step)
        # The fake-quantized weight of the last forward with gradients, until the loop has
        # scored the iteration (it keeps the best iteration's).
        self.wq_now: Optional[torch.Tensor] = None
        # Set by the loop where it remakes weights (SignRound): within a RemadeInBackward
        # context, the forward's weight is marked (``remade``) instead of held, the backward
        # makes it again and hands it to ``on_remake`` before its matmul's backward uses it.
        self.on_remake: Optional[Callable[[torch.Tensor], None]] = None
        self.remade: Optional[Remade] = None

    @property
    def steps_in_backward(self) -> bool:
        """Whether the kernels can take the sign step inside this Linear's weight backward."""
        return self.spec.kind in ("nvfp4", "int")

    def tunables(self) -> list[nn.Parameter]:
        return [p for p in (self.v, self.min_scale, self.max_scale, self.act_max_scale) if p is not None]

    def qdq(self):
        """(fake-quantized weight, scale (MX: its log2), zero point or None), clamping the
        scales to [0, 1]."""
        # on .data, as auto-round: a Linear called twice in one forward keeps the first call's
        # saved scales valid for its backward (an in-place op on the Parameter bumps its version)
        self.max_scale.data.clamp_(0, 1)
        if self.min_scale is not None:
            self.min_scale.data.clamp_(0, 1)
        if not torch.is_grad_enabled():
            return self._qdq(None)
        self.forwards += 1
        out = self._qdq(self.stepper)
        self.wq_now, self.remade = out[0], None
        context = RemadeInBackward.active()
        if self.on_remake is not None and context is not None and owns_storage(out[0]):
            self.remade = context.remake(out[0], self._made_again, self.linear.weight, *self.tunables())
            self.wq_now = None
        return out

    def _made_again(self) -> torch.Tensor:
        """The forward's fake-quantized weight, made again in the backward (the tunables have
        not moved since: remade.py checks), outside the forward's autocast, which the weight
        ops do not follow."""
        wq = self._qdq(None)[0]
        self.on_remake(wq)
        return wq

    def _qdq(self, st: Optional[Stepper]):
        w = self.linear.weight
        s = self.spec
        be = self.backend
        if s.kind == "mx":
            q, exponent = be.mx(w, self.v, self.max_scale, s.bits)
            return q, exponent, None
        if s.kind == "fp8" and s.group_size == FP8_BLOCK:
            q, scale = be.fp8_block(w, self.v, self.max_scale, s.scale_dtype)
            return q, scale, None
        if s.kind == "fp8":
            q, scale = be.fp8(w, self.v, self.max_scale, s.scale_dtype, self.weight_amax)
            return q, scale, None
        if s.kind == "nvfp4":
            if st is not None:
                q, scale = be.nvfp4_stepped(w, self.v, self.max_scale, self.global_scale, *st.args())
            else:
                q, scale = be.nvfp4(w, self.v, self.max_scale, self.global_scale)
            return q, scale, None
        int_args = (w, self.v, self.min_scale, self.max_scale, s.bits, s.group_size, s.sym, s.scale_dtype)
        if st is not None:
            return be.int_stepped(*int_args, *st.args())
        return be.int(*int_args)

    def forward(self, x, input_quantized: bool = False):
        """``input_quantized``: the caller has already applied this Linear's activation
        quantization (:meth:`input_quant_scale`), as the fused SiLU-gated MLP does."""
        home = x.device  # device_ids: this Linear may live on another card than the block
        x = x.to(self.v.device)
        with self.remaking():
            wq = self.qdq()[0]
            if self.spec.act and not input_quantized:
                x = self.quantize_input(x)
            y = nn.functional.linear(x, wq, self.linear.bias)
        if self.remade is not None and not self.remade.saved:
            self.wq_now = wq  # the matmul saved none (its input needs no gradient): held until scored
        return y.to(home)

    def remaking(self):
        """The context around this Linear's matmul in which its weight is made again in the
        backward rather than held (where the loop asks for it, with gradients on)."""
        return contextlib.nullcontext() if self.on_remake is None else remade_with_grad()

    def input_quant_scale(self) -> Optional[torch.Tensor]:
        """The activation global scale under which a caller may quantize this Linear's input
        itself, with the kernels, and pass ``input_quantized=True`` (fusion's SiLU-gated MLP
        does, for down_proj); None where that does not apply (no W4A4, the oracles, or an
        input shared with other Linears)."""
        if _fusable(self.spec) and self.backend.uses_kernels and self.act_memo is None:
            return self.act_global_scale
        return None

    def quantize_input(self, x):
        """The input's fake quantization (W4A4, MX, FP8 static), as :meth:`forward` applies it
        and as callers that run the matmul themselves (the grouped experts) call it. q, k and
        v quantize the same tensor under the same global scale (NVFP4) or none (MX): the first
        computes it and the others take its result (the same bits, one kernel instead of
        three). Only when the input needs no gradient (q/k/v read the normed block input), so
        every backward stays its own."""
        memo = self.act_memo
        if memo is None or x.requires_grad:
            return self._quant(x)
        if memo.source is not x:
            memo.source, memo.result = x, self._quant(x)
        return memo.result

    def _quant(self, x):
        if self.act_max_scale is not None:
            self.act_max_scale.data.clamp_(0, 1)  # auto-round's clamp, on every call
        return quant_input(self.backend, self.spec, x, self.act_global_scale, self.act_max, self.act_max_scale)

    def act_scale(self) -> torch.Tensor:
        """FP8 static activations: the input scale at the current act_max_scale."""
        return reference.fp8_activation_scale(self.act_max, self.act_max_scale.detach(), self.spec.act_scale_dtype)


def quant_input(backend: Backend, spec: QuantSpec, x: torch.Tensor, act_global_scale: Optional[torch.Tensor],
                act_max: Optional[torch.Tensor] = None, act_max_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A Linear's input fake-quantized as its spec says: NVFP4 under the static global scale,
    MX dynamically, FP8 under the static scale of act_max * act_max_scale."""
    if spec.kind == "mx":
        return backend.mx_act(x, spec.bits)
    if spec.kind == "fp8":
        return backend.fp8_act(x, act_max, act_max_scale, spec.act_scale_dtype)
    return backend.act(x, act_global_scale)


class ActQuantLinear(nn.Module):
    """A tuned Linear at inference in the tuning chain: activations fake-quantized (W4A4, MX,
    FP8 static)."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, backend: Backend,
                 act_global_scale: Optional[torch.Tensor], act_max: Optional[torch.Tensor] = None,
                 act_max_scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.linear = linear
        self.spec = spec
        self.backend = backend
        self.register_buffer("act_global_scale", act_global_scale)
        self.register_buffer("act_max", act_max)
        self.register_buffer("act_max_scale", act_max_scale)

    def forward(self, x, input_quantized: bool = False):
        return self.linear(x if input_quantized else self.quantize_input(x))

    def quantize_input(self, x):  # as TunedLinear's
        return quant_input(self.backend, self.spec, x, self.act_global_scale, self.act_max, self.act_max_scale)

    def input_quant_scale(self) -> Optional[torch.Tensor]:  # as TunedLinear's
        return self.act_global_scale if _fusable(self.spec) and self.backend.uses_kernels else None


def share_input_quantization(tuned: dict[str, TunedLinear]) -> list[ActMemo]:
    """One ActMemo per fused group (q/k/v, gate/up) whose input quantization is the same: one
    spec, and under NVFP4 (W4A4) equal input global scales (never FP8: each Linear tunes its
    own activation max_scale)."""
    memos = []
    for group in fused_layer_groups([n for n, tl in tuned.items() if tl.spec.act]):
        first = tuned[group[0]]
        if first.spec.kind != "fp8" and all(tuned[n].spec == first.spec and tuned[n].v.device == first.v.device
               and _same_scale(tuned[n].act_global_scale, first.act_global_scale) for n in group[1:]):
            memo = ActMemo()
            for n in group:
                tuned[n].act_memo = memo
            memos.append(memo)
    return memos


def _fusable(spec: QuantSpec) -> bool:
    """The fused SiLU-gated activation op quantizes NVFP4 W4A4 inputs only."""
    return spec.kind == "nvfp4" and spec.act


def _same_scale(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is b
    return a.device == b.device and torch.equal(a, b)


def swap_module(block: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in the block at the dotted path ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)
