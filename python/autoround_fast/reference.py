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

from .formats import (
    E4M3_MAX,
    E8M0_EXP_MAX,
    FP4_MAX,
    FP8_BLOCK,
    FP8_SCALE_MIN,
    MX_ELEMENTS,
    MX_GROUP,
    NVFP4_GROUP,
    fp8_block_grid,
    int_num_groups,
)

__all__ = [
    "fake_quant_nvfp4",
    "fake_quant_nvfp4_activation",
    "silu_mul_nvfp4_activation",
    "fake_quant_fp8",
    "fake_quant_fp8_block",
    "fake_quant_fp8_activation",
    "fake_quant_int",
    "fake_quant_mx",
    "fake_quant_mx_activation",
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
    # the padded width spelled out: reshape(rows, -1) cannot size no rows (an MoE expert
    # routed no token); contiguous, as the kernels' outputs are
    return t.reshape(rows, math.ceil(cols / t.shape[-1]) * t.shape[-1])[:, :cols].contiguous()


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


def _per_group(global_scale: torch.Tensor, cols: int) -> torch.Tensor:
    """A global scale for _nvfp4_groups: the one scalar, or each row's repeated for that row's
    groups."""
    if global_scale.numel() == 1:
        return global_scale.reshape(())
    return global_scale.reshape(-1, 1).repeat_interleave(math.ceil(cols / NVFP4_GROUP), 0)


def _recip_scalar(x: float) -> float:
    return 0.0 if x == 0 else 1.0 / x


def fake_quant_nvfp4(weight, v, max_scale, global_scale):
    """Oracle of :func:`autoround_fast.ops.fake_quant_nvfp4` (same arguments and results;
    global_scale one, or one per row)."""
    rows, cols = weight.shape
    wg, _ = _groups(weight, NVFP4_GROUP)
    vg, _ = _groups(v, NVFP4_GROUP)
    q, s = _nvfp4_groups(wg, vg, max_scale.reshape(-1, 1), _per_group(global_scale.to(torch.float32), cols))
    return _ungroup(q, rows, cols).to(weight.dtype), s.reshape(rows, -1)


def fake_quant_nvfp4_activation(x, global_scale):
    """Oracle of :func:`autoround_fast.ops.fake_quant_nvfp4_activation`: global_scale one, or
    one per row of x viewed as [rows, last dimension]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xg, _ = _groups(x2, NVFP4_GROUP)
    q, _ = _nvfp4_groups(xg, 0, 1.0, _per_group(global_scale.to(torch.float32), shape[-1]))
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


def _mx_element(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Round fp32 ``t`` (already within +-max_norm) onto the MX element grid, half to even
    (docs/numerics.md#mx). The element's own exponent is floor(log2|t|), at least the format's
    smallest normal one; it takes part in autograd through its log2, as in auto-round, so the
    gradient of an element is |q| / |t| where q is normal, 1 where subnormal, 0 at t = 0."""
    fmt = MX_ELEMENTS[bits]
    lg = torch.log2(torch.abs(t) + (t == 0).type(t.dtype))
    e = _ste(lg, torch.floor(lg)).clip(min=float(fmt.min_exp))
    unit = 2.0 ** float(fmt.mbits)
    y = t / (2.0 ** e.float()) * unit
    a = torch.abs(y)
    tie_to_odd = ((a - 0.5) % 2 == torch.zeros_like(a)).type(y.dtype)
    y = torch.sign(y) * (_ste(a + 0.5, torch.floor(a + 0.5)) - tie_to_odd)
    y = y / unit * (2.0 ** e.float())
    return torch.clamp(y, min=-fmt.max_norm, max=fmt.max_norm)


def _mx_groups(x: torch.Tensor, v, max_scale, bits: int):
    """x: fp32 [groups, 32]. Returns (fake-quantized groups, shared exponents [groups, 1]):
    the scale is 2^(floor(log2(max|x| * max_scale)) - emax), clamped to the e8m0 range."""
    fmt = MX_ELEMENTS[bits]
    m = torch.max(torch.abs(x), dim=-1, keepdim=True)[0] * max_scale
    # log2 of 1 where the group is all zeros: the same exponent as auto-round's where(), and a
    # zero gradient for max_scale where auto-round's log2 backward makes 0/0 = NaN
    # (docs/numerics.md#mx-zero-group)
    lg = torch.where(m == 0, torch.ones_like(m), torch.log2(torch.where(m == 0, torch.ones_like(m), m)))
    e = (_ste(lg, torch.floor(lg)) - fmt.emax).clamp(min=-E8M0_EXP_MAX, max=E8M0_EXP_MAX)
    scale = torch.pow(2.0, e.float())
    y = torch.clamp(x / scale + v, min=-fmt.max_norm, max=fmt.max_norm)
    return _mx_element(y, bits) * scale, e


def fake_quant_mx(weight, v, max_scale, bits):
    """Oracle of :func:`autoround_fast.ops.fake_quant_mx`: (fake-quantized weight in its dtype,
    fp32 shared exponents [rows, groups], the log2 of each group's scale)."""
    rows, cols = weight.shape
    wg, _ = _groups(weight, MX_GROUP)
    vg, _ = _groups(v, MX_GROUP)
    q, e = _mx_groups(wg.to(torch.float32), vg, max_scale.reshape(-1, 1), bits)
    return _ungroup(q, rows, cols).to(weight.dtype), e.detach().reshape(rows, -1)


def fake_quant_mx_activation(x, bits):
    """Oracle of :func:`autoround_fast.ops.fake_quant_mx_activation`: dynamic MX quantization of
    each 32-group of the last dimension, with auto-round's zero offset (which turns -0 into
    +0) and without its unit max_scale (an exact multiply)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xg, _ = _groups(x2, MX_GROUP)
    q, _ = _mx_groups(xg.to(torch.float32), 0, 1.0, bits)
    return _ungroup(q, x2.shape[0], shape[-1]).to(x.dtype).reshape(shape)


def fake_quant_fp8(weight, v, max_scale, scale_dtype=torch.float32, weight_amax=None):
    """Oracle of :func:`autoround_fast.ops.fake_quant_fp8`: FP8 (e4m3) weights with one scale
    per tensor (max_scale of one element) or per output row (one per row):
    ``scale = max(max|W| * max_scale / 448, 1/(448*512))``, rounded to ``scale_dtype`` (fp32:
    auto-round's), ``Wq = e4m3(clamp(W / scale + V, -448, 448)) * scale``
    (docs/numerics.md#fp8-weight); max|W| is ``weight_amax`` where given (one scale per
    tensor). Returns (Wq in W's dtype, the fp32 scales, [1, 1] or [rows, 1])."""
    rows, cols = weight.shape
    per_tensor = max_scale.numel() == 1
    if weight_amax is not None and not per_tensor:
        raise ValueError("fake_quant_fp8: weight_amax is for one scale per tensor")
    w = weight.reshape(1, -1) if per_tensor else weight
    # auto-round's max(|clamp(max, 0)|, |clamp(min, 0)|)
    amax = torch.amax(torch.abs(w), dim=-1) if weight_amax is None else weight_amax.reshape(1)
    scale = torch.clip((amax * max_scale.reshape(-1)).to(torch.float32) / E4M3_MAX, min=FP8_SCALE_MIN)
    scale = scale.to(scale_dtype).to(torch.float32)
    if w.dtype == torch.float16:
        w = w.to(torch.bfloat16)
    scale = scale.unsqueeze(-1)
    y = torch.clip(w / scale + v.reshape(w.shape), -E4M3_MAX, E4M3_MAX)
    q = _e4m3(y) * scale
    return q.reshape(rows, cols).to(weight.dtype), scale


def fake_quant_fp8_block(weight, v, max_scale, scale_dtype=torch.float32):
    """Oracle of :func:`autoround_fast.ops.fake_quant_fp8_block`: FP8 (e4m3) weights with one
    scale per 128 x 128 block (max_scale [ceil(rows/128), ceil(cols/128)]), each block as
    :func:`fake_quant_fp8` treats a tensor: ``scale = max(max|W_b| * max_scale_b / 448,
    1/(448*512))`` rounded to ``scale_dtype``, ``Wq = e4m3(clamp(W / scale + V, -448, 448)) *
    scale``; edge blocks take the maximum of their own elements (docs/numerics.md#fp8-block).
    Returns (Wq in W's dtype, the fp32 scales of max_scale's shape)."""
    rows, cols = weight.shape
    rb, cb = fp8_block_grid(rows, cols)
    amax = torch.amax(_blocks(torch.abs(weight), rb, cb), dim=(1, 3))
    scale = torch.clip((amax * max_scale.reshape(rb, cb)).to(torch.float32) / E4M3_MAX, min=FP8_SCALE_MIN)
    scale = scale.to(scale_dtype).to(torch.float32)
    full = scale.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    x = weight.to(torch.bfloat16) if weight.dtype == torch.float16 else weight
    y = torch.clip(x / full + v.reshape(rows, cols), -E4M3_MAX, E4M3_MAX)
    return (_e4m3(y) * full).to(weight.dtype), scale


def _blocks(t: torch.Tensor, rb: int, cb: int) -> torch.Tensor:
    """[rows, cols] zero-padded to [rb * 128, cb * 128] and viewed as [rb, 128, cb, 128]."""
    rows, cols = t.shape
    t = torch.nn.functional.pad(t, (0, cb * FP8_BLOCK - cols, 0, rb * FP8_BLOCK - rows))
    return t.reshape(rb, FP8_BLOCK, cb, FP8_BLOCK)


def _e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round onto the float8_e4m3fn grid (torch's cast), straight through."""
    return _ste(y, y.to(torch.float8_e4m3fn).to(y.dtype))


def fp8_activation_scale(act_max, max_scale, scale_dtype=torch.float32):
    """The static FP8 activation scale, ``max(act_max * max_scale / 448, 1/(448*512))`` rounded
    to ``scale_dtype``, of shape [1]."""
    scale = torch.clip((act_max.reshape(-1) * max_scale.reshape(-1)).to(torch.float32) / E4M3_MAX,
                       min=FP8_SCALE_MIN)
    return scale.to(scale_dtype).to(torch.float32)


def fake_quant_fp8_activation(x, act_max, max_scale, scale_dtype=torch.float32):
    """Oracle of :func:`autoround_fast.ops.fake_quant_fp8_activation`: static per-tensor FP8
    under :func:`fp8_activation_scale` (the calibrated maximum times its tuned max_scale),
    ``e4m3(clamp(x / scale + 0, -448, 448)) * scale`` in x's dtype
    (docs/numerics.md#fp8-activation)."""
    t = x.reshape(1, -1)
    scale = fp8_activation_scale(act_max, max_scale, scale_dtype)
    if t.dtype == torch.float16:
        t = t.to(torch.bfloat16)
    scale = scale.unsqueeze(-1)
    q = _e4m3(torch.clip(t / scale + 0, -E4M3_MAX, E4M3_MAX)) * scale
    return q.reshape(x.shape).to(x.dtype)


def masked_mse_loss(pred, ref, mask: Optional[torch.Tensor] = None):
    """Oracle of :func:`autoround_fast.ops.masked_mse_loss`."""
    if mask is not None:
        m = mask.reshape(*pred.shape[:-1], 1).to(pred.device)
        if m.dtype.is_floating_point:
            m = m.to(pred.dtype)
        pred, ref = pred * m, ref * m
    return torch.nn.functional.mse_loss(pred.to(torch.float32), ref.to(torch.float32))


def copy_if_(dst: torch.Tensor, src: torch.Tensor, flag: torch.Tensor) -> None:
    """Oracle of :func:`autoround_fast.ops.copy_if_`: ``dst = src`` where ``flag``."""
    torch.where(flag, src, dst, out=dst)


def sign_step_(param: torch.Tensor, best: Optional[torch.Tensor], grad: torch.Tensor, improved: torch.Tensor,
               lr: torch.Tensor) -> None:
    """SignRound's step on one tuned tensor, in place (docs/numerics.md#sign-step): ``best`` (where
    not None) takes the parameters if this iteration's loss improved on the best so far (scored
    before the step), then SignSGD ``param -= lr * sign(grad)`` with sign(0) = 0."""
    if best is not None:
        torch.where(improved, param, best, out=best)
    param.addcmul_(grad.sign(), lr, value=-1.0)
