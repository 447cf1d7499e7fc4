"""Optimized RTN for iters=0: auto-round's imatrix-weighted search of the scales, for NVFP4,
MX and symmetric INT (asymmetric INT stays plain RTN, as in auto-round)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops
from ..formats import MX_GROUP, NVFP4_GROUP
from .linear import TunedLinear

_IMATRIX_PAD = 1e-5  # the weight auto-round gives the padding of a ragged group
_SCALE_FLOOR = 1e-5  # |scale| floor of auto-round's symmetric INT
_MX_TRIALS = (0.5, 2.0)  # max_scales tried after 1.0: an MX scale only moves at powers of two


def _weighted_group_error(imatrix: Optional[torch.Tensor], w32: torch.Tensor, group: int):
    """err(q): per group of ``group`` inputs, sum(imatrix * (q - W)^2) on the fp32 weight (no
    weights where imatrix is None), the padding of a ragged last group weighted as auto-round
    weights it."""
    out_f, in_f = w32.shape
    pad = -in_f % group
    qw = 1.0 if imatrix is None else nn.functional.pad(
        imatrix.to(torch.float32).reshape(1, -1).expand(out_f, -1), (0, pad), value=_IMATRIX_PAD)

    def err(q):
        return (nn.functional.pad((q - w32) ** 2, (0, pad)) * qw).reshape(out_f, -1, group).sum(-1)

    return err


def opt_rtn_nvfp4(tl: TunedLinear, imatrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 16-group, the max_scale in {0.50, ..., 1.51} (1.0 first, ties keep the earlier)
    minimising sum(imatrix * (Wq - W)^2), searched on the fp32 weight under its own global
    scale, then applied under the layer's (possibly shared) global scale. Returns (weight, scale)."""
    w = tl.linear.weight
    w32 = w.to(torch.float32)
    own_gs = ops.nvfp4_global_scale(w32).reshape(1)
    group_error = _weighted_group_error(imatrix, w32, NVFP4_GROUP)
    zeros_v = torch.zeros_like(tl.v)

    def err(ms):
        return group_error(tl.backend.nvfp4(w32, zeros_v, ms, own_gs)[0])

    best_ms = torch.ones_like(tl.max_scale)
    best = err(best_ms)
    for k in range(50, 152):
        if k == 100:
            continue
        ms = torch.full_like(best_ms, k / 100.0)
        e = err(ms)
        better = e < best
        best = torch.where(better, e, best)
        best_ms = torch.where(better, ms, best_ms)
    return tl.backend.nvfp4(w, zeros_v, best_ms, tl.global_scale)  # max_scale may exceed 1


def opt_rtn_mx(tl: TunedLinear, imatrix: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 32-group, the max_scale in {1, 0.5, 2} (in that order, a later one taken only when
    strictly better) minimising sum((Wq - W)^2), or sum(imatrix * (Wq - W)^2) given one, on
    the fp32 weight, without the offset V. Returns (weight, shared exponent). auto-round
    collects no imatrix for MX (docs/numerics.md#opt-rtn): the engine passes none."""
    w = tl.linear.weight
    bits = tl.spec.bits
    w32 = w.to(torch.float32)
    err = _weighted_group_error(imatrix, w32, MX_GROUP)
    zeros_v = torch.zeros_like(tl.v)
    best_ms = torch.ones_like(tl.max_scale)
    best = err(tl.backend.mx(w32, zeros_v, best_ms, bits)[0])
    for trial in _MX_TRIALS:
        ms = torch.full_like(best_ms, trial)
        e = err(tl.backend.mx(w32, zeros_v, ms, bits)[0])
        better = e < best
        best = torch.where(better, e, best)
        best_ms = torch.where(better, ms, best_ms)
    return tl.backend.mx(w, zeros_v, best_ms, bits)


def _reciprocal(t: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / t, and 0 where |t| < eps."""
    safe = t.abs() >= eps
    return torch.where(safe, 1.0 / torch.where(safe, t, torch.ones_like(t)), torch.zeros_like(t))


def _int_sym_grid(bits: int) -> tuple[float, range]:
    """The step and the k of auto-round's symmetric grid: step 0.01 over +-0.9 for 2 bits,
    else maxq*0.75/100 over +-maxq*0.75."""
    if bits == 2:
        return 0.01, range(-90, 91)
    span = 2 ** (bits - 1) * 0.75
    step = span / 200 * 2
    n = int(span / step)
    return step, range(-n, n + 1)


def opt_rtn_int_sym(tl: TunedLinear, imatrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the scale 1/iscale, iscale = -(maxq - step*k)/m for m the group's signed
    absolute maximum and k in a symmetric grid around 0 (:func:`_int_sym_grid`), that
    minimises sum(imatrix * (s * clamp(round(W / s), -maxq, maxq - 1) - W)^2); k = 0 first,
    ties keep the earlier. The search runs in the weight's dtype, the error in fp32, as
    auto-round's does. Returns (weight, scale)."""
    spec = tl.spec
    w = tl.linear.weight
    out_f, in_f = w.shape
    groups = spec.num_groups(in_f)
    g = in_f if groups == 1 else spec.group_size
    pad = groups * g - in_f
    x = nn.functional.pad(w, (0, pad)).reshape(-1, g)
    qw = nn.functional.pad(imatrix.to(torch.float32), (0, pad), value=_IMATRIX_PAD).reshape(1, groups, g)
    qw = qw.expand(out_f, -1, -1).reshape(-1, g)
    maxq = 2 ** (spec.bits - 1)
    eps = 1e-5 if x.dtype == torch.float16 else 1e-30
    recip_m = _reciprocal(torch.take_along_dim(x, x.abs().argmax(-1, keepdim=True), -1), eps)

    def trial(level):
        iscale = -level * recip_m
        scale = _reciprocal(iscale, eps)
        q = torch.clamp(torch.round(iscale * x), -maxq, maxq - 1)
        return scale, (((scale * q - x).to(torch.float32)) ** 2 * qw).sum(-1)

    step, ks = _int_sym_grid(spec.bits)
    best_s, best_e = trial(maxq)
    for k in ks:
        if k == 0:
            continue
        s_k, e_k = trial(maxq - step * k)
        better = e_k < best_e
        best_s = torch.where(better.unsqueeze(-1), s_k, best_s)
        best_e = torch.where(better, e_k, best_e)
    best_s = torch.where(best_s < 0, torch.clamp(best_s, max=-_SCALE_FLOOR), torch.clamp(best_s, min=_SCALE_FLOOR))
    q = torch.clamp(torch.round(x / best_s), -maxq, maxq - 1)
    wq = (q * best_s).reshape(out_f, -1)[:, :in_f]
    return wq, best_s.reshape(out_f, groups).to(spec.scale_dtype)
