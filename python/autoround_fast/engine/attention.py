"""While tuning on a GPU, a block set to eager attention runs its attention through SDPA."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch.nn as nn


@contextlib.contextmanager
def sdpa_attention(block: nn.Module, enabled: bool = True):
    """On a GPU, run the block's attention through SDPA while tuning if the model is set to
    eager attention (llm-compressor's calibration leaves it so): the same attention, but a
    fused flash kernel instead of fp32 score matrices (at 8 x 2048 tokens the eager backward
    alone costs ~20 ms per iteration); it rounds differently, so auto-round's results are
    then matched to run-to-run noise, not bit for bit. On a CPU the model's own attention
    runs (bit for bit auto-round's). Left alone: sliding windows, logit soft-capping,
    attention dropout, and any implementation other than eager."""
    swapped = []
    for m in block.modules() if enabled else ():
        if not (_implementation(m) == "eager" and _sdpa_computes(m)):
            continue
        cfg = m.config
        if all(c is not cfg for c, _ in swapped):
            swapped.append((cfg, cfg._attn_implementation))
            cfg._attn_implementation = "sdpa"
    try:
        yield
    finally:
        for cfg, old in swapped:
            cfg._attn_implementation = old


def _implementation(m: nn.Module) -> Optional[str]:
    """The attention implementation of an attention module (None for other modules)."""
    cfg = getattr(m, "config", None)
    return getattr(cfg, "_attn_implementation", None) if hasattr(m, "is_causal") and cfg is not None else None


def _sdpa_computes(m: nn.Module) -> bool:
    """SDPA computes this attention module's attention as it is (no sliding window, logit
    soft-capping or attention dropout)."""
    cfg = m.config
    return not (getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None)
                or (m.training and getattr(cfg, "attention_dropout", 0.0)))


def eager_scores(block: nn.Module, tokens: int, on_gpu: bool) -> int:
    """Elements of the score matrices (heads x tokens x tokens each) that one sample makes in
    the block's attention modules that run eagerly while tuning: eager ones that
    :func:`sdpa_attention` leaves so (all of them off a GPU); 0 where SDPA runs."""
    return sum(m.config.num_attention_heads * tokens * tokens for m in block.modules()
               if _implementation(m) == "eager" and not (on_gpu and _sdpa_computes(m)))
