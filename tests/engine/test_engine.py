"""The tuning engine on one decoder block: it lowers the loss below RTN, the kernels and the
oracles agree, iters=0 runs the scale search, and bad input gives clear errors."""

import contextlib
import copy
import weakref

import pytest
import torch

from autoround_fast import fusion, has_cuda_kernels, ops
from autoround_fast.engine import QuantSpec, backends, precision, tune_block
from autoround_fast.engine.linear import TunedLinear
from conftest import DEVICES, HAS_CUDA, capture_block_inputs, tiny_llama

BACKENDS = ["torch", "kernels", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"))]

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

SPECS = {
    "nvfp4": QuantSpec("nvfp4", act=True),
    "nvfp4a16": QuantSpec("nvfp4"),
    "w4a16-g32": QuantSpec("int", 4, 32, True, scale_dtype=torch.bfloat16),
    "w4a16-asym-g32": QuantSpec("int", 4, 32, False, scale_dtype=torch.bfloat16),
    "w2a16-g32": QuantSpec("int", 2, 32, True, scale_dtype=torch.bfloat16),
    "w8a16-perrow": QuantSpec("int", 8, -1, True, scale_dtype=torch.bfloat16),
    "mxfp4": QuantSpec("mx", 4, 32, act=True),
    "mxfp8a16": QuantSpec("mx", 8, 32),
    "fp8-tensor": QuantSpec("fp8", 8, 0, scale_dtype=torch.bfloat16),
    "fp8-channel": QuantSpec("fp8", 8, -1, scale_dtype=torch.bfloat16),
    "fp8-block": QuantSpec("fp8", 8, 128, scale_dtype=torch.bfloat16),
    "fp8-static": QuantSpec("fp8", 8, 0, act=True, scale_dtype=torch.bfloat16, act_scale_dtype=torch.bfloat16),
}


@pytest.fixture(scope="module")
def ragged_block():
    # intermediate 72: down_proj's in-features are not a multiple of 16 (NVFP4) or 32 (INT)
    model = tiny_llama(hidden=64, intermediate=72)
    return model, capture_block_inputs(model, nsamples=12, seqlen=24)


def imatrix(layer, inputs):
    """Sum of x^2 per input channel of each Linear, over the calibration tokens."""
    stats = {}
    hooks = [layer.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: stats.__setitem__(n, stats.get(n, 0) + a[0].float().pow(2).reshape(-1, a[0].shape[-1]).sum(0)))
        for n in LINEARS]
    with torch.no_grad():
        for args, kwargs in inputs:
            layer(*args, **{k: v for k, v in kwargs.items() if k != "past_key_values"})
    for h in hooks:
        h.remove()
    return stats


def fresh_block(model):
    return copy.deepcopy(model.model.layers[0])


@pytest.mark.parametrize("name,accumulate,backend", [("w4a16-g32", 1, "kernels"), ("mxfp8a16", 1, "kernels"),
                                                   ("w4a16-asym-g32", 2, "kernels"), ("fp8-channel", 1, "torch")])
