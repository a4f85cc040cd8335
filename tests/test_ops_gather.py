"""gather_ste: exact forward, straight-through backward; Triton (interpreter) and torch paths, against
the readable reference (``omnisift_kernels.reference.gather``: a Python loop over the indices, fp64)."""

from __future__ import annotations

import pytest
import torch

from omnisift_kernels.ops import gather_ste
from omnisift_kernels.ops.gather import gather_ste_backward_torch
from omnisift_kernels.reference.gather import gather_ste as reference_gather
from omnisift_kernels.reference.gather import gather_ste_backward as reference_backward
from omnisift_kernels.testing import assert_close_scores, nan_poisoned
from omnisift_kernels.triton_kernels import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    from omnisift_kernels.triton_kernels import gather_rows_triton, gather_ste_backward_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _views(B, L, D, dtype):
    yield "contiguous", torch.randn(B, L, D).to(dtype)
    yield "transposed", torch.randn(B, D, L).to(dtype).transpose(1, 2)
    yield "strided_d", torch.randn(B, L, 2 * D).to(dtype)[:, :, ::2]


def _check_backward(gx, gs, x, idx, g, msg=None):
    """``grad_x`` exactly and ``grad_scores`` against ``reference.gather.gather_ste_backward`` (fp64).

    ``grad_x``: the output gradient rows (already in x's dtype here), zeros elsewhere: exact.
    ``grad_scores``: zeros off the gathered positions (exact); at them, dot products of D terms whose
    fp32 rounding is bounded relative to ``|x row| * |g row|``, so the values are compared divided by
    that scale, within the ``"similarity"`` tolerance of x's dtype."""
    x, g, idx = x.detach().cpu(), g.detach().cpu(), idx.cpu()
    rx, rs = reference_backward(g, x, idx)
    assert gx.dtype == x.dtype and torch.equal(gx.double().cpu(), rx), msg
    gs, rs = gs.detach().double().cpu().flatten(), rs.flatten()
    others = torch.ones_like(rs, dtype=torch.bool).index_fill_(0, idx, False)
    assert torch.equal(gs[others], rs[others]), msg
    D = x.shape[-1]
    rows = x.reshape(-1, D)[idx].double()
    scale = (torch.linalg.vector_norm(rows, dim=-1) * torch.linalg.vector_norm(g.double(), dim=-1)).clamp_min(1e-30)
    assert_close_scores(gs[idx] / scale, rs[idx] / scale, x.dtype, "similarity", msg=msg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_exact_and_backward(path, dtype, seed):
    B, L, D = 2, 30, 40
    idx = torch.randperm(B * L)[:23]
    for name, x in _views(B, L, D, dtype):
        x = x.detach().requires_grad_(True)
        scores = torch.rand(B, L, requires_grad=True)
        y = gather_ste(x, idx, scores)
        assert y.dtype == dtype and y.shape == (23, D)
        assert torch.equal(y, reference_gather(x.detach(), idx)), name  # bitwise
        g = torch.randn(23, D).to(dtype)
        y.backward(g)
        assert scores.grad.dtype == torch.float32
        _check_backward(x.grad, scores.grad, x, idx, g, msg=name)


def test_forward_value_independent_of_scores(path):
    x = torch.randn(1, 8, 4)
    idx = torch.tensor([6, 1, 3])
    a = gather_ste(x, idx, torch.zeros(1, 8))
    b = gather_ste(x, idx, torch.full((1, 8), 0.37))
    assert torch.equal(a, b) and torch.equal(a, reference_gather(x, idx))


def test_expanded_grad_out(path):
    """grad_out from .sum() is an expanded (stride-0) tensor."""
    B, L, D = 2, 6, 8
    x = torch.randn(B, L, D, requires_grad=True)
    scores = torch.rand(B, L, requires_grad=True)
    idx = torch.tensor([0, 11, 5])
    gather_ste(x, idx, scores).sum().backward()
    _check_backward(x.grad, scores.grad, x, idx, torch.ones(3, D))


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
    assert torch.equal(out, reference_gather(x, idx))
    g = torch.randn(17, 2 * D).to(dtype)[:, ::2]  # strided grad_out
    for name, backward in (("triton", gather_ste_backward_triton), ("torch", gather_ste_backward_torch)):
        gx, gs = backward(g, x, idx)
        _check_backward(gx, gs, x, idx, g, msg=name)


@pytest.mark.interpreter
def test_int64_addressing():
    """Rows beyond element 2^31 of a (lazily allocated, untouched) 4 GiB fp16 storage."""
    B, L, D = 2, 3, 8
    base = torch.empty(2**31 + 64, dtype=torch.float16)
    x = base.as_strided((B, L, D), (2**31, 16, 1))
    vals = torch.randn(B, L, D).half()
    x.copy_(vals)
    idx = torch.tensor([5, 0, 3])
    assert torch.equal(gather_rows_triton(x, idx), reference_gather(vals, idx))
    g = torch.randn(3, D).half()
    gx, gs = gather_ste_backward_triton(g, x, idx)
    _check_backward(gx, gs, vals, idx, g)


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
    g = 2 * reference_gather(x.detach(), idx)  # d(sum y^2)/dy
    _check_backward(x.grad, s.grad, x, idx, g, msg="compiled")
    x.grad = s.grad = None
    gather_ste(x, idx, s).square().sum().backward()
    _check_backward(x.grad, s.grad, x, idx, g, msg="eager")
