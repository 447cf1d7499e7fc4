"""Calls each weight kernel twice on 4096x4096 bf16, for Nsight Compute:

    ncu --kernel-name regex:fake_quant --section SpeedOfLight python3 -m bench.profile_kernels
"""

import torch

from autoround_fast import ops

_ops = torch.ops.autoround_fast


def main():
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(w)
    v = torch.zeros(4096, 4096, device="cuda")
    gs = ops.nvfp4_global_scale(w)
    ms = torch.ones(4096, 256, device="cuda")
    mn = torch.ones(4096, 32, device="cuda")
    for _ in range(2):
        _ops.fake_quant_nvfp4(w, v, ms, gs)
        _ops.fake_quant_nvfp4_backward(g, w, v, ms, gs)
        _ops.fake_quant_int(w, v, mn, mn, 4, 128, True, 5)
        _ops.fake_quant_int_backward(g, w, v, mn, mn, 4, 128, True, 5)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
