"""The SignRound tuning engine: AutoRound for one decoder block, on autoround_fast's ops.

For each block, as auto-round 0.15.1 does (SPEC.md): the full-precision block's output on the
fp inputs is the target; the block with fake-quantized Linears, fed the previous block's
quantized output, is tuned with signed gradient descent on the rounding offset V and the
clipping scales (lr = 1/iters, decaying linearly to 0, loss x 1000, the best parameters kept,
scored before each step); then the fake-quantized weights are written in place and the
block's output on the quantized inputs becomes the next block's quantized input.

Data flows one way: the llm-compressor modifier (or the command line) hands a block and its
cached inputs to :func:`tune_block`; the engine calls the ops; the ops call the kernels.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from . import ops as kernel_ops
from . import reference
from .ops import int_num_groups

__all__ = ["QuantSpec", "BlockResult", "Backend", "tune_block", "SUPPORTED_BACKENDS"]

SUPPORTED_BACKENDS = ("torch", "cuda")


@dataclass(frozen=True)
class QuantSpec:
    """How one Linear is quantized.

    kind: "nvfp4" (FP4 e2m1 groups of 16, e4m3 scales, an fp32 global scale) or "int".
    act: NVFP4 activations too (W4A4), with a static global scale from the calibration max.
    scale_dtype: INT only, the dtype the scale is stored in; fake quantization rounds the scale
    to it, so the checkpoint reproduces the tuned weights exactly.
    """

    kind: str
    bits: int = 4
    group_size: int = 16
    sym: bool = True
    act: bool = False
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        if self.kind not in ("nvfp4", "int"):
            raise ValueError(f"QuantSpec.kind must be 'nvfp4' or 'int', got {self.kind!r}")
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits must be in 2..8 for int, got {self.bits}")
        if self.kind == "int" and not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(f"QuantSpec.group_size must be -1 or positive, got {self.group_size}")
        if self.act and self.kind != "nvfp4":
            raise ValueError("QuantSpec.act (activation quantization) is only supported for nvfp4")


class Backend:
    """The four functions the engine needs: the kernels (torch ops) or the oracles."""

    def __init__(self, name: str):
        if name == "cuda":
            if not kernel_ops._lib.has_cuda_kernels():
                raise RuntimeError(
                    "backend='cuda': this build of autoround_fast has no CUDA kernels (it was "
                    "built against a CPU-only torch or without nvcc); reinstall on a CUDA machine, "
                    "or use backend='torch' (runs anywhere) or backend='auto_round'"
                )
            if not torch.cuda.is_available():
                raise RuntimeError("backend='cuda' needs a CUDA GPU; none is visible to torch")
        elif name not in ("torch", "kernels"):
            raise ValueError(f"backend must be one of {SUPPORTED_BACKENDS}, got {name!r}")
        self.name = name
        self.uses_kernels = name in ("cuda", "kernels")  # "kernels": the CPU kernels (tests)
        _o = torch.ops.autoround_fast
        if self.uses_kernels:
            self.nvfp4 = lambda w, v, ms, gs: _o.fake_quant_nvfp4(w, v, ms, gs)
            self.int = lambda w, v, mn, mx, b, g, s, sd: _o.fake_quant_int(
                w, v, mn, mx, b, g, s, kernel_ops.SCALE_DTYPE_CODES[sd])
            self.act = lambda x, gs: _o.fake_quant_nvfp4_activation(x.contiguous(), gs)
            self.loss = lambda p, r, m: _o.masked_mse_loss(p.contiguous(), r.contiguous(), m)
        else:
            self.nvfp4 = reference.fake_quant_nvfp4
            self.int = reference.fake_quant_int
            self.act = reference.fake_quant_nvfp4_activation
            self.loss = reference.masked_mse_loss


class TunedLinear(nn.Module):
    """A Linear whose weight is fake-quantized from the tunables on every forward."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, backend: Backend,
                 global_scale: Optional[torch.Tensor], act_global_scale: Optional[torch.Tensor]):
        super().__init__()
        self.linear = linear
        self.spec = spec
        self.backend = backend
        w = linear.weight
        out_f, in_f = w.shape
        dev = w.device
        self.v = nn.Parameter(torch.zeros(out_f, in_f, device=dev, dtype=torch.float32))
        groups = math.ceil(in_f / 16) if spec.kind == "nvfp4" else int_num_groups(in_f, spec.group_size)
        self.max_scale = nn.Parameter(torch.ones(out_f, groups, device=dev, dtype=torch.float32))
        self.min_scale = (nn.Parameter(torch.ones(out_f, groups, device=dev, dtype=torch.float32))
                          if spec.kind == "int" else None)
        self.register_buffer("global_scale", None if global_scale is None else global_scale.reshape(1).to(dev))
        self.register_buffer("act_global_scale",
                             None if act_global_scale is None else act_global_scale.reshape(1).to(dev))

    def tunables(self) -> list[nn.Parameter]:
        return [p for p in (self.v, self.min_scale, self.max_scale) if p is not None]

    def qdq(self):
        """(fake-quantized weight, scale, zero point or None), clamping the scales to [0, 1]."""
        with torch.no_grad():
            self.max_scale.clamp_(0, 1)
            if self.min_scale is not None:
                self.min_scale.clamp_(0, 1)
        w = self.linear.weight
        s = self.spec
        if s.kind == "nvfp4":
            q, scale = self.backend.nvfp4(w, self.v, self.max_scale, self.global_scale)
            return q, scale, None
        return self.backend.int(w, self.v, self.min_scale, self.max_scale, s.bits, s.group_size, s.sym,
                                s.scale_dtype)

    def forward(self, x):
        wq = self.qdq()[0]
        if self.spec.act:
            x = self.backend.act(x, self.act_global_scale)
        return nn.functional.linear(x, wq, self.linear.bias)


