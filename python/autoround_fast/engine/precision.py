"""The dtype rule: in which dtype a block is held and its forward runs while tuning and while
calibrating, as auto-round decides it (docs/numerics.md#autocast)."""

from __future__ import annotations

import torch
import torch.nn as nn


def cpu_has_bf16() -> bool:
    """AVX512-BF16 on this CPU (auto-round's test for bf16 tuning on a CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512_bf16" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def cpu_tune_dtype() -> torch.dtype:
    """The dtype auto-round converts a block to on a CPU, whatever the model's: bf16 where the
    CPU has AVX512-BF16 (amp on, in bf16), else fp32 (amp off)."""
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


# compressed-tensors' quantization parameters: llm-compressor takes them off the module before
# auto-round converts the block, so they keep their own dtype
_QPARAM_NAMES = frozenset(f"{t}_{q}" for t in ("input", "weight", "output")
                          for q in ("global_scale", "scale", "shape", "zero_point")) | {"k_scale", "v_scale"}


def convert_block(block: nn.Module, dtype: torch.dtype) -> None:
    """block.to(dtype) for its floating parameters and buffers, in place, the quantization
    parameters excepted (auto-round's model.to(amp_dtype); the block stays converted)."""
    for mod in block.modules():
        for name, p in mod.named_parameters(recurse=False):
            if name not in _QPARAM_NAMES and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in list(mod.named_buffers(recurse=False)):
            if name not in _QPARAM_NAMES and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[name] = b.to(dtype)


class Precision:
    """The autocast contexts of one block: :meth:`tuning` for the reference, tuning and output
    passes, :meth:`calibration` for the act_max / imatrix pass (the model dtype). Neither keeps
    a weight-cast cache: the tuned weights change every step, and a CUDA graph may capture
    either."""

    def __init__(self, device: torch.device, dtype: torch.dtype, act_quant: bool):
        self.device_type = device.type
        self.dtype = dtype
        self.amp = act_quant or dtype in (torch.bfloat16, torch.float16)
        self.amp_dtype = torch.bfloat16 if act_quant else dtype
        if device.type == "cpu" and dtype == torch.float32 and not cpu_has_bf16():
            # auto-round turns amp off on a CPU without AVX512-BF16 and keeps an fp32 model in
            # fp32, activation quantization included
            self.amp, self.amp_dtype = False, torch.float32

    def tuning(self):
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp, cache_enabled=False)

    def calibration(self):
        return torch.autocast(self.device_type, dtype=self.dtype,
                              enabled=self.dtype in (torch.bfloat16, torch.float16), cache_enabled=False)
