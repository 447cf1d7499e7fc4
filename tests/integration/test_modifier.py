"""The llm-compressor drop-in, end to end through oneshot on a tiny random Llama (CPU,
backend="torch"): the saved compressed-tensors checkpoint reloads to exactly the tuned
weights, tuning beats RTN, YAML recipes reach the subclass, bad schemes fail clearly."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from transformers import LlamaForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

import autoround_fast
from autoround_fast import AutoRoundModifier, has_cuda_kernels
from autoround_fast.engine import precision
from conftest import HAS_CUDA, tiny_tokenizer

from llmcompressor import oneshot


def calib(n=12, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (n, seqlen), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seqlen] * n})


def run(model_dir, recipe, n=12):
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    oneshot(model=model, dataset=calib(n), recipe=recipe, processor=tiny_tokenizer(),
            num_calibration_samples=n, max_seq_length=32)
    return model


def quantized_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale")}


# the compressed-tensors format llm-compressor's own path writes for each scheme
CHECKPOINT_FORMATS = {"NVFP4": "nvfp4-pack-quantized", "NVFP4A16": "nvfp4-pack-quantized",
                      "W4A16": "pack-quantized", "W4A16_ASYM": "pack-quantized",
                      "MXFP4": "mxfp4-pack-quantized", "MXFP4A16": "mxfp4-pack-quantized",
                      "MXFP8": "mxfp8-quantized", "MXFP8A16": "mxfp8-quantized",
                      "W8A8": "int-quantized", "W4AFP8": "int-quantized", "FP8_DYNAMIC": "float-quantized",
                      "FP8": "float-quantized", "FP8_BLOCK": "float-quantized"}


@pytest.mark.parametrize("backend", ["torch", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs a GPU"))])
@pytest.mark.parametrize("scheme", ["NVFP4", "NVFP4A16", "W4A16", "W4A16_ASYM", "MXFP4", "MXFP4A16", "MXFP8",
                                    "MXFP8A16", "W8A8", "W4AFP8", "FP8_DYNAMIC", "FP8", "FP8_BLOCK"])
def test_checkpoint_reloads_to_tuned_weights(tiny_model_dir, tmp_path, scheme, backend, monkeypatch):
    # The bf16 model stays bf16 on the CPU, as on a CPU with AVX512-BF16; without it auto-round's
    # rule converts the block to fp32 (tests/integration/test_equivalence.py covers both), and an
    # fp32 block's NVFP4 weights reload in compressed-tensors' bf16.
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    mod = AutoRoundModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], iters=30,
                            batch_size=4, backend=backend)
    model = run(tiny_model_dir, mod)
    stats = mod.block_stats
    assert [r["block"] for r in stats] == ["model.layers.0", "model.layers.1"]
    # iteration 0 is the RTN state; static FP8 (W8A8) and FP8 blocks start so close to the
    # block's output that on the first block no step of 1/30 improves it
    improved = [r["best_loss"] < r["init_loss"] for r in stats]
    assert all(improved) or (scheme in ("FP8", "FP8_BLOCK") and improved[1]
                             and stats[0]["best_loss"] == stats[0]["init_loss"]), stats
    tuned = {n: m.weight.detach().cpu().clone() for n, m in quantized_linears(model).items()}
    assert len(tuned) == 14
    if scheme == "W4A16_ASYM":  # the zero point is really there (the stock path drops it)
        zps = torch.cat([m.weight_zero_point.flatten() for m in quantized_linears(model).values()])
        assert zps.dtype == torch.int8 and (zps != 0).any() and zps.min() >= -8 and zps.max() <= 7
    if scheme == "NVFP4":
        m = model.model.layers[0].self_attn.q_proj
        assert m.input_global_scale.dtype == torch.float32 and torch.isfinite(m.input_global_scale).all()
    if scheme == "FP8":  # the static input scale the block was tuned under, stored as compressed-tensors holds it
        m = model.model.layers[1].mlp.down_proj
        assert m.input_scale.dtype == torch.bfloat16 and m.input_scale.item() > 0
    if scheme == "FP8_BLOCK":  # one scale per 128 x 128 block, the last row of blocks partial (k_proj: 64 rows)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn.k_proj.weight_scale.shape == (1, 1) and mlp.down_proj.weight_scale.shape == (1, 2)
        assert mlp.gate_proj.weight_scale.shape == (2, 1) and mlp.gate_proj.weight_scale.unique().numel() == 2
    model.save_pretrained(tmp_path, save_compressed=True)
    assert f'"format": "{CHECKPOINT_FORMATS[scheme]}"' in (tmp_path / "config.json").read_text()
    reloaded = LlamaForCausalLM.from_pretrained(
        tmp_path, torch_dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(run_compressed=False))
    for name, w in tuned.items():
        assert torch.equal(reloaded.get_submodule(name).weight, w.cpu()), name


def test_yaml_recipe_reaches_the_subclass(tiny_model_dir):
    recipe = """
