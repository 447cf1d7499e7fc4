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

import contextlib
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from . import fusion
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
    """The five functions the engine needs: the kernels (torch ops) or the oracles."""

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
            self.step = _o.sign_step_  # the step and the best copy in one pass
            self.nvfp4_stepped = kernel_ops.step_in_backward_nvfp4  # the step inside the backward
            self.int_stepped = kernel_ops.step_in_backward_int
        else:
            self.nvfp4 = reference.fake_quant_nvfp4
            self.int = reference.fake_quant_int
            self.act = reference.fake_quant_nvfp4_activation
            self.loss = reference.masked_mse_loss
            self.step = reference.sign_step_


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
        # Shared by Linears that read the same input under the same activation global scale
        # (q/k/v, gate/up): see _quant_input.
        self.act_memo: Optional[_ActMemo] = None
        # Set by the loop when the sign step runs inside this Linear's backward (_Stepper).
        self.stepper: Optional[_Stepper] = None
        self.forwards = 0  # forwards with gradients (the loop checks that there is one per step)

    def tunables(self) -> list[nn.Parameter]:
        return [p for p in (self.v, self.min_scale, self.max_scale) if p is not None]

    def qdq(self):
        """(fake-quantized weight, scale, zero point or None), clamping the scales to [0, 1]."""
        # on .data, as auto-round: a Linear called twice in one forward keeps the first call's
        # saved scales valid for its backward (an in-place op on the Parameter bumps its version)
        self.max_scale.data.clamp_(0, 1)
        if self.min_scale is not None:
            self.min_scale.data.clamp_(0, 1)
        w = self.linear.weight
        s = self.spec
        st = None
        if torch.is_grad_enabled():
            self.forwards += 1
            st = self.stepper
        if s.kind == "nvfp4":
            if st is not None:
                q, scale = self.backend.nvfp4_stepped(w, self.v, self.max_scale, self.global_scale, *st.args())
            else:
                q, scale = self.backend.nvfp4(w, self.v, self.max_scale, self.global_scale)
            return q, scale, None
        if st is not None:
            return self.backend.int_stepped(w, self.v, self.min_scale, self.max_scale, s.bits, s.group_size, s.sym,
                                            s.scale_dtype, *st.args())
        return self.backend.int(w, self.v, self.min_scale, self.max_scale, s.bits, s.group_size, s.sym,
                                s.scale_dtype)

    def forward(self, x, input_quantized: bool = False):
        """``input_quantized``: the caller has already applied this Linear's activation
        quantization (:meth:`input_quant_scale`), as the fused SiLU-gated MLP does."""
        home = x.device  # device_ids: this Linear may live on another card than the block
        x = x.to(self.v.device)
        wq = self.qdq()[0]
        if self.spec.act and not input_quantized:
            x = self._quant_input(x)
        return nn.functional.linear(x, wq, self.linear.bias).to(home)

    def input_quant_scale(self) -> Optional[torch.Tensor]:
        """The activation global scale under which a caller may quantize this Linear's input
        itself, with the kernels, and pass ``input_quantized=True`` (fusion's SiLU-gated MLP
        does, for down_proj); None where that does not apply (no W4A4, the oracles, or an
        input shared with other Linears)."""
        if self.spec.act and self.backend.uses_kernels and self.act_memo is None:
            return self.act_global_scale
        return None

    def _quant_input(self, x):
        """The input's NVFP4 fake quantization (W4A4). q, k and v quantize the same tensor
        under the same global scale: the first computes it and the others take its result
        (the same bits, one kernel instead of three). Only when the input needs no gradient
        (q/k/v read the normed block input), so every backward stays its own."""
        memo = self.act_memo
        if memo is None or x.requires_grad:
            return self.backend.act(x, self.act_global_scale)
        if memo.source is not x:
            memo.source, memo.result = x, self.backend.act(x, self.act_global_scale)
        return memo.result


@dataclass
class _Stepper:
    """What a TunedLinear's backward needs to take SignRound's step itself: the best copies of
    its tunables, the iteration's improved flag and learning rate (device tensors the loop
    fills before the backward), and the set the backward adds the Linear to when it ran."""

    best: list
    improved: torch.Tensor
    lr: torch.Tensor
    ran: set
    key: object

    def args(self):
        return self.best, self.improved, self.lr, self.mark

    def mark(self):
        self.ran.add(self.key)


class _ActMemo:
    """The last input one group of TunedLinears quantized, and the result (see
    TunedLinear._quant_input). Holding the input keeps its identity unique while compared."""

    def __init__(self):
        self.source: Optional[torch.Tensor] = None
        self.result: Optional[torch.Tensor] = None


def _share_input_quantization(tuned: dict[str, "TunedLinear"]) -> list[_ActMemo]:
    """One _ActMemo per fused group (q/k/v, gate/up) whose W4A4 input global scales are equal."""
    memos = []
    for group in fused_layer_groups([n for n, tl in tuned.items() if tl.spec.act]):
        scales = [tuned[n].act_global_scale for n in group]
        if all(s.device == scales[0].device and torch.equal(s, scales[0]) for s in scales[1:]):
            memo = _ActMemo()
            for n in group:
                tuned[n].act_memo = memo
            memos.append(memo)
    return memos