def test_the_tuned_weight_is_the_best_iterations(ragged_block, name, accumulate, backend, monkeypatch):
    """The stored weight is the fake quantization at the V and scales the loop held when it
    scored its best iteration, bit for bit: with the step inside the backward (INT), the
    separate step (MX), gradients accumulated over two micro-batches, and the oracles."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    model, inputs = ragged_block
    block = fresh_block(model)
    spec = SPECS[name]
    weights = {n: block.get_submodule(n).weight.detach().to(torch.bfloat16, copy=True) for n in LINEARS}
    states = [None]  # the tunables before each iteration (None: V = 0, scales 1)
    snap = lambda it, loss: states.append(  # noqa: E731  (after iteration it's step)
        {n: [t.detach().clone() for t in block.get_submodule(n).tunables()] for n in LINEARS})
    res = tune_block(block, inputs, {n: spec for n in LINEARS}, iters=40, batch_size=4 // accumulate,
                     gradient_accumulate_steps=accumulate, backend=backend, progress=snap)
    assert res.best_iter > 0  # not the RTN state: V moved before and after it
    assert bool(res.step_in_backward) == (name == "w4a16-g32")  # the paths the parameters name
    for n in LINEARS:
        out_f, in_f = weights[n].shape
        linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        linear.weight.data.copy_(weights[n])
        tl = TunedLinear(linear, spec, backends.make_backend(backend), None, None)
        with torch.no_grad():
            for p, t in zip(tl.tunables(), states[res.best_iter][n]):
                p.copy_(t)
            want = tl.qdq()[0]
        assert torch.equal(block.get_submodule(n).weight, want.to(torch.bfloat16)), n


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_tuning_beats_rtn(ragged_block, name, backend, monkeypatch):
    # the bf16 block stays bf16 on the CPU, as on a CPU with AVX512-BF16 (without it auto-round's
    # rule tunes in fp32, where W8 per row does not beat RTN in 40 iterations; the equivalence
    # tests cover that path against auto-round itself)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    model, inputs = ragged_block
    block = fresh_block(model)
    before = {n: block.get_submodule(n).weight.clone() for n in LINEARS}
    spec = SPECS[name]
    res = tune_block(block, inputs, {n: spec for n in LINEARS}, iters=40, batch_size=4, backend=backend,
                     device=torch.device("cuda") if backend == "cuda" else None)
    # iteration 0 scores the RTN state (V = 0, scales 1): the best must be strictly lower
    assert res.best_loss < res.init_loss, (res.init_loss, res.best_loss)
    assert res.losses[0] == res.init_loss and min(res.losses) == res.best_loss
    assert res.q_outputs.shape == (12, 24, 64)
    assert res.q_outputs.device.type == ("cuda" if backend == "cuda" else "cpu")
    assert len(res.loop_ms) == (4 if backend == "cuda" else 0)  # GPU time per ten iterations
    for n in LINEARS:
        w = block.get_submodule(n).weight
        assert w.dtype == torch.bfloat16 and not torch.equal(w.cpu(), before[n])
        qp = res.qparams[n]
        rows, cols = w.shape
        if spec.kind == "nvfp4":
            assert qp["scale"].shape == (rows, -(-cols // 16)) and qp["global_scale"].numel() == 1
            assert ("input_global_scale" in qp) == spec.act
        elif spec.kind == "fp8":  # rounded to the stored dtype
            grid = {0: (1, 1), -1: (rows, 1), 128: (-(-rows // 128), -(-cols // 128))}[spec.group_size]
            assert qp["scale"].shape == grid
            assert torch.equal(qp["scale"], qp["scale"].bfloat16().float())
            assert qp.keys() == ({"scale", "act_max", "input_scale"} if spec.act else {"scale"})
            if spec.act:  # the static input scale, from the best act_max_scale, in its stored dtype
                assert qp["input_scale"].shape == (1,) and torch.equal(qp["input_scale"], qp["input_scale"].bfloat16().float())
        elif spec.kind == "mx":  # the shared exponents: whole numbers
            assert qp["scale"].shape == (rows, -(-cols // 32)) and torch.equal(qp["scale"], qp["scale"].round())
            assert qp.keys() == {"scale"}
        else:
            groups = ops.int_num_groups(cols, spec.group_size)
            assert qp["scale"].shape == (rows, groups) and qp["scale"].dtype == torch.bfloat16
            assert ("zero_point" in qp) == (not spec.sym)


def test_kernels_and_oracles_tune_alike(ragged_block):
    """Same forward bits, so the same RTN loss (to the block matmuls' run-to-run noise); scale gradients differ in summation order
    (rtol 1e-4), which can flip a rare sign, so the trajectories agree to within a few %."""
    model, inputs = ragged_block
    spec = SPECS["w4a16-asym-g32"]
    a = tune_block(fresh_block(model), inputs, {n: spec for n in LINEARS}, iters=20, batch_size=4, backend="torch")
    b = tune_block(fresh_block(model), inputs, {n: spec for n in LINEARS}, iters=20, batch_size=4, backend="kernels")
    assert b.init_loss == pytest.approx(a.init_loss, rel=1e-6)  # same weights; matmul order may vary
    assert b.best_loss == pytest.approx(a.best_loss, rel=0.05)


def test_iters0_scale_search_beats_plain_rtn(ragged_block):
    model, inputs = ragged_block
    spec = SPECS["nvfp4a16"]
    block = fresh_block(model)
    orig = {n: block.get_submodule(n).weight.clone() for n in LINEARS}
    res = tune_block(block, inputs, {n: spec for n in LINEARS}, iters=0, batch_size=4, backend="kernels")
    assert res.q_outputs.shape[0] == 12
    # The imatrix-weighted error of the searched scales never exceeds plain RTN's (max_scale
    # = 1) under the same global scale. auto-round searches under the layer's own global
    # scale and applies the result under the scale q/k/v (gate/up) share, so for those layers
    # the search is no longer optimal: there it must stay within 5% of RTN.
    stats = imatrix(model.model.layers[0], inputs)
    for n in LINEARS:
        w = orig[n]
        gs = res.qparams[n]["global_scale"]
        ones = torch.ones(w.shape[0], -(-w.shape[1] // 16))
        rtn, _ = ops.fake_quant_nvfp4(w, torch.zeros(w.shape), ones, gs)
        err = lambda q: float(((q.float() - w.float()) ** 2 * stats[n]).sum())
        own = bool(torch.equal(gs.reshape(()), ops.nvfp4_global_scale(w).reshape(())))
        assert err(block.get_submodule(n).weight) <= err(rtn) * (1 + 1e-6 if own else 1.05), n


def test_errors(ragged_block):
    model, inputs = ragged_block
    spec = {n: SPECS["nvfp4a16"] for n in LINEARS}
    with pytest.raises(ValueError, match="backend must be one of"):
        tune_block(fresh_block(model), inputs, spec, iters=1, backend="tpu")
    with pytest.raises(ValueError, match="no submodule 'mlp.nope'"):
        tune_block(fresh_block(model), inputs, {"mlp.nope": SPECS["nvfp4a16"]}, iters=1)
    with pytest.raises(ValueError, match="'mlp' is a LlamaMLP, not a Linear"):
        tune_block(fresh_block(model), inputs, {"mlp": SPECS["nvfp4a16"]}, iters=1)
    with pytest.raises(ValueError, match="no calibration inputs"):
        tune_block(fresh_block(model), [], spec, iters=1)
    block = fresh_block(model)
    with torch.no_grad():
        block.mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight of 'mlp.down_proj' has non-finite"):
        tune_block(block, inputs, spec, iters=1)
    with pytest.raises(ValueError, match="kind must be 'nvfp4', 'mx', 'fp8' or 'int'"):
        QuantSpec("mxfp4")
    with pytest.raises(ValueError, match="supported for nvfp4, mx and fp8, not int"):
        QuantSpec("int", act=True)
    with pytest.raises(ValueError, match="mx takes bits in \\[4, 8\\] and group_size 32, got bits=6"):
        QuantSpec("mx", 6, 32)
    with pytest.raises(ValueError, match="fp8 takes bits 8 and group_size 0 .per tensor., -1 .per channel. or "
                                         "128 .per 128 x 128 block., got bits=8, group_size=32"):
        QuantSpec("fp8", 8, 32)
    with pytest.raises(ValueError, match="FP8 block weights take 16-bit or dynamic activations"):
        QuantSpec("fp8", 8, 128, act=True)


@pytest.mark.skipif(has_cuda_kernels() and torch.cuda.is_available(), reason="this machine has the CUDA kernels")
def test_cuda_backend_without_kernels_is_a_clear_error(ragged_block):
    model, inputs = ragged_block
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        tune_block(fresh_block(model), inputs, {"mlp.down_proj": SPECS["nvfp4a16"]}, iters=1, backend="cuda")


def test_gradient_accumulation_and_seed(ragged_block):
    """gradient_accumulate_steps=2 with batch 2 walks the same global batches of 4 as batch 4
    (the same sign of the summed gradient up to rounding), and a seed fixes the batch order."""
    model, inputs = ragged_block
    spec = {n: SPECS["w4a16-g32"] for n in LINEARS}
    a = tune_block(fresh_block(model), inputs, spec, iters=10, batch_size=4, backend="torch", seed=3)
    b = tune_block(fresh_block(model), inputs, spec, iters=10, batch_size=2, gradient_accumulate_steps=2,
                   backend="torch", seed=3)
    c = tune_block(fresh_block(model), inputs, spec, iters=10, batch_size=4, backend="torch", seed=3)
    d = tune_block(fresh_block(model), inputs, spec, iters=10, batch_size=4, backend="torch", seed=4)
    assert a.losses == c.losses and a.losses != d.losses
    # two half-batch means add up to twice the full-batch mean
    assert b.losses[0] == pytest.approx(2 * a.losses[0], rel=1e-5)


def test_token_mask_keeps_padding_out_of_the_loss(ragged_block):
    """Masked tokens contribute nothing: changing the inputs at masked positions (after the
    valid ones, under a causal attention) leaves the losses unchanged."""
    model, inputs = ragged_block
    spec = {n: SPECS["nvfp4a16"] for n in LINEARS}
    mask = torch.ones(12, 24)
    mask[:, 16:] = 0
    perturbed = []
    for args, kwargs in inputs:
        h = args[0].clone()
        h[:, 16:] += torch.randn_like(h[:, 16:])
        perturbed.append(((h, *args[1:]), kwargs))
    a = tune_block(fresh_block(model), inputs, spec, iters=5, batch_size=4, token_mask=mask, backend="kernels")
    b = tune_block(fresh_block(model), perturbed, spec, iters=5, batch_size=4, token_mask=mask, backend="kernels")
    unmasked = tune_block(fresh_block(model), perturbed, spec, iters=5, batch_size=4, backend="kernels")
    assert a.losses == pytest.approx(b.losses, rel=1e-5)
    assert unmasked.losses[0] != pytest.approx(b.losses[0], rel=1e-3)


@pytest.mark.parametrize("bits", [2, 4])
def test_iters0_int_sym_scale_search_beats_plain_rtn(ragged_block, bits):
    model, inputs = ragged_block
    spec = QuantSpec("int", bits, 32, True, scale_dtype=torch.float32)
    block = fresh_block(model)
    orig = {n: block.get_submodule(n).weight.clone() for n in LINEARS}
    res = tune_block(block, inputs, {n: spec for n in LINEARS}, iters=0, batch_size=4, backend="torch")
    stats = imatrix(model.model.layers[0], inputs)
    for n in LINEARS:
        w = orig[n]
        groups = ops.int_num_groups(w.shape[1], 32)
        ones = torch.ones(w.shape[0], groups)
        rtn, _, _ = ops.fake_quant_int(w, torch.zeros(w.shape), ones, ones, bits, 32, True, torch.float32)
        err = lambda q: float(((q.float() - w.float()) ** 2 * stats[n]).sum())
        got = block.get_submodule(n).weight
        assert err(got) <= err(rtn) * (1 + 1e-6), n
        assert res.qparams[n]["scale"].shape == (w.shape[0], groups)


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("dtype,cols", [(torch.bfloat16, 128), (torch.float32, 96), (torch.bfloat16, 72)])
def test_opt_rtn_equals_auto_round(backend, dtype, cols):
    """iters=0 bit for bit against auto-round's opt_rtn_fast_nvfp4 and
    quant_tensor_opt_rtn_sym (the imatrix-weighted scale searches), ragged groups included."""
    from auto_round.data_type.int import quant_tensor_opt_rtn_sym
    from auto_round.data_type.nvfp import opt_rtn_fast_nvfp4

    from autoround_fast.engine import make_backend
    from autoround_fast.engine.linear import TunedLinear
    from autoround_fast.engine.rtn import opt_rtn_int_sym, opt_rtn_nvfp4

    torch.manual_seed(cols)
    lin = torch.nn.Linear(cols, 48, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    imat = torch.rand(cols) + 0.1
    gs = ops.nvfp4_global_scale(lin.weight) * 0.9  # a shared (smaller) global scale
    tl = TunedLinear(lin, QuantSpec("nvfp4"), make_backend(backend), gs, None)
    wq, scale = opt_rtn_nvfp4(tl, imat)
    ref, ref_scale, _ = opt_rtn_fast_nvfp4(lin.weight.data, global_scale=gs, imatrix=imat)
    assert torch.equal(wq, ref) and torch.equal(scale.reshape(-1), ref_scale.reshape(-1))
    for bits in (2, 4):
        tl = TunedLinear(lin, QuantSpec("int", bits, 32, True, scale_dtype=torch.float32), make_backend(backend), None, None)
        wq, scale = opt_rtn_int_sym(tl, imat)
        ref, ref_scale, _ = quant_tensor_opt_rtn_sym(lin.weight.data, bits=bits, group_size=32, imatrix=imat)
        assert torch.equal(wq, ref) and torch.equal(scale.reshape(-1), ref_scale.reshape(-1).float())


@pytest.mark.parametrize("backend", ["torch", "kernels"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype,cols", [(torch.bfloat16, 128), (torch.float32, 96), (torch.bfloat16, 72)])
def test_opt_rtn_mx_equals_auto_round(backend, bits, dtype, cols):
    """iters=0 under MX bit for bit against auto-round's quant_mx_opt_rtn (the imatrix-weighted
    choice of max_scale among 1, 0.5 and 2), ragged groups included, with groups where each
    groups moved off max_scale 1 (a weight spread over three decades)."""
    from auto_round.data_type.mxfp import quant_mx_opt_rtn

    from autoround_fast.engine import make_backend
    from autoround_fast.engine.linear import TunedLinear
    from autoround_fast.engine.rtn import opt_rtn_mx

    torch.manual_seed(cols + bits)
    lin = torch.nn.Linear(cols, 48, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, cols) * torch.logspace(-3, 0, cols))
    imat = torch.rand(cols) + 0.1
    tl = TunedLinear(lin, QuantSpec("mx", bits, 32, act=False), make_backend(backend), None, None)
    for weights in (None, imat):  # the engine's call (auto-round collects no imatrix for MX), and weighted
        wq, exponent = opt_rtn_mx(tl, weights)
        ref, ref_exp, _ = quant_mx_opt_rtn(lin.weight.data.clone(), bits=bits, group_size=32, imatrix=weights,
                                           data_type="mx_fp")  # (it writes into an fp32 input)
        assert torch.equal(wq, ref) and torch.equal(exponent.reshape(-1), ref_exp.reshape(-1).float())
    chosen = exponent.reshape(-1) - tl.backend.mx(lin.weight.data, torch.zeros_like(tl.v),
                                                  torch.ones_like(tl.max_scale), bits)[1].reshape(-1)
    assert len(set(chosen.tolist())) > 1, "the search should move some groups off max_scale 1"


def test_block_parameters_get_no_gradients_and_keep_their_flags(ragged_block):
    """Only V and the scales are tuned: the block's own weights (norms included) get no .grad,
    and their requires_grad flags are restored afterwards."""
    model, inputs = ragged_block
    block = fresh_block(model)
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    assert any(flags.values())
    tune_block(block, inputs, {n: SPECS["nvfp4a16"] for n in LINEARS}, iters=3, batch_size=4, backend="kernels")
    assert {n: p.requires_grad for n, p in block.named_parameters()} == flags
    assert all(p.grad is None for p in block.parameters())


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", ["nvfp4", "w4a16-asym-g32", "mxfp4"])
def test_cuda_graph_and_host_caches_change_nothing(ragged_block, name):
    """The captured-and-replayed loop and the host-cache path run the same kernels on the same
    data as the eager loop on device caches: identical losses, best iteration and weights,
    with a padding mask and gradient accumulation in play."""
    model, inputs = ragged_block
    spec = {n: SPECS[name] for n in LINEARS}
    mask = torch.ones(12, 24)
    mask[::3, 20:] = 0
    kw = dict(iters=12, batch_size=2, gradient_accumulate_steps=2, token_mask=mask, backend="cuda",
              device=torch.device("cuda"))
    runs = {}
    for label, extra in {"eager": dict(cuda_graph=False), "graph": dict(cuda_graph=True),
                         "graph+host": dict(cuda_graph=True, cache_device="cpu")}.items():
        block = fresh_block(model)
        runs[label] = _tuned_state(tune_block(block, inputs, spec, **kw, **extra), block, LINEARS)
    assert len(set(runs["eager"][0].losses)) > 1  # the loop moved
    for label in ("graph", "graph+host"):
        assert_same_run(runs[label], runs["eager"], LINEARS, label)
    assert runs["graph+host"][0].q_outputs.device.type == "cpu"
    for res, _ in runs.values():  # GPU time per iteration, per run of ten (12 iterations: 10 + 2)
        assert len(res.loop_ms) == 2 and all(ms > 0 for ms in res.loop_ms)


def assert_same_qparams(got, want, label):
    assert got.keys() == want.keys(), label
    for name in want:
        assert got[name].keys() == want[name].keys(), (label, name)
        for key, t in want[name].items():
            assert torch.equal(got[name][key].cpu(), t.cpu()), (label, name, key)


def _tuned_state(res, block, names):
    return res, {n: block.get_submodule(n).weight.detach().cpu() for n in names}


def assert_same_run(a, b, names, label):
    (ra, wa), (rb, wb) = a, b
    assert ra.losses == rb.losses, label
    assert (ra.best_iter, ra.best_loss) == (rb.best_iter, rb.best_loss), label
    assert all(torch.equal(wa[n], wb[n]) for n in names), label
    assert torch.equal(ra.q_outputs.cpu(), rb.q_outputs.cpu()), label
    assert_same_qparams(ra.qparams, rb.qparams, label)


class HostSyncing(torch.nn.Module):
    """A decoder block whose forward reads a value on the host, as MoE routing does (nonzero)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, **kwargs):
        self.peak = float(hidden_states.abs().max())  # a host sync
        return self.layer(hidden_states, **kwargs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_block_that_waits_for_the_host_runs_eagerly(ragged_block):
    """A CUDA graph cannot hold a forward that syncs with the host: such a block is tuned
    eagerly (and says so), exactly as with cuda_graph=False; a Llama block is captured."""
    model, inputs = ragged_block
    spec = {f"layer.{n}": SPECS["nvfp4"] for n in LINEARS}
    kw = dict(iters=6, batch_size=4, backend="cuda", device=torch.device("cuda"))
    runs = {}
    for label, extra in {"asked": {}, "eager": dict(cuda_graph=False)}.items():
        block = HostSyncing(fresh_block(model))
        res = tune_block(block, inputs, spec, **kw, **extra)
        runs[label] = (res, {n: block.get_submodule(n).weight.detach().cpu() for n in spec})
    assert "waits for the host" in runs["asked"][0].eager_reason
    assert runs["eager"][0].eager_reason == ""
    assert runs["asked"][0].losses == runs["eager"][0].losses
    assert all(torch.equal(runs["asked"][1][n], runs["eager"][1][n]) for n in spec)
    plain = tune_block(fresh_block(model), inputs, {n: SPECS["nvfp4"] for n in LINEARS}, **kw)
    assert plain.eager_reason == ""


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", ["nvfp4", "w4a16-g32", "mxfp4"])
def test_graphed_calibration_pass_changes_nothing(ragged_block, name):
    """iters=0: the act_max and imatrix pass, one sample at a time, replayed from a CUDA graph
    gives the statistics of the eager pass exactly (same qparams, act_max included)."""
    model, inputs = ragged_block
    spec = {n: SPECS[name] for n in LINEARS}
    runs = {}
    for graph in (False, True):
        block = fresh_block(model)
        res = tune_block(block, inputs, spec, iters=0, backend="cuda", device=torch.device("cuda"),
                         cuda_graph=graph)
        runs[graph] = (res, {n: block.get_submodule(n).weight.detach().cpu() for n in LINEARS})
    assert_same_qparams(runs[True][0].qparams, runs[False][0].qparams, name)
    assert all(torch.equal(runs[True][1][n], runs[False][1][n]) for n in LINEARS)
    assert torch.equal(runs[True][0].q_outputs.cpu(), runs[False][0].q_outputs.cpu())


def test_plain_causal_mask_is_dropped_for_sdpa(ragged_block):
    """A 4-D mask that is exactly causal (what a traced model passes) is replaced by SDPA's
    is_causal path; the losses agree with the mask-free run. A mask with padding stays."""
    from autoround_fast.engine.inputs import BlockInputs

    model, inputs = ragged_block
    L = inputs[0][0][0].shape[1]
    causal = torch.full((L, L), torch.finfo(torch.bfloat16).min, dtype=torch.bfloat16).triu(1)[None, None]
    masked = [(a, {**kw, "attention_mask": causal.clone()}) for a, kw in inputs]
    block = fresh_block(model)
    assert block.self_attn.config._attn_implementation == "sdpa"
    cached = BlockInputs(masked, torch.device("cpu"), torch.device("cpu"))
    assert cached.drop_causal_mask(block) and cached.kwargs["attention_mask"] is None
    padded = causal.clone()
    padded[..., -3:] = torch.finfo(torch.bfloat16).min
    for masks in ([padded] * len(inputs), [causal] * (len(inputs) - 1) + [padded]):  # shared, one differs
        cached = BlockInputs([(a, {**kw, "attention_mask": m}) for (a, kw), m in zip(inputs, masks)],
                         torch.device("cpu"), torch.device("cpu"))
        assert not cached.drop_causal_mask(block) and cached.kwargs["attention_mask"] is not None
    spec = {n: SPECS["nvfp4a16"] for n in LINEARS}
    a = tune_block(fresh_block(model), masked, spec, iters=5, batch_size=4, backend="kernels")
    b = tune_block(fresh_block(model), inputs, spec, iters=5, batch_size=4, backend="kernels")
    assert a.losses == pytest.approx(b.losses, rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_samples_are_the_cache_without_a_copy(device):
    """pack_samples moves GPU samples' hidden states into one tensor, and _Inputs takes that
    tensor as its cache without copying it; batches equal the samples' own. Host samples come
    back as they are, and parts that are not consecutive rows of one tensor are copied."""
    from autoround_fast.engine import pack_samples
    from autoround_fast.engine.inputs import BlockInputs, stack

    g = torch.Generator().manual_seed(0)
    pos = torch.arange(5)[None].to(device)
    samples = [((torch.randn(1, 5, 8, generator=g).to(device),), {"position_ids": pos}) for _ in range(6)]
    packed = pack_samples(samples)
    assert all(torch.equal(p[0][0], s[0][0]) for p, s in zip(packed, samples))
    if device == "cpu":
        assert all(p[0][0] is s[0][0] for p, s in zip(packed, samples))
    else:
        storage = packed[0][0][0].untyped_storage().data_ptr()
        assert all(p[0][0].untyped_storage().data_ptr() == storage for p in packed)
        cached = BlockInputs(packed, torch.device(device), torch.device(device))
        assert cached.hidden.untyped_storage().data_ptr() == storage
        idx = torch.tensor([4, 1, 2], device=device)
        assert torch.equal(cached.batch(idx)[0][0], torch.cat([samples[i][0][0] for i in idx.tolist()]))

    base = torch.randn(6, 5, 8, generator=g)
    if torch.cuda.is_available():  # a host cache of a GPU machine is pinned
        base = base.pin_memory()
    rows = [base[i: i + 1] for i in range(6)]
    whole = stack(rows, torch.device("cpu"))
    assert whole.data_ptr() == base.data_ptr() and torch.equal(whole, base)
    assert stack(rows[:3], torch.device("cpu")).data_ptr() == base.data_ptr()
    for parts in (rows[::-1], rows[::2], [base[:2], base[2:3].clone(), base[3:]]):
        stacked = stack(parts, torch.device("cpu"))
        assert stacked.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
        assert torch.equal(stacked, torch.cat(parts))


@pytest.mark.parametrize("device", DEVICES)
def test_rows_gathered_as_words_are_index_select(device):
    """_take_rows (the batch gather, as 8-byte words where rows allow) gives index_select's
    result for every dtype, row length and storage offset, including the fallbacks."""
    from autoround_fast.engine.inputs import take_rows

    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([3, 0, 3, 5], device=device)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool):
        for row in ((4, 8), (3, 5), (2, 6)):  # 64-, 30- and 24-element rows
            t = (torch.randn(6, *row, generator=g) * 100).to(dtype).to(device)
            for src in (t, t[:, :, 1:], torch.cat([t.reshape(-1), t.reshape(-1)[:1]])[1:].view(t.shape)):
                got = take_rows(src, idx)
                assert got.dtype == src.dtype and got.shape == (4, *src.shape[1:])
                assert torch.equal(got, src.index_select(0, idx)), (dtype, row)


def test_qkv_quantize_their_shared_input_once(ragged_block, monkeypatch):
    """W4A4: q, k and v quantize the same input under the same global scale; the first one
    computes it, the others reuse it (their input needs no gradient). gate/up, whose input
    does need one, keep their own. Losses, weights and qparams are bit for bit those of the
    run that quantizes for each Linear."""
    from autoround_fast import reference
    from autoround_fast.engine import block as block_module

    model, inputs = ragged_block
    spec = {n: SPECS["nvfp4"] for n in LINEARS}
    calls = []
    act = reference.fake_quant_nvfp4_activation
    monkeypatch.setattr(reference, "fake_quant_nvfp4_activation", lambda x, gs: calls.append(1) or act(x, gs))
    runs = {}
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(block_module, "share_input_quantization", lambda tuned: [])
        calls.clear()
        block = fresh_block(model)
        res = tune_block(block, inputs, spec, iters=4, batch_size=4, backend="torch")
        runs[shared] = (_tuned_state(res, block, LINEARS), len(calls))
    (a, ca), (b, cb) = runs[True], runs[False]
    assert len(set(a[0].losses)) > 1
    assert_same_run(a, b, LINEARS, "shared")
    assert cb - ca == 2 * 4  # two calls fewer per forward, one forward per iteration


def test_kwargs_equal_for_all_samples_are_kept_once(ragged_block):
    """A per-sample kwarg that is the same for every sample (mask, rotary tables, positions)
    is cached once and expanded to each batch; one that differs is stacked. Either way a
    batch's kwargs equal the samples' own kwargs stacked."""
    from autoround_fast.engine.inputs import BlockInputs

    _, inputs = ragged_block
    L = inputs[0][0][0].shape[1]
    causal = torch.full((L, L), -1e4, dtype=torch.bfloat16).triu(1)[None, None]
    odd = causal.clone()
    odd[..., -2:] = -1e4
    idx = torch.tensor([5, 0, 11, 3])
    for masks, expect in (([causal.clone() for _ in inputs], "expanded"),
                          ([causal.clone() for _ in inputs[:-1]] + [odd], "per_sample")):
        samples = [(a, {**kw, "attention_mask": m}) for (a, kw), m in zip(inputs, masks)]
        cached = BlockInputs(samples, torch.device("cpu"), torch.device("cpu"))
        assert "attention_mask" in getattr(cached, expect)
        assert {"position_embeddings", "position_ids"} <= cached.expanded
        (h, *_), kwargs = cached.batch(idx)
        assert torch.equal(h, torch.cat([samples[i][0][0] for i in idx]))
        for key in ("attention_mask", "position_ids"):
            assert torch.equal(kwargs[key], torch.cat([samples[i][1][key] for i in idx])), key
        for k, t in enumerate(kwargs["position_embeddings"]):
            assert torch.equal(t, torch.cat([samples[i][1]["position_embeddings"][k] for i in idx]))
        one = cached.batch(idx[:1])[1]
        one["attention_mask"].fill_(7)  # a block writing into its kwargs leaves the cache alone
        one["position_embeddings"][0].zero_()
        _, again = cached.batch(idx[:1])
        assert torch.equal(again["attention_mask"], samples[int(idx[0])][1]["attention_mask"])
        assert torch.equal(again["position_embeddings"][0], samples[int(idx[0])][1]["position_embeddings"][0])


def test_same_value_compares_bits():
    from autoround_fast.engine import same_value

    a = torch.randn(3, 40, dtype=torch.bfloat16)
    b = a.clone()
    assert same_value(a, b) and same_value((a, a[:, :7]), (b, b[:, :7]))  # words, then a strided view
    assert same_value(a.reshape(-1)[1:117], b.reshape(-1)[1:117])  # 232 bytes at an offset of 2
    b[2, 39] = b[2, 39] * 2 + 1
    assert not same_value(a, b) and not same_value(a.reshape(-1)[3:], b.reshape(-1)[3:])
    assert not same_value(a, a.float()) and not same_value(a, a[:2])
    assert not same_value(torch.zeros(8), -torch.zeros(8))  # equal values, different bits: stacked
    assert not same_value((a,), (a, a))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU: on a CPU the model's own attention runs")
def test_eager_attention_runs_as_sdpa_while_tuning(ragged_block):
    """On a GPU, a model left on eager attention is tuned through SDPA (seen from inside the
    loop) and handed back on eager; the losses agree with an SDPA model's."""
    model, inputs = ragged_block
    spec = {n: SPECS["nvfp4a16"] for n in LINEARS}
    block = fresh_block(model)
    block.self_attn.config = copy.deepcopy(block.self_attn.config)
    block.self_attn.config._attn_implementation = "eager"
    seen = []
    cuda = dict(backend="cuda", device=torch.device("cuda"))
    a = tune_block(block, inputs, spec, iters=4, batch_size=4, cuda_graph=False, **cuda,
                   progress=lambda it, loss: seen.append(block.self_attn.config._attn_implementation))
    assert seen == ["sdpa"] * 4 and block.self_attn.config._attn_implementation == "eager"
    b = tune_block(fresh_block(model), inputs, spec, iters=4, batch_size=4, cuda_graph=False, **cuda)
    assert a.losses == pytest.approx(b.losses, rel=1e-6)


def test_eager_attention_stays_eager_on_cpu(ragged_block):
    model, inputs = ragged_block
    block = fresh_block(model)
    block.self_attn.config = copy.deepcopy(block.self_attn.config)
    block.self_attn.config._attn_implementation = "eager"
    seen = []
    tune_block(block, inputs, {"mlp.down_proj": SPECS["nvfp4a16"]}, iters=2, batch_size=4, backend="kernels",
               progress=lambda it, loss: seen.append(block.self_attn.config._attn_implementation))
    assert seen == ["eager"] * 2


def test_linear_placement_balances_weight_size():
    """linear_devices: largest Linear first, each to the device with the fewest weight elements
    so far (Llama-3.1-8B's block: gate/up/down 58.7M, q/o 16.8M, k/v 4.2M)."""
    from autoround_fast.engine.placement import place_linears

    shapes = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
              "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}
    linears = {n: torch.nn.Linear(i, o, bias=False, device="meta") for n, (o, i) in shapes.items()}
    two = place_linears(linears, ["a", "b"])
    assert list(two) == list(shapes)  # in the block's order
    assert two == {"gate": "a", "up": "b", "down": "a", "q": "b", "o": "b", "k": "b", "v": "b"}
    load = lambda p, d: sum(linears[n].weight.numel() for n in p if p[n] == d)
    assert abs(load(two, "a") - load(two, "b")) < 0.2 * load(two, "a")
    four = place_linears(linears, ["a", "b", "c", "d"])
    assert {four[n] for n in ("gate", "up", "down")} == {"a", "b", "c"} and four["q"] == "d"
    assert set(place_linears(linears, ["a"]).values()) == {"a"}


def test_linear_devices_errors_and_one_device(ragged_block):
    model, inputs = ragged_block
    spec = {n: SPECS["nvfp4a16"] for n in LINEARS}
    with pytest.raises(ValueError, match="linear_devices holds 'gpu7', which is not a device"):
        tune_block(fresh_block(model), inputs, spec, iters=1, linear_devices=["cpu", "gpu7"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="linear_devices must be cpu devices.*got cuda:1"):
            tune_block(fresh_block(model), inputs, spec, iters=1, linear_devices=["cpu", "cuda:1"])
    # every Linear on the compute device: the same run as without linear_devices
    kw = dict(iters=6, batch_size=4, backend="kernels")
    a = tune_block(fresh_block(model), inputs, spec, **kw)
    b = tune_block(fresh_block(model), inputs, spec, **kw, linear_devices=["cpu", "cpu"])
    assert a.losses == b.losses and set(b.placement.values()) == {"cpu"} and not a.placement


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name,iters", [("nvfp4", 12), ("w4a16-asym-g32", 12), ("nvfp4", 0),
                                        ("w4a16-g32", 0)])
