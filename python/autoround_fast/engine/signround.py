"""SignRound's loop over one block: per iteration, forward on a batch of the quantized inputs,
the loss against the reference outputs, the backward, the sign step, and the best parameters
kept (scored before the step, as auto-round)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .inputs import Batches, BlockInputs, block_output
from .linear import Stepper, TunedLinear
from .options import Plan
from .schedule import checked_order, lr_schedule

_LOSS_SCALE = 1000  # auto-round's backward runs on loss * 1000 (keeps bf16 grads off zero)
_TIMING_EVERY = 10  # iterations between the CUDA events that time the loop


@dataclass
class LoopData:
    """What the loop reads: the block's inputs, the quantized hidden states it is fed, the
    reference outputs it is tuned towards, and the token mask of the loss (or None)."""

    inputs: BlockInputs
    q_hidden: torch.Tensor
    ref: torch.Tensor
    mask: Optional[torch.Tensor]


@dataclass
class LoopOutcome:
    """What the loop measured: the loss of every iteration (before its step), the best one
    (iteration and value), milliseconds per iteration per run of ten (GPU), and the Linears
    whose backward took the step; and what it tuned: each Linear's fake-quantized weight at
    the best iteration (its scales are back in the Linear's tunables)."""

    losses: list[float]
    best_loss: float
    best_iter: int
    loop_ms: list[float] = field(default_factory=list)
    step_in_backward: list[str] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)


class _Best:
    """The best iteration so far, on the device: its score (the sum over micro-batches of
    loss / valid tokens, as auto-round scores), its summed loss, its index, a copy of every
    Linear's scales at it, and each Linear's fake-quantized weight at it (all the result needs
    of V, whose best is not kept: ``of`` holds None in its place). The weights of Linears that
    the forward stacks (``stacks``: grouped experts, by name in the stack's order) are kept as
    one stack too, so that one copy keeps them all."""

    def __init__(self, tuned: dict[str, TunedLinear], device: torch.device, stacks: Sequence[list[str]]):
        self.score = torch.full((1,), float("inf"), dtype=torch.float64, device=device)
        self.total = torch.full((1,), float("nan"), dtype=torch.float64, device=device)
        self.iter = torch.zeros(1, dtype=torch.long, device=device)
        self.of = {name: [None if p is tl.v else p.detach().clone() for p in tl.tunables()]
                   for name, tl in tuned.items()}  # V first, without a copy
        self.copies = [b for bs in self.of.values() for b in bs]  # aligned with SignRound.params
        self.stacks, self.wq = [], {}
        with torch.no_grad():
            for names in stacks:
                best = torch.stack([tuned[n].qdq()[0] for n in names])
                self.stacks.append((best, names))
                self.wq.update(zip(names, best))
            self.wq.update({name: tl.qdq()[0] for name, tl in tuned.items() if name not in self.wq})

    def update(self, improved, score, total, it) -> None:
        self.score.copy_(torch.where(improved, score, self.score))
        self.total.copy_(torch.where(improved, total, self.total))
        self.iter.copy_(torch.where(improved, it, self.iter))

    @torch.no_grad()
    def keep_weights(self, tuned: dict[str, TunedLinear], improved: torch.Tensor, backend) -> set[str]:
        """Where ``improved``, each Linear's best weight takes the one this iteration scored:
        its last forward's, or, where none ran, the one its tunables give now; a stack's in one
        copy where the forward's weights are views of one stack. Before any step of the
        iteration; each forward's weight is let go. Returns the Linears whose forward's weight
        the backward makes again (``remade``): their copy is left to :meth:`keep` there."""
        kept, deferred, on = set(), set(), {improved.device: improved}

        def flag(device):  # one copy of the flag per device
            if device not in on:
                on[device] = improved.to(device)
            return on[device]

        for best, names in self.stacks:
            stacked = _stack_of([tuned[n].wq_now for n in names])
            if stacked is not None and stacked.shape == best.shape:
                backend.copy_if(best, stacked, flag(best.device))
                kept.update(names)
        for name, tl in tuned.items():
            if tl.remade is not None and tl.remade.saved and name not in kept:
                deferred.add(name)
            elif name not in kept:
                wq = tl.wq_now if tl.wq_now is not None else tl.qdq()[0]
                backend.copy_if(self.wq[name], wq, flag(wq.device))
            tl.wq_now = tl.remade = None
        return deferred

    def keep(self, name: str, wq: torch.Tensor, improved: torch.Tensor, backend) -> None:
        """Where ``improved``, Linear ``name``'s best weight takes ``wq``."""
        backend.copy_if(self.wq[name], wq, improved)


