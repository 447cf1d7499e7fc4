"""The command line's options, each also settable from the environment.

An option --some-name can be set as AUTOROUND_FAST_SOME_NAME; the command line wins. Flags
take 1/0, true/false, yes/no or on/off. A bad value is an error naming the variable.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from typing import Mapping, Optional

from .checks import CliError

ENV_PREFIX = "AUTOROUND_FAST_"
ENV_HELP = (f"Every option can also be set in the environment as {ENV_PREFIX}<OPTION> (upper case, dashes "
            f"as underscores: {ENV_PREFIX}ITERS=1, {ENV_PREFIX}OVERWRITE=1); the command line wins.")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are CliErrors: one line, status 2."""

    def error(self, message):
        raise CliError(f"{message} (see `{self.prog} --help`)")


def env_name(action: argparse.Action) -> str:
    long = next(s for s in action.option_strings if s.startswith("--"))  # --fuse, not --no-fuse
    return ENV_PREFIX + long.lstrip("-").upper().replace("-", "_")


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Set each option's default from its AUTOROUND_FAST_ variable, converted and checked as
    the command line's value would be."""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = env_name(action)
        if name not in environ:
            continue
        raw = environ[name]
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a flag
            if raw.strip().lower() not in TRUE + FALSE:
                raise CliError(f"{name}={raw!r}: write one of {', '.join(TRUE + FALSE)}")
            value = raw.strip().lower() in TRUE
            if isinstance(action, argparse._StoreFalseAction):
                value = not value
        else:
            try:
                value = action.type(raw) if action.type else raw
            except (TypeError, ValueError):
                kind = {int: "whole number", float: "number"}.get(action.type, action.dest)
                raise CliError(f"{name}={raw!r} is not a valid {kind}") from None
            if action.choices is not None and value not in action.choices:
                raise CliError(f"{name}={raw!r}: choose one of {', '.join(map(str, action.choices))}")
        action.default = value


