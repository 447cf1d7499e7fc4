"""The MX ops (MXFP4, MXFP8) against the plain-PyTorch oracle and auto-round 0.15.1: forward bit
for bit, V's gradient bit for bit, the max_scale gradient within the rounding of its sums;
the activation op likewise; argument checks; opcheck."""

import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import oracle
from autoround_fast import ops, reference
from autoround_fast.formats import E8M0_EXP_MAX, MX_ELEMENTS, MX_GROUP
from conftest import HAS_CUDA
from test_ops import DTYPES, assert_grad_close, same_bits, seed_of, to

BITS = [4, 8]
SHAPES = [(64, 128), (33, 70), (7, 3), (16, 1040), (3, 17), (1, 32), (128, 4096)]


def groups_of(cols):
    return math.ceil(cols / MX_GROUP)


def rand_inputs(rows, cols, dtype, gen, scale=0.05, lo=0.5):
    w = (torch.randn(rows, cols, generator=gen) * scale).to(dtype)
    v = (torch.rand(rows, cols, generator=gen) - 0.5) * 0.8  # V drifts within +-0.5 in tuning
    ms = torch.rand(rows, groups_of(cols), generator=gen) * (1 - lo) + lo
    return w, v, ms


def oracle_grads(w, v, ms, bits, g):
    """Autograd of reference.fake_quant_mx: (q, e, dV, d max_scale)."""
    vd, msd = v.clone().requires_grad_(), ms.clone().requires_grad_()
    q, e = reference.fake_quant_mx(w, vd, msd, bits)
    (q.float() * g.float()).sum().backward()
    return q.detach(), e, vd.grad, msd.grad


def ours_grads(w, v, ms, bits, g, device):
    vd, msd = [t.clone().to(device).requires_grad_() for t in (v, ms)]
    q, e = ops.fake_quant_mx(w.to(device), vd, msd, bits)
    (q.float() * g.to(device).float()).sum().backward()
    return [t.detach().cpu() for t in (q, e, vd.grad, msd.grad)]


def scale_grad_size(w, v, ms, bits, g, gv):
    """Per group, what the max_scale gradient is a sum of, in magnitude: amax / m * scale *
    (sum |g q| + sum |dV (x / scale) / scale|), the chain of the two sums (ln 2 cancels). The
    two sums nearly cancel (q * scale barely moves with the scale: floating-point elements
    scale with it), so the gradient is mostly rounding residue; summed in another order than
    autograd's, it moves by a few fp32 ulps of this size, not of its own."""
    rows = w.shape[0]
    x = reference._groups(w, MX_GROUP)[0].float()
    vg = reference._groups(v, MX_GROUP)[0]
    gg = reference._groups(g, MX_GROUP)[0].float()
    gvg = reference._groups(gv, MX_GROUP)[0]
    with torch.no_grad():
        out, e = reference._mx_groups(x, vg, ms.reshape(-1, 1), bits)
    scale = torch.pow(2.0, e)
    q = out / scale
    terms = (gg * q).abs().sum(-1, keepdim=True) + (gvg * (x / scale / scale)).abs().sum(-1, keepdim=True)
    amax = x.abs().amax(-1, keepdim=True)
    m = amax * ms.reshape(-1, 1)
    size = torch.where(m == 0, torch.zeros_like(m), amax / m * scale * terms)
    return size.reshape(rows, -1)


def assert_scale_grad_close(ours, want, size, what="max_scale grad"):
    """|ours - want| <= 1e-5 |want| + 1e-6 * size (see scale_grad_size)."""
    tol = 1e-5 * want.abs() + 1e-6 * size
    bad = (ours - want).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} off, worst excess {((ours - want).abs() - tol).max():.3e}"


