"""tune_block: AutoRound for one decoder block, from its captured inputs to its tuned weights
written in place and its output on the quantized inputs (the next block's input)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .. import fusion, ops
from .attention import sdpa_attention
from .calibration import ActStats, activation_stats, reduce_over_ranks
from .experts import GroupedExperts, grouped_experts, stacked_experts
from .inputs import BlockInputs, run_block, to_cache
from .linear import ActQuantLinear, TunedLinear, share_input_quantization, swap_module
from .options import Plan, TuneOptions, plan
from .placement import waits_for_host
from .precision import convert_block
from .rtn import opt_rtn_int_sym, opt_rtn_mx, opt_rtn_nvfp4
from .signround import LoopData, SignRound
from .spec import QuantSpec, fused_layer_groups


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
    memory_note: str = ""  # what was given up for the block to fit its device (Plan.memory_note)
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
    # the MoE experts containers whose tuning forward ran as grouped matmuls (engine/experts.py)
    grouped_experts: list[str] = field(default_factory=list)


Finalize = Callable[[str, nn.Linear, dict], torch.Tensor]


def tune_block(block: nn.Module, fp_inputs: Sequence[tuple[tuple, dict]], specs: dict[str, QuantSpec],
               options: Optional[TuneOptions] = None, *, q_inputs: Optional[torch.Tensor] = None,
               token_mask: Optional[torch.Tensor] = None,
               global_scales: Optional[dict[str, torch.Tensor]] = None,
               finalize: Optional[Finalize] = None,
               progress: Optional[Callable[[int, float], None]] = None, **option_fields) -> BlockResult:
    """Tune one decoder block with SignRound and write its fake-quantized weights in place.

    As auto-round 0.15.1 does (docs/numerics.md): the full-precision block's output on the fp
    inputs is the target; the block with fake-quantized Linears, fed the previous block's
    quantized output, is tuned with signed gradient descent on the rounding offset V and the
    clipping scales; then the fake-quantized weights at the best parameters are written in
    place and the block's output on the quantized inputs becomes the next block's input.

    Args:
        block: the decoder layer (any nn.Module whose first output is the hidden state).
        fp_inputs: one ``(args, kwargs)`` per calibration sample, as the block is called
            (hidden states first, batch dimension 1); emptied under ``release_inputs``.
        specs: Linear name within the block -> :class:`QuantSpec`.
        options: a :class:`TuneOptions`; or give its fields as keywords (``iters=...``).
        q_inputs: the previous block's quantized output [N, L, H] (None for the first block:
            the fp inputs).
        token_mask: [N, L], 1 where a token counts in the loss (right-padded samples).
        global_scales: NVFP4 global scale per Linear (default: 448*6/max|W|, the minimum over
            q/k/v and over gate/up, which inference fuses).
        finalize: called per Linear after tuning with (name, linear, qparams); returns the
            weight to store (e.g. the checkpoint format's own dequantization of the codes).
        progress: called with (iteration, loss) for every iteration; on a GPU in batches of
            a few iterations, so that reading the loss does not stall the GPU every step.
    """
    if options is not None and option_fields:
        raise TypeError("tune_block: give a TuneOptions or its fields as keywords, not both")
    options = options or TuneOptions(**option_fields)
    t0 = time.perf_counter()
    linears = _linears(block, specs)
    p = _plan(options, block, linears, specs, fp_inputs, q_inputs)
    block.to(p.device)
    if p.device.type == "cpu":
        convert_block(block, p.dtype)  # and it stays converted, as auto-round leaves it
    with sdpa_attention(block, enabled=p.device.type == "cuda"):
        run = _BlockRun(block, specs, linears, p, q_inputs, token_mask)
        result = run.tune(fp_inputs, global_scales or {}, finalize, progress)
    result.seconds = time.perf_counter() - t0
    return result


def _plan(options: TuneOptions, block: nn.Module, linears: dict[str, nn.Linear], specs: dict[str, QuantSpec],
          fp_inputs, q_inputs) -> Plan:
    """plan() for these inputs (its own frame: no reference to a sample outlives it)."""
    if options.release_inputs and not isinstance(fp_inputs, list):
        raise ValueError(f"tune_block: release_inputs=True needs fp_inputs as a list (it is emptied), "
                         f"got a {type(fp_inputs).__name__}")
    first = fp_inputs[0][0][0] if fp_inputs else None  # plan() refuses no inputs
    shape = (first.numel() // first.shape[-1], first.shape[-1]) if first is not None else (0, 0)
    return plan(options, block, linears, specs, len(fp_inputs), shape, held=(first, q_inputs))


def _linears(block: nn.Module, specs: dict[str, QuantSpec]) -> dict[str, nn.Linear]:
    """The block's Linears named in ``specs``, or an error naming the one at fault."""
    found = {}
    for name in specs:
        try:
            mod = block.get_submodule(name)
        except AttributeError:
            raise ValueError(f"tune_block: the block has no submodule {name!r}") from None
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"tune_block: {name!r} is a {type(mod).__name__}, not a Linear")
        if not bool(torch.isfinite(mod.weight).all()):
            raise ValueError(f"tune_block: weight of {name!r} has non-finite values (NaN or Inf)")
        found[name] = mod
    return found


