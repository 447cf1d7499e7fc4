"""The ops against auto-round 0.15.1 (forward bit for bit, gradients within stated bounds),
against the plain-PyTorch oracles, and through opcheck / torch.compile."""

import math
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

import oracle
from autoround_fast import ops, reference
from conftest import HAS_CUDA

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(64, 128), (33, 70), (7, 3), (16, 1040), (3, 17)]


def rand_params(rows, cols, groups, gen, lo=0.5):
    v = (torch.rand(rows, cols, generator=gen) - 0.5) * 0.8  # V drifts within +-0.5 in tuning
    ms = torch.rand(rows, groups, generator=gen) * (1 - lo) + lo
    return v, ms


def seed_of(*parts) -> int:
    """A generator seed from a test's parameters, the same in every process (hash() of a str
    is not: Python salts it per process)."""
    return zlib.crc32(repr(parts).encode())


def to(device, *ts):
    return [t.to(device) for t in ts]


def same_bits(a, b):
    """torch.equal on the bit patterns (on the CPU): tells -0 from +0, as torch.equal does not."""
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.cpu().view(as_int), b.cpu().view(as_int))


def assert_grad_close(ours, theirs, rtol, what):
    """Per element |a - b| <= rtol * |b| + rtol * max|b| * 1e-2 (near-cancelling sums)."""
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    tol = rtol * theirs.abs() + rtol * 1e-2 * theirs.abs().max()
    bad = (ours - theirs).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst {((ours - theirs).abs() - tol).max():.3e}"


# --------------------------------------------------------------------------------------
# NVFP4 weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_forward_equals_auto_round(device, dtype, shape):
    gen = torch.Generator().manual_seed(seed_of(shape, str(dtype)))
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    v, ms = rand_params(rows, cols, math.ceil(cols / 16), gen)
    gs = ops.nvfp4_global_scale(w)
    want_q, want_s = oracle.nvfp4(w, v, ms, gs)
    q, s = ops.fake_quant_nvfp4(*to(device, w, v, ms, gs))
    assert q.dtype == dtype and s.dtype == torch.float32 and s.shape == (rows, math.ceil(cols / 16))
    assert torch.equal(q.cpu(), want_q)
    assert torch.equal(s.cpu(), want_s)


def nvfp4_edge_weight(dtype):
    """A weight whose groups cover the edge cases: all-zero groups, scattered zeros, values on
    FP4 rounding midpoints, tiny and huge groups beside each other, a ragged last group."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(12, 72, generator=gen)
    w[0, :16] = 0                               # all-zero group
    w[1, ::3] = 0                               # scattered zeros
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    w[2, :16] = torch.cat([mids, -mids])        # exact midpoints when os == 1 (see test)
    w[3, :16] *= 1e-4                           # tiny beside normal groups: scale underflows
    w[4] *= 1e3 if dtype != torch.float16 else 50
    w[5, 64:] = torch.tensor([6.0, -6.0, 1e-3, 0, 0, 0, 0, 3.0])  # ragged last group
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_edges_equal_auto_round(device, dtype):
    w = nvfp4_edge_weight(dtype)
    gen = torch.Generator().manual_seed(3)
    v, ms = rand_params(*w.shape, math.ceil(w.shape[1] / 16), gen, lo=0.0)
    v[2] = 0
    ms[2] = 1
    for gs in [ops.nvfp4_global_scale(w), torch.tensor(1.0), torch.tensor(1e4), torch.tensor(0.0)]:
        want_q, want_s = oracle.nvfp4(w, v, ms, gs)
        q, s = ops.fake_quant_nvfp4(*to(device, w, v, ms, gs))
        assert torch.equal(q.cpu(), want_q), f"gs={gs}"
        assert torch.equal(s.cpu(), want_s), f"gs={gs}"


def test_nvfp4_midpoints_round_to_even():
    # With gs = 1 and a group maximum of 6, s = 1 and os = 1: y = W exactly.
    mids = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2])
    q, s = ops.fake_quant_nvfp4(mids, torch.zeros_like(mids), torch.ones(1, 1), torch.tensor(1.0))
    assert s.item() == 1.0
    assert q[0, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def _unit_scale_groups(vals):
    """Groups of 16 whose first element is 6.0 and the rest are vals (padded with zeros): with
    global scale 1 and max_scale 1, every group's scale is 1 and y = x * os + v = x + v."""
    vals = torch.cat([vals, vals.new_zeros(-len(vals) % 15)]).reshape(-1, 15)
    return torch.cat([vals.new_full((len(vals), 1), 6.0), vals], 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_rounds_every_value_as_auto_round(device, dtype):
    """The FP4 rounding over a dense sweep of y: every bf16 value in [-6, 6] (subnormals and
    both zeros included) as the weight with V = 0, and fp32 values of V in [-7, 7] with a
    zero weight (y between those values, and beyond the +-6 clamp); -0 + -0 = -0 must give
    +0, as torch.sign(-0) = 0 does. Weights, and the activation op on the bf16 values."""
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    every = every[every.abs() <= 6]
    w1 = _unit_scale_groups(every)
    gen = torch.Generator().manual_seed(11)
    w2 = _unit_scale_groups(torch.zeros(150000))
    w2[:, 1:8] = -0.0
    v2 = (torch.rand(w2.shape, generator=gen) - 0.5) * 14
    v2[:, 0] = 0
    v2[:, 4:8] = -0.0
    w = torch.cat([w1, w2]).to(dtype)
    v = torch.cat([torch.zeros_like(w1), v2])
    ms, gs = torch.ones(len(w), 1), torch.tensor(1.0)
    want_q, want_s = oracle.nvfp4(w, v, ms, gs)
    assert bool((want_s == 1).all())
    q, s = ops.fake_quant_nvfp4(*to(device, w, v, ms, gs))
    assert same_bits(q, want_q)
    # activations: act_max 2688 gives the global scale 448 * 6 / 2688 = 1
    x = w1.to(dtype)
    want_y = oracle.nvfp4_activation(x, torch.tensor(2688.0))
    y = ops.fake_quant_nvfp4_activation(x.to(device), ops.nvfp4_global_scale(torch.tensor(2688.0)).to(device))
    assert same_bits(y, want_y)


def test_nvfp4_scale_clamps_at_448():
    w = torch.full((1, 16), 3.0)
    _, s = ops.fake_quant_nvfp4(w, torch.zeros_like(w), torch.ones(1, 1), torch.tensor(1e4))
    assert s.item() == 448.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (7, 3)])
