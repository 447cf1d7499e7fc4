"""Profiles iterations 4..6 of each block's SignRound loop (replayed from the CUDA graph when
there is one) and prints the kernels that took the most GPU time, by kind.

    with profiled_loops(trace_dir=None):   # around anything that tunes blocks
        ...

It wraps the engine's loop from the outside: a new profiler per SignRound.run, driven by the
per-iteration Batches.prepare call that precedes every iteration, graphed or not.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from autoround_fast.engine.inputs import Batches
from autoround_fast.engine.signround import SignRound

FIRST, LAST = 4, 6  # the profiled iterations: past the warm-up and the graph capture

KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("ours", ("fake_quant_", "silu_mul_act", "masked_mse_", "sign_step_kernel", "copy_if_kernel")),
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul")),
    ("fused (Triton)", ("triton_",)),
    ("copies and gathers", ("memcpy", "memset", "copy", "cat", "index", "gather", "fill")),
)


def kernel_kinds(rows) -> dict[str, float]:
    """GPU ms per iteration by kind of kernel, from the profiler's (ms, count, name) rows."""
    kinds: dict[str, float] = {kind: 0.0 for kind, _ in KERNEL_KINDS}
    kinds["other element-wise"] = 0.0
    for ms, _, name in rows:
        low = name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in low for key in keys)), "other element-wise")
        kinds[kind] += ms
    return kinds


class _LoopProfiler:
    """Starts the profiler before iteration FIRST and reports after iteration LAST."""

    def __init__(self, trace_dir: Optional[str]):
        self.prof = None
        self.trace_dir = trace_dir
        self.iterations = LAST - FIRST + 1

    def before(self, it: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if it == FIRST:
            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
            self.prof.__enter__()
        elif it == LAST + 1 and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self._report()
            self.prof = None

    def _report(self) -> None:
        n = self.iterations
        rows = [(getattr(e, "device_time_total", 0) / (n * 1e3), e.count // n, e.key[:100])
                for e in self.prof.key_averages() if getattr(e, "device_time_total", 0) > 0
                and not e.key.startswith(("aten::", "autograd::", "ProfilerStep"))]
        rows.sort(reverse=True)
        if self.trace_dir:  # the timeline, for the gaps between kernels (chrome://tracing)
            os.makedirs(self.trace_dir, exist_ok=True)
            self.prof.export_chrome_trace(os.path.join(self.trace_dir, f"trace-{os.getpid()}-{id(self)}.json"))
        print(f"loop profile: {len(rows)} kernels, {sum(r[1] for r in rows)} launches per iteration")
        print(f"loop profile: GPU ms per iteration {sum(r[0] for r in rows):.2f}; by kind: "
              + ", ".join(f"{kind} {ms:.2f}" for kind, ms in kernel_kinds(rows).items()))
        print("loop profile: top kernels:")
        for ms, count, key in rows[:25]:
            print(f"  {ms:8.3f} ms  x{count:<4d} {key}")


@contextlib.contextmanager
def profiled_loops(trace_dir: Optional[str] = None):
    """Within the ``with``, every SignRound loop of LAST + 2 iterations or more on a GPU is
    profiled (see the module docstring); ``trace_dir`` also receives each timeline."""
    run, prepare = SignRound.run, Batches.prepare
    active: Optional[_LoopProfiler] = None

    def profiled_run(self, *args, **kwargs):
        nonlocal active
        on = self.iters > LAST + 1 and self.device.type == "cuda"
        active = _LoopProfiler(trace_dir) if on else None
        try:
            return run(self, *args, **kwargs)
        finally:
            active = None

    def profiled_prepare(self, it):
        if active is not None:
            active.before(it)
        return prepare(self, it)

    SignRound.run, Batches.prepare = profiled_run, profiled_prepare
    try:
        yield
    finally:
        SignRound.run, Batches.prepare = run, prepare
