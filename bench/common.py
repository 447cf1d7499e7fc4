"""Helpers shared by the benchmarks: CUDA-event medians, the card's copy bandwidth, and the
quantization schemes the benchmarks accept."""

from __future__ import annotations

import statistics

import torch


def time_ms(fn, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of fn() on the current CUDA stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / ms / 1e6


def card_info() -> str:
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}"


def graph_ms(fn, calls: int = 10) -> float:
    """Median milliseconds of one fn() replayed from a CUDA graph of `calls` back-to-back calls:
    the kernels alone, without Python and dispatch (as the tuning engine runs them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay) / calls


SCHEMES = {
    "NVFP4": "NVFP4",
    "NVFP4A16": "NVFP4A16",
    "MXFP4": "MXFP4",  # FP4 e2m1 weights and dynamic activations, groups of 32, e8m0 scales
    "MXFP8": "MXFP8",  # the same with FP8 e4m3 elements
    "MXFP4A16": "MXFP4A16",  # MXFP4 weights, activations unquantized
    "MXFP8A16": "MXFP8A16",  # MXFP8 weights, activations unquantized
    "FP8": "FP8",  # FP8 e4m3 weights per tensor, static per-tensor activations
    "FP8_DYNAMIC": "FP8_DYNAMIC",  # FP8 e4m3 weights per channel (activations dynamic at inference)
    "FP8_BLOCK": "FP8_BLOCK",  # FP8 e4m3 weights in 128 x 128 blocks (activations dynamic, groups of 128)
    "W8A8": "W8A8",  # INT8 weights per channel, dynamic per-token INT8 activations
    "W4AFP8": "W4AFP8",  # INT4 weights in groups of 128, dynamic per-token FP8 activations
    "W4A16": "W4A16",  # INT4 symmetric, groups of 128
    # SmolLM2's 576 features are not a multiple of 128: groups of 64 (or 32)
    "W4A16-G64": {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}},
    "W4A16-G32": {"weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}},
}


def quant_kwargs(scheme: str) -> dict:
    s = SCHEMES[scheme]
    if isinstance(s, str):
        return dict(targets="Linear", scheme=s, ignore=["lm_head"])
    return dict(config_groups={"group_0": dict(targets=["Linear"], **s)}, ignore=["lm_head"])