class _ActQuantLinear(nn.Module):
    """A tuned Linear at inference in the tuning chain: activations fake-quantized (W4A4)."""

    def __init__(self, linear: nn.Linear, backend: Backend, act_global_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.backend = backend
        self.register_buffer("act_global_scale", act_global_scale)

    def forward(self, x):
        return self.linear(self.backend.act(x, self.act_global_scale))


@dataclass
class BlockResult:
    """What tuning one block produced."""

    q_outputs: torch.Tensor            # the block's output on the quantized inputs [N, L, H]
    qparams: dict[str, dict[str, torch.Tensor]]  # per Linear: scale, zero_point, global_scale, act_max
    init_loss: float = float("nan")
    best_loss: float = float("nan")
    best_iter: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)


class _Inputs:
    """Calibration samples [(args, kwargs)] stacked on one device so a batch is an index."""

    def __init__(self, samples: Sequence[tuple[tuple, dict]], device: torch.device):
        first_args, first_kwargs = samples[0]
        self.n = len(samples)
        self.hidden = torch.cat([a[0] for a, _ in samples], 0).to(device)
        self.rest_args = first_args[1:]
        self.kwargs = {}
        self.per_sample = set()
        for key, value in first_kwargs.items():
            if key in ("past_key_values", "past_key_value", "layer_past"):
                self.kwargs[key] = None  # tuning re-runs the block: no KV cache
                continue
            if key == "use_cache":
                self.kwargs[key] = False
                continue
            if self._stackable(value):
                self.kwargs[key] = _cat_tree([kw[key] for _, kw in samples], device)
                self.per_sample.add(key)
            else:
                self.kwargs[key] = _to_device(value, device)

    @staticmethod
    def _stackable(value) -> bool:
        """Per-sample tensors (batch dimension 1, at least 2-D) are stacked; the rest (1-D
        cache positions, flags) are shared by all samples."""
        leaves = value if isinstance(value, (tuple, list)) else (value,)
        return bool(leaves) and all(isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == 1
                                    for t in leaves)

    def batch(self, idx: torch.Tensor, hidden: Optional[torch.Tensor] = None):
        h = (self.hidden if hidden is None else hidden).index_select(0, idx)
        kwargs = {}
        for key, value in self.kwargs.items():
            if key in self.per_sample:
                kwargs[key] = (type(value)(t.index_select(0, idx) for t in value)
                               if isinstance(value, (tuple, list)) else value.index_select(0, idx))
            else:
                kwargs[key] = value
        return (h, *self.rest_args), kwargs


