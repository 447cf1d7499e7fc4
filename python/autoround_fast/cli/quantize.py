"""``autoround-fast quantize``: the main job.

Two phases. ``prepare`` checks every argument and reads what it needs short of the weights
(the files, the model's config and tokenizer, the calibration and evaluation windows): a bad
argument fails in seconds. ``execute`` loads the model, measures the original model and
llm-compressor's RTN, tunes with AutoRound, writes the checkpoint, reloads it and measures it.
The checkpoint is written inside a hidden sibling of the output directory (cli/resume.py) and
renamed at the end: a failed or interrupted run leaves no output, only that directory with
the blocks it finished, from which the same command resumes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..checkpoint import save_checkpoint, source_dtype
from ..engine.precision import cpu_tune_dtype
from ..perplexity import perplexity
from . import checks, models, plot, resume, schemes, texts
from .checks import CliError

# AutoRound's own defaults where there is a GPU (lr None: 1 / iters).
GPU_SETTINGS = dict(iters=200, nsamples=128, seqlen=2048, batch_size=8, lr=None)
# About 5 minutes on 2 CPU cores for the bundled default, evaluation included. Few iterations
# want a smaller step than 1 / iters: with lr = 1/5 the sign steps flip a fifth of the roundings
# at once and the kept parameters fit the few calibration tokens, worse than plain RTN on
# held-out text; lr = 0.02 wins back about half of RTN's perplexity increase (README).
CPU_SETTINGS = dict(iters=20, nsamples=8, seqlen=128, batch_size=4, lr=0.02)
# the share of the GPU's free memory that the pipeline's activations between layers may take there
OFFLOAD_SHARE = 0.25


def settings(args, cuda: bool) -> dict:
    """iters, nsamples, seqlen, batch_size, lr: the device's defaults, less what the command line gave."""
    base = GPU_SETTINGS if cuda else CPU_SETTINGS
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}