class _Phases:
    """Wall seconds per phase of a block's run (synchronized with the GPU at each mark)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def done(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now


class _BlockRun:
    """One block's run, phase by phase: inputs, reference, calibration, tune, finalize, outputs."""

    def __init__(self, block, specs, linears, p: Plan, q_inputs, token_mask):
        self.block, self.specs, self.linears, self.plan = block, specs, linears, p
        self.iters = p.options.iters
        self.static_act = any(s.static_act for s in specs.values())
        self.phases = _Phases(p.device)
        self.q_inputs, self.token_mask = q_inputs, token_mask
        self.best_weights: dict[str, torch.Tensor] = {}  # the loop's, until finalize

    def tune(self, fp_inputs, global_scales, finalize, progress) -> BlockResult:
        p = self.plan
        self._prepare_inputs(fp_inputs)
        with torch.no_grad():
            self.phases.done("inputs")
            with fusion.fused_elementwise(self.block, p.fuse), \
                    stacked_experts(self.block, p.device, p.grouped_experts and self.iters > 0):
                ref = run_block(self.block, self.inputs, p.batch_size, p.precision.tuning) if self.iters > 0 else None
            if p.options.release_inputs and self.q_hidden is not self.inputs.hidden:
                self.inputs.release_hidden()  # from here on everything runs on the quantized inputs
            self.phases.done("reference")
        stats = self._calibrate()
        self.phases.done("calibration")
        tuned = self._wrap(stats, _global_scales(self.linears, self.specs, global_scales))
        result = BlockResult(q_outputs=torch.empty(0), qparams={}, eager_reason=p.eager_reason,
                             memory_note=p.memory_note,
                             placement={n: str(d) for n, d in p.placement.items()})
        memos = share_input_quantization(tuned)
        try:
            with _train_only_tunables(self.block, tuned), torch.enable_grad(), \
                    fusion.fused_elementwise(self.block, p.fuse) as fused, \
                    grouped_experts(self.block, tuned, p.device, p.grouped_experts and self.iters > 0) as grouped:
                result.fused = {k: v for k, v in fused.items() if v}
                result.grouped_experts = grouped.names
                if grouped.names and self.host_waits:  # grouped.names: empty where iters == 0
                    self._probe_grouped(result)
                if self.iters > 0:
                    self._loop(tuned, grouped, ref, result, progress)
            ref = None  # the quantized outputs take its place
            self.phases.done("tune")
            with torch.no_grad():
                result.qparams = self._finalize(tuned, stats, finalize)
        except BaseException:
            self._unwrap(tuned, keep_act_quant=False)
            raise
        finally:
            for memo in memos:  # the loop's last activations: free them
                memo.clear()
        self._unwrap(tuned, keep_act_quant=True)  # W4A4: the output pass quantizes the inputs
        self.phases.done("finalize")
        with torch.no_grad(), fusion.fused_elementwise(self.block, p.fuse), \
                stacked_experts(self.block, p.device, p.grouped_experts):
            result.q_outputs = run_block(self.block, self.inputs, p.batch_size, p.precision.tuning, self.q_hidden)
        self.phases.done("outputs")
        self._unwrap(tuned, keep_act_quant=False)
        result.phases = self.phases.seconds
        return result

    def _prepare_inputs(self, fp_inputs) -> None:
        """The stacked inputs, the quantized hidden states (the fp ones for the first block)
        and the loss mask on the device; a block that waits for the host runs eagerly."""
        p = self.plan
        self.inputs = inputs = BlockInputs(fp_inputs, p.device, p.cache_device)
        if p.options.release_inputs:
            fp_inputs.clear()  # the block's cache holds the only reference to the hidden states
        if p.device.type == "cpu":
            inputs.cast_floats(p.dtype)
        inputs.drop_causal_mask(self.block)
        self.q_hidden = (inputs.hidden if self.q_inputs is None
                         else to_cache(self.q_inputs.to(dtype=inputs.hidden.dtype), p.cache_device))
        self.host_waits = p.cuda_graph and self._waits_for_host()
        if self.host_waits:
            p.cuda_graph = False
            p.eager_reason = ("the block's forward waits for the host (e.g. MoE routing's nonzero or "
                              ".item()), which a CUDA graph cannot hold: it runs eagerly")
        self.mask = None if self.token_mask is None else self.token_mask.to(device=p.device, dtype=torch.float32)

    def _waits_for_host(self) -> bool:
        args, kwargs = self.inputs.batch(torch.zeros(1, dtype=torch.long, device=self.inputs.device), self.q_hidden)
        return waits_for_host(self.block, args, kwargs, self.plan.precision.tuning)

    def _probe_grouped(self, result: BlockResult) -> None:
        """The loop graphed after all where the grouped experts took away the block's waits
        for the host (the experts' loop's; static FP8 activations keep one, see expert_forward.py)."""
        if not self._waits_for_host():
            self.plan.cuda_graph = True
            self.plan.eager_reason = result.eager_reason = ""

    def _calibrate(self) -> dict[str, ActStats]:
        """act_max (NVFP4 W4A4) and the imatrix (iters=0) on the quantized inputs, the block as it is:
        act_max is auto-round's, bit for bit."""
        p = self.plan
        want_max = self.static_act
        want_imatrix = self.iters == 0 and any(s.weighted_rtn for s in self.specs.values())
        stats = activation_stats(self.block, self.linears, self.inputs, p.precision.calibration, self.q_hidden,
                                 want_max=want_max, want_imatrix=want_imatrix, cuda_graph=p.cuda_graph,
                                 grouped_experts=p.grouped_experts)
        if p.dist is not None:
            reduce_over_ranks(stats, p.dist, want_max, want_imatrix)
        return stats

    def _wrap(self, stats: dict[str, ActStats], global_scales) -> dict[str, TunedLinear]:
        """Each target Linear swapped for a TunedLinear (on its placed device)."""
        p = self.plan
        tuned = {}
        for name, mod in self.linears.items():
            spec = self.specs[name]
            gs = act_gs = None
            if spec.kind == "nvfp4":
                gs = global_scales.get(name)
                gs = ops.nvfp4_global_scale(mod.weight) if gs is None else gs.to(torch.float32)
                if spec.act:
                    act_gs = ops.nvfp4_global_scale(stats[name].max)
            if p.placement.get(name, p.device) != p.device:
                mod.to(p.placement[name])  # TunedLinear keeps its tensors on the weight's device
            act_max = stats[name].max if spec.kind == "fp8" and spec.act else None
            tuned[name] = TunedLinear(mod, spec, p.backend, gs, act_gs, act_max)
            swap_module(self.block, name, tuned[name])
        return tuned

    def _loop(self, tuned, grouped: GroupedExperts, ref, result: BlockResult, progress) -> None:
        """SignRound on the block's TunedLinears (the grouped experts' stacks in place of their
        experts); the result reports each Linear."""
        data = LoopData(self.inputs, self.q_hidden, ref, self.mask)
        units = grouped.loop_units(tuned)
        outcome = SignRound(self.block, units, data, self.plan, grouped.forward_stacks).run(progress)
        result.losses = outcome.losses
        result.init_loss = outcome.losses[0]
        result.best_loss, result.best_iter = outcome.best_loss, outcome.best_iter
        result.loop_ms = outcome.loop_ms
        result.step_in_backward = grouped.linear_names(outcome.step_in_backward)
        self.best_weights = grouped.per_linear(outcome.best_weights)

    def _finalize(self, tuned, stats, finalize) -> dict[str, dict[str, torch.Tensor]]:
        """The qparams of every Linear at the best parameters, and its stored weight written
        in place (``finalize``'s, else the fake-quantized weight)."""
        dist, device = self.plan.dist, self.plan.device
        final = {}
        best, self.best_weights = self.best_weights, {}  # this pass is their last use
        for name, tl in tuned.items():
            qp = _qparams(tl, stats[name], self.iters, best.pop(name, None))
            tl.linear.to(device)  # linear_devices: the Linear and its qparams come back
            final[name] = {k: v.to(device) for k, v in qp.items()}
        if dist is not None:
            # Every rank has read the block's weights before any rank writes one: under
            # llm-compressor's distributed oneshot the ranks may share the weights' storage
            # (compressed-tensors' shared CPU offload).
            dist.barrier()
        for name, qp in final.items():
            linear = tuned[name].linear
            stored = finalize(name, linear, qp) if finalize else qp["weight"]
            linear.weight.data.copy_(stored.to(linear.weight.dtype))
            qp.pop("weight")
        if dist is not None:
            dist.barrier()  # and every write is done before any rank reads on
        return final

    def _unwrap(self, tuned, keep_act_quant: bool) -> None:
        """The plain Linears back in the block; with ``keep_act_quant``, W4A4 Linears keep their
        input quantization for the output pass."""
        p = self.plan
        for name, tl in tuned.items():
            tl.linear.to(p.device)
            if keep_act_quant and tl.spec.act:
                scales = [None if t is None else t.detach().to(p.device)
                          for t in (tl.act_global_scale, tl.act_max, tl.act_max_scale)]
                swap_module(self.block, name, ActQuantLinear(tl.linear, tl.spec, p.backend, *scales))
            else:
                swap_module(self.block, name, tl.linear)