def _cat_tree(values, device=None):
    if isinstance(values[0], (tuple, list)):
        return type(values[0])(_cat_tree([v[i] for v in values], device) for i in range(len(values[0])))
    out = torch.cat(values, 0)
    return out.to(device) if device is not None else out


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _linears(block: nn.Module, specs: dict[str, QuantSpec]) -> dict[str, nn.Linear]:
    found = {}
    for name, spec in specs.items():
        try:
            mod = block.get_submodule(name)
        except AttributeError:
            raise ValueError(f"tune_block: the block has no submodule {name!r}") from None
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"tune_block: {name!r} is a {type(mod).__name__}, not a Linear")
        found[name] = mod
    return found


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


def _run(block, inputs: _Inputs, batch_size: int, autocast, hidden=None) -> torch.Tensor:
    outs = []
    for start in range(0, inputs.n, batch_size):
        idx = torch.arange(start, min(start + batch_size, inputs.n), device=inputs.hidden.device)
        args, kwargs = inputs.batch(idx, hidden)
        with autocast():
            outs.append(_block_output(block(*args, **kwargs)).detach())
    return torch.cat(outs, 0)


def _activation_stats(block, linears, inputs, batch_size, autocast, hidden):
    """Per Linear input: max |x| (fp32) and sum x^2 per channel (the imatrix), on q_in."""
    stats = {n: [torch.zeros((), dtype=torch.float32, device=inputs.hidden.device),
                 torch.zeros(m.in_features, dtype=torch.float32, device=inputs.hidden.device)]
             for n, m in linears.items()}
    hooks = []
    for name, mod in linears.items():
        def hook(_m, args, name=name):
            x = args[0].detach().to(torch.float32)
            st = stats[name]
            st[0] = torch.maximum(st[0], x.abs().amax())
            st[1] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _run(block, inputs, batch_size, autocast, hidden)
    finally:
        for h in hooks:
            h.remove()
    return stats


FUSED_SUFFIXES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Linears that inference fuses into one GEMM (q/k/v, gate/up under one parent), which
    must share an NVFP4 global scale; groups of one are left out."""
    groups = []
    for suffixes in FUSED_SUFFIXES:
        by_parent: dict[str, list[str]] = {}
        for n in names:
            parent, _, leaf = n.rpartition(".")
            if leaf in suffixes:
                by_parent.setdefault(parent, []).append(n)
        groups += [g for g in by_parent.values() if len(g) > 1]
    return groups


class SignSGD(torch.optim.Optimizer):
    """p <- p - lr * sign(grad) (sign(0) = 0), auto-round's optimizer with momentum 0."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-float(group["lr"]))


