"""Which experts containers of an MoE block run grouped, on which weights, in every pass.

Within :func:`grouped_experts` (the tuning loop: a projection's experts fake-quantized in one
call by their stack, expert_stack.py, or each by its own TunedLinear) and
:func:`stacked_experts` (the passes outside it: the experts' own weights, stacked once per pass),
each LinearExperts2D-style container's forward is swapped for expert_forward.py's
:func:`~.expert_forward.grouped_forward`. :func:`routed_shares` tells the memory estimate which
Linears compute on only their routed share of the tokens.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..fusion import own_forward, swap_forward
from .expert_forward import PROJECTIONS, ExpertWeights, grouped_forward
from .expert_stack import stacked_tunables
from .linear import ActQuantLinear, TunedLinear

_FORWARD_ARGS = ("self", "hidden_states", "top_k_index", "top_k_weights")  # LinearExperts2D.forward's


def _projections(m: nn.Module) -> Optional[dict[str, list[nn.Module]]]:
    """A LinearExperts2D-style container's projections by name, one module per expert: a
    ModuleList whose first num_experts members have gate_proj, up_proj and down_proj, with a
    gate function, called as ``(hidden_states, top_k_index, top_k_weights)``; else None."""
    fwd, _ = own_forward(m)
    n = getattr(m, "num_experts", None)
    if (fwd is None or not isinstance(m, nn.ModuleList) or not isinstance(n, int) or not 0 < n <= len(m)
            or not callable(getattr(m, "_apply_gate", None))
            or tuple(inspect.signature(fwd).parameters) != _FORWARD_ARGS):
        return None
    return {p: [getattr(m[e], p, None) for e in range(n)] for p in PROJECTIONS}


def _tuned_projections(m: nn.Module, tuned_ids: set[int], device: torch.device) -> Optional[dict[str, list]]:
    """A container's projections, where all are TunedLinears (one spec, weight shape and dtype,
    and bias or none per projection, on ``device``); else None."""
    projections = _projections(m)
    if projections is None:
        return None
    for ls in projections.values():
        if not all(id(tl) in tuned_ids for tl in ls):
            return None
        lins = [tl.linear for tl in ls]
        if not _same_bias(lins, device) or any(
                tl.v.device != device or tl.spec != ls[0].spec or lin.weight.shape != lins[0].weight.shape
                or lin.weight.dtype != lins[0].weight.dtype for tl, lin in zip(ls, lins)):
            return None
    return projections


def _stacked_qdq(tuned: list[TunedLinear]) -> torch.Tensor:
    """The experts' fake-quantized weights stacked [E, out, in], one call per expert; each
    TunedLinear's weight of this forward (``wq_now``, kept until the loop scores it) becomes its
    view of the stack, so that the separate copies go."""
    stacked = torch.stack([tl.qdq()[0] for tl in tuned])
    if torch.is_grad_enabled():
        for tl, wq in zip(tuned, stacked):
            tl.wq_now = wq
    return stacked


def _stack_qdq(stack: TunedLinear, n_experts: int) -> torch.Tensor:
    """A stack's fake-quantized weight as [E, out, in]: one call for all experts."""
    wq = stack.qdq()[0]
    return wq.view(n_experts, -1, wq.shape[-1])


def _same_bias(lins: list[nn.Linear], device: torch.device) -> bool:
    """Whether none of the Linears has a bias, or all have one in their weight's dtype on
    ``device``."""
    if all(lin.bias is None for lin in lins):
        return True
    return all(lin.bias is not None and lin.bias.device == device and lin.bias.dtype == lin.weight.dtype
               for lin in lins)


def _stacked_biases(lins: list[nn.Linear]) -> Optional[torch.Tensor]:
    """The experts' biases of one projection stacked [E, out] (they are not tuned), or None."""
    if lins[0].bias is None:
        return None
    with torch.no_grad():
        return torch.stack([lin.bias for lin in lins])


def _plain_linear(lin) -> bool:
    """An nn.Linear that computes its plain matmul (compressed-tensors' on-the-fly
    quantization, where attached, is off)."""
    quantizes = (getattr(lin, "quantization_enabled", True) and getattr(lin, "quantization_scheme", None) is not None
                 and getattr(lin, "quantization_status", None) is not None)
    return type(lin) is nn.Linear and not quantizes


