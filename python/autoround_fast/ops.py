"""The op surface of autoround_fast: torch ops with fake kernels and autograd.

Each op has a CPU and a CUDA kernel (csrc/, registered in csrc/torch_bindings.cpp) and a
plain-PyTorch oracle in :mod:`autoround_fast.reference`. The forward passes compute, bit for
bit, what auto-round 0.15.1 computes; the backward passes are its autograd with
straight-through rounding.

One block per op: its fake kernel (shapes and dtypes, for torch.compile and meta tensors),
its autograd (``torch.library.register_autograd``; the kernels a backward runs are ops too)
and its typed wrapper, which checks the arguments and says what is wrong before the op runs.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ._lib import has_cuda_kernels  # importing _lib loads the library
from .formats import (
    E4M3_MAX,
    FP4_MAX,
    FP8_BLOCK,
    INT_GROUP_PER_ROW,
    MX_ELEMENTS,
    MX_GROUP,
    NVFP4_GROUP,
    SCALE_DTYPE_CODES,
    fp8_block_grid,
    int_num_groups,
    mx_num_groups,
    nvfp4_num_groups,
)

__all__ = [
    "fake_quant_nvfp4",
    "step_in_backward_nvfp4",
    "fake_quant_nvfp4_activation",
    "silu_mul_nvfp4_activation",
    "fake_quant_fp8",
    "fake_quant_fp8_block",
    "fake_quant_fp8_activation",
    "fake_quant_int",
    "step_in_backward_int",
    "fake_quant_mx",
    "fake_quant_mx_activation",
    "masked_mse_loss",
    "sign_step_",
    "copy_if_",
    "nvfp4_global_scale",
    "shared_nvfp4_global_scale",
    "has_cuda_kernels",
    "int_num_groups",
    "mx_num_groups",
    "fp8_block_grid",
    "NVFP4_GROUP",
    "FP8_BLOCK",
    "MX_GROUP",
    "FP4_MAX",
    "E4M3_MAX",
    "SCALE_DTYPE_CODES",
]

_ops = torch.ops.autoround_fast


# ---------------------------------------------------------------------------------------
# argument checks, shared by the wrappers and the fake kernels
# ---------------------------------------------------------------------------------------

# The wrappers check before the op: an exception thrown inside a stable-ABI kernel crashes
# torch 2.11 (seen on the GPU machine), so the C++ checks are only a last resort. The fake
# kernels run the same checks through torch._check, where sizes may be symbolic.
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_DTYPES = {code: dtype for dtype, code in SCALE_DTYPE_CODES.items()}


def _require(ok, op: str, msg: str, fake: bool) -> None:
    """A ValueError naming the op (a wrapper), or torch._check (a fake kernel)."""
    if fake:
        torch._check(ok, lambda: f"{op}: {msg}")
    elif not ok:
        raise ValueError(f"{op}: {msg}")


def _check_float(t: torch.Tensor, name: str, op: str, fake: bool = False) -> None:
    _require(t.dtype in _FLOATS, op, f"{name} must be float32, bfloat16 or float16, got {t.dtype}", fake)


def _check_input(t: torch.Tensor, name: str, op: str, fake: bool = False) -> None:
    """Non-empty, of a float dtype."""
    _require(t.dim() >= 1 and t.numel() != 0, op, f"{name} must be a non-empty tensor", fake)
    _check_float(t, name, op, fake)


def _check_activation(t: torch.Tensor, name: str, op: str, fake: bool = False) -> None:
    """Of a float dtype with a non-empty last dimension; zero rows are an activation of no tokens
    (an MoE expert the batch routes none to), which quantizes to itself."""
    _require(t.dim() >= 1 and t.shape[-1] != 0, op, f"{name} must have a non-empty last dimension", fake)
    _check_float(t, name, op, fake)


def _check_param(ref: torch.Tensor, t: torch.Tensor, numel: int, name: str, op: str, fake: bool = False) -> None:
    """float32 with ``numel`` elements, on ref's device."""
    _require(t.device == ref.device, op, f"{name} is on {t.device} but the first input is on {ref.device}", fake)
    _require(t.dtype == torch.float32, op, f"{name} must be float32, got {t.dtype}", fake)
    _require(t.numel() == numel, op, f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})",
             fake)


def _check_weight(weight: torch.Tensor, op: str, fake: bool = False) -> None:
    _require(weight.dim() == 2, op, f"weight must be 2-D [out, in], got {weight.dim()} dims", fake)
    _check_float(weight, "weight", op, fake)


def _check_pair(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str, op: str, fake: bool = False,
                check=_check_input) -> None:
    """a passes ``check``; b of a's shape, dtype and device."""
    check(a, a_name, op, fake)
    _require(b.shape == a.shape and b.dtype == a.dtype and b.device == a.device, op,
             f"{b_name} must match {a_name} ({tuple(a.shape)}, {a.dtype}, {a.device}); got "
             f"({tuple(b.shape)}, {b.dtype}, {b.device})", fake)


def _check_improved(ref: torch.Tensor, improved: torch.Tensor, op: str, fake: bool = False) -> None:
    _require(improved.dtype == torch.bool and improved.numel() == 1 and improved.device == ref.device, op,
             f"improved must be one bool on {ref.device}, got {improved.dtype} {tuple(improved.shape)} on "
             f"{improved.device}", fake)


def _check_finite(t: torch.Tensor, what: str, op: str) -> None:
    # One reduction (a sync on the GPU): the tuning engine calls torch.ops directly after
    # checking each weight once. Skipped while torch.compile traces (it would break the graph).
    if torch.compiler.is_compiling():
        return
    _require(bool(torch.isfinite(t).all()), op, f"{what} has non-finite values (NaN or Inf); refusing to quantize it",
             fake=False)


def _check_weight_amax(amax: torch.Tensor, op: str) -> None:
    # a maximum of |W| given by the caller (one element): finite and >= 0, as the CPU op checks
    # it; one sync, skipped while torch.compile traces
    if torch.compiler.is_compiling():
        return
    m = amax.item()
    _require(math.isfinite(m), op, "weight_amax has non-finite values (NaN or Inf); refusing to quantize it",
             fake=False)
    _require(m >= 0, op, f"weight_amax must be >= 0 (a maximum of |W|), got {m}", fake=False)


