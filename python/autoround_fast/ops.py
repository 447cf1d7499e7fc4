"""The op surface of autoround_fast: torch ops with fake kernels and autograd.

Each op has a CPU and a CUDA kernel (csrc/) and a plain-PyTorch oracle in
:mod:`autoround_fast.reference`. The forward passes compute, bit for bit, what auto-round
0.15.1 computes; the backward passes are its autograd with straight-through rounding.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _lib  # noqa: F401  (loads the library)
from .formats import E4M3_MAX, FP4_MAX, NVFP4_GROUP, SCALE_DTYPE_CODES, int_num_groups

__all__ = [
    "fake_quant_nvfp4",
    "fake_quant_nvfp4_activation",
    "silu_mul_nvfp4_activation",
    "fake_quant_int",
    "masked_mse_loss",
    "sign_step_",
    "nvfp4_global_scale",
    "shared_nvfp4_global_scale",
    "SCALE_DTYPE_CODES",
]

_ops = torch.ops.autoround_fast


def _scale_dtype_code(scale_dtype: torch.dtype) -> int:
    try:
        return SCALE_DTYPE_CODES[scale_dtype]
    except KeyError:
        raise ValueError(
            f"fake_quant_int: scale_dtype must be one of float16, bfloat16, float32; got {scale_dtype}"
        ) from None


# ---------------------------------------------------------------------------------------
# fake kernels (shapes and dtypes only), for torch.compile and meta tensors
# ---------------------------------------------------------------------------------------


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4")
def _(weight, v, max_scale, global_scale):
    rows, cols = weight.shape
    return torch.empty_like(weight), weight.new_empty(
        (rows, math.ceil(cols / NVFP4_GROUP)), dtype=torch.float32
    )


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4_backward")
def _(grad, weight, v, max_scale, global_scale):
    return torch.empty_like(v), torch.empty_like(max_scale)


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4_activation")
def _(x, global_scale):
    return torch.empty_like(x)


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4_activation_backward")
def _(grad, x, global_scale):
    return torch.empty_like(x)


@torch.library.register_fake("autoround_fast::silu_mul_nvfp4_activation")
def _(gate, up, global_scale):
    return torch.empty_like(gate)


@torch.library.register_fake("autoround_fast::silu_mul_nvfp4_activation_backward")
def _(grad, gate, up, global_scale):
    return torch.empty_like(gate), torch.empty_like(up)


# The CPU implementation of the fused SiLU-gate op is its definition: PyTorch's own silu,
# multiply and silu_backward around our activation kernels (the fusion only pays on the GPU,
# where silu_act_cuda.cu computes the same bits in one pass).
@torch.library.impl("autoround_fast::silu_mul_nvfp4_activation", "CPU")
def _(gate, up, global_scale):
    return _ops.fake_quant_nvfp4_activation(torch.nn.functional.silu(gate) * up, global_scale)


@torch.library.impl("autoround_fast::silu_mul_nvfp4_activation_backward", "CPU")
def _(grad, gate, up, global_scale):
    s = torch.nn.functional.silu(gate)
    dm = _ops.fake_quant_nvfp4_activation_backward(grad, s * up, global_scale)
    return torch.ops.aten.silu_backward(dm * up, gate), dm * s


@torch.library.register_fake("autoround_fast::fake_quant_int")
def _(weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype):
    rows, cols = weight.shape
    groups = int_num_groups(cols, group_size)
    dtype = {c: d for d, c in SCALE_DTYPE_CODES.items()}[scale_dtype]
    return (
        torch.empty_like(weight),
        weight.new_empty((rows, groups), dtype=dtype),
        weight.new_empty((rows, groups), dtype=torch.float32),
    )


@torch.library.register_fake("autoround_fast::fake_quant_int_backward")
def _(grad, weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype):
    return torch.empty_like(v), torch.empty_like(min_scale), torch.empty_like(max_scale)


@torch.library.register_fake("autoround_fast::masked_mse_loss")
def _(pred, ref, mask):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.register_fake("autoround_fast::masked_mse_loss_backward")
def _(grad, pred, ref, mask):
    return torch.empty_like(pred)


@torch.library.register_fake("autoround_fast::sign_step_")
def _(param, best, grad, improved, lr):
    return None


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4_backward_step_")
def _(grad, weight, v, max_scale, global_scale, best_v, best_max_scale, improved, lr):
    return None


@torch.library.register_fake("autoround_fast::fake_quant_int_backward_step_")
def _(grad, weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype, best_v, best_min_scale,
      best_max_scale, improved, lr):
    return None


# ---------------------------------------------------------------------------------------
# autograd: the backward kernels are ops too
# ---------------------------------------------------------------------------------------


def _nvfp4_setup(ctx, inputs, output):
    weight, v, max_scale, global_scale = inputs
    ctx.save_for_backward(weight, v, max_scale, global_scale)


def _nvfp4_backward(ctx, grad_out, grad_scale):
    weight, v, max_scale, global_scale = ctx.saved_tensors
    gv, gms = _ops.fake_quant_nvfp4_backward(
        grad_out.contiguous(), weight, v, max_scale, global_scale
    )
    return None, gv, gms, None


torch.library.register_autograd(
    "autoround_fast::fake_quant_nvfp4", _nvfp4_backward, setup_context=_nvfp4_setup
)


def _act_setup(ctx, inputs, output):
    x, global_scale = inputs
    ctx.save_for_backward(x, global_scale)


def _act_backward(ctx, grad_out):
    x, global_scale = ctx.saved_tensors
    return _ops.fake_quant_nvfp4_activation_backward(grad_out.contiguous(), x, global_scale), None


torch.library.register_autograd(
    "autoround_fast::fake_quant_nvfp4_activation", _act_backward, setup_context=_act_setup
)


def _silu_act_setup(ctx, inputs, output):
    gate, up, global_scale = inputs
    ctx.save_for_backward(gate, up, global_scale)


def _silu_act_backward(ctx, grad_out):
    gate, up, global_scale = ctx.saved_tensors
    dgate, dup = _ops.silu_mul_nvfp4_activation_backward(grad_out.contiguous(), gate, up, global_scale)
    return dgate, dup, None


torch.library.register_autograd(
    "autoround_fast::silu_mul_nvfp4_activation", _silu_act_backward, setup_context=_silu_act_setup
)


def _int_setup(ctx, inputs, output):
    weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype = inputs
    ctx.save_for_backward(weight, v, min_scale, max_scale)
    ctx.args = (bits, group_size, sym, scale_dtype)


def _int_backward(ctx, grad_out, grad_scale, grad_zp):
    weight, v, min_scale, max_scale = ctx.saved_tensors
    gv, gmn, gmx = _ops.fake_quant_int_backward(
        grad_out.contiguous(), weight, v, min_scale, max_scale, *ctx.args
    )
    return None, gv, gmn, gmx, None, None, None, None


torch.library.register_autograd(
    "autoround_fast::fake_quant_int", _int_backward, setup_context=_int_setup
)


def _loss_setup(ctx, inputs, output):
    pred, ref, mask = inputs
    ctx.save_for_backward(pred, ref, mask)


def _loss_backward(ctx, grad):
    pred, ref, mask = ctx.saved_tensors
    return _ops.masked_mse_loss_backward(grad.contiguous(), pred, ref, mask), None, None


torch.library.register_autograd(
    "autoround_fast::masked_mse_loss", _loss_backward, setup_context=_loss_setup
)


# ---------------------------------------------------------------------------------------
# the sign step inside the backward (the tuning engine's loop, one micro-batch)
# ---------------------------------------------------------------------------------------


class _Nvfp4Stepped(torch.autograd.Function):
    """fake_quant_nvfp4 whose backward steps v and max_scale in place (see step_in_backward)."""

    @staticmethod
    def forward(ctx, weight, v, max_scale, global_scale, best_v, best_ms, improved, lr, on_step):
        q, scale = _ops.fake_quant_nvfp4(weight, v, max_scale, global_scale)
        ctx.save_for_backward(weight, v, max_scale, global_scale)
        # not saved tensors: improved and lr are written after this forward, before the backward
        ctx.step = (best_v, best_ms, improved, lr, on_step)
        ctx.mark_non_differentiable(scale)
        return q, scale

    @staticmethod
    def backward(ctx, grad_q, grad_scale):
        weight, v, ms, gs = ctx.saved_tensors
        best_v, best_ms, improved, lr, on_step = ctx.step
        _ops.fake_quant_nvfp4_backward_step_(grad_q.contiguous(), weight, v, ms, gs, best_v, best_ms,
                                             improved, lr)
        on_step()
        return (None,) * 9


class _IntStepped(torch.autograd.Function):
    """fake_quant_int whose backward steps v, min_scale and max_scale in place."""

    @staticmethod
    def forward(ctx, weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype, best_v, best_mn,
                best_mx, improved, lr, on_step):
        q, scale, zp = _ops.fake_quant_int(weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype)
        ctx.save_for_backward(weight, v, min_scale, max_scale)
        ctx.args = (bits, group_size, sym, scale_dtype)
        ctx.step = (best_v, best_mn, best_mx, improved, lr, on_step)
        ctx.mark_non_differentiable(scale, zp)
        return q, scale, zp

    @staticmethod
    def backward(ctx, grad_q, grad_scale, grad_zp):
        weight, v, mn, mx = ctx.saved_tensors
        best_v, best_mn, best_mx, improved, lr, on_step = ctx.step
        _ops.fake_quant_int_backward_step_(grad_q.contiguous(), weight, v, mn, mx, *ctx.args, best_v, best_mn,
                                           best_mx, improved, lr)
        on_step()
        return (None,) * 14


def step_in_backward_nvfp4(weight, v, max_scale, global_scale, best, improved, lr, on_step):
    """The tuning loop's :func:`fake_quant_nvfp4` when SignRound's step runs inside the
    backward: the forward is the same; the backward, instead of returning the gradients of
    ``v`` and ``max_scale``, applies :func:`sign_step_` to each with them (``best`` = [best_v,
    best_max_scale], ``improved`` and ``lr`` one-element device tensors, read when the backward
    runs) and calls ``on_step()``. Equal bit for bit to the gradients followed by the steps, in
    one kernel: the gradients never go through memory. Inputs are not validated (the engine's
    own tensors). Valid only where each gradient is final when the backward runs: one forward
    per tensor and step (no accumulation over micro-batches, no reduction over ranks)."""
    return _Nvfp4Stepped.apply(weight, v, max_scale, global_scale, best[0], best[1], improved, lr, on_step)


def step_in_backward_int(weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype, best, improved, lr,
                         on_step):
    """:func:`step_in_backward_nvfp4` for :func:`fake_quant_int` (``best`` = [best_v,
    best_min_scale, best_max_scale]; ``scale_dtype`` a torch dtype)."""
    return _IntStepped.apply(weight, v, min_scale, max_scale, int(bits), int(group_size), bool(sym),
                             _scale_dtype_code(scale_dtype), best[0], best[1], best[2], improved, lr, on_step)


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


# Arguments are validated here, before the op: an exception thrown inside a stable-ABI kernel
# crashes torch 2.11 (seen on the GPU machine), so the C++ checks are only a last resort.
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def _check_float(t: torch.Tensor, name: str, op: str) -> None:
    if t.dtype not in _FLOATS:
        _fail(op, f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_param(ref: torch.Tensor, t: torch.Tensor, numel: int, name: str, op: str) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} is on {t.device} but the first input is on {ref.device}")
    if t.dtype != torch.float32:
        _fail(op, f"{name} must be float32, got {t.dtype}")
    if t.numel() != numel:
        _fail(op, f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")


def _check_weight(weight: torch.Tensor, op: str) -> None:
    if weight.dim() != 2:
        _fail(op, f"weight must be 2-D [out, in], got {weight.dim()} dims")
    _check_float(weight, "weight", op)


def _check_pair(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str, op: str) -> None:
    """a non-empty and of a float dtype; b of a's shape, dtype and device."""
    if a.dim() < 1 or a.numel() == 0:
        _fail(op, f"{a_name} must be a non-empty tensor")
    _check_float(a, a_name, op)
    if b.shape != a.shape or b.dtype != a.dtype or b.device != a.device:
        _fail(op, f"{b_name} must match {a_name} ({tuple(a.shape)}, {a.dtype}, {a.device}); got "
                  f"({tuple(b.shape)}, {b.dtype}, {b.device})")