def _global_scales(linears, specs, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The given NVFP4 global scales, completed for layers fused at inference (q/k/v, gate/up):
    they share one, the minimum of theirs."""
    scales = dict(given)
    for group in fused_layer_groups([n for n in linears if specs[n].kind == "nvfp4"]):
        missing = [n for n in group if n not in scales]
        if missing:
            shared = ops.shared_nvfp4_global_scale([linears[n].weight for n in group])
            scales.update({n: shared for n in missing})
    return scales


def _qparams(tl: TunedLinear, stats: ActStats, iters: int,
             best_weight: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """weight (fake-quantized: the loop's best, where it ran), scale (MX: its log2, the shared
    exponent), zero_point (asym INT), global_scale (NVFP4), act_max, input_global_scale (NVFP4
    W4A4) and input_scale (FP8 static activations) of a tuned Linear; iters=0 runs the
    optimized RTN. The scale and zero point come from W and the scales, not from V."""
    spec = tl.spec
    zp = None
    if iters == 0 and spec.kind == "mx":  # unweighted: auto-round collects no imatrix for MX
        wq, scale = opt_rtn_mx(tl)
    elif iters == 0 and spec.weighted_rtn:
        opt_rtn = opt_rtn_nvfp4 if spec.kind == "nvfp4" else opt_rtn_int_sym
        wq, scale = opt_rtn(tl, stats.imatrix.to(tl.v.device))
    else:
        wq, scale, zp = tl.qdq()
        wq = wq if best_weight is None else best_weight
    qp = {"scale": scale.detach(), "weight": wq.detach()}
    if zp is not None and not spec.sym:
        qp["zero_point"] = zp.detach()
    if tl.global_scale is not None:
        qp["global_scale"] = tl.global_scale.detach()
    if spec.static_act:
        qp["act_max"] = stats.max.detach()
    if spec.static_act and spec.kind == "nvfp4":
        qp["input_global_scale"] = tl.act_global_scale.detach()
    if spec.static_act and spec.kind == "fp8":
        qp["input_scale"] = tl.act_scale()
    return qp


@contextlib.contextmanager
def _train_only_tunables(block: nn.Module, tuned: dict[str, TunedLinear]):
    """Within the ``with``, only V and the scales get gradients: every other parameter of the
    block is frozen, and its requires_grad restored on the way out."""
    ids = {id(t) for tl in tuned.values() for t in tl.tunables()}
    frozen = [(p, p.requires_grad) for p in block.parameters() if id(p) not in ids]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