@dataclass
class Job:
    """A checked quantize command: everything but the weights."""

    model_path: str
    choice: schemes.SchemeChoice
    backend: str
    cuda: bool
    settings: dict
    seed: int
    out_dir: str
    overwrite: bool
    tokenizer: object
    calib_windows: torch.Tensor
    calib_source: str
    eval_windows: Optional[torch.Tensor]  # None: --no-eval
    eval_source: str
    deterministic: bool
    save_dtype: torch.dtype  # the dtype the source model was published in: the checkpoint's
    modifier_options: dict = field(default_factory=dict)
    resumed_blocks: int = 0  # blocks an earlier run of this command finished

    @property
    def command(self) -> dict:
        """What decides the result: a resume directory is taken only by the same command."""
        return dict(model=os.path.abspath(self.model_path), scheme=self.choice.label,
                    modifier=json.loads(json.dumps(self.choice.modifier_kwargs, default=str)),
                    ignore=self.choice.ignore, backend=self.backend, gpu=self.cuda, seed=self.seed, **self.settings,
                    fuse=self.modifier_options.get("fuse_elementwise"),
                    scale_dtype=self.modifier_options.get("scale_dtype"),
                    calibration=hashlib.sha256(self.calib_windows.numpy().tobytes()).hexdigest(),
                    dtype=str(self.dtype), save_dtype=str(self.save_dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model is loaded and tuned in: bf16 on a GPU; on a CPU the one auto-round
        converts each block to (bf16 with AVX512-BF16, else fp32), so the model is one dtype."""
        return torch.bfloat16 if self.cuda else cpu_tune_dtype()


def prepare(args) -> Job:
    """Every check, cheapest first, before any weight is read."""
    for option, zero_ok in (("iters", True), ("nsamples", False), ("seqlen", False), ("batch_size", False),
                            ("eval_windows", False)):
        checks.check_positive(getattr(args, option), "--" + option.replace("_", "-"), zero_ok)
    if args.lr is not None and not args.lr > 0:
        raise CliError(f"--lr must be positive, got {args.lr}")
    cuda = args.device != "cpu" and torch.cuda.is_available()
    backend = checks.resolve_backend(args.backend, cuda)
    if args.fuse and backend != "cuda":
        raise CliError(f"--fuse needs backend cuda, and the backend is {backend}")
    checks.check_device_ids(args.device_ids, cuda)
    scheme = schemes.check_scheme_name(args.scheme, backend)
    if args.calib_file and args.dataset:
        raise CliError("give --calib-file or --dataset, not both")
    model_path = checks.check_model_path(args.model) if args.model else models.bundled_gguf()
    name = os.path.splitext(os.path.basename(os.path.normpath(model_path)))[0]
    out_dir = checks.check_output_dir(args.output or os.path.join("autoround-fast-out", f"{name}-{scheme}"),
                                      args.overwrite)
    if args.calib_file:
        calib_text, calib_source = checks.read_text_file(args.calib_file, "--calib-file"), args.calib_file
    elif args.dataset:
        calib_text, calib_source = texts.dataset_text(args.dataset), args.dataset
    else:
        calib_text, calib_source = texts.pydoc_topics_text(held_out=False), "pydoc topics (calibration set)"
    eval_text = None
    if args.eval:
        if args.eval_file:
            eval_text, eval_source = checks.read_text_file(args.eval_file, "--eval-file"), args.eval_file
        else:
            eval_text, eval_source = texts.pydoc_topics_text(held_out=True), "pydoc topics held out from calibration"
    else:
        eval_source = ""

    # What needs the model's config and tokenizer, not its weights.
    config = models.load_config(model_path)
    save_dtype = source_dtype(model_path)
    in_features = models.target_in_features(config, schemes.TARGETS, schemes.IGNORE)
    choice = schemes.choose_scheme(scheme, args.group_size, in_features, args.skip_indivisible)
    cfg = settings(args, cuda)
    tokenizer = models.load_tokenizer(model_path)
    calib = texts.token_windows(tokenizer, calib_text, cfg["nsamples"], cfg["seqlen"],
                                f"calibration text ({calib_source}) at --seqlen")
    windows = None
    if eval_text is not None:
        seqlen = min(texts.EVAL_SEQLEN, getattr(config, "max_position_embeddings", None) or texts.EVAL_SEQLEN)
        windows = texts.token_windows(tokenizer, eval_text, args.eval_windows, seqlen,
                                      f"evaluation text ({eval_source})")
    job = Job(model_path=model_path, choice=choice, backend=backend, cuda=cuda, settings=cfg, seed=args.seed,
              out_dir=out_dir, overwrite=args.overwrite, tokenizer=tokenizer, calib_windows=calib,
              calib_source=calib_source, eval_windows=windows, eval_source=eval_source,
              deterministic=args.deterministic, save_dtype=save_dtype,
              modifier_options=_modifier_options(args, backend, save_dtype))
    job.resumed_blocks = resume.check_command(resume.resume_dir(out_dir), job.command)
    return job


def _modifier_options(args, backend: str, save_dtype: torch.dtype) -> dict:
    """The AutoRoundModifier fields the command line sets beyond the scheme and the settings.
    Our backends round INT and FP8 scales to the dtype the checkpoint stores them in (the
    source's, whatever dtype a CPU tunes in), so the saved checkpoint reloads to the tuned
    weights."""
    options = dict(cache_on_cpu=args.cache_on_cpu, device_ids=args.device_ids, fuse_elementwise=args.fuse)
    if backend != "auto_round":
        options["scale_dtype"] = str(save_dtype).removeprefix("torch.")
    return options


def run(args) -> int:
    return execute(prepare(args))


def format_block_table(rows) -> str:
    lines = [f"{'block':<28} {'loss at start':>14} {'best loss':>12} {'best iter':>9} {'seconds':>8}"]
    for r in rows:
        lines.append(f"{r['block']:<28} {r['init_loss']:>14.6g} {r['best_loss']:>12.6g} "
                     f"{r['best_iter']:>9d} {r['seconds']:>8.2f}")
    total = sum(r["seconds"] for r in rows)
    lines.append(f"{'total':<28} {'':>14} {'':>12} {'':>9} {total:>8.2f}")
    return "\n".join(lines)


def format_perplexity_table(ppl: dict) -> str:
    """The perplexity rows, and the share of RTN's loss that AutoRound wins back."""
    rows = [(r["model"], r["perplexity"]) for r in ppl["rows"]]
    width = max(len(m) for m, _ in rows)
    lines = [f"perplexity on {ppl['text']}: {ppl['windows']} windows of {ppl['seqlen']} tokens",
             *(f"  {m:<{width}}  {p:>10.4f}" for m, p in rows)]
    by = {r["role"]: r["perplexity"] for r in ppl["rows"]}
    if {"rtn", "result"} <= by.keys():
        verdict = "beats" if by["result"] < by["rtn"] else "does not beat"
        line = f"  AutoRound {verdict} RTN"
        if by.get("original", by["rtn"]) < by["rtn"]:
            share = (by["rtn"] - by["result"]) / (by["rtn"] - by["original"])
            line += f": it wins back {100 * share:.0f}% of RTN's perplexity increase over the original"
        lines.append(line)
    return "\n".join(lines)


def _oneshot(model, tokenizer, recipe, windows: torch.Tensor, with_data: bool = True) -> None:
    from llmcompressor import oneshot

    if with_data:
        oneshot(model=model, dataset=texts.calibration_dataset(windows), recipe=recipe, processor=tokenizer,
                num_calibration_samples=windows.shape[0], max_seq_length=windows.shape[1],
                sequential_offload_device=offload_device(model, windows, *_free_gpu_memory(model)))
    else:
        oneshot(model=model, recipe=recipe, processor=tokenizer)


def offload_device(model, windows: torch.Tensor, device: torch.device, free: int) -> str:
    """Where llm-compressor's sequential pipeline keeps the activations between layers: on
    the GPU the model is on, where they (the hidden states, counted twice for the per-sample
    masks and the next layer's outputs) take at most OFFLOAD_SHARE of its free memory, which
    saves their round trip through the host and changes no bit; else host memory, the
    pipeline's default."""
    if device.type != "cuda":
        return "cpu"
    need = 2 * windows.numel() * model.config.hidden_size * next(model.parameters()).element_size()
    return str(device) if need <= OFFLOAD_SHARE * free else "cpu"


def _free_gpu_memory(model) -> tuple[torch.device, int]:
    """The model's device and, on a GPU, its free bytes (0 elsewhere)."""
    device = next(model.parameters()).device
    return device, torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def rtn_perplexity(job: Job, model) -> float:
    """Plain RTN: llm-compressor's QuantizationModifier with the same scheme, group and ignore
    list, on a copy of the model, measured in memory. Schemes that quantize activations
    calibrate their input scales on the same calibration windows."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    rtn = copy.deepcopy(model)
    recipe = QuantizationModifier(ignore=job.choice.ignore, **job.choice.modifier_kwargs)
    _oneshot(rtn, job.tokenizer, recipe, job.calib_windows,
             with_data=schemes.preset(job.choice.name).input_activations is not None)
    return perplexity(models.prequantize_weights(rtn), job.eval_windows)


def _announce(job: Job) -> None:
    """The run's first lines: model, scheme, backend and device; on a CPU, the small settings
    (said once here; llm-compressor's "No accelerator available" repeats are dropped)."""
    cfg = job.settings
    print(f"autoround-fast: {job.model_path} -> {job.choice.label}, backend={job.backend}, "
          f"{'GPU ' + torch.cuda.get_device_name() if job.cuda else 'CPU'}")
    for note in job.choice.notes:
        print(f"autoround-fast: {note}")
    if not job.cuda:
        reason = "--device cpu" if torch.cuda.is_available() else "no GPU"
        print(f"autoround-fast: {reason}; tuning on the CPU with settings that finish in a few minutes "
              f"(iters={cfg['iters']}, nsamples={cfg['nsamples']}, seqlen={cfg['seqlen']}, "
              f"batch_size={cfg['batch_size']}, lr={cfg['lr'] if cfg['lr'] is not None else '1/iters'}); "
              "AutoRound's defaults are iters=200, nsamples=128, seqlen=2048, batch_size=8, lr=1/iters")
    if job.resumed_blocks:
        print(f"autoround-fast: resuming: {job.resumed_blocks} blocks finished by an earlier run of this "
              f"command are in {resume.resume_dir(job.out_dir)}")


def _baselines(job: Job, model) -> list[dict]:
    """The perplexity rows of the original model and of RTN (none with --no-eval)."""
    if job.eval_windows is None:
        return []
    print("autoround-fast: perplexity of the original model and of RTN ...")
    return [dict(role="original", model=f"original ({str(job.dtype).replace('torch.', '')})",
                 perplexity=perplexity(model, job.eval_windows)),
            dict(role="rtn", model=f"RTN: llm-compressor QuantizationModifier, {job.choice.label}",
                 perplexity=rtn_perplexity(job, model))]


def _tune_and_save(job: Job, model, ckpt_dir: str) -> dict:
    """AutoRound through oneshot and the checkpoint in ckpt_dir; the report so far."""
    from ..modifier import AutoRoundModifier

    cfg = job.settings
    kept_blocks = {} if job.backend == "auto_round" else {"resume_dir": resume.resume_dir(job.out_dir)}
    modifier = AutoRoundModifier(
        ignore=job.choice.ignore, iters=cfg["iters"], batch_size=cfg["batch_size"], lr=cfg["lr"],
        backend=job.backend, seed=job.seed, enable_torch_compile=False, progress=True,
        **job.choice.modifier_kwargs, **job.modifier_options, **kept_blocks)  # the stock path cannot resume
    t0 = time.perf_counter()
    _oneshot(model, job.tokenizer, modifier, job.calib_windows)
    elapsed = time.perf_counter() - t0
    save_checkpoint(model, job.tokenizer, ckpt_dir, dtype=job.save_dtype)
    return {"model": job.model_path, "scheme": job.choice.name, "group_size": job.choice.group_size,
            "ignore": job.choice.ignore, "seconds": elapsed, **cfg, "backend": job.backend, "seed": job.seed,
            "calibration": job.calib_source, "blocks": modifier.block_stats}


def _measure_and_report(job: Job, ckpt: str, report: dict, ppl_rows: list[dict]) -> None:
    """The reloaded checkpoint's perplexity (unless --no-eval), and autoround_blocks.json and
    .svg beside it."""
    if job.eval_windows is not None:
        print("autoround-fast: perplexity of the checkpoint, reloaded ...")
        reloaded = models.prequantize_weights(models.load_model(ckpt, job.dtype))
        if job.cuda:
            reloaded.to("cuda")
        ppl_rows.append(dict(role="result", model="AutoRound: this checkpoint, reloaded",
                             perplexity=perplexity(reloaded, job.eval_windows)))
        report["perplexity"] = dict(text=job.eval_source, windows=job.eval_windows.shape[0],
                                    seqlen=job.eval_windows.shape[1], rows=ppl_rows)
    with open(os.path.join(ckpt, "autoround_blocks.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(ckpt, "autoround_blocks.svg"), "w") as f:
        f.write(plot.blocks_svg(report["blocks"], f"{os.path.basename(job.out_dir)}: {job.choice.label}, "
                                                  f"backend {job.backend}, {job.settings['iters']} iterations"))


def _missing_parents(out_dir: str) -> list[str]:
    """The ancestors of the output directory that do not exist yet, deepest first."""
    made, d = [], os.path.dirname(out_dir)
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    return made


def execute(job: Job) -> int:
    _announce(job)
    if not job.cuda:
        from loguru import logger

        logger.disable("llmcompressor.utils.dev")
    torch.manual_seed(job.seed)
    if job.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for it
        torch.use_deterministic_algorithms(True)
    made = _missing_parents(job.out_dir)
    try:
        model = models.load_model(job.model_path, job.dtype)
        models.check_finite_weights(model, job.choice.ignore)
        if job.cuda:
            model.to("cuda")
        ppl_rows = _baselines(job, model)
        os.makedirs(os.path.dirname(job.out_dir), exist_ok=True)
        with resume.resumable(resume.resume_dir(job.out_dir), job.command) as ckpt_dir:
            report = _tune_and_save(job, model, ckpt_dir)
            del model  # before the checkpoint is loaded again
            _measure_and_report(job, ckpt_dir, report, ppl_rows)
            if os.path.exists(job.out_dir):
                shutil.rmtree(job.out_dir)
            os.replace(ckpt_dir, job.out_dir)
    except BaseException:  # Ctrl-C included: no output, and no directory this run made
        for d in made:  # deepest first
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise
    finally:
        if not job.cuda:
            from loguru import logger

            logger.enable("llmcompressor.utils.dev")
    print(format_block_table(report["blocks"]))
    if "perplexity" in report:
        print(format_perplexity_table(report["perplexity"]))
    print(f"autoround-fast: wrote {job.out_dir} ({report['seconds']:.1f} s of tuning)")
    return 0