def _stacked_weights(m: nn.Module, device: torch.device) -> Optional[ExpertWeights]:
    """A container whose projections are plain Linears, or all ActQuantLinears of one spec
    around them (the W4A4 output pass), of one shape and dtype on ``device``: their weights
    stacked once (an extra copy of the experts' weights while the pass runs)."""
    projections = _projections(m)
    if projections is None:
        return None
    stacked, quantizers, biases = {}, {}, {}
    for p, ls in projections.items():
        act = all(isinstance(e, ActQuantLinear) and e.spec == ls[0].spec for e in ls)
        lins = [e.linear if act else e for e in ls]
        if not all(_plain_linear(lin) and lin.weight.device == device and lin.weight.shape == lins[0].weight.shape
                   and lin.weight.dtype == lins[0].weight.dtype for lin in lins) or not _same_bias(lins, device):
            return None
        biases[p] = _stacked_biases(lins)
        with torch.no_grad():
            stacked[p] = torch.stack([lin.weight for lin in lins])
        quantizers[p] = ls if act else None
    return ExpertWeights(weights=stacked.__getitem__, shapes={p: tuple(w.shape[1:]) for p, w in stacked.items()},
                         quantizers=quantizers, biases=biases)


@contextlib.contextmanager
def _swapped(block: nn.Module, found: dict[str, ExpertWeights]):
    """Each named container runs :func:`grouped_forward` on its ExpertWeights within the
    ``with``; restored on the way out, also when the body raises. Yields the names."""
    with contextlib.ExitStack() as stack:
        for name, source in found.items():
            stack.callback(swap_forward(block.get_submodule(name), grouped_forward(source)))
        yield list(found)


