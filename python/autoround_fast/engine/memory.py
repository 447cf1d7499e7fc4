"""Whether a block's tuning fits its device, and what to give up when it does not.

An estimate, made before any tensor is allocated, of the most the block's run adds on the
device, over its two heaviest phases:
- the tuning loop: the tunables of every Linear (V and its gradient in fp32; the fake-quantized
  weight kept for the backward, unless the backward makes it again (then one unit of them at a
  time), and the best iteration's, in the block's dtype), the cached
  activations not there yet (each [N, L, H] in the block's dtype: :func:`live_caches` of them
  at once; those the caller already holds on the device are spent, not needed), and one
  micro-batch's forward and backward (what
  each Linear reads and writes, the norms and residuals, twice over for the backward's
  transients; an MoE expert run grouped only on its share of the tokens, top_k / E; the score
  matrices of an attention that runs eagerly, as GPT-OSS's with its sinks and sliding windows);
- the reference pass before it: the fp inputs, the quantized inputs and the reference outputs
  at once, and one micro-batch's forward.
Where that does not fit, the caches go to host memory (each iteration then copies its batch
over); where that is still too much, the micro-batch is halved and the steps accumulate
gradients over more of them (the same samples per step); where even one sample does not fit, a
clear error, never a crash out of memory half-way through the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

TUNABLE_FP32_BYTES = 4 + 4  # per weight element: V and its gradient
WQ_COPIES = 2  # fake-quantized weights in the block's dtype: the one saved for the backward, the best one
# per attention score of an eagerly run attention: the fp32 softmax and its cast, saved for the
# backward, and the backward's fp32 gradient of the scores
EAGER_SCORE_BYTES = 4 + 2 + 4
BACKWARD_FACTOR = 2  # a micro-batch's backward holds about as much again as its forward saved
MARGIN = 0.05  # of the device's memory, left for the allocator's fragmentation and the library
CACHES = 3  # fp inputs, quantized inputs, reference outputs (then the quantized outputs in their place)


@dataclass(frozen=True)
class Fit:
    """Where the caches live, the micro-batch and the accumulation steps; ``note`` says what
    changed and why ("" when nothing did)."""

    cache_on_host: bool
    batch_size: int
    accumulate: int
    note: str = ""


def live_caches(first_block: bool, release_inputs: bool) -> int:
    """The [N, L, H] caches a block holds at once while it tunes: the quantized inputs and the
    reference outputs (whose place the quantized outputs take after the loop), and the fp inputs
    unless they are released after the reference pass (``release_inputs``) or are themselves the
    quantized inputs (a first block)."""
    return CACHES - 1 if first_block or release_inputs else CACHES


@dataclass(frozen=True)
class BlockMemory:
    """What the estimate knows of a block: its Linears; the calibration's samples, tokens and
    hidden size, in ``elem``-byte elements; ``first_block``: its fp inputs are its quantized
    inputs; ``release_inputs``: the fp inputs go after the reference pass (:func:`live_caches`);
    ``resident``: caches the caller already holds on the device (they stay there wherever the
    others go, or are the released fp inputs); ``shares``: the share of the tokens a Linear computes
    on, where not every token (an MoE expert run grouped: top_k / E); ``scores``: the attention
    scores one sample makes in eagerly run attention (attention.eager_scores);
    ``remade``: the Linears whose fake-quantized weights the backward makes again instead of
    holding them (TuneOptions.remake_weights), in the units it makes one at a time (an MoE
    projection's stacked experts)."""

    linears: dict[str, nn.Linear]
    n_samples: int
    tokens: int
    hidden: int
    elem: int
    first_block: bool = False
    release_inputs: bool = False
    resident: int = 0
    shares: dict[str, float] = field(default_factory=dict)
    scores: int = 0
    remade: tuple[tuple[str, ...], ...] = ()

    def bytes(self, batch: int, caches_on_device: bool) -> int:
        """The estimate above for micro-batches of ``batch`` samples: the larger of its phases."""
        forward = self._forward(batch)
        scores = batch * self.scores * EAGER_SCORE_BYTES
        per_weight = TUNABLE_FP32_BYTES + WQ_COPIES * self.elem
        tunables = sum(m.weight.numel() for m in self.linears.values()) * per_weight - self._not_held()
        live = live_caches(self.first_block, self.release_inputs)
        loop = tunables + self._caches(live, batch, caches_on_device) + BACKWARD_FACTOR * forward + scores
        at_reference = live_caches(self.first_block, release_inputs=False)  # the fp inputs are still held
        return max(loop, self._caches(at_reference, batch, caches_on_device) + forward + scores)

    def _not_held(self) -> int:
        """Bytes of the fake-quantized weights made again in the backward, less the largest
        unit's, which is there while its matmul's backward runs."""
        units = [sum(self.linears[n].weight.numel() for n in unit) for unit in self.remade]
        return (sum(units) - max(units, default=0)) * self.elem

    def _caches(self, live: int, batch: int, on_device: bool) -> int:
        """Bytes of the caches not yet on the device, ``live`` held at once (on the host: the
        two staged micro-batches on the device)."""
        row = self.tokens * self.hidden * self.elem
        return max(live - self.resident, 0) * self.n_samples * row if on_device else 2 * batch * row

    def _forward(self, batch: int) -> int:
        """Bytes one micro-batch's forward holds through the Linears, norms and residuals (saved
        for the backward while tuning)."""
        per_token = sum((m.in_features + m.out_features) * self.shares.get(n, 1.0) for n, m in self.linears.items())
        per_token += 4 * self.hidden
        return int(batch * self.tokens * per_token * self.elem)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def device_budget(device: torch.device) -> Optional[int]:
    """Bytes the block may still take on ``device``: what the GPU has free plus what PyTorch's
    allocator holds unused, less the margin; None (no limit) off a GPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + held - MARGIN * total)


def fit(block: BlockMemory, batch: int, accumulate: int, budget: Optional[int], can_cache_on_host: bool) -> Fit:
    """The first of: everything on the device; the caches on the host (``can_cache_on_host``:
    the device is a GPU and the caller left cache_device unset); the micro-batch halved (while
    it divides) with the accumulation doubled. A ValueError if none fits."""
    need = block.bytes
    if budget is None or need(batch, True) <= budget:
        return Fit(False, batch, accumulate)
    why = f"the block's tuning needs about {_size(need(batch, True))} and {_size(budget)} is free"
    on_device = not can_cache_on_host
    if not on_device and need(batch, False) <= budget:
        return Fit(True, batch, accumulate, f"{why}: the cached activations go to host memory")
    b, acc = batch, accumulate
    while b % 2 == 0 and need(b, on_device) > budget:
        b, acc = b // 2, acc * 2
    if need(b, on_device) <= budget:
        where = "in host memory" if not on_device else "on the device"
        return Fit(not on_device, b, acc, f"{why}: the cached activations {where}, micro-batches of {b} "
                                          f"with {acc} accumulation steps (was {batch} and {accumulate})")
    raise ValueError(f"tune_block: {why}, and even micro-batches of {b} with the caches "
                     f"{'on the device' if on_device else 'in host memory'} need {_size(need(b, on_device))}; "
                     "free memory on the card, or spread the block over GPUs (device_ids)")
