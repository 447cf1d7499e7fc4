"""The command line's resume directory: a hidden sibling of the output that keeps the blocks a
run finished (autoround_fast.resume) until the checkpoint is in place.

A run that dies leaves it behind with what it finished; the same command started again
continues from there. ``command.json`` records the command, so that another command with the
same --output is refused at once, naming the option that differs, before any weight is read.
The checkpoint is written inside it and renamed onto the output at the end.
"""

from __future__ import annotations

import json
import os
import shutil

from ..resume import BlockStore
from .checks import CliError

COMMAND_FILE = "command.json"
CHECKPOINT = "checkpoint"  # the checkpoint being written, renamed onto the output when whole


def resume_dir(out_dir: str) -> str:
    parent, name = os.path.split(out_dir)
    return os.path.join(parent, f".{name}.resume")


def check_command(path: str, command: dict) -> int:
    """Blocks an earlier run of this same command finished in ``path`` (0 if none); a
    CliError if another command left it."""
    record = os.path.join(path, COMMAND_FILE)
    if not os.path.exists(record):
        return 0
    with open(record) as f:
        kept = json.load(f)
    for key in sorted(set(command) | set(kept)):
        if command.get(key) != kept.get(key):
            raise CliError(f"{path} holds the blocks of another command (its {key} was {kept.get(key)!r}, "
                           f"this one's is {command.get(key)!r}): run that command again to resume it, "
                           "or delete the directory")
    return len(BlockStore(path, {}).blocks_done())


def start(path: str, command: dict) -> str:
    """Make the directory (recording the command), drop a checkpoint an interrupted save left,
    and return where the new one is written."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, COMMAND_FILE), "w") as f:
        json.dump(command, f, indent=1)
    ckpt = os.path.join(path, CHECKPOINT)
    shutil.rmtree(ckpt, ignore_errors=True)
    return ckpt


def after_failure(path: str) -> int:
    """Keep the directory if it holds a finished block (returns how many), else remove it."""
    if not os.path.isdir(path):
        return 0
    shutil.rmtree(os.path.join(path, CHECKPOINT), ignore_errors=True)
    done = len(BlockStore(path, {}).blocks_done())
    if not done:
        shutil.rmtree(path, ignore_errors=True)
    return done


def finish(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)

