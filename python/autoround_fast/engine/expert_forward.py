"""The grouped forward of an MoE block's routed experts: one grouped matmul per projection.

llm-compressor linearizes transformers' fused experts into a ModuleList of E expert MLPs
(``LinearExperts2D``), whose forward loops over the experts in Python and waits for the host
at each (``torch.where``). :func:`grouped_forward` computes the same: it sorts the
token-expert pairs by expert on the device (:func:`sort_pairs`) and runs each projection as one
grouped matmul over all experts (``torch._grouped_mm``), on the weights an
:class:`ExpertWeights` gives it. experts.py decides which containers run it, and on which
weights.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .linear import quant_input
from .remade import RemadeInBackward, remade_with_grad

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
GATE_UP = PROJECTIONS[:2]  # the projections of the gathered rows, whose outputs the gate function takes side by side
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


@dataclass
class ExpertWeights:
    """What :func:`grouped_forward` computes one container's experts with, per projection:
    ``weights(p)`` (a list of [out, in], one per expert, or them stacked [E, out, in]), their
    ``shapes``, the ``quantizers`` of their inputs (TunedLinears or ActQuantLinears; None
    where the inputs stay as they are) and their ``biases`` stacked [E, out] (None without;
    GPT-OSS's experts have them). ``record``, while calibrating, is called with
    (container, hidden_states, routing, x, h): the inputs of gate/up (x) and of down (h)."""

    weights: Callable[[str], Any]
    shapes: dict[str, tuple[int, int]]
    quantizers: dict[str, Optional[list]]
    biases: dict[str, Optional[torch.Tensor]]
    record: Optional[Callable] = None


def grouped_forward(source: ExpertWeights):
    """LinearExperts2D's forward on grouped matmuls: ``out[t] = sum over t's experts e, in
    ascending e, of T(T(down_e(gate(gate_e(x_t), up_e(x_t)))) * w_te)``, each sum starting from
    zero and rounded to the hidden dtype, as the loop's ``index_add_`` adds.

    On the CPU this is the loop over routed tokens bit for bit (each row of a matmul is its own
    dot products there, and _grouped_mm computes them as F.linear does). The loop under
    llm-compressor's calibrate-all-experts flag computes every expert on every token, whose rows
    round apart in the last bit; on a GPU _grouped_mm is another GEMM kernel than F.linear's;
    both agree to rounding."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        routing = sort_pairs(top_k_index, top_k_weights, self.num_experts)
        x = gather_rows(hidden_states, routing.tokens)
        bounds = routing.bounds() if _needs_bounds(source, x) else None
        h = self._apply_gate(_gate_up(source, x, hidden_states, routing, bounds))
        if source.record is not None:
            source.record(self, hidden_states, routing, x, h)
        with remade_with_grad():
            y = _project(source, "down_proj", h, routing, bounds)  # its weights made again where marked
        return _combine(y, routing, hidden_states)

    return forward


def gather_rows(hidden_states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The rows of the sorted pairs' tokens (indexing: a deterministic backward on a GPU)."""
    return hidden_states[tokens]


def _gate_up(source: ExpertWeights, x: torch.Tensor, hidden_states: torch.Tensor, routing: Routing,
             bounds: Optional[list[tuple[int, int]]]) -> torch.Tensor:
    """gate's and up's outputs side by side. With gradients on, the gathered rows x ([pairs,
    hidden]: top_k times the tokens' own rows) and their quantized copies are made again in the
    backward, not held (engine/remade.py): one gather and, under W4A4, one quantization each,
    for the grouped matmul, which saves x whole, and for the per-expert matmuls (``bounds``),
    which save slices of it. The TunedLinears that the loop asks to (``on_remake``) mark
    their weights in the same context."""
    if not torch.is_grad_enabled():
        return torch.cat([_project(source, p, x, routing, bounds) for p in GATE_UP], dim=-1)
    outputs = []
    with RemadeInBackward() as remade:
        gathered = remade.remake(x, functools.partial(gather_rows, hidden_states, routing.tokens), hidden_states)
        for p in GATE_UP:
            rows = _inputs(source, p, x, routing, bounds)
            if rows is not x:
                remade.remake(rows, lambda p=p: _inputs(source, p, gathered.current(), routing, bounds))
            outputs.append(_matmul(rows, source.weights(p), source.biases[p], routing, bounds))
    return torch.cat(outputs, dim=-1)


def _project(source: ExpertWeights, p: str, rows: torch.Tensor, routing: Routing,
             bounds: Optional[list[tuple[int, int]]]) -> torch.Tensor:
    """Projection ``p`` of every expert on its rows."""
    return _matmul(_inputs(source, p, rows, routing, bounds), source.weights(p), source.biases[p], routing, bounds)


def _inputs(source: ExpertWeights, p: str, rows: torch.Tensor, routing: Routing,
            bounds: Optional[list[tuple[int, int]]]) -> torch.Tensor:
    """Projection ``p``'s inputs: the rows, quantized where its experts quantize them."""
    quantizers = source.quantizers[p]
    return rows if quantizers is None else _quantize_inputs(quantizers, rows, routing, bounds)


def _matmul(x: torch.Tensor, weights, bias: Optional[torch.Tensor], routing: Routing,
            bounds: Optional[list[tuple[int, int]]]) -> torch.Tensor:
    """Each expert's rows of x times its weight (``weights``: a list of [out, in], or them
    stacked), plus its bias (stacked [E, out], or None), under autocast as F.linear casts:
    one F.linear per expert, or one grouped matmul, which rounds before each pair's bias is
    added (F.linear adds it first: to rounding, where there is a bias)."""
    dt = _autocast_dtype(x.device)
    if dt is not None:
        x = x.to(dt)
        weights = weights.to(dt) if isinstance(weights, torch.Tensor) else [w.to(dt) for w in weights]
        bias = bias.to(dt) if bias is not None else None
    if bounds is None:
        stacked = weights if isinstance(weights, torch.Tensor) else torch.stack(weights)
        y = torch._grouped_mm(x, stacked.transpose(1, 2), offs=routing.offsets)
        return y if bias is None else y + bias[routing.experts]
    return torch.cat([F.linear(x[a:b], w, None if bias is None else bias[e])
                      for e, (w, (a, b)) in enumerate(zip(weights, bounds))])


def _quantize_inputs(quantizers: list, x: torch.Tensor, routing: Routing,
                     bounds: Optional[list[tuple[int, int]]]) -> torch.Tensor:
    """Each expert's input quantization on its rows: NVFP4 in one call with each row under
    its expert's global scale, MX in one call (no state per expert), FP8's static scales per
    expert on its rows. Each way equals quantizing every expert's rows alone."""
    first = quantizers[0]
    if first.spec.kind == "nvfp4":
        per_row = torch.cat([q.act_global_scale for q in quantizers])[routing.experts]
        return quant_input(first.backend, first.spec, x, per_row)
    if first.spec.kind == "mx":
        return quant_input(first.backend, first.spec, x, None)
    return torch.cat([q.quantize_input(x[a:b]) for q, (a, b) in zip(quantizers, bounds)])


def _combine(y: torch.Tensor, routing: Routing, hidden_states: torch.Tensor) -> torch.Tensor:
    """The weighted expert outputs summed per token in the loop's order (ascending expert,
    from zero, in the hidden dtype): gathers and adds, with no atomics."""
    weighted = (y * routing.weights[:, None]).to(hidden_states.dtype)
    out = torch.zeros_like(hidden_states)
    for j in range(routing.slots.shape[1]):
        out = out + weighted[routing.slots[:, j]]
    return out


def _needs_bounds(source: ExpertWeights, x: torch.Tensor) -> bool:
    """Whether the forward needs each expert's rows on the host: FP8's static activation
    scales (one per expert), or a matmul _grouped_mm cannot take."""
    if any(q is not None and q[0].spec.kind == "fp8" for q in source.quantizers.values()):
        return True
    dt = _autocast_dtype(x.device) or x.dtype
    return not _grouped_mm_takes(x.device, dt, [n for shape in source.shapes.values() for n in shape])


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
