"""engine/remade.py: tensors made again in the backward, against autograd holding them."""

import pytest
import torch

from autoround_fast.engine.remade import RemadeInBackward


def _two_uses(a, w1, w2, remade=None):
    """Rows gathered from ``a``, used by two matmuls (autograd saves the rows for each)."""
    idx = torch.tensor([2, 0, 2, 1, 3, 3])
    made = []

    def gather():
        made.append(1)
        return a[idx]

    rows = gather()
    if remade is None:
        return (rows @ w1).sum() + (rows @ w2).square().sum(), made
    with remade:
        remade.remake(rows, gather, a)
        out = (rows @ w1).sum() + (rows @ w2).square().sum()
    return out, made


def test_the_backward_makes_the_rows_once_for_both_uses_and_gets_autograds_gradients():
    g = torch.Generator().manual_seed(0)
    a, w1, w2 = (torch.randn(s, generator=g, requires_grad=True) for s in ((4, 8), (8, 5), (8, 3)))
    held, _ = _two_uses(a, w1, w2)
    grads_held = torch.autograd.grad(held, (a, w1, w2))
    remade, made = _two_uses(a, w1, w2, RemadeInBackward())
    assert len(made) == 1
    grads_remade = torch.autograd.grad(remade, (a, w1, w2))
    assert len(made) == 2  # one more, for both matmuls
    for x, y in zip(grads_held, grads_remade):
        assert torch.equal(x, y)


def test_an_input_written_in_place_before_the_backward_is_an_error():
    a = torch.randn(4, 8)
    w1, w2 = torch.randn(8, 5, requires_grad=True), torch.randn(8, 3, requires_grad=True)
    out, _ = _two_uses(a, w1, w2, RemadeInBackward())
    a.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.backward()