def build_parser(environ: Optional[Mapping[str, str]] = None) -> argparse.ArgumentParser:
    from . import __doc__ as description
    from .quantize import CPU_SETTINGS, GPU_SETTINGS
    from .texts import EVAL_SEQLEN, EVAL_WINDOWS

    environ = os.environ if environ is None else environ
    ap = Parser(prog="autoround-fast", description=description, epilog=textwrap.fill(ENV_HELP, 90),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="{quantize,eval,selfcheck}")
    cpu, gpu = CPU_SETTINGS, GPU_SETTINGS

    q = sub.add_parser("quantize", help="quantize a model end to end, then measure its perplexity",
                       description="Quantize a model with AutoRound and measure the result: perplexity of the "
                                   "original model, of plain RTN and of the checkpoint on held-out text.",
                       epilog=ENV_HELP)
    q.add_argument("--model", metavar="PATH",
                   help="model directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    q.add_argument("--scheme", default="NVFP4",
                   help="llm-compressor preset (default NVFP4): NVFP4, MXFP4, MXFP8, FP8, FP8_DYNAMIC, "
                        "FP8_BLOCK, W8A8, W4AFP8, W2A16..W8A16, W4A16_ASYM and the A16 variants; backend "
                        "auto_round takes those the stock path runs (a wrong name lists them)")
    q.add_argument("--group-size", type=int, metavar="N",
                   help="weight group of an INT scheme (-1: one scale per output channel). Default: the "
                        "preset's, or the largest of 32/64/128 below it that divides every layer")
    q.add_argument("--skip-indivisible", action="store_true",
                   help="leave the layers the group does not divide unquantized (named in a warning) "
                        "instead of failing")
    q.add_argument("--iters", type=int, metavar="N",
                   help=f"SignRound iterations per block; 0: RTN with auto-round's imatrix-weighted scale "
                        f"search (default {gpu['iters']} on a GPU, {cpu['iters']} on a CPU)")
    q.add_argument("--nsamples", type=int, metavar="N",
                   help=f"calibration samples (default {gpu['nsamples']} on a GPU, {cpu['nsamples']} on a CPU)")
    q.add_argument("--seqlen", type=int, metavar="N",
                   help=f"tokens per sample (default {gpu['seqlen']} on a GPU, {cpu['seqlen']} on a CPU)")
    q.add_argument("--batch-size", type=int, metavar="N",
                   help=f"samples per step (default {gpu['batch_size']} on a GPU, {cpu['batch_size']} on a CPU)")
    q.add_argument("--lr", type=float, metavar="X",
                   help=f"SignRound step size, decaying linearly to 0 (default 1/iters, AutoRound's, on a GPU; "
                        f"{cpu['lr']} on a CPU, where few iterations want a smaller step)")
    q.add_argument("--seed", type=int, default=42, metavar="N", help="seed of the batch order and of torch (default 42)")
    q.add_argument("--backend", default="auto", choices=["auto", "cuda", "torch", "auto_round"],
                   help="auto: cuda when a GPU and the CUDA kernels are there, else torch; auto_round: "
                        "intel's auto-round through llm-compressor's own modifier")
    q.add_argument("--calib-file", metavar="FILE",
                   help="UTF-8 text file to calibrate on (default: CPython's pydoc topics, less the held-out ones)")
    q.add_argument("--dataset", metavar="DIR",
                   help="a dataset directory saved with datasets' save_to_disk, with a 'text' column")
    q.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="measure perplexity after quantizing (default on; --no-eval skips it, and the "
                        "second copy of the model the RTN baseline needs)")
    q.add_argument("--eval-file", metavar="FILE",
                   help="UTF-8 text file to measure perplexity on (default: the pydoc topics held out "
                        "from calibration)")
    q.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS, metavar="N",
                   help=f"windows of {EVAL_SEQLEN} tokens to measure perplexity on (default {EVAL_WINDOWS})")
    q.add_argument("--output", metavar="DIR", help="output directory (default autoround-fast-out/<model>-<scheme>)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    q.add_argument("--cache-on-cpu", action="store_true",
                   help="keep each block's cached activations in host memory (GPUs short of memory)")
    q.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: ignore a GPU")
    q.add_argument("--device-ids", metavar="IDS",
                   help='spread each block over these GPUs while tuning ("0,1" or "auto"), for a '
                        "block whose tuning state does not fit one card")
    q.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="backend cuda: run the blocks' RMSNorm, SiLU*up and rotary compiled while tuning "
                        "(default: on where Triton is there)")
    q.add_argument("--deterministic", action="store_true",
                   help="GPU: PyTorch's deterministic algorithms (the attention backward among them), so "
                        "repeat runs are guaranteed the same bits; about 1.25x slower tuning")

    e = sub.add_parser("eval", help="perplexity of a checkpoint on held-out text",
                       description="Perplexity of a model on held-out text: by default the pydoc topics that "
                                   "quantize never calibrates on, in the same windows as quantize's table.",
                       epilog=ENV_HELP)
    e.add_argument("model", metavar="MODEL", nargs="?",
                   help="checkpoint directory (compressed-tensors or plain) or .gguf file (default: the "
                        "bundled SmolLM2-135M-Instruct, unquantized)")
    e.add_argument("--text", metavar="FILE", help="UTF-8 text file to measure on (default: the held-out pydoc topics)")
    e.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS, metavar="N",
                   help=f"windows of {EVAL_SEQLEN} tokens (default {EVAL_WINDOWS})")
    e.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: ignore a GPU")

    sub.add_parser("selfcheck", help="compare the installed kernels with the plain-PyTorch oracles",
                   description="Quantize a random layer with the kernels of every available device and with "
                               "the oracles, and report whether they agree bit for bit.")
    for p in (q, e):
        apply_env_defaults(p, environ)
    return ap
