"""`autoround-fast selfcheck`: the installed kernels against the oracles.

Quantizes one Llama-shaped random layer (NVFP4, MXFP4, MXFP8, FP8 per channel and per block,
W4A16 sym and asym) with the kernels of every available device and with the plain-PyTorch
oracles, and reports whether they agree bit for bit, with the gradients of the tunable
parameters.
"""

from __future__ import annotations

import time

import torch

from . import has_cuda_kernels, ops, reference


def _check(device: str) -> bool:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(512, 1024, generator=gen).to(torch.bfloat16)
    v = (torch.rand(512, 1024, generator=gen) - 0.5) * 0.8
    ok = True
    cases = {  # name: (the op on module m, the shape of its scales)
        "nvfp4": (lambda m, v_, a, b: m.fake_quant_nvfp4(w.to(device), v_, a, ops.nvfp4_global_scale(w).to(device)),
                  (512, 64)),
        "mxfp4": (lambda m, v_, a, b: m.fake_quant_mx(w.to(device), v_, a, 4), (512, 32)),
        "mxfp8": (lambda m, v_, a, b: m.fake_quant_mx(w.to(device), v_, a, 8), (512, 32)),
        "fp8 per channel": (lambda m, v_, a, b: m.fake_quant_fp8(w.to(device), v_, a), (512, 1)),
        "fp8 per block": (lambda m, v_, a, b: m.fake_quant_fp8_block(w.to(device), v_, a),
                          ops.fp8_block_grid(*w.shape)),
        "w4a16 sym g128": (lambda m, v_, a, b: m.fake_quant_int(w.to(device), v_, a, b, 4, 128, True), (512, 8)),
        "w4a16 asym g128": (lambda m, v_, a, b: m.fake_quant_int(w.to(device), v_, a, b, 4, 128, False), (512, 8)),
    }
    for name, (fn, scales) in cases.items():
        ms = torch.rand(scales, generator=gen) * 0.5 + 0.5
        outs = []
        t0 = time.perf_counter()
        for mod in (ops, reference):
            p = [t.clone().to(device).requires_grad_() for t in (v, ms, ms)]
            res = fn(mod, *p)
            res[0].float().sum().backward()
            outs.append((res[0].detach(), p[0].grad))
        same = torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        ok &= same
        print(f"  {device:4s} {name:16s} kernel == oracle (weight, dV): {same}  ({time.perf_counter() - t0:.2f} s)")
    return ok


def selfcheck() -> int:
    print(f"autoround_fast self-check: torch {torch.__version__}, CUDA kernels built: {has_cuda_kernels()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and has_cuda_kernels() else [])
    ok = all(_check(d) for d in devices)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1
