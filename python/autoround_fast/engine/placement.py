"""Where a block runs: one spelling per device, the Linears spread over several devices
(``linear_devices``), the process group of data-parallel tuning, and whether the block's
forward can be captured in a CUDA graph."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn as nn


def indexed(device: torch.device) -> torch.device:
    """One spelling per device ("cuda" -> "cuda:<current>"), so that devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def linear_devices(devices: Sequence[str | torch.device], device: torch.device) -> list[torch.device]:
    """The linear_devices option as devices of the compute device's type, or a clear error."""
    out = []
    for d in devices:
        try:
            d = torch.device(d)
        except (RuntimeError, TypeError):
            raise ValueError(f"tune_block: linear_devices holds {d!r}, which is not a device") from None
        d = indexed(d)
        if d.type != device.type:
            raise ValueError(f"tune_block: linear_devices must be {device.type} devices, as the compute "
                             f"device {device} is; got {d}")
        if d.type == "cuda" and d.index >= torch.cuda.device_count():
            raise ValueError(f"tune_block: linear_devices names {d}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        out.append(d)
    return out


def place_linears(linears: dict[str, nn.Linear], devices: Sequence[torch.device]) -> dict[str, torch.device]:
    """Each Linear to the device with the fewest weight elements so far, largest Linear first
    (ties: the earlier device), so the tuned weights, V, the scales and their gradients spread
    evenly. Deterministic: every rank places alike."""
    load = [0] * len(devices)
    placed = {}
    for name, mod in sorted(linears.items(), key=lambda kv: -kv[1].weight.numel()):
        k = min(range(len(devices)), key=lambda i: load[i])
        placed[name] = devices[k]
        load[k] += mod.weight.numel()
    return {name: placed[name] for name in linears}


def process_group():
    """torch.distributed when a group of more than one rank is initialised, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def waits_for_host(block: nn.Module, args: tuple, kwargs: dict, autocast) -> bool:
    """True if the block's forward on (args, kwargs) synchronizes with the host (MoE routing's
    nonzero, .item(), .tolist()): a CUDA graph cannot capture it. One no-grad forward under
    torch's sync debug mode "error"; any other error is the block's own and is raised."""
    device = args[0].device
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # "a prototype feature": said once per process, to users
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), autocast():
            block(*args, **kwargs)
        return False
    except RuntimeError as e:
        if "synchronizing CUDA operation" not in str(e):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize(device)
