"""llm-compressor's own AutoRound oneshot test (tests/llmcompressor/transformers/autoround/
test_autoround_oneshot.py at llm-compressor ab1ba3e), its recipes and checks as written there, on
each backend: the stock path, ``torch`` and (with a GPU) ``cuda``. A tiny random Llama of three
layers and random calibration tokens stand in for TinyLlama and pile-10k, so it runs anywhere.

- ``test_oneshot_application`` (upstream lines 11-57, 88-141): five weight-only recipes; it checks
  what upstream checks (the saved config's one group and its weight bits, a quantized q_proj in
  layer 2, an unquantized lm_head).
- ``test_rtn_oneshot`` (upstream lines 59-85, 202-257): the FP8 W8A8 recipes
  ``w8a8_dynamic_recipe_modifier`` and ``w8a8_static_recipe_modifier``, both with iters=0 upstream
  (no tuning: round-to-nearest after the scale search); it checks the saved weight and activation
  bits and strategies against the recipe's, and the same layers.

Each test also checks that the checkpoint reloads with finite logits."""

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


def reload_and_check(output) -> QuantizationScheme:
    """Upstream's checks common to both tests, plus finite logits; returns the saved group_0."""
    model = AutoModelForCausalLM.from_pretrained(output, dtype=torch.bfloat16)
    qc = model.config.quantization_config.quantization_config
    assert qc is not None
    assert "lm_head" in qc.ignore
    assert len(qc.config_groups) == 1
    scheme = qc.config_groups["group_0"]
    assert isinstance(scheme, QuantizationScheme)
    assert isinstance(scheme.weights, QuantizationArgs)
    assert hasattr(model.model.layers[2].self_attn.q_proj, "quantization_scheme")
    assert not hasattr(model.lm_head, "quantization_scheme")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    return scheme


def run_oneshot(model_dir, recipe, output):
    oneshot(model=model_dir, dataset=calib(8), recipe=recipe, output_dir=str(output),
            num_calibration_samples=8, max_seq_length=32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,expected_bits", [("yaml-w4-g128", 4), ("config-groups-w4-g128", 4),
                                                ("nvfp4", 4), ("mxfp4", 4), ("w2a16", 2)])
def test_oneshot_application(three_layer_model_dir, tmp_path, backend, name, expected_bits):
    output = tmp_path / "oneshot_output"
    run_oneshot(three_layer_model_dir, upstream_recipe(name, backend), output)
    assert reload_and_check(output).weights.num_bits == expected_bits


def upstream_fp8_recipe(name: str, backend: str) -> AutoRoundModifier:
    """Upstream's ``w8a8_dynamic_recipe_modifier`` ("w8a8-fp8-dynamic": FP8 weights per channel,
    dynamic per-token FP8 activations) or ``w8a8_static_recipe_modifier`` ("w8a8-fp8-static": FP8
    weights and static FP8 activations, both per tensor), with ``backend`` added."""
    weights, acts = {
        "w8a8-fp8-dynamic": (QuantizationArgs(num_bits=8, type="float", strategy="channel"),
                             QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True)),
        "w8a8-fp8-static": (QuantizationArgs(num_bits=8, type="float", strategy="tensor"),
                            QuantizationArgs(num_bits=8, type="float", strategy="tensor")),
    }[name]
    return AutoRoundModifier(ignore=["lm_head"], iters=0, backend=backend, config_groups={
        "group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["w8a8-fp8-dynamic", "w8a8-fp8-static"])
def test_rtn_oneshot(three_layer_model_dir, tmp_path, backend, name):
    output = tmp_path / "oneshot_output"
    recipe = upstream_fp8_recipe(name, backend)
    run_oneshot(three_layer_model_dir, recipe, output)
    saved, wanted = reload_and_check(output), recipe.config_groups["group_0"]
    assert saved.weights.num_bits == wanted.weights.num_bits
    assert saved.weights.strategy == wanted.weights.strategy
    # upstream checks these where the config keeps them; every backend keeps them here
    assert saved.input_activations is not None
    assert saved.input_activations.num_bits == wanted.input_activations.num_bits
    assert saved.input_activations.strategy == wanted.input_activations.strategy
