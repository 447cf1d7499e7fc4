"""The command line's resume directory: a hidden sibling of the output that keeps the blocks a
run finished (autoround_fast.resume) until the checkpoint is in place.

A run that dies leaves it behind with what it finished; the same command started again
continues from there. ``command.json`` records the command, so that another command with the
same --output is refused at once, naming the option that differs, before any weight is read.
The checkpoint is written inside it and renamed onto the output at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from ..resume import ResumeMismatch, finished_blocks, write_json_atomic
from .checks import CliError

COMMAND_FILE = "command.json"
CHECKPOINT = "checkpoint"  # the checkpoint being written, renamed onto the output when whole


def resume_dir(out_dir: str) -> str:
    parent, name = os.path.split(out_dir)
    return os.path.join(parent, f".{name}.resume")


def check_command(path: str, command: dict) -> int:
    """Blocks an earlier run of this same command finished in ``path`` (0 if none: a
    directory without blocks is taken over by any command); a CliError if another command
    left blocks there."""
    done = len(finished_blocks(path))
    if not done:
        return 0
    try:
        with open(os.path.join(path, COMMAND_FILE)) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        raise CliError(f"{path} holds finished blocks but no readable record of their command; "
                       "delete the directory to start over") from None
    for key in sorted(set(command) | set(kept)):
        if command.get(key) != kept.get(key):
            raise CliError(f"{path} holds the blocks of another command (its {key} was {kept.get(key)!r}, "
                           f"this one's is {command.get(key)!r}): run that command again to resume it, "
                           "or delete the directory")
    return done


@contextlib.contextmanager
def resumable(path: str, command: dict):
    """The resume directory around the tuning and the save: made, with the command recorded;
    yields where the checkpoint is written. Removed once the body succeeds (it has moved the
    checkpoint away); after a failure or Ctrl-C kept if it holds a finished block (said so),
    else removed."""
    os.makedirs(path, exist_ok=True)
    write_json_atomic(os.path.join(path, COMMAND_FILE), command)
    ckpt = os.path.join(path, CHECKPOINT)
    shutil.rmtree(ckpt, ignore_errors=True)  # what an interrupted save left
    try:
        yield ckpt
    except ResumeMismatch as e:  # the model's files changed under the same command
        raise CliError(str(e)) from None
    except BaseException:
        done = after_failure(path)
        if done:
            print(f"autoround-fast: {done} finished blocks kept in {path}; run the same command again to resume")
        raise
    shutil.rmtree(path, ignore_errors=True)


def after_failure(path: str) -> int:
    """Keep the directory if it holds a finished block (returns how many), else remove it."""
    if not os.path.isdir(path):
        return 0
    shutil.rmtree(os.path.join(path, CHECKPOINT), ignore_errors=True)
    done = len(finished_blocks(path))
    if not done:
        shutil.rmtree(path, ignore_errors=True)
    return done