def test_nvfp4_gradients_match_auto_round(device, dtype, shape):
    """dV is bit-exact (one rounded product per element). d max_scale sums 16 products in
    fp32; PyTorch's vectorised reduction adds them in another order, so it agrees to a few
    fp32 ulps of the summands: rtol 1e-4."""
    gen = torch.Generator().manual_seed(11)
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    v, ms = rand_params(rows, cols, math.ceil(cols / 16), gen)
    gs = ops.nvfp4_global_scale(w)
    g = torch.randn(rows, cols, generator=gen).to(dtype)
    _, _, want_gv, want_gms = oracle.nvfp4(w, v, ms, gs, grad_out=g)
    vd, msd = [t.clone().requires_grad_() for t in to(device, v, ms)]
    q, _ = ops.fake_quant_nvfp4(w.to(device), vd, msd, gs.to(device))
    (q.float() * g.to(device).float()).sum().backward()
    assert torch.equal(vd.grad.cpu(), want_gv)
    assert_grad_close(msd.grad, want_gms, 1e-4, "max_scale grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [64, 70])  # the vector (staged backward) and the ragged paths
def test_nvfp4_with_a_global_scale_per_row_equals_each_slice_alone(device, dtype, cols):
    """global_scale with one element per row (an MoE projection's experts stacked by rows):
    the fake-quantized weight, the scales, the gradients and the backward's step bit for bit as
    each expert's rows quantized alone under its scalar scale; on the CPU also the oracle. A
    count that is neither 1 nor the rows is refused, by the wrapper and by the raw op."""
    gen = torch.Generator().manual_seed(seed_of(cols, str(dtype)))
    sizes = [3, 5, 1, 4]  # the rows of each "expert"
    rows = sum(sizes)
    w = (torch.randn(rows, cols, generator=gen) * torch.tensor([0.5, 4.0, 1.0, 20.0]).repeat_interleave(
        torch.tensor(sizes))[:, None]).to(dtype)
    v, ms = rand_params(rows, cols, math.ceil(cols / 16), gen)
    grad = torch.randn(rows, cols, generator=gen).to(dtype)
    scales = [ops.nvfp4_global_scale(part).reshape(1) for part in w.split(sizes)]
    per_row = torch.cat([sc.expand(n) for sc, n in zip(scales, sizes)])
    w, v, ms, grad, per_row = to(device, w, v, ms, grad, per_row)
    scales = to(device, *scales)

    def run(wi, vi, msi, gs, g):
        vi, msi = vi.clone().requires_grad_(), msi.clone().requires_grad_()
        q, s = ops.fake_quant_nvfp4(wi, vi, msi, gs)
        q.backward(g)
        return q.detach(), s, vi.grad, msi.grad

    whole = run(w, v, ms, per_row, grad)
    parts = [run(*t, sc, g) for t, sc, g in zip(zip(w.split(sizes), v.split(sizes), ms.split(sizes)), scales,
                                                 grad.split(sizes))]
    for k, name in enumerate(("q", "scale", "grad v", "grad max_scale")):
        assert same_bits(whole[k], torch.cat([p[k] for p in parts])), name
    if device == "cpu":
        want_q, want_s = reference.fake_quant_nvfp4(w, v, ms, per_row)
        assert same_bits(whole[0], want_q) and same_bits(whole[1], want_s)
    lr, imp = torch.tensor([0.01], device=device), torch.tensor([True], device=device)
    o = torch.ops.autoround_fast
    stepped = [t.clone() for t in (v, ms, torch.zeros_like(ms))]
    o.fake_quant_nvfp4_backward_step_(grad, w, *stepped[:2], per_row, stepped[2], imp, lr)
    alone = [[t.clone() for t in (vi, msi, torch.zeros_like(msi))] for vi, msi in zip(v.split(sizes), ms.split(sizes))]
    for (vi, msi, bi), wi, gi, sc in zip(alone, w.split(sizes), grad.split(sizes), scales):
        o.fake_quant_nvfp4_backward_step_(gi, wi, vi, msi, sc, bi, imp, lr)
    for k, name in enumerate(("v", "max_scale", "best_max_scale")):
        assert same_bits(stepped[k], torch.cat([a[k] for a in alone])), f"stepped {name}"
    # zero rows under a scale per row of zero elements: empty results, no element read
    q0, s0 = ops.fake_quant_nvfp4(w[:0], v[:0], ms[:0], per_row[:0])
    assert q0.shape == (0, cols) and s0.shape == (0, math.ceil(cols / 16))
    assert ops.fake_quant_nvfp4_activation(w[:0], per_row[:0]).shape == (0, cols)
    with pytest.raises(ValueError, match=rf"global_scale must have 1 or {rows} \(one per row\) elements, got 2"):
        ops.fake_quant_nvfp4(w, v, ms, per_row[:2])
    with pytest.raises(RuntimeError, match=rf"global_scale must have 1 or {rows} \(one per row\) elements, got 2"):
        o.fake_quant_nvfp4(w, v, ms, per_row[:2])


def test_nvfp4_zero_scale_groups_get_zero_gradient(device):
    """Groups whose scale is 0 (all-zero, or underflowing e4m3) get NaN from auto-round's
    autograd (0 * inf in the reciprocal's backward); ours gives 0 there, the same elsewhere."""
    w = nvfp4_edge_weight(torch.float32)
    gen = torch.Generator().manual_seed(5)
    v, ms = rand_params(*w.shape, 5, gen)
    gs = ops.nvfp4_global_scale(w)
    g = torch.randn(w.shape, generator=gen)
    _, want_s, want_gv, want_gms = oracle.nvfp4(w, v, ms, gs, grad_out=g)
    vd, msd = [t.clone().requires_grad_() for t in to(device, v, ms)]
    q, s = ops.fake_quant_nvfp4(w.to(device), vd, msd, gs.to(device))
    (q * g.to(device)).sum().backward()
    zero = want_s == 0
    assert zero.any() and torch.isnan(want_gms[zero]).all()
    assert (msd.grad.cpu()[zero] == 0).all()
    assert torch.isfinite(msd.grad).all()
    assert_grad_close(msd.grad.cpu()[~zero], want_gms[~zero], 1e-4, "max_scale grad")
    assert torch.equal(vd.grad.cpu(), want_gv)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nvfp4_rejects_non_finite_weight(device, bad):
    w = torch.randn(4, 32)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="fake_quant_nvfp4: weight has non-finite"):
        ops.fake_quant_nvfp4(*to(device, w, torch.zeros(4, 32), torch.ones(4, 2), torch.tensor(1.0)))


def test_nvfp4_bad_arguments_name_the_tensor():
    w = torch.randn(4, 32)
    with pytest.raises(ValueError, match="fake_quant_nvfp4: max_scale must have 8 elements"):
        ops.fake_quant_nvfp4(w, torch.zeros(4, 32), torch.ones(4, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="v must be float32"):
        ops.fake_quant_nvfp4(w, torch.zeros(4, 32, dtype=torch.bfloat16), torch.ones(4, 2), torch.tensor(1.0))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.fake_quant_nvfp4(w.reshape(-1), torch.zeros(128), torch.ones(8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="weight must be float32, bfloat16 or float16"):
        ops.fake_quant_nvfp4(w.double(), torch.zeros(4, 32), torch.ones(4, 2), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"global_scale must have 1 or 4 \(one per row\) elements, got 2"):
        ops.fake_quant_nvfp4(w, torch.zeros(4, 32), torch.ones(4, 2), torch.ones(2))
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="fake_quant_nvfp4_activation: x has non-finite"):
        ops.fake_quant_nvfp4_activation(x / 0, torch.tensor(1.0))


def test_global_scales_match_auto_round():
    from auto_round.data_type.nvfp import calculate_gparam

    ws = [torch.randn(8, 32, dtype=torch.bfloat16) * s for s in (1.0, 3.0, 0.5)]
    for w in ws:
        assert torch.equal(ops.nvfp4_global_scale(w), calculate_gparam(w))
    assert torch.equal(ops.shared_nvfp4_global_scale(ws), calculate_gparam(ws[1]))
    assert ops.nvfp4_global_scale(torch.zeros(4, 16)).item() == 0.0


# --------------------------------------------------------------------------------------
# NVFP4 activations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 9, 64), (3, 70), (5, 8)])
def test_nvfp4_activation_equals_auto_round(device, dtype, shape):
    """Forward bit-exact. The gradient is bit-exact except on each group's argmax, which also
    receives the path through max|x|: a 16-term fp32 sum in another order, then rounded to the
    dtype, so it may differ by a few fp32 ulps (fp32) or one ulp of the dtype (rare)."""
    gen = torch.Generator().manual_seed(13)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    g = torch.randn(shape, generator=gen).to(dtype)
    act_max = x.float().abs().max()
    want_y, want_gx = oracle.nvfp4_activation(x, act_max, grad_out=g)
    gs = ops.nvfp4_global_scale(act_max)
    xd = x.to(device).requires_grad_()
    y = ops.fake_quant_nvfp4_activation(xd, gs.to(device))
    (y.float() * g.to(device).float()).sum().backward()
    assert torch.equal(y.detach().cpu(), want_y)
    got = xd.grad.cpu()
    differ = got != want_gx
    groups = math.ceil(shape[-1] / 16) * x.numel() // shape[-1]
    assert int(differ.sum()) <= groups
    eps = 1e-4 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert_grad_close(got, want_gx, eps, "activation grad")


def _silu_gate_inputs(shape, dtype, gen):
    """gate and up as a Llama MLP's: gate with the edges of silu (large negative values, where
    exp(-x) overflows and silu is -0; large positive ones; zeros), and up with zeros."""
    gate = torch.randn(shape, generator=gen) * 3
    up = torch.randn(shape, generator=gen)
    flat_g, flat_u = gate.view(-1), up.view(-1)
    flat_g[::37] = -100.0
    flat_g[5::41] = 90.0
    flat_g[7::43] = 0.0
    flat_u[11::47] = 0.0
    return gate.to(dtype), up.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 9, 64), (3, 70), (5, 8), (4, 1040)])
