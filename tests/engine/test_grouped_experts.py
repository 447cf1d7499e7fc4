"""The grouped experts (engine/experts.py) against llm-compressor's per-expert loop, on a tiny
random Qwen3-MoE block (8 experts, top-2, hidden 128, expert width 128, bf16; the router never
picks the last expert, so one expert gets no token): the same output and gradients bit for bit,
and tune_block the same losses and tuned weights bit for bit.

The loop under llm-compressor's calibrate-all-experts flag (oneshot's default) runs every expert
on every token and picks its rows after: the CPU matmul's rows then round apart in the last bit
(they depend on the row count), so there the two agree to rounding only."""

import contextlib
import copy
import types
import weakref

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from autoround_fast import ops
from autoround_fast.calibration_pass import GroupedCalibrationPass
from autoround_fast.engine import QuantSpec, backends, precision, tune_block
from autoround_fast.engine.backends import make_backend
from autoround_fast.engine import expert_forward
from autoround_fast.engine import memory
from autoround_fast.engine.experts import grouped_experts, routed_shares
from autoround_fast.engine.linear import TunedLinear, swap_module
from conftest import HAS_CUDA, capture_block_inputs

from llmcompressor.modeling.moe.context import moe_calibration_context
from llmcompressor.modeling.moe.linearize import linearize_moe

