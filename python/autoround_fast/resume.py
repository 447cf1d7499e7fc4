"""Resume after a crash: each tuned block's result kept on disk.

A run that dies (Ctrl-C, SIGKILL, out of memory) and starts again with the same settings
reloads the blocks it finished instead of tuning them, and ends with the weights an
uninterrupted run ends with, bit for bit. Per block, one file holds every parameter of its
quantized Linears as tuning left them (weights and quantization parameters) and its row of
statistics. The quantized chain's output (what the next block tunes on) is kept for the last
block only, in ``<block>.q_outputs``: written before the block's own file, and the previous
block's removed after it, so the last finished block always has its output on disk whenever
the process dies. The writes run on a background thread, in order, while the next block tunes.

Every file is written under a temporary name, synced and renamed, so it is whole or absent.
``run.json`` records what the run was made of (the modifier's settings and an exact checksum of
the first block's calibration inputs); a directory that holds blocks of another run is refused,
naming what differs, instead of mixing two runs' blocks (one without blocks is taken over).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

RUN_FILE = "run.json"
BLOCK_SUFFIX = ".safetensors"
Q_OUTPUTS_SUFFIX = ".q_outputs"  # a safetensors file too


class ResumeMismatch(ValueError):
    """The resume directory holds blocks of a run with other settings or other inputs."""


CHECKSUM_PERIOD = 65521  # position weights 1..65521: a weighted 16-bit word stays below 2^31


def input_checksum(hidden: list[torch.Tensor]) -> list[int]:
    """The inputs' bits as 16-bit integers: their sum and their position-weighted sum, in
    int64 without overflow (under 2^32 words a sample). Exact and independent of the order of
    the additions, so the same on any device and thread count; other data gives other numbers."""
    sums = [0, 0]
    for h in hidden:  # one sample at a time, where it lives
        words = h.detach().contiguous().reshape(-1).view(torch.int16).to(torch.int64)
        pos = torch.arange(words.numel(), dtype=torch.int64, device=words.device) % CHECKSUM_PERIOD + 1
        sums = [sums[0] + int(words.sum()), sums[1] + int((words * pos).sum())]
    return sums


def finished_blocks(directory: str) -> list[str]:
    """The blocks whose files are in ``directory`` (none if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    return sorted(f[: -len(BLOCK_SUFFIX)] for f in os.listdir(directory) if f.endswith(BLOCK_SUFFIX))


class BlockStore:
    """The finished blocks of one run in ``directory``, keyed by the block's module name."""

    def __init__(self, directory: str, settings: dict):
        self.directory = directory
        self.settings = settings
        self._checked = False
        self._writer: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def check(self, hidden: list[torch.Tensor]) -> None:
        """Bind the directory to this run: settings and first-block inputs recorded if it
        holds no block yet, else compared (ResumeMismatch names the first difference)."""
        if self._checked:
            return
        run = {"settings": self.settings, "inputs": input_checksum(hidden)}
        path = os.path.join(self.directory, RUN_FILE)
        if self.blocks_done():
            with open(path) as f:
                kept = json.load(f)
            _compare(self.directory, run, kept)
        else:
            os.makedirs(self.directory, exist_ok=True)
            _write_atomic(path, lambda tmp: _write_json(tmp, run))
        self._checked = True

    def _path(self, block: str) -> str:
        return os.path.join(self.directory, block + BLOCK_SUFFIX)

    def blocks_done(self) -> list[str]:
        return finished_blocks(self.directory)

    def load(self, block: str) -> Optional[tuple[dict[str, torch.Tensor], Optional[torch.Tensor], dict]]:
        """(parameters by "linear.param", the quantized chain's output if this block was the
        last one kept, else None, the stats row) of a finished block, or None."""
        path = self._path(block)
        if not os.path.exists(path):
            return None
        with safe_open(path, framework="pt") as f:
            stats = json.loads(f.metadata()["stats"])
            params = {k: f.get_tensor(k) for k in f.keys()}
        q_path = os.path.join(self.directory, block + Q_OUTPUTS_SUFFIX)
        q_outputs = load_file(q_path)["q_outputs"] if os.path.exists(q_path) else None
        return params, q_outputs, stats

    def save(self, block: str, params: dict[str, torch.Tensor], q_outputs: torch.Tensor, stats: dict) -> None:
        """Copy the block's tensors to the host now and write them on a background thread: the
        quantized output, the block's file, then the previous block's output removed. Waits
        for the previous block's writes first."""
        self.wait()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in params.items()}
        q = {"q_outputs": q_outputs.detach().to("cpu").contiguous()}
        stale = [os.path.join(self.directory, f) for f in os.listdir(self.directory)
                 if f.endswith(Q_OUTPUTS_SUFFIX) and f != block + Q_OUTPUTS_SUFFIX]

        def write():
            _write_atomic(os.path.join(self.directory, block + Q_OUTPUTS_SUFFIX), lambda tmp: save_file(q, tmp))
            _write_atomic(self._path(block), lambda tmp: save_file(tensors, tmp, metadata={"stats": json.dumps(stats)}))
            for path in stale:
                os.remove(path)

        self._writer = threading.Thread(target=self._run, args=(write,), name="autoround-fast-resume")
        self._writer.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as e:  # raised in the tuning thread by wait()
            self._error = e

    def wait(self) -> None:
        """Wait for the writes under way; raise what they raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _compare(directory: str, run: dict, kept: dict) -> None:
    for key in sorted(set(run["settings"]) | set(kept.get("settings", {}))):
        ours, theirs = run["settings"].get(key), kept.get("settings", {}).get(key)
        if ours != theirs:
            raise ResumeMismatch(f"resume directory {directory} holds blocks made with {key}={theirs!r}, "
                                 f"this run has {key}={ours!r}; delete it to start over")
    if kept.get("inputs") != run["inputs"]:
        raise ResumeMismatch(f"resume directory {directory} holds blocks made from other calibration "
                             "inputs (another model or other data); delete it to start over")


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def write_json_atomic(path: str, value) -> None:
    _write_atomic(path, lambda tmp: _write_json(tmp, value))


def _write_atomic(path: str, write) -> None:
    """write(tmp) then rename over ``path``: a reader sees the whole file or none."""
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