def _check_finite(t: torch.Tensor, what: str, op: str) -> None:
    # One reduction (a sync on the GPU): the tuning engine calls torch.ops directly after
    # checking each weight once. Skipped while torch.compile traces (it would break the graph).
    if torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(t).all()):
        _fail(op, f"{what} has non-finite values (NaN or Inf); refusing to quantize it")


def fake_quant_nvfp4(
    weight: torch.Tensor,
    v: torch.Tensor,
    max_scale: torch.Tensor,
    global_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 fake quantization with AutoRound's learnable offset and clipping scale.

    For each group of 16 consecutive input features (the last group padded with zeros),
    in fp32::

        m  = max|W_g| * max_scale_g
        s  = e4m3(clamp(gs * (m * (1/6)), -448, 448))
        os = 1 / (s * (1/gs))                 (1/0 -> 0)
        Wq = fp4(clamp(W * os + V, -6, 6)) * (1/os)

    where fp4 rounds half-to-even onto {0, .5, 1, 1.5, 2, 3, 4, 6}. Differentiable in ``v``
    and ``max_scale`` with straight-through rounding (auto-round's ``round_ste``).

    Args:
        weight: [out, in] bf16, fp16 or fp32.
        v: fp32, the weight's shape.
        max_scale: fp32 [out, ceil(in / 16)] (used as given; AutoRound clamps it to [0, 1]).
        global_scale: fp32 scalar, see :func:`nvfp4_global_scale`.

    Returns:
        (the fake-quantized weight in the weight's dtype, the e4m3-rounded scales as fp32
        [out, ceil(in / 16)]).
    """
    op = "fake_quant_nvfp4"
    _check_weight(weight, op)
    rows, cols = weight.shape
    _check_param(weight, v, rows * cols, "v", op)
    _check_param(weight, max_scale, rows * math.ceil(cols / NVFP4_GROUP), "max_scale", op)
    _check_param(weight, global_scale, 1, "global_scale", op)
    _check_finite(weight, "weight", op)
    return _ops.fake_quant_nvfp4(
        weight.contiguous(), v.contiguous(), max_scale.contiguous(), global_scale.reshape(1)
    )


def fake_quant_nvfp4_activation(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quantization of activations (W4A4): dynamic per-16 e4m3 scales of the
    current ``x`` under a static global scale, V = 0 and max_scale = 1 (see
    :func:`fake_quant_nvfp4`). Groups run along the last dimension. Differentiable in ``x``
    as auto-round's STE is: straight through the rounding, and through max|x_g| into each
    group's first argmax.
    """
    op = "fake_quant_nvfp4_activation"
    if x.dim() < 1 or x.numel() == 0:
        _fail(op, "x must be a non-empty tensor")
    _check_float(x, "x", op)
    _check_param(x, global_scale, 1, "global_scale", op)
    _check_finite(x, "x", op)
    return _ops.fake_quant_nvfp4_activation(x.contiguous(), global_scale.reshape(1))


def silu_mul_nvfp4_activation(gate: torch.Tensor, up: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """``fake_quant_nvfp4_activation(F.silu(gate) * up, global_scale)`` in one pass: the input
    of a SiLU-gated MLP's down projection under W4A4, without the product going through
    memory (the backward recomputes it from ``gate`` and ``up``). The same bits, forward and
    backward, as that eager composition: silu in fp32 rounded to the dtype, the product
    rounded to the dtype, then :func:`fake_quant_nvfp4_activation`; the gradients are
    autograd's through the three. Differentiable in ``gate`` and ``up``.

    Args:
        gate, up: one shape and float dtype; groups of 16 run along the last dimension.
        global_scale: fp32 scalar, the activation's static global scale.
    """
    op = "silu_mul_nvfp4_activation"
    _check_pair(gate, up, "gate", "up", op)
    _check_param(gate, global_scale, 1, "global_scale", op)
    _check_finite(gate, "gate", op)
    _check_finite(up, "up", op)
    return _ops.silu_mul_nvfp4_activation(gate.contiguous(), up.contiguous(), global_scale.reshape(1))


def fake_quant_int(
    weight: torch.Tensor,
    v: torch.Tensor,
    min_scale: torch.Tensor,
    max_scale: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer fake quantization with AutoRound's learnable offset and min/max scales.

    Per group (``group_size`` features; -1 or a size beyond the row: one group per row; a
    ragged last group is padded), with wmin = min(W_g, 0), wmax = max(W_g, 0)::

        sym:  maxq = 2^(bits-1); A = -wmin * min_scale; B = wmax * max_scale
              s = cast(sign * max(A, B) / maxq), sign = +1 if B < A else -1, |s| >= 1e-5
              Wq = s * clamp(round(W / s + V), -maxq, maxq - 1)
        asym: maxq = 2^bits - 1; s = max(cast((wmax*max_scale - wmin*min_scale) / maxq), 1e-5)
              zp = round(-wmin * min_scale / s)
              Wq = s * (clamp(round(W / s + V) + zp, 0, maxq) - zp)

    ``cast`` rounds to ``scale_dtype`` (auto-round: fp16). Differentiable in ``v``,
    ``min_scale`` and ``max_scale``.

    Returns:
        (fake-quantized weight in the weight's dtype, scale [out, groups] in scale_dtype,
        zero point [out, groups] fp32; zeros when ``sym``).
    """
    op = "fake_quant_int"
    if not 2 <= int(bits) <= 8:
        _fail(op, f"bits must be in 2..8, got {bits}")
    if not (group_size == -1 or group_size > 0):
        _fail(op, f"group_size must be -1 (per row) or positive, got {group_size}")
    code = _scale_dtype_code(scale_dtype)
    _check_weight(weight, op)
    rows, cols = weight.shape
    n_scales = rows * int_num_groups(cols, group_size)
    _check_param(weight, v, rows * cols, "v", op)
    _check_param(weight, min_scale, n_scales, "min_scale", op)
    _check_param(weight, max_scale, n_scales, "max_scale", op)
    _check_finite(weight, "weight", op)
    return _ops.fake_quant_int(
        weight.contiguous(),
        v.contiguous(),
        min_scale.contiguous(),
        max_scale.contiguous(),
        int(bits),
        int(group_size),
        bool(sym),
        code,
    )


def masked_mse_loss(
    pred: torch.Tensor, ref: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """AutoRound's block loss: ``mean((float(pred * m) - float(ref * m))^2)`` over every
    element, with m the per-token mask (1 where the token counts) broadcast over the last
    dimension; the product is taken in pred's dtype, the rest in fp32. Differentiable in
    ``pred``. ``mask`` has one entry per token (pred.numel() / pred.shape[-1]).
    """
    op = "masked_mse_loss"
    _check_pair(pred, ref, "pred", "ref", op)
    if mask is not None:
        tokens = pred.numel() // pred.shape[-1]
        if mask.numel() != tokens:
            _fail(op, f"mask must have one entry per token ({tokens}), got {mask.numel()}")
        mask = mask.to(device=pred.device, dtype=torch.float32).contiguous().reshape(-1)
    return _ops.masked_mse_loss(pred.contiguous(), ref.contiguous(), mask)


def sign_step_(param: torch.Tensor, best: torch.Tensor, grad: torch.Tensor, improved: torch.Tensor,
               lr: torch.Tensor) -> None:
    """SignRound's step on one tuned tensor, in place, fused with the best-parameter copy::

        if improved: best = param          (the parameters that scored the best loss so far)
        param = param - lr * sign(grad)    (sign(0) = sign(NaN) = 0)

    Equal bit for bit to ``torch.where(improved, param, best, out=best)`` followed by
    ``param.addcmul_(grad.sign(), lr, value=-1)``, in one pass instead of three. ``param``,
    ``best`` and ``grad`` are contiguous fp32 tensors of one shape; ``improved`` (bool) and
    ``lr`` (fp32) are one-element tensors on the same device, read by the kernel, so a
    captured CUDA graph replays the step with the values of the moment.
    """
    op = "sign_step_"
    if param.dtype != torch.float32 or not param.is_contiguous():
        _fail(op, f"param must be a contiguous float32 tensor, got {param.dtype}")
    for name, t in (("best", best), ("grad", grad)):
        if t.shape != param.shape or not t.is_contiguous():
            _fail(op, f"{name} must be contiguous with param's shape {tuple(param.shape)}, "
                      f"got {tuple(t.shape)}")
        _check_param(param, t, param.numel(), name, op)
    _check_param(param, lr, 1, "lr", op)
    if improved.dtype != torch.bool or improved.numel() != 1 or improved.device != param.device:
        _fail(op, f"improved must be one bool on {param.device}, got {improved.dtype} "
                  f"{tuple(improved.shape)} on {improved.device}")
    _ops.sign_step_(param, best, grad, improved.reshape(1), lr.reshape(1))


def nvfp4_global_scale(tensor: torch.Tensor) -> torch.Tensor:
    """NVFP4 global scale ``448 * 6 / max|tensor|`` in fp32 (0 for an all-zero tensor)."""
    amax = tensor.detach().to(torch.float32).abs().amax()
    recip = torch.where(amax == 0, torch.zeros_like(amax), 1.0 / amax)
    return (E4M3_MAX * FP4_MAX) * recip


def shared_nvfp4_global_scale(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One global scale for layers fused at inference (q/k/v, gate/up): the minimum of
    their own global scales, so that none of them overflows the e4m3 scale range."""
    scales = [nvfp4_global_scale(t) for t in tensors]
    return torch.stack(scales).amin()