def test_silu_mul_activation_equals_the_composition(device, dtype, shape):
    """The fused op against its definition run eagerly on the same device: PyTorch's silu and
    multiply, then our activation op (itself bit for bit auto-round's, above). Forward and
    both gradients bit for bit: the CUDA kernel computes silu and its gradient with PyTorch's
    formulas and roundings (silu_act_cuda.cu), the CPU op is the composition. On the CPU also
    the oracle (reference.py), forward bit for bit."""
    gen = torch.Generator().manual_seed(17)
    gate, up = _silu_gate_inputs(shape, dtype, gen)
    grad = torch.randn(shape, generator=gen).to(dtype)
    gate, up, grad = to(device, gate, up, grad)
    gs = ops.nvfp4_global_scale((torch.nn.functional.silu(gate) * up).abs().amax().float())

    def run(fn):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        y = fn(g, u)
        y.backward(grad)
        return y.detach(), g.grad, u.grad

    fused = run(lambda g, u: ops.silu_mul_nvfp4_activation(g, u, gs))
    eager = run(lambda g, u: ops.fake_quant_nvfp4_activation(torch.nn.functional.silu(g) * u, gs))
    for name, a, b in zip(("output", "grad gate", "grad up"), fused, eager):
        assert a.dtype == dtype and a.shape == gate.shape
        assert torch.equal(a, b), f"{name}: {int((a != b).sum())} of {a.numel()} differ"
    assert fused[1].abs().sum() > 0 and fused[2].abs().sum() > 0
    if device == "cpu":
        assert torch.equal(fused[0], reference.silu_mul_nvfp4_activation(gate, up, gs))


def test_silu_mul_activation_bad_arguments_name_the_tensor(device):
    gate = torch.randn(4, 32, device=device, dtype=torch.bfloat16)
    gs = torch.ones((), device=device)
    with pytest.raises(ValueError, match=r"silu_mul_nvfp4_activation: up must match gate \(\(4, 32\), "
                                         r"torch.bfloat16.*got \(\(4, 16\)"):
        ops.silu_mul_nvfp4_activation(gate, gate[:, :16], gs)
    with pytest.raises(ValueError, match=r"silu_mul_nvfp4_activation: up must match gate .*got \(\(4, 32\), "
                                         r"torch.float32"):
        ops.silu_mul_nvfp4_activation(gate, gate.float(), gs)
    with pytest.raises(ValueError, match="silu_mul_nvfp4_activation: global_scale must have 1 elements"):
        ops.silu_mul_nvfp4_activation(gate, gate, torch.ones(2, device=device))
    bad = gate.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="silu_mul_nvfp4_activation: up has non-finite values"):
        ops.silu_mul_nvfp4_activation(gate, bad, gs)
    if device == "cuda":  # the raw op's own checks, past the Python wrapper
        with pytest.raises(RuntimeError, match="silu_mul_nvfp4_activation: up must have gate's shape"):
            torch.ops.autoround_fast.silu_mul_nvfp4_activation(gate, gate.t().contiguous(), gs.reshape(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [64, 70])
def test_nvfp4_activation_with_a_scale_per_row_equals_each_slice_alone(device, dtype, cols):
    """global_scale with one element per row (the sorted rows of MoE experts): the output and
    the gradient bit for bit as each expert's slice quantized alone under its scalar scale, an
    empty slice included; on the CPU also the oracle. A count that is neither 1 nor the rows is
    refused."""
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 0, 5, 1]  # the rows of each "expert"
    x = (torch.randn(sum(sizes), cols, generator=gen) * 4).to(dtype)
    grad = torch.randn(sum(sizes), cols, generator=gen).to(dtype)
    scales = [ops.nvfp4_global_scale(torch.tensor(a)) for a in (3.0, 9.0, 0.5, 20.0)]
    x, grad = to(device, x, grad)
    per_row = torch.cat([s.reshape(1).expand(n) for s, n in zip(scales, sizes)]).to(device)

    def run(inp, gs, g):
        xi = inp.clone().requires_grad_()
        y = ops.fake_quant_nvfp4_activation(xi, gs)
        y.backward(g)
        return y.detach(), xi.grad

    y, gx = run(x, per_row, grad)
    parts = [run(chunk, s.to(device), g) for s, chunk, g in zip(scales, x.split(sizes), grad.split(sizes))]
    assert same_bits(y, torch.cat([p[0] for p in parts]))
    assert same_bits(gx, torch.cat([p[1] for p in parts]))
    if device == "cpu":
        assert same_bits(y, reference.fake_quant_nvfp4_activation(x, per_row))
    one = scales[0].to(device)  # an expanded (stride 0) scale per row is the scalar's
    assert same_bits(ops.fake_quant_nvfp4_activation(x, one.reshape(1).expand(9)), ops.fake_quant_nvfp4_activation(x, one))
    with pytest.raises(ValueError, match=r"global_scale must have 1 or 9 \(one per row\) elements, got 2"):
        ops.fake_quant_nvfp4_activation(x, per_row[:2])


