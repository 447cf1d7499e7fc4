"""What each SignRound iteration uses: its learning rate (LinearLR from lr to 0) and its
samples (auto-round's IndexSampler order)."""

from __future__ import annotations

import random
import warnings
from typing import Optional, Sequence

import torch


def lr_schedule(lr: float, iters: int) -> list[float]:
    """The learning rate of every iteration: a tensor lr under LinearLR (1 -> 0), stepped by
    the scheduler class auto-round uses, so each value rounds as auto-round's does (the
    optimizer only holds the lr; the sign step itself is the loop's)."""
    dummy = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([dummy], lr=torch.tensor(lr))
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=iters)
    lrs = []
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": by design
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(iters):
            lrs.append(float(opt.param_groups[0]["lr"]))
            sched.step()
    return lrs


def batch_order(n: int, global_bs: int, iters: int, seed: int) -> list[list[int]]:
    """Sample indices of every iteration: shuffled without replacement, reshuffled when an
    epoch runs out (auto-round's IndexSampler, driven by random.Random(seed))."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    pos = 0
    out = []
    for _ in range(iters):
        if pos + global_bs > n:
            rng.shuffle(order)
            pos = 0
        out.append(order[pos: pos + global_bs])
        pos += global_bs
    return out


def checked_order(given: Optional[Sequence[Sequence[int]]], n: int, global_bs: int, iters: int,
                  seed: int) -> list[list[int]]:
    """``given`` (the batch_order option) checked against the run's shape, or the seeded order."""
    if given is None:
        return batch_order(n, global_bs, iters, seed)
    order = [list(map(int, b)) for b in given]
    if len(order) != iters or any(len(b) != global_bs or not all(0 <= i < n for i in b) for b in order):
        raise ValueError(f"tune_block: batch_order must hold {iters} lists of {global_bs} sample "
                         f"indices in [0, {n})")
    return order