def _stack_of(views: list) -> Optional[torch.Tensor]:
    """The tensor whose rows 0, 1, ... the given tensors are, in order (a stack the forward
    made, found through the views' ``_base``), or None: then each is copied alone."""
    base = getattr(views[0], "_base", None)
    if base is None or base.dim() != 3 or len(views) != base.shape[0] or not base.is_contiguous():
        return None
    ok = all(v is not None and v._base is base and v.storage_offset() == base.storage_offset() + e * base.stride(0)
             for e, v in enumerate(views))
    return base if ok else None


class SignRound:
    """SignRound on one block whose Linears are TunedLinears. One iteration (:meth:`iteration`)
    touches only device tensors: the batch indices, learning rate and valid-token count come
    from per-iteration tables indexed by an on-device counter, and the best-score bookkeeping
    is a torch.where, so the same iteration runs eagerly (CPU, warm-up) or replayed from a
    CUDA graph.

    Without a process group the iteration's score, improved flag and learning rate are
    computed after the last micro-batch's forward, before its backward (under one, after the
    backward, once the ranks' scores are summed). With ``plan.step_in_backward`` (one
    micro-batch, no process group, one device, the kernels), each Linear's weight backward
    then takes the step on its tunables itself: the same bits, without writing and reading
    back V's gradient. The first iteration counts each Linear's forwards; from the second on,
    the Linears with one forward per iteration step in their backward (:meth:`attach_steppers`).
    Every other tunable (all of them in the first iteration) takes its step as soon as the
    backward has accumulated its gradient, which goes then: the tunables' gradients are not
    held side by side. A Linear whose backward did not run in an iteration gets the usual
    best copy.

    ``tuned``: the TunedLinears by name (a grouped projection's experts as their stack, one
    TunedLinear: experts.GroupedExperts). ``stacks``: the Linears whose fake-quantized weights
    the forward stacks (the other grouped experts, by name in the stack's order); their best
    weights are kept as one stack each.

    With ``plan.remake_weights`` (no process group, one device), no Linear holds its
    fake-quantized weight from the forward to the backward: the backward makes it again
    (engine/remade.py), and in the last micro-batch's backward, where the iteration is scored,
    keeps it as the best weight where the score improved."""

    def __init__(self, block: nn.Module, tuned: dict[str, TunedLinear], data: LoopData, plan: Plan,
                 stacks: Sequence[list[str]] = ()):
        o = plan.options
        self.block, self.tuned, self.data, self.plan = block, tuned, data, plan
        self.device = device = data.inputs.device
        self.be = plan.backend
        self.dist = plan.dist
        self.iters = o.iters
        self.params = [p for tl in tuned.values() for p in tl.tunables()]
        self.devices = {p.device for p in self.params}  # more than one with linear_devices
        n = data.inputs.n
        global_bs = min(n, plan.batch_size * o.gradient_accumulate_steps)
        order = checked_order(o.batch_order, n, global_bs, o.iters, o.seed)
        self.all_idx = torch.tensor(order, dtype=torch.long, device=device)
        self.lrs = torch.tensor(lr_schedule(1.0 / o.iters if o.lr is None else o.lr, o.iters),
                                dtype=torch.float32, device=device)
        self.valid = self._valid_counts(global_bs, o.gradient_accumulate_steps)
        self.micro = [(s, min(s + plan.batch_size, global_bs)) for s in range(0, global_bs, plan.batch_size)]
        self.batches = Batches(data.inputs, data.q_hidden, data.ref, order)
        self.it = torch.zeros(1, dtype=torch.long, device=device)
        self.losses = torch.zeros(o.iters, dtype=torch.float64, device=device)
        self.best = _Best(tuned, device, stacks)
        self.stepping = plan.step_in_backward
        assert not self.stepping or (len(self.micro) == 1 and self.dist is None and len(self.devices) == 1)
        self.improved_now = torch.zeros(1, dtype=torch.bool, device=device)  # filled by _score
        self.lr_now = torch.zeros(1, dtype=torch.float32, device=device)
        self.ran: set = set()  # the Linears whose backward took the step this iteration
        self.unkept: set = set()  # the Linears whose best weight the backward is to keep
        in_forward_stacks = {n for names in stacks for n in names}
        for name, tl in tuned.items():
            tl.forwards, tl.wq_now = 0, None
            remakes = plan.remake_weights and name not in in_forward_stacks
            tl.on_remake = functools.partial(self._keep_remade, name) if remakes else None
        self.overlap = self.dist is not None and len(self.devices) == 1
        self.in_flight: list = []
        self.last_micro = False
        self.accumulated: set = set()  # the tunables stepped as their gradient was accumulated, this iteration
        self.grad_hooks = self._grad_hooks()

    def _grad_hooks(self) -> list:
        """Data parallel: each gradient's all-reduce starts as soon as the last micro-batch's
        backward has accumulated it (down_proj's first), so the transfers overlap the rest of
        the backward; the step waits for all of them. With linear_devices the backward runs
        one autograd thread per device, whose hooks would issue the collectives in an order
        that differs between ranks (NCCL hangs): then each gradient is reduced after the
        backward, in parameter order, via the compute device.

        With the step in the backward, a tunable that its Linear's backward does not step (the
        first iteration's, a Linear with two forwards, a kind without a stepping kernel) takes
        its step as soon as its gradient is accumulated, and the gradient goes: the tunables'
        gradients are not held side by side."""
        if self.overlap:
            return [p.register_post_accumulate_grad_hook(self._reduce_when_ready) for p in self.params]
        if self.stepping:
            return [p.register_post_accumulate_grad_hook(functools.partial(self._step_accumulated, b))
                    for p, b in zip(self.params, self.best.copies)]
        return []

    def _valid_counts(self, global_bs: int, accumulate: int) -> torch.Tensor:
        """Per iteration, what auto-round divides each micro-batch's loss by to score it (in
        float64): the valid tokens of the global batch (with a mask), else the elements of
        its inputs (with gradient accumulation), else 1."""
        mask, iters, device = self.data.mask, self.iters, self.device
        if mask is None:
            n_elm = global_bs * self.data.q_hidden[0].numel() if accumulate != 1 else 1
            valid = torch.full((iters,), float(n_elm), dtype=torch.float64, device=device)
        else:
            valid = mask.to(torch.float64).sum(-1).index_select(0, self.all_idx.reshape(-1))
            valid = valid.reshape(iters, global_bs).sum(-1)
        if self.dist is not None and (mask is not None or accumulate != 1):
            self.dist.all_reduce(valid)  # counts of the global batch, over all ranks
        return valid.clamp_min(1.0) if mask is not None else valid

    def _reduce_when_ready(self, p) -> None:
        if self.last_micro:
            self.in_flight.append(self.dist.all_reduce(p.grad, async_op=True))

    @torch.no_grad()
    def _step_accumulated(self, best: Optional[torch.Tensor], p: torch.Tensor) -> None:
        if p.grad is None:  # the stepping kernel's backward: stepped there, no gradient
            return
        self.be.step(p, best, p.grad, self.improved_now, self.lr_now)
        p.grad = None
        self.accumulated.add(id(p))

    def attach_steppers(self) -> None:
        """After the first iteration: the step moves into the backward of each Linear that ran
        one forward with gradients in it."""
        for name, tl in self.tuned.items():
            if tl.forwards == 1 and tl.steps_in_backward:
                scales = [b for b in self.best.of[name] if b is not None]  # V has no copy
                tl.stepper = Stepper(scales, self.improved_now, self.lr_now, self.ran, name)

    # -- one iteration ---------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, start: int, stop: int):
        """The quantized block's output on the micro-batch, and its reference and mask rows."""
        args, kwargs, ref = self.batches.get(idx, start, stop)
        with self.plan.precision.tuning():
            pred = block_output(self.block(*args, **kwargs))
        mask = self.data.mask
        return pred, ref, None if mask is None else mask.index_select(0, idx).reshape(-1)

    def loss(self, pred, ref, mask) -> torch.Tensor:
        return self.be.loss(pred, ref, mask)

    def backward(self, loss: torch.Tensor) -> None:
        (loss * _LOSS_SCALE).backward()

    def reduce(self, total, score):
        """Data parallel: one step for all ranks, on summed gradients and the global loss."""
        dist = self.dist
        while self.in_flight:
            self.in_flight.pop().wait()
        if not self.overlap:
            for p in self.params:
                if p.grad is None:
                    continue
                if p.device == self.device:
                    dist.all_reduce(p.grad)
                else:  # staged on the compute device, the one the group serves
                    g = p.grad.to(self.device)
                    dist.all_reduce(g)
                    p.grad.copy_(g)
        both = torch.cat([total, score])
        dist.all_reduce(both)
        return both[:1], both[1:]

    def step(self, improved: torch.Tensor, lr: torch.Tensor) -> None:
        """Keep the best scales (``best <- p`` where improved; V's best is its weight, kept
        before) and take the sign step (``p <- p - lr * sign(grad)``) on every tunable whose
        backward did not take it."""
        stepped = {id(p) for name in self.ran for p in self.tuned[name].tunables()} | self.accumulated
        self.accumulated.clear()
        on = {d: (improved, lr) if d == self.device else (improved.to(d), lr.to(d)) for d in self.devices}
        for p, b in zip(self.params, self.best.copies):
            if id(p) in stepped:  # done in its backward
                continue
            imp_d, lr_d = on[p.device]
            if p.grad is not None:
                self.be.step(p, b, p.grad, imp_d, lr_d)
            elif b is not None:
                torch.where(imp_d, p, b, out=b)
            p.grad = None

    def iteration(self) -> None:
        """One SignRound iteration on the device's tables at the counter ``self.it``."""
        idx_all = self.all_idx.index_select(0, self.it).reshape(-1)
        n_valid = self.valid.index_select(0, self.it)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        score = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.ran.clear()
        for k, (start, stop) in enumerate(self.micro):
            self.last_micro = k == len(self.micro) - 1
            pred, ref, mask = self.forward(idx_all[start:stop], start, stop)
            loss = self.loss(pred, ref, mask)
            l64 = loss.detach().to(torch.float64).reshape(1)
            total = total + l64
            score = score + l64 / n_valid
            if not self.last_micro:
                self._let_weights_go()  # the next micro-batch's forward gives the same ones
            elif self.dist is None:  # the score is final before the last backward
                self._score(score)
            self.backward(loss)
        if self.dist is not None:
            total, score = self.reduce(total, score)
            self._score(score)  # the ranks' summed score: after the backward
        with torch.no_grad():
            # a weight marked but never made again had no backward: its tunables did not move,
            # and the best weight kept before is still the one they give
            self.unkept.clear()
            self.best.update(self.improved_now, score, total, self.it)
            self.losses.index_copy_(0, self.it, total)
            self.step(self.improved_now, self.lr_now)
            self.it.add_(1)

    @torch.no_grad()
    def _score(self, score: torch.Tensor) -> None:
        """The iteration's improved flag and learning rate, and the best weights kept where it
        improved: scored before any step, as auto-round (a step inside the backward reads
        them)."""
        torch.lt(score, self.best.score, out=self.improved_now)
        self.lr_now.copy_(self.lrs.index_select(0, self.it))
        self.unkept = self.best.keep_weights(self.tuned, self.improved_now, self.be)

    @torch.no_grad()
    def _keep_remade(self, name: str, wq: torch.Tensor) -> None:
        """TunedLinear.on_remake: in the scored micro-batch's backward, the best weight from
        the weight made again (earlier micro-batches' backwards keep nothing)."""
        if name in self.unkept:
            self.unkept.discard(name)
            self.best.keep(name, wq, self.improved_now, self.be)

    def _let_weights_go(self) -> None:
        for tl in self.tuned.values():
            tl.wq_now = tl.remade = None

    # -- the loop --------------------------------------------------------------------------

    def run(self, progress: Optional[Callable[[int, float], None]] = None) -> LoopOutcome:
        """Every iteration (CUDA-graphed after two warm-up iterations where the plan says so),
        then the best parameters written back into the tunables."""
        report = _Reporter(self.losses, progress, every=1 if self.device.type == "cpu" else _TIMING_EVERY)
        timer = _LoopTimer(self.device)
        warm = min(self.iters, 2) if self.plan.cuda_graph else self.iters
        side = torch.cuda.Stream(self.device) if self.plan.cuda_graph else None
        graph = None
        for it in range(self.iters):
            if it < warm:
                self._warm_up(it, side)
                if self.stepping and it == 0:
                    self.attach_steppers()
            else:
                if graph is None:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):  # records one iteration; runs nothing
                        self.iteration()
                self.batches.prepare(it)
                graph.replay()
            timer.after(it + 1, last=it + 1 == self.iters)
            report.after(it + 1)
        report.upto(self.iters)
        del graph
        return self._finish(timer.per_iteration())

    def _warm_up(self, it: int, side) -> None:
        """A real iteration run eagerly; before a capture, on a side stream."""
        if side is None:
            self.batches.prepare(it)
            self.iteration()
            return
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.batches.prepare(it)
            self.iteration()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _finish(self, loop_ms: list[float]) -> LoopOutcome:
        stepped = sorted(n for n, tl in self.tuned.items() if tl.stepper is not None)
        for tl in self.tuned.values():
            tl.stepper = tl.on_remake = None
        for h in self.grad_hooks:
            h.remove()
        with torch.no_grad():
            for p, b in zip(self.params, self.best.copies):
                if b is not None:  # the scales; V is left at its last step
                    p.copy_(b)
        self._let_weights_go()
        return LoopOutcome(losses=self.losses.tolist(), best_loss=float(self.best.total.item()),
                           best_iter=int(self.best.iter.item()), loop_ms=loop_ms, step_in_backward=stepped,
                           best_weights=self.best.wq)


