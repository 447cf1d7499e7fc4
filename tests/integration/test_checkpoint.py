"""The saved checkpoint against llm-compressor's own: a tiny Llama published in bf16, tuned in
fp32 as the command line tunes on a CPU, saved with save_checkpoint, holds the same tensor names,
shapes and dtypes and the same config.json (quantization_config included) as QuantizationModifier
writes for the model loaded in bf16, which is what vLLM loads; its packed weights and fp8 scales
are those compressed-tensors makes from the tuned fp32 weights; a plain from_pretrained(out)
loads and generates. And a GGUF's special tokens and dtype come from its metadata."""

import json

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from autoround_fast import AutoRoundModifier
from autoround_fast.checkpoint import (KEEP_FP32_SUFFIXES, gguf_dtype, gguf_special_token_ids,
                                       load_gguf_tokenizer, save_checkpoint, source_dtype,
                                       special_token_mismatches)
from conftest import tiny_tokenizer

from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

SCHEMES = ["NVFP4", "W4A16", "W4A16_ASYM"]  # group 16 and 128: both divide the tiny model's 128 and 256


def calib(n=4, seqlen=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 256, (n, seqlen), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seqlen] * n})


def tokenizer_with_eos():
    tok = tiny_tokenizer()
    tok.bos_token, tok.eos_token = "t1", "t2"  # LlamaConfig's defaults: bos 1, eos 2
    return tok


def run_oneshot(model, recipe):
    oneshot(model=model, dataset=calib(), recipe=recipe, processor=tiny_tokenizer(),
            num_calibration_samples=4, max_seq_length=32)


def tensors(path):
    """{name: tensor} of a single-file checkpoint."""
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def config(path):
    with open(f"{path}/config.json") as f:
        return json.load(f)


def compress_reference(model):
    """Each quantized module's compressed tensors, made by compressed-tensors from the module's
    tuned (fp32) weight and scales: what the checkpoint must hold whatever dtype it is saved in."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.utils import get_direct_state_dict

    ref = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        fmt = scheme.format or infer_module_format(type(module), scheme)
        compressor = BaseCompressor.get_value_from_registry(getattr(fmt, "value", fmt))
        state = {k: v.detach().clone() for k, v in get_direct_state_dict(module).items() if v is not None}
        for k, v in compressor.compress(state, scheme).items():
            ref[f"{name}.{k}"] = v
    return ref


@pytest.fixture(scope="module", params=SCHEMES)
def saved(request, tiny_model_dir, tmp_path_factory):
    """(scheme, stock checkpoint, our checkpoint, the reference compressed tensors)."""
    scheme = request.param
    root = tmp_path_factory.mktemp(f"ckpt-{scheme}")
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    run_oneshot(stock, QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    stock.save_pretrained(root / "stock", save_compressed=True)

    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    run_oneshot(ours, AutoRoundModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], iters=2,
                                        batch_size=2, backend="torch"))
    ref = compress_reference(ours)
    save_checkpoint(ours, tokenizer_with_eos(), str(root / "ours"), dtype=torch.bfloat16)
    return scheme, root / "stock", root / "ours", ref


def test_tensors_match_llm_compressor(saved):
    _, stock, ours, _ = saved
    want = {k: (tuple(t.shape), t.dtype) for k, t in tensors(stock).items()}
    got = {k: (tuple(t.shape), t.dtype) for k, t in tensors(ours).items()}
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys()))
    assert {k: v for k, v in got.items() if want[k] != v} == {}


def test_config_matches_llm_compressor(saved):
    """All of config.json: quantization_config (format, config_groups with observers and scale
    dtypes, ignore, version: the same compressed-tensors writes both) and the model fields, dtype
    bfloat16 among them. recipe.yaml legitimately differs (another modifier) and is not compared."""
    _, stock, ours, _ = saved
    want, got = config(stock), config(ours)
    assert got["quantization_config"] == want["quantization_config"]
    assert got == want
    assert got["dtype"] == "bfloat16"


def test_packed_tensors_are_the_tuned_ones(saved):
    """The cast after compression changes no packed weight, fp8 scale, zero point or global
    scale; a scale kept in the model's dtype is the tuned fp32 scale rounded to bf16."""
    _, _, ours, ref = saved
    got = tensors(ours)
    assert ref.keys() <= got.keys()
    for k, r in ref.items():
        g = got[k]
        if r.dtype == torch.float32 and not k.endswith(KEEP_FP32_SUFFIXES):
            assert g.dtype == torch.bfloat16 and torch.equal(g, r.to(torch.bfloat16)), k
        else:
            assert g.dtype == r.dtype, k
            assert torch.equal(g.view(torch.uint8), r.view(torch.uint8)) if r.dtype.itemsize == 1 \
                else torch.equal(g, r), k


def test_plain_from_pretrained_loads_and_generates(saved):
    _, _, ours, _ = saved
    model = AutoModelForCausalLM.from_pretrained(ours)
    assert model.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(ours)
    assert tok.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id == 2
    ids = tok("t5 t6 t7", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, 6)


def test_mismatched_eos_is_named():
    from transformers import GenerationConfig

    tok = tiny_tokenizer()
    tok.eos_token = "t1"
    problems = special_token_mismatches(tok, GenerationConfig(eos_token_id=[2, 3]))
    assert len(problems) == 1 and "eos 't1' (id 1)" in problems[0] and "[2, 3]" in problems[0]
    assert special_token_mismatches(tokenizer_with_eos(), GenerationConfig(eos_token_id=[2, 3])) == []


def test_source_dtype_of_a_directory(tiny_model_dir):
    assert source_dtype(tiny_model_dir) == torch.bfloat16


def write_tiny_gguf(path, file_type):
    """A GGUF with SmolLM2's special tokens and a gpt2-type vocabulary, no real weights."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(file_type)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "abb"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3, 1, 1, 1, 1])
    w.add_token_merges(["a b", "ab b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_tokenizer_takes_the_metadata_special_tokens(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", file_type=3)  # MOSTLY_Q4_1, as the bundled one
    assert gguf_special_token_ids(path) == {"bos_token": 1, "eos_token": 2, "pad_token": 2, "unk_token": 0}
    tok = load_gguf_tokenizer(path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert (again.eos_token_id, again.pad_token_id) == (2, 2)


@pytest.mark.parametrize("file_type,dtype", [(3, torch.bfloat16), (0, torch.bfloat16),
                                             (1, torch.float16), (32, torch.bfloat16)])
def test_gguf_dtype(tmp_path, file_type, dtype):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", file_type)
    assert gguf_dtype(path) == dtype == source_dtype(path)


def test_config_dtype_is_the_saved_one(tmp_path):
    """save_pretrained names the first floating parameter's dtype; save_checkpoint rewrites it
    where that is not the dtype saved in, under the key the source config uses."""
    from autoround_fast.checkpoint import _set_config_dtype

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float8_e4m3fn", "x": 1}))
    _set_config_dtype(str(tmp_path), torch.bfloat16)
    assert config(tmp_path) == {"torch_dtype": "bfloat16", "x": 1}