# --------------------------------------------------------------------------------------
# MX weights: forward
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mx_forward_equals_oracle_and_auto_round(device, bits, dtype, shape):
    """Bit for bit against the oracle (auto-round's functions), except in a group whose m lies
    just below a power of two, where the oracle's floor(torch.log2(m)) rounds up to the next
    exponent and the kernels take the exact one (mx.h): there the exponent is checked."""
    gen = torch.Generator().manual_seed(seed_of(shape, str(dtype), bits))
    rows, cols = shape
    w, v, ms = rand_inputs(rows, cols, dtype, gen)
    want_q, want_e = reference.fake_quant_mx(w, v, ms, bits)
    ar_q, ar_e = oracle.mx(w, v, ms, bits)
    assert same_bits(want_q, ar_q) and torch.equal(want_e, ar_e)  # the oracle is auto-round's
    q, e = ops.fake_quant_mx(*to(device, w, v, ms), bits)
    assert q.dtype == dtype and e.dtype == torch.float32 and e.shape == (rows, groups_of(cols))
    exact = exact_exponents(w, ms, bits)
    assert torch.equal(e.cpu(), exact)
    rounded_up = want_e != exact
    assert torch.equal(want_e[rounded_up], exact[rounded_up] + 1) and rounded_up.float().mean() < 0.01
    keep = ~rounded_up.repeat_interleave(MX_GROUP, dim=1)[:, :cols]
    assert same_bits(q.cpu()[keep], want_q[keep])


def exact_exponents(w, ms, bits):
    """Each group's E = clamp(floor(log2 m) - emax) with m = max|W_g| * max_scale_g in fp32
    and floor(log2 m) its exact binary exponent (1 where m = 0, as auto-round takes it)."""
    rows, cols = w.shape
    groups = groups_of(cols)
    padded = torch.nn.functional.pad(w.float().abs(), (0, groups * MX_GROUP - cols))
    m = padded.reshape(rows, groups, MX_GROUP).amax(-1) * ms.reshape(rows, groups)
    lg = torch.where(m == 0, torch.ones_like(m), (torch.frexp(m)[1] - 1).float())
    return (lg - MX_ELEMENTS[bits].emax).clamp(-E8M0_EXP_MAX, E8M0_EXP_MAX)


# The midpoints between neighbouring grid values of each element format (ties round to the
# even mantissa), a value on the grid's top, and beyond it; all exact in bf16 and fp16.
MIDPOINTS = {
    4: [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0],
    8: [2.0**-10, 3 * 2.0**-10, 2.0**-7 * 1.0625, 1.0625, 1.1875, 1.9375, 136.0, 432.0, 448.0, 464.0],
}


