"""Readable reference of ``segmented_topk_mask`` (``omnisift_kernels.ops.topk``): a Python sort per
segment, by (score descending, position ascending) as spec §8 ranks."""

from __future__ import annotations

import torch

__all__ = ["segmented_topk_mask"]


def segmented_topk_mask(scores: torch.Tensor, seg_offsets: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """bool ``[N]``: True at the ``k[s]`` highest-ranked positions of each segment ``s``.

    Args:
        scores: float ``[N]`` (finite; -0.0 ranks as 0.0).
        seg_offsets: int ``[S+1]`` CSR offsets.
        k: int ``[S]`` positions to choose per segment (clamped to the segment's size by the sort).
    """
    vals = [0.0 if v == 0 else v for v in scores.tolist()]  # -0.0 == 0.0
    offs, ks = seg_offsets.tolist(), k.tolist()
    mask = [False] * len(vals)
    for s in range(len(offs) - 1):
        a, b = offs[s], offs[s + 1]
        order = sorted(range(a, b), key=lambda i: (-vals[i], i))
        for r, i in enumerate(order):
            mask[i] = r < ks[s]
    return torch.tensor(mask, dtype=torch.bool)
