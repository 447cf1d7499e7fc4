"""Per-block tuning time, peak memory and loss: backend="cuda" beside backend="auto_round".

Builds a model with random weights (no download; Llama-3.1-8B's block shape by default, the
others in bench/shapes.py: a 70B block, Qwen3-30B-A3B's, Mixtral's and GPT-OSS-20B's MoE blocks),
calibrates it on random tokens and quantizes it through llm-compressor's oneshot with each
backend in turn, in one process on one card. Prints, per scheme and backend: seconds of the
first block (which carries the process's one-time costs: library set-up, compilation) and the
median of the later blocks (how a model's other blocks run), peak GPU memory, each block's loss
at iteration 0 and at its best iteration, and the speed-up of each. Optionally profiles one
tuning iteration (matmuls versus the rest) against the plain bf16 forward+backward of the
block, which is the floor.

    python -m bench.block --scheme NVFP4 W4A16 --layers 2 --out results/
    python -m bench.block --shape smollm2 --layers 4 --iters 50     # small and quick
    python -m bench.block --shape 70b --layers 2 --scheme NVFP4      # a 70B block on one card
    python -m bench.block --shape qwen3-moe --layers 2 --scheme NVFP4 W4A16   # 128 experts, top-8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch

from bench.common import SCHEMES, quant_kwargs
from bench.shapes import SHAPES, build_model

# backend cuda with one optimisation off: the modifier's options, and what the ratio measures
CUDA_VARIANTS = {
    "cuda-nofuse": (dict(fuse_elementwise=False), "fusing the element-wise ops"),
    "cuda-sepstep": (dict(step_in_backward=False), "the sign step inside the weight backward"),
    "cuda-loop": (dict(grouped_experts=False), "the MoE experts as one grouped matmul per projection"),
    "cuda-held": (dict(remake_weights=False), "the fake-quantized weights made again in the backward"),
    # not a modifier option: fusion.SILU_MUL_ACT_QUANT, off for this run
    "cuda-sepact": (dict(silu_mul_act=False), "SiLU x up fused with down_proj's W4A4 input quantization"),
}

def calibration(nsamples: int, seqlen: int, vocab: int, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (nsamples, seqlen), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seqlen] * nsamples})


def capture_layer_inputs(model, ids: torch.Tensor) -> list:
    """(args, kwargs) of the first decoder layer for each row of ids (batch dimension 1)."""
    caps = []
    layer = model.model.layers[0]
    hook = layer.register_forward_pre_hook(lambda m, a, kw: caps.append((a, dict(kw))), with_kwargs=True)
    try:
        with torch.no_grad():
            for row in ids:
                model(row[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        hook.remove()
    return caps


BLOCK_SCHEMES = ("NVFP4", "NVFP4A16", "MXFP4", "MXFP4A16", "MXFP8", "MXFP8A16", "FP8", "FP8_DYNAMIC", "FP8_BLOCK",
                 "W8A8", "W4AFP8", "W4A16", "W4A16-G64")  # W4A16-G64 for SmolLM2 (576 features)


def engine_spec(scheme: str):
    """The engine's QuantSpec for a bench scheme, as the modifier derives it (FP8 and INT
    scales in bf16, as the model's dtype stores them)."""
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    from autoround_fast.scheme_spec import spec_from_scheme

    s = SCHEMES[scheme]
    qs = preset_name_to_scheme(s, ["Linear"]) if isinstance(s, str) else QuantizationScheme(targets=["Linear"], **s)
    return spec_from_scheme(qs, torch.bfloat16, "bench", "cuda", torch.bfloat16)


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1, vocab)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[UNK]")


class _AutoRoundLosses(logging.Handler):
    """auto-round's per-iteration losses at full precision: its loss function is wrapped to
    keep each (already computed) loss tensor, and the 'loss iter 0: a -> iter k: b' line it
    logs at the end of each block closes that block's curve."""

    PATTERN = re.compile(r"loss iter 0: \S+ -> iter (\d+): ")

    def __init__(self):
        super().__init__()
        self.curves, self.best_iters, self._pending = [], [], []
        try:
            from auto_round.algorithms.quantization.sign_round.quantizer import SignRoundQuantizer
        except ImportError:
            self._cls = None
            return
        self._cls, self._orig = SignRoundQuantizer, SignRoundQuantizer._get_loss
        pending = self._pending

        def get_loss(quantizer, *a, **k):
            loss = self._orig(quantizer, *a, **k)
            pending.append(loss.detach())
            return loss

        SignRoundQuantizer._get_loss = get_loss

    def emit(self, record):
        m = self.PATTERN.search(record.getMessage())
        if m:
            self.curves.append([float(t) for t in self._pending])  # batch 8, no accumulation
            self.best_iters.append(int(m.group(1)))
            self._pending.clear()

    def close(self):
        if self._cls is not None:
            self._cls._get_loss = self._orig
        super().close()


