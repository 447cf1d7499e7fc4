"""The functions the engine computes with, as a Protocol that two backends implement:
``torch`` (the plain-PyTorch oracles, any device) and ``cuda`` (the kernels, as torch ops)."""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from .. import formats, ops, reference

SUPPORTED_BACKENDS = ("torch", "cuda")


class Backend(Protocol):
    """What the engine calls. ``uses_kernels``: the ops run autoround_fast's kernels (then the
    sign step can run inside the weight backward, and fused callers may quantize inputs)."""

    name: str
    uses_kernels: bool

    def nvfp4(self, w, v, max_scale, global_scale) -> tuple[torch.Tensor, torch.Tensor]: ...

    def int(self, w, v, min_scale, max_scale, bits, group_size, sym, scale_dtype): ...

    def act(self, x, global_scale) -> torch.Tensor: ...

    def mx(self, w, v, max_scale, bits) -> tuple[torch.Tensor, torch.Tensor]: ...

    def fp8(self, w, v, max_scale, scale_dtype, weight_amax) -> tuple[torch.Tensor, torch.Tensor]: ...

    def fp8_block(self, w, v, max_scale, scale_dtype) -> tuple[torch.Tensor, torch.Tensor]: ...

    def mx_act(self, x, bits) -> torch.Tensor: ...

    def fp8_act(self, x, act_max, max_scale, scale_dtype) -> torch.Tensor: ...

    def loss(self, pred, ref, mask: Optional[torch.Tensor]) -> torch.Tensor: ...

    def step(self, param, best, grad, improved, lr) -> None: ...

    def copy_if(self, dst, src, flag) -> None: ...


class TorchBackend:
    """The oracles of :mod:`autoround_fast.reference`: bit for bit auto-round's eager code."""

    name = "torch"
    uses_kernels = False

    def nvfp4(self, w, v, max_scale, global_scale):
        return reference.fake_quant_nvfp4(w, v, max_scale, global_scale)

    def int(self, w, v, min_scale, max_scale, bits, group_size, sym, scale_dtype):
        return reference.fake_quant_int(w, v, min_scale, max_scale, bits, group_size, sym, scale_dtype)

    def act(self, x, global_scale):
        return reference.fake_quant_nvfp4_activation(x, global_scale)

    def mx(self, w, v, max_scale, bits):
        return reference.fake_quant_mx(w, v, max_scale, bits)

    def fp8(self, w, v, max_scale, scale_dtype, weight_amax):
        return reference.fake_quant_fp8(w, v, max_scale, scale_dtype, weight_amax)

    def fp8_block(self, w, v, max_scale, scale_dtype):
        return reference.fake_quant_fp8_block(w, v, max_scale, scale_dtype)

    def mx_act(self, x, bits):
        return reference.fake_quant_mx_activation(x, bits)

    def fp8_act(self, x, act_max, max_scale, scale_dtype):
        return reference.fake_quant_fp8_activation(x, act_max, max_scale, scale_dtype)

    def loss(self, pred, ref, mask):
        return reference.masked_mse_loss(pred, ref, mask)

    def step(self, param, best, grad, improved, lr):
        reference.sign_step_(param, best, grad, improved, lr)

    def copy_if(self, dst, src, flag):
        reference.copy_if_(dst, src, flag)


class KernelBackend:
    """autoround_fast's kernels, called as raw torch ops (the wrappers' argument checks are
    for users; the engine's arguments are right by construction). ``name`` is "cuda", or
    "kernels" for the CPU kernels (tests)."""

    uses_kernels = True

    def __init__(self, name: str):
        self.name = name
        self._op = torch.ops.autoround_fast

    def nvfp4(self, w, v, max_scale, global_scale):
        return self._op.fake_quant_nvfp4(w, v, max_scale, global_scale)

    def int(self, w, v, min_scale, max_scale, bits, group_size, sym, scale_dtype):
        return self._op.fake_quant_int(w, v, min_scale, max_scale, bits, group_size, sym,
                                       formats.SCALE_DTYPE_CODES[scale_dtype])

    def act(self, x, global_scale):
        return self._op.fake_quant_nvfp4_activation(x.contiguous(), global_scale)

    def mx(self, w, v, max_scale, bits):
        return self._op.fake_quant_mx(w, v, max_scale, bits)

    def fp8(self, w, v, max_scale, scale_dtype, weight_amax):
        return self._op.fake_quant_fp8(w, v, max_scale, formats.SCALE_DTYPE_CODES[scale_dtype], weight_amax)

    def fp8_block(self, w, v, max_scale, scale_dtype):
        return self._op.fake_quant_fp8_block(w, v, max_scale, formats.SCALE_DTYPE_CODES[scale_dtype])

    def mx_act(self, x, bits):
        return self._op.fake_quant_mx_activation(x.contiguous(), bits)

    def fp8_act(self, x, act_max, max_scale, scale_dtype):
        return self._op.fake_quant_fp8_activation(x.contiguous(), act_max, max_scale,
                                                  formats.SCALE_DTYPE_CODES[scale_dtype])

    def loss(self, pred, ref, mask):
        return self._op.masked_mse_loss(pred.contiguous(), ref.contiguous(), mask)

    def step(self, param, best, grad, improved, lr):  # the step and the best copy in one pass
        self._op.sign_step_(param, best, grad, improved, lr)

    def copy_if(self, dst, src, flag):  # reads nothing where flag is false
        self._op.copy_if_(dst, src.contiguous(), flag)

    # The sign step inside the weight backward (SignRound.attach_steppers).
    nvfp4_stepped = staticmethod(ops.step_in_backward_nvfp4)
    int_stepped = staticmethod(ops.step_in_backward_int)


def make_backend(name: str) -> Backend:
    """The backend called ``name``, or a clear error when it cannot run here."""
    if name == "cuda":
        if not ops.has_cuda_kernels():
            raise RuntimeError(
                "backend='cuda': this build of autoround_fast has no CUDA kernels (it was "
                "built against a CPU-only torch or without nvcc); reinstall on a CUDA machine, "
                "or use backend='torch' (runs anywhere) or backend='auto_round'"
            )
        if not torch.cuda.is_available():
            raise RuntimeError("backend='cuda' needs a CUDA GPU; none is visible to torch")
        return KernelBackend(name)
    if name == "kernels":
        return KernelBackend(name)
    if name == "torch":
        return TorchBackend()
    raise ValueError(f"backend must be one of {SUPPORTED_BACKENDS}, got {name!r}")
