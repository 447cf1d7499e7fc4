"""Microbenchmark: autoround_fast's CUDA kernels beside auto-round's functions, one run, one card.

    python -m bench.ops [--out results.md] [--only mx fp8]

Llama-3.1-8B weight shapes and 8 x 2048-token activations. For each: forward and
forward+backward time (medians of CUDA-event timings) of our ops called eagerly through
autograd, and of their kernels replayed from a CUDA graph (how the tuning engine runs them);
GB/s of the graphed kernels over the fewest bytes the op must move, that as a share of the
card's measured copy bandwidth; auto-round's functions eagerly (and INT also with
torch.compile, which auto-round uses for INT but not for NVFP4, MX or FP8), and the speed-ups;
the same for MXFP4 and MXFP8 (beside auto-round's quant_mx) and FP8 (quant_fp8_sym; FP8 in
128 x 128 blocks beside its plain-PyTorch oracle, auto-round having none). Also the
weight backward that takes the sign step in place, beside our backward and step run apart, and
SiLU(gate) * up with the W4A4 activation quantization in one op, beside the two run apart.
"""

from __future__ import annotations

import argparse

import torch

from autoround_fast import ops, reference

from .common import card_info, copy_bandwidth_gbs, graph_ms
from .common import time_ms as _time_ms


def time_ms(fn) -> float:
    """Eager timings: where the host's dispatch dominates (small shapes through autograd), 30
    samples after 5 warm-up calls moved the median by half from run to run (0.22-0.40 ms for
    one row on an H200), so more of both."""
    return _time_ms(fn, warmup=20, reps=100)


_ops = torch.ops.autoround_fast

WEIGHTS = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
ACTIVATIONS = [(8 * 2048, 4096), (8 * 2048, 14336)]


def _auto_round():
    from auto_round.data_type.int import quant_tensor_sym
    from auto_round.data_type.nvfp import nv_fp4, nv_fp4_with_static_gs

    return nv_fp4, nv_fp4_with_static_gs, quant_tensor_sym


def _auto_round_mx():
    from auto_round.data_type.mxfp import quant_mx

    return quant_mx


def _fwd_bwd(fwd, params, grad):
    def run():
        for p in params:
            p.grad = None
        out = fwd()
        torch.autograd.backward(out, grad)

    return run