def _activation_ops(device):
    """Each activation op beside its oracle: (name, ours, reference), both of x and max_scale."""
    gs, act_max = torch.ones(1, device=device), torch.full((1,), 3.0, device=device)
    return [
        ("nvfp4", lambda x, ms: ops.fake_quant_nvfp4_activation(x, gs),
         lambda x, ms: reference.fake_quant_nvfp4_activation(x, gs)),
        ("silu_mul", lambda x, ms: ops.silu_mul_nvfp4_activation(x, x * 2, gs),
         lambda x, ms: reference.silu_mul_nvfp4_activation(x, x * 2, gs)),
        ("mxfp4", lambda x, ms: ops.fake_quant_mx_activation(x, 4),
         lambda x, ms: reference.fake_quant_mx_activation(x, 4)),
        ("mxfp8", lambda x, ms: ops.fake_quant_mx_activation(x, 8),
         lambda x, ms: reference.fake_quant_mx_activation(x, 8)),
        ("fp8", lambda x, ms: ops.fake_quant_fp8_activation(x, act_max, ms, torch.float32),
         lambda x, ms: reference.fake_quant_fp8_activation(x, act_max, ms, torch.float32)),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_of_no_tokens_is_empty_with_zero_scale_gradient(device, dtype):
    """An activation with zero rows (an MoE expert the batch routes no token to) quantizes to
    an empty tensor of its shape, its backward to an empty gradient, and FP8's max_scale
    gradient to the oracle's (zero); a zero-width last dimension is still refused."""
    for name, ours, oracle_fn in _activation_ops(device):
        results = []
        for fn in (ours, oracle_fn):
            x = torch.empty(0, 3, 64, device=device, dtype=dtype, requires_grad=True)
            ms = torch.ones(1, device=device, requires_grad=True)
            y = fn(x, ms)
            y.float().sum().backward()
            results.append((y, x.grad, ms.grad))
        (y, gx, gms), (ref_y, _, ref_gms) = results
        assert y.shape == ref_y.shape == (0, 3, 64) and y.dtype == dtype, name
        assert gx is not None and gx.shape == (0, 3, 64), name
        if name == "fp8":
            assert torch.equal(gms, ref_gms) and gms.item() == 0.0, (gms, ref_gms)
        with pytest.raises(ValueError, match="x must have a non-empty last dimension|gate must have a non-empty"):
            ours(torch.empty(4, 0, device=device, dtype=dtype), torch.ones(1, device=device))


# --------------------------------------------------------------------------------------
# INT weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int_forward_equals_auto_round(device, sym, bits, group_size, dtype):
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    for rows, cols in [(24, 256), (9, 200), (5, 20)]:
        w = torch.randn(rows, cols, generator=gen).to(dtype)
        w[0] = 0  # all-zero row: the scale floors at 1e-5
        groups = ops.int_num_groups(cols, group_size)
        v, mn = rand_params(rows, cols, groups, gen)
        mx = torch.rand(rows, groups, generator=gen) * 0.5 + 0.5
        want_q, want_s, want_zp = oracle.int_quant(w, v, mn, mx, bits, group_size, sym)
        q, s, zp = ops.fake_quant_int(*to(device, w, v, mn, mx), bits, group_size, sym)
        assert torch.equal(q.cpu(), want_q), (rows, cols)
        assert s.dtype == torch.float16 and torch.equal(s.cpu(), want_s)
        if not sym:
            assert torch.equal(zp.cpu(), want_zp)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int_gradients_match_auto_round(device, sym, group_size, dtype):
    """dV is bit-exact. The scale's gradient is rounded to fp16 (the scale's dtype) and summed
    over the group in fp32 in another order than PyTorch's reduction, so it can land one fp16
    ulp away (2^-10 relative), and once more when contributions are added in fp16: rtol 2e-3."""
    gen = torch.Generator().manual_seed(17)
    for rows, cols in [(32, 256), (9, 200)]:
        w = torch.randn(rows, cols, generator=gen).to(dtype)
        groups = ops.int_num_groups(cols, group_size)
        v, mn = rand_params(rows, cols, groups, gen)
        mx = torch.rand(rows, groups, generator=gen) * 0.5 + 0.5
        g = torch.randn(rows, cols, generator=gen).to(dtype)
        *_, want_gv, want_gmn, want_gmx = oracle.int_quant(w, v, mn, mx, 4, group_size, sym, grad_out=g)
        vd, mnd, mxd = [t.clone().requires_grad_() for t in to(device, v, mn, mx)]
        q, _, _ = ops.fake_quant_int(w.to(device), vd, mnd, mxd, 4, group_size, sym)
        (q.float() * g.to(device).float()).sum().backward()
        assert torch.equal(vd.grad.cpu(), want_gv)
        assert_grad_close(mnd.grad, want_gmn, 2e-3, "min_scale grad")
        assert_grad_close(mxd.grad, want_gmx, 2e-3, "max_scale grad")


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,cols", [(128, 256), (32, 256), (128, 200)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int_division_paths_equal_auto_round(device, sym, group_size, cols, dtype):
    """W / s takes the fast division (the group's reciprocal, int_divide) where the group and
    the lane's elements are in its domain, IEEE division elsewhere: both give the same bits.
    Rows that take each path: plain weights (fast), zeros and -0 in some lanes and tiny
    weights (2^-70) in others (those lanes fall back), magnitudes whose quotient leaves the
    backward's second division out of the domain (first fast, second not), and groups whose
    quotient exceeds 2^40 (the whole group falls back; not in fp16, whose quotient is fp16).
    Forward (signed zeros included) and dV bit for bit against auto-round; on the GPU every
    output and gradient bit for bit against the CPU kernel."""
    gen = torch.Generator().manual_seed(29 + cols + group_size)
    rows = 6
    w = torch.randn(rows, cols, generator=gen)
    w[1, ::37] = 0.0
    w[1, 5::41] = -0.0
    w[2, 3::29] = 2.0**-70  # fp16 flushes it to 0: a zero lane there
    if dtype == torch.float16:  # fp16 / fp16 quotients stay below 65504 (auto-round's overflow is NaN)
        w[3:5] *= 0.1
    else:
        w[3] *= 1000.0
        w[4] *= 2.0**35
    w = w.to(dtype)
    groups = ops.int_num_groups(cols, group_size)
    v, mn = rand_params(rows, cols, groups, gen)
    mx = torch.rand(rows, groups, generator=gen) * 0.5 + 0.5
    v[1, ::37] = -0.0  # -0 / s + -0 keeps the quotient's sign: the zero select matters
    mn[3:5], mx[3:5] = 0.0, 0.0  # the scale floors at 1e-5: quotients of 1e8 and beyond 2^40
    g = torch.randn(rows, cols, generator=gen).to(dtype)
    want_q, want_s, want_zp, want_gv, want_gmn, want_gmx = oracle.int_quant(
        w, v, mn, mx, 4, group_size, sym, grad_out=g)

    def run(dev):
        vd, mnd, mxd = [t.clone().requires_grad_() for t in to(dev, v, mn, mx)]
        q, sc, zp = ops.fake_quant_int(w.to(dev), vd, mnd, mxd, 4, group_size, sym)
        (q.float() * g.to(dev).float()).sum().backward()
        return [t.detach().cpu() for t in (q, sc, zp, vd.grad, mnd.grad, mxd.grad)]

    got = run(device)
    assert torch.equal(got[0], want_q) and torch.equal(got[1], want_s)
    assert same_bits(got[0], want_q), "signed zeros"
    if not sym:
        assert torch.equal(got[2], want_zp)
    assert torch.equal(got[3], want_gv)
    assert_grad_close(got[4], want_gmn, 2e-3, "min_scale grad")
    assert_grad_close(got[5], want_gmx, 2e-3, "max_scale grad")
    if device == "cuda":
        for a, b in zip(got, run("cpu")):
            assert same_bits(a, b)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,cols", [(8, 64), (128, 256), (64, 200), (-1, 96)])
def test_int_signed_zero_extremes(device, sym, group_size, cols):
    """Groups whose min(W, 0) or max(W, 0) is a zero reached through both signed zeros: every
    kernel takes it as +0 (int_quant.h, group_extreme), whatever order it meets the zeros in.
    Rows: weights >= 0 with -0 and +0 among them, weights <= 0 with both zeros, all zeros of
    mixed sign, all -0. Forward equal to auto-round (its zero point's sign aside, which follows
    its min's), dV bit for bit; every output and gradient bit for bit the same with the zeros'
    positions shuffled within their rows, and (on the GPU) as the CPU kernel's."""
    gen = torch.Generator().manual_seed(37 + cols)
    w = torch.rand(4, cols, generator=gen) + 0.25
    w[0, ::3], w[0, 1::5] = -0.0, 0.0
    w[1] = -w[1]
    w[1, ::4], w[1, 2::7] = 0.0, -0.0
    w[2] = 0.0
    w[2, ::2] = -0.0
    w[3] = -0.0
    groups = ops.int_num_groups(cols, group_size)
    v, mn = rand_params(4, cols, groups, gen)
    mx = torch.rand(4, groups, generator=gen) * 0.5 + 0.5
    g = torch.randn(4, cols, generator=gen)
    want_q, want_s, want_zp, want_gv, _, _ = oracle.int_quant(w, v, mn, mx, 4, group_size, sym, grad_out=g)

    def run(dev, wt):
        vd, mnd, mxd = [t.clone().to(dev).requires_grad_() for t in (v, mn, mx)]
        q, sc, zp = ops.fake_quant_int(wt.to(dev), vd, mnd, mxd, 4, group_size, sym)
        (q * g.to(dev)).sum().backward()
        return [t.detach().cpu() for t in (q, sc, zp, vd.grad, mnd.grad, mxd.grad)]

    got = run(device, w)
    assert same_bits(got[0], want_q) and torch.equal(got[1], want_s)
    if not sym:
        assert torch.equal(got[2], want_zp)
    assert torch.equal(got[3], want_gv)
    # the zeros' signs moved around within each row: the same bits (zeros only change places
    # with zeros, so the values and V at every position stay as they were)
    shuffled = w.clone()
    for r in range(4):
        zeros = (w[r] == 0).nonzero().flatten()
        shuffled[r, zeros] = w[r, zeros[torch.randperm(len(zeros), generator=gen)]]
    assert not same_bits(shuffled, w)
    for a, b in zip(got, run(device, shuffled)):
        assert same_bits(a, b)
    if device == "cuda":
        for a, b in zip(got, run("cpu", w)):
            assert same_bits(a, b)


def test_fast_division_is_ieee_division(tmp_path):
    """The INT and FP8 kernels' fast division, compiled from csrc/common/division.h with the
    host compiler (the CPU kernels' build flags: no contraction), against IEEE division for
    every bf16 and fp16 x and a stride of the fp16 scales, and random fp32 pairs; the kernels'
    selection never outside its range; a mutant (the first estimate x * RN(1/s), uncorrected)
    must fail."""
    import pathlib
    import shutil
    import subprocess

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    here = pathlib.Path(__file__).resolve().parent
    exe = tmp_path / "division_check"
    subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", f"-I{here.parents[1] / 'csrc'}",
                    str(here / "native" / "division_check.cpp"), "-o", str(exe)], check=True)
    ok = subprocess.run([str(exe)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    assert " 0 mismatches, 0 scales outside the range, 0 selected outside" in ok.stdout
    mutant = subprocess.run([str(exe), "--mutant"], capture_output=True, text=True)
    assert mutant.returncode == 1 and "mismatch:" in mutant.stdout


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_int_other_scale_dtypes_equal_oracle(device, scale_dtype):
    gen = torch.Generator().manual_seed(19)
    w = torch.randn(16, 96, generator=gen).to(torch.bfloat16)
    v, mn = rand_params(16, 96, 3, gen)
    mx = torch.ones(16, 3)
    for sym in (True, False):
        want = reference.fake_quant_int(w, v, mn, mx, 4, 32, sym, scale_dtype)
        got = ops.fake_quant_int(*to(device, w, v, mn, mx), 4, 32, sym, scale_dtype)
        assert got[1].dtype == scale_dtype
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b.detach())


def test_int_bad_arguments():
    w = torch.randn(4, 64)
    z = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        ops.fake_quant_int(w, z, torch.ones(4, 2), torch.ones(4, 2), 9, 32, True)
    with pytest.raises(ValueError, match="group_size must be -1"):
        ops.fake_quant_int(w, z, torch.ones(4, 2), torch.ones(4, 2), 4, 0, True)
    with pytest.raises(ValueError, match="min_scale must have 8 elements"):
        ops.fake_quant_int(w, z, torch.ones(4, 3), torch.ones(4, 2), 4, 32, True)
    with pytest.raises(ValueError, match="scale_dtype"):
        ops.fake_quant_int(w, z, torch.ones(4, 2), torch.ones(4, 2), 4, 32, True, torch.int8)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match="fake_quant_int: weight has non-finite"):
        ops.fake_quant_int(w, z, torch.ones(4, 2), torch.ones(4, 2), 4, 32, True)


