"""Row gather with the straight-through estimator of the audio selection (spec §5).

:func:`gather_ste` returns ``x.flatten(0, 1)[indices]`` exactly (bitwise, strides respected, the
STE factor is exactly 1.0 so the value does not depend on the scores); its backward gives
``grad_x`` = the output gradient rows scattered back (zeros elsewhere) and
``grad_scores[b, l] = <x[b, l], grad_out[j]>`` (fp32 accumulation; fp64 for fp64 inputs) for
``indices[j] = b*L + l``, zeros elsewhere. Registered as ``omnisift::gather_ste`` (with
``register_autograd``) and ``omnisift::gather_ste_backward``.
"""

from __future__ import annotations

import torch

from .._ext import ext_has_kernel
from ..triton_kernels import TRITON_AVAILABLE, use_triton
from .._validation import (
    check_device,
    check_distinct_values,
    check_embeddings,
    check_index,
    check_index_values,
    check_tensor,
)
from .video import flat_rows_view, token_rows

if TRITON_AVAILABLE:
    from ..triton_kernels import gather_rows_triton, gather_ste_backward_triton

__all__ = ["gather_ste"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_rows_torch(x, indices):
    """CPU/torch path of the forward: a new contiguous ``[T, D]`` tensor (never aliases ``x``).

    On the CPU with the extension, rows with unit stride go through ``omnisift::varlen_gather``:
    the same row copy as ``index_select``, into a huge-page backed output when it is large (a fresh
    large output otherwise costs more in page faults than the copy; see csrc/cpu_alloc.h).
    """
    flat = flat_rows_view(x)
    if (flat is not None and x.device.type == "cpu" and x.stride(2) == 1
            and ext_has_kernel("varlen_gather", "CPU")):
        return torch.ops.omnisift.varlen_gather(flat, indices)
    return token_rows(x, indices).contiguous()


def gather_ste_backward_torch(grad_out, x, indices):
    """Torch path of the backward (sums the rows of duplicated indices)."""
    B, L, D = x.shape
    acc = _acc_dtype(x.dtype)
    grad_x = torch.zeros((B * L, D), dtype=x.dtype, device=x.device)
    grad_x.index_put_((indices,), grad_out.to(x.dtype), accumulate=True)
    dots = (token_rows(x, indices).to(acc) * grad_out.to(acc)).sum(-1)
    grad_scores = torch.zeros(B * L, dtype=acc, device=x.device)
    grad_scores.index_put_((indices,), dots, accumulate=True)
    return grad_x.view(B, L, D), grad_scores.view(B, L)


@torch.library.custom_op("omnisift::gather_ste", mutates_args=())
def _gather_ste_op(x: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return gather_rows_triton(x, indices)
    return gather_rows_torch(x, indices)


@_gather_ste_op.register_fake
def _(x, indices, scores):
    return x.new_empty((indices.shape[0], x.shape[2]))


@torch.library.custom_op("omnisift::gather_ste_backward", mutates_args=())
def _gather_ste_backward_op(grad_out: torch.Tensor, x: torch.Tensor,
                            indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x) and x.dtype != torch.float64:
        return gather_ste_backward_triton(grad_out, x, indices, torch.float32)
    return gather_ste_backward_torch(grad_out, x, indices)


@_gather_ste_backward_op.register_fake
def _(grad_out, x, indices):
    return x.new_empty(x.shape), x.new_empty(x.shape[:2], dtype=_acc_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    x, indices, scores = inputs
    ctx.save_for_backward(x, indices)
    ctx.scores_dtype = scores.dtype


def _backward(ctx, grad_out):
    x, indices = ctx.saved_tensors
    grad_x, grad_scores = torch.ops.omnisift.gather_ste_backward(grad_out, x, indices)
    if not ctx.needs_input_grad[0]:
        grad_x = None
    grad_scores = grad_scores.to(ctx.scores_dtype) if ctx.needs_input_grad[2] else None
    return grad_x, None, grad_scores


_gather_ste_op.register_autograd(_backward, setup_context=_setup_context)


def gather_ste(x: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Gathers kept rows with a straight-through gradient to the selector's scores.

    Args:
        x: ``[B, L, D]`` float32/bfloat16/float16/float64 embeddings, any strides.
        indices: ``int64 [T]`` distinct flat token indices ``b*L + l`` in ``[0, B*L)``.
        scores: ``float32`` (or ``float64``) ``[B, L]`` selector scores; only their gradient is
            affected.

    Returns:
        ``[T, D]`` in x's dtype: exactly ``x.flatten(0, 1)[indices]``.

    Raises:
        TypeError, ValueError: on a wrong type, dtype, rank, shape or device; ``indices`` outside
            ``[0, B*L)`` or repeated (on CUDA tensors: a device-side assertion, and the Triton gather
            masks its loads meanwhile).

    Backward: ``grad_x`` (x's dtype, zeros for rows not gathered) and ``grad_scores[b, l] =
    <x[b, l], grad_out[j]>`` for gathered positions, zeros elsewhere. The Triton backward stores
    rows (no atomics), so duplicated indices keep one row's gradient; the torch path sums them.
    """
    op = "gather_ste"
    check_embeddings(op, x)
    check_index(op, "indices", indices, x.device)
    check_tensor(op, "scores", scores)
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: scores must be float32 (or float64), got {scores.dtype}")
    if tuple(scores.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{op}: scores must have shape [B, L] = {tuple(x.shape[:2])}, got "
                         f"{tuple(scores.shape)}")
    check_device(op, "scores", scores, x.device)
    BL = x.shape[0] * x.shape[1]
    check_index_values(op, "indices", indices, BL)
    check_distinct_values(op, "indices", indices, BL)
    return torch.ops.omnisift.gather_ste(x, indices, scores)
