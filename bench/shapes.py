"""The models the benchmarks build with random weights (no download): a known model's decoder
block, repeated, with the vocabulary cut where the head is not tuned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Shape:
    family: str  # "llama", "qwen3_moe", "mixtral", "gpt_oss"
    hidden: int
    intermediate: int  # an expert's, for the MoE families
    heads: int
    kv_heads: int
    vocab: int
    experts: int = 0
    top_k: int = 0
    head_dim: Optional[int] = None


SHAPES = {
    "8b": Shape("llama", 4096, 14336, 32, 8, 32000),
    "70b": Shape("llama", 8192, 28672, 64, 8, 32000),  # Llama-3.1-70B's block
    "smollm2": Shape("llama", 576, 1536, 9, 3, 49152),
    "tiny": Shape("llama", 128, 256, 4, 2, 256),
    "qwen3-moe": Shape("qwen3_moe", 2048, 768, 32, 4, 32000, experts=128, top_k=8, head_dim=128),  # Qwen3-30B-A3B
    "mixtral": Shape("mixtral", 4096, 14336, 32, 8, 32000, experts=8, top_k=2),  # Mixtral-8x7B
    "gpt-oss": Shape("gpt_oss", 2880, 2880, 64, 8, 32000, experts=32, top_k=4, head_dim=64),  # GPT-OSS-20B
    "tiny-moe": Shape("qwen3_moe", 128, 128, 4, 2, 256, experts=8, top_k=2, head_dim=32),
}


def model_config(shape: str, layers: int, seqlen: int):
    """The transformers config of `layers` blocks of the shape."""
    import transformers

    s = SHAPES[shape]
    common = dict(hidden_size=s.hidden, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                  num_hidden_layers=layers, vocab_size=s.vocab, max_position_embeddings=max(seqlen, 2048),
                  tie_word_embeddings=False)
    if s.head_dim is not None:
        common["head_dim"] = s.head_dim
    if s.family == "llama":
        return transformers.LlamaConfig(intermediate_size=s.intermediate, rope_theta=500000.0, **common)
    if s.family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=s.intermediate, moe_intermediate_size=s.intermediate,
                                           num_experts=s.experts, num_experts_per_tok=s.top_k, norm_topk_prob=True,
                                           **common)
    if s.family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=s.intermediate, num_local_experts=s.experts,
                                          num_experts_per_tok=s.top_k, sliding_window=None, **common)
    if s.family == "gpt_oss":  # its own context length: its YaRN factor is set against it
        common.pop("max_position_embeddings")
        return transformers.GptOssConfig(intermediate_size=s.intermediate, num_local_experts=s.experts,
                                         num_experts_per_tok=s.top_k, **common)
    raise ValueError(f"shape {shape!r}: unknown family {s.family!r}")


def build_model(shape: str, layers: int, seqlen: int, seed: int = 0):
    """A bf16 causal LM of the shape with random weights, on the GPU if there is one."""
    from transformers import AutoModelForCausalLM

    from autoround_fast.cli.models import cast_parameters

    cfg = model_config(shape, layers, seqlen)
    cfg.dtype = torch.bfloat16  # what llm-compressor builds the per-expert Linears in
    torch.manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        return cast_parameters(AutoModelForCausalLM.from_config(cfg), torch.bfloat16)