# --------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_masked_mse_loss_matches_auto_round(device, dtype, masked):
    """auto-round: MSELoss((pred * mask).float(), (ref * mask).float()), mask a long tensor
    per token. The sum is reduced in another order: rtol 1e-5. The gradient is exact."""
    gen = torch.Generator().manual_seed(23)
    p = torch.randn(2, 33, 64, generator=gen).to(dtype)
    r = torch.randn(2, 33, 64, generator=gen).to(dtype)
    mask = (torch.rand(2, 33, generator=gen) > 0.3).long() if masked else None
    pa = p.clone().requires_grad_()
    m = mask.unsqueeze(-1) if masked else 1
    want = torch.nn.MSELoss()((pa * m).to(torch.float32), (r * m).to(torch.float32))
    (want * 1000).backward()
    pd = p.to(device).requires_grad_()
    loss = ops.masked_mse_loss(pd, r.to(device), None if mask is None else mask.to(device))
    (loss * 1000).backward()
    torch.testing.assert_close(loss.cpu(), want.detach(), rtol=1e-5, atol=0)
    assert torch.equal(pd.grad.cpu(), pa.grad)


def test_masked_mse_loss_bad_mask():
    p = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="mask must have one entry per token"):
        ops.masked_mse_loss(p, p, torch.ones(3))
    with pytest.raises(ValueError, match="ref must match pred"):
        ops.masked_mse_loss(p, p.double())


# --------------------------------------------------------------------------------------
# CPU and CUDA kernels agree bit for bit (the same numerics header)
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_equals_cpu_bitwise(dtype):
    gen = torch.Generator().manual_seed(29)
    for rows, cols in [(256, 4096), (37, 1000)]:
        w = torch.randn(rows, cols, generator=gen).to(dtype)
        g = torch.randn(rows, cols, generator=gen).to(dtype)
        v, ms = rand_params(rows, cols, math.ceil(cols / 16), gen)
        gs = ops.nvfp4_global_scale(w)
        outs = []
        for dev in ("cpu", "cuda"):
            vd, msd = [t.clone().to(dev).requires_grad_() for t in (v, ms)]
            q, s = ops.fake_quant_nvfp4(w.to(dev), vd, msd, gs.to(dev))
            (q.float() * g.to(dev).float()).sum().backward()
            outs.append([t.cpu() for t in (q, s, vd.grad, msd.grad)])
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        # every INT kernel: 8 elements per lane (groups 8..128), 4 per lane (group 4), one
        # warp per group (256, per row, and the ragged 1000 columns)
        for group in (4, 8, 16, 32, 64, 128, 256, -1):
            for sym in (True, False):
                groups = ops.int_num_groups(cols, group)
                mn = torch.rand(rows, groups, generator=gen) + 0.5
                mx = torch.rand(rows, groups, generator=gen) + 0.5
                outs = []
                for dev in ("cpu", "cuda"):
                    vd, mnd, mxd = [t.clone().to(dev).requires_grad_() for t in (v, mn.clamp(max=1), mx.clamp(max=1))]
                    q, s, zp = ops.fake_quant_int(w.to(dev), vd, mnd, mxd, 4, group, sym)
                    (q.float() * g.to(dev).float()).sum().backward()
                    outs.append([t.detach().cpu() for t in (q, s, zp, vd.grad, mnd.grad, mxd.grad)])
                for name, a, b in zip(("q", "scale", "zp", "grad v", "grad min", "grad max"), *outs):
                    assert torch.equal(a, b), (rows, cols, group, sym, name)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("group", [8, 128])
