"""The tuning options of one block (one dataclass, every default here) and their resolution,
against the block and the machine, into the settings a run uses (:class:`Plan`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .. import fusion
from . import memory
from .attention import eager_scores
from .expert_stack import stacks
from .experts import groups_experts, routed_projections, routed_shares
from .spec import QuantSpec
from .backends import Backend, make_backend
from .placement import indexed, linear_devices, place_linears, process_group
from .precision import Precision, cpu_tune_dtype


@dataclass
class TuneOptions:
    """How :func:`~autoround_fast.engine.tune_block` tunes a block. None means "the default
    for this backend and machine", resolved by :func:`plan`.

    iters: SignSGD iterations (0: RTN with auto-round's imatrix-weighted scale search for
        NVFP4 and symmetric INT; plain RTN for asymmetric INT, as auto-round).
    batch_size: samples per micro-batch; gradient_accumulate_steps micro-batches per step.
    lr: learning rate for V and the scales (default 1 / iters).
    seed: seeds the batch order (auto-round's IndexSampler on random.Random(seed)).
    backend: "torch" (the plain-PyTorch oracles, any device) or "cuda" (the kernels).
    device: the compute device (default: the block's).
    cache_device: where the cached hidden states, reference outputs and quantized outputs
        live: the compute device (default) or "cpu" (pinned host memory, for cards short of
        memory; each iteration then copies its batch over).
    cuda_graph: capture one tuning iteration in a CUDA graph and replay it (default: on for
        backend "cuda"). A block whose forward waits for the host (MoE routing) runs eagerly
        instead, and ``BlockResult.eager_reason`` says so.
    distributed: data parallel over torch.distributed (default: on when a process group of
        more than one rank is initialised, as under torchrun). Each rank passes its own share
        of the samples; act_max and the imatrix are reduced over ranks, the gradients of V
        and the scales are summed before every sign step and the best parameters are picked
        on the global loss, so every rank ends with the same weights. The loop runs eagerly.
    batch_order: the samples of every iteration (iters lists of indices), instead of the
        seeded shuffle; for reproducing a run exactly.
    linear_devices: spread the block's Linears over these devices while tuning (for a block
        too large for one card): each Linear's weight, V, scales and their gradients live on
        one of them, balanced by weight size; the rest of the block, the caches and the loss
        stay on ``device``. The loop runs eagerly and equals the one-device run.
    fuse_elementwise: run the block's RMSNorms, SiLU(gate) * up and rotary embeddings
        compiled by torch.compile while tuning (:mod:`autoround_fast.fusion`; default: on
        for backend "cuda" where Triton is there). They round as eager does but reduce in
        their own order; on the CPU, where results are auto-round's bit for bit, it is an error.
    step_in_backward: take SignRound's step inside the backward (the same bits): in each
        Linear's weight backward where a kernel steps its kind (NVFP4, INT; the gradients
        never go through memory), else as soon as each tunable's gradient is accumulated (the
        first iteration, MX, FP8, a Linear with several forwards; one tunable's gradient held
        at a time). Default: on with the kernels where it applies: one micro-batch per step,
        no process group, the Linears on one device.
    grouped_experts: run an MoE block's routed experts (llm-compressor's linearized
        ``LinearExperts2D``) as one grouped matmul per projection in every pass over the block,
        with the token-expert pairs sorted on the device (:mod:`.experts`), instead of the
        per-expert loop, which waits for the host at every expert. Default: on a GPU. It
        computes each expert on its routed tokens only: on the CPU bit for bit the loop over
        routed tokens. Under llm-compressor's default ``moe_calibrate_all_experts`` the loop
        runs every expert on every token, whose matmul rows round apart from the routed ones'
        in the last bit, and on a GPU the grouped matmul is another GEMM kernel: there the two
        agree to rounding. On the CPU, where results are the stock path's bit for bit, it is
        off unless asked for.
    remake_weights: make each Linear's fake-quantized weight again in its backward instead of
        holding it from the forward, the best iteration's kept there (2 bytes per tuned weight
        less at the loop's peak, for one more fake quantization of each weight per micro-batch;
        the same bits). Default: on for a block whose MoE experts run grouped, whose experts'
        tunables dominate its memory; needs no process group and the Linears on one device.
    memory_budget: bytes the block's tuning may take on its device (default: on one GPU, what
        it has free; elsewhere no limit). Where the estimate (:mod:`.memory`) exceeds it, the
        caches go to host memory (if cache_device was left unset), then the micro-batch is
        halved with the accumulation doubled; ``BlockResult.memory_note`` says what changed.
    release_inputs: let the block free its fp inputs once it has their reference outputs: in
        a block after the first, the calibration, the loop and the outputs run on the quantized
        inputs, so one [N, L, H] cache less is held while tuning. tune_block empties
        ``fp_inputs`` (a list) to drop its references to them; the caller keeps none (the
        modifier passes its capture). Off by default: callers may reuse their inputs.
    """

    iters: int = 200
    batch_size: int = 8
    lr: Optional[float] = None
    seed: int = 42
    gradient_accumulate_steps: int = 1
    backend: str = "torch"
    device: Optional[str | torch.device] = None
    cache_device: Optional[str | torch.device] = None
    cuda_graph: Optional[bool] = None
    distributed: Optional[bool] = None
    batch_order: Optional[Sequence[Sequence[int]]] = None
    linear_devices: Optional[Sequence[str | torch.device]] = None
    fuse_elementwise: Optional[bool] = None
    step_in_backward: Optional[bool] = None
    grouped_experts: Optional[bool] = None
    remake_weights: Optional[bool] = None
    memory_budget: Optional[int] = None
    release_inputs: bool = False


@dataclass
class Plan:
    """The settings one block's run uses, every default resolved."""

    options: TuneOptions
    backend: Backend
    device: torch.device
    cache_device: torch.device
    dtype: torch.dtype
    precision: Precision
    batch_size: int
    dist: object  # torch.distributed, or None
    cuda_graph: bool
    fuse: bool  # the element-wise fusion, in the loop and the passes around it
    step_in_backward: bool
    grouped_experts: bool  # the MoE experts' grouped matmuls in the loop
    remake_weights: bool  # the fake-quantized weights made again in the backward, not held
    placement: dict[str, torch.device] = field(default_factory=dict)
    eager_reason: str = ""  # why CUDA graphs were asked for but not used
    memory_note: str = ""  # what was given up for the block to fit its device

    @property
    def spread(self) -> bool:
        return any(d != self.device for d in self.placement.values())


