"""The FP8 (e4m3) ops against their plain-PyTorch oracles (reference.fake_quant_fp8,
fake_quant_fp8_block and fake_quant_fp8_activation) and auto-round 0.15.1's quant_fp8_sym:
forward bit for bit, the gradients of V and x bit for bit, the gradient of max_scale close (its
sums run in another order than PyTorch's); and through opcheck."""

import pytest
import torch

import oracle
from autoround_fast import ops, reference
from autoround_fast.formats import E4M3_MAX, FP8_BLOCK, FP8_SCALE_MIN, SCALE_DTYPE_CODES, fp8_block_grid
from conftest import HAS_CUDA, one_thread
from test_ops import same_bits, seed_of

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SCALE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# ragged and whole 8-element chunks; rows of one and of several 2048-element tiles (2100, 4100)
SHAPES = [(64, 128), (33, 70), (7, 3), (3, 2100), (2, 4100), (1, 1)]
PER = [pytest.param(True, id="tensor"), pytest.param(False, id="row")]


def weight_case(shape, dtype, per_tensor, seed, device):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    v = (torch.rand(rows, cols, generator=gen) - 0.5) * 0.8  # V drifts within +-0.5 in tuning
    ms = torch.rand(1 if per_tensor else rows, 1, generator=gen) * 0.5 + 0.5
    g = torch.randn(rows, cols, generator=gen).to(dtype)
    return [t.to(device) for t in (w, v, ms, g)]


def grads_of(fn, params, grad_out):
    params = [p.detach().clone().requires_grad_() for p in params]
    out = fn(*params)
    (out.float() * grad_out.float()).sum().backward()
    return out.detach(), [p.grad for p in params]


def _magnitude(xg, v, g, s, amax):
    """Per group (row of xg): what the gradient of max_scale sums, (sum |g q| + sum |dV (x / s)
    / s|) / 448 * amax, in float64 from the oracle's intermediate values: the scale of the
    rounding error of any order of the sums."""
    x = (xg.to(torch.bfloat16) if xg.dtype == torch.float16 else xg).float()
    s = s.reshape(-1, 1)
    t = x / s
    y = t + v.reshape(xg.shape)
    q = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    gf = g.reshape(xg.shape).float()
    gy = torch.where(y.abs() <= E4M3_MAX, gf * s, torch.zeros_like(gf))
    mag = (gf * q).abs().double().sum(-1) + (gy * (t / s)).abs().double().sum(-1)
    return mag / E4M3_MAX * amax.double().reshape(-1)


def max_scale_grad_magnitude(w, v, ms, g, scale_dtype):
    wg = w.reshape(1, -1) if ms.numel() == 1 else w
    s = reference.fake_quant_fp8(w, v, ms, scale_dtype)[1]
    return _magnitude(wg, v, g, s, wg.abs().amax(-1)).reshape(ms.shape)


def act_max_scale_grad_magnitude(x, act_max, ms, g, scale_dtype):
    s = reference.fp8_activation_scale(act_max, ms, scale_dtype)
    return _magnitude(x.reshape(1, -1), torch.zeros(x.numel(), device=x.device), g, s, act_max).reshape(ms.shape)


def assert_max_scale_grad_close(ours, theirs, magnitude, scale_dtype, what="max_scale grad"):
    """rtol 1e-5 of the summands' magnitude; with a 16-bit scale dtype the gradient is itself
    rounded to that dtype, so two sums a few fp32 ulps apart may round one unit apart."""
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    tol = 1e-5 * magnitude.cpu()
    if scale_dtype != torch.float32:
        tol = tol + 2 * torch.finfo(scale_dtype).eps * theirs.abs()
    bad = (ours - theirs).abs() > tol
    assert torch.isfinite(ours).all() and not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} off, worst {((ours - theirs).abs() - tol).max():.3e}")


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_tensor", PER)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_forward_equals_oracle_and_auto_round(device, shape, dtype, scale_dtype, per_tensor):
    w, v, ms, _ = weight_case(shape, dtype, per_tensor, seed_of(shape, str(dtype)), device)
    q, s = ops.fake_quant_fp8(w, v, ms, scale_dtype)
    want_q, want_s = reference.fake_quant_fp8(w, v, ms, scale_dtype)
    assert same_bits(q, want_q) and same_bits(s, want_s)
    assert s.shape == ((1, 1) if per_tensor else (shape[0], 1))
    if scale_dtype == torch.float32:
        ar_q, ar_s = oracle.fp8(w, v, ms)
        assert same_bits(q, ar_q) and same_bits(s, ar_s)


@pytest.mark.parametrize("per_tensor", PER)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (3, 2100)])
def test_fp8_gradients_match_autograd_of_the_oracle(device, shape, dtype, scale_dtype, per_tensor):
    """dV bit for bit (one rounded product per element); d max_scale close (sums in another
    order). With fp32 scales, also against auto-round's own autograd."""
    w, v, ms, g = weight_case(shape, dtype, per_tensor, 7, device)
    want_q, (want_gv, want_gms) = grads_of(lambda v_, m_: reference.fake_quant_fp8(w, v_, m_, scale_dtype)[0],
                                           [v, ms], g)
    q, (gv, gms) = grads_of(lambda v_, m_: ops.fake_quant_fp8(w, v_, m_, scale_dtype)[0], [v, ms], g)
    assert same_bits(q, want_q)
    assert same_bits(gv, want_gv)
    mag = max_scale_grad_magnitude(w, v, ms, g, scale_dtype)
    assert_max_scale_grad_close(gms, want_gms, mag, scale_dtype)
    if scale_dtype == torch.float32:
        _, _, ar_gv, ar_gms = oracle.fp8(w, v, ms, grad_out=g)
        assert same_bits(gv, ar_gv)
        assert_max_scale_grad_close(gms, ar_gms, mag, scale_dtype, "max_scale grad vs auto-round")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (3, 2100), (2, 4100), (1, 1)])
