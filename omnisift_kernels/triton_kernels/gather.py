"""Triton kernels for ``gather_ste``: exact row gather forward, straight-through backward.

Forward ``_gather_rows_kernel``: grid ``(cdiv(T, BLOCK_T), cdiv(D, BLOCK_D))``; each program copies
a ``[BLOCK_T, BLOCK_D]`` tile ``out[j, d] = x[b_j, l_j, d]`` in the storage dtype (bitwise exact,
strided reads, contiguous ``[T, D]`` writes). Traffic: T*D*e read + T*D*e written.

Backward ``_gather_ste_bwd_kernel``: grid ``(cdiv(T, BLOCK_T),)``; each program takes BLOCK_T rows
and loops over D: ``grad_x[t_j, :] = grad_out[j, :]`` (stored in x's dtype) and
``grad_scores[t_j] = <x[t_j], grad_out[j]>`` accumulated in fp32. Traffic: 2*T*D*e read,
T*D*e written. Rows that were not gathered must be zero: the launcher zero-initialises
``grad_x`` (``torch.zeros``: one memset pass of B*L*D*e, which runs at full write bandwidth) rather
than running a kernel over all B*L rows with an inverse index map; the gathered rows are thus
written twice. Indices are assumed distinct (as kept-token indices are; ``ops.gather_ste`` checks
it). Whatever the indices hold, no load or store leaves the tensors: an index outside ``[0, B*L)``
gives a zero row forward and is skipped backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import next_pow2


@triton.jit
def _gather_rows_kernel(
    x_ptr, idx_ptr, out_ptr, T, L, BL, D, sxb, sxl, sxd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    jm = j < T
    dm = d < D
    t = tl.load(idx_ptr + j, mask=jm, other=0)
    tm = (t >= 0) & (t < BL)  # an index outside [0, B*L) reads nothing: its row is zero
    t = tl.where(tm, t, 0)
    b = t // L
    row = b * sxb + (t - b * L) * sxl
    m = jm[:, None] & dm[None, :]
    v = tl.load(x_ptr + row[:, None] + d.to(tl.int64)[None, :] * sxd, mask=m & tm[:, None], other=0.0)
    tl.store(out_ptr + j[:, None] * D + d[None, :], v, mask=m)


@triton.jit
def _gather_ste_bwd_kernel(
    g_ptr, x_ptr, idx_ptr, gx_ptr, gs_ptr, T, L, BL, D,
    sgt, sgd, sxb, sxl, sxd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t = tl.load(idx_ptr + j, mask=j < T, other=0)
    jm = (j < T) & (t >= 0) & (t < BL)  # an index outside [0, B*L) reads and writes nothing
    t = tl.where(jm, t, 0)
    b = t // L
    row = b * sxb + (t - b * L) * sxl
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = jm[:, None] & (d < D)[None, :]
        d64 = d.to(tl.int64)[None, :]
        g = tl.load(g_ptr + j[:, None] * sgt + d64 * sgd, mask=m, other=0.0)
        xv = tl.load(x_ptr + row[:, None] + d64 * sxd, mask=m, other=0.0)
        tl.store(gx_ptr + t[:, None] * D + d64, g.to(gx_ptr.dtype.element_ty), mask=m)
        acc += g.to(tl.float32) * xv.to(tl.float32)
    tl.store(gs_ptr + t, tl.sum(acc, axis=1).to(gs_ptr.dtype.element_ty), mask=jm)


def gather_rows_triton(x, indices, *, out=None):
    """Triton: ``x.flatten(0, 1)[indices]`` (bitwise), without copying ``x``.

    Args:
        x: ``[B, L, D]`` any dtype, any strides.
        indices: ``int64 [T]`` flat token indices in ``[0, B*L)`` (others give zero rows).
        out: optional preallocated contiguous ``[T, D]`` of x's dtype.

    Returns:
        ``[T, D]`` in x's dtype.
    """
    B, L, D = x.shape
    T = indices.numel()
    if out is None:
        out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    elif out.shape != (T, D) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"gather_ste: out must be a contiguous {x.dtype} tensor of shape ({T}, {D}),"
                         f" got {out.dtype} {tuple(out.shape)}")
    if T == 0 or D == 0:
        return out
    block_d = min(512, next_pow2(D))
    block_t = max(4, min(64, 4096 // block_d))
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _gather_rows_kernel[grid](
        x, indices.contiguous(), out, T, L, B * L, D, x.stride(0), x.stride(1), x.stride(2),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return out


def gather_ste_backward_triton(grad_out, x, indices, scores_dtype=torch.float32):
    """Triton: straight-through backward of ``gather_ste`` in one launch (after zero-init).

    Args:
        grad_out: ``[T, D]`` gradient of the gathered rows (any strides, incl. expanded).
        x: ``[B, L, D]`` the forward's input, any strides.
        indices: ``int64 [T]`` distinct flat token indices.
        scores_dtype: dtype of the returned score gradient.

    Returns:
        ``(grad_x [B, L, D] in x's dtype, grad_scores [B, L] in scores_dtype)``.
    """
    B, L, D = x.shape
    T = indices.numel()
    grad_x = torch.zeros((B, L, D), dtype=x.dtype, device=x.device)
    grad_scores = torch.zeros((B, L), dtype=scores_dtype, device=x.device)
    if T == 0 or D == 0:
        return grad_x, grad_scores
    block_d = min(128, next_pow2(D))  # [8, 128] bf16 tiles: no sm_80 spill (bench/results/aot/)
    block_t = max(4, min(64, 1024 // block_d))
    _gather_ste_bwd_kernel[(triton.cdiv(T, block_t),)](
        grad_out, x, indices.contiguous(), grad_x, grad_scores, T, L, B * L, D,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), x.stride(2),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    return grad_x, grad_scores
