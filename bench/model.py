"""A whole model quantized end to end: one oneshot over a random-weight Llama of a given shape
(Llama-3.1-8B's, 32 layers, by default), timed by phase, beside the stock path's per-block time
measured in the same run on a few layers of the same shape.

Phases: model load (from_pretrained of the saved random model), calibration and everything
else outside the tuning loops (oneshot's total less the loops), the tuning loops themselves
(the engine's "tune" phase of every block), and the compressed save. Peak GPU memory and the
process's peak host memory (max RSS). The stock path (backend auto_round) runs in its own
process on --stock-layers layers; its blocks' time for the whole model is extrapolated from its
first and median later block (the first carries compilation) and compared with ours.
--extrapolate-to N adds the end-to-end time of the same shape at N layers (a model too large to
build on the card, such as the 48-layer Qwen3-30B-A3B): load, the time outside the loops and
save scaled by N / layers, the loops as the first block's loop plus the median later loop x (N - 1).

    python -m bench.model --scheme NVFP4 --out results/
    python -m bench.model --shape tiny --layers 4 --iters 4 --nsamples 8 --seqlen 32   # CPU, seconds
    python -m bench.model --shape qwen3-moe --layers 4 --stock-layers 0 --extrapolate-to 48
    python -m bench.model --layers 8 --stock-layers 0 --offload-device cuda   # activations kept on the card
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.block import BLOCK_SCHEMES, calibration, tokenizer
from bench.shapes import SHAPES
from bench.common import quant_kwargs


def peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_ours(args, tmp: str) -> dict:
    """The whole model through oneshot with our backend, timed by phase."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from autoround_fast import AutoRoundModifier
    from autoround_fast.checkpoint import save_checkpoint

    gpu = torch.cuda.is_available()
    src = os.path.join(tmp, "random-model")
    # the "download", not timed, in a child process: its memory is not this process's peak
    subprocess.run([sys.executable, "-c", "import sys; from bench.shapes import build_model; "
                    "build_model(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])).save_pretrained(sys.argv[4])",
                    args.shape, str(args.layers), str(args.seqlen), src], check=True)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="cuda" if gpu else None)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    mod = AutoRoundModifier(**quant_kwargs(args.scheme), iters=args.iters, batch_size=args.batch_size,
                            backend=args.backend, progress=False)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=calibration(args.nsamples, args.seqlen, vocab), recipe=mod,
            processor=tokenizer(min(vocab, 512)), num_calibration_samples=args.nsamples,
            max_seq_length=args.seqlen, sequential_offload_device=args.offload_device)
    if gpu:
        torch.cuda.synchronize()
    oneshot_s = time.perf_counter() - t0
    rows = mod.block_stats
    tune_s = sum(r["phases"].get("tune", 0.0) for r in rows)
    t0 = time.perf_counter()
    save_checkpoint(model, tokenizer(min(vocab, 512)), os.path.join(tmp, "checkpoint"))
    save_s = time.perf_counter() - t0
    return dict(backend=args.backend, scheme=args.scheme, shape=args.shape, layers=args.layers,
                offload_device=args.offload_device, load_s=load_s, oneshot_s=oneshot_s, tune_s=tune_s,
                outside_tune_s=oneshot_s - tune_s,
                save_s=save_s, total_s=load_s + oneshot_s + save_s,
                block_s=[r["seconds"] for r in rows], loop_s=[r["phases"].get("tune", 0.0) for r in rows],
                best_loss=[r["best_loss"] for r in rows],
                init_loss=[r["init_loss"] for r in rows],
                peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else 0.0,
                peak_host_gib=peak_host_gib())


def later_block_s(block_s: list[float]) -> float:
    """The median block after the first (which carries compilation), or the one block."""
    return statistics.median(block_s[1:] or block_s)


def run_stock(args, tmp: str) -> dict:
    """The stock path on --stock-layers layers of the same shape (bench.block, own process)."""
    out = os.path.join(tmp, "stock")
    cmd = [sys.executable, "-m", "bench.block", "--shape", args.shape, "--layers", str(args.stock_layers),
           "--backends", "auto_round", "--scheme", args.scheme, "--iters", str(args.iters),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
           "--out", out, *([] if args.compile else ["--no-compile"])]
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, "block.json")) as f:
        r = json.load(f)["results"][0]
    later = later_block_s(r["block_s"])
    return dict(layers=args.stock_layers, block_s=r["block_s"], later_block_s=later,
                whole_model_s=r["block_s"][0] + later * (args.layers - 1),
                peak_gpu_gib=r["peak_gib"])