def test_fp8_given_weight_amax(device, shape, dtype):
    """A per-tensor weight's maximum given by the caller (auto-round's tensor_max): the true
    one gives the computed one's bits, forward and backward; another one quantizes under it, as
    the oracle and auto-round's quant_fp8_sym with that tensor_max do: a larger one (every
    element inside the grid) and a smaller one (the largest elements clipped at 448, their
    gradient 0)."""
    w, v, ms, g = weight_case(shape, dtype, True, 11, device)
    true_amax = w.abs().amax().float().reshape(1)
    fn = lambda amax: lambda v_, m_: ops.fake_quant_fp8(w, v_, m_, torch.float32, amax)[0]
    q, (gv, gms) = grads_of(fn(None), [v, ms], g)
    q_given, (gv_given, gms_given) = grads_of(fn(true_amax), [v, ms], g)
    assert same_bits(q, q_given) and same_bits(gv, gv_given) and same_bits(gms, gms_given)

    for factor in (2.5, 0.5):
        other = true_amax * factor
        q_other, (gv_other, gms_other) = grads_of(fn(other), [v, ms], g)
        want_q, (want_gv, want_gms) = grads_of(
            lambda v_, m_: reference.fake_quant_fp8(w, v_, m_, torch.float32, other)[0], [v, ms], g)
        assert not same_bits(q_other, q)
        assert same_bits(q_other, want_q) and same_bits(gv_other, want_gv)
        ar_q, _, ar_gv, ar_gms = oracle.fp8(w, v, ms, grad_out=g, tensor_max=other)
        assert same_bits(q_other, ar_q) and same_bits(gv_other, ar_gv)
        s = reference.fake_quant_fp8(w, v, ms, torch.float32, other)[1]
        assert (factor < 1) == bool(((w.float() / s).abs() > E4M3_MAX).any()), factor  # the clip acts
        mag = _magnitude(w.reshape(1, -1), v, g, s, other).reshape(ms.shape)
        assert_max_scale_grad_close(gms_other, want_gms, mag, torch.float32)
        assert_max_scale_grad_close(gms_other, ar_gms, mag, torch.float32, "max_scale grad vs auto-round")


def test_fp8_weight_amax_refused_where_it_does_not_apply():
    w, v, ms, _ = weight_case((4, 16), torch.bfloat16, False, 3, "cpu")
    with pytest.raises(ValueError, match="weight_amax is for one scale per tensor"):
        ops.fake_quant_fp8(w, v, ms, torch.float32, torch.ones(1))
    with pytest.raises(ValueError, match="weight_amax must have 1 elements, got 2"):
        ops.fake_quant_fp8(w, v, torch.ones(1), torch.float32, torch.ones(2))
    with pytest.raises(ValueError, match="weight_amax is for one scale per tensor"):
        reference.fake_quant_fp8(w, v, ms, torch.float32, torch.ones(1))
    with pytest.raises(RuntimeError, match="weight_amax is for one scale per tensor"):
        torch.ops.autoround_fast.fake_quant_fp8(w, v, ms, 6, torch.ones(1))
    with pytest.raises(RuntimeError, match="weight_amax must be float32"):
        torch.ops.autoround_fast.fake_quant_fp8_backward(w, w, v, torch.ones(1), 6, torch.ones(1, dtype=torch.float64))


def test_fp8_weight_amax_must_be_a_finite_maximum():
    """A negative maximum is refused (it would floor the scale silently), as is a non-finite
    one, by the wrapper and by the CPU op in both directions."""
    w, v, _, _ = weight_case((4, 16), torch.bfloat16, True, 3, "cpu")
    one = torch.ones(1)
    with pytest.raises(ValueError, match="fake_quant_fp8: weight_amax must be >= 0"):
        ops.fake_quant_fp8(w, v, one, torch.float32, -one)
    raw = torch.ops.autoround_fast
    for bad, message in ((-one, "weight_amax must be >= 0"), (torch.tensor([float("nan")]), "weight_amax has 1 non-finite")):
        with pytest.raises(RuntimeError, match=f"fake_quant_fp8: {message}"):
            raw.fake_quant_fp8(w, v, one, 6, bad)
        with pytest.raises(RuntimeError, match=f"fake_quant_fp8_backward: {message}"):
            raw.fake_quant_fp8_backward(w, w, v, one, 6, bad)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
def test_fp8_weight_amax_on_another_device_is_named():
    w, v, _, _ = weight_case((4, 16), torch.bfloat16, True, 3, "cpu")
    for op, args in ((torch.ops.autoround_fast.fake_quant_fp8, (w, v, torch.ones(1), 6)),
                     (torch.ops.autoround_fast.fake_quant_fp8_backward, (w, w, v, torch.ones(1), 6))):
        with pytest.raises(RuntimeError, match="weight_amax"):
            op(*args, torch.ones(1, device="cuda"))


