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


def test_views_of_the_marked_tensor_are_made_again_from_one_make():
    """Autograd saves views (a matmul's transposed weight, slices of rows): each use gets its
    view of the one tensor made again, with autograd's gradients."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(3, 6, 4, generator=g, requires_grad=True)
    x = torch.randn(5, 4, generator=g, requires_grad=True)
    made = []

    def weights():
        made.append(1)
        return v.detach() * 2  # the "fake quantization" of v, without gradients

    def loss(remade=None):
        w = v * 2
        ctx = remade if remade is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with ctx:
            if remade is not None:
                remade.remake(w, weights, v)
            # saved: w[e].t() for each expert, and slices of x's rows
            return sum((x[e:e + 2] @ w[e].t()).square().sum() for e in range(3))

    expected = torch.autograd.grad(loss(), (v, x))
    out = loss(RemadeInBackward())
    assert made == []
    got = torch.autograd.grad(out, (v, x))
    assert made == [1]  # one make for the three saved views
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_a_view_into_a_larger_storage_cannot_be_marked():
    rows = torch.randn(6, 4)
    with RemadeInBackward() as remade, pytest.raises(ValueError, match="whole of its storage"):
        remade.remake(rows[2:], lambda: rows[2:].clone())


def test_a_remake_of_another_layout_is_an_error():
    a = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 3, requires_grad=True)
    with RemadeInBackward() as remade:
        t = a * 1
        remade.remake(t, lambda: a.detach().t().contiguous().t())  # the same values, column-major
        out = (t @ w).sum()
    with pytest.raises(RuntimeError, match="came back as"):
        out.backward()


def test_a_view_saved_after_an_in_place_write_to_the_marked_tensor_is_held():
    """make() gives the marked tensor's values at marking: a use saved after the tensor was
    written in place keeps what autograd saved. The gradients equal those of the same
    computation written without the in-place write (saved tensors' hooks turn autograd's own
    check of in-place writes off, so nothing else would notice)."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 8, generator=g, requires_grad=True)
    w = torch.randn(8, 3, generator=g, requires_grad=True)
    scale = torch.ones(4, 8)
    scale[:, :4] = 3
    t = a * 1
    expected = torch.autograd.grad((t @ w).sum() + ((t * scale)[1:] @ w).square().sum(), (a, w))
    with RemadeInBackward() as remade:
        t = a * 1
        remade.remake(t, lambda: a.detach() * 1, a)
        first = (t @ w).sum()  # saved before the write: made again
        t[:, :4].mul_(3)
        out = first + (t[1:] @ w).square().sum()  # saved after it: held
    got = torch.autograd.grad(out, (a, w))
    for x, y in zip(expected, got):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6)


def test_a_tensor_marked_twice_is_an_error():
    t = torch.randn(4, 8)
    with RemadeInBackward() as remade, pytest.raises(ValueError, match="marked already"):
        remade.remake(t, lambda: t.clone())
        remade.remake(t.t(), lambda: t.t().clone())


def test_active_is_the_innermost_context_of_the_thread():
    """active(): what code that marks a tensor its caller's matmul saves (a TunedLinear's
    weight) marks it in; None outside every context, also after one raised."""
    assert RemadeInBackward.active() is None
    with RemadeInBackward() as outer:
        assert RemadeInBackward.active() is outer
        with RemadeInBackward() as inner:
            assert RemadeInBackward.active() is inner
        assert RemadeInBackward.active() is outer
    with pytest.raises(KeyError), RemadeInBackward():
        raise KeyError
    assert RemadeInBackward.active() is None
