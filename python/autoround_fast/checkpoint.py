"""Saving a tuned model as a checkpoint that loads the way users load models.

The model is tuned in whatever dtype suits the device (fp32 on a CPU), but the checkpoint is
saved in the dtype the source model was published in, exactly as llm-compressor writes it for a
model loaded in that dtype: the compressed-tensors packing runs first, on the tuned weights and
scales, and only then are the floating tensors cast. The packed integers and the fp8 scales are
therefore the ones the tuning chose; what the cast rounds are the unquantized tensors
(embedding, norms, lm_head) and the scales kept in the model's dtype (INT schemes' weight_scale).

A GGUF source needs two things that its transformers loader does not give: the published dtype
(GGUF records its own storage type, not the source's) and the right special tokens (transformers'
GGUF tokenizer converter for gpt2-type vocabularies takes the eos token from the bos id).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch

__all__ = [
    "KEEP_FP32_SUFFIXES",
    "source_dtype",
    "gguf_dtype",
    "gguf_special_token_ids",
    "set_special_tokens",
    "load_gguf_tokenizer",
    "cast_for_checkpoint",
    "special_token_mismatches",
    "save_checkpoint",
]

# compressed-tensors creates these in fp32 whatever the model's dtype (initialize_qparams, the
# TENSOR_GROUP branch), and llm-compressor saves them so; every other floating tensor follows
# the model's dtype.
KEEP_FP32_SUFFIXES = ("_global_scale",)
# The dtypes a model's floating tensors come in; fp8 scales and packed integers are the format's.
_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# general.file_type values whose storage type is the source's half type. llama.cpp's converter
# keeps a bf16 source as BF16 and an fp16 source as F16 by default; any quantized or F32 file
# says nothing of the source.
_GGUF_HALF_FILE_TYPES = {1: torch.float16, 32: torch.bfloat16}  # MOSTLY_F16, MOSTLY_BF16


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.parts[field.data[0]][0].item()


def gguf_dtype(path: str) -> torch.dtype:
    """The dtype to save a model read from a GGUF file in: the file's own half type when it
    is F16 or BF16, else bfloat16. A quantized GGUF does not record the dtype its source was
    published in; bf16 is what the models llama.cpp converts are published in (SmolLM2's
    config.json says bfloat16), it holds every dequantized GGUF value's range, and vLLM's
    NVFP4 and INT kernels take it."""
    from gguf import GGUFReader

    file_type = _gguf_field(GGUFReader(path), "general.file_type")
    return _GGUF_HALF_FILE_TYPES.get(file_type, torch.bfloat16)


def _config_dtype(config) -> Optional[torch.dtype]:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def source_dtype(path: str) -> torch.dtype:
    """The dtype a model was published in: a directory's config.json dtype (torch_dtype), else
    the dtype of its first floating safetensors tensor (what from_pretrained(dtype="auto")
    picks); a .gguf file's per gguf_dtype. Call it before loading: loading with
    torch_dtype=... overwrites the config's."""
    if path.endswith(".gguf"):
        return gguf_dtype(path)
    from transformers import AutoConfig

    dtype = _config_dtype(AutoConfig.from_pretrained(path))
    if dtype is not None:
        return dtype
    from safetensors import safe_open

    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for key in f.keys():
                    t = f.get_slice(key)
                    dt = getattr(torch, {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(
                        t.get_dtype(), ""), None)
                    if dt is not None:
                        return dt
    return torch.float32


def gguf_special_token_ids(path: str) -> dict[str, int]:
    """{"bos_token": id, "eos_token": id, "pad_token": id, "unk_token": id} from a GGUF file's
    tokenizer.ggml.*_token_id metadata (those it has)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
            "pad_token": "padding_token_id", "unk_token": "unknown_token_id"}
    ids = {name: _gguf_field(reader, f"tokenizer.ggml.{key}") for name, key in keys.items()}
    return {name: int(i) for name, i in ids.items() if i is not None}


def set_special_tokens(tokenizer, ids: dict[str, int]):
    """Point the tokenizer's bos/eos/pad/unk tokens at the given token ids."""
    for name, i in ids.items():
        token = tokenizer.convert_ids_to_tokens(i)
        if token is None:
            raise ValueError(f"{name} id {i} is not in the tokenizer's vocabulary of {len(tokenizer)}")
        setattr(tokenizer, name, token)
    return tokenizer


def load_gguf_tokenizer(path: str):
    """AutoTokenizer.from_pretrained(folder, gguf_file=name) with the special tokens the GGUF
    metadata names (transformers' gpt2-vocabulary converter sets eos to the bos token and
    leaves pad unset)."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return set_special_tokens(tokenizer, gguf_special_token_ids(path))


@torch.no_grad()
def cast_for_checkpoint(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the parameters held in a model dtype (fp16/bf16/fp32/fp64) to dtype, except those
    compressed-tensors keeps in fp32 (KEEP_FP32_SUFFIXES); fp8 scales and packed integers are
    left as compression wrote them. Parameters keep their identity (tied embeddings stay tied); buffers
    are left alone, as from_pretrained(dtype=...) leaves rotary inv_freq in fp32. Run it after
    compression: before, it would round the scales that compression divides by."""
    from compressed_tensors.offload import disable_onloading

    with disable_onloading():  # the stored tensors themselves, not onloaded copies
        for name, p in model.named_parameters():
            if p.dtype in _MODEL_DTYPES and p.dtype != dtype and not name.endswith(KEEP_FP32_SUFFIXES):
                p.data = p.data.to(dtype)
    return model


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return set(value) if isinstance(value, (list, tuple)) else {int(value)}


def special_token_mismatches(tokenizer, generation_config) -> list[str]:
    """Where the tokenizer's eos/bos/pad disagree with the generation config's ids."""
    problems = []
    for name in ("eos", "bos", "pad"):
        tok_id = getattr(tokenizer, f"{name}_token_id", None)
        gen_ids = _ids(getattr(generation_config, f"{name}_token_id", None))
        if tok_id is not None and gen_ids and tok_id not in gen_ids:
            problems.append(f"tokenizer {name} {getattr(tokenizer, f'{name}_token')!r} (id {tok_id}) "
                            f"is not the generation config's {name}_token_id {sorted(gen_ids)}")
    return problems


def _set_config_dtype(out_dir: str, dtype: torch.dtype) -> None:
    """save_pretrained writes model.dtype, the first floating parameter's: in a model whose
    first parameter were an fp8 or global scale, config.json would name that dtype."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
    if all(cfg.get(k) == name for k in keys):
        return
    for k in keys:
        cfg[k] = name
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def save_checkpoint(model, tokenizer, out_dir: str, *, dtype: Optional[torch.dtype] = None,
                    generation_config=None) -> str:
    """Write the quantized model as a compressed-tensors checkpoint in dtype (default: the
    model's config dtype) with its tokenizer and generation config, so that a plain
    AutoModelForCausalLM.from_pretrained(out_dir) loads in dtype and generate() stops at the
    model's eos, and vLLM reads the same tensors llm-compressor writes for a model loaded in
    dtype.

    Compresses in memory first, in the tuning dtype, so the packing divides the tuned weights
    by the tuned scales; then casts (cast_for_checkpoint) and saves through llm-compressor's
    save_pretrained, which skips modules already compressed. Leaves the model compressed and
    cast. generation_config defaults to model.generation_config; a tokenizer whose special
    tokens disagree with it is saved with a warning.
    """
    from compressed_tensors import ModelCompressor
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    dtype = dtype or _config_dtype(model.config) or torch.float32
    compressor = ModelCompressor.from_pretrained_model(model)
    if compressor is not None:
        compressor.compress_model(model, skip_compressed=True)
    cast_for_checkpoint(model, dtype)
    model.config.dtype = dtype
    if generation_config is not None:
        model.generation_config = generation_config
    modify_save_pretrained(model)
    model.save_pretrained(out_dir, save_compressed=True)
    _set_config_dtype(out_dir, dtype)
    if tokenizer is not None:
        for problem in special_token_mismatches(tokenizer, model.generation_config):
            warnings.warn(f"save_checkpoint: {problem}; generate() stops at the generation config's")
        tokenizer.save_pretrained(out_dir)
    return out_dir