def edge_case(dtype):
    """Rows whose maximum is 448, so that the scale is exactly 1 (on the GPU too, where
    448 * fp32(1/448) rounds to 1): y = W + V lands on chosen points of the e4m3 grid.
    row 0: every e4m3 grid point and every midpoint between two (ties, to even), both signs
    row 1: at and beyond +-448 once V is added (the clamp, bounds inclusive)
    row 2: all zeros (the scale floor; no gradient to max_scale)
    row 3: the dtype's subnormals beside 448; row 4: only subnormals (the floor again)
    row 5: -0 and small negatives that round to zero, with V of either signed zero."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2
    pos = torch.cat([grid, mids])
    row0 = torch.cat([torch.tensor([E4M3_MAX]), pos, -pos])
    cols = row0.numel()
    tiny = torch.finfo(dtype).tiny
    w = torch.zeros(6, cols)
    v = torch.zeros(6, cols)
    w[0] = row0
    w[1, :9] = torch.tensor([448.0, -448.0, 440.0, 448.0, 448.0, -448.0, 440.0, 440.0, 300.0])
    v[1, :9] = torch.tensor([0.0, 0.0, 16.0, 1e-3, -1e-3, -0.5, 8.5, 8.0, 148.0])
    w[3, :5] = torch.tensor([448.0, tiny / 2, -tiny / 4, tiny * 0.75, -tiny])
    w[4, :4] = torch.tensor([tiny / 2, -tiny / 8, tiny, -tiny * 0.5])
    w[5, :6] = torch.tensor([448.0, -0.0, -0.0, -1e-4, -2e-3, 1e-4])
    v[5, :6] = torch.tensor([0.0, -0.0, 0.0, 0.0, -0.0, -0.0])
    w = w.to(dtype)
    assert torch.equal(w[0].float(), row0), "the grid and its midpoints are exact in every dtype"
    return w, v


@pytest.mark.parametrize("per_tensor", PER)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_edges_equal_oracle(device, dtype, per_tensor):
    w, v = edge_case(dtype)
    rows = w.shape[0]
    ms = torch.ones(1 if per_tensor else rows, 1)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    w, v, ms, g = [t.to(device) for t in (w, v, ms, g)]
    for scale_dtype in SCALE_DTYPES:
        q, s = ops.fake_quant_fp8(w, v, ms, scale_dtype)
        want_q, want_s = reference.fake_quant_fp8(w, v, ms, scale_dtype)
        assert same_bits(q, want_q) and same_bits(s, want_s), scale_dtype
        if not per_tensor:
            assert s[0].item() == 1.0 and s[2].item() == torch.tensor(FP8_SCALE_MIN).to(scale_dtype).item()
        if scale_dtype == torch.float32:
            ar_q, ar_s = oracle.fp8(w, v, ms)
            assert same_bits(q, ar_q) and same_bits(s, ar_s)
        _, (want_gv, want_gms) = grads_of(lambda v_, m_: reference.fake_quant_fp8(w, v_, m_, scale_dtype)[0],
                                          [v, ms], g)
        _, (gv, gms) = grads_of(lambda v_, m_: ops.fake_quant_fp8(w, v_, m_, scale_dtype)[0], [v, ms], g)
        assert same_bits(gv, want_gv), scale_dtype
        assert_max_scale_grad_close(gms, want_gms, max_scale_grad_magnitude(w, v, ms, g, scale_dtype), scale_dtype)
    if not per_tensor:  # the ties went to even, the clamp held, -0 came out +0
        assert (q[5].float().view(torch.int32) != torch.tensor(-0.0).view(torch.int32)).all()
        assert (gms[2] == 0).all() and (gms[4] == 0).all()
        assert gv[1, :9].cpu().eq(0).tolist() == [False, False, True, True, False, True, True, False, False]


def test_fp8_all_zero_tensor_takes_the_scale_floor(device):
    w = torch.zeros(4, 40, dtype=torch.bfloat16, device=device)
    v = (torch.rand(4, 40, generator=torch.Generator().manual_seed(1)) - 0.5).to(device)
    g = torch.randn(4, 40, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(device)
    ms = torch.ones(1, device=device)
    q, (gv, gms) = grads_of(lambda v_, m_: ops.fake_quant_fp8(w, v_, m_)[0], [v, ms], g)
    want_q, (want_gv, want_gms) = grads_of(lambda v_, m_: reference.fake_quant_fp8(w, v_, m_)[0], [v, ms], g)
    assert same_bits(q, want_q) and same_bits(gv, want_gv)
    assert ops.fake_quant_fp8(w, v, ms)[1].item() == torch.tensor(FP8_SCALE_MIN).item()
    assert gms.item() == 0 and want_gms.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_rounds_every_value_as_torch(device, dtype):
    """Under a scale of 1: every fp32 (bf16) value within 3 ulps of each e4m3 grid point and
    midpoint, and a sweep of every 4099th fp32 bit pattern up to 448, come out as torch's cast
    to float8_e4m3fn (zeros as +0, the straight-through estimator's)."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    points = torch.cat([grid, (grid[:-1] + grid[1:]) / 2])
    ulps = torch.arange(-3, 4, dtype=torch.int32)
    if dtype == torch.float32:
        near = (points.view(torch.int32)[:, None] + ulps).reshape(-1).view(torch.float32)
        sweep = torch.arange(0, 0x43E00000, 4099, dtype=torch.int32).view(torch.float32)
    else:
        near = (points.to(dtype).view(torch.int16)[:, None] + ulps.to(torch.int16)).reshape(-1).view(dtype).float()
        sweep = torch.arange(0, 0x43E0, dtype=torch.int16).view(dtype).float()
    vals = torch.cat([near, sweep])
    vals = vals[torch.isfinite(vals)].abs().clamp(max=E4M3_MAX)  # below 0: negative bit patterns
    vals = torch.cat([torch.tensor([E4M3_MAX]), vals, -vals]).to(dtype)
    w = vals.reshape(1, -1).to(device)
    q, s = ops.fake_quant_fp8(w, torch.zeros(w.shape, device=device), torch.ones(1, device=device))
    assert s.item() == 1.0
    want = vals.float().to(torch.float8_e4m3fn).float() + 0.0  # the STE's +0
    assert same_bits(q.float().reshape(-1), want.to(device))


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_fp8_max_scale_grad_rounds_through_the_scale_dtype(device, scale_dtype):
    """dS = 1.25 g - g = 0.25 g exactly, for one element x = 1, V = 0.25 and g = 1 + 2^-13 (beside
    the maximum 448, whose gradient is 0: the scale is 1). The casts of the scale to its dtype
    and back round dS there: 0.25 for bf16 and fp16, 0.25 g for fp32; d max_scale = dS / 448 *
    448. Likewise for an activation."""
    g1 = 1 + 2.0**-13
    w = torch.tensor([[448.0, 1.0]], device=device)
    v = torch.tensor([[0.0, 0.25]], device=device)
    g = torch.tensor([[0.0, g1]], device=device)
    want = 0.25 * (g1 if scale_dtype == torch.float32 else 1.0)
    for ms in (torch.ones(1, device=device), torch.ones(1, 1, device=device)):
        _, (_, gms) = grads_of(lambda v_, m_: ops.fake_quant_fp8(w, v_, m_, scale_dtype)[0], [v, ms], g)
        _, (_, want_gms) = grads_of(lambda v_, m_: reference.fake_quant_fp8(w, v_, m_, scale_dtype)[0], [v, ms], g)
        assert gms.item() == pytest.approx(want, rel=1e-6) and want_gms.item() == pytest.approx(want, rel=1e-6)
    # an activation has no V: x = 450 is clamped (q = 448, dV = 0), so dS = 448 g
    act_max = torch.tensor(E4M3_MAX, device=device)
    ms = torch.ones(1, device=device)
    x = torch.tensor([450.0, 0.0], device=device)
    g = torch.tensor([g1, 0.0], device=device)
    _, (_, gms) = grads_of(lambda x_, m_: ops.fake_quant_fp8_activation(x_, act_max, m_, scale_dtype), [x, ms], g)
    want = 448.0 * (g1 if scale_dtype == torch.float32 else 1.0)
    assert gms.item() == pytest.approx(want, rel=1e-6)


def test_fp8_grid_is_torchs_cast(tmp_path):
    """The kernels' branch-free e4m3 rounding (csrc/fp8/fp8.h), compiled with the host compiler
    and the CPU kernels' flags, against c10's float8_e4m3fn conversion: every 61st fp32 bit
    pattern up to 448 and every bf16 and fp16 value, both signs (tests/ops/native/
    fp8_grid_check.cpp; without --stride it checks all 2.3e9 values); a mutant on a grid twice as
    coarse must fail."""
    import pathlib
    import shutil
    import subprocess

    import torch.utils.cpp_extension

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    here = pathlib.Path(__file__).resolve().parent
    exe = tmp_path / "fp8_grid_check"
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()[:1]]
    subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", f"-I{here.parents[1] / 'csrc'}",
                    *includes, str(here / "native" / "fp8_grid_check.cpp"), "-o", str(exe)], check=True)
    ok = subprocess.run([str(exe), "--stride", "61"], capture_output=True, text=True)
    assert ok.returncode == 0 and " 0 mismatches" in ok.stdout, ok.stdout
    mutant = subprocess.run([str(exe), "--mutant", "--stride", "61"], capture_output=True, text=True)
    assert mutant.returncode == 1 and "mismatch:" in mutant.stdout