@dataclass
class GroupedExperts:
    """What :func:`grouped_experts` yields: the containers that run grouped (``names``); the
    stacks that tune a projection's experts as one, by name, each with its experts' names in
    row order (``stacks``); and the projections whose experts' fake-quantized weights the
    forward stacks, their names in the stack's order (``forward_stacks``)."""

    names: list[str] = field(default_factory=list)
    stacks: dict[str, tuple[TunedLinear, list[str]]] = field(default_factory=dict)
    forward_stacks: list[list[str]] = field(default_factory=list)

    def loop_units(self, tuned: dict[str, TunedLinear]) -> dict[str, TunedLinear]:
        """What the loop tunes: the TunedLinears, each stack in place of its experts."""
        members = {n for _, names in self.stacks.values() for n in names}
        units = {n: tl for n, tl in tuned.items() if n not in members}
        units.update({name: stack for name, (stack, _) in self.stacks.items()})
        return units

    def per_linear(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loop's weights by unit, a stack's split into its experts' rows."""
        out = {n: w for n, w in weights.items() if n not in self.stacks}
        for name, (_, names) in self.stacks.items():
            if name in weights:
                out.update(zip(names, weights[name].chunk(len(names))))
        return out

    def linear_names(self, units: list[str]) -> list[str]:
        """Unit names as Linear names: a stack's as its experts'."""
        return sorted(n for u in units for n in (self.stacks[u][1] if u in self.stacks else [u]))


@contextlib.contextmanager
def grouped_experts(block: nn.Module, tuned: dict[str, TunedLinear], device: torch.device, enabled: bool = True):
    """The tuning loop's context: within it (if ``enabled``) every experts container of the
    block whose projections are all TunedLinears runs grouped, each projection's experts
    tuned as one stack where they can be (expert_stack.py). Yields a GroupedExperts."""
    names = {id(tl): n for n, tl in tuned.items()}
    containers = [(n, projections) for n, m in block.named_modules()
                  if enabled and (projections := _tuned_projections(m, set(names), device))]
    grouped, found = GroupedExperts(), {}
    with contextlib.ExitStack() as stack:
        for name, projections in containers:
            found[name] = _tuned_weights(name, projections, names, grouped, stack)
        grouped.names = stack.enter_context(_swapped(block, found))
        try:
            yield grouped
        finally:  # the stacks hold the stacked weights: each goes as soon as it is unstacked
            found.clear()
            grouped.stacks.clear()


def _tuned_weights(container: str, projections: dict[str, list[TunedLinear]], names: dict[int, str],
                   grouped: GroupedExperts, stack: contextlib.ExitStack) -> ExpertWeights:
    """One container's ExpertWeights in the loop: each projection's experts stacked (entered
    on ``stack``, recorded in ``grouped.stacks``), or each fake-quantized alone and stacked by
    the forward (``grouped.forward_stacks``)."""
    weights = {}
    for p, ls in projections.items():
        experts = [names[id(tl)] for tl in ls]
        unit = stack.enter_context(stacked_tunables(ls))
        if unit is None:
            weights[p] = functools.partial(_stacked_qdq, ls)
            grouped.forward_stacks.append(experts)
        else:
            weights[p] = functools.partial(_stack_qdq, unit, len(ls))
            grouped.stacks[f"{container}.{p}" if container else p] = (unit, experts)
    return ExpertWeights(weights=lambda p: weights[p](),
                         shapes={p: tuple(ls[0].linear.weight.shape) for p, ls in projections.items()},
                         quantizers={p: ls if ls[0].spec.act else None for p, ls in projections.items()},
                         biases={p: _stacked_biases([tl.linear for tl in ls]) for p, ls in projections.items()})


def _stack_names(container: str, projections: dict[str, list[nn.Module]]) -> dict[str, list[str]]:
    """The block-relative names of a container's expert Linears per projection, in the order
    its stacks take them."""
    return {p: [f"{container}.{e}.{p}" for e in range(len(ls))] for p, ls in projections.items()}


def groups_experts(option: Optional[bool], device: torch.device) -> bool:
    """Whether MoE experts run grouped on ``device``: ``option`` (grouped_experts), where
    None means on a GPU."""
    return device.type == "cuda" if option is None else bool(option)


def stacked_experts(block: nn.Module, device: torch.device, enabled: bool = True,
                    recorder: Optional[Callable[[str, ExpertWeights], Optional[Callable]]] = None):
    """The context of a pass outside the loop: within it (if ``enabled``) every experts
    container of the block whose projections are plain Linears (or ActQuantLinears around
    them) on ``device`` runs grouped on its stacked weights. With ``recorder`` (calibration),
    each container's ``record`` is ``recorder(name, weights)``; where that is None the
    container keeps its own forward. Yields the containers' names."""
    found = {}
    for name, m in block.named_modules():
        source = _stacked_weights(m, device) if enabled else None
        if source is not None and recorder is not None:
            source.record = recorder(name, source)
            if source.record is None:
                continue
        if source is not None:
            found[name] = source
    return _swapped(block, found)


def routed_shares(block: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, float]:
    """For each expert Linear of the block's experts containers that will run grouped (every
    projection of every expert among ``linears``), the share of the tokens it
    computes on: top_k / E (the ``top_k`` of the router beside the container). Containers
    without such a router are left out (every token)."""
    return {n: k / len(names) for names, k in _routed_projections(block, linears) for n in names}


def routed_projections(block: nn.Module, linears: dict[str, nn.Linear]) -> list[list[str]]:
    """The expert Linears of :func:`routed_shares`, a list of names per projection of each
    container (the order of its stack)."""
    return [names for names, _ in _routed_projections(block, linears)]


def _routed_projections(block: nn.Module, linears: dict[str, nn.Linear]):
    """(a projection's expert names, the container's top_k) for each projection of each
    experts container of the block whose Linears are all among ``linears``, with a router."""
    for name, m in block.named_modules():
        projections = _projections(m)
        if projections is None:
            continue
        stacks = _stack_names(name, projections)
        if not all(n in linears for names in stacks.values() for n in names):
            continue
        k = _top_k(block.get_submodule(name.rpartition(".")[0]), m)
        if k is not None:
            yield from ((names, k) for names in stacks.values())


def _top_k(moe_block: nn.Module, experts: nn.Module) -> Optional[int]:
    """The experts per token of an MoE block: the ``top_k`` of a module beside its experts."""
    for m in moe_block.modules():
        if m is not experts and isinstance(getattr(m, "top_k", None), int):
            return m.top_k
    return None
