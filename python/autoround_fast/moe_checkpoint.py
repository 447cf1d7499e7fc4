"""Mixture-of-experts checkpoints in the per-expert layout: saving them so, reloading them whole.

A checkpoint written from a model that llm-compressor linearized holds one Linear per expert
projection (`mlp.experts.{i}.gate_proj.weight_packed`, `...weight_scale`,
`...weight_global_scale`, `...input_global_scale`): vLLM's loader layout. transformers 5 builds
the experts fused instead, and merges those per-expert tensors into the fused parameters on
load; its compressed-tensors converter (`DecompressExperts`, set up by
`CompressedTensorsHfQuantizer.update_weight_conversions`) collects only `weight_packed`,
`weight_scale` and `weight_shape`. NVFP4's two global scales are left over as unexpected keys,
the weights are dequantized without their global scale and the activations are not quantized at
all. Mixtral's checkpoint has `gate/up/down_proj` experts where transformers' mapping expects
`w1/w3/w2`, and loses its experts altogether. GPT-OSS has no conversion mapping at all:
transformers builds its fused experts (gate and up interleaved in `gate_up_proj`, biases in
`gate_up_proj_bias` and `down_proj_bias`), finds none of them in the checkpoint, and leaves them
randomly initialized, every per-expert tensor (biases included) unexpected.

`load_quantized` builds the model with llm-compressor's linearized experts instead (the modules
the checkpoint was written from), so each tensor loads into the Linear it came from and the
model re-saves in the same per-expert layout.

`keep_per_expert_layout` makes a model that oneshot linearized after loading save its experts
under the names its architecture's checkpoints and vLLM's loader use. llm-compressor's
`linearize_moe` leaves the model's load-time mapping in place, and for Mixtral that mapping
renames the block (`mlp` back to `block_sparse_moe`) but not the experts' Linears, so the
checkpoint held `block_sparse_moe.experts.{i}.gate_proj`, a layout neither loader reads.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import transformers
from compressed_tensors.utils import patch_attr
from transformers import AutoConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from llmcompressor.modeling import patch_moe_mappings
from llmcompressor.modeling.moe.conversion_mappings import (
    get_linearize_load_mappings,
    has_linearize_load_mappings,
    set_save_conversion_mapping,
)
from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
from llmcompressor.modeling.moe.linearize import get_linearized_moes

__all__ = ["load_quantized", "keep_per_expert_layout"]


def _expert_renamings(names: dict[str, str]) -> list[WeightRenaming]:
    return [WeightRenaming(source_patterns=rf"\.experts\.(\d+)\.{ckpt}\.", target_patterns=rf".experts.\1.{module}.")
            for ckpt, module in names.items()]


# Per-expert layouts llm-compressor has no load mapping for: (the fused targets they replace,
# the renamings from checkpoint to linearized module names). Mixtral's checkpoints (and vLLM's
# Mixtral loader) name the experts' projections w1/w3/w2. GPT-OSS's checkpoint names them as
# the linearized modules do (`mlp.experts.{i}.gate_proj.bias`, ...): transformers has no
# conversion mapping for it to replace or rename, only the fused parameters to build instead.
_PER_EXPERT_LAYOUTS = {
    "mixtral": ([".experts.gate_up_proj", ".experts.down_proj"],
                _expert_renamings({"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"})),
    "gpt_oss": ([], []),
}


@contextmanager
def _per_expert_layout(model_type: str):
    """llm-compressor's 2-D load mapping for this model type, ours where it has none."""
    if has_linearize_load_mappings(model_type) or model_type not in _PER_EXPERT_LAYOUTS:
        yield
        return
    remove_targets, renamings = _PER_EXPERT_LAYOUTS[model_type]
    with patch_moe_mappings(model_type, renamings, remove_targets=remove_targets):
        yield


@contextmanager
def _conversion_mapping(model_type: str, mapping: list):
    before = get_checkpoint_conversion_mapping(model_type)
    register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)
    try:
        yield
    finally:
        register_checkpoint_conversion_mapping(model_type, before, overwrite=True)


@contextmanager
def _built_with(model_cls, experts_cls, replacement):
    """Construct `model_cls` with `replacement` wherever its modeling module names
    `experts_cls`, for the construction only (transformers' `_init_weights` still tells
    the original class by isinstance afterwards). transformers' own patch mapping does the
    same but scans every loaded transformers module for the name, importing optional
    dependencies (torchvision) on the way."""
    module = sys.modules[experts_cls.__module__]
    original = model_cls.get_init_context.__func__

    def get_init_context(cls, *args, **kwargs):
        return [*original(cls, *args, **kwargs), patch_attr(module, experts_cls.__name__, replacement)]

    with patch_attr(model_cls, "get_init_context", classmethod(get_init_context)):
        yield


def _model_class(config):
    """The class the checkpoint names, else the causal LM of its config (a model converted from
    GGUF, like the main job's, names none)."""
    if config.architectures:
        return getattr(transformers, config.architectures[0])
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def load_quantized(path: str, **kwargs):
    """Load a compressed-tensors checkpoint written by oneshot, MoE experts as one Linear per
    expert projection, so that every expert's scales load (NVFP4's global scales included) and
    the model computes what the quantized model computed before saving. Keyword arguments go
    to `from_pretrained` (dtype, device_map, output_loading_info, ...). A model without
    linearizable experts loads as `from_pretrained` loads it."""
    config = AutoConfig.from_pretrained(path)
    model_cls = _model_class(config)
    with _per_expert_layout(config.model_type):
        if not has_linearize_load_mappings(config.model_type):
            return model_cls.from_pretrained(path, **kwargs)
        experts_cls, load_map, save_map = get_linearize_load_mappings(config.model_type)
    linear_cls = LinearExperts2D.get_linear_experts_cls(experts_cls)
    with _conversion_mapping(config.model_type, load_map), _built_with(model_cls, experts_cls, linear_cls):
        loaded = model_cls.from_pretrained(path, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    set_save_conversion_mapping(model, save_map)  # a re-save keeps the per-expert layout
    return loaded


def keep_per_expert_layout(model) -> None:
    """Have `save_pretrained` write a linearized MoE model's experts in its architecture's
    per-expert layout (Mixtral: `block_sparse_moe.experts.{i}.w1/w3/w2`), where the mapping the
    model was loaded with would not. Other models are left as they are."""
    model_type = model.config.model_type
    if model_type not in _PER_EXPERT_LAYOUTS or not get_linearized_moes(model):
        return
    with _per_expert_layout(model_type):
        _, _, save_map = get_linearize_load_mappings(model_type)
    set_save_conversion_mapping(model, save_map)
