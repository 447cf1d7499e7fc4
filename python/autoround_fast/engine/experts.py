"""The routed experts of an MoE block as grouped matmuls, in every pass over the block.

llm-compressor linearizes transformers' fused experts into a ModuleList of E expert MLPs
(``LinearExperts2D``), called as ``experts(hidden_states, top_k_index, top_k_weights)``, whose
forward loops over the experts in Python and waits for the host at each (``torch.where``).
Within :func:`grouped_experts`, such a container's forward is swapped for one that sorts the
token-expert pairs by expert on the device and runs each projection as one grouped matmul
over all experts (``torch._grouped_mm``), each expert's weight still fake-quantized by its own
TunedLinear. It computes what the loop computes, bit for bit (see :func:`grouped_forward`).
The passes outside the tuning loop (the reference, act_max, the quantized outputs) run the
same way on the experts' own weights, stacked once per pass (:func:`plain_grouped_experts`).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..fusion import _own_forward, _swap_forward
from .linear import ActQuantLinear, TunedLinear, quant_input

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_FORWARD_ARGS = ("self", "hidden_states", "top_k_index", "top_k_weights")  # LinearExperts2D.forward's
_ALIGN_BYTES = 16  # _grouped_mm wants every stride but the unit one a multiple of 16 bytes


@dataclass
class Routing:
    """The token-expert pairs sorted by expert, on the device.

    Within an expert, pairs keep the loop's order (``torch.where`` over the [k, T] mask: by
    slot j, then token t). ``slots[t]`` lists token t's pairs in ascending expert order, the
    order in which the loop's ``index_add_`` sums them."""

    tokens: torch.Tensor   # [P] the token of each sorted pair (P = T * k)
    experts: torch.Tensor  # [P] its expert
    weights: torch.Tensor  # [P] its routing weight
    offsets: torch.Tensor  # [E] int32, where each expert's pairs end (cumulative counts)
    slots: torch.Tensor    # [T, k] positions of each token's pairs, ascending expert

    def bounds(self) -> list[tuple[int, int]]:
        """Each expert's [start, end) among the sorted pairs (one wait for the host)."""
        ends = self.offsets.tolist()
        return list(zip([0] + ends[:-1], ends))


