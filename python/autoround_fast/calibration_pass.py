"""The sequential pipeline's calibration pass through MoE blocks, with their experts grouped.

llm-compressor runs each decoder layer once over every calibration sample before the layer is
tuned: the pass that captures the layer's inputs and whose outputs are the next layer's inputs
(with AutoRoundModifier the pipeline does not propagate quantization error, so this is the only
pass). Through an MoE block it runs llm-compressor's per-expert loop, which waits for the host at
every expert and, under the calibrate-all-experts flag, computes every expert on every token.

Here each MoE layer's experts run grouped on their stacked weights (engine/experts.py) from the
layer's first sample until it is tuned: the same outputs, as the grouped forward computes them.
No observer watches the expert Linears in this pass (AutoRoundModifier registers none; the
engine records its own activation maxima), and a layer whose Linears carry hooks keeps its
loop, so no hook of another modifier misses its call.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .engine.experts import groups_experts, stacked_experts


class GroupedCalibrationPass:
    """Each layer's experts grouped from its first sample (``pre_hook``, a forward pre-hook
    with kwargs on each decoder layer) until ``release(layer)``; ``enabled`` None: on a GPU."""

    def __init__(self, enabled: Optional[bool]):
        self.enabled = enabled
        self._open: dict[int, contextlib.ExitStack] = {}

    def pre_hook(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(layer) in self._open:
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        stack = contextlib.ExitStack()
        if isinstance(hidden, torch.Tensor) and groups_experts(self.enabled, hidden.device) \
                and not _hooked_linears(layer):
            stack.enter_context(stacked_experts(layer, hidden.device))
        self._open[id(layer)] = stack

    def release(self, layer: nn.Module) -> None:
        """The layer's pass is over: its own forward back, the stacked weights freed. A later
        forward of the layer (after it is tuned) runs its own forward."""
        self._open.setdefault(id(layer), contextlib.ExitStack()).close()  # kept: the hook stays off

    def close(self) -> None:
        for stack in self._open.values():
            stack.close()
        self._open.clear()


def _hooked_linears(layer: nn.Module) -> bool:
    """Whether a Linear of the layer carries a forward hook, which the grouped experts (they
    never call their Linears) would skip."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules() if isinstance(m, nn.Linear))
