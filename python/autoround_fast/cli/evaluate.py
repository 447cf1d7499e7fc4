"""``autoround-fast eval MODEL``: perplexity of any checkpoint on held-out text.

The default text and windows are those of quantize's table (the pydoc topics held out from
calibration, EVAL_WINDOWS windows of EVAL_SEQLEN tokens), and the model runs in the dtype
quantize tunes in (float32 on a CPU, bfloat16 on a GPU), so the figure compares with the
table's rows. A compressed-tensors checkpoint is measured as transformers loads it.
"""

from __future__ import annotations

import torch

from ..engine.precision import cpu_tune_dtype
from ..perplexity import perplexity
from . import checks, models, texts


def run(args) -> int:
    checks.check_positive(args.eval_windows, "--eval-windows")
    path = checks.check_model_path(args.model, "MODEL") if args.model else models.bundled_gguf()
    if args.text:
        text, source = checks.read_text_file(args.text, "--text"), args.text
    else:
        text, source = texts.pydoc_topics_text(held_out=True), "pydoc topics held out from calibration"
    cuda = args.device != "cpu" and torch.cuda.is_available()
    config = models.load_config(path)
    seqlen = min(texts.EVAL_SEQLEN, getattr(config, "max_position_embeddings", None) or texts.EVAL_SEQLEN)
    windows = texts.token_windows(models.load_tokenizer(path), text, args.eval_windows, seqlen,
                                  f"evaluation text ({source})")
    dtype = torch.bfloat16 if cuda else cpu_tune_dtype()  # as quantize measures: the figures compare
    model = models.prequantize_weights(models.load_model(path, dtype))
    if cuda:
        model.to("cuda")
    ppl = perplexity(model, windows)
    print(f"perplexity on {source}: {windows.shape[0]} windows of {windows.shape[1]} tokens, "
          f"{str(dtype).replace('torch.', '')} on the {'GPU' if cuda else 'CPU'}")
    print(f"  {path}  {ppl:.4f}")
    return 0
