"""Readable reference of ``gather_ste`` (``omnisift_kernels.ops.gather``): the forward as a Python
loop over indices, the backward as its formula (spec §6: a straight-through estimator)."""

from __future__ import annotations

import torch

__all__ = ["gather_ste", "gather_ste_backward"]


def gather_ste(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[T, D]`` in x's dtype: row ``j`` is ``x[indices[j] // L, indices[j] % L]``."""
    B, L, D = x.shape
    rows = [x[int(i) // L, int(i) % L] for i in indices.tolist()]
    return torch.stack(rows) if rows else x.new_empty((0, D))


def gather_ste_backward(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor):
    """``(grad_x, grad_scores)`` of ``gather_ste`` for distinct ``indices``, in fp64.

    ``grad_x[b, l] = grad_out[j]`` where ``indices[j] = b*L + l`` (zeros elsewhere); ``grad_scores[b, l]
    = <x[b, l], grad_out[j]>`` there (zeros elsewhere).
    """
    B, L, D = x.shape
    grad_x = torch.zeros((B, L, D), dtype=torch.float64)
    grad_scores = torch.zeros((B, L), dtype=torch.float64)
    for j, i in enumerate(indices.tolist()):
        b, l = divmod(int(i), L)
        g = grad_out[j].double().cpu()
        grad_x[b, l] = g
        grad_scores[b, l] = torch.dot(x[b, l].double().cpu(), g)
    return grad_x, grad_scores