def _opt_rtn_nvfp4(tl: TunedLinear, imatrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """iters=0, NVFP4: per 16-group, the max_scale in {0.50, ..., 1.51} (1.0 first, ties keep
    the earlier) minimising sum(imatrix * (Wq - W)^2), searched on the fp32 weight under its
    own global scale, then applied under the layer's (possibly shared) global scale:
    auto-round's opt-RTN. Returns (weight, scale)."""
    w = tl.linear.weight
    out_f, in_f = w.shape
    groups = math.ceil(in_f / 16)
    pad = groups * 16 - in_f
    w32 = w.to(torch.float32)
    own_gs = kernel_ops.nvfp4_global_scale(w32).reshape(1)
    qw = nn.functional.pad(imatrix.to(torch.float32).reshape(1, -1).expand(out_f, -1), (0, pad), value=1e-5)
    zeros_v = torch.zeros_like(tl.v)

    def err(ms):
        q, _ = tl.backend.nvfp4(w32, zeros_v, ms, own_gs)
        e = nn.functional.pad((q - w32) ** 2, (0, pad)) * qw
        return e.reshape(out_f, groups, 16).sum(-1)

    best_ms = torch.ones(out_f, groups, device=w.device)
    best = err(best_ms)
    for k in range(50, 152):
        if k == 100:
            continue
        ms = torch.full_like(best_ms, k / 100.0)
        e = err(ms)
        better = e < best
        best = torch.where(better, e, best)
        best_ms = torch.where(better, ms, best_ms)
    wq, scale = tl.backend.nvfp4(w, zeros_v, best_ms, tl.global_scale)  # max_scale may exceed 1
    return wq, scale


def _opt_rtn_int_sym(tl: TunedLinear, imatrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """iters=0, INT sym: per group, the scale 1/iscale, iscale = -(maxq - step*k)/m for m the
    group's signed absolute maximum and k in a symmetric grid around 0 (step 0.01 over
    +-0.9 for 2 bits, else maxq*0.75/100 over +-maxq*0.75), that minimises
    sum(imatrix * (s * clamp(round(W / s), -maxq, maxq - 1) - W)^2); k = 0 first, ties keep
    the earlier (auto-round's opt-RTN for symmetric INT). Returns (weight, scale)."""
    spec = tl.spec
    w = tl.linear.weight
    out_f, in_f = w.shape
    groups = int_num_groups(in_f, spec.group_size)
    g = in_f if groups == 1 else spec.group_size
    pad = groups * g - in_f
    # The search runs in the weight's dtype, the error in fp32, as auto-round's does.
    x = nn.functional.pad(w, (0, pad)).reshape(-1, g)
    qw = nn.functional.pad(imatrix.to(torch.float32), (0, pad), value=1e-5).reshape(1, groups, g)
    qw = qw.expand(out_f, -1, -1).reshape(-1, g)
    maxq = 2 ** (spec.bits - 1)
    eps = 1e-5 if x.dtype == torch.float16 else 1e-30

    def recip(t):
        safe = t.abs() >= eps
        return torch.where(safe, 1.0 / torch.where(safe, t, torch.ones_like(t)), torch.zeros_like(t))

    recip_m = recip(torch.take_along_dim(x, x.abs().argmax(-1, keepdim=True), -1))

    def trial(level):
        iscale = -level * recip_m
        scale = recip(iscale)
        q = torch.clamp(torch.round(iscale * x), -maxq, maxq - 1)
        return scale, (((scale * q - x).to(torch.float32)) ** 2 * qw).sum(-1)

    if spec.bits == 2:
        step, ks = 0.01, range(-90, 91)
    else:
        span = maxq * 0.75
        step = span / 200 * 2
        n = int(span / step)
        ks = range(-n, n + 1)
    best_s, best_e = trial(maxq)
    for k in ks:
        if k == 0:
            continue
        s_k, e_k = trial(maxq - step * k)
        better = e_k < best_e
        best_s = torch.where(better.unsqueeze(-1), s_k, best_s)
        best_e = torch.where(better, e_k, best_e)
    floor = 1e-5
    best_s = torch.where(best_s < 0, torch.clamp(best_s, max=-floor), torch.clamp(best_s, min=floor))
    q = torch.clamp(torch.round(x / best_s), -maxq, maxq - 1)
    wq = (q * best_s).reshape(out_f, -1)[:, :in_f]
    return wq, best_s.reshape(out_f, groups).to(spec.scale_dtype)


def tune_block(
    block: nn.Module,
    fp_inputs: Sequence[tuple[tuple, dict]],
    specs: dict[str, QuantSpec],
    *,
    q_inputs: Optional[torch.Tensor] = None,
    iters: int = 200,
    batch_size: int = 8,
    lr: Optional[float] = None,
    seed: int = 42,
    gradient_accumulate_steps: int = 1,
    token_mask: Optional[torch.Tensor] = None,
    backend: str = "torch",
    device: Optional[torch.device] = None,
    global_scales: Optional[dict[str, torch.Tensor]] = None,
    finalize: Optional[Callable[[str, nn.Linear, dict], torch.Tensor]] = None,
    progress: Optional[Callable[[int, float], None]] = None,
) -> BlockResult:
    """Tune one decoder block with SignRound and write its fake-quantized weights in place.

    Args:
        block: the decoder layer (any nn.Module whose first output is the hidden state).
        fp_inputs: one ``(args, kwargs)`` per calibration sample, as the block is called
            (hidden states first, batch dimension 1).
        specs: Linear name within the block -> :class:`QuantSpec`.
        q_inputs: the previous block's quantized output [N, L, H] (None for the first block:
            the fp inputs).
        iters: SignSGD iterations (0: RTN with auto-round's imatrix-weighted scale search for
            NVFP4 and symmetric INT; plain RTN for asymmetric INT, as auto-round).
        lr: learning rate for V and the scales (default 1 / iters).
        token_mask: [N, L], 1 where a token counts in the loss (right-padded samples).
        backend: "torch" (the plain-PyTorch oracles, any device) or "cuda" (the kernels).
        global_scales: NVFP4 global scale per Linear (default: 448*6/max|W|, the minimum over
            q/k/v and over gate/up, which inference fuses).
        finalize: called per Linear after tuning with (name, linear, qparams); returns the
            weight to store (e.g. the checkpoint format's own dequantization of the codes).
        progress: called after every iteration with (iteration, loss).

    Returns:
        :class:`BlockResult` with the next block's quantized inputs and the qparams.
    """
    t0 = time.perf_counter()
    be = Backend(backend)
    if not fp_inputs:
        raise ValueError("tune_block: no calibration inputs")
    if iters < 0:
        raise ValueError(f"tune_block: iters must be >= 0, got {iters}")
    n = len(fp_inputs)
    batch_size = min(batch_size, n)
    device = device or next(block.parameters()).device
    block.to(device)
    dtype = next(block.parameters()).dtype
    linears = _linears(block, specs)
    for name, mod in linears.items():
        if not bool(torch.isfinite(mod.weight).all()):
            raise ValueError(f"tune_block: weight of {name!r} has non-finite values (NaN or Inf)")

    # autocast in the model dtype; forced to bf16 when activations are quantized (auto-round)
    act_quant = any(s.act for s in specs.values())
    use_amp = act_quant or dtype in (torch.bfloat16, torch.float16)
    amp_dtype = torch.bfloat16 if act_quant else dtype

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)

    def model_dtype_autocast():  # the calibration pass (act_max, imatrix) runs in the model dtype
        return torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))

    inputs = _Inputs(fp_inputs, device)
    q_hidden = inputs.hidden if q_inputs is None else q_inputs.to(device=device, dtype=inputs.hidden.dtype)
    mask = None if token_mask is None else token_mask.to(device=device, dtype=torch.float32)

    with torch.no_grad():
        ref = _run(block, inputs, batch_size, autocast) if iters > 0 else None
    stats = _activation_stats(block, linears, inputs, batch_size, model_dtype_autocast, q_hidden)

    global_scales = dict(global_scales or {})
    for group in fused_layer_groups([n for n in linears if specs[n].kind == "nvfp4"]):
        missing = [n for n in group if n not in global_scales]
        if missing:  # layers fused at inference share one global scale: the minimum
            shared = kernel_ops.shared_nvfp4_global_scale([linears[n].weight for n in group])
            global_scales.update({n: shared for n in missing})

    tuned: dict[str, TunedLinear] = {}
    for name, mod in linears.items():
        spec = specs[name]
        gs = act_gs = None
        if spec.kind == "nvfp4":
            gs = global_scales.get(name)
            gs = kernel_ops.nvfp4_global_scale(mod.weight) if gs is None else gs.to(torch.float32)
            if spec.act:
                act_gs = kernel_ops.nvfp4_global_scale(stats[name][0])
        tl = TunedLinear(mod, spec, be, gs, act_gs)
        tuned[name] = tl
        _replace(block, name, tl)

    result = BlockResult(q_outputs=torch.empty(0), qparams={})
    try:
        with torch.enable_grad():
            if iters > 0:
                _sign_round(block, tuned, inputs, q_hidden, ref, mask, be, iters, batch_size, lr,
                            seed, gradient_accumulate_steps, autocast, result, progress)
        with torch.no_grad():
            for name, tl in tuned.items():
                if iters == 0 and tl.spec.kind == "nvfp4":
                    wq, scale = _opt_rtn_nvfp4(tl, stats[name][1])
                    zp = None
                elif iters == 0 and tl.spec.kind == "int" and tl.spec.sym:
                    wq, scale = _opt_rtn_int_sym(tl, stats[name][1])
                    zp = None
                else:
                    wq, scale, zp = tl.qdq()
                qp = {"scale": scale.detach(), "weight": wq.detach()}
                if zp is not None and not tl.spec.sym:
                    qp["zero_point"] = zp.detach()
                if tl.global_scale is not None:
                    qp["global_scale"] = tl.global_scale.detach()
                if tl.spec.act:
                    qp["act_max"] = stats[name][0].detach()
                    qp["input_global_scale"] = tl.act_global_scale.detach()
                stored = finalize(name, tl.linear, qp) if finalize else qp["weight"]
                tl.linear.weight.data.copy_(stored.to(tl.linear.weight.dtype))
                qp.pop("weight")
                result.qparams[name] = qp
    finally:
        for name, tl in tuned.items():
            if tl.spec.act:
                _replace(block, name, _ActQuantLinear(tl.linear, be, tl.act_global_scale))
            else:
                _replace(block, name, tl.linear)
    with torch.no_grad():
        result.q_outputs = _run(block, inputs, batch_size, autocast, q_hidden)
    for name, tl in tuned.items():
        if tl.spec.act:
            _replace(block, name, tl.linear)
    result.seconds = time.perf_counter() - t0
    return result


