"""The allocations live at a bench.block run's peak, summed by the lines that made them:

    python -m bench.trace_memory --shape qwen3-moe --layers 2 --iters 20 --scheme W4A16 \\
        --backends cuda --out OUT --one cuda:W4A16

takes bench.block's arguments (one backend and scheme, run in this process with
``--one BACKEND:SCHEME``) under ``torch.cuda.memory._record_memory_history``, replays the
trace's allocations and frees, and prints the largest groups of what was live at the highest
total: each allocation named by its first two frames in autoround_fast or bench (else its
innermost frame; "?" where the trace kept none, as for the autograd engine's own).
"""

from __future__ import annotations

import collections
import os
import sys

import torch

from bench import block

_TRACE_ENTRIES = 3_000_000
_GROUPS = 30


def _frame_name(ev: dict) -> str:
    ours = [f for f in ev.get("frames", []) if "autoround_fast" in f["filename"] or "/bench/" in f["filename"]]
    frames = ours[:2] if ours else ev.get("frames", [])[:1]
    return " <- ".join(f'{os.path.basename(f["filename"])}:{f["line"]}:{f["name"]}' for f in frames) or "?"


def live_at_peak(events: list[dict]) -> tuple[int, dict]:
    """The highest total of live bytes over the trace's events, and the allocations live then
    (found in a second replay up to the peak's event)."""
    total, peak, peak_at = 0, 0, -1
    sizes = {}
    for i, ev in enumerate(events):
        if ev["action"] == "alloc":
            sizes[ev["addr"]] = ev["size"]
            total += ev["size"]
            if total > peak:
                peak, peak_at = total, i
        elif ev["action"] == "free_completed" and ev["addr"] in sizes:
            total -= sizes.pop(ev["addr"])
    live = {}
    for ev in events[:peak_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    return peak, live


def main(argv=None) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench.trace_memory: needs a GPU")
    torch.cuda.memory._record_memory_history(max_entries=_TRACE_ENTRIES, stacks="python")
    block.main(argv)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, at_peak = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])
    size, count = collections.Counter(), collections.Counter()
    for ev in at_peak.values():
        name = _frame_name(ev)
        size[name] += ev["size"]
        count[name] += 1
    print(f"traced peak {peak / 2**30:.2f} GiB (of the allocations the trace holds: the last {_TRACE_ENTRIES})")
    for name, n in size.most_common(_GROUPS):
        print(f"{n / 2**30:7.3f} GiB {count[name]:6d}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
