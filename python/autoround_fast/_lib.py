"""Loads the compiled op library (csrc/, built by CMake) into torch.ops.autoround_fast."""

from __future__ import annotations

import os

import torch

_LIB_PATH = os.path.join(os.path.dirname(__file__), "_C.so")

if not os.path.exists(_LIB_PATH):  # pragma: no cover - a broken install
    raise ImportError(
        f"autoround_fast: the compiled library {_LIB_PATH} is missing; reinstall with "
        "`pip install --no-build-isolation .` from the source tree"
    )
torch.ops.load_library(_LIB_PATH)


def has_cuda_kernels() -> bool:
    """True when this build carries the CUDA kernels (built against a CUDA torch with nvcc)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "autoround_fast::fake_quant_nvfp4", "CUDA"
    )
