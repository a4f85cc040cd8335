"""Readable references of the video ops (``omnisift_kernels.ops.video``): Python loops over
segments and ``F.cosine_similarity`` in fp64. The oracle of every backend's video kernels in the
tests; never called by the fast paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["frame_pair_similarity", "frame_saliency", "video_scores"]


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[idx].double()


def frame_saliency(x: torch.Tensor, token_index: torch.Tensor, seg_offsets: torch.Tensor) -> torch.Tensor:
    """Per segment, the cosine of each token with the segment's mean (spec §3).

    Args:
        x: ``[B, L, D]`` embeddings, any float dtype.
        token_index: int64 ``[N]`` flat token indices ``b*L + l``.
        seg_offsets: int64 ``[S+1]`` CSR offsets into ``token_index``.

    Returns:
        float64 ``[N]``: ``F.cosine_similarity(token, mean, eps=1e-8)``, the mean taken in fp32.
    """
    out = torch.zeros(token_index.numel(), dtype=torch.float64)
    offs = seg_offsets.tolist()
    for s in range(len(offs) - 1):
        a, b = offs[s], offs[s + 1]
        if a == b:
            continue
        rows = _rows(x, token_index[a:b])
        mean = rows.float().mean(0).double()  # the mean is taken in fp32 (spec §8)
        out[a:b] = F.cosine_similarity(rows, mean[None].expand_as(rows), dim=-1, eps=1e-8)
    return out


def frame_pair_similarity(x: torch.Tensor, first_index: torch.Tensor, second_index: torch.Tensor) -> torch.Tensor:
    """float64 ``[N]``: ``F.cosine_similarity(x[second_index], x[first_index], eps=1e-8)`` (spec §4)."""
    return F.cosine_similarity(_rows(x, second_index), _rows(x, first_index), dim=-1, eps=1e-8)


def video_scores(x: torch.Tensor, token_index: torch.Tensor, seg_offsets: torch.Tensor,
                 pair_index: torch.Tensor) -> torch.Tensor:
    """float64 ``[N]``: :func:`frame_saliency` where ``pair_index < 0``, else the cosine of the token
    with ``x[pair_index]``."""
    sal = frame_saliency(x, token_index, seg_offsets)
    pairs = frame_pair_similarity(x, pair_index.clamp_min(0), token_index)
    return torch.where(pair_index < 0, sal, pairs)