class _ActQuantLinear(nn.Module):
    """A tuned Linear at inference in the tuning chain: activations fake-quantized (W4A4)."""

    def __init__(self, linear: nn.Linear, backend: Backend, act_global_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.backend = backend
        self.register_buffer("act_global_scale", act_global_scale)

    def forward(self, x, input_quantized: bool = False):
        return self.linear(x if input_quantized else self.backend.act(x, self.act_global_scale))

    def input_quant_scale(self) -> Optional[torch.Tensor]:  # as TunedLinear's
        return self.act_global_scale if self.backend.uses_kernels else None


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
    # wall seconds per phase: inputs (to the device), reference, calibration (act_max,
    # imatrix), tune (the SignRound loop), finalize (qparams, stored weights), outputs
    phases: dict[str, float] = field(default_factory=dict)
    # why CUDA graphs were asked for but not used ("" when they were, or were not asked for)
    eager_reason: str = ""
    # on a GPU: milliseconds per iteration of the tuning loop, per run of ten iterations, from
    # CUDA events on the loop's stream (the first run holds the warm-up and the graph capture)
    loop_ms: list[float] = field(default_factory=list)
    # linear_devices: the device each Linear was tuned on
    placement: dict[str, str] = field(default_factory=dict)
    # fuse_elementwise: what ran compiled in the loop, by kind (rms_norm, silu_mul: module
    # names; rotary: the modeling modules whose apply_rotary_pos_emb was swapped)
    fused: dict[str, list[str]] = field(default_factory=dict)
    # step_in_backward: the Linears whose weight backward took the sign step
    step_in_backward: list[str] = field(default_factory=list)


class _Inputs:
    """Calibration samples [(args, kwargs)] stacked so that a batch is an index.

    The hidden states live on ``cache_device`` (the compute device, or pinned host memory for
    cards short of memory); the per-sample kwargs (masks, rotary tables) and the shared ones
    live on the compute device. A per-sample kwarg whose value is the same for every sample
    (the causal mask and rotary tables of equal-length samples: 8 MB per sample for a 2048-token
    mask) is kept once and expanded to each batch: the tensor stacking would give.
    :meth:`batch` returns a batch on the compute device.
    """

    def __init__(self, samples: Sequence[tuple[tuple, dict]], device: torch.device,
                 cache_device: torch.device):
        first_args, first_kwargs = samples[0]
        self.n = len(samples)
        self.device = device
        self.cache_device = cache_device
        self.hidden = _stack([a[0] for a, _ in samples], cache_device)
        self.rest_args = _to_device(first_args[1:], device)
        self.kwargs = {}
        self.per_sample = set()  # stacked: one row per sample
        self.expanded = set()  # the same for every sample: one row, expanded to each batch
        for key, value in first_kwargs.items():
            if key in ("past_key_values", "past_key_value", "layer_past"):
                self.kwargs[key] = None  # tuning re-runs the block: no KV cache
                continue
            if key == "use_cache":
                self.kwargs[key] = False
                continue
            if self._stackable(value):
                values = [kw[key] for _, kw in samples]
                if all(same_value(v, value) for v in values[1:]):
                    self.kwargs[key] = _to_device(value, device)
                    self.expanded.add(key)
                else:
                    self.kwargs[key] = _cat_tree(values, device)
                    self.per_sample.add(key)
            else:
                self.kwargs[key] = _to_device(value, device)

    def drop_causal_mask(self, block: nn.Module) -> bool:
        """If every sample's attention mask is the plain causal mask and the block's attention
        is SDPA with is_causal, pass no mask: SDPA then runs its causal flash kernel instead of
        a masked kernel (same attention, several times faster backward). True if dropped."""
        mask = self.kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or not {"attention_mask"} & (self.per_sample | self.expanded):
            return False
        attn = [m for m in block.modules() if hasattr(m, "is_causal") and hasattr(m, "config")]
        if not attn or not all(m.is_causal and getattr(m.config, "_attn_implementation", None) == "sdpa"
                               for m in attn):
            return False
        if mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
            return False
        allowed = mask if mask.dtype == torch.bool else mask == 0
        causal = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
        if not bool(torch.equal(allowed, causal.expand_as(allowed))):
            return False
        self.kwargs["attention_mask"] = None
        self.per_sample.discard("attention_mask")
        self.expanded.discard("attention_mask")
        return True

    @staticmethod
    def _stackable(value) -> bool:
        """Per-sample tensors (batch dimension 1, at least 2-D) are stacked; the rest (1-D
        cache positions, flags) are shared by all samples."""
        leaves = value if isinstance(value, (tuple, list)) else (value,)
        return bool(leaves) and all(isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == 1
                                    for t in leaves)

    def kwargs_for(self, idx: torch.Tensor) -> dict:
        """The block's keyword arguments for the samples ``idx`` (on the compute device)."""
        kwargs = {}
        for key, value in self.kwargs.items():
            if key in self.per_sample:
                kwargs[key] = _map_leaves(value, lambda t: _take_rows(t, idx))
            elif key in self.expanded:  # a fresh tensor, as index_select gives: a block that
                # writes into its kwargs cannot reach the cache
                kwargs[key] = _map_leaves(value, lambda t: t.expand(idx.numel(), *t.shape[1:]).clone(
                    memory_format=torch.contiguous_format))
            else:
                kwargs[key] = value
        return kwargs

    def batch(self, idx: torch.Tensor, hidden: Optional[torch.Tensor] = None):
        """(args, kwargs) for the samples ``idx`` (a tensor on the compute device), with the
        hidden states taken from ``hidden`` (default: the fp inputs)."""
        h = _rows(self.hidden if hidden is None else hidden, idx, self.device)
        return (h, *self.rest_args), self.kwargs_for(idx)


def _map_leaves(value, fn):
    return type(value)(fn(t) for t in value) if isinstance(value, (tuple, list)) else fn(value)


def same_value(a, b) -> bool:
    """a and b hold the same bits: same structure, shapes, dtypes and contents. Compared as
    64-bit words where the layout allows (4x faster than torch.equal on a bf16 mask on the
    CPU); -0.0 against 0.0 counts as different, which only costs the caller a stack."""
    if isinstance(a, (tuple, list)):
        return (isinstance(b, (tuple, list)) and len(a) == len(b)
                and all(same_value(x, y) for x, y in zip(a, b)))
    if a is b:
        return True
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False  # other leaves (None, flags, caches) count as the same only if identical
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if not (a.is_contiguous() and b.is_contiguous()):
        return bool(torch.equal(a, b))

    def flat(t):
        raw = t.reshape(-1).view(torch.uint8)
        words = _words(raw)
        return raw if words is None else words

    return bool(torch.equal(flat(a), flat(b)))


def _words(t: torch.Tensor) -> Optional[torch.Tensor]:
    """t's last dimension read as 64-bit words (the same bytes), or None where its size in
    bytes or its storage offset is not a multiple of 8."""
    try:
        return t.view(torch.int64)
    except RuntimeError:
        return None


def _take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t.index_select(0, idx), gathered as 8-byte words where the rows allow: for a few long
    rows (a batch of 8 from the cache) torch's kernel moves one element per thread, which for
    bf16 is a quarter of the bytes per instruction of 8-byte words (the same bits either way)."""
    words = _words(t.view(t.shape[0], -1)) if t.dim() >= 2 and t.is_contiguous() and t.numel() else None
    if words is None:
        return t.index_select(0, idx)
    return words.index_select(0, idx).view(t.dtype).view(idx.numel(), *t.shape[1:])


def _rows(t: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t[idx] on ``device``; t may live in host memory."""
    if t.device == idx.device:
        return _take_rows(t, idx)
    return t.index_select(0, idx.to(t.device)).to(device, non_blocking=True)


def _empty_cache(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised cache tensor on ``device``, pinned if that is the host of a GPU."""
    pin = device.type == "cpu" and torch.cuda.is_available()
    return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)


def _stack(parts: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """torch.cat(parts) on ``device`` (pinned if the host), copied part by part: no host-side
    concatenation of the whole cache before the transfer. Parts that are consecutive rows of
    one tensor there already (:func:`pack_samples`) are that tensor, not a copy."""
    packed = _packed(parts, device)
    if packed is not None:
        return packed
    rows = sum(p.shape[0] for p in parts)
    out = _empty_cache((rows, *parts[0].shape[1:]), parts[0].dtype, device)
    start = 0
    for p in parts:
        out[start: start + p.shape[0]].copy_(p, non_blocking=p.is_pinned())
        start += p.shape[0]
    return out


def _packed(parts: Sequence[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """The rows of ``parts`` as one tensor without a copy, if they are consecutive contiguous
    rows of one storage on ``device`` (pinned if that is the host of a GPU); else None."""
    first = parts[0]
    device = _indexed(device)
    if first.device != device or (device.type == "cpu" and torch.cuda.is_available()
                                  and not first.is_pinned()):
        return None
    row_shape, storage = first.shape[1:], first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for p in parts:
        if (p.dtype != first.dtype or p.shape[1:] != row_shape or not p.is_contiguous()
                or p.device != device or p.untyped_storage().data_ptr() != storage
                or p.storage_offset() != offset):
            return None
        offset += p.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *row_shape))


def pack_samples(samples: Sequence[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The samples with their hidden states (each sample's first argument) moved into one
    tensor, each sample's now a view of its rows, when they live on a GPU: tune_block then
    takes that tensor as its cache without copying it (no second copy of the inputs on the
    card). Samples on the host, or of unequal shapes, come back as they are."""
    hidden = [args[0] if args else None for args, _ in samples]
    if (not hidden or not all(isinstance(h, torch.Tensor) for h in hidden)
            or hidden[0].device.type == "cpu"
            or len({(h.device, h.dtype, h.shape[1:]) for h in hidden}) != 1):
        return list(samples)
    packed = torch.cat(hidden, 0)
    out, start = [], 0
    for (args, kwargs), h in zip(samples, hidden):
        out.append(((packed[start: start + h.shape[0]], *args[1:]), kwargs))
        start += h.shape[0]
    return out


def _to_cache(t: torch.Tensor, cache_device: torch.device) -> torch.Tensor:
    t = t.detach().to(cache_device)
    if cache_device.type == "cpu" and torch.cuda.is_available() and not t.is_pinned():
        t = t.pin_memory()
    return t


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


def _place_linears(linears: dict[str, nn.Linear], devices: Sequence[torch.device]) -> dict[str, torch.device]:
    """device_ids: each Linear to the device with the fewest weight elements so far, largest
    Linear first (ties: the earlier device), so the tuned weights, V, the scales and their
    gradients spread evenly. Deterministic: every rank places alike."""
    load = [0] * len(devices)
    placed = {}
    for name, mod in sorted(linears.items(), key=lambda kv: -kv[1].weight.numel()):
        k = min(range(len(devices)), key=lambda i: load[i])
        placed[name] = devices[k]
        load[k] += mod.weight.numel()
    return {name: placed[name] for name in linears}


def _replace(block: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, new)


def _run(block, inputs: _Inputs, batch_size: int, autocast, hidden=None):
    """The block's output for every sample, on the cache device; each batch is written
    straight into the cache, so nothing is concatenated or re-pinned."""
    outs = None
    for start in range(0, inputs.n, batch_size):
        idx = torch.arange(start, min(start + batch_size, inputs.n), device=inputs.device)
        args, kwargs = inputs.batch(idx, hidden)
        with autocast():
            out = _block_output(block(*args, **kwargs)).detach()
        if outs is None:
            outs = _empty_cache((inputs.n, *out.shape[1:]), out.dtype, inputs.cache_device)
        outs[start: start + out.shape[0]].copy_(out)
    return outs


def _waits_for_host(block, inputs: _Inputs, autocast) -> bool:
    """True if the block's forward synchronizes with the host (MoE routing's nonzero, .item(),
    .tolist()): a CUDA graph cannot capture it. One no-grad forward of one sample under
    torch's sync debug mode "error"; any other error is the block's own and is raised."""
    args, kwargs = inputs.batch(torch.zeros(1, dtype=torch.long, device=inputs.device))
    torch.cuda.synchronize(inputs.device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # "a prototype feature": said once per process, to users
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), autocast():
            block(*args, **kwargs)
        return False
    except RuntimeError as e:
        if "synchronizing CUDA operation" not in str(e):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize(inputs.device)


def _activation_stats(block, linears, inputs, autocast, hidden, want_max: bool, want_imatrix: bool,
                      cuda_graph: bool = False):
    """Per Linear input, on q_in: max |x| (exact in the input dtype, kept in fp32; for W4A4's
    input global scale) and sum x^2 per channel in fp32 (the imatrix, for iters=0). The pass
    is skipped when neither is wanted. It runs one sample at a time, as auto-round's values
    come from a per-sample pass: batched matmuls round differently (down_proj's act_max was
    4 ulp off when this pass ran in batches, and the tuning parted ways from there).

    With ``cuda_graph`` (and the hidden states on the device) the one-sample forward is
    captured once and replayed for each sample: the same kernels on the same data, without
    the launch overhead that rules a small block's one-sample forward.

    The block's output is not used here, so after the first sample the last Linear the block
    calls (down_proj) returns zeros instead of computing its matmul: its input is recorded
    before, and no recorded Linear reads its output (:func:`_skip_last_linear`)."""
    stats = {n: [torch.zeros((), dtype=torch.float32, device=inputs.device),
                 torch.zeros(m.in_features, dtype=torch.float32, device=inputs.device)]
             for n, m in linears.items()}
    if not (want_max or want_imatrix):
        return stats
    hooks = []
    order: list[str] = []  # the Linears in the order the first forward calls them
    recording = [True]
    for name, mod in linears.items():
        def hook(_m, args, name=name):  # in place: a captured graph updates the same tensors
            if recording[0]:
                order.append(name)
            x = args[0].detach()
            st = stats[name]
            if want_max:
                torch.maximum(st[0], x.abs().amax().to(torch.float32), out=st[0])
            if want_imatrix:
                st[1].add_(x.reshape(-1, x.shape[-1]).to(torch.float32).pow(2).sum(0))
        hooks.append(mod.register_forward_pre_hook(hook))
    idx = torch.zeros(1, dtype=torch.long, device=inputs.device)

    def forward():  # sample idx; idx is set outside, so that a captured graph reads it anew
        args, kwargs = inputs.batch(idx, hidden)
        with autocast():
            block(*args, **kwargs)

    restore = contextlib.ExitStack()
    try:
        with torch.no_grad():
            graphed = cuda_graph and hidden.device == inputs.device
            warm = min(2, inputs.n) if graphed else inputs.n  # real samples, each counted once
            side = torch.cuda.Stream(inputs.device) if graphed else None
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(inputs.device))
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for i in range(warm):
                    idx.fill_(i)
                    forward()
                    if i == 0:
                        recording[0] = False
                        restore.enter_context(_skip_last_linear(linears, order))
            if not graphed:
                return stats
            torch.cuda.current_stream(inputs.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward()
            for i in range(warm, inputs.n):
                idx.fill_(i)
                graph.replay()
            del graph
    finally:
        restore.close()
        for h in hooks:
            h.remove()
    return stats


@contextlib.contextmanager
def _skip_last_linear(linears: dict[str, nn.Linear], order: Sequence[str]):
    """Within the ``with``, the Linear the block called last (``order``: the names its first
    forward called, in order) returns zeros of its output's shape and dtype instead of its
    matmul, if it was called once; its input hook still runs (the hook is the module's, the
    forward the instance's). Every other recorded Linear ran before it, so none reads its
    output. The module's own forward (or compressed-tensors' wrapper of it) comes back on
    the way out."""
    last = order[-1] if order else None
    if last is None or order.count(last) != 1:
        yield
        return
    mod = linears[last]
    had = mod.__dict__.get("forward")

    def zeros(x, *args, **kwargs):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return x.new_zeros((*x.shape[:-1], mod.out_features), dtype=dtype)

    mod.forward = zeros
    try:
        yield
    finally:
        if had is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = had


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
    cache_device: Optional[str | torch.device] = None,
    cuda_graph: Optional[bool] = None,
    distributed: Optional[bool] = None,
    batch_order: Optional[Sequence[Sequence[int]]] = None,
    linear_devices: Optional[Sequence[str | torch.device]] = None,
    fuse_elementwise: Optional[bool] = None,
    step_in_backward: Optional[bool] = None,
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
        progress: called with (iteration, loss) for every iteration; on a GPU in batches of
            a few iterations, so that reading the loss does not stall the GPU every step.
        cache_device: where the block's cached hidden states, reference outputs and quantized
            outputs live: the compute device (default) or "cpu" (pinned host memory, for cards
            short of memory; each iteration then copies its batch over).
        cuda_graph: capture one tuning iteration in a CUDA graph and replay it (default: on
            for backend "cuda"). The loss, best-parameter bookkeeping, sampling and learning
            rate all live on the GPU, so the loop never waits for the host. A block whose
            forward waits for the host (MoE routing) runs eagerly instead, and
            ``BlockResult.eager_reason`` says so.
        distributed: data parallel over torch.distributed (default: on when a process group
            of more than one rank is initialised, as under torchrun). Each rank passes its own
            share of the samples; act_max and the imatrix are reduced over ranks (max, sum),
            the gradients of V and the scales are summed before every sign step and the loss
            that picks the best parameters is the global one, so every rank takes the same
            steps and ends with the same weights. q_outputs stay with the rank that owns the
            samples. The loop runs eagerly then (no CUDA graph).
        batch_order: the samples of every iteration (iters lists of indices), instead of the
            seeded shuffle; for reproducing a run exactly.
        linear_devices: spread the block's Linears over these devices while tuning
            (llm-compressor's ``device_ids``, for a block too large for one card): each Linear's
            weight, V, scales and their gradients live on one of them (balanced by weight
            size, ``BlockResult.placement``), its input hops there and its output back. The
            rest of the block, the caches and the loss stay on ``device``. The loop runs
            eagerly then (no CUDA graph) and the results equal the one-device run's. The
            Linears are back on ``device`` when tuning returns.
        fuse_elementwise: in the tuning loop and the reference and output passes, run the
            block's RMSNorms, SiLU(gate) * up and rotary embeddings compiled by torch.compile,
            each fused into one kernel forward and backward (:mod:`autoround_fast.fusion`;
            Llama-form implementations only, ``BlockResult.fused`` lists them); under W4A4,
            SiLU(gate) * up and down_proj's activation quantization run as one op
            (:func:`autoround_fast.ops.silu_mul_nvfp4_activation`, eager's bits). Default: on
            for backend "cuda" where Triton is there (also under ``distributed`` and
            ``linear_devices``). The compiled ops round as eager does but reduce in their own
            order (differences of an ulp); on the CPU, where results are bit for bit
            auto-round's, it is an error. The calibration pass (act_max) always runs the block
            as it is.
        step_in_backward: take SignRound's step inside each Linear's weight backward (one
            kernel computes the gradients of V and the scales and steps them in place, so the
            gradients never go through memory; the same bits). Default: on with the kernels
            where it applies: one micro-batch per step (gradient_accumulate_steps=1), no
            process group, the Linears on one device; True elsewhere is an error.
            ``BlockResult.step_in_backward`` lists the Linears it served.

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
    device = _indexed(torch.device(device or next(block.parameters()).device))
    block.to(device)
    dtype = next(block.parameters()).dtype
    linears = _linears(block, specs)
    for name, mod in linears.items():
        if not bool(torch.isfinite(mod.weight).all()):
            raise ValueError(f"tune_block: weight of {name!r} has non-finite values (NaN or Inf)")
    placement = _place_linears(linears, _linear_devices(linear_devices, device)) if linear_devices else {}
    spread = any(d != device for d in placement.values())
    if fuse_elementwise and device.type != "cuda":
        raise ValueError(f"tune_block: fuse_elementwise=True needs a GPU; the block is on {device} "
                         "(there the model's own ops run, bit for bit as auto-round's)")

    # autocast in the model dtype; forced to bf16 when activations are quantized (auto-round)
    with _sdpa_attention(block, enabled=device.type == "cuda"):
        act_quant = any(s.act for s in specs.values())
        use_amp = act_quant or dtype in (torch.bfloat16, torch.float16)
        amp_dtype = torch.bfloat16 if act_quant else dtype
        if device.type == "cpu" and dtype == torch.float32 and not _cpu_has_bf16():
            # auto-round turns amp off on a CPU without AVX512-BF16 and keeps an fp32 model in
            # fp32, activation quantization included
            use_amp, amp_dtype = False, torch.float32

        def autocast():  # no weight-cast cache: the tuned weights change every step (and graphs)
            return torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp, cache_enabled=False)

        def model_dtype_autocast():  # the calibration pass (act_max, imatrix) runs in the model dtype
            return torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16),
                                  cache_enabled=False)  # it may be captured in a CUDA graph

        cache_device = torch.device(cache_device) if cache_device is not None else device
        if cache_device.type not in ("cpu", device.type):
            raise ValueError(f"tune_block: cache_device must be 'cpu' or the compute device {device}, "
                             f"got {cache_device}")
        if cache_device.type == device.type:
            cache_device = device
        if cuda_graph is None:
            cuda_graph = be.name == "cuda"
        dist = _process_group() if distributed in (None, True) else None
        if distributed and dist is None:
            raise ValueError("tune_block: distributed=True, but no torch.distributed process group "
                             "of more than one rank is initialised")
        cuda_graph = bool(cuda_graph) and device.type == "cuda" and dist is None
        if fuse_elementwise is None:
            fuse_elementwise = be.name == "cuda" and device.type == "cuda" and fusion.available()
        # the step inside the backward needs each gradient final when its backward runs
        step_fits = be.uses_kernels and gradient_accumulate_steps == 1 and dist is None and not spread
        if step_in_backward and not step_fits:
            raise ValueError("tune_block: step_in_backward=True needs the kernels (backend 'cuda'), one "
                             "micro-batch per step (gradient_accumulate_steps=1), no process group and the "
                             "Linears on one device")
        step_in_backward = step_fits and step_in_backward is not False
        eager_reason = ""
        if cuda_graph and spread:
            cuda_graph = False
            eager_reason = ("the Linears are spread over several devices (linear_devices): the loop "
                            "runs eagerly")
        phases: dict[str, float] = {}
        mark = [time.perf_counter()]

        def phase(name: str) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + now - mark[0]
            mark[0] = now

        inputs = _Inputs(fp_inputs, device, cache_device)
        inputs.drop_causal_mask(block)
        if cuda_graph and _waits_for_host(block, inputs, autocast):
            cuda_graph = False
            eager_reason = ("the block's forward waits for the host (e.g. MoE routing's nonzero or "
                            ".item()), which a CUDA graph cannot hold: it runs eagerly")
        q_hidden = (inputs.hidden if q_inputs is None
                    else _to_cache(q_inputs.to(dtype=inputs.hidden.dtype), cache_device))
        mask = None if token_mask is None else token_mask.to(device=device, dtype=torch.float32)

        # The tuning loop and the reference and output passes run with the fused element-wise
        # ops (Inductor's, and the SiLU-gated MLP's W4A4 input in one pass). The calibration
        # pass stays eager: act_max is auto-round's, bit for bit.
        fuse = bool(fuse_elementwise) and iters > 0
        with torch.no_grad():
            phase("inputs")
            with fusion.fused_elementwise(block, fuse):
                ref = _run(block, inputs, batch_size, autocast) if iters > 0 else None
            phase("reference")
        stats = _activation_stats(block, linears, inputs, model_dtype_autocast, q_hidden,
                                  want_max=act_quant, want_imatrix=iters == 0, cuda_graph=cuda_graph)
        if dist is not None:  # every rank quantizes with the statistics of all samples
            for name in linears:
                if act_quant:
                    dist.all_reduce(stats[name][0], op=dist.ReduceOp.MAX)
                if iters == 0:
                    dist.all_reduce(stats[name][1])
        phase("calibration")

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
            if placement.get(name, device) != device:
                mod.to(placement[name])  # TunedLinear keeps its tensors on the weight's device
            tl = TunedLinear(mod, spec, be, gs, act_gs)
            tuned[name] = tl
            _replace(block, name, tl)
        memos = _share_input_quantization(tuned)

        result = BlockResult(q_outputs=torch.empty(0), qparams={}, eager_reason=eager_reason,
                             placement={n: str(d) for n, d in placement.items()})
        frozen = [(p, p.requires_grad) for p in block.parameters()
                  if not any(p is t for tl in tuned.values() for t in tl.tunables())]
        try:
            for p, _ in frozen:  # only V and the scales get gradients
                p.requires_grad_(False)
            with torch.enable_grad(), fusion.fused_elementwise(block, fuse) as fused:
                result.fused = {k: v for k, v in fused.items() if v}
                if iters > 0:
                    _sign_round(block, tuned, inputs, q_hidden, ref, mask, be, iters, batch_size, lr,
                                seed, gradient_accumulate_steps, autocast, result, progress, cuda_graph,
                                dist, batch_order, step_in_backward)
            phase("tune")
            with torch.no_grad():
                final = {}
                for name, tl in tuned.items():
                    if iters == 0 and tl.spec.kind == "nvfp4":
                        wq, scale = _opt_rtn_nvfp4(tl, stats[name][1].to(tl.v.device))
                        zp = None
                    elif iters == 0 and tl.spec.kind == "int" and tl.spec.sym:
                        wq, scale = _opt_rtn_int_sym(tl, stats[name][1].to(tl.v.device))
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
                    tl.linear.to(device)  # linear_devices: the Linear and its qparams come back
                    final[name] = {k: v.to(device) for k, v in qp.items()}
                if dist is not None:
                    # Every rank has read the block's weights before any rank writes one: under
                    # llm-compressor's distributed oneshot the ranks may share the weights'
                    # storage (compressed-tensors' shared CPU offload).
                    dist.barrier()
                for name, qp in final.items():
                    tl = tuned[name]
                    stored = finalize(name, tl.linear, qp) if finalize else qp["weight"]
                    tl.linear.weight.data.copy_(stored.to(tl.linear.weight.dtype))
                    qp.pop("weight")
                    result.qparams[name] = qp
                if dist is not None:
                    dist.barrier()  # and every write is done before any rank reads on
        finally:
            for memo in memos:  # the loop's last activations: free them
                memo.source = memo.result = None
            for p, requires_grad in frozen:
                p.requires_grad_(requires_grad)
            for name, tl in tuned.items():
                tl.linear.to(device)
                if tl.spec.act:
                    _replace(block, name, _ActQuantLinear(tl.linear, be, tl.act_global_scale.to(device)))
                else:
                    _replace(block, name, tl.linear)
        with torch.no_grad(), fusion.fused_elementwise(block, fuse):
            phase("finalize")
            result.q_outputs = _run(block, inputs, batch_size, autocast, q_hidden)
            phase("outputs")
        for name, tl in tuned.items():
            if tl.spec.act:
                _replace(block, name, tl.linear)
        result.seconds = time.perf_counter() - t0
        result.phases = phases
        return result


def _indexed(device: torch.device) -> torch.device:
    """One spelling per device ("cuda" -> "cuda:<current>"), so that devices compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _linear_devices(devices: Sequence[str | torch.device], device: torch.device) -> list[torch.device]:
    """The linear_devices of tune_block as devices of the compute device's type, or a clear error."""
    out = []
    for d in devices:
        try:
            d = torch.device(d)
        except (RuntimeError, TypeError):
            raise ValueError(f"tune_block: linear_devices holds {d!r}, which is not a device") from None
        d = _indexed(d)
        if d.type != device.type:
            raise ValueError(f"tune_block: linear_devices must be {device.type} devices, as the compute "
                             f"device {device} is; got {d}")
        if d.type == "cuda" and d.index >= torch.cuda.device_count():
            raise ValueError(f"tune_block: linear_devices names {d}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        out.append(d)
    return out


def _cpu_has_bf16() -> bool:
    """AVX512-BF16 on this CPU (auto-round's test for bf16 tuning on a CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512_bf16" in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


@contextlib.contextmanager
def _sdpa_attention(block: nn.Module, enabled: bool = True):
    """On a GPU, run the block's attention through SDPA while tuning if the model is set to
    eager attention (llm-compressor's calibration leaves it so): the same attention, but a
    fused flash kernel instead of fp32 score matrices (at 8 x 2048 tokens the eager backward
    alone costs ~20 ms per iteration); it rounds differently, so auto-round's results are
    then matched to run-to-run noise, not bit for bit. On a CPU the model's own attention
    runs (bit-for-bit equivalence, tests/test_equivalence.py). Left alone: sliding windows,
    logit soft-capping, attention dropout, and any implementation other than eager."""
    swapped = []
    for m in block.modules() if enabled else ():
        cfg = getattr(m, "config", None)
        if not (hasattr(m, "is_causal") and cfg is not None and getattr(cfg, "_attn_implementation", None) == "eager"):
            continue
        if (getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None)
                or (m.training and getattr(cfg, "attention_dropout", 0.0))):
            continue
        if all(c is not cfg for c, _ in swapped):
            swapped.append((cfg, cfg._attn_implementation))
            cfg._attn_implementation = "sdpa"
    try:
        yield
    finally:
        for cfg, old in swapped:
            cfg._attn_implementation = old


def _lr_schedule(lr: float, iters: int) -> list[float]:
    """The learning rate of every iteration: a tensor lr under LinearLR (1 -> 0), stepped by
    the scheduler class auto-round uses, so each value rounds as auto-round's does (the
    optimizer only holds the lr; the sign step itself is in _sign_round)."""
    dummy = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([dummy], lr=torch.tensor(lr))
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=iters)
    lrs = []
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": by design
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(iters):
            lrs.append(float(opt.param_groups[0]["lr"]))
            sched.step()
    return lrs


def _batch_order(n: int, global_bs: int, iters: int, seed: int) -> list[list[int]]:
    """Sample indices of every iteration: shuffled without replacement, reshuffled when an
    epoch runs out (auto-round's IndexSampler, driven by random.Random(seed))."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    pos = 0
    out = []
    for _ in range(iters):
        if pos + global_bs > n:
            rng.shuffle(order)
            pos = 0
        out.append(order[pos: pos + global_bs])
        pos += global_bs
    return out


class _Batches:
    """Where an iteration's quantized inputs and reference outputs come from: index_select on
    the device caches, or, with host caches, device buffers the host fills before each step
    (double-buffered pinned staging, so filling the next never races the copy in flight)."""

    def __init__(self, inputs: _Inputs, q_hidden, ref, order: list[list[int]]):
        self.inputs, self.q_hidden, self.ref, self.order = inputs, q_hidden, ref, order
        self.on_host = q_hidden.device != inputs.device
        if self.on_host:
            gbs = len(order[0])
            self.h = torch.empty((gbs, *q_hidden.shape[1:]), dtype=q_hidden.dtype, device=inputs.device)
            self.r = torch.empty((gbs, *ref.shape[1:]), dtype=ref.dtype, device=inputs.device)
            pin = torch.cuda.is_available()
            self.stage = [(torch.empty(self.h.shape, dtype=q_hidden.dtype, pin_memory=pin),
                           torch.empty(self.r.shape, dtype=ref.dtype, pin_memory=pin)) for _ in range(2)]
            self.done = [None, None]

    def prepare(self, it: int) -> None:
        """Host side, before iteration ``it`` runs: stage its rows (host caches only)."""
        if not self.on_host:
            return
        slot = it % 2
        if self.done[slot] is not None:
            self.done[slot].synchronize()  # the copy that last read this staging buffer is over
        sh, sr = self.stage[slot]
        idx = torch.tensor(self.order[it])
        torch.index_select(self.q_hidden, 0, idx, out=sh)
        torch.index_select(self.ref, 0, idx, out=sr)
        self.h.copy_(sh, non_blocking=True)
        self.r.copy_(sr, non_blocking=True)
        if self.h.is_cuda:
            self.done[slot] = torch.cuda.Event()
            self.done[slot].record()

    def get(self, idx: torch.Tensor, start: int, stop: int):
        """(args, kwargs, ref) of the micro-batch idx = the iteration's samples[start:stop]."""
        if self.on_host:
            args = (self.h[start:stop], *self.inputs.rest_args)
            return args, self.inputs.kwargs_for(idx), self.r[start:stop]
        args, kwargs = self.inputs.batch(idx, self.q_hidden)
        return args, kwargs, _take_rows(self.ref, idx)


class _IterationProfiler:
    """AUTOROUND_FAST_PROFILE=1: profile iterations 4..6 of each block's loop (replayed from
    the graph when there is one) and print the kernels that took the most GPU time."""

    traces = 0  # AUTOROUND_FAST_PROFILE_TRACE=dir: each profile's timeline is written there

    def __init__(self, iters: int):
        self.prof = None
        self.on = (os.environ.get("AUTOROUND_FAST_PROFILE") == "1" and iters >= 8
                   and torch.cuda.is_available())

    def after(self, it: int) -> None:
        if not self.on:
            return
        from torch.profiler import ProfilerActivity, profile

        if it == 3:
            torch.cuda.synchronize()
            self.prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
            self.prof.__enter__()
        elif it == 6 and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            rows = [(getattr(e, "device_time_total", 0) / 3e3, e.count // 3, e.key[:100])
                    for e in self.prof.key_averages() if getattr(e, "device_time_total", 0) > 0
                    and not e.key.startswith(("aten::", "autograd::", "ProfilerStep"))]
            rows.sort(reverse=True)
            trace_dir = os.environ.get("AUTOROUND_FAST_PROFILE_TRACE")
            if trace_dir:  # the timeline, for the gaps between kernels (chrome://tracing)
                os.makedirs(trace_dir, exist_ok=True)
                _IterationProfiler.traces += 1
                self.prof.export_chrome_trace(
                    os.path.join(trace_dir, f"trace-{os.getpid()}-{_IterationProfiler.traces}.json"))
            print(f"AUTOROUND_FAST_PROFILE: {len(rows)} kernels, {sum(r[1] for r in rows)} launches per "
                  "iteration")
            print(f"AUTOROUND_FAST_PROFILE: GPU ms per iteration {sum(r[0] for r in rows):.2f}; by kind: "
                  + ", ".join(f"{kind} {ms:.2f}" for kind, ms in _kernel_kinds(rows).items()))
            print("AUTOROUND_FAST_PROFILE: top kernels:")
            for ms, count, key in rows[:25]:
                print(f"  {ms:8.3f} ms  x{count:<4d} {key}")
            self.prof = None


_KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("ours", ("fake_quant_", "silu_mul_act", "masked_mse_", "sign_step_kernel")),
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul")),
    ("fused (Triton)", ("triton_",)),
    ("copies and gathers", ("memcpy", "memset", "copy", "cat", "index", "gather", "fill")),
)


def _kernel_kinds(rows) -> dict[str, float]:
    """GPU ms per iteration by kind of kernel, from the profiler's (ms, count, name) rows."""
    kinds: dict[str, float] = {kind: 0.0 for kind, _ in _KERNEL_KINDS}
    kinds["other element-wise"] = 0.0
    for ms, _, name in rows:
        low = name.lower()
        kind = next((k for k, keys in _KERNEL_KINDS if any(key in low for key in keys)), "other element-wise")
        kinds[kind] += ms
    return kinds


def _process_group():
    """torch.distributed when a group of more than one rank is initialised, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _sign_round(block, tuned, inputs, q_hidden, ref, mask, be, iters, batch_size, lr, seed,
                accumulate, autocast, result, progress, cuda_graph, dist=None, batch_order=None,
                step_in_backward=False):
    """SignRound's loop. One iteration (:func:`step`) touches only device tensors: the batch
    indices, learning rate and valid-token count come from per-iteration tables indexed by an
    on-device counter, and the best-score bookkeeping is a torch.where, so the same step runs
    eagerly (CPU, warm-up) or replayed from a CUDA graph.

    With ``step_in_backward`` (tune_block checked that it applies: one micro-batch, no process
    group, one device, the kernels), the iteration's score, improved flag and learning rate
    are computed before the backward, and each Linear's weight backward takes the step on its
    tunables itself (ops.step_in_backward_nvfp4): the same bits, without writing and reading
    back V's gradient. The first iteration runs as
    before and counts each Linear's forwards; from the second on, the Linears with one forward
    per iteration step in their backward, and a Linear whose backward did not run in an
    iteration gets the usual best copy."""
    params = [p for tl in tuned.values() for p in tl.tunables()]
    device = inputs.device
    devices = {p.device for p in params}  # more than one with linear_devices
    n = inputs.n
    global_bs = min(n, batch_size * accumulate)
    if batch_order is None:
        order = _batch_order(n, global_bs, iters, seed)
    else:
        order = [list(map(int, b)) for b in batch_order]
        if len(order) != iters or any(len(b) != global_bs or not all(0 <= i < n for i in b) for b in order):
            raise ValueError(f"tune_block: batch_order must hold {iters} lists of {global_bs} sample "
                             f"indices in [0, {n})")
    all_idx = torch.tensor(order, dtype=torch.long, device=device)
    lrs = torch.tensor(_lr_schedule(1.0 / iters if lr is None else lr, iters), dtype=torch.float32,
                       device=device)
    # auto-round scores an iteration by the sum over micro-batches of loss / n, in float64 on
    # the host, with n the valid tokens of the global batch (with a mask), else the elements of
    # its inputs (with gradient accumulation), else 1: the same here, on the device
    if mask is None:
        n_elm = global_bs * q_hidden[0].numel() if accumulate != 1 else 1
        valid = torch.full((iters,), float(n_elm), dtype=torch.float64, device=device)
    else:
        valid = mask.to(torch.float64).sum(-1).index_select(0, all_idx.reshape(-1))
        valid = valid.reshape(iters, global_bs).sum(-1)
    if dist is not None and (mask is not None or accumulate != 1):
        dist.all_reduce(valid)  # counts of the global batch, over all ranks
    if mask is not None:
        valid = valid.clamp_min(1.0)
    it_t = torch.zeros(1, dtype=torch.long, device=device)
    losses = torch.zeros(iters, dtype=torch.float64, device=device)
    best_score = torch.full((1,), float("inf"), dtype=torch.float64, device=device)
    best_total = torch.full((1,), float("nan"), dtype=torch.float64, device=device)
    best_iter = torch.zeros(1, dtype=torch.long, device=device)
    best_of = {name: [p.detach().clone() for p in tl.tunables()] for name, tl in tuned.items()}
    best = [b for bs in best_of.values() for b in bs]  # aligned with params
    batches = _Batches(inputs, q_hidden, ref, order)
    micro = [(s, min(s + batch_size, global_bs)) for s in range(0, global_bs, batch_size)]

    stepping = bool(step_in_backward)
    assert not stepping or (len(micro) == 1 and dist is None and len(devices) == 1)
    improved_now = torch.zeros(1, dtype=torch.bool, device=device)  # filled before the backward
    lr_now = torch.zeros(1, dtype=torch.float32, device=device)
    ran: set = set()  # the Linears whose backward took the step this iteration
    for tl in tuned.values():
        tl.forwards = 0

    def attach_steppers():
        """After the first iteration: the step moves into the backward of each Linear that ran
        one forward with gradients in it."""
        for name, tl in tuned.items():
            if tl.forwards == 1:
                tl.stepper = _Stepper(best_of[name], improved_now, lr_now, ran, name)
        result.step_in_backward = sorted(n for n, tl in tuned.items() if tl.stepper is not None)

    # Data parallel: each gradient's all-reduce starts as soon as the last micro-batch's
    # backward has accumulated it (down_proj's first), so the transfers overlap the rest of the
    # backward; the step waits for all of them. The sums are the same as reducing afterwards.
    in_flight, last_micro = [], [False]

    def reduce_when_ready(p):
        if last_micro[0]:
            in_flight.append(dist.all_reduce(p.grad, async_op=True))

    # With linear_devices the backward runs one autograd thread per device, so hooks would
    # issue the collectives in an order that differs between ranks (NCCL hangs): then each
    # gradient is reduced after the backward, in parameter order, via the compute device.
    overlap = dist is not None and len(devices) == 1
    grad_hooks = [p.register_post_accumulate_grad_hook(reduce_when_ready) for p in params] if overlap else []

    def step():
        idx_all = all_idx.index_select(0, it_t).reshape(-1)
        n_valid = valid.index_select(0, it_t)
        total = torch.zeros(1, dtype=torch.float64, device=device)
        score = torch.zeros(1, dtype=torch.float64, device=device)
        for k, (start, stop) in enumerate(micro):
            last_micro[0] = k == len(micro) - 1
            idx = idx_all[start:stop]
            args, kwargs, ref_b = batches.get(idx, start, stop)
            with autocast():
                pred = _block_output(block(*args, **kwargs))
            m = None if mask is None else mask.index_select(0, idx).reshape(-1)
            loss = be.loss(pred, ref_b, m)
            l64 = loss.detach().to(torch.float64).reshape(1)
            total = total + l64
            score = score + l64 / n_valid
            if stepping:  # one micro-batch: the score is final before the backward
                torch.lt(score, best_score, out=improved_now)
                lr_now.copy_(lrs.index_select(0, it_t))
                ran.clear()
            (loss * 1000).backward()
        if dist is not None:  # one step for all ranks: summed gradients, the global loss
            while in_flight:
                in_flight.pop().wait()
            if not overlap:
                for p in params:
                    if p.grad is None:
                        continue
                    if p.device == device:
                        dist.all_reduce(p.grad)
                    else:  # staged on the compute device, the one the group serves
                        g = p.grad.to(device)
                        dist.all_reduce(g)
                        p.grad.copy_(g)
            both = torch.cat([total, score])
            dist.all_reduce(both)
            total, score = both[:1], both[1:]
        with torch.no_grad():
            # scored before the step, as auto-round (stepping: done before the backward)
            improved = improved_now if stepping else score < best_score
            stepped = {id(p) for name in ran for p in tuned[name].tunables()}
            best_score.copy_(torch.where(improved, score, best_score))
            best_total.copy_(torch.where(improved, total, best_total))
            best_iter.copy_(torch.where(improved, it_t, best_iter))
            lr_t = lr_now if stepping else lrs.index_select(0, it_t)
            on = {d: (improved, lr_t) if d == device else (improved.to(d), lr_t.to(d)) for d in devices}
            losses.index_copy_(0, it_t, total)
            for p, b in zip(params, best):  # best <- p if improved; p <- p - lr * sign(grad)
                if id(p) in stepped:  # done in its backward
                    continue
                imp_d, lr_d = on[p.device]
                if p.grad is not None:
                    be.step(p, b, p.grad, imp_d, lr_d)
                else:
                    torch.where(imp_d, p, b, out=b)
                p.grad = None
            it_t.add_(1)

    every = 1 if device.type == "cpu" else 10
    reported = 0

    def report(upto: int):
        nonlocal reported
        if progress and upto > reported:
            for k, value in enumerate(losses[reported:upto].tolist(), start=reported):
                progress(k, value)
            reported = upto

    profiler = _IterationProfiler(iters)
    events = []  # (iteration, event) every ten iterations: the timing costs the loop no sync

    def mark(it):
        if device.type == "cuda":
            events.append((it, torch.cuda.Event(enable_timing=True)))
            events[-1][1].record(torch.cuda.current_stream(device))

    mark(0)
    warm = min(iters, 2) if cuda_graph else iters
    side = torch.cuda.Stream(device) if cuda_graph else None
    graph = None
    for it in range(iters):
        if it < warm:
            if side is not None:  # warm-up iterations (real ones) on a side stream, then capture
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    batches.prepare(it)
                    step()
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                batches.prepare(it)
                step()
            if stepping and it == 0:
                attach_steppers()
        else:
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # records one step; runs nothing
                    step()
            batches.prepare(it)
            graph.replay()
        profiler.after(it)
        if (it + 1) % 10 == 0 or it + 1 == iters:
            mark(it + 1)
        if (it + 1) % every == 0:
            report(it + 1)
    report(iters)
    if events:
        events[-1][1].synchronize()
        result.loop_ms = [a[1].elapsed_time(b[1]) / (b[0] - a[0]) for a, b in zip(events, events[1:])]
    del graph
    for tl in tuned.values():
        tl.stepper = None
    for h in grad_hooks:
        h.remove()
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    vals = losses.tolist()
    result.losses = vals
    result.init_loss = vals[0]
    result.best_loss = float(best_total.item())
    result.best_iter = int(best_iter.item())