# --------------------------------------------------------------------------------------
# weights in 128 x 128 blocks (FP8_BLOCK)
# --------------------------------------------------------------------------------------

# whole blocks; partial last rows and columns of blocks; one partial block; one whole block
BLOCK_SHAPES = [(256, 384), (200, 130), (5, 7), (128, 128)]


def as_blocks(t):
    """[rows, cols] zero-padded to whole blocks, as [blocks (row-major over the grid), 128 * 128]."""
    rows, cols = t.shape
    rb, cb = fp8_block_grid(rows, cols)
    t = torch.nn.functional.pad(t, (0, cb * FP8_BLOCK - cols, 0, rb * FP8_BLOCK - rows))
    return t.reshape(rb, FP8_BLOCK, cb, FP8_BLOCK).transpose(1, 2).reshape(rb * cb, -1)


def block_case(shape, dtype, seed, device):
    """Blocks of maxima spread over 2^-4 .. 2^4, so that a scale taken from the wrong block shows."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    rb, cb = fp8_block_grid(rows, cols)
    spread = 2.0 ** torch.randint(-4, 5, (rb, cb), generator=gen).float()
    spread = spread.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
    w = (torch.randn(rows, cols, generator=gen) * spread).to(dtype)
    v = (torch.rand(rows, cols, generator=gen) - 0.5) * 0.8
    ms = torch.rand(rb, cb, generator=gen) * 0.5 + 0.5
    g = torch.randn(rows, cols, generator=gen).to(dtype)
    return [t.to(device) for t in (w, v, ms, g)]


def block_max_scale_grad_magnitude(w, v, ms, g, scale_dtype):
    s = reference.fake_quant_fp8_block(w, v, ms, scale_dtype)[1]
    wb = as_blocks(w)
    return _magnitude(wb, as_blocks(v), as_blocks(g), s, wb.abs().amax(-1)).reshape(ms.shape)


def block_grads(fn, w, v, ms, g, scale_dtype):
    """(Wq, dV, d max_scale) of fn (ops or reference .fake_quant_fp8_block) under grad_out g."""
    q, (gv, gms) = grads_of(lambda v_, m_: fn(w, v_, m_, scale_dtype)[0], [v, ms], g)
    return q, gv, gms


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BLOCK_SHAPES)
def test_fp8_block_forward_equals_oracle(device, shape, dtype, scale_dtype):
    w, v, ms, _ = block_case(shape, dtype, seed_of(shape, str(dtype)), device)
    q, s = ops.fake_quant_fp8_block(w, v, ms, scale_dtype)
    want_q, want_s = reference.fake_quant_fp8_block(w, v, ms, scale_dtype)
    assert same_bits(q, want_q) and same_bits(s, want_s)
    assert s.shape == fp8_block_grid(*shape)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BLOCK_SHAPES)
def test_fp8_block_gradients_match_autograd_of_the_oracle(device, shape, dtype, scale_dtype):
    """dV bit for bit; d max_scale close (each block's sums in fp8_block.h's order)."""
    w, v, ms, g = block_case(shape, dtype, 11, device)
    want_q, want_gv, want_gms = block_grads(reference.fake_quant_fp8_block, w, v, ms, g, scale_dtype)
    q, gv, gms = block_grads(ops.fake_quant_fp8_block, w, v, ms, g, scale_dtype)
    assert same_bits(q, want_q) and same_bits(gv, want_gv)
    assert gms.shape == ms.shape
    mag = block_max_scale_grad_magnitude(w, v, ms, g, scale_dtype)
    assert_max_scale_grad_close(gms, want_gms, mag, scale_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_block_oracle_is_the_per_tensor_oracle_on_each_block(device, dtype):
    """The block oracle on a weight with partial edge blocks equals the per-tensor oracle run on
    each block alone, its scale, Wq and gradients: the block oracle's grid, padding and
    broadcast of the scales hold."""
    w, v, ms, g = block_case((300, 200), dtype, 13, device)
    for scale_dtype in SCALE_DTYPES:
        q, gv, gms = block_grads(reference.fake_quant_fp8_block, w, v, ms, g, scale_dtype)
        s = reference.fake_quant_fp8_block(w, v, ms, scale_dtype)[1]
        rb, cb = ms.shape
        for i in range(rb):
            for j in range(cb):
                at = (slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK))
                wb, vb, gb, mb = w[at], v[at], g[at], ms[i, j].reshape(1)
                bq, bgv, bgms = block_grads(reference.fake_quant_fp8, wb, vb, mb, gb, scale_dtype)
                bs = reference.fake_quant_fp8(wb, vb, mb, scale_dtype)[1]
                assert same_bits(q[at], bq) and same_bits(s[i, j].reshape(1, 1), bs), (scale_dtype, i, j)
                assert same_bits(gv[at], bgv), (scale_dtype, i, j)
                mag = max_scale_grad_magnitude(wb, vb, mb, gb, scale_dtype)
                assert_max_scale_grad_close(gms[i, j].reshape(1), bgms, mag, scale_dtype)


def block_edge_case(dtype):
    """edge_case's rows and a row of 448s below them, so that every block (1 x 4, the last one
    partial) has the maximum 448 and the scale 1: its grid points, midpoints, clamp, zeros and
    subnormals land where edge_case puts them."""
    w, v = edge_case(dtype)
    w = torch.cat([w, torch.full((1, w.shape[1]), E4M3_MAX, dtype=dtype)])
    return w, torch.cat([v, torch.zeros(1, v.shape[1])])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_block_edges_equal_oracle(device, dtype):
    w, v = block_edge_case(dtype)
    ms = torch.ones(fp8_block_grid(*w.shape))
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    w, v, ms, g = [t.to(device) for t in (w, v, ms, g)]
    for scale_dtype in SCALE_DTYPES:
        q, s = ops.fake_quant_fp8_block(w, v, ms, scale_dtype)
        want_q, want_s = reference.fake_quant_fp8_block(w, v, ms, scale_dtype)
        assert same_bits(q, want_q) and same_bits(s, want_s), scale_dtype
        assert (s == 1).all()
        want_q, want_gv, want_gms = block_grads(reference.fake_quant_fp8_block, w, v, ms, g, scale_dtype)
        _, gv, gms = block_grads(ops.fake_quant_fp8_block, w, v, ms, g, scale_dtype)
        assert same_bits(gv, want_gv), scale_dtype
        mag = block_max_scale_grad_magnitude(w, v, ms, g, scale_dtype)
        assert_max_scale_grad_close(gms, want_gms, mag, scale_dtype)
    # the ties went to even (the grid's points stay, its midpoints go to the even neighbour), the
    # clamp held, -0 came out +0
    grid_and_mids = w[0, 1:254].float()
    assert same_bits(q[0, 1:254].float(), grid_and_mids.to(torch.float8_e4m3fn).float())
    assert (q[5].float().view(torch.int32) != torch.tensor(-0.0).view(torch.int32)).all()
    assert gv[1, :9].cpu().eq(0).tolist() == [False, False, True, True, False, True, True, False, False]


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_fp8_block_zero_and_subnormal_blocks_take_the_scale_floor(device, scale_dtype):
    """A block of zeros and one of the dtype's subnormals only take the floor, with no gradient
    to their max_scale; their neighbours are untouched."""
    w, v, ms, g = block_case((256, 384), torch.bfloat16, 5, "cpu")
    tiny = torch.finfo(torch.bfloat16).tiny
    w[:128, 128:256] = 0
    w[128:, 256:] = (torch.rand(128, 128, generator=torch.Generator().manual_seed(6)) - 0.5) * tiny
    w, v, ms, g = [t.to(device) for t in (w, v, ms, g)]
    want_q, want_gv, want_gms = block_grads(reference.fake_quant_fp8_block, w, v, ms, g, scale_dtype)
    q, gv, gms = block_grads(ops.fake_quant_fp8_block, w, v, ms, g, scale_dtype)
    s = ops.fake_quant_fp8_block(w, v, ms, scale_dtype)[1]
    assert same_bits(q, want_q) and same_bits(gv, want_gv)
    floor = torch.tensor(FP8_SCALE_MIN).to(scale_dtype).float().item()
    assert s[0, 1].item() == floor and s[1, 2].item() == floor
    assert (s.flatten()[[0, 2, 3, 4]] > floor).all()
    assert gms[0, 1].item() == 0 and gms[1, 2].item() == 0 and want_gms[0, 1].item() == 0
    assert (gms.flatten()[[0, 2, 3, 4]] != 0).all()


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_fp8_block_max_scale_grad_of_each_block(device, scale_dtype):
    """As test_fp8_max_scale_grad_rounds_through_the_scale_dtype, in each block of a 130 x 260
    weight (2 x 3 blocks, partial edges): the block's 448 and, at a place of its own, x = 1
    with V = 0.25 and g = (1 + 2^-13) * k for block k; elsewhere zeros. d max_scale of block k
    is 0.25 g, rounded through the scale dtype: each block's gradient lands on its own scale."""
    g1 = 1 + 2.0**-13
    w, v, g = torch.zeros(130, 260), torch.zeros(130, 260), torch.zeros(130, 260)
    rb, cb = fp8_block_grid(130, 260)
    want = torch.zeros(rb, cb)
    for k in range(rb * cb):
        r, c = k // cb * FP8_BLOCK, k % cb * FP8_BLOCK
        w[r, c] = E4M3_MAX
        w[r + 1, c + k % 3 + 1] = 1.0
        v[r + 1, c + k % 3 + 1] = 0.25
        g[r + 1, c + k % 3 + 1] = g1 * (k + 1)
        want[k // cb, k % cb] = (0.25 * g1 * (k + 1)) if scale_dtype == torch.float32 else \
            torch.tensor(0.25 * g1 * (k + 1)).to(scale_dtype).item()
    w, v, g = w.to(device), v.to(device), g.to(device)
    ms = torch.ones(rb, cb, device=device)
    _, _, gms = block_grads(ops.fake_quant_fp8_block, w, v, ms, g, scale_dtype)
    _, _, want_gms = block_grads(reference.fake_quant_fp8_block, w, v, ms, g, scale_dtype)
    torch.testing.assert_close(gms.cpu(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(want_gms.cpu(), want, rtol=1e-6, atol=0)


def _block_outputs(w, v, ms, g):
    q, gv, gms = block_grads(ops.fake_quant_fp8_block, w, v, ms, g, torch.bfloat16)
    return [t.cpu() for t in (q, ops.fake_quant_fp8_block(w, v, ms, torch.bfloat16)[1], gv, gms)]


def _block_determinism_case(device, rows, cols):
    """Blocks whose maximum is 448 * 2^k (k from -3 to 4): with max_scale 1 the scales are
    powers of two on either device (448 * fp32(1/448) rounds to 1), so the CPU and the GPU
    agree bit for bit."""
    gen = torch.Generator().manual_seed(19)
    w = torch.randn(rows, cols, generator=gen)
    rb, cb = fp8_block_grid(rows, cols)
    peaks = E4M3_MAX * 2.0 ** torch.randint(-3, 5, (rb, cb), generator=gen).float()
    w[::FP8_BLOCK, ::FP8_BLOCK] = peaks * 8  # every block's maximum, far above its randn
    v = (torch.rand(rows, cols, generator=gen) - 0.5) * 0.8
    g = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    return [t.to(device) for t in (w.to(torch.bfloat16), v, torch.ones(rb, cb), g)]


def test_fp8_block_same_bits_on_every_run(device):
    case = _block_determinism_case(device, 600, 1000)
    first = _block_outputs(*case)
    for a, b in zip(first, _block_outputs(*case)):
        assert same_bits(a, b)
    if device == "cpu":  # one thread: each block's sums are in its own order, whoever runs it
        with one_thread():
            for a, b in zip(first, _block_outputs(*case)):
                assert same_bits(a, b)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
@pytest.mark.parametrize("rows,cols", [(600, 1000), (37, 1001), (128, 128), (256, 384), (3, 7), (130, 8)])
def test_fp8_block_cuda_equals_cpu_bitwise(rows, cols):
    """The 16-byte and scalar paths (1001, 7: ragged rows), whole and partial blocks, against the
    CPU's replay of each block's order (fp8_block.h), where the two devices' scales agree."""
    cpu = _block_outputs(*_block_determinism_case("cpu", rows, cols))
    gpu = _block_outputs(*_block_determinism_case("cuda", rows, cols))
    for name, a, b in zip(["q", "scale", "grad v", "grad max_scale"], cpu, gpu):
        assert same_bits(a, b), name


# --------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------


def act_case(shape, dtype, seed, device, clip=0.9):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    act_max = x.float().abs().amax() * clip  # the calibrated maximum, below some |x|: the clamp acts
    ms = torch.rand(1, generator=gen) * 0.3 + 0.7
    g = torch.randn(shape, generator=gen).to(dtype)
    return [t.to(device) for t in (x, act_max, ms, g)]


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 9, 64), (3, 70), (5, 8), (4100,), (1,)])
def test_fp8_activation_equals_oracle_and_auto_round(device, shape, dtype, scale_dtype):
    x, act_max, ms, g = act_case(shape, dtype, 5, device)
    q = ops.fake_quant_fp8_activation(x, act_max, ms, scale_dtype)
    want = reference.fake_quant_fp8_activation(x, act_max, ms, scale_dtype)
    assert same_bits(q, want)
    want_q, (want_gx, want_gms) = grads_of(
        lambda x_, m_: reference.fake_quant_fp8_activation(x_, act_max, m_, scale_dtype), [x, ms], g)
    q, (gx, gms) = grads_of(lambda x_, m_: ops.fake_quant_fp8_activation(x_, act_max, m_, scale_dtype), [x, ms], g)
    assert same_bits(q, want_q)
    assert same_bits(gx, want_gx)
    mag = act_max_scale_grad_magnitude(x, act_max, ms, g, scale_dtype)
    assert_max_scale_grad_close(gms, want_gms, mag, scale_dtype)
    if scale_dtype == torch.float32:
        ar_q, ar_gx, ar_gms = oracle.fp8_activation(x, act_max, ms, grad_out=g)
        assert same_bits(q, ar_q) and same_bits(gx, ar_gx)
        assert_max_scale_grad_close(gms, ar_gms, mag, scale_dtype, "max_scale grad vs auto-round")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_activation_edges_equal_oracle(device, dtype):
    """The weight edge values as an activation under act_max = 448 (scale 1), and a zero
    act_max (the scale floor)."""
    w, _ = edge_case(dtype)
    x = w.to(device)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    ms = torch.ones(1, device=device)
    for act_max in (torch.tensor(E4M3_MAX), torch.tensor(E4M3_MAX / 2), torch.tensor(0.0)):
        act_max = act_max.to(device)
        for scale_dtype in SCALE_DTYPES:
            want_q, (want_gx, want_gms) = grads_of(
                lambda x_, m_: reference.fake_quant_fp8_activation(x_, act_max, m_, scale_dtype), [x, ms], g)
            q, (gx, gms) = grads_of(lambda x_, m_: ops.fake_quant_fp8_activation(x_, act_max, m_, scale_dtype),
                                    [x, ms], g)
            assert same_bits(q, want_q) and same_bits(gx, want_gx), (act_max, scale_dtype)
            mag = act_max_scale_grad_magnitude(x, act_max, ms, g, scale_dtype)
            assert_max_scale_grad_close(gms, want_gms, mag, scale_dtype)