def test_linears_spread_over_two_gpus_change_nothing(ragged_block, name, iters):
    """linear_devices=[cuda:0, cuda:1]: the Linears are tuned on both cards (eagerly) and every
    loss, weight, qparam and output equals the one-card run (which replays a CUDA graph)."""
    model, inputs = ragged_block
    spec = {n: SPECS[name] for n in LINEARS}
    kw = dict(iters=iters, batch_size=4, backend="cuda", device=torch.device("cuda", 0))
    runs = {}
    for label, extra in {"one": {}, "two": dict(linear_devices=["cuda:0", "cuda:1"])}.items():
        block = fresh_block(model)
        runs[label] = _tuned_state(tune_block(block, inputs, spec, **kw, **extra), block, LINEARS)
        assert all(p.device == torch.device("cuda", 0) for p in block.parameters()), label
    (one, _), (two, _) = runs["one"], runs["two"]
    assert set(two.placement.values()) == {"cuda:0", "cuda:1"} and not one.placement
    if iters and fusion.available():  # both fuse the element-wise ops (the default on a GPU)
        assert one.fused["rms_norm"] and two.fused == one.fused
    if iters:
        assert "spread over several devices" in two.eager_reason and one.eager_reason == ""
        assert len(set(one.losses)) > 1
    assert_same_run(runs["two"], runs["one"], LINEARS, "two")
    assert all(t.device == torch.device("cuda", 0) for qp in two.qparams.values() for t in qp.values())