def plan(options: TuneOptions, block: nn.Module, linears: dict[str, nn.Linear], specs: dict[str, QuantSpec],
         n_samples: int, sample_shape: tuple[int, int], held: Sequence[Optional[torch.Tensor]] = (None, None)) -> Plan:
    """Resolve ``options`` for this block and machine (``specs``: each Linear's scheme;
    ``sample_shape``: one sample's tokens and hidden size; ``held``: the caller's fp inputs and
    quantized inputs (None in a first block), whose memory is spent where they already live on
    the block's device), or raise naming the option at fault."""
    o = options
    be = make_backend(o.backend)
    if n_samples == 0:
        raise ValueError("tune_block: no calibration inputs")
    if o.iters < 0:
        raise ValueError(f"tune_block: iters must be >= 0, got {o.iters}")
    device = indexed(torch.device(o.device or next(block.parameters()).device))
    placement = place_linears(linears, linear_devices(o.linear_devices, device)) if o.linear_devices else {}
    if o.fuse_elementwise and device.type != "cuda":
        raise ValueError(f"tune_block: fuse_elementwise=True needs a GPU; the block is on {device} "
                         "(there the model's own ops run, bit for bit as auto-round's)")
    cache_device = _cache_device(o.cache_device, device)
    dist = process_group() if o.distributed in (None, True) else None
    if o.distributed and dist is None:
        raise ValueError("tune_block: distributed=True, but no torch.distributed process group "
                         "of more than one rank is initialised")
    spread = any(d != device for d in placement.values())
    cuda_graph = (be.name == "cuda" if o.cuda_graph is None else bool(o.cuda_graph))
    cuda_graph = cuda_graph and device.type == "cuda" and dist is None
    eager_reason = ""
    if cuda_graph and spread:
        cuda_graph = False
        eager_reason = "the Linears are spread over several devices (linear_devices): the loop runs eagerly"
    # on a CPU, auto-round converts the block to its tuning dtype (docs/numerics.md#autocast)
    dtype = cpu_tune_dtype() if device.type == "cpu" else next(block.parameters()).dtype
    budget = o.memory_budget
    if budget is None and dist is None and not spread:
        budget = memory.device_budget(device)
    if o.iters == 0:  # RTN: no tunables' gradients, no reference outputs, no backward
        budget = None
    precision = Precision(device, dtype, any(s.act for s in specs.values()))
    grouped = groups_experts(o.grouped_experts, device)
    shares = routed_shares(block, linears) if grouped else {}
    remakes = _remakes_weights(o.remake_weights, bool(shares), dist is None and not spread)
    # a weight that autocast casts for its matmul is saved as the cast copy, held either way
    casts = precision.amp and precision.amp_dtype != dtype
    needs = memory.BlockMemory(
        linears, n_samples, *sample_shape, torch.empty(0, dtype=dtype).element_size(),
        first_block=held[1] is None, release_inputs=o.release_inputs,
        resident=sum(t is not None and indexed(t.device) == device for t in held),
        shares=shares, scores=eager_scores(block, sample_shape[0], device.type == "cuda"),
        remade=remade_stacks(block, linears, specs) if remakes and not casts else ())
    room = memory.fit(needs, min(o.batch_size, n_samples), o.gradient_accumulate_steps, budget,
                      can_cache_on_host=o.cache_device is None and device.type == "cuda")
    if room.cache_on_host:
        cache_device = torch.device("cpu")
    o = dataclasses.replace(o, gradient_accumulate_steps=room.accumulate)
    fuse = o.fuse_elementwise
    if fuse is None:
        fuse = be.name == "cuda" and device.type == "cuda" and fusion.available()
    # the step inside the backward needs each gradient final when its backward runs
    step_fits = be.uses_kernels and o.gradient_accumulate_steps == 1 and dist is None and not spread
    if o.step_in_backward and not step_fits:
        raise ValueError("tune_block: step_in_backward=True needs the kernels (backend 'cuda'), one "
                         "micro-batch per step (gradient_accumulate_steps=1), no process group and the "
                         "Linears on one device" + (f"; {room.note}" if room.note else ""))
    return Plan(options=o, backend=be, device=device, cache_device=cache_device, dtype=dtype,
                precision=precision, batch_size=room.batch_size,
                dist=dist, cuda_graph=cuda_graph, fuse=bool(fuse) and o.iters > 0,
                step_in_backward=step_fits and o.step_in_backward is not False,
                grouped_experts=grouped, remake_weights=remakes and o.iters > 0,
                placement=placement, eager_reason=eager_reason, memory_note=room.note)


