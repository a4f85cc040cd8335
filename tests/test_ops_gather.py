"""gather_ste: exact forward, straight-through backward; Triton (interpreter) and torch paths."""

from __future__ import annotations

import pytest
import torch

from omnisift_kernels.ops import gather_ste
from omnisift_kernels.ops.gather import gather_ste_backward_torch
from omnisift_kernels.testing import assert_close_scores, nan_poisoned
from omnisift_kernels.triton_kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    from omnisift_kernels.triton_kernels import gather_rows_triton, gather_ste_backward_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _views(B, L, D, dtype):
    yield "contiguous", torch.randn(B, L, D).to(dtype)
    yield "transposed", torch.randn(B, D, L).to(dtype).transpose(1, 2)
    yield "strided_d", torch.randn(B, L, 2 * D).to(dtype)[:, :, ::2]


def _expected_backward(x, idx, g):
    B, L, D = x.shape
    gx = torch.zeros(B * L, D, dtype=x.dtype)
    gx[idx] = g.to(x.dtype)
    gs = torch.zeros(B * L, dtype=torch.float64)
    gs[idx] = (x.reshape(-1, D)[idx].double() * g.double()).sum(-1)
    return gx.view(B, L, D), gs.view(B, L)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_exact_and_backward(path, dtype, seed):
    B, L, D = 2, 30, 40
    idx = torch.randperm(B * L)[:23]
    for name, x in _views(B, L, D, dtype):
        x = x.detach().requires_grad_(True)
        scores = torch.rand(B, L, requires_grad=True)
        y = gather_ste(x, idx, scores)
        assert y.dtype == dtype and y.shape == (23, D)
        assert torch.equal(y, x.detach().reshape(-1, D)[idx]), name  # bitwise
        g = torch.randn(23, D).to(dtype)
        y.backward(g)
        gx, gs = _expected_backward(x.detach(), idx, g)
        assert torch.equal(x.grad, gx), name
        assert scores.grad.dtype == torch.float32
        atol, rtol = 1e-4 * D, 1e-5  # dot products of D terms of size O(1): fp32 accumulation
        torch.testing.assert_close(scores.grad.double(), gs, atol=atol, rtol=rtol, msg=name)
        assert torch.all(scores.grad.flatten()[torch.ones(B * L, dtype=torch.bool).index_fill_(
            0, idx, False)] == 0)


def test_forward_value_independent_of_scores(path):
    x = torch.randn(1, 8, 4)
    idx = torch.tensor([6, 1, 3])
    a = gather_ste(x, idx, torch.zeros(1, 8))
    b = gather_ste(x, idx, torch.full((1, 8), 0.37))
    assert torch.equal(a, b) and torch.equal(a, x[0, idx])


def test_expanded_grad_out(path):
    """grad_out from .sum() is an expanded (stride-0) tensor."""
    B, L, D = 2, 6, 8
    x = torch.randn(B, L, D, requires_grad=True)
    scores = torch.rand(B, L, requires_grad=True)
    idx = torch.tensor([0, 11, 5])
    gather_ste(x, idx, scores).sum().backward()
    gx, gs = _expected_backward(x.detach(), idx, torch.ones(3, D))
    assert torch.equal(x.grad, gx)
    assert_close_scores(scores.grad, gs.float(), torch.float32)


def test_empty_indices(path):
    x = torch.randn(2, 3, 4, requires_grad=True)
    scores = torch.rand(2, 3, requires_grad=True)
    y = gather_ste(x, torch.zeros(0, dtype=torch.int64), scores)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.all(x.grad == 0) and torch.all(scores.grad == 0)


def test_gradcheck_float64():
    """gradcheck w.r.t. x (the true gradient). The scores' gradient is the STE surrogate: the
    forward does not depend on them, so their numerical Jacobian is 0 by design; it is checked
    against the spec's formula in ``test_ste_gradient_matches_spec_formula``."""
    scores = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([7, 0, 4, 9])
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: gather_ste(a, idx, scores), (x,))
    xt = torch.randn(2, 3, 5, dtype=torch.float64).transpose(1, 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: gather_ste(a, idx, scores), (xt,))


def test_ste_gradient_matches_spec_formula():
    """dL/ds = <x, dL/dy> is the gradient of y = x * m with m = 1 + s - s.detach()."""
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 8, 3])
    g = torch.randn(3, 6, dtype=torch.float64)
    gx, gs = torch.autograd.grad(gather_ste(x, idx, s), (x, s), g)
    m = (1 + s - s.detach()).reshape(-1)[idx, None]
    rx, rs = torch.autograd.grad(x.reshape(-1, 6)[idx] * m, (x, s), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gs, rs)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launchers_write_every_element(dtype, seed):
    B, L, D = 2, 20, 33
    x = torch.randn(B, L, D).to(dtype)[:, :, :]
    idx = torch.randperm(B * L)[:17]
    out = gather_rows_triton(x, idx, out=nan_poisoned((17, D), dtype))
    assert torch.equal(out, x.reshape(-1, D)[idx])
    g = torch.randn(17, 2 * D).to(dtype)[:, ::2]  # strided grad_out
    gx, gs = gather_ste_backward_triton(g, x, idx)
    ex, es = _expected_backward(x, idx, g)
    assert torch.equal(gx, ex)
    torch.testing.assert_close(gs.double(), es, atol=1e-4 * D, rtol=1e-5)
    tx, ts = gather_ste_backward_torch(g, x, idx)
    assert torch.equal(gx, tx)
    torch.testing.assert_close(gs, ts, atol=1e-4 * D, rtol=1e-5)