E, K, HIDDEN = 8, 2, 128
ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
EXPERTS = [f"mlp.experts.{e}.{p}" for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")]
SPECS = {
    "w4a16": QuantSpec("int", 4, 128, True, scale_dtype=torch.bfloat16),
    "nvfp4": QuantSpec("nvfp4", act=True),
    "mxfp4": QuantSpec("mx", 4, 32, act=True),
}
# weight-only FP8: per channel and per block (rows of 128: whole 128 x 128 blocks) the loop tunes
# as stacks; per tensor (a weight scale per expert) one expert at a time
FP8_SPECS = {
    "fp8-channel": QuantSpec("fp8", 8, -1, scale_dtype=torch.bfloat16),
    "fp8-block": QuantSpec("fp8", 8, 128, scale_dtype=torch.bfloat16),
    "fp8-tensor": QuantSpec("fp8", 8, 0, scale_dtype=torch.bfloat16),
}


def _no_last_expert(self, hidden_states):
    """Qwen3MoeTopKRouter's forward with the last expert's logit at -inf."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden_states, self.weight)
    logits[:, -1] = float("-inf")
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top, idx = torch.topk(probs, self.top_k, dim=-1)
    top /= top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), idx


def _moe_layer(device="cpu"):
    """The linearized model's first block (router without the last expert) and its inputs, the
    model built on ``device``: llm-compressor's linearized experts onload to the device they
    were linearized on, so a block moved after linearizing would compute its experts there."""
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=128, num_experts=E,
                         num_experts_per_tok=K, norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, num_hidden_layers=1, vocab_size=256, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(cfg).to(device)
    linearize_moe(model)  # the per-expert Linears in the config's dtype
    model.to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 0.08)
    layer = model.model.layers[0]
    layer.mlp.gate.forward = types.MethodType(_no_last_expert, layer.mlp.gate)
    return layer, capture_block_inputs(model, nsamples=8, seqlen=16)


@pytest.fixture(scope="module")
def moe():
    return _moe_layer()


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # the block stays bf16, as the model


def _tuned_experts(layer, spec, backend, dtype):
    return _tuned_experts_of(layer, EXPERTS, spec, dtype, backend)


def _tuned_experts_of(layer, names, spec, dtype, backend="kernels"):
    """The layer's experts container, its projections ``names`` TunedLinears at random
    tunables (and, under W4A4, a different activation global scale per expert)."""
    experts = copy.deepcopy(layer.mlp.experts).to(dtype)
    g = torch.Generator().manual_seed(1)
    tuned = {}
    for name in (n.removeprefix("mlp.experts.") for n in names):
        lin = experts.get_submodule(name)
        gs = ops.nvfp4_global_scale(lin.weight) if spec.kind == "nvfp4" else None
        act_gs = (torch.rand(1, generator=g) * 50 + 20) if spec.act and spec.kind == "nvfp4" else None
        tl = TunedLinear(lin, spec, make_backend(backend), gs, act_gs)
        with torch.no_grad():
            tl.v.copy_(torch.rand(tl.v.shape, generator=g) - 0.5)
            tl.max_scale.copy_(torch.rand(tl.max_scale.shape, generator=g) * 0.3 + 0.7)
        swap_module(experts, name, tl)
        tuned[name] = tl
    return experts, tuned


def _run(experts, tuned, x, idx, w, grad, grouped=None):
    """Output and gradients (x, routing weights, every expert's tunables: a stack's split into
    its experts' rows, ``grouped`` the GroupedExperts) of one forward and backward."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    out = experts(x, idx, w)
    out.backward(grad)
    units = grouped.loop_units(tuned) if grouped else tuned
    grads = {}
    for name, tl in units.items():
        members = grouped.stacks[name][1] if grouped and name in grouped.stacks else [name]
        for k, q in (("v", tl.v), ("max_scale", tl.max_scale), ("min_scale", tl.min_scale)):
            if q is not None:
                grads.update((f"{m}.{k}", g.clone()) for m, g in zip(members, q.grad.chunk(len(members))))
        for p in tl.tunables():
            p.grad = None
    return out.detach(), x.grad, w.grad, grads


def _bits(t):
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.view(torch.int32)


def _assert_same(a, b, exact=True, dtype=None):
    """Bit for bit, or to rounding: within 8 units in the last place of the tensor's largest
    value in ``dtype``, the dtype the matmuls computed in (an fp32 V gradient of a bf16 run
    carries bf16's rounding: 6.5 units seen on one CPU, 1.7e-6 at fp32 on another's bf16 kernels)."""
    if exact:
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    else:
        err = (a.float() - b.float()).abs().max()
        assert err <= 8 * torch.finfo(dtype or a.dtype).eps * a.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # grouped matmul; the per-expert fallback
@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("scheme", list(SPECS))
@pytest.mark.parametrize("all_experts", [False, True], ids=["routed", "calibrate_all"])
def test_grouped_forward_and_gradients_equal_the_loop(moe, scheme, backend, dtype, all_experts):
    """The experts' output and the gradients of the input, the routing weights and every
    expert's V and scales: bit for bit as the routed loop's, and to rounding as the loop's under
    llm-compressor's calibrate-all-experts flag (every expert on every token)."""
    layer, _ = moe
    experts, tuned = _tuned_experts(layer, SPECS[scheme], backend, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, HIDDEN, generator=g).to(dtype)
    with torch.no_grad():
        _, w, idx = layer.mlp.gate(x.to(torch.bfloat16))
    w = w.to(dtype)
    assert not (idx == E - 1).any()  # an expert without tokens
    grad = torch.randn(40, HIDDEN, generator=g).to(dtype)
    with moe_calibration_context() if all_experts else torch.enable_grad():
        loop = _run(experts, tuned, x, idx, w, grad)
        with grouped_experts(experts, tuned, torch.device("cpu")) as found:
            assert found.names == [""]
            grouped = _run(experts, tuned, x, idx, w, grad, found)
    for a, b in zip(loop[:3], grouped[:3]):
        _assert_same(a, b, exact=not all_experts, dtype=dtype)
    assert loop[3].keys() == grouped[3].keys()
    for n in loop[3]:
        # a scale's gradient sums nearly cancelling terms, whose rounding it magnifies: under the
        # flag only V's is compared
        if not all_experts or n.endswith(".v"):
            _assert_same(loop[3][n], grouped[3][n], exact=not all_experts, dtype=dtype)
    assert all(not grouped[3][f"{E - 1}.{p}.v"].any() for p in ("gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("scheme,backend", [("w4a16", "kernels"), ("nvfp4", "torch"), ("nvfp4", "kernels"),
                                            ("mxfp4", "kernels"), ("fp8-channel", "kernels"), ("fp8-block", "torch"),
                                            ("fp8-tensor", "kernels")])
def test_tune_block_with_grouped_experts_equals_the_loop(moe, scheme, backend, monkeypatch):
    """tune_block on the MoE block: the same per-iteration losses, tuned weights and quantized
    outputs bit for bit, with and without the grouped experts. Grouped, the best weights of
    each projection's experts are kept by one copy per iteration, not one per expert: the
    stack's, or (FP8 per tensor, one call per expert) that of the experts' weights stacked."""
    layer, inputs = moe
    specs = {n: {**SPECS, **FP8_SPECS}[scheme] for n in ATTENTION + EXPERTS}
    copies = []
    cls = type(backends.make_backend(backend))
    monkeypatch.setattr(cls, "copy_if", lambda self, dst, src, flag, orig=cls.copy_if: (copies.append(dst.dim()),
                                                                                        orig(self, dst, src, flag)))

    def tune(grouped):
        block = copy.deepcopy(layer)
        copies.clear()
        # lr 0.005: the best iteration is a later one, so the weights and qparams compared are
        # those of stepped tunables (at 1/6 the loss rises and the best is the first)
        res = tune_block(block, inputs, specs, iters=6, batch_size=4, backend=backend, grouped_experts=grouped,
                         lr=0.005)
        return res, {n: block.get_submodule(n).weight.detach().clone() for n in specs}, sorted(copies)

    grouped, grouped_w, grouped_copies = tune(True)
    loop, loop_w, loop_copies = tune(False)
    stack_dim = 3 if scheme == "fp8-tensor" else 2
    assert grouped_copies == sorted([2] * 6 * len(ATTENTION) + [stack_dim] * 6 * 3)  # the attention's, one per projection
    assert loop_copies == [2] * 6 * len(specs)
    assert grouped.grouped_experts == ["mlp.experts"] and loop.grouped_experts == []
    assert grouped.losses == loop.losses and loop.best_iter > 0
    assert grouped.step_in_backward == loop.step_in_backward
    _assert_same(grouped.q_outputs, loop.q_outputs)
    for n in specs:
        _assert_same(grouped_w[n], loop_w[n])
        assert grouped.qparams[n].keys() == loop.qparams[n].keys()
        for k in loop.qparams[n]:  # the scales come from each expert's own tunables
            _assert_same(grouped.qparams[n][k], loop.qparams[n][k])


@pytest.mark.parametrize("scheme", ["w4a16", "nvfp4", "fp8-tensor"])
def test_the_backward_makes_each_stacks_weight_again(moe, scheme, monkeypatch):
    """remake_weights, on by default with the grouped experts: each projection's stack has its
    fake-quantized weight made again in the backward, once per iteration, and no fake
    quantization runs but those and the forwards' (none at scoring); FP8 per tensor, whose
    experts' weights the forward stacks, holds that stack. The losses of the weights held."""
    from autoround_fast.engine.expert_stack import _Rows

    layer, inputs = moe
    specs = {n: {**SPECS, **FP8_SPECS}[scheme] for n in ATTENTION + EXPERTS}
    made, quantized = [], []
    orig_made, orig_qdq = TunedLinear._made_again, TunedLinear._qdq
    monkeypatch.setattr(TunedLinear, "_made_again",
                        lambda self: made.append(isinstance(self.linear, _Rows)) or orig_made(self))
    monkeypatch.setattr(TunedLinear, "_qdq", lambda self, st: quantized.append(1) or orig_qdq(self, st))
    runs = {}
    for remake in (None, False):
        made.clear()
        quantized.clear()
        res = tune_block(copy.deepcopy(layer), inputs, specs, iters=6, batch_size=4, backend="kernels",
                         grouped_experts=True, remake_weights=remake)
        runs[remake] = (res.losses, list(made), len(quantized))
    (losses, made_default, calls), (held_losses, made_held, held_calls) = runs[None], runs[False]
    assert sum(made_default) == (0 if scheme == "fp8-tensor" else 6 * 3) and made_held == []
    assert len(made_default) - sum(made_default) == 6  # o_proj's (q, k and v: their input needs no gradient)
    assert calls == held_calls + len(made_default)
    assert losses == held_losses


@pytest.mark.parametrize("scheme", list(SPECS) + ["fp8-channel", "fp8-block"])
def test_a_projections_experts_are_fake_quantized_in_one_call(moe, scheme, monkeypatch):
    """In the tuning loop's context each projection's experts are one stack: one call of the
    weight op per projection, not one per expert (NVFP4: each expert's global scale on its
    rows). The experts' weights and tunables are views of the stack's rows, so a step on the
    stack steps every expert; on the way out each weight has storage of its own again, with
    its values."""
    layer, _ = moe
    spec = {**SPECS, **FP8_SPECS}[scheme]
    experts, tuned = _tuned_experts(layer, spec, "kernels", torch.bfloat16)
    before = {n: tl.linear.weight.detach().clone() for n, tl in tuned.items()}
    cls = type(make_backend("kernels"))
    method = "fp8_block" if scheme == "fp8-block" else spec.kind
    orig, calls = getattr(cls, method), []

    def counted(self, w, *args):
        calls.append(tuple(w.shape))
        return orig(self, w, *args)

    monkeypatch.setattr(cls, method, counted)
    x = torch.randn(40, HIDDEN).to(torch.bfloat16)
    with torch.no_grad():
        _, w, idx = layer.mlp.gate(x)
    with grouped_experts(experts, tuned, torch.device("cpu")) as found:
        experts(x, idx, w)
        assert len(calls) == 3 and len(found.stacks) == 3 and not found.forward_stacks
        for unit, names in found.stacks.values():
            rows = unit.linear.weight.shape[0] // E
            assert unit.linear.weight.shape[0] == E * rows and tuple(unit.linear.weight.shape) in calls
            with torch.no_grad():
                unit.v.add_(0.25)
                unit.max_scale.mul_(0.5)
            scale_rows = unit.max_scale.shape[0] // E  # FP8 blocks: one row of scales per 128 rows
            for e, n in enumerate(names):
                tl, part, scales = tuned[n], slice(e * rows, (e + 1) * rows), slice(e * scale_rows, (e + 1) * scale_rows)
                assert tl.linear.weight.untyped_storage().data_ptr() == unit.linear.weight.untyped_storage().data_ptr()
                assert torch.equal(tl.linear.weight, unit.linear.weight[part])
                assert torch.equal(tl.v, unit.v[part]) and torch.equal(tl.max_scale, unit.max_scale[scales])
    storages = {tl.linear.weight.untyped_storage().data_ptr() for tl in tuned.values()}
    assert len(storages) == len(tuned)
    assert all(torch.equal(tl.linear.weight, before[n]) for n, tl in tuned.items())


@pytest.mark.parametrize("scheme", list(SPECS))
def test_grouped_forward_never_waits_for_the_host(moe, scheme, monkeypatch):
    """Nothing of the grouped forward needs the experts' row counts on the host (the routing
    sorted on the device, the activations quantized in one call with a global scale per
    row): the probe then lets a GPU capture the loop in a CUDA graph."""
    layer, _ = moe
    experts, tuned = _tuned_experts(layer, SPECS[scheme], "kernels", torch.bfloat16)

    def no_bounds(self):
        raise AssertionError("the grouped forward asked for the experts' row counts")

    monkeypatch.setattr(expert_forward.Routing, "bounds", no_bounds)
    x = torch.randn(40, HIDDEN).to(torch.bfloat16)
    with torch.no_grad():
        _, w, idx = layer.mlp.gate(x)
    with grouped_experts(experts, tuned, torch.device("cpu")):
        experts(x, idx, w).float().sum().backward()


@pytest.mark.parametrize("scheme", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # grouped matmul; per-expert slices
def test_the_backward_makes_the_gathered_rows_again(moe, scheme, dtype, monkeypatch):
    """The tokens' rows gathered per pair ([pairs, hidden], k times the tokens) and, under
    W4A4, their quantized copies for gate and up are not held from the forward to the
    backward: the backward makes them again, also where the per-expert matmuls of an fp32
    block save slices of them. The gradients stay the loop's bit for bit
    (test_grouped_forward_and_gradients_equal_the_loop)."""
    layer, _ = moe
    experts, tuned = _tuned_experts(layer, SPECS[scheme], "kernels", dtype)
    made = {"gathered": [], "quantized": []}

    def watched(kind, orig):
        def f(*args):
            out = orig(*args)
            made[kind].append(weakref.ref(out))
            return out
        return f

    monkeypatch.setattr(expert_forward, "gather_rows", watched("gathered", expert_forward.gather_rows))
    monkeypatch.setattr(expert_forward, "_quantize_inputs", watched("quantized", expert_forward._quantize_inputs))
    x = torch.randn(40, HIDDEN).to(dtype).requires_grad_(True)
    with torch.no_grad():
        _, w, idx = layer.mlp.gate(x.to(torch.bfloat16))
    with grouped_experts(experts, tuned, torch.device("cpu")) as found:
        out = experts(x, idx, w)
        forward = {k: len(v) for k, v in made.items()}
        # gate and up's rows: one gather, and under W4A4 a quantized copy each (and down's)
        assert forward == {"gathered": 1, "quantized": 3 if SPECS[scheme].act else 0}
        assert made["gathered"][0]() is None
        assert all(r() is None for r in made["quantized"][:2])  # gate's and up's are gone
        out.float().sum().backward()
        units = found.loop_units(tuned)
    # one gather more, for every use of the rows and of their quantized copies
    assert len(made["gathered"]) == 2 and all(r() is None for r in made["gathered"])
    assert len(made["quantized"]) == (5 if SPECS[scheme].act else 0)  # gate's and up's made again
    assert x.grad is not None and all(tl.v.grad is not None for tl in units.values())


@pytest.mark.parametrize("scheme", ["w4a16", "nvfp4"])
def test_grouped_block_never_runs_the_loop(moe, scheme):
    """With the grouped experts, every pass over the block (the reference, W4A4's act_max
    calibration, the tuning loop and the quantized outputs) runs them grouped: llm-compressor's
    per-expert loop, which waits for the host at every expert, is never called."""
    layer, inputs = moe
    block = copy.deepcopy(layer)

    def loop(self, hidden_states, top_k_index, top_k_weights):
        raise AssertionError("llm-compressor's per-expert loop ran")

    # the container's own forward, behind compressed-tensors' wrapper (the loop's signature)
    assert "_original_forward_func" in block.mlp.experts.__dict__
    block.mlp.experts._original_forward_func = loop
    specs = {n: SPECS[scheme] for n in ATTENTION + EXPERTS}
    res = tune_block(block, inputs, specs, iters=2, batch_size=4, backend="kernels", grouped_experts=True)
    assert res.grouped_experts == ["mlp.experts"]


def test_the_pipeline_pass_groups_a_layer_until_it_is_released(moe):
    """GroupedCalibrationPass (the sequential pipeline's pass): from the layer's first forward
    its experts run grouped, to the loop's output bit for bit over the routed tokens, until
    release gives the layer its own forward back. A layer one of whose Linears carries a hook
    (another modifier's observer) keeps the loop, so that the hook sees its inputs."""
    layer, inputs = moe
    block = copy.deepcopy(layer)
    args, kwargs = inputs[0]
    calls, seen = [], []
    loop = block.mlp.experts._original_forward_func

    def counted(self, hidden_states, top_k_index, top_k_weights):  # the loop's signature, which the engine checks
        calls.append(1)
        return loop(self, hidden_states, top_k_index, top_k_weights)

    block.mlp.experts._original_forward_func = counted
    with torch.no_grad():
        looped = block(*args, **kwargs)
        passes = GroupedCalibrationPass(True)
        handle = block.register_forward_pre_hook(passes.pre_hook, with_kwargs=True)
        grouped = [block(*args, **kwargs) for _ in range(2)]
        assert len(calls) == 1  # the first forward, before the pass
        passes.release(block)
        block(*args, **kwargs)
        assert len(calls) == 2
        handle.remove()
        for out in grouped:
            _assert_same(out, looped)

        block.mlp.experts[0].up_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
        passes = GroupedCalibrationPass(True)
        block.register_forward_pre_hook(passes.pre_hook, with_kwargs=True)
        block(*args, **kwargs)
        passes.close()
    assert len(calls) == 3 and len(seen) == 1


def _act_max(layer, inputs, specs, grouped, all_experts):
    """Each Linear's act_max from one tune_block, under the calibrate-all flag or routed."""
    with moe_calibration_context() if all_experts else contextlib.nullcontext():
        res = tune_block(copy.deepcopy(layer), inputs, specs, iters=1, batch_size=4, backend="kernels",
                         grouped_experts=grouped)
    return {n: res.qparams[n]["act_max"] for n in specs}


@pytest.mark.parametrize("all_experts", [False, True], ids=["routed", "calibrate_all"])
@pytest.mark.parametrize("tuned", ["all", "no_expert_0_down"])
def test_grouped_act_max_equals_the_loop(moe, all_experts, tuned):
    """W4A4's act_max per expert Linear, recorded grouped on the device: bit for bit the loop's
    hooks, over the routed tokens, or under llm-compressor's calibrate-all-experts flag over
    every token (the last expert's too, which the router never picks; routed, it takes its
    siblings' largest). With one expert projection left out of the recipe, its container runs
    the loop instead, hooks and all."""
    layer, inputs = moe
    left_out = {"mlp.experts.0.down_proj"} if tuned != "all" else set()
    specs = {n: SPECS["nvfp4"] for n in EXPERTS if n not in left_out}
    grouped, loop = (_act_max(layer, inputs, specs, g, all_experts) for g in (True, False))
    assert all(loop[f"mlp.experts.{E - 1}.{p}"] > 0 for p in ("gate_proj", "up_proj", "down_proj"))
    assert len({float(v) for v in loop.values()}) > 3  # the maxima differ per expert and projection
    for n in specs:
        _assert_same(grouped[n], loop[n])


def test_grouped_experts_default_on_a_gpu_only(moe):
    """Off on the CPU unless asked for: there the stock path's loop is reproduced bit for bit."""
    layer, inputs = moe
    res = tune_block(copy.deepcopy(layer), inputs, {n: SPECS["w4a16"] for n in EXPERTS}, iters=1, batch_size=4,
                     backend="kernels")
    assert res.grouped_experts == []


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
@pytest.mark.parametrize("scheme", list(SPECS))
def test_grouped_moe_block_is_graphed_on_a_gpu(scheme):
    """On a GPU the MoE block tunes with its experts grouped, its loop captured in a CUDA
    graph (no eager_reason), to the losses of the per-expert loop run eagerly (to rounding:
    the grouped and the per-expert matmuls are different GEMM kernels)."""
    layer, on_gpu = _moe_layer("cuda")  # the inputs on the GPU, as llm-compressor's pipeline passes them
    specs = {n: SPECS[scheme] for n in ATTENTION + EXPERTS}

    def tune(grouped):
        return tune_block(copy.deepcopy(layer), on_gpu, specs, iters=6, batch_size=4, backend="cuda",
                          grouped_experts=grouped)

    grouped, loop = tune(True), tune(False)
    assert grouped.grouped_experts == ["mlp.experts"] and grouped.eager_reason == ""
    assert loop.grouped_experts == [] and "waits for the host" in loop.eager_reason
    assert grouped.losses == pytest.approx(loop.losses, rel=2e-2)


def test_the_memory_plan_counts_routed_tokens_for_grouped_experts(moe):
    """Run grouped, each expert computes on top_k / E of the tokens, and the memory estimate
    counts its activations so: a budget between the two estimates fits the grouped block as it
    is, and makes the per-expert loop (every expert on every token under llm-compressor's
    calibrate-all flag) give up its micro-batch."""
    layer, inputs = moe
    linears = {n: layer.get_submodule(n) for n in ATTENTION + EXPERTS}
    shares = routed_shares(layer, linears)
    assert shares == {n: K / E for n in EXPERTS}
    routed, every_token = (memory.BlockMemory(linears, len(inputs), 16, HIDDEN, 2, shares=s).bytes(4, True)
                           for s in (shares, {}))
    assert routed < every_token
    budget = (routed + every_token) // 2
    specs = {n: SPECS["w4a16"] for n in ATTENTION + EXPERTS}

    def note(grouped):
        res = tune_block(copy.deepcopy(layer), inputs, specs, iters=1, batch_size=4, backend="kernels",
                         grouped_experts=grouped, memory_budget=budget)
        return res.memory_note

    assert note(True) == ""
    assert "micro-batches of 2" in note(False)


GPT_OSS_EXPERTS = [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def gpt_oss():
    """A tiny GPT-OSS block, linearized (4 experts, top-2, the clamped SwiGLU), with a random
    non-zero bias on every expert projection, and its inputs."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    model = GptOssForCausalLM(GptOssConfig(
        hidden_size=HIDDEN, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_hidden_layers=1, vocab_size=256, max_position_embeddings=256,
        tie_word_embeddings=False))
    linearize_moe(model)
    model.to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (p.dim() >= 2 and "embed" not in name) or ".experts." in name:
                p.normal_(0, 0.08)
    return model.model.layers[0], capture_block_inputs(model, nsamples=8, seqlen=16)


@pytest.mark.parametrize("scheme,dtype", [("w4a16", torch.bfloat16), ("w4a16", torch.float32),
                                          ("nvfp4", torch.float32)])
def test_grouped_experts_with_biases_equal_the_loop(gpt_oss, scheme, dtype):
    """GPT-OSS's experts, whose projections carry biases, run grouped: in bf16 each pair's bias
    is added after the grouped matmul has rounded, so the output is the routed loop's to
    rounding (F.linear adds it before rounding); bit for bit in fp32, where the per-expert
    fallback calls F.linear with the bias itself. (Under W4A4 a last-bit difference in gate/up
    moves the down projection's FP4 input by whole steps: tune_block's losses below.)"""
    layer, _ = gpt_oss
    experts, tuned = _tuned_experts_of(layer, GPT_OSS_EXPERTS, SPECS[scheme], dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, HIDDEN, generator=g).to(dtype)
    with torch.no_grad():
        _, w, idx = layer.mlp.router(x.to(torch.bfloat16))
    grad = torch.randn(40, HIDDEN, generator=g).to(dtype)
    loop = _run(experts, tuned, x, idx, w.to(dtype), grad)
    with grouped_experts(experts, tuned, torch.device("cpu")) as found:
        assert found.names == [""]
        grouped = _run(experts, tuned, x, idx, w.to(dtype), grad, found)
    exact = dtype == torch.float32
    for a, b in zip(loop[:3], grouped[:3]):
        _assert_same(a, b, exact=exact, dtype=dtype)
    for n in loop[3]:
        if exact or n.endswith(".v"):
            _assert_same(loop[3][n], grouped[3][n], exact=exact, dtype=dtype)


@pytest.mark.parametrize("scheme", ["w4a16", "nvfp4"])
def test_tune_block_groups_gpt_oss_experts(gpt_oss, scheme):
    """tune_block on the GPT-OSS block groups its biased experts and counts them on their
    routed share of the tokens (top_k / E) in the memory plan. With the biases at zero it
    tunes bit for bit as the loop; with them, the first loss agrees to rounding, and the
    sign steps at lr 1/30 follow the rounding apart: both bring the loss below a third of the
    first in 30 iterations, their best losses within 25% of each other (2-17% apart, either
    way, where the CPU's bf16 matmuls run on AVX2 or on AMX)."""
    layer, inputs = gpt_oss
    specs = {n: SPECS[scheme] for n in ATTENTION + GPT_OSS_EXPERTS}
    linears = {n: layer.get_submodule(n) for n in specs}
    assert routed_shares(layer, linears) == {n: 0.5 for n in GPT_OSS_EXPERTS}

    def tune(block, grouped, iters):
        return tune_block(copy.deepcopy(block), inputs, specs, iters=iters, batch_size=4, backend="kernels",
                          grouped_experts=grouped)

    grouped, loop = tune(layer, True, 30), tune(layer, False, 30)
    assert grouped.grouped_experts == ["mlp.experts"] and loop.grouped_experts == []
    assert grouped.losses[0] == pytest.approx(loop.losses[0], rel=1e-2)
    assert max(grouped.best_loss / grouped.losses[0], loop.best_loss / loop.losses[0]) < 1 / 3
    assert grouped.best_loss == pytest.approx(loop.best_loss, rel=0.25)
    unbiased = copy.deepcopy(layer)
    with torch.no_grad():
        for name in GPT_OSS_EXPERTS:
            unbiased.get_submodule(name).bias.zero_()
    assert tune(unbiased, True, 6).losses == tune(unbiased, False, 6).losses


@pytest.mark.parametrize("all_experts", [False, True], ids=["routed", "calibrate_all"])
def test_grouped_act_max_with_biases(gpt_oss, all_experts):
    """W4A4's act_max of GPT-OSS's biased experts, recorded grouped: under the calibrate-all
    flag every expert's gate and up run on all tokens with their biases, bit for bit as the
    loop's; over the routed tokens gate/up's inputs bit for bit and down's to rounding (the
    grouped matmul rounds before the bias is added)."""
    layer, inputs = gpt_oss
    specs = {n: SPECS["nvfp4"] for n in GPT_OSS_EXPERTS}
    grouped, loop = (_act_max(layer, inputs, specs, g, all_experts) for g in (True, False))
    for n in specs:
        _assert_same(grouped[n], loop[n], exact=all_experts or not n.endswith("down_proj"), dtype=torch.bfloat16)