def _sign_round(block, tuned, inputs, q_hidden, ref, mask, be, iters, batch_size, lr, seed,
                accumulate, autocast, result, progress):
    params = [p for tl in tuned.values() for p in tl.tunables()]
    lr = 1.0 / iters if lr is None else lr
    opt = SignSGD(params, lr=torch.tensor(lr))
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=iters)
    rng = random.Random(seed)
    n = inputs.n
    global_bs = min(n, batch_size * accumulate)
    order = list(range(n))
    rng.shuffle(order)
    pos = 0
    best_loss = float("inf")
    best = None
    device = inputs.hidden.device
    for it in range(iters):
        if pos + global_bs > n:
            rng.shuffle(order)
            pos = 0
        idx_all = order[pos: pos + global_bs]
        pos += global_bs
        total = 0.0
        for start in range(0, len(idx_all), batch_size):
            idx = torch.tensor(idx_all[start: start + batch_size], device=device)
            args, kwargs = inputs.batch(idx, q_hidden)
            with autocast():
                pred = _block_output(block(*args, **kwargs))
            m = None if mask is None else mask.index_select(0, idx).reshape(-1)
            loss = be.loss(pred, ref.index_select(0, idx), m)
            (loss * 1000).backward()
            total += loss.item()
        # auto-round scores an iteration by its loss over the number of valid tokens in the
        # batch (1 without a mask), and logs the loss itself
        valid = 1.0 if mask is None else float(mask.index_select(0, torch.tensor(idx_all, device=device)).sum())
        score = total / max(valid, 1.0)
        result.losses.append(total)
        if it == 0:
            result.init_loss = total
        if score < best_loss:
            best_loss = score
            result.best_loss = total
            best = [p.detach().clone() for p in params]
            result.best_iter = it
        if progress:
            progress(it, total)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