def extrapolate(ours: dict, layers: int) -> dict:
    """The phases of the same run scaled to a model of ``layers`` layers: the tuning loops as the
    first block's loop plus the median later loop for each further block, the rest by layers."""
    scale = layers / ours["layers"]
    loops = ours["loop_s"]
    phases = dict(load_s=ours["load_s"] * scale, outside_tune_s=ours["outside_tune_s"] * scale,
                  tune_s=loops[0] + later_block_s(loops) * (layers - 1), save_s=ours["save_s"] * scale)
    return dict(layers=layers, **phases, total_s=sum(phases.values()))


def table(ours: dict, stock: dict | None, card: str, cmd: str, extra: dict | None = None) -> str:
    loops = ours["loop_s"]
    later = later_block_s(loops)
    lines = [f"card: {card}", f"command: `{cmd}`", "",
             f"{ours['scheme']}, {ours['shape']} shape, {ours['layers']} layers, backend {ours['backend']}, "
             f"the pipeline's activations between layers on {ours['offload_device']}:", "",
             "| phase | seconds |", "|---|---|",
             f"| model load | {ours['load_s']:.1f} |",
             f"| calibration and everything outside the tuning loops | {ours['outside_tune_s']:.1f} |",
             f"| tuning loops ({len(loops)} blocks; first {loops[0]:.2f} s, "
             f"later median {later:.2f} s) | {ours['tune_s']:.1f} |",
             f"| save (compressed) | {ours['save_s']:.1f} |",
             f"| **end to end** | **{ours['total_s']:.1f}** |", "",
             f"peak GPU {ours['peak_gpu_gib']:.1f} GiB, peak host {ours['peak_host_gib']:.1f} GiB"]
    if extra:
        lines += ["", f"extrapolated to {extra['layers']} layers: **{extra['total_s']:.0f} s** end to end (load "
                  f"{extra['load_s']:.0f} s, outside the loops {extra['outside_tune_s']:.0f} s, tuning loops "
                  f"{extra['tune_s']:.0f} s, save {extra['save_s']:.0f} s)"]
    if stock:
        ours_blocks = sum(ours["block_s"])
        lines += ["", f"stock path (auto_round), measured on {stock['layers']} layers in the same run: "
                  f"{stock['later_block_s']:.2f} s per later block, peak GPU {stock['peak_gpu_gib']:.1f} GiB; "
                  f"its {ours['layers']} blocks extrapolated: {stock['whole_model_s']:.0f} s, against our "
                  f"{ours_blocks:.0f} s of blocks ({stock['whole_model_s'] / ours_blocks:.1f}x; "
                  f"{stock['later_block_s'] / later_block_s(ours['block_s']):.1f}x per later block)"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scheme", default="NVFP4", choices=BLOCK_SCHEMES)
    p.add_argument("--shape", default="8b", choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--backend", default=None, choices=["cuda", "torch"], help="default: cuda on a GPU, else torch")
    p.add_argument("--stock-layers", dest="stock_layers", type=int, default=2,
                   help="layers the stock path runs for its per-block time (0: not run)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="stock path: torch.compile (llm-compressor's default)")
    p.add_argument("--offload-device", dest="offload_device", default="cpu",
                   help="where llm-compressor's pipeline keeps the activations between layers "
                        "(its sequential_offload_device; default, as its own: cpu)")
    p.add_argument("--extrapolate-to", dest="extrapolate_to", type=int, default=None, metavar="N",
                   help="also the end-to-end time of the same shape at N layers, scaled from this run")
    p.add_argument("--out", default="bench-model-out")
    args = p.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    args.backend = args.backend or ("cuda" if torch.cuda.is_available() else "torch")
    os.makedirs(args.out, exist_ok=True)
    from bench.common import card_info

    card = card_info() if torch.cuda.is_available() else "cpu"
    cmd = "python -m bench.model " + " ".join(argv)
    stock = None
    if args.stock_layers:  # first, in its own process: this process's peak memory stays ours
        with tempfile.TemporaryDirectory() as tmp:
            stock = run_stock(args, tmp)
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(args, tmp)
    print(f"ours: {json.dumps({k: v for k, v in ours.items() if not isinstance(v, list)})}", flush=True)
    extra = extrapolate(ours, args.extrapolate_to) if args.extrapolate_to else None
    text = table(ours, stock, card, cmd, extra)
    print(text)
    with open(os.path.join(args.out, "model.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "model.json"), "w") as f:
        json.dump(dict(card=card, command=cmd, ours=ours, stock=stock, extrapolated=extra), f, indent=1)


if __name__ == "__main__":
    main()
