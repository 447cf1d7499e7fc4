"""Resume after a crash: each tuned block's result kept on disk, one file per block.

A run that dies (Ctrl-C, SIGKILL, out of memory) and starts again with the same command
reloads the blocks it finished instead of tuning them again, and ends with the checkpoint an
uninterrupted run writes, bit for bit: a block's file holds every parameter of its quantized
Linears as tuning left them (weights and quantization parameters), the quantized chain's
output that the next block tunes on, and the block's row of statistics.

A file is written under a temporary name and renamed, so a block is either complete on disk or
absent. ``run.json`` records what the run was made of (the modifier's settings and a checksum
of the first block's calibration inputs); a directory made by another run is refused, naming
what differs, instead of mixing two runs' blocks.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

RUN_FILE = "run.json"
Q_OUTPUTS = "__q_outputs__"  # the tensor name of the quantized chain's output in a block file


class ResumeMismatch(ValueError):
    """The resume directory was made by a run with other settings or other inputs."""


def input_checksum(hidden: list[torch.Tensor]) -> list[float]:
    """Sums of the calibration inputs (plain, absolute, squared, position-weighted) in float64:
    the same data gives the same numbers; other data, other numbers."""
    sums = torch.zeros(4, dtype=torch.float64)
    for h in hidden:  # one sample at a time, where it lives
        x = h.detach().reshape(-1).to(torch.float64)
        pos = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device)
        sums += torch.stack([x.sum(), x.abs().sum(), (x * x).sum(), (x * pos).sum() / x.numel()]).cpu()
    return sums.tolist()


class BlockStore:
    """The finished blocks of one run in ``directory``, keyed by the block's module name."""

    def __init__(self, directory: str, settings: dict):
        self.directory = directory
        self.settings = settings
        self._checked = False

    def check(self, hidden: list[torch.Tensor]) -> None:
        """Bind the directory to this run: settings and first-block inputs recorded if new,
        else compared with the recorded ones (ResumeMismatch names the first difference)."""
        if self._checked:
            return
        run = {"settings": self.settings, "inputs": input_checksum(hidden)}
        path = os.path.join(self.directory, RUN_FILE)
        if os.path.exists(path):
            with open(path) as f:
                kept = json.load(f)
            for key in sorted(set(run["settings"]) | set(kept.get("settings", {}))):
                ours, theirs = run["settings"].get(key), kept.get("settings", {}).get(key)
                if ours != theirs:
                    raise ResumeMismatch(f"resume directory {self.directory} was made with {key}={theirs!r}, "
                                         f"this run has {key}={ours!r}; delete it to start over")
            if kept.get("inputs") != run["inputs"]:
                raise ResumeMismatch(f"resume directory {self.directory} was made from other calibration "
                                     "inputs (another model or other data); delete it to start over")
        else:
            os.makedirs(self.directory, exist_ok=True)
            _write_atomic(path, lambda tmp: _write_json(tmp, run))
        self._checked = True

    def _path(self, block: str) -> str:
        return os.path.join(self.directory, f"{block}.safetensors")

    def blocks_done(self) -> list[str]:
        if not os.path.isdir(self.directory):
            return []
        return sorted(f[: -len(".safetensors")] for f in os.listdir(self.directory) if f.endswith(".safetensors"))

    def load(self, block: str) -> Optional[tuple[dict[str, torch.Tensor], torch.Tensor, dict]]:
        """(parameters by "linear.param", the quantized chain's output, the stats row) of a
        finished block, or None."""
        path = self._path(block)
        if not os.path.exists(path):
            return None
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            stats = json.loads(f.metadata()["stats"])
        tensors = load_file(path)
        return tensors, tensors.pop(Q_OUTPUTS), stats

    def save(self, block: str, params: dict[str, torch.Tensor], q_outputs: torch.Tensor, stats: dict) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in params.items()}
        tensors[Q_OUTPUTS] = q_outputs.detach().to("cpu").contiguous()
        meta = {"stats": json.dumps(stats)}
        _write_atomic(self._path(block), lambda tmp: save_file(tensors, tmp, metadata=meta))


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def _write_atomic(path: str, write) -> None:
    """write(tmp) then rename over ``path``: a reader sees the whole file or none."""
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