def sort_pairs(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, n_experts: int) -> Routing:
    """Sort the T x k (token, expert) pairs by expert with device ops only (a stable argsort,
    searchsorted for the cumulative counts), no wait for the host."""
    n_tokens, k = top_k_index.shape
    experts = top_k_index.t().reshape(-1)  # pair j * T + t
    order = torch.argsort(experts, stable=True)
    ids = torch.arange(n_experts, device=experts.device, dtype=experts.dtype)
    offsets = torch.searchsorted(experts[order], ids, right=True, out_int32=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    slots = position.view(k, n_tokens).t().sort(dim=1).values
    return Routing(order % n_tokens, experts[order], top_k_weights.t().reshape(-1)[order], offsets, slots)


def grouped_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """LinearExperts2D's forward on grouped matmuls: ``out[t] = sum over t's experts e, in
    ascending e, of T(T(down_e(gate(gate_e(x_t), up_e(x_t)))) * w_te)``, each sum starting from
    zero and rounded to the hidden dtype, as the loop's ``index_add_`` adds.

    Every row of a matmul is its own dot products, so gathering an expert's tokens first (or
    computing it on every token, as llm-compressor's calibrate-all-experts flag does, and
    indexing after) gives the same rows."""
    experts = [self[e] for e in range(self.num_experts)]
    routing = sort_pairs(top_k_index, top_k_weights, self.num_experts)
    x = hidden_states[routing.tokens]  # indexing: a deterministic backward on a GPU
    linears = {p: [getattr(e, p) for e in experts] for p in PROJECTIONS}
    bounds = routing.bounds() if _needs_bounds(linears, x) else None
    gate = _project(linears["gate_proj"], x, routing, bounds)
    up = _project(linears["up_proj"], x, routing, bounds)
    h = self._apply_gate(torch.cat([gate, up], dim=-1))
    y = _project(linears["down_proj"], h, routing, bounds)
    return _combine(y, routing, hidden_states)


def _project(linears: list[TunedLinear], x: torch.Tensor, routing: Routing,
             bounds: Optional[list[tuple[int, int]]]) -> torch.Tensor:
    """Each expert's TunedLinear on its rows of x: its input quantization, then one grouped
    matmul over all experts with their fake-quantized weights, or, where _grouped_mm cannot
    take them, one matmul per expert."""
    weights = [tl.qdq()[0] for tl in linears]
    if linears[0].spec.act:
        x = _quantize_inputs(linears, x, routing, bounds)
    return _matmul(x, weights, routing, bounds)


def _matmul(x: torch.Tensor, weights, routing: Routing, bounds: Optional[list[tuple[int, int]]]) -> torch.Tensor:
    """Each expert's rows of x times its weight (``weights``: a list of [out, in], or them
    stacked), as F.linear computes under autocast: one grouped matmul, or one per expert."""
    dt = _autocast_dtype(x.device)
    if dt is not None:
        x = x.to(dt)
        weights = weights.to(dt) if isinstance(weights, torch.Tensor) else [w.to(dt) for w in weights]
    if bounds is None:
        stacked = weights if isinstance(weights, torch.Tensor) else torch.stack(weights)
        return torch._grouped_mm(x, stacked.transpose(1, 2), offs=routing.offsets)
    return torch.cat([F.linear(x[a:b], w) for w, (a, b) in zip(weights, bounds)])


def _quantize_inputs(linears: list, x: torch.Tensor, routing: Routing,
                     bounds: Optional[list[tuple[int, int]]]) -> torch.Tensor:
    """Each expert's input quantization on its rows (``linears``: TunedLinears or
    ActQuantLinears): NVFP4 in one call with each row under its expert's global scale, MX in
    one call (no state per expert), FP8's static scales per expert on its rows. Each way equals
    quantizing every expert's rows alone."""
    first = linears[0]
    if first.spec.kind == "nvfp4":
        per_row = torch.cat([tl.act_global_scale for tl in linears])[routing.experts]
        return quant_input(first.backend, first.spec, x, per_row)
    if first.spec.kind == "mx":
        return quant_input(first.backend, first.spec, x, None)
    return torch.cat([tl.quantize_input(x[a:b]) for tl, (a, b) in zip(linears, bounds)])


def _combine(y: torch.Tensor, routing: Routing, hidden_states: torch.Tensor) -> torch.Tensor:
    """The weighted expert outputs summed per token in the loop's order (ascending expert,
    from zero, in the hidden dtype): gathers and adds, with no atomics."""
    weighted = (y * routing.weights[:, None]).to(hidden_states.dtype)
    out = torch.zeros_like(hidden_states)
    for j in range(routing.slots.shape[1]):
        out = out + weighted[routing.slots[:, j]]
    return out


def _needs_bounds(linears: dict[str, list[TunedLinear]], x: torch.Tensor) -> bool:
    """Whether the forward needs each expert's rows on the host: FP8's static activation
    scales (tuned per expert), or a matmul _grouped_mm cannot take."""
    if any(ls[0].spec.act and ls[0].spec.kind == "fp8" for ls in linears.values()):
        return True
    dt = _autocast_dtype(x.device) or x.dtype
    widths = [ls[0].linear.weight.shape for ls in linears.values()]
    return not _grouped_mm_takes(x.device, dt, [n for shape in widths for n in shape])


def _grouped_mm_takes(device: torch.device, dtype: torch.dtype, widths: list[int]) -> bool:
    """torch._grouped_mm runs bf16 on the CPU and on Hopper-class GPUs (CUTLASS), with
    16-byte aligned rows."""
    if dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False
    item = torch.empty(0, dtype=dtype).element_size()
    return all(n * item % _ALIGN_BYTES == 0 for n in widths)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _projections(m: nn.Module) -> Optional[dict[str, list[nn.Module]]]:
    """A LinearExperts2D-style container's projections by name, one module per expert: a
    ModuleList whose first num_experts members have gate_proj, up_proj and down_proj, with a
    gate function, called as ``(hidden_states, top_k_index, top_k_weights)``; else None."""
    fwd, _ = _own_forward(m)
    n = getattr(m, "num_experts", None)
    if (fwd is None or not isinstance(m, nn.ModuleList) or not isinstance(n, int) or not 0 < n <= len(m)
            or not callable(getattr(m, "_apply_gate", None))
            or tuple(inspect.signature(fwd).parameters) != _FORWARD_ARGS):
        return None
    return {p: [getattr(m[e], p, None) for e in range(n)] for p in PROJECTIONS}


def _groupable(m: nn.Module, tuned_ids: set[int], device: torch.device) -> bool:
    """A container (:func:`_projections`) whose projections are TunedLinears (no bias, one
    spec and shape per projection, all on ``device``)."""
    projections = _projections(m)
    if projections is None:
        return False
    for ls in projections.values():
        if not all(id(tl) in tuned_ids for tl in ls):
            return False
        if any(tl.linear.bias is not None or tl.v.device != device or tl.spec != ls[0].spec
               or tl.linear.weight.shape != ls[0].linear.weight.shape for tl in ls):
            return False
    return True


@contextlib.contextmanager
def grouped_experts(block: nn.Module, tuned: dict[str, TunedLinear], device: torch.device,
                    enabled: bool = True):
    """Within the ``with`` (if ``enabled``), every LinearExperts2D-style experts container of the block whose
    projections are all TunedLinears runs :func:`grouped_forward`; restored on the way out,
    also when the body raises. Returns (as the ``as`` target) the containers' names."""
    ids = {id(tl) for tl in tuned.values()}
    names = [name for name, m in block.named_modules() if enabled and _groupable(m, ids, device)]
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.callback(_swap_forward(block.get_submodule(name), grouped_forward))
        yield names


# ---- the passes outside the loop (reference, calibration, outputs): the experts' own weights ----


@dataclass
class _Plain:
    """A container of plain Linears (or ActQuantLinears around them), grouped: each
    projection's weights stacked ([E, out, in], once per pass), its ActQuantLinears where its
    inputs are quantized, and, while calibrating, its input max per expert ([E], fp32, updated
    in place; the experts' ActStats.max are views of it)."""

    weights: dict[str, torch.Tensor]
    act: dict[str, Optional[list[ActQuantLinear]]]
    maxima: Optional[dict[str, torch.Tensor]] = None


def _plain_linear(lin) -> bool:
    """An nn.Linear without bias that computes its plain matmul (compressed-tensors'
    on-the-fly quantization, where attached, is off)."""
    quantizes = (getattr(lin, "quantization_enabled", True) and getattr(lin, "quantization_scheme", None) is not None
                 and getattr(lin, "quantization_status", None) is not None)
    return type(lin) is nn.Linear and lin.bias is None and not quantizes


def _weight_of(m) -> Optional[torch.Tensor]:
    """A plain Linear's weight, or that of the plain Linear an ActQuantLinear wraps."""
    lin = m.linear if isinstance(m, ActQuantLinear) else m
    return lin.weight if _plain_linear(lin) else None


def _plain(m: nn.Module, device: torch.device) -> Optional[_Plain]:
    """The container grouped on its own weights, if each projection's experts are all plain
    Linears, or all ActQuantLinears of one spec, of one shape and dtype on ``device``."""
    projections = _projections(m)
    if projections is None:
        return None
    weights, act = {}, {}
    for p, ls in projections.items():
        ws = [_weight_of(e) for e in ls]
        kinds = {type(e) for e in ls}
        if (any(w is None or w.device != device or w.shape != ws[0].shape or w.dtype != ws[0].dtype for w in ws)
                or len(kinds) != 1 or (kinds == {ActQuantLinear} and any(e.spec != ls[0].spec for e in ls))):
            return None
        with torch.no_grad():
            weights[p] = torch.stack(ws)
        act[p] = ls if kinds == {ActQuantLinear} else None
    return _Plain(weights, act)


def plain_forward(plain: _Plain):
    """LinearExperts2D's forward on the stacked weights, grouped as :func:`grouped_forward`
    (bit for bit the loop over routed tokens). While calibrating it records each expert
    projection's input max over the tokens llm-compressor's loop runs it on: the routed ones,
    or every token under its calibrate-all-experts flag."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        routing = sort_pairs(top_k_index, top_k_weights, self.num_experts)
        x = hidden_states[routing.tokens]
        bounds = routing.bounds() if _plain_needs_bounds(plain, x) else None

        def project(p, rows):
            if plain.act[p] is not None:
                rows = _quantize_inputs(plain.act[p], rows, routing, bounds)
            return _matmul(rows, plain.weights[p], routing, bounds)

        h = self._apply_gate(torch.cat([project("gate_proj", x), project("up_proj", x)], dim=-1))
        if plain.maxima is not None:
            _record_maxima(self, plain, hidden_states, routing, x, h)
        return _combine(project("down_proj", h), routing, hidden_states)

    return forward


def _plain_needs_bounds(plain: _Plain, x: torch.Tensor) -> bool:
    """As :func:`_needs_bounds`: FP8's static activation scales, or a matmul _grouped_mm cannot take."""
    if any(a is not None and a[0].spec.kind == "fp8" for a in plain.act.values()):
        return True
    dt = _autocast_dtype(x.device) or x.dtype
    return not _grouped_mm_takes(x.device, dt, [n for w in plain.weights.values() for n in w.shape[1:]])
def _record_maxima(experts, plain: _Plain, hidden_states, routing: Routing, x, h) -> None:
    """max |input| per expert and projection, exact in the input's dtype, kept in fp32."""
    # llm-compressor's flag (only its containers come here); imported late, as the engine
    # itself does not need llm-compressor
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag

    mx = plain.maxima
    if not get_calibrate_all_experts_flag():
        for p, rows in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
            _segment_max(mx[p], routing.experts, rows)
        return
    top = hidden_states.abs().amax().to(torch.float32)
    for p in ("gate_proj", "up_proj"):
        torch.maximum(mx[p], top, out=mx[p])
    torch.maximum(mx["down_proj"], _down_inputs_max_all_tokens(experts, plain, hidden_states), out=mx["down_proj"])


def _segment_max(out: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor) -> None:
    out.scatter_reduce_(0, experts, rows.abs().amax(-1).to(torch.float32), "amax")


_ALL_TOKENS_CHUNK_BYTES = 1 << 29  # the calibrate-all pass's gate, up and h, a chunk of experts at a time


def _down_inputs_max_all_tokens(experts, plain: _Plain, hidden_states) -> torch.Tensor:
    """Per expert, max |down_proj's input| over every token (the loop under the
    calibrate-all-experts flag), a chunk of experts at a time."""
    wg, wu = plain.weights["gate_proj"], plain.weights["up_proj"]
    n, width = wg.shape[0], wg.shape[1]
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    chunk = max(1, _ALL_TOKENS_CHUNK_BYTES // (3 * x.shape[0] * width * x.element_size()))
    out = []
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        gate = torch.stack([F.linear(x, w) for w in wg[sl]])
        up = torch.stack([F.linear(x, w) for w in wu[sl]])
        h = experts._apply_gate(torch.cat([gate, up], dim=-1))
        out.append(h.abs().amax(dim=(1, 2)).to(torch.float32))
    return torch.cat(out)


@contextlib.contextmanager
def plain_grouped_experts(block: nn.Module, device: torch.device, enabled: bool = True, stats=None):
    """Within the ``with`` (if ``enabled``), every experts container of the block whose
    projections are plain Linears (or ActQuantLinears) on ``device`` runs :func:`plain_forward`
    on its weights stacked once; with ``stats`` (calibration: {Linear name in the block:
    ActStats}) each expert Linear's ActStats.max becomes a view of its projection's per-expert
    maxima, and the containers' forwards record into them. Returns the containers' names."""
    found = {name: plain for name, m in block.named_modules() if enabled and (plain := _plain(m, device))}
    with contextlib.ExitStack() as stack:
        for name, plain in found.items():
            if stats is not None:
                plain.maxima = _adopt_maxima(name, plain, stats)
            stack.callback(_swap_forward(block.get_submodule(name), plain_forward(plain)))
        yield list(found)


def _adopt_maxima(container: str, plain: _Plain, stats) -> dict[str, torch.Tensor]:
    """Each projection's [E] maxima, from and into the experts' ActStats."""
    maxima = {}
    for p, w in plain.weights.items():
        names = [f"{container}.{e}.{p}" if container else f"{e}.{p}" for e in range(w.shape[0])]
        maxima[p] = torch.stack([stats[n].max for n in names])
        for e, n in enumerate(names):
            stats[n].max = maxima[p][e]
    return maxima
