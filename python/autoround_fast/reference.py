"""Plain-PyTorch oracles, one per op, written from the math in docs/numerics.md.

They compute with the same sequence of PyTorch ops (and therefore the same roundings) that
auto-round 0.15.1 uses, are differentiable with straight-through rounding, and run on any
device. backend="torch" tunes with these; the tests hold the kernels against them and
against auto-round itself.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .formats import E4M3_MAX, FP4_MAX, NVFP4_GROUP, int_num_groups

__all__ = [
    "fake_quant_nvfp4",
    "fake_quant_nvfp4_activation",
    "silu_mul_nvfp4_activation",
    "fake_quant_int",
    "masked_mse_loss",
]


def _ste(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Forward value ``rounded``, gradient of identity."""
    return (rounded - x).detach() + x


def _recip(x: torch.Tensor) -> torch.Tensor:
    """1/x with 1/0 -> 0."""
    return torch.where(x == 0, torch.zeros_like(x), 1.0 / x)


def _groups(t: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """[rows, cols] -> [rows * ceil(cols / group), group], zero padded; and the pad length."""
    rows, cols = t.shape
    pad = math.ceil(cols / group) * group - cols
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(-1, group), pad


def _ungroup(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return t.reshape(rows, -1)[:, :cols]


def _fp4(x: torch.Tensor) -> torch.Tensor:
    """Round onto the signed FP4 (e2m1) grid, half to even, straight-through per round."""
    sign = torch.sign(x)
    a = torch.abs(x)
    below2 = a < 2.0
    below4 = a < 4.0
    fine = _ste(2.0 * a, torch.round(2.0 * a)) / 2.0
    unit = _ste(a, torch.round(a))
    coarse = 2.0 * _ste(a / 2.0, torch.round(a / 2.0))
    q = fine * below2 + unit * (~below2) * below4 + coarse * (~below2) * (~below4)
    return q.clamp(-FP4_MAX, FP4_MAX) * sign


def _nvfp4_groups(x: torch.Tensor, v, coeff, global_scale: torch.Tensor):
    """x: [groups, 16] in its dtype. Returns (fp32 fake-quantized groups, fp32 scales)."""
    amax = torch.max(torch.abs(x), dim=-1, keepdim=True)[0].to(torch.float32) * coeff
    s = global_scale * (amax * _recip_scalar(FP4_MAX))
    s = torch.clamp(s, min=-E4M3_MAX, max=E4M3_MAX)
    s = _ste(s, s.to(torch.float8_e4m3fn).to(torch.float32))
    os = _recip(s * _recip(global_scale))
    y = torch.clamp(x.to(torch.float32) * os + v, -FP4_MAX, FP4_MAX)
    return _fp4(y) * _recip(os), s


def _recip_scalar(x: float) -> float:
    return 0.0 if x == 0 else 1.0 / x


def fake_quant_nvfp4(weight, v, max_scale, global_scale):
    """Oracle of :func:`autoround_fast.ops.fake_quant_nvfp4` (same arguments and results)."""
    rows, cols = weight.shape
    wg, _ = _groups(weight, NVFP4_GROUP)
    vg, _ = _groups(v, NVFP4_GROUP)
    q, s = _nvfp4_groups(wg, vg, max_scale.reshape(-1, 1), global_scale.to(torch.float32).reshape(()))
    return _ungroup(q, rows, cols).to(weight.dtype), s.reshape(rows, -1)


def fake_quant_nvfp4_activation(x, global_scale):
    """Oracle of :func:`autoround_fast.ops.fake_quant_nvfp4_activation`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xg, _ = _groups(x2, NVFP4_GROUP)
    q, _ = _nvfp4_groups(xg, 0, 1.0, global_scale.to(torch.float32).reshape(()))
    return _ungroup(q, x2.shape[0], shape[-1]).to(x.dtype).reshape(shape)


def silu_mul_nvfp4_activation(gate, up, global_scale):
    """Oracle of :func:`autoround_fast.ops.silu_mul_nvfp4_activation`: its definition."""
    return fake_quant_nvfp4_activation(torch.nn.functional.silu(gate) * up, global_scale)


def fake_quant_int(weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype=torch.float16):
    """Oracle of :func:`autoround_fast.ops.fake_quant_int` (same arguments and results)."""
    rows, cols = weight.shape
    groups = int_num_groups(cols, group_size)
    group = cols if groups == 1 else group_size
    wg, _ = _groups(weight, group)
    vg, _ = _groups(v, group)
    mn = min_scale.reshape(-1)
    mx = max_scale.reshape(-1)
    wmin = torch.clamp(wg.min(-1)[0], max=0)
    wmax = torch.clamp(wg.max(-1)[0], min=0)
    floor = 1e-5
    if sym:
        maxq = 2 ** (bits - 1)
        a = -(wmin * mn)
        b = wmax * mx
        mv = (2 * (b < a).int() - 1) * torch.max(b, a)
        s = (mv / maxq).to(scale_dtype)
        s = torch.where(s < 0, torch.clamp(s, max=-floor), torch.clamp(s, min=floor)).unsqueeze(-1)
        q = torch.clamp(_ste(wg / s + vg, torch.round(wg / s + vg)), -maxq, maxq - 1)
        out = (s * q).to(weight.dtype)
        zp = torch.zeros(rows * groups, dtype=torch.float32, device=weight.device)
    else:
        maxq = 2**bits - 1
        lo = wmin * mn
        hi = wmax * mx
        s = torch.clamp(((hi - lo) / maxq).to(scale_dtype), min=floor)
        zp = _ste(-lo / s, torch.round(-lo / s))
        s2, zp2 = s.unsqueeze(-1), zp.unsqueeze(-1)
        iw = _ste(wg / s2 + vg, torch.round(wg / s2 + vg))
        q = torch.clamp(iw + zp2, 0, maxq)
        out = (s2 * (q - zp2)).to(weight.dtype)
        s = s2
    return (
        _ungroup(out, rows, cols),
        s.reshape(rows, groups),
        zp.detach().to(torch.float32).reshape(rows, groups),
    )


def masked_mse_loss(pred, ref, mask: Optional[torch.Tensor] = None):
    """Oracle of :func:`autoround_fast.ops.masked_mse_loss`."""
    if mask is not None:
        m = mask.reshape(*pred.shape[:-1], 1).to(pred.device)
        if m.dtype.is_floating_point:
            m = m.to(pred.dtype)
        pred, ref = pred * m, ref * m
    return torch.nn.functional.mse_loss(pred.to(torch.float32), ref.to(torch.float32))


def sign_step_(param: torch.Tensor, best: torch.Tensor, grad: torch.Tensor, improved: torch.Tensor,
               lr: torch.Tensor) -> None:
    """SignRound's step on one tuned tensor, in place (docs/numerics.md#sign-step): ``best`` takes the parameters
    if this iteration's loss improved on the best so far (scored before the step), then
    SignSGD ``param -= lr * sign(grad)`` with sign(0) = 0."""
    torch.where(improved, param, best, out=best)
    param.addcmul_(grad.sign(), lr, value=-1.0)