def test_int_cuda_looping_grid_equals_cpu(group):
    """The small-group INT forward launches at most the blocks resident at once and each warp
    loops over groups: a weight with more groups than one such grid covers (4096 x 4096:
    131072 groups of 128, 2M of 8) goes round the loop; forward and backward must equal the
    CPU kernel."""
    gen = torch.Generator().manual_seed(31)
    rows = cols = 4096
    w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    g = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    groups = ops.int_num_groups(cols, group)
    v, mn = rand_params(rows, cols, groups, gen)
    mx = torch.rand(rows, groups, generator=gen) * 0.5 + 0.5
    for sym in (True, False):
        outs = []
        for dev in ("cpu", "cuda"):
            vd, mnd, mxd = [t.clone().to(dev).requires_grad_() for t in (v, mn, mx)]
            q, s, zp = ops.fake_quant_int(w.to(dev), vd, mnd, mxd, 4, group, sym)
            (q.float() * g.to(dev).float()).sum().backward()
            outs.append([t.detach().cpu() for t in (q, s, zp, vd.grad, mnd.grad, mxd.grad)])
        for name, a, b in zip(("q", "scale", "zp", "grad v", "grad min", "grad max"), *outs):
            assert torch.equal(a, b), (group, sym, name)


# --------------------------------------------------------------------------------------
# properties (hypothesis): kernels equal the oracles on arbitrary shapes and magnitudes
# --------------------------------------------------------------------------------------

dtypes_st = st.sampled_from(DTYPES)


@settings(max_examples=int(__import__("os").environ.get("HYPOTHESIS_EXAMPLES", 40)), deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 100), dtype=dtypes_st,
       log_mag=st.floats(-20, 20), seed=st.integers(0, 2**31 - 1))
def test_property_nvfp4_forward_equals_oracle(rows, cols, dtype, log_mag, seed):
    if dtype == torch.float16:
        log_mag = max(min(log_mag, 8.0), -8.0)
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=gen) * 2.0**log_mag).to(dtype)
    v, ms = rand_params(rows, cols, math.ceil(cols / 16), gen, lo=0.0)
    gs = ops.nvfp4_global_scale(w)
    q, s = ops.fake_quant_nvfp4(w, v, ms, gs)
    rq, rs = reference.fake_quant_nvfp4(w, v, ms, gs)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    # Every output is an FP4 value times its group's 1/os: |q| never exceeds 6 / os.
    if gs > 0:
        bound = rs.repeat_interleave(16, 1)[:, :cols] / gs * 6 * (1 + 2 * torch.finfo(dtype).eps)
        subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # absolute rounding there
        assert (q.float().abs() <= bound * (1 + 1e-6) + subnormal_step).all()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 300), bits=st.integers(2, 8), sym=st.booleans(),
       group_size=st.sampled_from([-1, 16, 32, 64, 128]), dtype=dtypes_st, seed=st.integers(0, 2**31 - 1))
