"""llm-compressor's own AutoRound oneshot test (tests/llmcompressor/transformers/autoround/
test_autoround_oneshot.py::test_oneshot_application, at llm-compressor ab1ba3e), its recipes
and checks as written there, on each backend: the stock path, ``torch`` and (with a GPU)
``cuda``. A tiny random Llama of three layers and random calibration tokens stand in for
TinyLlama and pile-10k, so it runs anywhere; the test checks what upstream checks (the saved
config's one group and its weight bits, a quantized q_proj in layer 2, an unquantized
lm_head), and that the checkpoint reloads with finite logits."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from transformers import AutoModelForCausalLM

from autoround_fast import AutoRoundModifier
from conftest import HAS_CUDA, tiny_llama, tiny_tokenizer
from test_modifier import calib

from llmcompressor import oneshot

YAML_W4_G128 = """
quant_stage:
    quant_modifiers:
        AutoRoundModifier:
            ignore: ["lm_head"]
            iters: 10
            backend: {backend}
            config_groups:
                group_0:
                    targets:
                        - "Linear"
                    input_activations: null
                    output_activations: null
                    weights:
                        num_bits: 4
                        type: "int"
                        symmetric: true
                        strategy: group
                        group_size: 128
"""


def upstream_recipe(name: str, backend: str):
    """Upstream's recipe ``name``, with ``backend`` added."""
    if name == "yaml-w4-g128":
        return YAML_W4_G128.format(backend=backend)
    if name == "config-groups-w4-g128":
        return AutoRoundModifier(ignore=["lm_head"], iters=10, backend=backend, config_groups={
            "group_0": QuantizationScheme(targets=["Linear"],
                                          weights=QuantizationArgs(num_bits=4, strategy="group", group_size=128))})
    scheme, iters = {"nvfp4": ("NVFP4", 2), "mxfp4": ("MXFP4", 0), "w2a16": ("W2A16", 0)}[name]
    return AutoRoundModifier(ignore=["lm_head"], iters=iters, scheme=scheme, backend=backend)


BACKENDS = ["auto_round", "torch", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"))]


@pytest.fixture(scope="module")
def three_layer_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-3")
    tiny_llama(layers=3).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,expected_bits", [("yaml-w4-g128", 4), ("config-groups-w4-g128", 4),
                                                ("nvfp4", 4), ("mxfp4", 4), ("w2a16", 2)])
def test_oneshot_application(three_layer_model_dir, tmp_path, backend, name, expected_bits):
    output = tmp_path / "oneshot_output"
    oneshot(model=three_layer_model_dir, dataset=calib(8), recipe=upstream_recipe(name, backend),
            output_dir=str(output), num_calibration_samples=8, max_seq_length=32)
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16)
    qc = model.config.quantization_config.quantization_config
    assert qc is not None
    assert "lm_head" in qc.ignore
    assert len(qc.config_groups) == 1
    weights = qc.config_groups["group_0"].weights
    assert isinstance(weights, QuantizationArgs) and weights.num_bits == expected_bits
    assert hasattr(model.model.layers[2].self_attn.q_proj, "quantization_scheme")
    assert not hasattr(model.lm_head, "quantization_scheme")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
