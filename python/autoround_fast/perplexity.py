"""Perplexity of a causal language model on fixed windows of text."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp(mean token NLL) over the windows ([n, L] token ids), each run on its own:

        PPL = exp( - sum_w sum_{t=2..L} log p(x_{w,t} | x_{w,1..t-1}) / (n (L - 1)) )

    The first token of each window has no context and is not scored. The model runs one
    window at a time, in eval mode, on the device of its first parameter; the log-softmax is
    taken in fp32 whatever the model's dtype.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for w in windows:
            ids = w[None].to(device)
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total += nll.item()
            count += ids.shape[1] - 1
    finally:
        model.train(was_training)
    return math.exp(total / count)