STEP_BACKENDS = ["kernels", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"))]
KERNEL_STEPPED = ("nvfp4", "int")  # the kinds whose weight backward has a stepping kernel


@pytest.mark.parametrize("name", ["nvfp4", "w4a16-asym-g32", "w8a16-perrow", "mxfp4", "fp8-channel"])
@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_step_in_backward_changes_nothing(ragged_block, name, backend):
    """The sign step taken inside the backward (the default with the kernels and one
    micro-batch: in each Linear's weight backward for NVFP4 and INT, as each gradient is
    accumulated for the first iteration and for MX and FP8) gives the run of the separate
    step: the same losses, best iteration, weights, outputs and qparams, with a padding mask
    in play."""
    model, inputs = ragged_block
    spec = {n: SPECS[name] for n in LINEARS}
    mask = torch.ones(12, 24)
    mask[::3, 20:] = 0
    kw = dict(iters=12, batch_size=4, token_mask=mask, backend=backend,
              device=torch.device("cuda") if backend == "cuda" else None)
    runs = {}
    for label, flag in (("separate", False), ("in backward", None)):
        block = fresh_block(model)
        runs[label] = _tuned_state(tune_block(block, inputs, spec, step_in_backward=flag, **kw), block, LINEARS)
    assert runs["separate"][0].step_in_backward == []
    kernel_steps = SPECS[name].kind in KERNEL_STEPPED
    assert runs["in backward"][0].step_in_backward == (sorted(LINEARS) if kernel_steps else [])
    assert len(set(runs["separate"][0].losses)) > 1  # the loop moved
    assert_same_run(runs["in backward"], runs["separate"], LINEARS, name)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_the_backward_holds_one_gradient_at_a_time(ragged_block, name, monkeypatch):
    """With the step in the backward, a tunable that no stepping kernel steps (every one in the
    first iteration; MX, which has no such kernel, in every one) is stepped as soon as its
    gradient is accumulated, which goes then: no separate step ever sees a second tunable's
    gradient alive. With the step after the backward, it sees them all."""
    from autoround_fast.engine import signround

    model, inputs = ragged_block
    spec = {n: SPECS[name] for n in LINEARS}
    loops, alive = [], []
    orig_init, orig_step = signround.SignRound.__init__, backends.KernelBackend.step
    monkeypatch.setattr(signround.SignRound, "__init__",
                        lambda self, *a, **k: orig_init(self, *a, **k) or loops.append(self))
    monkeypatch.setattr(backends.KernelBackend, "step", lambda self, p, *a: alive.append(
        sum(q.grad is not None for q in loops[-1].params)) or orig_step(self, p, *a))
    counts = {}
    for flag in (False, None):
        alive.clear()
        result = tune_block(fresh_block(model), inputs, spec, iters=4, batch_size=4, backend="kernels",
                            step_in_backward=flag)
        counts[flag] = (max(alive), len(alive), result.step_in_backward)
    n_params = len(loops[-1].params)
    assert counts[False] == (n_params, 4 * n_params, [])
    kernel_steps = SPECS[name].kind in KERNEL_STEPPED
    assert counts[None] == (1, n_params if kernel_steps else 4 * n_params, sorted(LINEARS) if kernel_steps else [])


class _Branches(torch.nn.Module):
    """A block whose Linear a runs three times per forward and whose Linear b's output is
    unused: a's gradient is a sum of backwards, and b's backward never runs (its matmul saves
    its weight, b's input needing a gradient, for a backward that never comes)."""

    def __init__(self, hidden=64):
        super().__init__()
        self.a = torch.nn.Linear(hidden, hidden, bias=False)
        self.b = torch.nn.Linear(hidden, hidden, bias=False)
        self.c = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states, **kwargs):
        self.b(self.a(hidden_states))
        return (self.c(torch.tanh(self.a(torch.tanh(self.a(hidden_states))))),)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_step_in_backward_only_where_one_backward_gives_the_gradient(backend):
    """Only Linears with one forward per iteration step in their backward (here b and c, not
    a); b's backward never runs, so it keeps the usual best copy. The run equals the
    separate step's."""
    torch.manual_seed(0)
    model = _Branches().to(torch.bfloat16)
    inputs = [((torch.randn(1, 16, 64, dtype=torch.bfloat16),), {}) for _ in range(8)]
    spec = {n: SPECS["nvfp4a16"] for n in "abc"}
    kw = dict(iters=8, batch_size=4, backend=backend, device=torch.device("cuda") if backend == "cuda" else None)
    runs = {}
    for label, flag in (("separate", False), ("in backward", None)):
        block = copy.deepcopy(model)
        runs[label] = _tuned_state(tune_block(block, inputs, spec, step_in_backward=flag, **kw), block, "abc")
    assert runs["in backward"][0].step_in_backward == ["b", "c"]
    assert_same_run(runs["in backward"], runs["separate"], "abc", "branches")