def free_run_memory() -> None:
    """llm-compressor's session keeps the last model and recipe alive: drop them."""
    from llmcompressor.core.session_functions import reset_session

    reset_session()


def run_backend(backend: str, scheme: str, args, tmp: str) -> dict:
    from llmcompressor import oneshot

    from autoround_fast import AutoRoundModifier

    model = build_model(args.shape, args.layers, args.seqlen)
    vocab = model.config.vocab_size
    cfg_dir = os.path.join(tmp, f"config-{backend}-{scheme}")
    model.config.save_pretrained(cfg_dir)  # oneshot re-reads the config from disk
    model.config._name_or_path = cfg_dir
    # the CUDA_VARIANTS: backend cuda with one optimisation off, for its ratio on the same card
    # in the same run
    options = {"fuse_elementwise": args.fuse, **CUDA_VARIANTS.get(backend, ({}, ""))[0]}
    from autoround_fast import fusion

    fusion.SILU_MUL_ACT_QUANT = options.pop("silu_mul_act", True)
    mod = AutoRoundModifier(**quant_kwargs(scheme), iters=args.iters,
                            batch_size=args.batch_size, backend="cuda" if backend in CUDA_VARIANTS else backend,
                            enable_torch_compile=args.compile, cache_on_cpu=args.cache_on_cpu,
                            device_ids=args.device_ids, **options)
    handler = _AutoRoundLosses()
    ar_logger = logging.getLogger("autoround")
    ar_logger.addHandler(handler)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
        for d in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(d)
    base = torch.cuda.memory_allocated() if gpu else 0
    t0 = time.perf_counter()
    try:
        oneshot(model=model, dataset=calibration(args.nsamples, args.seqlen, vocab), recipe=mod,
                processor=tokenizer(min(vocab, 512)), num_calibration_samples=args.nsamples,
                max_seq_length=args.seqlen)
        if gpu:
            torch.cuda.synchronize()
    finally:
        ar_logger.removeHandler(handler)
        handler.close()
    total = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if gpu else 0
    peaks = [torch.cuda.max_memory_allocated(d) / 2**30 for d in range(torch.cuda.device_count())] if gpu else []
    rows = mod.block_stats
    curves = [r["losses"] for r in rows]
    best_iters = [r["best_iter"] for r in rows]
    if backend == "auto_round":
        curves, best_iters = handler.curves, handler.best_iters
    out = dict(backend=backend, scheme=scheme, total_s=total, peak_gib=peak / 2**30, peak_gib_per_gpu=peaks,
               device_ids=args.device_ids,
               model_gib=base / 2**30, block_s=[r["seconds"] for r in rows],
               init_loss=[c[0] if c else float("nan") for c in curves], best_iter=best_iters,
               best_loss=[c[i] if c and i < len(c) else float("nan") for c, i in zip(curves, best_iters)],
               curves=curves)
    out["phases"] = [r.get("phases", {}) for r in rows]
    out["loop_ms"] = [r.get("loop_ms", []) for r in rows]
    out["fused"] = [r.get("fused", {}) for r in rows]
    out["grouped_experts"] = [r.get("grouped_experts", []) for r in rows]
    out["eager_reason"] = [r.get("eager_reason", "") for r in rows]
    out["memory_note"] = [r.get("memory_note", "") for r in rows]
    free_run_memory()
    del model, mod
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return out


