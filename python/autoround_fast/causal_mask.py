"""The causal mask that llm-compressor's calibration pipeline drops for some models, restored
in a forward pre-hook on each decoder layer (docs/numerics.md#fix-causal-mask)."""

from __future__ import annotations


def causal_attention_config(layer):
    """The config of the layer's causal attention, or None if it has none."""
    attn = [m for m in layer.modules() if getattr(m, "is_causal", False) and hasattr(m, "config")]
    return attn[0].config if attn else None


def restore_causal_mask(layer, args, kwargs, config):
    """A decoder layer's causal mask, where the calibration pipeline passes none.

    llm-compressor calibrates under eager attention, for which transformers always builds a
    mask. Its sequential tracer leaves calls to the mask builders out of the traced graph
    by name (``tracing_ignore``), but a model that picks the builder into a local first
    (``mask_function = create_causal_mask if ... else create_sliding_window_causal_mask``:
    Qwen3-MoE, Mixtral, Mistral, Phi-3, Starcoder2) has it traced instead, and the graph hands every
    layer ``attention_mask=None``; eager attention then attends both ways, so calibration
    and tuning chase a block the model never runs. The mask is built here as the model
    builds it, from the layer's positions (calibration samples carry no padding)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    if "attention_mask" not in kwargs or kwargs["attention_mask"] is not None \
            or config._attn_implementation != "eager":
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    build = create_sliding_window_causal_mask if getattr(config, "sliding_window", None) else create_causal_mask
    mask = build(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                 position_ids=kwargs.get("position_ids"))
    return args, {**kwargs, "attention_mask": mask}
