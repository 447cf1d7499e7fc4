"""Calls into the installed auto-round 0.15.1 with autoround_fast's argument layout."""

import math

import torch
from auto_round.data_type.int import quant_tensor_asym, quant_tensor_sym
from auto_round.data_type.mxfp import quant_mx
from auto_round.data_type.nvfp import nv_fp4, nv_fp4_with_static_gs
from auto_round.data_type.utils import reshape_pad_tensor_by_group_size

from autoround_fast.ops import int_num_groups


def _pad_groups(t, group):
    """auto-round's V layout: [rows * groups, group], zero padded (no reshape below a group)."""
    rows, cols = t.shape
    if cols < group:
        return t
    pad = math.ceil(cols / group) * group - cols
    return torch.nn.functional.pad(t, (0, pad)).reshape(-1, group)


def _unpad(g, rows, cols):
    return g.reshape(rows, -1)[:, :cols]


def nvfp4(weight, v, max_scale, global_scale, grad_out=None):
    """auto-round's nv_fp4 forward (and, with grad_out, the gradients of v and max_scale)."""
    rows, cols = weight.shape
    vg = _pad_groups(v, 16).detach().clone().requires_grad_(grad_out is not None)
    ms = max_scale.reshape(-1).detach().clone().requires_grad_(grad_out is not None)
    q, s, _ = nv_fp4(weight, v=vg, global_scale=global_scale, max_scale=ms)
    if grad_out is None:
        return q, s.reshape(rows, -1)
    (q.float() * grad_out.float()).sum().backward()
    return q, s.reshape(rows, -1), _unpad(vg.grad, rows, cols), ms.grad.reshape(rows, -1)


def nvfp4_activation(x, act_max, grad_out=None):
    x = x.detach().clone().requires_grad_(grad_out is not None)
    y = nv_fp4_with_static_gs(x, tensor_max=act_max)[0]
    if grad_out is None:
        return y
    (y.float() * grad_out.float()).sum().backward()
    return y, x.grad


def fp8(weight, v, max_scale, grad_out=None, tensor_max=None):
    """auto-round's quant_fp8_sym on a weight: one scale for the tensor (max_scale of one
    element: group_size 0) or one per row (group_size -1), with tensor_max and tensor_min the
    clamped maximum and minimum of that group, as auto-round's weight path passes them, or the
    given tensor_max with tensor_min 0. Returns (q, scale [groups, 1]) and, with grad_out, the
    gradients of v and max_scale."""
    from auto_round.data_type.fp8 import quant_fp8_sym

    per_tensor = max_scale.numel() == 1
    req = grad_out is not None
    wg = weight.reshape(1, -1) if per_tensor else weight
    if tensor_max is None:
        tmax = torch.clamp(wg.max(-1)[0], min=0)
        tmin = torch.clamp(wg.min(-1)[0], max=0)
    else:
        tmax, tmin = tensor_max, torch.zeros_like(tensor_max)
    vg = v.reshape(wg.shape).detach().clone().requires_grad_(req)
    ms = max_scale.reshape(-1).detach().clone().requires_grad_(req)
    q, s, _ = quant_fp8_sym(weight, max_scale=ms, tensor_max=tmax, tensor_min=tmin,
                            group_size=0 if per_tensor else -1, v=vg)
    s = s.reshape(-1, 1)
    if not req:
        return q, s
    (q.float() * grad_out.float()).sum().backward()
    return q, s, vg.grad.reshape(weight.shape), ms.grad.reshape(max_scale.shape)


def fp8_activation(x, act_max, max_scale, grad_out=None):
    """auto-round's quant_fp8_sym on an activation under its static scale: tensor_max =
    act_max, group_size 0 (V = 0)."""
    from auto_round.data_type.fp8 import quant_fp8_sym

    req = grad_out is not None
    x = x.detach().clone().requires_grad_(req)
    ms = max_scale.detach().clone().requires_grad_(req)
    q = quant_fp8_sym(x, max_scale=ms, tensor_max=act_max, group_size=0)[0]
    if not req:
        return q
    (q.float() * grad_out.float()).sum().backward()
    return q, x.grad, ms.grad


def int_quant(weight, v, min_scale, max_scale, bits, group_size, sym, grad_out=None):
    rows, cols = weight.shape
    groups = int_num_groups(cols, group_size)
    group = cols if groups == 1 else group_size
    req = grad_out is not None
    vg = _pad_groups(v, group).detach().clone().requires_grad_(req)
    mn = min_scale.reshape(-1).detach().clone().requires_grad_(req)
    mx = max_scale.reshape(-1).detach().clone().requires_grad_(req)
    wr, _, _ = reshape_pad_tensor_by_group_size(weight, group_size)
    wmin = torch.clamp(wr.min(1)[0], max=0)
    wmax = torch.clamp(wr.max(1)[0], min=0)
    fn = quant_tensor_sym if sym else quant_tensor_asym
    q, s, zp = fn(weight, bits=bits, group_size=group_size, v=vg, min_scale=mn, max_scale=mx,
                  tensor_min=wmin, tensor_max=wmax)
    s = s.reshape(rows, groups)
    zp = zp.reshape(rows, groups) if isinstance(zp, torch.Tensor) else None
    if not req:
        return q, s, zp
    (q.float() * grad_out.float()).sum().backward()
    return q, s, zp, _unpad(vg.grad, rows, cols), mn.grad.reshape(rows, -1), mx.grad.reshape(rows, -1)


def mx(weight, v, max_scale, bits, grad_out=None):
    """auto-round's quant_mx (MXFP4: bits 4, MXFP8: bits 8) forward, the shared exponents as
    fp32 [rows, groups], and with grad_out the gradients of v and max_scale."""
    rows, cols = weight.shape
    req = grad_out is not None
    vg = _pad_groups(v, 32).detach().clone().requires_grad_(req)
    ms = max_scale.reshape(-1).detach().clone().requires_grad_(req)
    q, e, _ = quant_mx(weight, bits=bits, group_size=32, v=vg, max_scale=ms, data_type="mx_fp")
    e = e.float().reshape(rows, -1)
    if not req:
        return q, e
    (q.float() * grad_out.float()).sum().backward()
    return q, e, _unpad(vg.grad, rows, cols), ms.grad.reshape(rows, -1)


def mx_activation(x, bits, grad_out=None):
    """auto-round's quant_mx on an activation (max_scale 1, v = 0): the forward, and with
    grad_out the gradient of x."""
    x = x.detach().clone().requires_grad_(grad_out is not None)
    y = quant_mx(x, bits=bits, group_size=32, max_scale=torch.tensor(1.0), data_type="mx_fp")[0]
    if grad_out is None:
        return y
    (y.float() * grad_out.float()).sum().backward()
    return y, x.grad
