"""A block's calibration inputs and its caches: the captured samples stacked so that a batch
is an index, the hidden-state caches (on the device or in pinned host memory), and the
batches of each tuning iteration."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .placement import indexed

_NO_KV_CACHE = ("past_key_values", "past_key_value", "layer_past")
# auto-round's keys that all samples share (it keeps them once, uncast, with one sample)
_SHARED_KEYS = ("position_ids", "cache_position", "position_embeddings", "cu_seqlens")


class BlockInputs:
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
        self.hidden = stack([a[0] for a, _ in samples], cache_device)
        self.rest_args = to_device(first_args[1:], device)
        self.kwargs = {}
        self.per_sample = set()  # stacked: one row per sample
        self.expanded = set()  # the same for every sample: one row, expanded to each batch
        for key, value in first_kwargs.items():
            if key in _NO_KV_CACHE:
                self.kwargs[key] = None  # tuning re-runs the block: no KV cache
            elif key == "use_cache":
                self.kwargs[key] = False
            elif self._stackable(value):
                values = [kw[key] for _, kw in samples]
                if all(same_value(v, value) for v in values[1:]):
                    self.kwargs[key] = to_device(value, device)
                    self.expanded.add(key)
                else:
                    self.kwargs[key] = _cat_tree(values, device)
                    self.per_sample.add(key)
            else:
                self.kwargs[key] = to_device(value, device)

    def cast_floats(self, dtype: torch.dtype) -> None:
        """The inputs in the tuning dtype, as auto-round's preprocessing casts a CPU block's: the
        hidden states and every float tensor of the per-sample keyword arguments (fp32 masks
        and rotary tables included). With one sample auto-round keeps the shared keys as they
        are, a tensor there cast only if fp16 or bf16; the extra positional arguments, too."""
        shared = _SHARED_KEYS if self.n == 1 else ()

        def cast(t):
            return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        self.hidden = self.hidden.to(dtype)
        for key, value in self.kwargs.items():
            if key not in shared:
                self.kwargs[key] = _map_leaves(value, cast)
            elif isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
                self.kwargs[key] = value.to(dtype)

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
                kwargs[key] = _map_leaves(value, lambda t: take_rows(t, idx))
            elif key in self.expanded:  # a fresh tensor, as index_select gives: a block that
                # writes into its kwargs cannot reach the cache
                kwargs[key] = _map_leaves(value, lambda t: t.expand(idx.numel(), *t.shape[1:]).clone(
                    memory_format=torch.contiguous_format))
            else:
                kwargs[key] = value
        return kwargs

    def release_hidden(self) -> None:
        """Drop the fp hidden states: every later batch takes its hidden states from elsewhere
        (the quantized inputs)."""
        self.hidden = None

    def batch(self, idx: torch.Tensor, hidden: Optional[torch.Tensor] = None):
        """(args, kwargs) for the samples ``idx`` (a tensor on the compute device), with the
        hidden states taken from ``hidden`` (default: the fp inputs)."""
        if hidden is None and self.hidden is None:
            raise RuntimeError("BlockInputs.batch: the fp inputs were released (release_hidden); "
                               "pass the hidden states to take")
        h = _rows(self.hidden if hidden is None else hidden, idx, self.device)
        return (h, *self.rest_args), self.kwargs_for(idx)


class Batches:
    """Where an iteration's quantized inputs and reference outputs come from: index_select on
    the device caches, or, with host caches, device buffers the host fills before each step
    (double-buffered pinned staging, so filling the next never races the copy in flight)."""

    def __init__(self, inputs: BlockInputs, q_hidden, ref, order: list[list[int]]):
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
        return args, kwargs, take_rows(self.ref, idx)


def block_output(out):
    """The hidden state a decoder block returns (alone or first of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block, inputs: BlockInputs, batch_size: int, autocast, hidden=None):
    """The block's output for every sample, on the cache device; each batch is written
    straight into the cache, so nothing is concatenated or re-pinned."""
    outs = None
    for start in range(0, inputs.n, batch_size):
        idx = torch.arange(start, min(start + batch_size, inputs.n), device=inputs.device)
        args, kwargs = inputs.batch(idx, hidden)
        with autocast():
            out = block_output(block(*args, **kwargs)).detach()
        if outs is None:
            outs = _empty_cache((inputs.n, *out.shape[1:]), out.dtype, inputs.cache_device)
        outs[start: start + out.shape[0]].copy_(out)
    return outs


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


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t.index_select(0, idx), gathered as 8-byte words where the rows allow: for a few long
    rows (a batch of 8 from the cache) torch's kernel moves one element per thread, which for
    bf16 is a quarter of the bytes per instruction of 8-byte words (the same bits either way)."""
    words = _words(t.view(t.shape[0], -1)) if t.dim() >= 2 and t.is_contiguous() and t.numel() else None
    if words is None:
        return t.index_select(0, idx)
    return words.index_select(0, idx).view(t.dtype).view(idx.numel(), *t.shape[1:])


def to_cache(t: torch.Tensor, cache_device: torch.device) -> torch.Tensor:
    """t detached on the cache device (pinned if that is the host of a GPU)."""
    t = t.detach().to(cache_device)
    if cache_device.type == "cpu" and torch.cuda.is_available() and not t.is_pinned():
        t = t.pin_memory()
    return t


def to_device(value, device):
    """Tensors, and tuples or lists of them, on ``device``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def stack(parts: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
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
    device = indexed(device)
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


def _empty_cache(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised cache tensor on ``device``, pinned if that is the host of a GPU."""
    pin = device.type == "cpu" and torch.cuda.is_available()
    return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)


def _map_leaves(value, fn):
    return type(value)(fn(t) for t in value) if isinstance(value, (tuple, list)) else fn(value)


def _words(t: torch.Tensor) -> Optional[torch.Tensor]:
    """t's last dimension read as 64-bit words (the same bytes), or None where its size in
    bytes or its storage offset is not a multiple of 8."""
    try:
        return t.view(torch.int64)
    except RuntimeError:
        return None


def _rows(t: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t[idx] on ``device``; t may live in host memory."""
    if t.device == idx.device:
        return take_rows(t, idx)
    return t.index_select(0, idx.to(t.device)).to(device, non_blocking=True)


def _cat_tree(values, device=None):
    if isinstance(values[0], (tuple, list)):
        return type(values[0])(_cat_tree([v[i] for v in values], device) for i in range(len(values[0])))
    out = torch.cat(values, 0)
    return out.to(device) if device is not None else out
