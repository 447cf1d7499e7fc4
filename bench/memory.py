"""The engine's memory estimate for one block of each shape, no GPU needed: what
``engine/memory.py`` predicts a later block's tuning takes on its device, to set beside the peaks
that ``bench.block`` measures.

Each shape's decoder layer is built with random weights (MoE experts linearized as
llm-compressor does), and its Linears go through ``memory.BlockMemory`` as ``options.plan``
builds it for a block after the first under the modifier: the fp inputs and the previous block's
quantized outputs already on the device, the fp inputs released after the reference pass, every
expert run grouped on its routed share of the tokens (and, in such a block, the experts'
fake-quantized weights made again in the backward, one projection's stack at a time, under a
scheme whose experts stack: W4A16, NVFP4, MX), the attention through SDPA where the engine swaps
it in on a GPU (GPT-OSS's, with its sinks and sliding windows, stays eager).

    python -m bench.memory                                  # 8b, 70b and the MoE shapes
    python -m bench.memory --shape tiny tiny-moe --nsamples 4 --seqlen 16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from bench.shapes import SHAPES, build_model

DEFAULT_SHAPES = ["8b", "70b", "qwen3-moe", "mixtral", "gpt-oss"]
HELD = 2  # caches a later block finds on its device: its fp inputs and the quantized inputs
ELEM = torch.bfloat16.itemsize  # the block's dtype, as bench.block builds it
# a scheme whose experts stack (W4A16; NVFP4 and MX alike): their weights made again in the backward
STACKED_SCHEME = ("int", 4, 128, True)


def block_linears(shape: str, seqlen: int) -> tuple[nn.Module, dict[str, nn.Linear]]:
    """One decoder layer of the shape, built as bench.block builds it, with its Linears by name."""
    from llmcompressor.modeling.moe.linearize import linearize_moe

    layer = linearize_moe(build_model(shape, 1, seqlen)).model.layers[0]
    return layer, {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def estimate(shape: str, nsamples: int, seqlen: int, batch: int) -> dict:
    """The block's weights, what its tuning adds, and that plus the caches it holds while it
    tunes (the whole of what the block holds on the device but the model's weights)."""
    from autoround_fast.engine.attention import eager_scores
    from autoround_fast.engine.experts import routed_shares
    from autoround_fast.engine.memory import BlockMemory
    from autoround_fast.engine.options import remade_stacks
    from autoround_fast.engine.spec import QuantSpec

    layer, linears = block_linears(shape, seqlen)
    hidden = SHAPES[shape].hidden
    shares = routed_shares(layer, linears)
    block = BlockMemory(linears, nsamples, seqlen, hidden, ELEM, release_inputs=True, resident=HELD, shares=shares,
                        scores=eager_scores(layer, seqlen, on_gpu=True),
                        remade=remade_stacks(layer, linears, {n: QuantSpec(*STACKED_SCHEME) for n in linears}))
    adds = block.bytes(batch, caches_on_device=True)
    caches = HELD * nsamples * seqlen * hidden * ELEM  # those it finds held (the reference takes the fp inputs' place)
    weights = sum(m.weight.numel() for m in linears.values())
    return dict(shape=shape, weights=weights, routed=len(shares), adds_gib=adds / 2**30,
                with_caches_gib=(adds + caches) / 2**30)


def _gib(x: float) -> str:
    return f"{x:.2f} GiB" if x >= 1 else f"{x * 1024:.1f} MiB"


def table(rows: list[dict]) -> str:
    lines = ["| shape | tuned weights | expert Linears on a share of the tokens | tuning adds | with its caches |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['weights'] / 1e6:.2f} M | {r['routed']} | {_gib(r['adds_gib'])} "
                     f"| {_gib(r['with_caches_gib'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    args = p.parse_args(argv)
    print(table([estimate(s, args.nsamples, args.seqlen, args.batch_size) for s in args.shape]))


if __name__ == "__main__":
    main()