def bench_nvfp4_weight(shape, rows_out):
    nv_fp4, _, _ = _auto_round()
    o, i = shape
    w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(w)
    v = torch.zeros(o, i, device="cuda", requires_grad=True)
    ms = torch.ones(o, i // 16, device="cuda", requires_grad=True)
    gs = ops.nvfp4_global_scale(w)
    vg = torch.zeros(o * i // 16, 16, device="cuda", requires_grad=True)
    msg = torch.ones(o * i // 16, device="cuda", requires_grad=True)
    ours_f = lambda: torch.ops.autoround_fast.fake_quant_nvfp4(w, v, ms, gs)[0]
    theirs_f = lambda: nv_fp4(w, v=vg, global_scale=gs, max_scale=msg)[0]
    vd, msd = v.detach(), ms.detach()
    raw_f = lambda: _ops.fake_quant_nvfp4(w, vd, msd, gs)
    raw_fb = lambda: (raw_f(), _ops.fake_quant_nvfp4_backward(g, w, vd, msd, gs))
    n = o * i
    rows_out.append(("nvfp4 weight fwd", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(theirs_f), None, 8 * n))
    rows_out.append(("nvfp4 weight fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [v, ms], g)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(theirs_f, [vg, msg], g)), None, 20 * n))


def bench_int_weight(shape, rows_out, group=128):
    _, _, quant_tensor_sym = _auto_round()
    o, i = shape
    w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(w)
    ng = i // group
    v = torch.zeros(o, i, device="cuda", requires_grad=True)
    mn = torch.ones(o, ng, device="cuda", requires_grad=True)
    mx = torch.ones(o, ng, device="cuda", requires_grad=True)
    vg = torch.zeros(o * ng, group, device="cuda", requires_grad=True)
    mng = torch.ones(o * ng, device="cuda", requires_grad=True)
    mxg = torch.ones(o * ng, device="cuda", requires_grad=True)
    wr = w.reshape(-1, group)
    wmin, wmax = wr.min(1)[0].clamp(max=0), wr.max(1)[0].clamp(min=0)
    ours_f = lambda: torch.ops.autoround_fast.fake_quant_int(w, v, mn, mx, 4, group, True, 5)[0]

    def theirs(fn):
        return lambda: fn(w, bits=4, group_size=group, v=vg, min_scale=mng, max_scale=mxg,
                          tensor_min=wmin, tensor_max=wmax)[0]

    compiled = torch.compile(quant_tensor_sym, dynamic=False)
    vd, mnd, mxd = v.detach(), mn.detach(), mx.detach()
    raw_f = lambda: _ops.fake_quant_int(w, vd, mnd, mxd, 4, group, True, 5)
    raw_fb = lambda: (raw_f(), _ops.fake_quant_int_backward(g, w, vd, mnd, mxd, 4, group, True, 5))
    n = o * i
    rows_out.append(("int4 g128 weight fwd", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(theirs(quant_tensor_sym)),
                     time_ms(theirs(compiled)), 8 * n))
    rows_out.append(("int4 g128 weight fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [v, mn, mx], g)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(theirs(quant_tensor_sym), [vg, mng, mxg], g)),
                     time_ms(_fwd_bwd(theirs(compiled), [vg, mng, mxg], g)), 20 * n))


def bench_mx_weight(shape, rows_out, bits):
    """MXFP4 (bits 4) or MXFP8 (bits 8) weights, groups of 32: bytes as for NVFP4 (the shared
    exponents and max_scale are 1/32 of an element each, left out)."""
    quant_mx = _auto_round_mx()
    o, i = shape
    w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(w)
    v = torch.zeros(o, i, device="cuda", requires_grad=True)
    ms = torch.ones(o, i // 32, device="cuda", requires_grad=True)
    vg = torch.zeros(o * i // 32, 32, device="cuda", requires_grad=True)
    msg = torch.ones(o * i // 32, device="cuda", requires_grad=True)
    ours_f = lambda: torch.ops.autoround_fast.fake_quant_mx(w, v, ms, bits)[0]
    theirs_f = lambda: quant_mx(w, bits=bits, group_size=32, v=vg, max_scale=msg, data_type="mx_fp")[0]
    vd, msd = v.detach(), ms.detach()
    raw_f = lambda: _ops.fake_quant_mx(w, vd, msd, bits)
    raw_fb = lambda: (raw_f(), _ops.fake_quant_mx_backward(g, w, vd, msd, bits))
    n = o * i
    rows_out.append((f"mxfp{bits} weight fwd", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(theirs_f), None,
                     8 * n))
    rows_out.append((f"mxfp{bits} weight fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [v, ms], g)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(theirs_f, [vg, msg], g)), None, 20 * n))


def bench_mx_activation(shape, rows_out, bits):
    quant_mx = _auto_round_mx()
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    one = torch.tensor(1.0, device="cuda")
    ours_f = lambda: torch.ops.autoround_fast.fake_quant_mx_activation(x, bits)
    theirs_f = lambda: quant_mx(x, bits=bits, group_size=32, max_scale=one, data_type="mx_fp")[0]
    xd = x.detach()
    raw_f = lambda: _ops.fake_quant_mx_activation(xd, bits)
    raw_fb = lambda: (raw_f(), _ops.fake_quant_mx_activation_backward(g, xd, bits))
    n = x.numel()
    rows_out.append((f"mxfp{bits} act fwd", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(theirs_f), None, 4 * n))
    rows_out.append((f"mxfp{bits} act fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [x], g)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(theirs_f, [x], g)), None, 10 * n))


def bench_activation(shape, rows_out):
    _, nv_fp4_with_static_gs, _ = _auto_round()
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    amax = x.detach().float().abs().max()
    gs = ops.nvfp4_global_scale(amax)
    ours_f = lambda: torch.ops.autoround_fast.fake_quant_nvfp4_activation(x, gs)
    theirs_f = lambda: nv_fp4_with_static_gs(x, tensor_max=amax)[0]
    xd = x.detach()
    raw_f = lambda: _ops.fake_quant_nvfp4_activation(xd, gs)
    raw_fb = lambda: (raw_f(), _ops.fake_quant_nvfp4_activation_backward(g, xd, gs))
    n = x.numel()
    rows_out.append(("nvfp4 act fwd", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(theirs_f), None, 4 * n))
    rows_out.append(("nvfp4 act fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [x], g)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(theirs_f, [x], g)), None, 10 * n))


def _auto_round_fp8():
    from auto_round.data_type.fp8 import quant_fp8_sym

    return quant_fp8_sym


def bench_fp8_weight(shape, rows_out, per_tensor):
    """FP8 (e4m3) weights, one scale for the tensor or one per row, fp32 scales (auto-round's).
    A per-tensor weight's maximum is given, as the engine gives it (once per tuned weight) and
    as auto-round's column gets it (tensor_max)."""
    quant_fp8_sym = _auto_round_fp8()
    o, i = shape
    w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(w)
    groups = 1 if per_tensor else o
    v = torch.zeros(o, i, device="cuda", requires_grad=True)
    ms = torch.ones(groups, 1, device="cuda", requires_grad=True)
    wg = w.reshape(1, -1) if per_tensor else w
    tmax, tmin = wg.max(-1)[0].clamp(min=0), wg.min(-1)[0].clamp(max=0)
    vg = torch.zeros(wg.shape, device="cuda", requires_grad=True)
    msg = torch.ones(groups, device="cuda", requires_grad=True)
    amax = ops.fp8_weight_amax(w) if per_tensor else None
    code = 6  # float32 scales
    ours_f = lambda: torch.ops.autoround_fast.fake_quant_fp8(w, v, ms, code, amax)[0]
    theirs_f = lambda: quant_fp8_sym(w, max_scale=msg, tensor_max=tmax, tensor_min=tmin,
                                     group_size=0 if per_tensor else -1, v=vg)[0]
    vd, msd = v.detach(), ms.detach()
    raw_f = lambda: _ops.fake_quant_fp8(w, vd, msd, code, amax)
    raw_fb = lambda: (raw_f(), _ops.fake_quant_fp8_backward(g, w, vd, msd, code, amax))
    n = o * i
    name = "fp8 weight per-tensor" if per_tensor else "fp8 weight per-row"
    rows_out.append((f"{name} fwd", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(theirs_f), None, 8 * n))
    rows_out.append((f"{name} fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [v, ms], g)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(theirs_f, [vg, msg], g)), None, 20 * n))


def bench_fp8_block_weight(shape, rows_out):
    """FP8 (e4m3) weights with one scale per 128 x 128 block (FP8_BLOCK), fp32 scales. auto-round
    has no block FP8, so the comparison columns time the oracle (reference.fake_quant_fp8_block,
    plain PyTorch) eagerly."""
    o, i = shape
    w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(w)
    v = torch.zeros(o, i, device="cuda", requires_grad=True)
    ms = torch.ones(ops.fp8_block_grid(o, i), device="cuda", requires_grad=True)
    vr, msr = v.detach().clone().requires_grad_(), ms.detach().clone().requires_grad_()
    code = 6  # float32 scales
    ours_f = lambda: torch.ops.autoround_fast.fake_quant_fp8_block(w, v, ms, code)[0]
    theirs_f = lambda: reference.fake_quant_fp8_block(w, vr, msr)[0]
    vd, msd = v.detach(), ms.detach()
    raw_f = lambda: _ops.fake_quant_fp8_block(w, vd, msd, code)
    raw_fb = lambda: (raw_f(), _ops.fake_quant_fp8_block_backward(g, w, vd, msd, code))
    n = o * i
    rows_out.append(("fp8 weight per-block fwd", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(theirs_f), None,
                     8 * n))
    rows_out.append(("fp8 weight per-block fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [v, ms], g)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(theirs_f, [vr, msr], g)), None, 20 * n))


def bench_fp8_activation(shape, rows_out):
    """FP8 (e4m3) activations under their static scale (act_max * max_scale), fp32 scales."""
    quant_fp8_sym = _auto_round_fp8()
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    act_max = x.detach().float().abs().amax().reshape(1)
    ms = torch.ones(1, device="cuda", requires_grad=True)
    msg = torch.ones(1, device="cuda", requires_grad=True)
    code = 6
    ours_f = lambda: torch.ops.autoround_fast.fake_quant_fp8_activation(x, act_max, ms, code)
    theirs_f = lambda: quant_fp8_sym(x, max_scale=msg, tensor_max=act_max, group_size=0)[0]
    xd, msd = x.detach(), ms.detach()
    raw_f = lambda: _ops.fake_quant_fp8_activation(xd, act_max, msd, code)
    raw_fb = lambda: (raw_f(), _ops.fake_quant_fp8_activation_backward(g, xd, act_max, msd, code))
    n = x.numel()
    rows_out.append(("fp8 act fwd", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(theirs_f), None, 4 * n))
    rows_out.append(("fp8 act fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [x, ms], g)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(theirs_f, [x, msg], g)), None, 10 * n))


def bench_silu_mul_activation(shape, rows_out):
    """SiLU(gate) * up fused with down_proj's W4A4 input quantization (one op, forward and
    backward). The comparison columns time the path it replaces in the fused loop: the
    compiled silu_mul (fusion.py's, Inductor), then our activation op."""
    from autoround_fast import fusion

    gate = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(gate)
    gs = ops.nvfp4_global_scale((torch.nn.functional.silu(gate) * up).detach().abs().amax().float())
    ours_f = lambda: _ops.silu_mul_nvfp4_activation(gate, up, gs)
    silu_mul = fusion._compiled("silu_mul", fusion._silu_mul)
    sep_f = lambda: _ops.fake_quant_nvfp4_activation(silu_mul(gate, up), gs)
    gd, ud = gate.detach(), up.detach()
    raw_f = lambda: _ops.silu_mul_nvfp4_activation(gd, ud, gs)
    raw_fb = lambda: (raw_f(), _ops.silu_mul_nvfp4_activation_backward(g, gd, ud, gs))
    n = gate.numel()
    rows_out.append(("silu x up + act fwd", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(sep_f), None, 6 * n))
    rows_out.append(("silu x up + act fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [gate, up], g)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(sep_f, [gate, up], g)), None, 16 * n))


def bench_loss(shape, rows_out):
    p = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(p)
    ours_f = lambda: torch.ops.autoround_fast.masked_mse_loss(p, r, None) * 1000
    mse = torch.nn.MSELoss()
    theirs_f = lambda: mse(p.float(), r.float()) * 1000
    one = torch.ones((), device="cuda")
    pd, k = p.detach(), torch.full((), 1000.0, device="cuda")
    raw_fb = lambda: (_ops.masked_mse_loss(pd, r, None), _ops.masked_mse_loss_backward(k, pd, r, None))
    n = p.numel()
    rows_out.append(("block loss fwd+bwd", shape, time_ms(_fwd_bwd(ours_f, [p], one)), graph_ms(raw_fb),
                     time_ms(_fwd_bwd(theirs_f, [p], one)), None, 10 * n))


def bench_step(shape, rows_out):
    """The SignSGD step with the best-parameter copy (the loss improved: best is written) on
    one V; the comparison column is the torch sequence the engine ran before (torch.where
    into best, sign_ in place, addcmul_), not an auto-round function."""
    p = torch.randn(shape, device="cuda")
    best, g = torch.empty_like(p), torch.randn(shape, device="cuda")
    imp, lr = torch.ones(1, dtype=torch.bool, device="cuda"), torch.full((1,), 1e-9, device="cuda")
    ours_f = lambda: ops.sign_step_(p, best, g, imp, lr)
    raw_f = lambda: _ops.sign_step_(p, best, g, imp, lr)
    g2 = g.clone()

    def torch_f():
        torch.where(imp, p, best, out=best)
        p.addcmul_(g2.sign_(), lr, value=-1.0)

    rows_out.append(("sign step + best copy", shape, time_ms(ours_f), graph_ms(raw_f), time_ms(torch_f), None,
                     16 * p.numel()))


def bench_backward_step(shape, rows_out):
    """The weight backward that takes the sign step in place (the engine's loop with one
    micro-batch), NVFP4 and INT4 g128, the loss improved (the scales' best written; V has
    none). The comparison columns time the path it replaces: the backward op, then sign_step_
    on each tunable."""
    o, i = shape
    w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(w)
    v = torch.zeros(o, i, device="cuda")
    imp, lr = torch.ones(1, dtype=torch.bool, device="cuda"), torch.full((1,), 1e-9, device="cuda")
    gs = ops.nvfp4_global_scale(w)
    ms = torch.ones(o, i // 16, device="cuda")
    best_ms = torch.empty_like(ms)
    fused = lambda: _ops.fake_quant_nvfp4_backward_step_(g, w, v, ms, gs, best_ms, imp, lr)

    def separate():
        gv, gms = _ops.fake_quant_nvfp4_backward(g, w, v, ms, gs)
        _ops.sign_step_(v, None, gv, imp, lr)
        _ops.sign_step_(ms, best_ms, gms, imp, lr)

    n = o * i  # bytes: W and grad in bf16, V read and written in fp32
    rows_out.append(("nvfp4 weight bwd + step", shape, time_ms(fused), graph_ms(fused), time_ms(separate), None,
                     12 * n))
    ng = i // 128
    mn, mx = torch.ones(o, ng, device="cuda"), torch.ones(o, ng, device="cuda")
    best = [torch.empty_like(t) for t in (mn, mx)]
    args = (4, 128, True, 5)
    fused = lambda: _ops.fake_quant_int_backward_step_(g, w, v, mn, mx, *args, *best, imp, lr)

    def separate_int():
        grads = _ops.fake_quant_int_backward(g, w, v, mn, mx, *args)
        for p, b, gr in zip((v, mn, mx), (None, *best), grads):
            _ops.sign_step_(p, b, gr, imp, lr)

    rows_out.append(("int4 g128 weight bwd + step", shape, time_ms(fused), graph_ms(fused),
                     time_ms(separate_int), None, 12 * n))


def bench_nvfp4_int(rows):
    for shape in WEIGHTS:
        bench_nvfp4_weight(shape, rows)
        bench_int_weight(shape, rows)
    for shape in ACTIVATIONS:
        bench_activation(shape, rows)


def bench_mx(rows):
    for bits in (4, 8):
        for shape in WEIGHTS:
            bench_mx_weight(shape, rows, bits)
        for shape in ACTIVATIONS:
            bench_mx_activation(shape, rows, bits)


def bench_fp8(rows):
    for shape in WEIGHTS:  # e4m3
        for per_tensor in (True, False):
            bench_fp8_weight(shape, rows, per_tensor)
        bench_fp8_block_weight(shape, rows)
    for shape in ACTIVATIONS:
        bench_fp8_activation(shape, rows)


def bench_engine(rows):
    """The ops only the tuning loop calls: the fused SiLU x up activation, the loss, the step."""
    bench_silu_mul_activation(ACTIVATIONS[1], rows)
    bench_loss((8, 2048, 4096), rows)
    bench_step((14336, 4096), rows)
    for shape in ((4096, 4096), (14336, 4096)):
        bench_backward_step(shape, rows)


FAMILIES = {"nvfp4-int": bench_nvfp4_int, "mx": bench_mx, "fp8": bench_fp8, "engine": bench_engine}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--only", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                    help="the families of ops to time (default: all)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.ops needs a CUDA GPU")
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for family in args.only:
        FAMILIES[family](rows)
    lines = [
        f"card: {card_info()}; measured copy bandwidth {copy_gbs:.0f} GB/s (read + write)",
        "",
        "(sign step: the last columns time the torch ops the engine used before, not auto-round; "
        "bwd + step: they time our backward op followed by sign_step_ on each tunable, the path the "
        "step inside the backward replaces; silu x up + act: they time the compiled silu_mul, then our "
        "activation op, the path the one op replaces; fp8 per-block: they time our plain-PyTorch oracle, "
        "auto-round having no block FP8)",
        "",
        "| op | shape | ours eager ms | ours graphed ms | GB/s (graphed) | % copy BW | auto-round eager ms "
        "| x (eager vs eager) | auto-round compiled ms | x (eager vs compiled) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, shape, ours, graphed, eager, comp, nbytes in rows:
        gbs = nbytes / graphed / 1e6
        comp_s = f"{comp:.3f} | {comp / ours:.1f}" if comp is not None else "- | -"
        lines.append(f"| {name} | {shape[0]}x{shape[1]} | {ours:.3f} | {graphed:.3f} | {gbs:.0f} | "
                     f"{100 * gbs / copy_gbs:.0f}% | {eager:.3f} | {eager / ours:.1f} | {comp_s} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
