"""Checks of the command line's arguments that need no model weights.

Everything here runs before a model is loaded, so a typo costs a second, not a model load:
the scheme against the backend, files, the output directory, the backend's availability,
numeric ranges and the GPUs named. The checks that need the model's shapes (the group size)
read its config alone (models.target_in_features).
"""

from __future__ import annotations

import os
from typing import Optional


class CliError(Exception):
    """A bad argument or input: the command line prints it on one line and exits with status 2."""


def read_text_file(path: str, option: str) -> str:
    """The contents of a UTF-8 text file, or a CliError naming the option: missing, a
    directory, binary (a NUL byte, or bytes that are not UTF-8), or empty."""
    if not os.path.exists(path):
        raise CliError(f"{option} {path!r}: no such file")
    if not os.path.isfile(path):
        raise CliError(f"{option} {path!r} is not a file")
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data:
        raise CliError(f"{option} {path!r} is a binary file; give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{option} {path!r} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                       "give a UTF-8 text file") from None
    if not text.strip():
        raise CliError(f"{option} {path!r} is empty")
    return text


def check_positive(value: Optional[int], option: str, zero_ok: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not zero_ok)):
        raise CliError(f"{option} must be {'zero or more' if zero_ok else 'positive'}, got {value}")


def resolve_backend(backend: str, cuda: bool) -> str:
    """The backend that will run: "auto" is cuda where a GPU and the CUDA kernels are there,
    else torch. An explicit cuda without either is an error."""
    from .. import has_cuda_kernels

    if backend == "cuda":
        if not has_cuda_kernels():
            raise CliError("--backend cuda: this build of autoround_fast has no CUDA kernels "
                           "(built without nvcc or against a CPU torch); use --backend torch")
        if not cuda:
            raise CliError("--backend cuda needs a GPU, and "
                           + ("--device cpu was given" if torch_cuda_available() else "torch sees none")
                           + "; use --backend torch")
        return "cuda"
    if backend == "auto":
        return "cuda" if cuda and has_cuda_kernels() else "torch"
    return backend


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_device_ids(text: Optional[str], cuda: bool) -> None:
    """--device-ids: "auto" or GPU indices ("0,1", "cuda:0,cuda:1"), each once, each visible."""
    if text is None:
        return
    import torch

    count = torch.cuda.device_count() if cuda else 0
    if text.strip() == "auto":
        ids = list(range(count))
    else:
        ids = []
        for part in text.split(","):
            part = part.strip()
            num = part[5:] if part.startswith("cuda:") else part
            if not num.isdigit():
                raise CliError(f"--device-ids {text!r}: {part!r} is not a GPU index "
                               "(write '0,1', 'cuda:0,cuda:1' or 'auto')")
            ids.append(int(num))
    if not count:
        raise CliError(f"--device-ids {text!r} spreads each block over GPUs, and there is none to use")
    if not ids or len(set(ids)) != len(ids) or any(i >= count for i in ids):
        raise CliError(f"--device-ids {text!r} names GPUs {ids}, but {count} are visible "
                       "(each index once, each below the count)")


def check_output_dir(path: str, overwrite: bool) -> str:
    """The absolute output directory: not a file, empty or absent unless --overwrite, and
    inside a directory this user can write (the nearest one that exists)."""
    out = os.path.abspath(path)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise CliError(f"--output {out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise CliError(f"--output {out} exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--output {out}: cannot write in {parent}")
    return out


def check_model_path(path: str, option: str = "--model") -> str:
    """A model directory (with config.json) or a .gguf file."""
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise CliError(f"{option} {path!r}: no such GGUF file")
        return path
    if not os.path.isdir(path):
        raise CliError(f"{option} {path!r} is neither a directory nor a .gguf file (this command "
                       "reads no hub: download the model first)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"{option} {path!r} is a directory without config.json, not a saved model")
    return path

