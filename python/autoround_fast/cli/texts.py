"""Text for calibration and for evaluation, offline.

The defaults are the Python documentation topics that ship with CPython (pydoc_data.topics),
split in two disjoint sets: a topic is held out for evaluation when the CRC-32 of its name is
a multiple of 10 (5 of 3.11's 79 topics, about 10k SmolLM2 tokens), and calibrates otherwise.
The split depends on the topic's name alone, so a topic keeps its side whatever other topics a
Python version adds or drops, and the evaluation text is never calibration text.
"""

from __future__ import annotations

import os
import zlib

import torch

from .checks import CliError

HELD_OUT_MODULUS = 10
# Perplexity is measured on the first EVAL_WINDOWS windows of EVAL_SEQLEN tokens of the text
# (fewer tokens if the model's context is shorter): the same tokens for every model compared.
EVAL_WINDOWS = 4
EVAL_SEQLEN = 512


def is_held_out(topic: str) -> bool:
    """True for the pydoc topics kept for evaluation (never used to calibrate)."""
    return zlib.crc32(topic.encode()) % HELD_OUT_MODULUS == 0


def pydoc_topics_text(held_out: bool) -> str:
    """The calibration (held_out=False) or evaluation (True) topics, sorted by name, joined."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics) if is_held_out(k) == held_out)


def dataset_text(path: str) -> str:
    """The "text" column of a dataset saved with datasets' save_to_disk, joined."""
    if not os.path.isdir(path):
        raise CliError(f"--dataset {path!r} is not a directory saved with datasets' save_to_disk "
                       "(this command reads no hub)")
    from datasets import load_from_disk

    try:
        ds = load_from_disk(path)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(f"--dataset {path!r} is not a directory saved with datasets' save_to_disk ({e})") from None
    if hasattr(ds, "keys"):  # a DatasetDict: take its first split
        ds = ds[sorted(ds.keys())[0]]
    if "text" not in ds.column_names:
        raise CliError(f"--dataset {path!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds["text"] if t)


def token_windows(tokenizer, text: str, count: int, seqlen: int, what: str) -> torch.Tensor:
    """[n, seqlen] token ids: the first n = min(count, available) consecutive windows of the
    text. None at all (the text is shorter than one window) is an error naming `what`."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(count, ids.numel() // seqlen)
    if n == 0:
        raise CliError(f"the {what} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if n < count:
        print(f"note: the {what} gives {n} windows of {seqlen} tokens, not {count}")
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_dataset(windows: torch.Tensor):
    """The windows as a datasets.Dataset of input_ids and attention_mask, as oneshot takes it."""
    from datasets import Dataset

    n, seqlen = windows.shape
    return Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": [[1] * seqlen] * n})