@pytest.mark.interpreter
def test_int64_addressing():
    """Rows beyond element 2^31 of a (lazily allocated, untouched) 4 GiB fp16 storage."""
    B, L, D = 2, 3, 8
    base = torch.empty(2**31 + 64, dtype=torch.float16)
    x = base.as_strided((B, L, D), (2**31, 16, 1))
    vals = torch.randn(B, L, D).half()
    x.copy_(vals)
    idx = torch.tensor([5, 0, 3])
    assert torch.equal(gather_rows_triton(x, idx), vals.reshape(-1, D)[idx])
    g = torch.randn(3, D).half()
    gx, gs = gather_ste_backward_triton(g, x, idx)
    ex, es = _expected_backward(vals, idx, g)
    assert torch.equal(gx, ex)
    torch.testing.assert_close(gs.double(), es, atol=1e-3, rtol=1e-4)


def test_duplicate_or_out_of_range_indices_are_refused(path):
    """Repeated indices would give different gradients on the two paths (the torch path sums the rows,
    the Triton one keeps one writer's): refused on every path, as indices outside [0, B*L) are."""
    x = torch.randn(1, 4, 3, requires_grad=True)
    s = torch.rand(1, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"gather_ste: indices values must be distinct, got 2 more than once"):
        gather_ste(x, torch.tensor([2, 0, 2]), s)
    with pytest.raises(ValueError, match=r"gather_ste: indices values must be in \[0, 4\) \(B\*L\), got indices\[1\] = 4"):
        gather_ste(x, torch.tensor([0, 4]), s)
    with pytest.raises(ValueError, match=r"indices\[0\] = -1"):
        gather_ste(x, torch.tensor([-1]), s)


@pytest.mark.interpreter
def test_triton_gather_masks_out_of_range_indices():
    """The launchers themselves (below the public checks) never read outside x: bad indices give zero
    rows forward and no writes backward."""
    x = torch.randn(2, 3, 4)
    idx = torch.tensor([5, -1, 6, 1 << 40, 0])
    out = gather_rows_triton(x, idx)
    flat = x.flatten(0, 1)
    assert torch.equal(out[0], flat[5]) and torch.equal(out[4], flat[0])
    assert torch.equal(out[1:4], torch.zeros(3, 4))
    gx, gs = gather_ste_backward_triton(torch.ones(5, 4), x, idx)
    assert torch.equal(gx.flatten(0, 1)[[0, 5]], torch.ones(2, 4))
    assert gx.flatten(0, 1)[1:5].abs().sum() == 0
    torch.testing.assert_close(gs.flatten()[[0, 5]], flat[[0, 5]].sum(-1))


def test_validation_errors():
    x = torch.randn(1, 4, 3)
    idx, s = torch.tensor([0, 2]), torch.rand(1, 4)
    with pytest.raises(TypeError, match="gather_ste: x must be float32"):
        gather_ste(x.long(), idx, s)
    with pytest.raises(ValueError, match="gather_ste: x must be 3-D"):
        gather_ste(x[0], idx, s)
    with pytest.raises(TypeError, match="gather_ste: indices must be int64, got torch.int32"):
        gather_ste(x, idx.int(), s)
    with pytest.raises(TypeError, match="gather_ste: scores must be float32 .* got torch.float16"):
        gather_ste(x, idx, s.half())
    with pytest.raises(ValueError, match=r"gather_ste: scores must have shape \[B, L\] = \(1, 4\), got \(4,\)"):
        gather_ste(x, idx, s[0])
    with pytest.raises(ValueError, match="gather_ste: scores must be on cpu"):
        gather_ste(x, idx, s.to("meta"))


def test_opcheck_and_compile():
    x = torch.randn(2, 5, 4, requires_grad=True)
    s = torch.rand(2, 5, requires_grad=True)
    idx = torch.tensor([3, 9, 0])
    torch.library.opcheck(torch.ops.omnisift.gather_ste.default, (x, idx, s))
    torch.library.opcheck(torch.ops.omnisift.gather_ste_backward.default,
                          (torch.randn(3, 4), x.detach(), idx))

    @torch.compile(fullgraph=True)
    def f(x, idx, s):
        return gather_ste(x, idx, s).square().sum()

    f(x, idx, s).backward()
    gx, gs = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    gather_ste(x, idx, s).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gs, s.grad)
