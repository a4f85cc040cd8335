"""Segmented top-k selection mask (spec §3 video drop set, §4 audio keep set, §8 ties).

:func:`segmented_topk_mask` selects, in every CSR segment, the ``k[s]`` elements that come first
in the order (score descending, then position ascending): element i of segment s is selected iff
``#{j in s: score_j > score_i or (score_j == score_i and j < i)} < k[s]``. All segments in one
launch (Triton), a partial selection per segment (the extension's C++ CPU kernel) or a handful of
vectorized torch ops (a stable two-key sort, where the extension is missing); no host sync.
Registered as ``omnisift::segmented_topk_mask``.
"""

from __future__ import annotations

import torch

from .._ext import ext_has_kernel
from ..triton_kernels import TRITON_AVAILABLE, use_triton
from .._validation import check_device, check_index, check_offsets, check_offsets_values, check_tensor
from .video import segment_ids

if TRITON_AVAILABLE:
    from ..triton_kernels import segmented_topk_mask_triton

__all__ = ["segmented_topk_mask"]


def segmented_topk_mask_torch(scores, seg_offsets, k):
    """Vectorized torch path: any segment size (sorts all N scores once, two stable sorts)."""
    N = scores.shape[0]
    s = scores.to(torch.float32)
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 ties with +0.0
    seg = segment_ids(seg_offsets, N)
    # stable: equal scores keep their position order; NaN sorts first (as in the Triton kernel)
    order = torch.sort(s, descending=True, stable=True).indices
    order = order[torch.sort(seg[order], stable=True).indices]  # (segment, -score, position)
    seg_sorted = seg[order]
    rank = torch.arange(N, device=scores.device) - seg_offsets[seg_sorted]
    mask = torch.empty(N, dtype=torch.bool, device=scores.device)
    mask[order] = rank < k[seg_sorted]
    return mask


@torch.library.custom_op("omnisift::segmented_topk_mask", mutates_args=())
def _segmented_topk_mask_op(scores: torch.Tensor, seg_offsets: torch.Tensor,
                            k: torch.Tensor) -> torch.Tensor:
    if use_triton(scores):
        return segmented_topk_mask_triton(scores, seg_offsets, k)
    if scores.device.type == "cpu" and ext_has_kernel("segmented_topk_mask_cpu", "CPU"):
        # C++: a partial selection per segment (nth_element), instead of the two full sorts below.
        return torch.ops.omnisift.segmented_topk_mask_cpu(scores, seg_offsets, k)
    return segmented_topk_mask_torch(scores, seg_offsets, k)


@_segmented_topk_mask_op.register_fake
def _(scores, seg_offsets, k):
    return scores.new_empty(scores.shape, dtype=torch.bool)


def segmented_topk_mask(scores: torch.Tensor, seg_offsets: torch.Tensor,
                        k: torch.Tensor) -> torch.Tensor:
    """Per segment, True for the ``k[s]`` first elements in (score descending, position ascending).

    Video uses it for the drop set (the k most redundant; on ties the earlier token is dropped
    first), audio for the keep set (``k = n_keep``; on ties the earlier token is kept first).

    Args:
        scores: ``float32 [N]`` (NaN is not ranked meaningfully but does not crash: it sorts
            first).
        seg_offsets: ``int64 [S+1]`` CSR offsets into ``scores`` (``0``, non-decreasing, ``N``).
        k: ``int64 [S]`` how many to select per segment; ``<= 0`` selects none, ``>= size`` all.

    Returns:
        ``bool [N]``.

    Raises:
        TypeError, ValueError: on a wrong type, dtype, rank, length or device, or ``seg_offsets`` not
            running from 0 to N without decreasing (on CUDA tensors: a device-side assertion).

    Segment sizes: the Triton kernel ranks a segment of up to 4096 elements by an in-register
    bitonic sort and any larger one by a blocked pairwise count in the same launch (O(n^2)); the
    CPU path sorts and has no size limit.
    """
    op = "segmented_topk_mask"
    check_tensor(op, "scores", scores)
    if scores.dtype != torch.float32:
        raise TypeError(f"{op}: scores must be float32, got {scores.dtype}")
    if scores.dim() != 1:
        raise ValueError(f"{op}: scores must be 1-D [N], got {scores.dim()}-D shape "
                         f"{tuple(scores.shape)}")
    check_tensor(op, "k", k)
    check_index(op, "k", k, scores.device)
    check_offsets(op, seg_offsets, scores.device, num_segments=k.shape[0])
    check_device(op, "k", k, scores.device)
    check_offsets_values(op, seg_offsets, scores.shape[0])
    return torch.ops.omnisift.segmented_topk_mask(scores, seg_offsets, k)