quant_stage:
  quant_modifiers:
    AutoRoundModifier:
      targets: ["Linear"]
      ignore: ["lm_head"]
      scheme: W4A16
      iters: 3
      batch_size: 4
      backend: torch
"""
    from llmcompressor.core import active_session

    run(tiny_model_dir, recipe)
    mods = [m for stage in active_session().lifecycle.recipe.modifiers for m in [stage]]
    ours = [m for m in mods if isinstance(m, autoround_fast.AutoRoundModifier)]
    assert ours and ours[0].backend == "torch" and len(ours[0].block_stats) == 2


def test_unsupported_scheme_names_the_layer(tiny_model_dir):
    """INT8 weights with static per-tensor INT8 activations: not a scheme the fast path tunes."""
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, strategy="channel"),
                                input_activations=QuantizationArgs(num_bits=8, strategy="tensor", dynamic=False))
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\..*backend='auto_round'.*INT weights take "
                                         r"16-bit or dynamic per-token activations"):
        run(tiny_model_dir, AutoRoundModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                              iters=2, backend="torch"))


def test_same_seed_same_run(tiny_model_dir):
    """The modifier's seed decides the run: llm-compressor shuffles the calibration samples with
    torch's global generator, which the modifier seeds when it initialises, so two runs with
    one seed tune alike however the global generator was left, and another seed differs."""
    runs = []
    for seed, disturb in ((0, 1), (0, 2), (1, 1)):
        mod = AutoRoundModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], iters=3, backend="torch",
                                seed=seed)
        torch.manual_seed(disturb)
        run(tiny_model_dir, mod)
        runs.append([r["losses"] for r in mod.block_stats])
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize("cache_on_cpu", [False, True])
def test_capture_hook_keeps_inputs_on_their_device_and_equal_kwargs_once(cache_on_cpu):
    """Our backends keep the captured block inputs where the pipeline computed them (a copy,
    on the GPU too), and a keyword argument equal to the first sample's is that very tensor;
    with cache_on_cpu the stock hook copies everything to the host."""
    dev = "cuda" if HAS_CUDA else "cpu"
    mod = AutoRoundModifier(targets="Linear", scheme="W4A16", backend="torch", cache_on_cpu=cache_on_cpu)
    layer = torch.nn.Module()
    layer._tmp_name = "model.layers.0"
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(1, 4, 8, generator=g).to(dev) for _ in range(3)]
    masks = [torch.zeros(1, 1, 4, 4, device=dev), torch.zeros(1, 1, 4, 4, device=dev),
             torch.ones(1, 1, 4, 4, device=dev)]
    rope = [(torch.ones(1, 4, 2, device=dev), torch.zeros(1, 4, 2, device=dev)) for _ in range(3)]
    for h, m, r in zip(hidden, masks, rope):
        mod.input_capture_hook(layer, (h,), {"attention_mask": m, "position_embeddings": r, "use_cache": False})
    got = mod._all_module_input["model.layers.0"]
    for (args, kwargs), h, m in zip(got, hidden, masks):
        assert torch.equal(args[0].cpu(), h.cpu()) and torch.equal(kwargs["attention_mask"].cpu(), m.cpu())
        assert kwargs["use_cache"] is False
        assert args[0].device.type == ("cpu" if cache_on_cpu else dev)
        if dev == "cuda":
            assert args[0].data_ptr() != h.data_ptr()  # a copy: the block cannot write into it
    shared = not cache_on_cpu
    assert (got[1][1]["attention_mask"] is got[0][1]["attention_mask"]) == shared
    assert (got[2][1]["position_embeddings"][0] is got[0][1]["position_embeddings"][0]) == shared
    assert got[2][1]["attention_mask"] is not got[0][1]["attention_mask"]  # it differs


@pytest.mark.parametrize("setting,match", [
    (dict(device_ids="0,x"), r"device_ids='0,x': 'x' is not a GPU index"),
    (dict(device_ids="0,0"), r"device_ids='0,0' names GPUs \[0, 0\]|no GPU is visible"),
    (dict(device_ids="0,99"), r"device_ids='0,99' names GPUs \[0, 99\]|no GPU is visible"),
    (dict(env="two"), r"LLMCOMPRESSOR_GPUS_PER_GROUP='?two'? must be a whole number"),
])
def test_bad_device_ids_name_the_option(tiny_model_dir, monkeypatch, setting, match):
    """device_ids / LLMCOMPRESSOR_GPUS_PER_GROUP that cannot be honoured stop before calibration."""
    kwargs = {k: v for k, v in setting.items() if k != "env"}
    if "env" in setting:
        monkeypatch.setenv("LLMCOMPRESSOR_GPUS_PER_GROUP", setting["env"])
    with pytest.raises(ValueError, match=match):
        run(tiny_model_dir, AutoRoundModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], iters=2,
                                              backend="torch", **kwargs))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_ids_without_a_gpu_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match=r"device_ids='0,1' spreads a block over GPUs, and no GPU is visible"):
        run(tiny_model_dir, AutoRoundModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], iters=2,
                                              backend="torch", device_ids="0,1"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not has_cuda_kernels(),
                    reason="needs 2 GPUs and the CUDA kernels")
@pytest.mark.parametrize("scheme", ["NVFP4", "W4A16"])
def test_device_ids_spread_a_block_and_change_nothing(tiny_model_dir, scheme):
    """device_ids="0,1": each block's Linears are tuned on both cards (placement), and the
    model comes out exactly as tuned on one card."""
    models = {}
    for ids in (None, "0,1"):
        mod = AutoRoundModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], iters=6,
                                backend="cuda", device_ids=ids)
        torch.manual_seed(0)  # the same calibration shuffle (llm-compressor's RandomSampler)
        models[ids] = (run(tiny_model_dir, mod), mod)
    one, spread = models[None][0], models["0,1"][0]
    stats = models["0,1"][1].block_stats
    assert all(set(r["placement"].values()) == {"cuda:0", "cuda:1"} for r in stats)
    assert all(not r["placement"] for r in models[None][1].block_stats)
    assert [r["losses"] for r in stats] == [r["losses"] for r in models[None][1].block_stats]
    a, b = one.state_dict(), spread.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


@pytest.mark.parametrize("scheme,group", [("NVFP4", 16), ("W4A16", 128)])
def test_group_that_does_not_divide_in_names_the_layer(tmp_path, scheme, group):
    """llm-compressor stops this itself unless bypass_divisibility_checks=True; past that,
    compressed-tensors 0.19 fails deep inside its fake-quantization (its RTN path too), so the
    modifier stops first, naming the layer. The engine itself tunes such layers (test_engine)."""
    from conftest import tiny_llama

    tiny_llama(intermediate=200).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"layer 'model\.layers\.0\.mlp\.down_proj': in_features 200 .* {group}"):
        run(str(tmp_path), AutoRoundModifier(targets="Linear", scheme=scheme, ignore=["lm_head"], iters=2,
                                             backend="torch", bypass_divisibility_checks=True))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        AutoRoundModifier(scheme="W4A16", backend="tpu")


@pytest.mark.skipif(autoround_fast.has_cuda_kernels() and torch.cuda.is_available(), reason="has CUDA")
def test_cuda_backend_without_gpu_is_a_clear_error(tiny_model_dir):
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        run(tiny_model_dir, AutoRoundModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"],
                                              iters=2, backend="cuda"))


@pytest.mark.parametrize("backend", ["auto_round", "torch"])
def test_cuda_only_options_with_another_backend_are_an_error(backend):
    """fuse_elementwise=True and step_in_backward=True with a backend other than cuda stop
    before any calibration work (auto_round would ignore them), naming the option."""
    for option in ("fuse_elementwise", "step_in_backward"):
        mod = AutoRoundModifier(targets="Linear", scheme="W4A16", backend=backend, **{option: True})
        with pytest.raises(ValueError, match=f"{option}=True needs backend='cuda', got backend='{backend}'"):
            mod.on_initialize(None)
