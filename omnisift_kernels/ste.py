"""The straight-through estimator of the audio selection (spec §5)."""

from __future__ import annotations

import torch


class StraightThroughKeep(torch.autograd.Function):
    """``y = x * m`` with the hard keep factor ``m = 1`` and an identity surrogate gradient.

    Forward returns exactly ``x`` (no ``(1 - s) + s`` rounding). Backward: ``dL/dx = dL/dy`` and
    ``dL/ds_j = <x_j, dL/dy_j>`` accumulated in fp32 (fp64 for fp64 inputs).

    Args (to ``apply``):
        x: ``[n, D]`` kept embeddings (any float dtype).
        scores: ``[n]`` the selector's scores of those tokens.

    Returns:
        ``[n, D]`` equal to ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.scores_dtype = scores.dtype
        return x.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        grad_scores = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
            grad_scores = (x.to(acc) * grad_out.to(acc)).sum(-1).to(ctx.scores_dtype)
        return grad_out, grad_scores


def straight_through_keep(x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Applies :class:`StraightThroughKeep` (``x [n, D]``, ``scores [n]``)."""
    if x.dim() != 2 or scores.shape != x.shape[:1]:
        raise ValueError(
            f"straight_through_keep: expected x [n, D] and scores [n], got {tuple(x.shape)} and {tuple(scores.shape)}"
        )
    return StraightThroughKeep.apply(x, scores)
