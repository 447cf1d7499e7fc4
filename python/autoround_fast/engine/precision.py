"""The autocast rule: in which dtype a block's forward runs while tuning and while calibrating,
as auto-round decides it (the model dtype; bf16 when activations are quantized; fp32 on a CPU
without bf16 support)."""

from __future__ import annotations

import torch


def cpu_has_bf16() -> bool:
    """AVX512-BF16 on this CPU (auto-round's test for bf16 tuning on a CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512_bf16" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


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