def profile_iteration(args, scheme: str) -> dict:
    """One 8B-shaped block tuned by the engine for a few eager iterations under the profiler:
    GPU time per iteration split into matmuls, attention, our kernels and the rest; beside it
    the plain bf16 forward+backward of the same block and batch (the floor)."""
    from torch.profiler import ProfilerActivity, profile

    from autoround_fast.engine import tune_block
    from bench.common import time_ms

    model = build_model(args.shape, 1, args.seqlen)
    block = model.model.layers[0]
    g = torch.Generator().manual_seed(0)
    caps = capture_layer_inputs(model, torch.randint(1, model.config.vocab_size, (args.batch_size, args.seqlen),
                                                     generator=g))
    print("profile: block kwargs", {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else
                                       [tuple(t.shape) for t in v] if isinstance(v, tuple) else v)
                                   for k, v in caps[0][1].items()}, flush=True)
    spec = engine_spec(scheme)
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]

    # the floor: the bf16 block's forward + backward on one batch, weights trainable
    h = torch.cat([a[0] for a, _ in caps], 0).requires_grad_(False)
    kwargs = {k: v for k, v in caps[0][1].items() if k not in ("past_key_values", "use_cache")}
    if "position_embeddings" in kwargs:
        kwargs["position_embeddings"] = tuple(t.expand(h.shape[0], *t.shape[1:]) for t in kwargs["position_embeddings"])

    def fwd_bwd():
        out = block(h, **kwargs)
        (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()

    floor_ms = time_ms(fwd_bwd, warmup=3, reps=10)
    block.zero_grad(set_to_none=True)

    def kernel_ms(iters: int) -> dict:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            tune_block(copy.deepcopy(block), caps, {n: spec for n in names}, iters=iters,
                       batch_size=args.batch_size, backend="cuda", cuda_graph=False)
            torch.cuda.synchronize()
        cats = dict.fromkeys(("matmul", "attention", "fake-quant + loss (ours)", "other"), 0.0)
        for ev in prof.key_averages():
            us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            k = ev.key.lower()
            if not us or k.startswith(("profilerstep", "aten::", "autograd::", "cudagraph")):
                continue
            kernels[iters][ev.key[:90]] = kernels[iters].get(ev.key[:90], 0.0) + us / 1e3
            if any(s in k for s in ("gemm", "nvjet", "xmma", "cutlass", "sm90_")):
                cats["matmul"] += us / 1e3
            elif any(s in k for s in ("flash", "fmha", "attention", "sdpa", "efficient")):
                cats["attention"] += us / 1e3
            elif any(s in k for s in ("fake_quant", "masked_mse", "autoround")):
                cats["fake-quant + loss (ours)"] += us / 1e3
            else:
                cats["other"] += us / 1e3
        return cats

    # wall time per iteration of the whole loop, graph replay and eager, beside the floor's
    # back-to-back forward+backward (sustained, as the loop runs it)
    loop = {}
    for label, graph in (("graph", True), ("eager", False)):
        res = tune_block(copy.deepcopy(block), caps, {n: spec for n in names}, iters=60,
                         batch_size=args.batch_size, backend="cuda", cuda_graph=graph)
        loop[label] = res.phases["tune"] / 60 * 1e3
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(60):
        fwd_bwd()
    torch.cuda.synchronize()
    loop["floor"] = (time.perf_counter() - t0) / 60 * 1e3
    block.zero_grad(set_to_none=True)
    print(f"profile {scheme}: loop ms/iteration {loop}", flush=True)

    # two runs that differ only in the number of iterations: the difference is the loop alone
    # (the reference, calibration and output passes cancel)
    kernels = {2: {}, 6: {}}
    short, long = kernel_ms(2), kernel_ms(6)
    per_iter = {k: (long[k] - short[k]) / 4 for k in long}
    top = sorted(((v - kernels[2].get(k, 0.0)) / 4, k) for k, v in kernels[6].items())[::-1][:15]
    print(f"profile {scheme}: top kernels, ms per iteration:", flush=True)
    for ms, k in top:
        print(f"  {ms:7.3f}  {k}", flush=True)
    return dict(floor_fwd_bwd_ms=floor_ms, per_iter_ms=per_iter, total_ms=sum(per_iter.values()),
                loop_wall_ms=loop)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = sorted({r["scheme"] for r in results})
    fig, axes = plt.subplots(2, len(schemes), figsize=(6 * len(schemes), 7), squeeze=False)
    for col, scheme in enumerate(schemes):
        rows = [r for r in results if r["scheme"] == scheme]
        width = 0.8 / max(len(rows), 1)
        for k, r in enumerate(rows):  # one bar per backend, side by side
            blocks = range(len(r["block_s"]))
            axes[0][col].bar([b - 0.4 + width * (k + 0.5) for b in blocks], r["block_s"],
                             width=width, label=r["backend"])
            axes[1][col].plot(list(blocks), r["best_loss"], marker="o", label=f"{r['backend']} best")
            axes[1][col].plot(list(blocks), r["init_loss"], marker="x", linestyle=":", label=f"{r['backend']} iter 0")
        nblocks = max((len(r["block_s"]) for r in rows), default=0)
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xticks(range(nblocks))
        axes[0][col].set(title=f"{scheme}: seconds per block", xlabel="block", ylabel="s")
        axes[1][col].set(title=f"{scheme}: block loss", xlabel="block", ylabel="loss", yscale="log")
        axes[0][col].legend()
        axes[1][col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _first_later(block_s: list[float]) -> tuple[float, Optional[float]]:
    """The first block's seconds (with the process's one-time costs: cuDNN and cuBLAS set-up,
    torch.compile of the fused ops, auto-round's compile) and the median of the later blocks
    (None with one block): a model's other blocks run like the later ones."""
    if not block_s:
        return float("nan"), None
    return block_s[0], (statistics.median(block_s[1:]) if len(block_s) > 1 else None)


def table(results: list[dict], card: str, cmd: str) -> str:
    lines = [f"card: {card}", f"command: `{cmd}`", "",
             "| scheme | backend | first block s | later blocks s (median) | blocks | total s | peak GiB "
             "| loss iter 0 | best loss | speed-up: first / later blocks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["scheme"], r["backend"]): r for r in results}
    fmt = lambda xs: ", ".join(f"{x:.5g}" for x in xs)
    opt = lambda x: "-" if x is None else f"{x:.2f}"
    for r in results:
        first, later = _first_later(r["block_s"])
        base = by.get((r["scheme"], "auto_round"))
        speed = ""
        if base and r["backend"] != "auto_round" and base["block_s"]:
            b_first, b_later = _first_later(base["block_s"])
            speed = f"{b_first / first:.1f}x / " + ("-" if later is None or b_later is None
                                                    else f"{b_later / later:.1f}x")
        lines.append(f"| {r['scheme']} | {r['backend']} | {first:.2f} | {opt(later)} | {fmt(r['block_s'])} "
                     f"| {r['total_s']:.1f} | {r['peak_gib']:.1f} | {fmt(r['init_loss'])} | {fmt(r['best_loss'])} "
                     f"| {speed} |")
    for scheme in dict.fromkeys(r["scheme"] for r in results):
        for variant, (_, what) in CUDA_VARIANTS.items():
            on, off = by.get((scheme, "cuda")), by.get((scheme, variant))
            if on and off and on["block_s"] and off["block_s"]:
                (f1, fl), (u1, ul) = _first_later(on["block_s"]), _first_later(off["block_s"])
                line = f"\n{scheme}: {what}, first block {u1:.2f} -> {f1:.2f} s ({u1 / f1:.2f}x)"
                if fl is not None and ul is not None:
                    line += f", later blocks {ul:.2f} -> {fl:.2f} s ({ul / fl:.2f}x)"
                lines.append(line)
    for r in results:
        if r.get("device_ids"):
            lines.append(f"\n{r['scheme']} {r['backend']}: device_ids={r['device_ids']}, peak GiB per GPU "
                         + ", ".join(f"{g:.1f}" for g in r.get("peak_gib_per_gpu", [])))
    for r in results:
        if any(r.get("phases") or []):
            keys = list(r["phases"][0])
            lines.append(f"\n{r['scheme']} {r['backend']}, seconds per phase of each block: " + "; ".join(
                ", ".join(f"{k} {ph.get(k, 0):.2f}" for k in keys) for ph in r["phases"]))
        if any(r.get("loop_ms") or []):  # GPU stream time of the loop, per ten iterations
            lines.append(f"{r['scheme']} {r['backend']}, tuning loop ms per iteration of each block "
                         "(first ten with warm-up; then median, min-max): " + "; ".join(
                             f"{ms[0]:.1f}; {statistics.median(ms[1:]):.2f}, {min(ms[1:]):.2f}-{max(ms[1:]):.2f}"
                             if len(ms) > 1 else f"{ms[0]:.1f}" for ms in r["loop_ms"] if ms))
        if (r.get("backend") == "cuda" or r.get("backend") in CUDA_VARIANTS) and r.get("fused"):
            kinds = sorted({k for f in r["fused"] for k in f})
            lines.append(f"{r['scheme']} {r['backend']}: element-wise ops compiled while tuning: "
                         + (", ".join(kinds) if kinds else "none"))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scheme", nargs="+", default=["NVFP4", "W4A16"], choices=BLOCK_SCHEMES)
    p.add_argument("--backends", nargs="+", default=["auto_round", "cuda"],
                   choices=["auto_round", "cuda", *CUDA_VARIANTS, "torch"],
                   help="cuda-nofuse: backend cuda with fuse_elementwise off; cuda-sepstep: with the sign "
                        "step as its own kernel (step_in_backward off); cuda-loop: MoE experts one Linear "
                        "at a time (grouped_experts off); cuda-held: the fake-quantized weights held for the "
                        "backward (remake_weights off)")
    p.add_argument("--shape", default="8b", choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="auto_round backend: torch.compile (llm-compressor's default)")
    p.add_argument("--cache-on-cpu", dest="cache_on_cpu", action="store_true")
    p.add_argument("--device-ids", dest="device_ids", default=None,
                   help='spread each block over these GPUs ("0,1", "auto"): device_ids')
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="backend cuda: compile the block's RMSNorm, SiLU*up and rotary while tuning "
                        "(default: on where Triton is there)")
    p.add_argument("--profile", action="store_true", help="also profile one tuning iteration per scheme")
    p.add_argument("--profile-loop", dest="profile_loop", nargs="?", const="", default=None, metavar="TRACE_DIR",
                   help="print the kernels of iterations 4-6 of each block's loop, by kind (bench.loop_profile); "
                        "with a folder, also write each timeline there")
    p.add_argument("--out", default="bench-block-out")
    p.add_argument("--one", help=argparse.SUPPRESS)  # BACKEND:SCHEME, run in a child process
    args = p.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.one:
        backend, scheme = args.one.split(":")
        logging.getLogger("autoround").setLevel(logging.INFO)
        from bench.loop_profile import profiled_loops

        profiling = profiled_loops(args.profile_loop or None) if args.profile_loop is not None \
            else contextlib.nullcontext()
        with tempfile.TemporaryDirectory() as tmp, profiling:
            r = run_backend(backend, scheme, args, tmp)
        with open(os.path.join(args.out, f"one-{backend}-{scheme}.json"), "w") as f:
            json.dump(r, f)
        return
    if not torch.cuda.is_available() and (args.profile or {"cuda", *CUDA_VARIANTS} & set(args.backends)):
        raise SystemExit("bench.block: backend cuda and --profile need a GPU")
    logging.getLogger("autoround").setLevel(logging.INFO)
    os.makedirs(args.out, exist_ok=True)
    from autoround_fast.cli.schemes import STOCK_PATH_FAILS
    from bench.common import card_info

    card = card_info() if torch.cuda.is_available() else "cpu"
    cmd = "python -m bench.block " + " ".join(argv)
    results, profiles = [], {}
    for scheme in args.scheme:
        for backend in args.backends:
            if backend == "auto_round" and scheme in STOCK_PATH_FAILS:
                print(f"{scheme} auto_round: not run, the stock path {STOCK_PATH_FAILS[scheme]}", flush=True)
                continue
            # one child process per run: its peak memory is its own, and nothing of one
            # run (llm-compressor's session, caches, graph pools) is left for the next
            path = os.path.join(args.out, f"one-{backend}-{scheme}.json")
            if os.path.exists(path):
                os.remove(path)
            env = dict(os.environ)
            if backend == "auto_round":  # its eager-attention backward fragments the
                # allocator until an 80 GB card runs out (seen on the H100); not needed by ours
                env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
            subprocess.run([sys.executable, "-m", "bench.block", *argv, "--one", f"{backend}:{scheme}"],
                           env=env)
            if not os.path.exists(path):
                print(f"{scheme} {backend}: the run failed (see above)", flush=True)
                continue
            with open(path) as f:
                r = json.load(f)
            results.append(r)
            print(f"{scheme} {backend}: blocks {['%.2f' % s for s in r['block_s']]} s, peak "
                  f"{r['peak_gib']:.1f} GiB, loss {r['init_loss']} -> {r['best_loss']}", flush=True)
            with open(os.path.join(args.out, "block.json"), "w") as f:
                json.dump(dict(card=card, command=cmd, results=results, profiles=profiles), f)
        if args.profile:
            profiles[scheme] = profile_iteration(args, scheme)
            print(f"{scheme} profile: {json.dumps(profiles[scheme])}", flush=True)
    text = table(results, card, cmd)
    for scheme, prof in profiles.items():
        text += (f"\n\n{scheme}, GPU time of one tuning iteration (profiler, eager, batch {args.batch_size}"
                 f" x {args.seqlen}): total {prof['total_ms']:.1f} ms = "
                 + ", ".join(f"{k} {v:.1f} ms" for k, v in prof["per_iter_ms"].items())
                 + f"; plain bf16 forward+backward of the block on one batch: {prof['floor_fwd_bwd_ms']:.1f} ms"
                 f" (x{args.iters} = {prof['floor_fwd_bwd_ms'] * args.iters / 1e3:.2f} s)")
    print(text)
    with open(os.path.join(args.out, "block.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "block.json"), "w") as f:
        json.dump(dict(card=card, command=cmd, results=results, profiles=profiles), f)
    try:
        plot(results, os.path.join(args.out, "block.png"))
    except ImportError:
        print("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