@pytest.mark.parametrize("name,backend,accumulate", [
    ("nvfp4", "kernels", 1), ("w4a16-asym-g32", "kernels", 2), ("mxfp4", "kernels", 1), ("fp8-block", "torch", 1),
    ("nvfp4", "torch", 2), pytest.param("nvfp4", "cuda", 1, marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")),
    pytest.param("w4a16-g32", "cuda", 1, marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU"))])
def test_weights_made_again_in_the_backward_change_nothing(ragged_block, name, backend, accumulate, monkeypatch):
    """remake_weights: no Linear holds its fake-quantized weight for the backward, which makes
    it again, once per micro-batch for each Linear whose matmul saves it (o, gate, up, down:
    q, k and v read an input that needs no gradient, and keep theirs until the iteration is
    scored: no fake quantization runs but the forwards' and these), and keeps the best weight
    there. The run of the weights held, bit for bit, with the step in the backward (one
    micro-batch), a separate step (two) and, on a GPU, the loop replayed from a CUDA graph."""
    model, inputs = ragged_block
    spec = {n: SPECS[name] for n in LINEARS}
    made, quantized = [], []
    orig_made, orig_qdq = TunedLinear._made_again, TunedLinear._qdq
    monkeypatch.setattr(TunedLinear, "_made_again", lambda self: made.append(1) or orig_made(self))
    monkeypatch.setattr(TunedLinear, "_qdq", lambda self, st: quantized.append(1) or orig_qdq(self, st))
    kw = dict(iters=6, batch_size=4, gradient_accumulate_steps=accumulate, backend=backend, lr=0.005,
              device=torch.device("cuda") if backend == "cuda" else None)
    runs, calls = {}, {}
    eager = 3 if backend == "cuda" else 6  # graphed: two warm-up iterations and the capture run Python
    for flag in (False, True):
        block = fresh_block(model)
        made.clear()
        quantized.clear()
        runs[flag] = _tuned_state(tune_block(block, inputs, spec, remake_weights=flag, **kw), block, LINEARS)
        assert len(made) == flag * eager * accumulate * 4
        calls[flag] = len(quantized)
    assert calls[True] == calls[False] + eager * accumulate * 4
    assert runs[True][0].step_in_backward == runs[False][0].step_in_backward
    steps = backend != "torch" and accumulate == 1 and SPECS[name].kind in KERNEL_STEPPED
    assert (runs[True][0].step_in_backward != []) == steps
    assert runs[True][0].best_iter > 0  # the weights kept are stepped ones
    assert_same_run(runs[True], runs[False], LINEARS, name)


@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_weights_made_again_where_a_backward_never_comes(backend):
    """Linear b's matmul saves its weight for a backward that never runs, so b's weight is
    never made again (its tunables get no gradient and stay where they are: its best weight
    is any iteration's), and a runs three times, one of them into b. The bookkeeping of the
    weights kept in the backward carries nothing over into later iterations: the run of the
    weights held, bit for bit."""
    torch.manual_seed(0)
    model = _Branches().to(torch.bfloat16)
    inputs = [((torch.randn(1, 16, 64, dtype=torch.bfloat16),), {}) for _ in range(8)]
    spec = {n: SPECS["nvfp4a16"] for n in "abc"}
    made = []
    orig = TunedLinear._made_again
    runs = {}
    for flag in (False, True):
        block = copy.deepcopy(model)
        names = {}
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TunedLinear, "_made_again", lambda self: made.append(names[id(self.linear)]) or orig(self))
            names.update({id(block.get_submodule(n)): n for n in "abc"})
            runs[flag] = _tuned_state(tune_block(block, inputs, spec, iters=8, batch_size=4, backend=backend,
                                                 lr=0.02, remake_weights=flag), block, "abc")
    assert sorted(set(made)) == ["a", "c"]
    assert runs[True][0].best_iter > 0
    assert_same_run(runs[True], runs[False], "abc", "branches")


def test_a_tuned_linear_whose_weight_is_made_again_holds_none(monkeypatch):
    """With on_remake set, the forward's fake-quantized weight is gone once the forward
    returns (held, it lives on in the autograd graph); the backward makes the same bits
    again, hands them to on_remake and gives the gradients of the weight held."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    made, runs = [], {}
    orig = TunedLinear._qdq

    def spy(self, st):
        out = orig(self, st)
        made.append((weakref.ref(out[0]), out[0].detach().clone()))
        return out

    monkeypatch.setattr(TunedLinear, "_qdq", spy)
    for remakes in (False, True):
        tl = TunedLinear(lin, SPECS["nvfp4a16"], backends.make_backend("kernels"), ops.nvfp4_global_scale(lin.weight),
                         None)
        with torch.no_grad():
            tl.v.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
        handed = []
        tl.on_remake = handed.append if remakes else None
        xi = x.clone().requires_grad_(True)
        made.clear()
        out = tl(xi)
        tl.wq_now = None  # what the loop lets go once it has scored the iteration
        assert len(made) == 1 and (made[0][0]() is None) == remakes
        out.float().square().sum().backward()
        runs[remakes] = (out, xi.grad, tl.v.grad, tl.max_scale.grad)
        assert len(made) == 1 + remakes and len(handed) == remakes
        if remakes:
            assert torch.equal(handed[0], made[0][1]) and torch.equal(made[1][1], made[0][1])
    for a, b in zip(runs[False], runs[True]):
        assert torch.equal(a, b)


def test_remake_weights_resolves_to_moe_blocks_on_one_device():
    """remake_weights by default: on where an MoE block's experts run grouped, off for a dense
    block; never under a process group or with the Linears spread, where asking for it is an
    error naming the option."""
    from autoround_fast.engine.options import _remakes_weights

    assert _remakes_weights(None, grouped_moe=True, fits=True)
    assert not _remakes_weights(None, grouped_moe=False, fits=True)
    assert not _remakes_weights(None, grouped_moe=True, fits=False)
    assert _remakes_weights(True, grouped_moe=False, fits=True) and not _remakes_weights(False, True, True)
    with pytest.raises(ValueError, match="remake_weights=True needs no process group"):
        _remakes_weights(True, grouped_moe=True, fits=False)


def test_step_in_backward_errors(ragged_block):
    model, inputs = ragged_block
    spec = {n: SPECS["nvfp4a16"] for n in LINEARS}
    for kw in (dict(backend="torch"), dict(backend="kernels", gradient_accumulate_steps=2)):
        with pytest.raises(ValueError, match="step_in_backward=True needs the kernels"):
            tune_block(fresh_block(model), inputs, spec, iters=2, batch_size=4, step_in_backward=True, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_calibration_pass_skips_the_last_matmul(ragged_block, device):
    """The act_max / imatrix pass computes down_proj's matmul for the first sample only (its
    output is unused): the statistics equal those of the pass with every matmul, and the
    module's own forward is back afterwards."""
    from autoround_fast.engine import calibration
    from autoround_fast.engine.inputs import BlockInputs

    model, inputs = ragged_block
    block = fresh_block(model).to(device)
    linears = {n: block.get_submodule(n) for n in LINEARS}
    ins = BlockInputs(inputs, torch.device(device), torch.device(device))
    calls = {n: 0 for n in LINEARS}
    counters = [m.register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls[n] + bool(o.any())))
                for n, m in linears.items()]  # outputs that are not all zeros: matmuls computed
    kw = dict(autocast=contextlib.nullcontext, hidden=ins.hidden, want_max=True, want_imatrix=True,
              cuda_graph=False)
    got = calibration.activation_stats(block, linears, ins, **kw)
    for h in counters:
        h.remove()
    assert calls["mlp.down_proj"] == 1 and calls["mlp.up_proj"] == 12
    assert "forward" not in linears["mlp.down_proj"].__dict__
    want = {}
    for n, m in linears.items():  # the same statistics from hooks on full forwards
        want[n] = [torch.zeros(()), torch.zeros(m.in_features)]

        def rec(_m, args, n=n):
            x = args[0].detach().float().cpu()
            want[n][0] = torch.maximum(want[n][0], x.abs().amax())
            want[n][1] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        counters.append(m.register_forward_pre_hook(rec))
    with torch.no_grad():
        for i in range(ins.n):
            args, kwargs = ins.batch(torch.tensor([i], device=device), ins.hidden)
            block(*args, **kwargs)
    for h in counters:
        h.remove()
    for n in LINEARS:
        assert torch.equal(got[n].max.cpu(), want[n][0]), n
        assert torch.allclose(got[n].imatrix.cpu(), want[n][1], rtol=1e-6, atol=0), n