def _remakes_weights(option: Optional[bool], grouped_moe: bool, fits: bool) -> bool:
    """remake_weights resolved: where asked for, or by default for a block whose experts run
    grouped (``grouped_moe``); ``fits``: no process group, the Linears on one device."""
    if option and not fits:
        raise ValueError("tune_block: remake_weights=True needs no process group and the Linears on "
                         "one device (the best weight is kept where the backward makes it, before "
                         "the ranks' scores are summed)")
    return fits and (grouped_moe if option is None else bool(option))


def remade_stacks(block: nn.Module, linears: dict[str, nn.Linear],
                  specs: dict[str, QuantSpec]) -> tuple[tuple[str, ...], ...]:
    """The experts' stacks whose fake-quantized weights the backward makes again (what the
    memory estimate counts; the other Linears it counts as held)."""
    return tuple(tuple(names) for names in routed_projections(block, linears)
                 if stacks(specs[names[0]], linears[names[0]].out_features))


def _cache_device(cache_device, device: torch.device) -> torch.device:
    cache = torch.device(cache_device) if cache_device is not None else device
    if cache.type not in ("cpu", device.type):
        raise ValueError(f"tune_block: cache_device must be 'cpu' or the compute device {device}, got {cache}")
    return device if cache.type == device.type else cache