def test_property_int_forward_equals_oracle(rows, cols, bits, sym, group_size, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    groups = ops.int_num_groups(cols, group_size)
    v, mn = rand_params(rows, cols, groups, gen, lo=0.0)
    mx = torch.rand(rows, groups, generator=gen)
    got = ops.fake_quant_int(w, v, mn, mx, bits, group_size, sym)
    want = reference.fake_quant_int(w, v, mn, mx, bits, group_size, sym)
    for a, b in zip(got, want):
        assert torch.equal(a, b.detach())
    # Levels stay inside the integer range.
    q, s, zp = got
    levels = (q.float() / s.float().repeat_interleave(cols if groups == 1 else group_size, 1)[:, :cols])
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (-(2**bits), 2**bits)
    assert (levels.round() >= lo - 1).all() and (levels.round() <= hi + 1).all()


# --------------------------------------------------------------------------------------
# torch.library integration
# --------------------------------------------------------------------------------------


def _opcheck_cases(device):
    gen = torch.Generator().manual_seed(31)
    w = torch.randn(8, 40, generator=gen).to(torch.bfloat16).to(device)
    v = torch.zeros(8, 40, device=device).requires_grad_()
    ms = torch.ones(8, 3, device=device).requires_grad_()
    gs = ops.nvfp4_global_scale(w).reshape(1)
    gs_rows = torch.linspace(50, 900, 8, device=device)  # a weight's global scale per row
    g = torch.randn(8, 40, generator=gen).to(torch.bfloat16).to(device)
    x = torch.randn(2, 5, 32, generator=gen).to(torch.bfloat16).to(device).requires_grad_()
    gx = torch.randn(2, 5, 32, generator=gen).to(torch.bfloat16).to(device)
    mn = torch.ones(8, 2, device=device).requires_grad_()
    mx = torch.ones(8, 2, device=device).requires_grad_()
    mask = torch.ones(10, device=device)
    improved, lr = torch.ones(1, dtype=torch.bool, device=device), torch.full((1,), 0.01, device=device)

    def bests(*ts):
        return [torch.zeros_like(t) for t in ts]

    def tunables(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    o = torch.ops.autoround_fast
    return [
        (o.fake_quant_nvfp4, (w, v, ms, gs)),
        (o.fake_quant_nvfp4_backward, (g, w, v.detach(), ms.detach(), gs)),
        (o.fake_quant_nvfp4, (w, v, ms, gs_rows)),
        (o.fake_quant_nvfp4_backward, (g, w, v.detach(), ms.detach(), gs_rows)),
        (o.fake_quant_nvfp4_backward_step_, (g, w, v.detach().clone(), ms.detach().clone(), gs_rows, *bests(ms),
                                             improved, lr)),
        (o.fake_quant_nvfp4_stepped, (w, *tunables(v, ms), gs_rows, *bests(ms), improved, lr)),
        (o.fake_quant_nvfp4_activation, (x, gs)),
        (o.fake_quant_nvfp4_activation_backward, (gx, x.detach(), gs)),
        # a global scale per row (MoE experts' sorted rows), and an activation of no tokens
        (o.fake_quant_nvfp4_activation, (x, torch.linspace(50, 900, 10, device=device))),
        (o.fake_quant_nvfp4_activation_backward, (gx, x.detach(), torch.linspace(50, 900, 10, device=device))),
        (o.fake_quant_nvfp4_activation, (x[:0].detach().clone().requires_grad_(), gs)),
        (o.silu_mul_nvfp4_activation, (x, gx.clone().requires_grad_(), gs)),
        (o.silu_mul_nvfp4_activation_backward, (gx, x.detach(), gx, gs)),
        (o.fake_quant_int, (w, v, mn, mx, 4, 32, True, 5)),
        (o.fake_quant_int, (w, v, mn[:, :1].detach().clone().requires_grad_(), mx[:, :1].detach().clone().requires_grad_(), 3, -1, False, 15)),
        (o.fake_quant_int_backward, (g, w, v.detach(), mn.detach(), mx.detach(), 4, 32, False, 5)),
        (o.masked_mse_loss, (x, gx, mask)),
        (o.masked_mse_loss, (x, gx, None)),
        (o.masked_mse_loss_backward, (torch.ones((), device=device), x.detach(), gx, mask)),
        (o.sign_step_, (torch.randn(8, 40, generator=gen).to(device), torch.zeros(8, 40, device=device),
                        torch.randn(8, 40, generator=gen).to(device), improved, lr)),
        (o.copy_if_, (torch.randn(8, 40, generator=gen).to(device).to(torch.bfloat16),
                      torch.randn(8, 40, generator=gen).to(device).to(torch.bfloat16), improved)),
        (o.sign_step_, (torch.randn(8, 40, generator=gen).to(device), None,
                        torch.randn(8, 40, generator=gen).to(device), improved, lr)),
        (o.fake_quant_nvfp4_backward_step_, (g, w, v.detach().clone(), ms.detach().clone(), gs, *bests(ms),
                                             improved, lr)),
        (o.fake_quant_int_backward_step_, (g, w, v.detach().clone(), mn.detach().clone(), mx.detach().clone(),
                                           4, 32, True, 5, *bests(mn, mx), improved, lr)),
        # the forwards whose backward steps the tunables in place (ops.step_in_backward_*)
        (o.fake_quant_nvfp4_stepped, (w, *tunables(v, ms), gs, *bests(ms), improved, lr)),
        (o.fake_quant_int_stepped, (w, *tunables(v, mn, mx), 4, 32, True, 5, *bests(mn, mx), improved, lr)),
    ]


def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_ops_trace_under_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(37)
    w = torch.randn(16, 64, generator=gen).to(torch.bfloat16).to(device)
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16).to(device)
    gs = ops.nvfp4_global_scale(w).to(device)
    ref = torch.randn(4, 16, generator=gen).to(torch.bfloat16).to(device)

    def step(v, ms, mn, mx):
        wq, _ = ops.fake_quant_nvfp4(w, v, ms, gs)
        wi, _, _ = ops.fake_quant_int(w, v, mn, mx, 4, 32, False)
        y = ops.fake_quant_nvfp4_activation(x, gs) @ (wq + wi).t()
        return ops.masked_mse_loss(y, ref)

    def grads(fn):
        params = [torch.zeros(16, 64, device=device), torch.ones(16, 4, device=device),
                  torch.ones(16, 2, device=device), torch.ones(16, 2, device=device)]
        params = [p.requires_grad_() for p in params]
        loss = fn(*params)
        loss.backward()
        return [loss.detach()] + [p.grad for p in params]

    eager = grads(step)
    compiled = grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# The fused SignSGD step
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel,offset", [(4096, 0), (1001, 0), (1000, 1), (3, 0)])
@pytest.mark.parametrize("improved", [True, False])
def test_sign_step_equals_torch(device, numel, offset, improved):
    """Bit for bit what the engine did with torch ops: where(improved, p, best, out=best),
    then p.addcmul_(sign(grad), lr, value=-1); zeros, signed zeros and NaN gradients included.
    An offset of one element makes the tensors misaligned (the kernel's scalar path)."""
    gen = torch.Generator().manual_seed(numel + offset)
    base = lambda: torch.randn(numel + offset, generator=gen)[offset:]  # noqa: E731
    p, best, g = base(), base(), base()
    g[::5] = 0.0
    g[1::11] = -0.0
    g[2::13] = float("nan")
    p[::7] = -0.0
    p[3::17] = 0.0
    lr = torch.tensor([0.0049999999], dtype=torch.float32)
    imp = torch.tensor([improved])
    want_p, want_b = p.clone(), best.clone()
    torch.where(imp, want_p, want_b, out=want_b)
    want_p.addcmul_(g.sign(), lr, value=-1.0)
    p0 = p.clone()
    p, best, g, imp, lr = to(device, p, best, g, imp, lr)
    ops.sign_step_(p, best, g, imp, lr)
    assert torch.equal(p.cpu(), want_p) and torch.equal(best.cpu(), want_b)
    assert same_bits(p, want_p)  # signed zeros too
    p = p0.to(device)
    ops.sign_step_(p, None, g, imp, lr)  # no best copy (V's): the same step
    assert same_bits(p, want_p)


@pytest.mark.parametrize("dtype,numel,offset", [(torch.bfloat16, 4096, 0), (torch.float32, 1001, 0),
                                                (torch.float16, 1000, 1), (torch.bfloat16, 3, 0)])
@pytest.mark.parametrize("flag", [True, False])
def test_copy_if_equals_where(device, dtype, numel, offset, flag):
    """dst = src where flag, else dst untouched: bit for bit torch.where(flag, src, dst), signed
    zeros and NaN included; an offset of one element (misaligned) and sizes that are not whole
    16-byte chunks take the byte path."""
    gen = torch.Generator().manual_seed(numel + offset)
    base = lambda: torch.randn(numel + offset, generator=gen).to(dtype)[offset:]  # noqa: E731
    dst, src = base(), base()
    src[::7] = -0.0
    src[1::13] = float("nan")
    want = torch.where(torch.tensor(flag), src, dst)
    dst, src, f = to(device, dst, src, torch.tensor([flag]))
    ops.copy_if_(dst, src, f)
    assert same_bits(dst, want)


def test_copy_if_errors():
    dst = torch.zeros(8, dtype=torch.bfloat16)
    for src, flag, match in [(torch.zeros(8), torch.tensor([True]), "src must be contiguous with dst's dtype"),
                             (torch.zeros(7, dtype=torch.bfloat16), torch.tensor([True]), "shape"),
                             (torch.zeros(8, dtype=torch.bfloat16), torch.tensor([1.0]), "flag must be one bool")]:
        with pytest.raises(ValueError, match="copy_if_: .*" + match):
            ops.copy_if_(dst, src, flag)


def test_sign_step_errors():
    """Each bad argument gets an error naming it; best may be None (no copy)."""
    p = torch.zeros(8)
    ok = dict(best=torch.zeros(8), grad=torch.zeros(8), improved=torch.tensor([True]), lr=torch.ones(1))
    for key, bad, match in [("best", torch.zeros(7), "best must be contiguous with param's shape"),
                            ("grad", torch.zeros(8, dtype=torch.float64), "grad must be float32"),
                            ("improved", torch.tensor([1.0]), "improved must be one bool"),
                            ("lr", torch.ones(2), "lr must have 1 elements")]:
        with pytest.raises(ValueError, match="sign_step_: " + match):
            ops.sign_step_(p, **{**ok, key: bad})
    with pytest.raises(ValueError, match="param must be a contiguous float32"):
        ops.sign_step_(p.half(), **ok)
    ops.sign_step_(p, **{**ok, "best": None})


# --------------------------------------------------------------------------------------
# The sign step inside the weight backward (the engine's loop with one micro-batch)
# --------------------------------------------------------------------------------------


def _step_inputs(gen, w, v, *scales):
    """Gradients with zeros, V with signed zeros and values that leave the clamp (zero
    gradients), the scales' bests to overwrite, lr: the step's three cases on every kind of element."""
    g = torch.randn(w.shape, generator=gen).to(w.dtype)
    g[::2, ::3] = 0.0
    v = v.clone()
    v[::3, ::5] = -0.0
    v[1::4, ::7] = 7.0
    bests = [torch.randn(t.shape, generator=gen) for t in scales]
    return g, v, bests, torch.tensor([0.0049999999], dtype=torch.float32)


def _assert_bits(got, want, what):
    for name, a, b in zip(what, got, want):
        assert same_bits(a, b), name


@pytest.mark.parametrize("improved", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_backward_step_equals_backward_then_step(device, shape, dtype, improved):
    """The backward that steps v and max_scale in place writes, bit for bit, what the
    backward's gradients followed by sign_step_ on each write (max_scale's best copied where
    improved, V's kept nowhere; the vector and the ragged paths: SHAPES has rows that are not
    whole groups)."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    v, ms = rand_params(rows, cols, math.ceil(cols / 16), gen)
    g, v, (best_ms,), lr = _step_inputs(gen, w, v, ms)
    gs = ops.nvfp4_global_scale(w).reshape(1)
    imp = torch.tensor([improved])
    w, g, v, ms, best_ms, gs, imp, lr = to(device, w, g, v, ms, best_ms, gs, imp, lr)
    o = torch.ops.autoround_fast
    gv, gms = o.fake_quant_nvfp4_backward(g, w, v, ms, gs)
    want = [t.clone() for t in (v, ms, best_ms)]
    ops.sign_step_(want[0], None, gv, imp, lr)
    ops.sign_step_(want[1], want[2], gms, imp, lr)
    o.fake_quant_nvfp4_backward_step_(g, w, v, ms, gs, best_ms, imp, lr)
    _assert_bits((v, ms, best_ms), want, ("v", "max_scale", "best_max_scale"))


@pytest.mark.parametrize("improved", [True, False])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape,group_size", [((32, 256), 128), ((9, 256), 32), ((8, 192), 48),
                                              ((9, 200), 64), ((5, 70), -1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int_backward_step_equals_backward_then_step(device, shape, group_size, sym, dtype, improved):
    """As for NVFP4, over the INT kernels' layouts: groups of 128 and 32 (a group per 16 and
    per 4 lanes), 48 (a warp per group, 4-element chunks), ragged 64 and a 70-wide row (the
    scalar path)."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(rows * cols + group_size)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    groups = ops.int_num_groups(cols, group_size)
    v, mn = rand_params(rows, cols, groups, gen)
    mx = torch.rand(rows, groups, generator=gen) * 0.5 + 0.5
    g, v, (best_mn, best_mx), lr = _step_inputs(gen, w, v, mn, mx)
    imp = torch.tensor([improved])
    w, g, v, mn, mx, best_mn, best_mx, imp, lr = to(device, w, g, v, mn, mx, best_mn, best_mx, imp, lr)
    o = torch.ops.autoround_fast
    args = (4, group_size, sym, ops.SCALE_DTYPE_CODES[torch.float16])
    gv, gmn, gmx = o.fake_quant_int_backward(g, w, v, mn, mx, *args)
    want = [t.clone() for t in (v, mn, mx, best_mn, best_mx)]
    for param, best, grad in zip(want[:3], [None, *want[3:]], (gv, gmn, gmx)):
        ops.sign_step_(param, best, grad, imp, lr)
    o.fake_quant_int_backward_step_(g, w, v, mn, mx, *args, best_mn, best_mx, imp, lr)
    _assert_bits((v, mn, mx, best_mn, best_mx), want, ("v", "min_scale", "max_scale", "best_min_scale", "best_max_scale"))


@pytest.mark.parametrize("kind", ["nvfp4", "int"])
def test_step_in_backward_through_autograd(device, kind):
    """Through autograd: the forward is the plain op's, the backward leaves no gradients,
    steps the tunables as autograd's gradients and sign_step_ would, and says it ran."""
    gen = torch.Generator().manual_seed(53)
    rows, cols = 16, 64
    w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16).to(device)
    x = torch.randn(8, cols, generator=gen).to(torch.bfloat16).to(device)
    groups = cols // 16 if kind == "nvfp4" else 2
    v0, s0 = rand_params(rows, cols, groups, gen)
    tunables0 = [v0, s0] if kind == "nvfp4" else [v0, s0, s0.flip(0)]
    lr = torch.tensor([0.01], device=device)
    imp = torch.tensor([True], device=device)
    gs = ops.nvfp4_global_scale(w).reshape(1)

    def run(stepped):
        ts = [t.clone().to(device).requires_grad_() for t in tunables0]
        bests = [torch.zeros_like(t) for t in ts[1:]]  # the scales' (V has none)
        calls = []
        if kind == "nvfp4":
            q = (ops.step_in_backward_nvfp4(w, *ts, gs, bests, imp, lr, lambda: calls.append(1))[0] if stepped
                 else ops.fake_quant_nvfp4(w, *ts, gs)[0])
        else:
            q = (ops.step_in_backward_int(w, *ts, 4, 32, True, torch.float16, bests, imp, lr,
                                          lambda: calls.append(1))[0] if stepped
                 else ops.fake_quant_int(w, *ts, 4, 32, True)[0])
        (x @ q.t()).float().pow(2).sum().backward()
        if stepped:
            assert calls == [1] and all(t.grad is None for t in ts)
        else:
            with torch.no_grad():
                for t, b in zip(ts, [None, *bests]):
                    ops.sign_step_(t, b, t.grad, imp, lr)
        return [t.detach() for t in ts] + bests, q.detach()

    (got, q1), (want, q2) = run(True), run(False)
    assert torch.equal(q1, q2)
    _assert_bits(got, want, [f"tensor {i}" for i in range(len(got))])


