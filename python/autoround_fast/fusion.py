"""The decoder block's own element-wise ops, fused while the block is tuned.

Past the matmuls, attention and our quantization kernels, a Llama-class block's iteration
spends its time in element-wise ops that eager PyTorch runs one kernel at a time, each a trip
through memory: RMSNorm (an fp32 upcast, pow, mean, rsqrt, two multiplies, a downcast),
SiLU(gate) * up, and the rotary embedding (two slices, a negation, a cat, four multiplies and
two adds, for q and for k), forward and backward. :func:`fused_elementwise` swaps these, for
the duration of a ``with`` block, for the same functions compiled by torch.compile (Inductor),
which fuses each into one kernel forward and one or two backward. Where the MLP's down_proj
quantizes its input (W4A4, the engine's kernels), SiLU(gate) * up and that quantization run as
one op instead (:func:`autoround_fast.ops.silu_mul_nvfp4_activation`, eager's bits): the
product never goes through memory.

Only implementations known to compute exactly this are swapped: a module or function whose
code is, byte for byte, that of transformers' Llama (LlamaRMSNorm.forward, LlamaMLP.forward
with a SiLU activation, apply_rotary_pos_emb). Mistral, Qwen2, Qwen3 and their MoE variants
share it; anything else (Gemma's RMSNorm, GELU MLPs, partial rotary) runs as it is.

The fused ops round each intermediate as eager does (Inductor's ``emulate_precision_casts``)
but reduce and contract in their own order, so the results differ from eager by a unit in
the last place here and there: the same class of difference as the engine's SDPA attention,
and why this runs only on the GPU, where auto-round's results are matched to run-to-run
noise, not bit for bit.
"""
from __future__ import annotations

import contextlib
import sys
import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _rotary_bshd(q, k, cos, sin):
    """:func:`_rotary` (unsqueeze_dim 1) for q and k that are [batch, heads, seq, dim] views of
    [batch, seq, heads, dim] memory, as Llama's attention passes them (each projection's output
    viewed per head and transposed): the same element-wise math, computed in that memory
    layout and returned as the same kind of view. SDPA's gradients of q and k then arrive in
    the layout the compiled backward was traced with, and the gradient of each projection's
    output comes out contiguous: no layout copy before the rotary backward, none before the
    projections' weight-gradient matmuls (each about 0.1 ms per iteration on an 8B block)."""
    q_out, k_out = _rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def _heads_transposed(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.transpose(1, 2).is_contiguous()


_COMPILED: dict[str, object] = {}
# compiles allowed per function within fused_elementwise (one per shape and dtype it meets)
RECOMPILE_LIMIT = 256


def _compiled(name: str, fn):
    """One torch.compile'd function per process, shared by every block (same shapes: compiled
    once; the guards are on shapes and dtypes, not on the module)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True, dynamic=False, options=_inductor_options())
    return _COMPILED[name]


def _inductor_options() -> dict:
    """Eager's intermediate roundings; and, where this torch has it, Inductor's deterministic
    mode: no benchmarking between kernel variants that sum in different orders, so that two
    runs (or a run and its CUDA-graph replay) compute the same bits."""
    import torch._inductor.config as cfg

    opts = {"emulate_precision_casts": True}
    if hasattr(cfg, "deterministic"):
        opts["deterministic"] = True
    return opts


def _same_code(a, b) -> bool:
    a, b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return a is not None and b is not None and a.co_code == b.co_code and a.co_consts == b.co_consts


def _llama():
    try:
        from transformers.models.llama import modeling_llama
    except Exception:  # transformers without Llama: nothing is known to be safe to swap
        return None
    return modeling_llama


def _silu_activation_forward(self, input):  # transformers' SiLUActivation.forward, byte for byte
    return nn.functional.silu(input)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or (type(act).__name__ == "SiLUActivation"
                                        and _same_code(type(act).forward, _silu_activation_forward))


def _norm_forward(self, hidden_states):
    return _compiled("rms_norm", _rms_norm)(hidden_states, self.weight, self.variance_epsilon)


# SiLU(gate) * up and down_proj's W4A4 activation quantization as one op, where down_proj
# takes its input quantized (engine's TunedLinear and _ActQuantLinear on the kernels). Off only
# to measure what it saves (bench.block's cuda-sepact).
SILU_MUL_ACT_QUANT = True


def _down_input_scale(down: nn.Module, gate: torch.Tensor):
    """down_proj's activation global scale if it takes its input quantized by the caller."""
    scale_of = getattr(down, "input_quant_scale", None)
    gs = scale_of() if SILU_MUL_ACT_QUANT and scale_of is not None else None
    return gs if gs is not None and gs.device == gate.device else None


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    gs = _down_input_scale(self.down_proj, gate)
    if gs is not None and gate.dtype == up.dtype and gate.shape == up.shape:
        m_q = torch.ops.autoround_fast.silu_mul_nvfp4_activation(gate.contiguous(), up.contiguous(), gs.reshape(1))
        return self.down_proj(m_q, input_quantized=True)
    return self.down_proj(_compiled("silu_mul", _silu_mul)(gate, up))


def _rotary_forward(q, k, cos, sin, unsqueeze_dim=1):
    if unsqueeze_dim == 1 and cos.dim() == 3 and _heads_transposed(q) and _heads_transposed(k):
        return _compiled("rotary_bshd", _rotary_bshd)(q, k, cos, sin)
    return _compiled("rotary", _rotary)(q, k, cos, sin, unsqueeze_dim)


def own_forward(m: nn.Module):
    """The module's own forward function (unbound) and where it is swapped: behind
    compressed-tensors' offload wrapper, which calls ``m._original_forward_func`` ("offload"),
    or the class's when nothing wraps it ("class"). (None, None) when something else wraps
    it: that module is left alone."""
    if "_original_forward_func" in m.__dict__:
        return m.__dict__["_original_forward_func"], "offload"
    if "forward" in m.__dict__:
        return None, None
    return type(m).forward, "class"


def _nothing() -> dict[str, list[str]]:
    return {"rms_norm": [], "silu_mul": [], "rotary": []}


def swappable(block: nn.Module) -> dict[str, list[str]]:
    """What :func:`fused_elementwise` would swap in ``block``: module names per kind
    ("rms_norm", "silu_mul") and the modeling modules whose ``apply_rotary_pos_emb`` it
    replaces ("rotary")."""
    llama = _llama()
    found = _nothing()
    if llama is None:
        return found
    for name, m in block.named_modules():
        fwd, _ = own_forward(m)
        if _same_code(fwd, llama.LlamaRMSNorm.forward) and hasattr(m, "variance_epsilon"):
            found["rms_norm"].append(name)
        elif (_same_code(fwd, llama.LlamaMLP.forward) and _is_silu(getattr(m, "act_fn", None))
              and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))):
            found["silu_mul"].append(name)
        if hasattr(m, "is_causal"):  # an attention module: its modeling module's rotary
            mod = sys.modules.get(type(m).__module__)
            fn = getattr(mod, "apply_rotary_pos_emb", None)
            if _same_code(fn, llama.apply_rotary_pos_emb) and mod.__name__ not in found["rotary"]:
                found["rotary"].append(mod.__name__)
    return found