class _Reporter:
    """Hands the losses to ``progress`` as (iteration, loss), every ``every`` iterations (on a
    GPU in batches, so that reading the loss does not stall the GPU every step)."""

    def __init__(self, losses: torch.Tensor, progress, every: int):
        self.losses, self.progress, self.every, self.done = losses, progress, every, 0

    def after(self, it: int) -> None:
        if it % self.every == 0:
            self.upto(it)

    def upto(self, it: int) -> None:
        if self.progress and it > self.done:
            for k, value in enumerate(self.losses[self.done:it].tolist(), start=self.done):
                self.progress(k, value)
            self.done = it


class _LoopTimer:
    """CUDA events on the loop's stream every ten iterations: the timing costs the loop no sync."""

    def __init__(self, device: torch.device):
        self.device = device
        self.events: list = []
        self._mark(0)

    def _mark(self, it: int) -> None:
        if self.device.type == "cuda":
            self.events.append((it, torch.cuda.Event(enable_timing=True)))
            self.events[-1][1].record(torch.cuda.current_stream(self.device))

    def after(self, it: int, last: bool) -> None:
        if it % _TIMING_EVERY == 0 or last:
            self._mark(it)

    def per_iteration(self) -> list[float]:
        """Milliseconds per iteration for each run of ten (the first holds warm-up and capture)."""
        if not self.events:
            return []
        self.events[-1][1].synchronize()
        return [a[1].elapsed_time(b[1]) / (b[0] - a[0]) for a, b in zip(self.events, self.events[1:])]