# --------------------------------------------------------------------------------------
# determinism, CPU and GPU
# --------------------------------------------------------------------------------------


def _all_outputs(device, w, v, ms_t, ms_r, g, x, act_max, ms_a, gx_out):
    outs = []
    for ms in (ms_t, ms_r):
        q, (gv, gms) = grads_of(lambda v_, m_: ops.fake_quant_fp8(w, v_, m_, torch.bfloat16)[0], [v, ms], g)
        outs += [q, ops.fake_quant_fp8(w, v, ms, torch.bfloat16)[1], gv, gms]
    q, (gx, gms) = grads_of(lambda x_, m_: ops.fake_quant_fp8_activation(x_, act_max, m_), [x, ms_a], gx_out)
    return [t.cpu() for t in outs + [q, gx, gms]]


def _determinism_case(device, rows=600, cols=1000):
    """Rows whose maximum is 448 * 2^k (k from -3 to 4): with max_scale 1 the scales are powers
    of two on either device (448 * fp32(1/448) rounds to 1), so the CPU and the GPU agree
    bit for bit. 600 x 1000 is 293 tiles: more than one per final thread."""
    gen = torch.Generator().manual_seed(17)
    w = torch.randn(rows, cols, generator=gen)
    w[:, 3] = E4M3_MAX * 2.0 ** torch.randint(-3, 5, (rows,), generator=gen).float()
    w[rows // 2, min(5, cols - 1)] = -E4M3_MAX * 32  # the tensor's maximum
    w = w.to(torch.bfloat16)
    v = (torch.rand(rows, cols, generator=gen) - 0.5) * 0.8
    g = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    x = (torch.randn(rows, cols, generator=gen) * 40).to(torch.bfloat16)
    act_max = torch.tensor(E4M3_MAX / 4)
    return [t.to(device) for t in (w, v, torch.ones(1), torch.ones(rows, 1), g, x, act_max, torch.ones(1), g)]


def test_fp8_same_bits_on_every_run(device):
    case = _determinism_case(device)
    first = _all_outputs(device, *case)
    for a, b in zip(first, _all_outputs(device, *case)):
        assert same_bits(a, b)
    if device == "cpu":  # the sums' order is fixed by the tiles, not by the threads
        with one_thread():
            for a, b in zip(first, _all_outputs(device, *case)):
                assert same_bits(a, b)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")
@pytest.mark.parametrize("rows,cols", [(600, 1000), (37, 1001), (4, 17000), (9, 4100), (5, 2050), (3, 7)])
def test_fp8_cuda_equals_cpu_bitwise(rows, cols):
    """Every kernel path (per-row forward with the row in registers or read twice, ragged rows,
    the per-row backward's summing warp, the per-tensor tiles) against the CPU's replay of its
    order, where the two devices' scales agree (_determinism_case)."""
    cpu = _all_outputs("cpu", *_determinism_case("cpu", rows, cols))
    gpu = _all_outputs("cuda", *_determinism_case("cuda", rows, cols))
    names = ["q", "scale", "grad v", "grad max_scale"]
    for i, (a, b) in enumerate(zip(cpu, gpu)):
        what = (["tensor " + n for n in names] + ["row " + n for n in names] + ["act q", "act grad x", "act grad ms"])[i]
        assert same_bits(a, b), what


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fp8_rejects_non_finite_inputs(device, bad):
    w = torch.randn(4, 32, device=device)
    w[2, 5] = bad
    v, ms = torch.zeros(4, 32, device=device), torch.ones(1, device=device)
    with pytest.raises(ValueError, match="fake_quant_fp8: weight has non-finite"):
        ops.fake_quant_fp8(w, v, ms)
    with pytest.raises(ValueError, match="fake_quant_fp8_activation: x has non-finite"):
        ops.fake_quant_fp8_activation(w, torch.tensor(1.0, device=device), ms)
    with pytest.raises(ValueError, match="fake_quant_fp8_activation: act_max has non-finite"):
        ops.fake_quant_fp8_activation(torch.ones(3, device=device), torch.tensor(bad, device=device), ms)
    good = torch.randn(4, 32, device=device)
    with pytest.raises(ValueError, match="fake_quant_fp8: weight_amax has non-finite"):
        ops.fake_quant_fp8(good, v, ms, torch.float32, torch.tensor([bad], device=device))
    if device == "cpu":  # the kernels count them too (the C++ checks are a last resort on the GPU)
        with pytest.raises(RuntimeError, match="fake_quant_fp8: weight has 1 non-finite"):
            torch.ops.autoround_fast.fake_quant_fp8(w, v, ms, 6)
        with pytest.raises(RuntimeError, match="fake_quant_fp8: weight has 1 non-finite"):  # its maximum given
            torch.ops.autoround_fast.fake_quant_fp8(w, v, ms, 6, good.abs().amax().reshape(1))
        with pytest.raises(RuntimeError, match="fake_quant_fp8: weight_amax has 1 non-finite"):
            torch.ops.autoround_fast.fake_quant_fp8(good, v, ms, 6, torch.tensor([bad]))
        with pytest.raises(RuntimeError, match="fake_quant_fp8_activation: x has 1 non-finite"):
            torch.ops.autoround_fast.fake_quant_fp8_activation(w, torch.ones(1), ms, 6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fp8_block_rejects_non_finite_inputs(device, bad):
    w = torch.randn(200, 130, device=device, dtype=torch.bfloat16)
    w[150, 129] = bad  # in the last, partial block
    v, ms = torch.zeros(200, 130, device=device), torch.ones(2, 2, device=device)
    with pytest.raises(ValueError, match="fake_quant_fp8_block: weight has non-finite"):
        ops.fake_quant_fp8_block(w, v, ms)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="fake_quant_fp8_block: weight has 1 non-finite"):
            torch.ops.autoround_fast.fake_quant_fp8_block(w, v, ms, 6)


def test_fp8_block_bad_arguments_name_the_argument():
    w, v = torch.randn(200, 130), torch.zeros(200, 130)
    ms = torch.ones(2, 2)
    with pytest.raises(ValueError, match="fake_quant_fp8_block: scale_dtype must be one of"):
        ops.fake_quant_fp8_block(w, v, ms, torch.float64)
    with pytest.raises(ValueError, match=r"max_scale must have 4 elements \(one per 128 x 128 block, a \[2, 2\] grid"):
        ops.fake_quant_fp8_block(w, v, torch.ones(200, 1))
    with pytest.raises(ValueError, match="fake_quant_fp8_block: max_scale must be float32"):
        ops.fake_quant_fp8_block(w, v, ms.bfloat16())
    with pytest.raises(ValueError, match="fake_quant_fp8_block: v must be float32"):
        ops.fake_quant_fp8_block(w, v.bfloat16(), ms)
    with pytest.raises(ValueError, match="fake_quant_fp8_block: v must have 26000 elements"):
        ops.fake_quant_fp8_block(w, v[:, :-1], ms)
    with pytest.raises(ValueError, match="fake_quant_fp8_block: weight must be 2-D"):
        ops.fake_quant_fp8_block(w.reshape(-1), v.reshape(-1), ms)
    with pytest.raises(ValueError, match="fake_quant_fp8_block: weight must be float32, bfloat16 or float16"):
        ops.fake_quant_fp8_block(w.double(), v, ms)
    with pytest.raises(ValueError, match="fake_quant_fp8_block: weight must be non-empty"):
        ops.fake_quant_fp8_block(w[:0], v[:0], torch.ones(0, 2))
    o = torch.ops.autoround_fast  # the C++ checks behind them
    with pytest.raises(RuntimeError, match="fake_quant_fp8_block: scale_dtype must be float16, bfloat16 or float32"):
        o.fake_quant_fp8_block(w, v, ms, 7)
    with pytest.raises(RuntimeError, match="fake_quant_fp8_block: max_scale must have 4 elements, got 200"):
        o.fake_quant_fp8_block(w, v, torch.ones(200), 6)
    with pytest.raises(RuntimeError, match="fake_quant_fp8_block_backward: max_scale must have 4 elements"):
        o.fake_quant_fp8_block_backward(w, w, v, torch.ones(3), 6)
    with pytest.raises(RuntimeError, match="fake_quant_fp8_block_backward: grad must have dtype float32"):
        o.fake_quant_fp8_block_backward(w.bfloat16(), w, v, ms, 6)


def test_fp8_bad_arguments_name_the_argument():
    w, v = torch.randn(4, 32), torch.zeros(4, 32)
    with pytest.raises(ValueError, match="fake_quant_fp8: scale_dtype must be one of"):
        ops.fake_quant_fp8(w, v, torch.ones(1), torch.float64)
    with pytest.raises(ValueError, match=r"max_scale must have 1 element \(one scale for the tensor\) or 4 \(one"):
        ops.fake_quant_fp8(w, v, torch.ones(3, 1))
    with pytest.raises(ValueError, match="max_scale must be float32"):
        ops.fake_quant_fp8(w, v, torch.ones(4, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="v must be float32"):
        ops.fake_quant_fp8(w, v.bfloat16(), torch.ones(1))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.fake_quant_fp8(w.reshape(-1), v.reshape(-1), torch.ones(1))
    with pytest.raises(ValueError, match="weight must be float32, bfloat16 or float16"):
        ops.fake_quant_fp8(w.double(), v, torch.ones(1))
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="fake_quant_fp8_activation: scale_dtype must be one of"):
        ops.fake_quant_fp8_activation(x, torch.ones(1), torch.ones(1), 6)
    with pytest.raises(ValueError, match="act_max must have 1 elements"):
        ops.fake_quant_fp8_activation(x, torch.ones(2), torch.ones(1))
    with pytest.raises(ValueError, match="max_scale must have 1 elements"):
        ops.fake_quant_fp8_activation(x, torch.ones(1), torch.ones(2, 16))
    # the C++ checks behind them (CPU: an exception from a stable-ABI kernel is fatal on some GPU
    # builds of torch, which is why the wrappers check first)
    o = torch.ops.autoround_fast
    with pytest.raises(RuntimeError, match="fake_quant_fp8: scale_dtype must be float16, bfloat16 or float32"):
        o.fake_quant_fp8(w, v, torch.ones(1), 7)
    with pytest.raises(RuntimeError, match=r"fake_quant_fp8_backward: max_scale must have 1 element .* or 4 "):
        o.fake_quant_fp8_backward(w, w, v, torch.ones(3), 6)
    with pytest.raises(RuntimeError, match="fake_quant_fp8_activation: scale_dtype must be"):
        o.fake_quant_fp8_activation(x, torch.ones(1), torch.ones(1), 4)
    with pytest.raises(RuntimeError, match="fake_quant_fp8_activation_backward: act_max must have 1 elements"):
        o.fake_quant_fp8_activation_backward(x, x, torch.ones(2), torch.ones(1), 6)


# --------------------------------------------------------------------------------------
# torch.library integration
# --------------------------------------------------------------------------------------


def test_fp8_opcheck(device):
    gen = torch.Generator().manual_seed(41)
    w = torch.randn(8, 40, generator=gen).to(torch.bfloat16).to(device)
    g = torch.randn(8, 40, generator=gen).to(torch.bfloat16).to(device)
    v = torch.zeros(8, 40, device=device)
    x = torch.randn(2, 5, 32, generator=gen).to(torch.float16).to(device)
    gx = torch.randn(2, 5, 32, generator=gen).to(torch.float16).to(device)
    act_max = torch.full((1,), 3.0, device=device)
    bf16, f16 = SCALE_DTYPE_CODES[torch.bfloat16], SCALE_DTYPE_CODES[torch.float16]

    def tunable(t):
        return t.detach().clone().requires_grad_()

    o = torch.ops.autoround_fast
    for ms in (torch.ones(1, device=device), torch.full((8, 1), 0.9, device=device)):
        torch.library.opcheck(o.fake_quant_fp8, (w, tunable(v), tunable(ms), bf16))
        torch.library.opcheck(o.fake_quant_fp8_backward, (g, w, v, ms, 6))
    amax = w.abs().amax().float().reshape(1)  # a per-tensor weight's maximum, given
    torch.library.opcheck(o.fake_quant_fp8, (w, tunable(v), tunable(torch.ones(1, device=device)), bf16, amax))
    torch.library.opcheck(o.fake_quant_fp8_backward, (g, w, v, torch.ones(1, device=device), 6, amax))
    ms = torch.full((1,), 0.9, device=device)
    torch.library.opcheck(o.fake_quant_fp8_activation, (tunable(x), act_max, tunable(ms), f16))
    torch.library.opcheck(o.fake_quant_fp8_activation_backward, (gx, x, act_max, ms, 6))
    torch.library.opcheck(o.fake_quant_fp8_activation, (tunable(x[:0]), act_max, tunable(ms), f16))  # no tokens


def test_fp8_block_opcheck(device):
    gen = torch.Generator().manual_seed(43)
    w = torch.randn(200, 130, generator=gen).to(torch.bfloat16).to(device)
    g = torch.randn(200, 130, generator=gen).to(torch.bfloat16).to(device)
    v = torch.zeros(200, 130, device=device)
    ms = torch.full((2, 2), 0.9, device=device)
    bf16 = SCALE_DTYPE_CODES[torch.bfloat16]
    o = torch.ops.autoround_fast
    torch.library.opcheck(o.fake_quant_fp8_block, (w, v.clone().requires_grad_(), ms.clone().requires_grad_(), bf16))
    torch.library.opcheck(o.fake_quant_fp8_block_backward, (g, w, v, ms, 6))