def mx_edge_inputs(dtype, bits):
    """A weight, V and max_scale whose groups cover the edge cases: an all-zero group, zeros
    and -0 (with V of -0 too), ties at grid midpoints of the element format with unit scale
    (the group's max is max_norm, max_scale 1, V 0), values at max_norm * scale pushed beyond
    it by V, tiny groups beside normal ones (fp32: subnormal weights, and groups whose shared
    exponent clamps at -127), large groups, a ragged last group."""
    fmt = MX_ELEMENTS[bits]
    gen = torch.Generator().manual_seed(7 + bits)
    w = torch.randn(14, 72, generator=gen) * 0.05
    v = (torch.rand(14, 72, generator=gen) - 0.5) * 0.8
    ms = torch.rand(14, 3, generator=gen) * 0.5 + 0.5
    w[0, :32] = 0                                   # all-zero group
    w[1, ::3] = 0.0
    w[1, 1::3] = -0.0
    v[1, 1::6] = -0.0                               # -0 / scale + -0 = -0
    mids = torch.tensor(MIDPOINTS[bits])
    row = torch.cat([mids, -mids])
    w[2, 0] = fmt.max_norm                          # m = max_norm: E = 0, scale 1
    w[2, 1:1 + len(row)] = row
    w[2, 32] = fmt.max_norm
    w[2, 33:33 + len(row)] = row * 0.5 + 2.0**-fmt.mbits * 0.25  # near (not on) midpoints
    v[2], ms[2] = 0.0, 1.0
    w[3, :32] = fmt.max_norm * torch.sign(torch.randn(32, generator=gen))  # every element at max_norm * scale
    v[3, :32] = torch.linspace(-1.5, 1.5, 32) * fmt.max_norm               # and pushed beyond it
    ms[3] = 1.0
    w[4, :32] *= 1e-4                               # tiny beside normal groups
    w[5] *= 1e3 if dtype != torch.float16 else 50
    w[6, 64:] = torch.tensor([fmt.max_norm, -fmt.max_norm, 1e-3, 0, -0.0, 0, 0, 3.0])  # ragged last group
    if dtype == torch.float32:
        w[7, :32] = torch.randn(32, generator=gen) * 1e-39   # subnormal weights: E clamps at -127
        w[7, 32:64] *= 1e-38                                  # the group's max near the normal floor
        w[7, 40:48] = torch.randn(8, generator=gen) * 1e-42  # subnormals beside it
        w[8, :32] = 2.0**-120 * (1 + torch.rand(32, generator=gen))  # E = -122 - emax, clamped for fp8
        w[9, :32] *= 1e30
    w[10, :32] = -0.0                                 # all -0
    v[10, :16] = -0.0
    w[11, :32] = 0.0                                  # zeros, V pushes
    v[11, :32] = torch.linspace(-1.0, 1.0, 32)
    ms[12] = 0.0                                      # m = 0 from max_scale
    ms[13, 0] = 1e-3
    return w.to(dtype), v, ms


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mx_edges_equal_oracle_and_auto_round(device, bits, dtype):
    """Forward (signed zeros included) and V's gradient bit for bit against the oracle and
    auto-round on the edge weight; the max_scale gradient within its sums' rounding, and 0
    on groups with m = 0 where auto-round's is NaN."""
    w, v, ms = mx_edge_inputs(dtype, bits)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(w.shape, generator=gen).to(dtype)
    g[1, ::2] = -g[1, ::2].abs()  # negative upstream gradients on the -0 weights with -0 V
    want_q, want_e, want_gv, want_gms = oracle_grads(w, v, ms, bits, g)
    ar_q, ar_e, ar_gv, ar_gms = oracle.mx(w, v, ms, bits, grad_out=g)
    assert same_bits(want_q, ar_q) and torch.equal(want_e, ar_e) and same_bits(want_gv, ar_gv)
    q, e, gv, gms = ours_grads(w, v, ms, bits, g, device)
    assert same_bits(q, want_q)
    assert torch.equal(e, want_e)
    assert same_bits(gv, want_gv)
    m_zero = torch.isnan(ar_gms)  # groups with m = 0 (all zeros, or max_scale 0)
    assert m_zero.sum() >= 3
    assert (gms[m_zero] == 0).all() and (want_gms[m_zero] == 0).all() and torch.isfinite(gms).all()
    size = scale_grad_size(w, v, ms, bits, g, want_gv)
    assert_scale_grad_close(gms, want_gms, size)
    assert_scale_grad_close(gms[~m_zero], ar_gms[~m_zero], size[~m_zero], "max_scale grad vs auto-round")


def test_mx_midpoints_round_to_even():
    # the group's max is max_norm (E = 0, scale 1), V = 0, max_scale 1: t = W exactly
    for bits, want in [(4, [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0]),
                       (8, [0.0, 2.0**-8, 2.0**-7, 1.0, 1.25, 2.0, 128.0, 448.0, 448.0, 448.0])]:
        fmt = MX_ELEMENTS[bits]
        mids = torch.tensor(MIDPOINTS[bits])
        w = torch.cat([torch.tensor([fmt.max_norm]), mids, torch.zeros(31 - len(mids))]).reshape(1, 32)
        q, e = ops.fake_quant_mx(w, torch.zeros_like(w), torch.ones(1, 1), bits)
        assert e.item() == 0.0
        assert q[0, 1:1 + len(mids)].tolist() == want, bits