def test_calibration_pass_puts_back_a_wrapped_forward(ragged_block):
    """A Linear whose instance forward is a wrapper (compressed-tensors' offload wrapper sets
    one) gets that wrapper back after the pass skipped its matmul, also when the pass raises."""
    from autoround_fast.engine import calibration
    from autoround_fast.engine.inputs import BlockInputs

    model, inputs = ragged_block
    block = fresh_block(model)
    down = block.mlp.down_proj

    def wrapper(x):
        return torch.nn.Linear.forward(down, x)

    down.forward = wrapper
    linears = {n: block.get_submodule(n) for n in LINEARS}
    ins = BlockInputs(inputs, torch.device("cpu"), torch.device("cpu"))
    calibration.activation_stats(block, linears, ins, contextlib.nullcontext, ins.hidden, True, False)
    assert down.__dict__["forward"] is wrapper
    with pytest.raises(RuntimeError, match="boom"):
        with calibration._skip_last_linear(linears, list(LINEARS)):
            assert down.__dict__["forward"] is not wrapper
            raise RuntimeError("boom")
    assert down.__dict__["forward"] is wrapper


@pytest.mark.parametrize("name,weighted", [("mxfp8a16", False), ("fp8-channel", False), ("w4a16-asym-g32", False),
                                           ("nvfp4a16", True), ("w4a16-g32", True)])
def test_iters0_collects_the_imatrix_only_where_the_search_weights_by_it(ragged_block, name, weighted, monkeypatch):
    from autoround_fast.engine import block as block_module

    model, inputs = ragged_block
    seen = []
    real = block_module.activation_stats
    monkeypatch.setattr(block_module, "activation_stats",
                        lambda *a, **kw: seen.append(kw["want_imatrix"]) or real(*a, **kw))
    tune_block(fresh_block(model), inputs, {n: SPECS[name] for n in LINEARS}, iters=0)
    assert seen == [weighted]