def _check_grad_like(grad: torch.Tensor, like: torch.Tensor, op: str) -> None:
    """A backward's incoming gradient: like the forward input it belongs to (fake kernels)."""
    _require(grad.dtype == like.dtype and grad.numel() == like.numel(), op,
             f"grad must have dtype {like.dtype} and {like.numel()} elements, got {grad.dtype} and {grad.numel()}",
             fake=True)


def _check_step_targets(op: str, improved: torch.Tensor, lr: torch.Tensor,
                        tunables_and_bests: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """What a backward that steps in place writes and reads: each best like its tunable, one
    bool ``improved`` and one float32 ``lr`` (fake kernels)."""
    for name, tunable, best in tunables_and_bests:
        _check_param(tunable, best, tunable.numel(), name, op, fake=True)
    ref = tunables_and_bests[0][1]
    _check_param(ref, lr, 1, "lr", op, fake=True)
    _check_improved(ref, improved, op, fake=True)


def _after_backward(out: torch.Tensor, on_step: Callable[[], None]) -> None:
    """Calls ``on_step()`` once the backward of the op that produced ``out`` has run. An op's
    schema cannot carry a Python callable, so the callback rides on the op's autograd node as a
    hook that runs after it (none when no gradient is recorded: then no backward runs)."""
    if out.grad_fn is not None:
        def hook(grad_inputs, grad_outputs):
            on_step()

        out.grad_fn.register_hook(hook)


# ---------------------------------------------------------------------------------------
# fake_quant_nvfp4: NVFP4 weights
# ---------------------------------------------------------------------------------------


def _check_nvfp4(op: str, weight, v, max_scale, global_scale, fake: bool = False) -> None:
    _check_weight(weight, op, fake)
    rows, cols = weight.shape
    _check_param(weight, v, rows * cols, "v", op, fake)
    _check_param(weight, max_scale, rows * nvfp4_num_groups(cols), "max_scale", op, fake)
    _check_global_scale(weight, global_scale, rows, op, fake)


def _check_global_scale(like, global_scale, rows: int, op: str, fake: bool) -> None:
    """An NVFP4 global scale: one fp32, or one per row."""
    _require(global_scale.numel() in (1, rows), op, f"global_scale must have 1 or {rows} (one per row) elements, "
             f"got {global_scale.numel()} (shape {tuple(global_scale.shape)})", fake)
    _check_param(like, global_scale, 1 if global_scale.numel() == 1 else rows, "global_scale", op, fake)


def _nvfp4_outputs(weight):
    rows, cols = weight.shape
    return torch.empty_like(weight), weight.new_empty((rows, nvfp4_num_groups(cols)), dtype=torch.float32)


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4")
def _(weight, v, max_scale, global_scale):
    _check_nvfp4("fake_quant_nvfp4", weight, v, max_scale, global_scale, fake=True)
    return _nvfp4_outputs(weight)


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4_backward")
def _(grad, weight, v, max_scale, global_scale):
    op = "fake_quant_nvfp4_backward"
    _check_nvfp4(op, weight, v, max_scale, global_scale, fake=True)
    _check_grad_like(grad, weight, op)
    return torch.empty_like(v), torch.empty_like(max_scale)


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
        global_scale: fp32 scalar, see :func:`nvfp4_global_scale`; or one per row, which
            quantizes each row as the scalar of its row would (the experts of an MoE
            projection stacked by rows, each under its own).

    Returns:
        (the fake-quantized weight in the weight's dtype, the e4m3-rounded scales as fp32
        [out, ceil(in / 16)]).
    """
    op = "fake_quant_nvfp4"
    _check_nvfp4(op, weight, v, max_scale, global_scale)
    _check_finite(weight, "weight", op)
    return _ops.fake_quant_nvfp4(
        weight.contiguous(), v.contiguous(), max_scale.contiguous(), global_scale.reshape(-1).contiguous()
    )


# The sign step inside the backward (the tuning engine's loop, one micro-batch):
# fake_quant_nvfp4_stepped is fake_quant_nvfp4 whose backward, the C++ op
# fake_quant_nvfp4_backward_step_, steps v and max_scale in place instead of returning their
# gradients. It is defined here, not in C++: its forward is fake_quant_nvfp4's, and its other
# arguments only ride to the backward. Its autograd is registered as every other op's; the
# caller's on_step callback, which no schema can carry, is a hook on its node (_after_backward).


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4_backward_step_")
def _(grad, weight, v, max_scale, global_scale, best_max_scale, improved, lr):
    op = "fake_quant_nvfp4_backward_step_"
    _check_nvfp4(op, weight, v, max_scale, global_scale, fake=True)
    _check_grad_like(grad, weight, op)
    _check_step_targets(op, improved, lr, [("best_max_scale", max_scale, best_max_scale)])


torch.library.define(
    "autoround_fast::fake_quant_nvfp4_stepped",
    "(Tensor weight, Tensor v, Tensor max_scale, Tensor global_scale, Tensor best_max_scale, "
    "Tensor improved, Tensor lr) -> (Tensor, Tensor)",
)


@torch.library.impl("autoround_fast::fake_quant_nvfp4_stepped", "default")
def _(weight, v, max_scale, global_scale, best_max_scale, improved, lr):
    return _ops.fake_quant_nvfp4(weight, v, max_scale, global_scale)


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4_stepped")
def _(weight, v, max_scale, global_scale, best_max_scale, improved, lr):
    op = "fake_quant_nvfp4_stepped"
    _check_nvfp4(op, weight, v, max_scale, global_scale, fake=True)
    _check_step_targets(op, improved, lr, [("best_max_scale", max_scale, best_max_scale)])
    return _nvfp4_outputs(weight)


def _nvfp4_stepped_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])  # weight, v, max_scale, global_scale
    # best_max_scale, improved, lr: not saved tensors, as improved and lr are written after
    # this forward, before the backward
    ctx.step = inputs[4:]
    ctx.mark_non_differentiable(output[1])


def _nvfp4_stepped_backward(ctx, grad_q, grad_scale):
    weight, v, max_scale, global_scale = ctx.saved_tensors
    _ops.fake_quant_nvfp4_backward_step_(grad_q.contiguous(), weight, v, max_scale, global_scale, *ctx.step)
    return (None,) * 7


torch.library.register_autograd(
    "autoround_fast::fake_quant_nvfp4_stepped", _nvfp4_stepped_backward, setup_context=_nvfp4_stepped_setup
)


def step_in_backward_nvfp4(weight, v, max_scale, global_scale, best, improved, lr, on_step):
    """The tuning loop's :func:`fake_quant_nvfp4` when SignRound's step runs inside the
    backward: the forward is the same; the backward, instead of returning the gradients of
    ``v`` and ``max_scale``, applies :func:`sign_step_` to each with them (``best`` =
    [best_max_scale]: V keeps no best copy, the engine keeps the best fake-quantized weight;
    ``improved`` and ``lr`` one-element device tensors, read when the backward runs) and calls
    ``on_step()``. Equal bit for bit to the gradients followed by the steps, in
    one kernel: the gradients never go through memory. Inputs are not validated (the engine's
    own tensors). Valid only where each gradient is final when the backward runs: one forward
    per tensor and step (no accumulation over micro-batches, no reduction over ranks)."""
    q, scale = _ops.fake_quant_nvfp4_stepped(weight, v, max_scale, global_scale, best[0], improved, lr)
    _after_backward(q, on_step)
    return q, scale


# ---------------------------------------------------------------------------------------
# fake_quant_nvfp4_activation: NVFP4 activations (W4A4)
# ---------------------------------------------------------------------------------------


def _check_act(op: str, x, global_scale, fake: bool = False) -> None:
    """x an activation; global_scale one fp32, or one per row of x viewed as [rows, last dimension]."""
    _check_activation(x, "x", op, fake)
    _check_global_scale(x, global_scale, x.numel() // x.shape[-1], op, fake)


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4_activation")
def _(x, global_scale):
    _check_act("fake_quant_nvfp4_activation", x, global_scale, fake=True)
    return torch.empty_like(x)


@torch.library.register_fake("autoround_fast::fake_quant_nvfp4_activation_backward")
def _(grad, x, global_scale):
    op = "fake_quant_nvfp4_activation_backward"
    _check_act(op, x, global_scale, fake=True)
    _check_grad_like(grad, x, op)
    return torch.empty_like(x)


def _act_setup(ctx, inputs, output):
    x, global_scale = inputs
    ctx.save_for_backward(x, global_scale)


def _act_backward(ctx, grad_out):
    x, global_scale = ctx.saved_tensors
    return _ops.fake_quant_nvfp4_activation_backward(grad_out.contiguous(), x, global_scale), None


torch.library.register_autograd(
    "autoround_fast::fake_quant_nvfp4_activation", _act_backward, setup_context=_act_setup
)


def fake_quant_nvfp4_activation(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quantization of activations (W4A4): dynamic per-16 e4m3 scales of the
    current ``x`` under a static global scale, V = 0 and max_scale = 1 (see
    :func:`fake_quant_nvfp4`). Groups run along the last dimension. Differentiable in ``x``
    as auto-round's STE is: straight through the rounding, and through max|x_g| into each
    group's first argmax. ``global_scale``: one, or one per row of ``x`` viewed as [rows, last
    dimension] (the sorted rows of several MoE experts, each under its own), which equals
    quantizing each row alone under its scale.
    """
    op = "fake_quant_nvfp4_activation"
    _check_act(op, x, global_scale)
    _check_finite(x, "x", op)
    return _ops.fake_quant_nvfp4_activation(x.contiguous(), global_scale.reshape(-1).contiguous())


# ---------------------------------------------------------------------------------------
# silu_mul_nvfp4_activation: the down projection's input of a SiLU-gated MLP under W4A4
# ---------------------------------------------------------------------------------------


def _check_silu_mul(op: str, gate, up, global_scale, fake: bool = False) -> None:
    _check_pair(gate, up, "gate", "up", op, fake, check=_check_activation)
    _check_param(gate, global_scale, 1, "global_scale", op, fake)


@torch.library.register_fake("autoround_fast::silu_mul_nvfp4_activation")
def _(gate, up, global_scale):
    _check_silu_mul("silu_mul_nvfp4_activation", gate, up, global_scale, fake=True)
    return torch.empty_like(gate)


@torch.library.register_fake("autoround_fast::silu_mul_nvfp4_activation_backward")
def _(grad, gate, up, global_scale):
    op = "silu_mul_nvfp4_activation_backward"
    _check_silu_mul(op, gate, up, global_scale, fake=True)
    _check_grad_like(grad, gate, op)
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
    _check_silu_mul(op, gate, up, global_scale)
    _check_finite(gate, "gate", op)
    _check_finite(up, "up", op)
    return _ops.silu_mul_nvfp4_activation(gate.contiguous(), up.contiguous(), global_scale.reshape(1))


# ---------------------------------------------------------------------------------------
# fake_quant_fp8: FP8 (e4m3) weights, one scale per tensor or per row
# ---------------------------------------------------------------------------------------


def _check_fp8_weight(op: str, weight, v, max_scale, scale_dtype, fake: bool = False) -> None:
    """What every FP8 weight op checks but max_scale's count (each op's own). ``scale_dtype`` a
    torch dtype (the fake kernels map the op's code back to it)."""
    _check_scale_dtype(scale_dtype, op, fake)
    _check_weight(weight, op, fake)
    rows, cols = weight.shape
    _require(rows * cols != 0, op, "weight must be non-empty", fake)
    _check_param(weight, v, rows * cols, "v", op, fake)
    _require(max_scale.device == weight.device, op,
             f"max_scale is on {max_scale.device} but the first input is on {weight.device}", fake)
    _require(max_scale.dtype == torch.float32, op, f"max_scale must be float32, got {max_scale.dtype}", fake)


def _check_fp8(op: str, weight, v, max_scale, scale_dtype, weight_amax=None, fake: bool = False) -> None:
    _check_fp8_weight(op, weight, v, max_scale, scale_dtype, fake)
    rows = weight.shape[0]
    _require(max_scale.numel() == 1 or max_scale.numel() == rows, op,
             f"max_scale must have 1 element (one scale for the tensor) or {rows} (one per row), got "
             f"{max_scale.numel()} (shape {tuple(max_scale.shape)})", fake)
    if weight_amax is not None:
        _require(max_scale.numel() == 1, op,
                 f"weight_amax is for one scale per tensor, but max_scale has {max_scale.numel()} elements", fake)
        _check_param(weight, weight_amax, 1, "weight_amax", op, fake)


def _fp8_outputs(weight, max_scale):
    groups = 1 if max_scale.numel() == 1 else weight.shape[0]
    return torch.empty_like(weight), weight.new_empty((groups, 1), dtype=torch.float32)


@torch.library.register_fake("autoround_fast::fake_quant_fp8")
def _(weight, v, max_scale, scale_dtype, weight_amax=None):
    _check_fp8("fake_quant_fp8", weight, v, max_scale, _SCALE_DTYPES.get(scale_dtype, scale_dtype), weight_amax,
               fake=True)
    return _fp8_outputs(weight, max_scale)


@torch.library.register_fake("autoround_fast::fake_quant_fp8_backward")
def _(grad, weight, v, max_scale, scale_dtype, weight_amax=None):
    op = "fake_quant_fp8_backward"
    _check_fp8(op, weight, v, max_scale, _SCALE_DTYPES.get(scale_dtype, scale_dtype), weight_amax, fake=True)
    _check_grad_like(grad, weight, op)
    return torch.empty_like(v), torch.empty_like(max_scale)


def _fp8_setup(ctx, inputs, output):
    """fake_quant_fp8's and fake_quant_fp8_block's: (weight, v, max_scale, scale_dtype) and,
    fake_quant_fp8's only, weight_amax."""
    weight, v, max_scale, scale_dtype, *weight_amax = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(weight, v, max_scale, *weight_amax)
    ctx.scale_dtype = scale_dtype


def _fp8_backward(ctx, grad_out, grad_scale):
    weight, v, max_scale, weight_amax = ctx.saved_tensors
    gv, gms = _ops.fake_quant_fp8_backward(grad_out.contiguous(), weight, v, max_scale, ctx.scale_dtype, weight_amax)
    return None, gv, gms, None, None


torch.library.register_autograd("autoround_fast::fake_quant_fp8", _fp8_backward, setup_context=_fp8_setup)


def fake_quant_fp8(
    weight: torch.Tensor,
    v: torch.Tensor,
    max_scale: torch.Tensor,
    scale_dtype: torch.dtype = torch.float32,
    weight_amax: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 (e4m3) fake quantization with AutoRound's learnable offset and clipping scale, one
    scale for the whole weight (``max_scale`` of one element) or one per output row (one per
    row), as auto-round's ``quant_fp8_sym`` (group_size 0 or -1). Per group, in fp32::

        s  = cast(max(max|W_g| * max_scale_g / 448, 1 / (448 * 512)))
        Wq = e4m3(clamp(W / s + V, -448, 448)) * s

    where ``cast`` rounds to ``scale_dtype`` and back (float32: auto-round's), ``e4m3`` rounds
    half to even onto the float8_e4m3fn grid, and an fp16 W is rounded to bf16 before the
    division (auto-round's guard against NaN gradients; max|W| is of the fp16 values).
    Differentiable in ``v`` and ``max_scale``, straight through the rounding.

    Args:
        weight: [out, in] bf16, fp16 or fp32.
        v: fp32, the weight's shape.
        max_scale: fp32, one element or ``out`` (e.g. [out, 1]).
        scale_dtype: float32, bfloat16 or float16, the dtype the scale is stored in.
        weight_amax: with one scale per tensor, max|W| as fp32 of one element (auto-round's
            ``tensor_max``), which spares the kernels a pass over W where W stays the same
            between calls (a tuned weight); it is used as given. None: computed from W.

    Returns:
        (the fake-quantized weight in its dtype, the scales as fp32 [1, 1] or [out, 1]).
    """
    op = "fake_quant_fp8"
    _check_fp8(op, weight, v, max_scale, scale_dtype, weight_amax)
    _check_finite(weight, "weight", op)
    if weight_amax is not None:
        _check_weight_amax(weight_amax, op)
    return _ops.fake_quant_fp8(weight.contiguous(), v.contiguous(), max_scale.contiguous(),
                               SCALE_DTYPE_CODES[scale_dtype], None if weight_amax is None else weight_amax.reshape(1))


# ---------------------------------------------------------------------------------------
# fake_quant_fp8_block: FP8 (e4m3) weights, one scale per 128 x 128 block (FP8_BLOCK)
# ---------------------------------------------------------------------------------------


def _check_fp8_block(op: str, weight, v, max_scale, scale_dtype, fake: bool = False) -> None:
    _check_fp8_weight(op, weight, v, max_scale, scale_dtype, fake)
    rb, cb = fp8_block_grid(*weight.shape)
    _require(max_scale.numel() == rb * cb, op,
             f"max_scale must have {rb * cb} elements (one per {FP8_BLOCK} x {FP8_BLOCK} block, a [{rb}, {cb}] "
             f"grid), got {max_scale.numel()} (shape {tuple(max_scale.shape)})", fake)


@torch.library.register_fake("autoround_fast::fake_quant_fp8_block")
def _(weight, v, max_scale, scale_dtype):
    op = "fake_quant_fp8_block"
    _check_fp8_block(op, weight, v, max_scale, _SCALE_DTYPES.get(scale_dtype, scale_dtype), fake=True)
    return torch.empty_like(weight), weight.new_empty(fp8_block_grid(*weight.shape), dtype=torch.float32)


@torch.library.register_fake("autoround_fast::fake_quant_fp8_block_backward")
def _(grad, weight, v, max_scale, scale_dtype):
    op = "fake_quant_fp8_block_backward"
    _check_fp8_block(op, weight, v, max_scale, _SCALE_DTYPES.get(scale_dtype, scale_dtype), fake=True)
    _check_grad_like(grad, weight, op)
    return torch.empty_like(v), torch.empty_like(max_scale)


def _fp8_block_backward(ctx, grad_out, grad_scale):
    weight, v, max_scale = ctx.saved_tensors
    gv, gms = _ops.fake_quant_fp8_block_backward(grad_out.contiguous(), weight, v, max_scale, ctx.scale_dtype)
    return None, gv, gms, None


torch.library.register_autograd("autoround_fast::fake_quant_fp8_block", _fp8_block_backward,
                                setup_context=_fp8_setup)


def fake_quant_fp8_block(
    weight: torch.Tensor,
    v: torch.Tensor,
    max_scale: torch.Tensor,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 (e4m3) fake quantization with one scale per 128 x 128 block of the weight
    (llm-compressor's FP8_BLOCK), each block quantized as :func:`fake_quant_fp8` quantizes a
    whole tensor. Per block b, in fp32::

        s_b = cast(max(max|W_b| * max_scale_b / 448, 1 / (448 * 512)))
        Wq  = e4m3(clamp(W / s_b + V, -448, 448)) * s_b

    with ``cast`` and the fp16-to-bf16 rounding as in :func:`fake_quant_fp8`. The last row and
    column of blocks may be partial (rows or columns not multiples of 128): their maximum is
    over their own elements. Differentiable in ``v`` and ``max_scale``, straight through the
    rounding.

    Args:
        weight: [out, in] bf16, fp16 or fp32.
        v: fp32, the weight's shape.
        max_scale: fp32, one element per block: ``fp8_block_grid(out, in)`` (e.g. that shape).
        scale_dtype: float32, bfloat16 or float16, the dtype the scale is stored in.

    Returns:
        (the fake-quantized weight in its dtype, the scales as fp32 of shape
        ``fp8_block_grid(out, in)``).
    """
    op = "fake_quant_fp8_block"
    _check_fp8_block(op, weight, v, max_scale, scale_dtype)
    _check_finite(weight, "weight", op)
    return _ops.fake_quant_fp8_block(weight.contiguous(), v.contiguous(), max_scale.contiguous(),
                                     SCALE_DTYPE_CODES[scale_dtype])


# ---------------------------------------------------------------------------------------
# fake_quant_fp8_activation: FP8 (e4m3) activations, one static scale
# ---------------------------------------------------------------------------------------


def _check_fp8_act(op: str, x, act_max, max_scale, scale_dtype, fake: bool = False) -> None:
    _check_scale_dtype(scale_dtype, op, fake)
    _check_activation(x, "x", op, fake)
    _check_param(x, act_max, 1, "act_max", op, fake)
    _check_param(x, max_scale, 1, "max_scale", op, fake)


@torch.library.register_fake("autoround_fast::fake_quant_fp8_activation")
def _(x, act_max, max_scale, scale_dtype):
    op = "fake_quant_fp8_activation"
    _check_fp8_act(op, x, act_max, max_scale, _SCALE_DTYPES.get(scale_dtype, scale_dtype), fake=True)
    return torch.empty_like(x)


@torch.library.register_fake("autoround_fast::fake_quant_fp8_activation_backward")
def _(grad, x, act_max, max_scale, scale_dtype):
    op = "fake_quant_fp8_activation_backward"
    _check_fp8_act(op, x, act_max, max_scale, _SCALE_DTYPES.get(scale_dtype, scale_dtype), fake=True)
    _check_grad_like(grad, x, op)
    return torch.empty_like(x), torch.empty_like(max_scale)


def _fp8_act_setup(ctx, inputs, output):
    x, act_max, max_scale, scale_dtype = inputs
    ctx.save_for_backward(x, act_max, max_scale)
    ctx.scale_dtype = scale_dtype


def _fp8_act_backward(ctx, grad_out):
    x, act_max, max_scale = ctx.saved_tensors
    gx, gms = _ops.fake_quant_fp8_activation_backward(grad_out.contiguous(), x, act_max, max_scale, ctx.scale_dtype)
    return gx, None, gms, None


torch.library.register_autograd(
    "autoround_fast::fake_quant_fp8_activation", _fp8_act_backward, setup_context=_fp8_act_setup
)


def fake_quant_fp8_activation(
    x: torch.Tensor,
    act_max: torch.Tensor,
    max_scale: torch.Tensor,
    scale_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Static per-tensor FP8 (e4m3) fake quantization of activations, as auto-round's
    ``quant_fp8_sym`` with tensor_max = ``act_max`` (the calibrated maximum) and group_size 0::

        s = cast(max(act_max * max_scale / 448, 1 / (448 * 512)))
        q = e4m3(clamp(x / s + 0, -448, 448)) * s        (in x's dtype)

    with ``cast`` and the fp16-to-bf16 rounding as in :func:`fake_quant_fp8`. Differentiable in
    ``x`` (straight through the rounding, zero where the clamp is active) and ``max_scale``
    (not in ``act_max``, a calibration statistic).

    Args:
        x: any shape, bf16, fp16 or fp32.
        act_max, max_scale: fp32, one element each.
        scale_dtype: float32, bfloat16 or float16, the dtype the scale is stored in.
    """
    op = "fake_quant_fp8_activation"
    _check_fp8_act(op, x, act_max, max_scale, scale_dtype)
    _check_finite(x, "x", op)
    _check_finite(act_max, "act_max", op)
    return _ops.fake_quant_fp8_activation(x.contiguous(), act_max.reshape(1), max_scale.reshape(1),
                                          SCALE_DTYPE_CODES[scale_dtype])


# ---------------------------------------------------------------------------------------
# fake_quant_int: INT weights (W4A16 and the like)
# ---------------------------------------------------------------------------------------


def _check_scale_dtype(scale_dtype, op: str, fake: bool = False) -> None:
    _require(scale_dtype in SCALE_DTYPE_CODES, op,
             f"scale_dtype must be one of float16, bfloat16, float32; got {scale_dtype}", fake)


def _check_int(op: str, weight, v, min_scale, max_scale, bits, group_size, scale_dtype, fake: bool = False) -> None:
    """``scale_dtype`` a torch dtype (the fake kernels map the op's code back to it)."""
    _require(2 <= int(bits) <= 8, op, f"bits must be in 2..8, got {bits}", fake)
    _require(group_size == INT_GROUP_PER_ROW or group_size > 0, op,
             f"group_size must be -1 (per row) or positive, got {group_size}", fake)
    _check_scale_dtype(scale_dtype, op, fake)
    _check_weight(weight, op, fake)
    rows, cols = weight.shape
    n_scales = rows * int_num_groups(cols, group_size)
    _check_param(weight, v, rows * cols, "v", op, fake)
    _check_param(weight, min_scale, n_scales, "min_scale", op, fake)
    _check_param(weight, max_scale, n_scales, "max_scale", op, fake)


def _check_int_fake(op: str, weight, v, min_scale, max_scale, bits, group_size, scale_dtype) -> None:
    """:func:`_check_int` in a fake kernel, whose ``scale_dtype`` is the op's dtype code."""
    _check_int(op, weight, v, min_scale, max_scale, bits, group_size, _SCALE_DTYPES.get(scale_dtype, scale_dtype),
               fake=True)


def _int_outputs(weight, group_size, scale_dtype):
    rows, cols = weight.shape
    groups = int_num_groups(cols, group_size)
    return (
        torch.empty_like(weight),
        weight.new_empty((rows, groups), dtype=_SCALE_DTYPES[scale_dtype]),
        weight.new_empty((rows, groups), dtype=torch.float32),
    )


@torch.library.register_fake("autoround_fast::fake_quant_int")
def _(weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype):
    _check_int_fake("fake_quant_int", weight, v, min_scale, max_scale, bits, group_size, scale_dtype)
    return _int_outputs(weight, group_size, scale_dtype)


@torch.library.register_fake("autoround_fast::fake_quant_int_backward")
def _(grad, weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype):
    op = "fake_quant_int_backward"
    _check_int_fake(op, weight, v, min_scale, max_scale, bits, group_size, scale_dtype)
    _check_grad_like(grad, weight, op)
    return torch.empty_like(v), torch.empty_like(min_scale), torch.empty_like(max_scale)


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
    _check_int(op, weight, v, min_scale, max_scale, bits, group_size, scale_dtype)
    _check_finite(weight, "weight", op)
    return _ops.fake_quant_int(
        weight.contiguous(),
        v.contiguous(),
        min_scale.contiguous(),
        max_scale.contiguous(),
        int(bits),
        int(group_size),
        bool(sym),
        SCALE_DTYPE_CODES[scale_dtype],
    )


# The sign step inside the backward, as for NVFP4: fake_quant_int_stepped is fake_quant_int
# whose backward, fake_quant_int_backward_step_, steps v, min_scale and max_scale in place.


@torch.library.register_fake("autoround_fast::fake_quant_int_backward_step_")
def _(grad, weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype, best_min_scale, best_max_scale,
      improved, lr):
    op = "fake_quant_int_backward_step_"
    _check_int_fake(op, weight, v, min_scale, max_scale, bits, group_size, scale_dtype)
    _check_grad_like(grad, weight, op)
    _check_step_targets(op, improved, lr, [("best_min_scale", min_scale, best_min_scale),
                                           ("best_max_scale", max_scale, best_max_scale)])


torch.library.define(
    "autoround_fast::fake_quant_int_stepped",
    "(Tensor weight, Tensor v, Tensor min_scale, Tensor max_scale, int bits, int group_size, bool sym, "
    "int scale_dtype, Tensor best_min_scale, Tensor best_max_scale, Tensor improved, Tensor lr) "
    "-> (Tensor, Tensor, Tensor)",
)


@torch.library.impl("autoround_fast::fake_quant_int_stepped", "default")
def _(weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype, best_min_scale, best_max_scale, improved,
      lr):
    return _ops.fake_quant_int(weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype)


@torch.library.register_fake("autoround_fast::fake_quant_int_stepped")
def _(weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype, best_min_scale, best_max_scale, improved,
      lr):
    op = "fake_quant_int_stepped"
    _check_int_fake(op, weight, v, min_scale, max_scale, bits, group_size, scale_dtype)
    _check_step_targets(op, improved, lr, [("best_min_scale", min_scale, best_min_scale),
                                           ("best_max_scale", max_scale, best_max_scale)])
    return _int_outputs(weight, group_size, scale_dtype)


def _int_stepped_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])  # weight, v, min_scale, max_scale
    ctx.args = inputs[4:8]  # bits, group_size, sym, scale_dtype
    ctx.step = inputs[8:]  # best_min_scale, best_max_scale, improved, lr (as for NVFP4)
    ctx.mark_non_differentiable(output[1], output[2])


def _int_stepped_backward(ctx, grad_q, grad_scale, grad_zp):
    weight, v, min_scale, max_scale = ctx.saved_tensors
    _ops.fake_quant_int_backward_step_(grad_q.contiguous(), weight, v, min_scale, max_scale, *ctx.args, *ctx.step)
    return (None,) * 12


torch.library.register_autograd(
    "autoround_fast::fake_quant_int_stepped", _int_stepped_backward, setup_context=_int_stepped_setup
)


def step_in_backward_int(weight, v, min_scale, max_scale, bits, group_size, sym, scale_dtype, best, improved, lr,
                         on_step):
    """:func:`step_in_backward_nvfp4` for :func:`fake_quant_int` (``best`` = [best_min_scale,
    best_max_scale]; ``scale_dtype`` a torch dtype)."""
    _check_scale_dtype(scale_dtype, "fake_quant_int")
    q, scale, zp = _ops.fake_quant_int_stepped(weight, v, min_scale, max_scale, int(bits), int(group_size), bool(sym),
                                               SCALE_DTYPE_CODES[scale_dtype], best[0], best[1], improved, lr)
    _after_backward(q, on_step)
    return q, scale, zp


# ---------------------------------------------------------------------------------------
# fake_quant_mx: MX weights (MXFP4, MXFP8)
# ---------------------------------------------------------------------------------------


def _check_mx_bits(bits, op: str, fake: bool = False) -> None:
    _require(bits in MX_ELEMENTS, op, f"bits must be 4 (MXFP4) or 8 (MXFP8), got {bits}", fake)


def _check_mx(op: str, weight, v, max_scale, bits, fake: bool = False) -> None:
    _check_mx_bits(bits, op, fake)
    _check_weight(weight, op, fake)
    rows, cols = weight.shape
    _check_param(weight, v, rows * cols, "v", op, fake)
    _check_param(weight, max_scale, rows * mx_num_groups(cols), "max_scale", op, fake)


@torch.library.register_fake("autoround_fast::fake_quant_mx")
def _(weight, v, max_scale, bits):
    _check_mx("fake_quant_mx", weight, v, max_scale, bits, fake=True)
    rows, cols = weight.shape
    return torch.empty_like(weight), weight.new_empty((rows, mx_num_groups(cols)), dtype=torch.float32)


@torch.library.register_fake("autoround_fast::fake_quant_mx_backward")
def _(grad, weight, v, max_scale, bits):
    op = "fake_quant_mx_backward"
    _check_mx(op, weight, v, max_scale, bits, fake=True)
    _check_grad_like(grad, weight, op)
    return torch.empty_like(v), torch.empty_like(max_scale)


def _mx_setup(ctx, inputs, output):
    weight, v, max_scale, bits = inputs
    ctx.save_for_backward(weight, v, max_scale)
    ctx.bits = bits
    ctx.mark_non_differentiable(output[1])


def _mx_backward(ctx, grad_out, grad_exp):
    weight, v, max_scale = ctx.saved_tensors
    gv, gms = _ops.fake_quant_mx_backward(grad_out.contiguous(), weight, v, max_scale, ctx.bits)
    return None, gv, gms, None


torch.library.register_autograd("autoround_fast::fake_quant_mx", _mx_backward, setup_context=_mx_setup)


def fake_quant_mx(
    weight: torch.Tensor,
    v: torch.Tensor,
    max_scale: torch.Tensor,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX fake quantization (MXFP4: bits 4, e2m1 elements; MXFP8: bits 8, e4m3) with
    AutoRound's learnable offset and clipping scale.

    For each group of 32 consecutive input features (the last group padded with zeros), in
    fp32, with the element format's emax, min_exp, mbits and max_norm (formats.MX_ELEMENTS)::

        m     = max|W_g| * max_scale_g
        E     = clamp(floor(log2 m) - emax, -127, 127)      (m = 0: floor(log2 m) := 1)
        t     = W / 2^E + V,   c = clamp(t, -max_norm, max_norm)
        p     = max(floor(log2 |c|), min_exp)                (c = 0: p = max(0, min_exp))
        q     = clamp(rne(c / 2^p * 2^mbits) / 2^mbits * 2^p, -max_norm, max_norm)
        Wq    = q * 2^E

    where rne rounds half to even (as auto-round writes it: floor(a + 0.5) minus one on a
    tie). floor(log2 .) is the exact binary exponent; auto-round's fp32 torch.log2 rounds up
    to k for values a few ulps below 2^k (k >= 3 or k <= -2) and takes the next exponent
    there (csrc/mx/mx.h). Differentiable in ``v`` and ``max_scale``: auto-round's autograd with
    straight-through floors, op by op in fp32 (``v``'s gradient keeps its bits); an all-zero
    group's ``max_scale`` gradient is 0 (auto-round's is NaN).

    Args:
        weight: [out, in] bf16, fp16 or fp32.
        v: fp32, the weight's shape.
        max_scale: fp32 [out, ceil(in / 32)] (used as given; AutoRound clamps it to [0, 1]).
        bits: 4 (MXFP4) or 8 (MXFP8).

    Returns:
        (the fake-quantized weight in the weight's dtype, the shared exponents E as fp32
        [out, ceil(in / 32)]: each group's scale is 2^E).
    """
    op = "fake_quant_mx"
    _check_mx(op, weight, v, max_scale, bits)
    _check_finite(weight, "weight", op)
    return _ops.fake_quant_mx(weight.contiguous(), v.contiguous(), max_scale.contiguous(), int(bits))


# ---------------------------------------------------------------------------------------
# fake_quant_mx_activation: MX activations (dynamic per-32 scales)
# ---------------------------------------------------------------------------------------


def _check_mx_act(op: str, x, bits, fake: bool = False) -> None:
    _check_mx_bits(bits, op, fake)
    _check_activation(x, "x", op, fake)


@torch.library.register_fake("autoround_fast::fake_quant_mx_activation")
def _(x, bits):
    _check_mx_act("fake_quant_mx_activation", x, bits, fake=True)
    return torch.empty_like(x)


@torch.library.register_fake("autoround_fast::fake_quant_mx_activation_backward")
def _(grad, x, bits):
    op = "fake_quant_mx_activation_backward"
    _check_mx_act(op, x, bits, fake=True)
    _check_grad_like(grad, x, op)
    return torch.empty_like(x)


def _mx_act_setup(ctx, inputs, output):
    x, bits = inputs
    ctx.save_for_backward(x)
    ctx.bits = bits


def _mx_act_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return _ops.fake_quant_mx_activation_backward(grad_out.contiguous(), x, ctx.bits), None


torch.library.register_autograd(
    "autoround_fast::fake_quant_mx_activation", _mx_act_backward, setup_context=_mx_act_setup
)


def fake_quant_mx_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """MX fake quantization of activations: dynamic per-32 power-of-two scales of the current
    ``x`` with V = 0 and max_scale = 1 (see :func:`fake_quant_mx`), groups along the last
    dimension (the last one zero-padded). Differentiable in ``x`` as auto-round's autograd:
    through the rounding with straight-through floors, and through max|x_g| into each
    group's first argmax; the two paths are added in fp32 and rounded once to x's dtype.

    Args:
        x: any shape, bf16, fp16 or fp32.
        bits: 4 (MXFP4) or 8 (MXFP8).
    """
    op = "fake_quant_mx_activation"
    _check_mx_act(op, x, bits)
    _check_finite(x, "x", op)
    return _ops.fake_quant_mx_activation(x.contiguous(), int(bits))


# ---------------------------------------------------------------------------------------
# masked_mse_loss: the block loss
# ---------------------------------------------------------------------------------------


def _check_loss(op: str, pred, ref, mask, fake: bool = False) -> None:
    _check_pair(pred, ref, "pred", "ref", op, fake)
    if mask is not None:
        tokens = pred.numel() // pred.shape[-1]
        _require(mask.numel() == tokens, op, f"mask must have one entry per token ({tokens}), got {mask.numel()}",
                 fake)


def _check_loss_fake(op: str, pred, ref, mask) -> None:
    _check_loss(op, pred, ref, mask, fake=True)
    if mask is not None:  # the wrapper converts it
        _check_param(pred, mask, mask.numel(), "mask", op, fake=True)


@torch.library.register_fake("autoround_fast::masked_mse_loss")
def _(pred, ref, mask):
    _check_loss_fake("masked_mse_loss", pred, ref, mask)
    return pred.new_empty((), dtype=torch.float32)


@torch.library.register_fake("autoround_fast::masked_mse_loss_backward")
def _(grad, pred, ref, mask):
    op = "masked_mse_loss_backward"
    _check_loss_fake(op, pred, ref, mask)
    _check_param(pred, grad, 1, "grad", op, fake=True)
    return torch.empty_like(pred)


def _loss_setup(ctx, inputs, output):
    pred, ref, mask = inputs
    ctx.save_for_backward(pred, ref, mask)


def _loss_backward(ctx, grad):
    pred, ref, mask = ctx.saved_tensors
    return _ops.masked_mse_loss_backward(grad.contiguous(), pred, ref, mask), None, None


torch.library.register_autograd(
    "autoround_fast::masked_mse_loss", _loss_backward, setup_context=_loss_setup
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
    _check_loss(op, pred, ref, mask)
    if mask is not None:
        mask = mask.to(device=pred.device, dtype=torch.float32).contiguous().reshape(-1)
    return _ops.masked_mse_loss(pred.contiguous(), ref.contiguous(), mask)


# ---------------------------------------------------------------------------------------
# sign_step_: SignRound's step
# ---------------------------------------------------------------------------------------


def _check_sign_step(op: str, param, best, grad, improved, lr, fake: bool = False) -> None:
    _require(param.dtype == torch.float32 and param.is_contiguous(), op,
             f"param must be a contiguous float32 tensor, got {param.dtype}", fake)
    for name, t in (("best", best), ("grad", grad)):
        if t is None:  # no best copy
            continue
        _require(t.shape == param.shape and t.is_contiguous(), op,
                 f"{name} must be contiguous with param's shape {tuple(param.shape)}, got {tuple(t.shape)}", fake)
        _check_param(param, t, param.numel(), name, op, fake)
    _check_param(param, lr, 1, "lr", op, fake)
    _check_improved(param, improved, op, fake)


@torch.library.register_fake("autoround_fast::sign_step_")
def _(param, best, grad, improved, lr):
    _check_sign_step("sign_step_", param, best, grad, improved, lr, fake=True)


def sign_step_(param: torch.Tensor, best: Optional[torch.Tensor], grad: torch.Tensor, improved: torch.Tensor,
               lr: torch.Tensor) -> None:
    """SignRound's step on one tuned tensor, in place, fused with the best-parameter copy::

        if improved: best = param          (the parameters that scored the best loss so far;
                                            skipped where best is None)
        param = param - lr * sign(grad)    (sign(0) = sign(NaN) = 0)

    Equal bit for bit to ``torch.where(improved, param, best, out=best)`` followed by
    ``param.addcmul_(grad.sign(), lr, value=-1)``, in one pass instead of three. ``param``,
    ``best`` (or None: V, whose best the engine keeps as the fake-quantized weight) and ``grad``
    are contiguous fp32 tensors of one shape; ``improved`` (bool) and
    ``lr`` (fp32) are one-element tensors on the same device, read by the kernel, so a
    captured CUDA graph replays the step with the values of the moment.
    """
    _check_sign_step("sign_step_", param, best, grad, improved, lr)
    _ops.sign_step_(param, best, grad, improved.reshape(1), lr.reshape(1))


# ---------------------------------------------------------------------------------------
# copy_if_: the best fake-quantized weight kept
# ---------------------------------------------------------------------------------------


def _check_copy_if(dst, src, flag, fake: bool = False) -> None:
    op = "copy_if_"
    _require(src.dtype == dst.dtype and src.shape == dst.shape and src.is_contiguous() and dst.is_contiguous(), op,
             f"src must be contiguous with dst's dtype {dst.dtype} and shape {tuple(dst.shape)}, "
             f"got {src.dtype} and {tuple(src.shape)}", fake)
    _require(src.device == dst.device, op, "src must be on dst's device", fake)
    _require(flag.dtype == torch.bool and flag.numel() == 1 and flag.device == dst.device, op,
             f"flag must be one bool on {dst.device}, got {flag.dtype} {tuple(flag.shape)} on {flag.device}", fake)


@torch.library.register_fake("autoround_fast::copy_if_")
def _(dst, src, flag):
    _check_copy_if(dst, src, flag, fake=True)


def copy_if_(dst: torch.Tensor, src: torch.Tensor, flag: torch.Tensor) -> None:
    """``dst = src`` where the one-element bool ``flag`` (a device tensor, read by the kernel)
    is true; nothing read or written where it is false. Bit for bit
    ``torch.where(flag, src, dst, out=dst)``, which passes over both tensors either way: the
    loop keeps the best iteration's fake-quantized weight with it, on a CUDA graph's replays.
    ``dst`` and ``src``: contiguous tensors of one dtype and shape on one device."""
    _check_copy_if(dst, src, flag)
    _ops.copy_if_(dst, src, flag.reshape(1))


# ---------------------------------------------------------------------------------------
# NVFP4 global scales
# ---------------------------------------------------------------------------------------


def nvfp4_global_scale(tensor: torch.Tensor) -> torch.Tensor:
    """NVFP4 global scale ``448 * 6 / max|tensor|`` in fp32 (0 for an all-zero tensor)."""
    amax = tensor.detach().to(torch.float32).abs().amax()
    recip = torch.where(amax == 0, torch.zeros_like(amax), 1.0 / amax)
    return (E4M3_MAX * FP4_MAX) * recip


def fp8_weight_amax(weight: torch.Tensor) -> torch.Tensor:
    """max|W| of a weight with one FP8 scale, as fake_quant_fp8's ``weight_amax`` takes it:
    fp32, one element."""
    return weight.detach().abs().amax().to(torch.float32).reshape(1)


def shared_nvfp4_global_scale(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One global scale for layers fused at inference (q/k/v, gate/up): the minimum of
    their own global scales, so that none of them overflows the e4m3 scale range."""
    scales = [nvfp4_global_scale(t) for t in tensors]
    return torch.stack(scales).amin()