def _unit_scale_groups(vals, top):
    """Groups of 32 whose first element is top (= max_norm: E = 0 with max_scale 1) and the
    rest are vals (padded with zeros)."""
    vals = torch.cat([vals, vals.new_zeros(-len(vals) % 31)]).reshape(-1, 31)
    return torch.cat([vals.new_full((len(vals), 1), top), vals], 1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mx_rounds_every_value_as_the_oracle(device, bits, dtype):
    """The element rounding over a dense sweep: every bf16 value in [-max_norm, max_norm]
    (subnormals and both zeros included) as the weight with V = 0 and unit scale, and fp32
    values of V in [-1.2, 1.2] * max_norm on zero weights (-0 weights with -0 V among them);
    weights, and the activation op on the bf16 values. Bit for bit against the oracle."""
    fmt = MX_ELEMENTS[bits]
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    every = every[every.abs() <= fmt.max_norm]
    w1 = _unit_scale_groups(every, fmt.max_norm)
    gen = torch.Generator().manual_seed(11)
    w2 = _unit_scale_groups(torch.zeros(100000), fmt.max_norm)
    w2[:, 1:8] = -0.0
    v2 = (torch.rand(w2.shape, generator=gen) - 0.5) * 2.4 * fmt.max_norm
    v2[:, 0] = 0
    v2[:, 4:8] = -0.0
    w = torch.cat([w1, w2]).to(dtype)
    v = torch.cat([torch.zeros_like(w1), v2])
    ms = torch.ones(len(w), 1)
    want_q, want_e = reference.fake_quant_mx(w, v, ms, bits)
    assert bool((want_e == 0).all())
    q, e = ops.fake_quant_mx(*to(device, w, v, ms), bits)
    assert same_bits(q, want_q) and torch.equal(e.cpu(), want_e)
    x = w1.to(dtype)
    assert same_bits(ops.fake_quant_mx_activation(x.to(device), bits), reference.fake_quant_mx_activation(x, bits))


# --------------------------------------------------------------------------------------
# The shared exponent: exact floor(log2 m)
# --------------------------------------------------------------------------------------


def _exact_floor_log2(m: float) -> int:
    return math.frexp(m)[1] - 1


@pytest.mark.parametrize("bits", BITS)
def test_mx_exponent_is_exact_at_powers_of_two(device, bits):
    """m = 2^k and its fp32 neighbour above, for every k an fp32 weight reaches (subnormals
    included): E = clamp(k - emax) as the oracle's (torch.log2 is exact there). The neighbour
    below 2^k: E is exact, k - 1 - emax, where torch.log2 rounds up to k for |k| >= 3 on the CPU
    (auto-round's and the oracle's E is then one more, and their scale twice ours; mx.h)."""
    fmt = MX_ELEMENTS[bits]
    ks = list(range(-149, 128))
    p2 = torch.tensor([2.0**k for k in ks], dtype=torch.float64).float()
    up = torch.nextafter(p2, torch.tensor(math.inf))
    down = torch.nextafter(p2, torch.tensor(0.0))
    for vals, exact in [(p2, ks), (up, ks)]:
        w = torch.zeros(len(ks), 32)
        w[:, 5] = -vals
        w[:, 6] = vals * 0.5
        want_q, want_e = reference.fake_quant_mx(w, torch.zeros_like(w), torch.ones(len(ks), 1), bits)
        q, e = ops.fake_quant_mx(*to(device, w, torch.zeros_like(w), torch.ones(len(ks), 1)), bits)
        assert torch.equal(e.cpu(), want_e)
        assert same_bits(q, want_q)
        assert e.flatten().tolist() == [float(max(min(k - fmt.emax, E8M0_EXP_MAX), -E8M0_EXP_MAX)) for k in exact]
    w = torch.zeros(len(ks), 32)
    w[:, 0] = down
    keep = down > 0
    _, e = ops.fake_quant_mx(*to(device, w, torch.zeros_like(w), torch.ones(len(ks), 1)), bits)
    exact = [max(min(_exact_floor_log2(d) - fmt.emax, E8M0_EXP_MAX), -E8M0_EXP_MAX) for d in down.tolist() if d > 0]
    assert e.cpu().flatten()[keep].tolist() == [float(x) for x in exact]
    # what the oracle's torch.log2 gives there: the exact exponent or one above it
    _, want_e = reference.fake_quant_mx(w, torch.zeros_like(w), torch.ones(len(ks), 1), bits)
    diff = (want_e.flatten() - e.cpu().flatten())[keep]
    assert bool(((diff == 0) | (diff == 1)).all())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mx_exponents_equal_oracle_on_random_data(device, bits, dtype):
    """Groups of random magnitude over the whole range of the dtype, random max_scale in
    [0, 1]: the same exponents (and outputs) as the oracle."""
    gen = torch.Generator().manual_seed(41 + bits)
    rows, cols = 512, 64
    span = {torch.float32: 120, torch.bfloat16: 120, torch.float16: 14}[dtype]
    mag = 2.0 ** ((torch.rand(rows, 1, generator=gen) * 2 - 1) * span)
    w = (torch.randn(rows, cols, generator=gen) * mag).to(dtype)
    v = torch.zeros(rows, cols)
    ms = torch.rand(rows, 2, generator=gen)
    want_q, want_e = reference.fake_quant_mx(w, v, ms, bits)
    q, e = ops.fake_quant_mx(*to(device, w, v, ms), bits)
    assert torch.equal(e.cpu(), want_e)
    assert same_bits(q, want_q)


# --------------------------------------------------------------------------------------
# MX weights: gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (7, 3), (16, 1040), (2, 4096)])
def test_mx_gradients_match_oracle_and_auto_round(device, bits, dtype, shape):
    """dV bit for bit (one chain of rounded ops per element, autograd's). d max_scale sums
    64 products per group in element order; autograd's reduction adds them in another
    order, and the sum nearly cancels: within 1e-5 relative plus 1e-6 of the summands'
    size (scale_grad_size)."""
    gen = torch.Generator().manual_seed(11 + bits)
    rows, cols = shape
    w, v, ms = rand_inputs(rows, cols, dtype, gen)
    g = torch.randn(rows, cols, generator=gen).to(dtype)
    _, _, want_gv, want_gms = oracle_grads(w, v, ms, bits, g)
    _, _, ar_gv, ar_gms = oracle.mx(w, v, ms, bits, grad_out=g)
    _, _, gv, gms = ours_grads(w, v, ms, bits, g, device)
    assert same_bits(gv, want_gv) and same_bits(gv, ar_gv)
    size = scale_grad_size(w, v, ms, bits, g, want_gv)
    assert_scale_grad_close(gms, want_gms, size)
    assert_scale_grad_close(gms, ar_gms, size, "max_scale grad vs auto-round")
    assert_grad_close(gms, want_gms, 1e-3, "max_scale grad (relative to the largest)")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_mx_rejects_non_finite_inputs(device, bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="fake_quant_mx: weight has non-finite"):
        ops.fake_quant_mx(*to(device, w, torch.zeros(4, 64), torch.ones(4, 2)), 4)
    with pytest.raises(ValueError, match="fake_quant_mx_activation: x has non-finite"):
        ops.fake_quant_mx_activation(w.to(device), 8)
    if device == "cpu":  # the CPU ops' own count, past the wrappers
        with pytest.raises(RuntimeError, match="fake_quant_mx: weight has 1 non-finite values"):
            torch.ops.autoround_fast.fake_quant_mx(w, torch.zeros(4, 64), torch.ones(4, 2), 4)
        with pytest.raises(RuntimeError, match="fake_quant_mx_activation: x has 1 non-finite values"):
            torch.ops.autoround_fast.fake_quant_mx_activation(w, 8)


def test_mx_bad_arguments_name_the_tensor():
    w = torch.randn(4, 64)
    z, ones = torch.zeros(4, 64), torch.ones(4, 2)
    for call in (lambda: ops.fake_quant_mx(w, z, ones, 5), lambda: ops.fake_quant_mx_activation(w, 5)):
        with pytest.raises(ValueError, match=r"bits must be 4 \(MXFP4\) or 8 \(MXFP8\), got 5"):
            call()
    with pytest.raises(ValueError, match="fake_quant_mx: max_scale must have 8 elements, got 12"):
        ops.fake_quant_mx(w, z, torch.ones(4, 3), 4)
    with pytest.raises(ValueError, match="fake_quant_mx: v must be float32"):
        ops.fake_quant_mx(w, z.to(torch.bfloat16), ones, 4)
    with pytest.raises(ValueError, match="fake_quant_mx: weight must be 2-D"):
        ops.fake_quant_mx(w.reshape(-1), z.reshape(-1), ones, 4)
    with pytest.raises(ValueError, match="fake_quant_mx: weight must be float32, bfloat16 or float16"):
        ops.fake_quant_mx(w.double(), z, ones, 4)
    with pytest.raises(ValueError, match="fake_quant_mx_activation: x must be float32, bfloat16 or float16"):
        ops.fake_quant_mx_activation(w.double(), 4)
    # the registered ops' own checks (C++), past the wrappers
    o = torch.ops.autoround_fast
    cases = [
        (lambda: o.fake_quant_mx(w, z, ones, 5), r"fake_quant_mx: bits must be 4 \(MXFP4\) or 8 \(MXFP8\), got 5"),
        (lambda: o.fake_quant_mx_backward(w, w, z, ones, 2), "fake_quant_mx_backward: bits must be 4"),
        (lambda: o.fake_quant_mx_activation(w, 16), "fake_quant_mx_activation: bits must be 4"),
        (lambda: o.fake_quant_mx_activation_backward(w, w, 5), "fake_quant_mx_activation_backward: bits must be 4"),
        (lambda: o.fake_quant_mx(w, z, torch.ones(4, 3), 8), "fake_quant_mx: max_scale must have 8 elements, got 12"),
        (lambda: o.fake_quant_mx_backward(w.half(), w, z, ones, 8), "fake_quant_mx_backward: grad must have dtype float32"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


# --------------------------------------------------------------------------------------
# MX activations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 9, 64), (3, 70), (5, 8), (4, 1040), (16, 4096)])
def test_mx_activation_equals_oracle_and_auto_round(device, bits, dtype, shape):
    """Forward bit for bit. The gradient bit for bit on every element but each group's first
    argmax, which also receives the path through max|x|: d m comes from the group's sums,
    which autograd reduces in another order (a near cancellation, as for max_scale), so there
    it may differ by the rounding of those sums, then by one ulp of the dtype."""
    gen = torch.Generator().manual_seed(13 + bits)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    x.view(-1)[::97] = 0.0
    x.view(-1)[5::101] = -0.0
    if shape[-1] > 17:  # a tie for the first group's max: the first of the two takes the path
        x[..., 3], x[..., 17] = 20.0, -20.0
    g = torch.randn(shape, generator=gen).to(dtype)
    xr = x.clone().requires_grad_()
    want_y = reference.fake_quant_mx_activation(xr, bits)
    (want_y.float() * g.float()).sum().backward()
    want_gx = xr.grad
    ar_y, ar_gx = oracle.mx_activation(x, bits, grad_out=g)
    assert same_bits(want_y, ar_y) and same_bits(want_gx, ar_gx)
    xd = x.clone().to(device).requires_grad_()
    y = ops.fake_quant_mx_activation(xd, bits)
    (y.float() * g.to(device).float()).sum().backward()
    assert same_bits(y.detach(), want_y.detach())
    got = xd.grad.cpu().clone()
    # each group's first argmax, and the size of its d m (as for max_scale, ln 2 cancelling)
    cols = shape[-1]
    x2, g2 = x.reshape(-1, cols), g.reshape(-1, cols)
    xg = reference._groups(x2, MX_GROUP)[0].float()
    arg = torch.zeros_like(xg, dtype=torch.bool).scatter_(1, xg.abs().max(-1, keepdim=True)[1], True)
    arg = reference._ungroup(arg, *x2.shape).reshape(shape)
    assert same_bits(got[~arg], want_gx[~arg])
    vz, ms1 = torch.zeros(x2.shape, requires_grad=True), torch.ones(x2.shape[0], groups_of(cols))
    q, _ = reference.fake_quant_mx(x2, vz, ms1, bits)
    (q.float() * g2.float()).sum().backward()
    gv = vz.grad
    amax = xg.abs().amax(-1, keepdim=True)
    size = scale_grad_size(x2, torch.zeros(x2.shape), ms1, bits, g2, gv).reshape(-1, 1)
    size_m = torch.where(amax == 0, torch.zeros_like(amax), size / amax).expand_as(xg)
    size_m = reference._ungroup(size_m, *x2.shape).reshape(shape)
    ulp = torch.finfo(dtype).eps * want_gx.float().abs() + torch.finfo(dtype).tiny
    tol = (ulp + 1e-6 * size_m)[arg]
    err = (got.float() - want_gx.float()).abs()[arg]
    assert (err <= tol).all(), f"argmax grads: {int((err > tol).sum())} off"


# --------------------------------------------------------------------------------------
# properties (hypothesis): the kernels equal the oracle on arbitrary shapes and magnitudes
# --------------------------------------------------------------------------------------


def just_below_a_power_of_two(t, ulps=64):
    """Where |t| lies within `ulps` fp32 ulps below a power of two: where torch.log2 may round
    up to the next exponent (mx.h), and the oracle's exponent, or gradient, is not ours."""
    return (t.float().abs().view(torch.int32) & 0x7FFFFF) >= 0x800000 - ulps


@settings(max_examples=int(__import__("os").environ.get("HYPOTHESIS_EXAMPLES", 40)), deadline=None)
@given(rows=st.integers(1, 16), cols=st.integers(1, 200), dtype=st.sampled_from(DTYPES), bits=st.sampled_from(BITS),
       log_mag=st.floats(-30, 30), seed=st.integers(0, 2**31 - 1))
def test_property_mx_equals_oracle(rows, cols, dtype, bits, log_mag, seed):
    """Forward and dV bit for bit, away from the values just below a power of two (random
    fp32 data meets them, rarely: at about 1e-7 per value) where auto-round's log2 rounds up."""
    if dtype == torch.float16:
        log_mag = max(min(log_mag, 8.0), -8.0)
    gen = torch.Generator().manual_seed(seed)
    w, v, ms = rand_inputs(rows, cols, dtype, gen, scale=2.0**log_mag, lo=0.0)
    g = torch.randn(rows, cols, generator=gen).to(dtype)
    m = w.float().abs().reshape(rows, -1)
    m = torch.nn.functional.pad(m, (0, -cols % MX_GROUP)).reshape(rows, -1, MX_GROUP).amax(-1) * ms
    assume(not just_below_a_power_of_two(m).any())
    want_q, want_e, want_gv, _ = oracle_grads(w, v, ms, bits, g)
    q, e, gv, _ = ours_grads(w, v, ms, bits, g, "cpu")
    assert same_bits(q, want_q) and torch.equal(e, want_e)
    t = w.float() / torch.pow(2.0, e).repeat_interleave(MX_GROUP, 1)[:, :cols] + v
    keep = ~just_below_a_power_of_two(t)
    assert same_bits(gv[keep], want_gv[keep])
    # every output is a grid value times its group's power-of-two scale, within max_norm * scale
    bound = MX_ELEMENTS[bits].max_norm * torch.pow(2.0, e).repeat_interleave(MX_GROUP, 1)[:, :cols]
    assert (q.float().abs() <= bound * (1 + 2 * torch.finfo(dtype).eps)).all()


# --------------------------------------------------------------------------------------
# torch.library integration
# --------------------------------------------------------------------------------------


def test_mx_opcheck(device):
    gen = torch.Generator().manual_seed(31)
    w = torch.randn(8, 70, generator=gen).to(torch.bfloat16).to(device)
    v = ((torch.rand(8, 70, generator=gen) - 0.5) * 0.5).to(device).requires_grad_()
    ms = torch.ones(8, 3, device=device).requires_grad_()
    g = torch.randn(8, 70, generator=gen).to(torch.bfloat16).to(device)
    x = torch.randn(2, 5, 64, generator=gen).to(torch.float16).to(device).requires_grad_()
    gx = torch.randn(2, 5, 64, generator=gen).to(torch.float16).to(device)
    o = torch.ops.autoround_fast
    for bits in BITS:
        for op, args in [
            (o.fake_quant_mx, (w, v, ms, bits)),
            (o.fake_quant_mx, (w.float()[:, :64].contiguous(), v.detach()[:, :64].contiguous().requires_grad_(),
                               ms.detach()[:, :2].contiguous().requires_grad_(), bits)),
            (o.fake_quant_mx_backward, (g, w, v.detach(), ms.detach(), bits)),
            (o.fake_quant_mx_activation, (x, bits)),
            (o.fake_quant_mx_activation_backward, (gx, x.detach(), bits)),
            (o.fake_quant_mx_activation, (x[:0].detach().clone().requires_grad_(), bits)),  # no tokens
        ]:
            torch.library.opcheck(op, args)


def test_mx_ops_trace_under_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(37)
    w = torch.randn(16, 64, generator=gen).to(torch.bfloat16).to(device)
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16).to(device)
    ref = torch.randn(4, 16, generator=gen).to(torch.bfloat16).to(device)

    def step(v, ms):
        w4, _ = ops.fake_quant_mx(w, v, ms, 4)
        w8, _ = ops.fake_quant_mx(w, v, ms, 8)
        y = ops.fake_quant_mx_activation(x, 8) @ (w4 + w8).t()
        return ops.masked_mse_loss(y, ref)

    def grads(fn):
        params = [(torch.rand(16, 64, generator=gen) * 0.1).to(device).requires_grad_(),
                  torch.ones(16, 2, device=device).requires_grad_()]
        loss = fn(*params)
        loss.backward()
        return [loss.detach()] + [p.grad for p in params]

    gen.manual_seed(5)
    eager = grads(step)
    gen.manual_seed(5)
    compiled = grads(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# CUDA and CPU kernels agree bit for bit (the same header, mx.h)
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mx_cuda_equals_cpu_bitwise(bits, dtype):
    """Every output and gradient, max_scale's included (both sum in element order): whole
    groups (the vector path), ragged rows, and a misaligned view (the scalar path)."""
    gen = torch.Generator().manual_seed(29 + bits)
    for rows, cols, offset in [(256, 4096, 0), (37, 1000, 0), (64, 256, 1), (3, 17, 0)]:
        w0, v0, ms = rand_inputs(rows, cols + offset, dtype, gen)
        w, v = w0[:, offset:], v0[:, offset:]
        ms = ms[:, :groups_of(cols)].contiguous()
        g = torch.randn(rows, cols, generator=gen).to(dtype)
        outs = []
        for dev in ("cpu", "cuda"):
            o = torch.ops.autoround_fast
            wd, vd, msd, gd = to(dev, w, v, ms, g)
            if offset:  # a view one element into a buffer: not 16-byte aligned
                wd = torch.cat([wd.new_zeros(1), wd.reshape(-1)])[1:].reshape(rows, cols)
                vd = torch.cat([vd.new_zeros(1), vd.reshape(-1)])[1:].reshape(rows, cols)
            q, e = o.fake_quant_mx(wd, vd, msd, bits)
            gv, gms = o.fake_quant_mx_backward(gd, wd, vd, msd, bits)
            y = o.fake_quant_mx_activation(wd, bits)
            gx = o.fake_quant_mx_activation_backward(gd, wd, bits)
            outs.append([t.cpu() for t in (q, e, gv, gms, y, gx)])
        for name, a, b in zip(("q", "exps", "grad v", "grad max_scale", "act", "act grad"), *outs):
            assert same_bits(a, b), (rows, cols, offset, name)