def swap_forward(m: nn.Module, new) -> Callable[[], None]:
    """Make ``new`` (an unbound forward) the module's own forward; returns the undo."""
    _, where = own_forward(m)
    if where == "offload":
        old = m.__dict__["_original_forward_func"]
        m._original_forward_func = new

        def undo():
            m._original_forward_func = old
    else:
        m.forward = types.MethodType(new, m)

        def undo():
            m.__dict__.pop("forward", None)
    return undo


def available() -> bool:
    """torch.compile can build GPU kernels here (Triton is installed)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def raised_recompile_limit():
    """A context in which dynamo's recompile limit is at least RECOMPILE_LIMIT. Every new shape
    or dtype compiles the fused functions once more, and under fullgraph=True the compile past
    dynamo's limit (8) is an error, not a fallback: a process that tunes blocks of several
    shapes (a test run) would stop there."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, RECOMPILE_LIMIT))


@contextlib.contextmanager
def fused_elementwise(block: nn.Module, enabled: bool = True):
    """Within the ``with``, the block's RMSNorms, SiLU-gated MLPs and rotary embeddings run
    compiled (see the module docstring); everything is restored on the way out, also when the
    body raises. Returns (as the ``as`` target) what was swapped, by kind."""
    found = swappable(block) if enabled else _nothing()
    modules = dict(block.named_modules())
    with contextlib.ExitStack() as stack:  # undone in reverse order, also when the body raises
        if any(found.values()):
            stack.enter_context(raised_recompile_limit())
        for name in found["rms_norm"]:
            stack.callback(swap_forward(modules[name], _norm_forward))
        for name in found["silu_mul"]:
            stack.callback(swap_forward(modules[name], _mlp_forward))
        for mod_name in found["rotary"]:
            mod = sys.modules[mod_name]
            stack.callback(setattr, mod, "apply_rotary_pos_emb", mod.apply_rotary_pos_emb)
            mod.apply_rotary_pos_emb = _rotary_forward
        yield found