def test_backward_step_bad_targets_name_the_tensor():
    """The backward-step ops check what they write: each scale's best like the scale, one bool
    improved, one float32 lr; the error names the op and the tensor (the CPU op; the CUDA
    op shares the checks)."""
    o = torch.ops.autoround_fast
    w = torch.randn(4, 32).to(torch.bfloat16)
    v, ms, mn, mx = torch.zeros(4, 32), torch.ones(4, 2), torch.ones(4, 1), torch.ones(4, 1)
    gs = ops.nvfp4_global_scale(w).reshape(1)
    imp, lr = torch.tensor([True]), torch.tensor([0.01])
    cases = [
        (lambda: o.fake_quant_nvfp4_backward_step_(w, w, v, ms, gs, torch.zeros(4, 1), imp, lr),
         "fake_quant_nvfp4_backward_step_: best_max_scale must have 8 elements, got 4"),
        (lambda: o.fake_quant_nvfp4_backward_step_(w, w, v, ms, gs, torch.zeros(4, 2), torch.tensor([1.0]), lr),
         "fake_quant_nvfp4_backward_step_: improved must be one bool"),
        (lambda: o.fake_quant_int_backward_step_(w, w, v, mn, mx, 4, -1, True, 5, torch.zeros(4, 1),
                                                 torch.zeros(4, 1, dtype=torch.float64), imp, lr),
         "fake_quant_int_backward_step_: best_max_scale must be float32"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# --------------------------------------------------------------------------------------
# The registered ops called directly (torch.ops.autoround_fast.*): their own C++ checks
# --------------------------------------------------------------------------------------

RAW_CASES = {  # (devices of x and global scale, numel of the global scale) -> message
    "cpu-numel": (("cpu", "cpu"), 2, "global_scale must have 1 or 4 (one per row) elements, got 2"),
    "cuda-numel": (("cuda:0", "cuda:0"), 2, "global_scale must have 1 or 4 (one per row) elements, got 2"),
    "cuda-cpu": (("cuda:0", "cpu"), 1, "every tensor must be on the first input's device, cuda:0; one is on the CPU"),
    "two-gpus": (("cuda:0", "cuda:1"), 1, "every tensor must be on the first input's device, cuda:0; one is on cuda:1"),
}


@pytest.mark.parametrize("case", [
    "cpu-numel",
    pytest.param("cuda-numel", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")),
    pytest.param("cuda-cpu", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")),
    pytest.param("two-gpus", marks=pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                                                      reason="needs 2 GPUs")),
])
def test_raw_op_bad_input_is_a_clear_error(case):
    """The ops' own checks, below the Python API's, raise a RuntimeError naming the op and the
    tensor, and leave the process alive (run in a child process: a crash fails the test with
    its signal instead of ending the run)."""
    import subprocess
    import sys

    (dx, dg), numel, message = RAW_CASES[case]
    code = (
        "import torch, autoround_fast\n"
        f"x = torch.randn(4, 32, device={dx!r}); g = torch.ones({numel}, device={dg!r})\n"
        "try:\n"
        "    torch.ops.autoround_fast.fake_quant_nvfp4_activation(x, g)\n"
        "    print('NO ERROR')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "fake_quant_nvfp4_activation: " + message in out.stdout, out.stdout
