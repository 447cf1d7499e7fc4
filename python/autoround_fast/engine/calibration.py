"""Calibration statistics of a block's Linear inputs on the quantized inputs: act_max (W4A4's
static input global scale) and the imatrix (iters=0's weighted scale search)."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .expert_forward import ExpertWeights, Routing
from .experts import stacked_experts
from .inputs import BlockInputs


@dataclass
class ActStats:
    """One Linear's input statistics, fp32, updated in place (a captured graph updates the
    same tensors): ``max`` = max |x| over every token, ``imatrix`` = sum x^2 per channel."""

    max: torch.Tensor
    imatrix: torch.Tensor


class _Recorder:
    """Forward pre-hooks that accumulate ActStats, and the order the first forward called the
    Linears in (:func:`_skip_last_linear` needs it)."""

    def __init__(self, linears: dict[str, nn.Linear], device, want_max: bool, want_imatrix: bool):
        self.stats = {n: ActStats(torch.zeros((), dtype=torch.float32, device=device),
                                  torch.zeros(m.in_features, dtype=torch.float32, device=device))
                      for n, m in linears.items()}
        self.want_max, self.want_imatrix = want_max, want_imatrix
        self.order: list[str] = []
        self.recording = True
        self.hooks = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in linears.items()]

    def _hook(self, name: str):
        def hook(_m, args):
            if self.recording:
                self.order.append(name)
            x = args[0].detach()
            st = self.stats[name]
            if self.want_max and x.numel():  # an MoE expert no token of this sample was routed to
                torch.maximum(st.max, x.abs().amax().to(torch.float32), out=st.max)
            if self.want_imatrix:
                st.imatrix.add_(x.reshape(-1, x.shape[-1]).to(torch.float32).pow(2).sum(0))
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def activation_stats(block, linears: dict[str, nn.Linear], inputs: BlockInputs, autocast, hidden,
                     want_max: bool, want_imatrix: bool, cuda_graph: bool = False,
                     grouped_experts: bool = False) -> dict[str, ActStats]:
    """Per Linear input, on ``hidden`` (q_in): max |x| (exact in the input dtype, kept in fp32;
    for W4A4's input global scale) and sum x^2 per channel in fp32 (the imatrix, for iters=0).
    The pass is skipped when neither is wanted. It runs one sample at a time, as auto-round's
    values come from a per-sample pass: batched matmuls round differently (down_proj's act_max
    was 4 ulp off when this pass ran in batches, and the tuning parted ways from there).

    With ``cuda_graph`` (and the hidden states on the device) the one-sample forward is
    captured once and replayed for each sample: the same kernels on the same data, without
    the launch overhead that rules a small block's one-sample forward.

    The block's output is not used here, so after the first sample the last Linear the block
    calls (down_proj) returns zeros instead of computing its matmul: its input is recorded
    before, and no recorded Linear reads its output (:func:`_skip_last_linear`).

    With ``grouped_experts`` (act_max only) an MoE block's experts run grouped on their
    stacked weights and record their maxima on the device (:func:`.experts.stacked_experts`,
    :func:`_expert_maxima`), instead of llm-compressor's loop, which waits for the host at
    every expert."""
    rec = _Recorder(linears, inputs.device, want_max, want_imatrix)
    if not (want_max or want_imatrix):
        rec.remove()
        return rec.stats
    idx = torch.zeros(1, dtype=torch.long, device=inputs.device)

    def forward():  # sample idx; idx is set outside, so that a captured graph reads it anew
        args, kwargs = inputs.batch(idx, hidden)
        with autocast():
            block(*args, **kwargs)

    restore = contextlib.ExitStack()
    try:
        grouped = restore.enter_context(stacked_experts(
            block, inputs.device, grouped_experts and not want_imatrix, functools.partial(_expert_maxima, rec.stats)))
        with torch.no_grad():
            graphed = cuda_graph and hidden.device == inputs.device
            warm = min(2, inputs.n) if graphed else inputs.n  # real samples, each counted once
            side = torch.cuda.Stream(inputs.device) if graphed else None
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(inputs.device))
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for i in range(warm):
                    idx.fill_(i)
                    forward()
                    if i == 0:
                        rec.recording = False
                        if not grouped:  # grouped experts call no Linear: the order would miss them
                            restore.enter_context(_skip_last_linear(linears, rec.order))
            if graphed:
                torch.cuda.current_stream(inputs.device).wait_stream(side)
                _replay_per_sample(forward, idx, warm, inputs.n)
    finally:
        restore.close()
        rec.remove()
    if want_max:
        fill_uncalibrated_experts(rec.stats)
    return rec.stats


def _expert_maxima(stats: dict[str, ActStats], container: str, weights: ExpertWeights):
    """The ``record`` of a grouped experts container while calibrating: each projection's
    input max per expert, [E] fp32 tensors whose elements the experts' ActStats.max become
    (views). None where a projection's experts are only partly among ``stats`` (the container
    then runs its own loop, whose hooks record)."""
    prefix = f"{container}." if container else ""
    maxima = {}
    for p in weights.shapes:
        names = [f"{prefix}{e}.{p}" for e in range(weights.weights(p).shape[0])]
        held = [n in stats for n in names]
        if any(held) and not all(held):
            return None
        if all(held):
            maxima[p] = torch.stack([stats[n].max for n in names])
            for e, n in enumerate(names):
                stats[n].max = maxima[p][e]
    return functools.partial(_record_maxima, maxima, weights)


def _record_maxima(maxima: dict[str, torch.Tensor], weights: ExpertWeights, container, hidden_states,
                   routing: Routing, x, h) -> None:
    """max |input| per expert over the tokens llm-compressor's loop runs it on (the routed
    ones, or every token under its calibrate-all-experts flag), exact in the input's dtype,
    kept in fp32."""
    # the flag the loop itself reads (only llm-compressor's containers are grouped); imported
    # here, as the engine itself does not need llm-compressor
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag

    if not get_calibrate_all_experts_flag():
        for p, rows in (("gate_proj", x), ("up_proj", x), ("down_proj", h)):
            if p in maxima:
                maxima[p].scatter_reduce_(0, routing.experts, rows.abs().amax(-1).to(torch.float32), "amax")
        return
    top = hidden_states.abs().amax().to(torch.float32)
    for p in ("gate_proj", "up_proj"):
        if p in maxima:
            torch.maximum(maxima[p], top, out=maxima[p])
    if "down_proj" in maxima:
        down = maxima["down_proj"]
        torch.maximum(down, _down_inputs_max_all_tokens(container, weights, hidden_states), out=down)


_ALL_TOKENS_CHUNK_BYTES = 1 << 29  # the calibrate-all pass's gate, up and h, a chunk of experts at a time


def _down_inputs_max_all_tokens(container, weights: ExpertWeights, hidden_states) -> torch.Tensor:
    """Per expert, max |down_proj's input| over every token, as the loop under the
    calibrate-all-experts flag computes it (F.linear of each expert on all tokens, with its
    bias where it has one), a chunk of experts at a time."""
    wg, wu = weights.weights("gate_proj"), weights.weights("up_proj")
    bg, bu = weights.biases["gate_proj"], weights.biases["up_proj"]
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    per_expert = 3 * max(1, x.shape[0]) * wg.shape[1] * x.element_size()
    chunk = max(1, _ALL_TOKENS_CHUNK_BYTES // per_expert)
    out = []
    for start in range(0, wg.shape[0], chunk):
        experts = range(start, min(start + chunk, wg.shape[0]))
        gate = torch.stack([F.linear(x, wg[e], None if bg is None else bg[e]) for e in experts])
        up = torch.stack([F.linear(x, wu[e], None if bu is None else bu[e]) for e in experts])
        h = container._apply_gate(torch.cat([gate, up], dim=-1))
        out.append(h.abs().amax(dim=(1, 2)).to(torch.float32))
    return torch.cat(out)


def fill_uncalibrated_experts(stats: dict[str, ActStats]) -> None:
    """An MoE expert's Linear that no calibration token was routed to (max still 0) takes the
    largest max of the same projection in its sibling experts (``...experts.<i>.<proj>``), as
    auto-round's set_amax_for_uncalibrated_experts does; without it its input global scale would
    be 448 * 6 / 0. (llm-compressor's default, moe_calibrate_all_experts, runs every expert on
    every token, so none is left uncalibrated.)"""
    siblings: dict[tuple[str, str], list[str]] = {}
    for name in stats:
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
            siblings.setdefault((".".join(parts[:-2]), parts[-1]), []).append(name)
    for names in siblings.values():
        top = torch.stack([stats[n].max for n in names]).max()
        for n in names:
            if not bool(stats[n].max > 0):
                stats[n].max.copy_(top)


def _replay_per_sample(forward, idx: torch.Tensor, start: int, n: int) -> None:
    """``forward`` captured once in a CUDA graph, replayed for samples start..n-1."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    for i in range(start, n):
        idx.fill_(i)
        graph.replay()
    del graph


def reduce_over_ranks(stats: dict[str, ActStats], dist, want_max: bool, want_imatrix: bool) -> None:
    """Data parallel: every rank quantizes with the statistics of all samples."""
    for st in stats.values():
        if want_max:
            dist.all_reduce(st.max, op=dist.ReduceOp.MAX)
        if want_imatrix:
            dist.all_reduce(st.imatrix)


@contextlib.contextmanager
def _skip_last_linear(linears: dict[str, nn.Linear], order: Sequence[str]):
    """Within the ``with``, the Linear the block called last (``order``: the names its first
    forward called, in order) returns zeros of its output's shape and dtype instead of its
    matmul, if it was called once; its input hook still runs (the hook is the module's, the
    forward the instance's). Every other recorded Linear ran before it, so none reads its
    output. The module's own forward (or compressed-tensors' wrapper of it) comes back on
    the way out."""
    last = order[-1] if order else None
    if last is None or order.count(last) != 1:
        yield
        return
    mod = linears[last]
    had = mod.__dict__.get("forward")

    def zeros(x, *args, **kwargs):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return x.new_zeros((*x.shape[:-1], mod.out_features), dtype=dtype)

    mod.forward = zeros
    try:
        yield
    finally:
        if had is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = had
