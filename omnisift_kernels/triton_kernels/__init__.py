"""Triton kernels and their launchers for the OmniSIFT ops.

Importing this package never fails: without Triton, :data:`TRITON_AVAILABLE` is ``False``, the
launchers are not defined and every op uses its CPU/torch path (:func:`use_triton` says which
path an op takes).

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (which must be set
before this package is first imported, as Triton decides at ``@triton.jit`` time).
"""

from __future__ import annotations

from .dispatch import TRITON_AVAILABLE, TRITON_ERROR, triton_on_cpu, use_triton

__all__ = ["TRITON_AVAILABLE", "TRITON_ERROR", "triton_on_cpu", "use_triton"]

if TRITON_AVAILABLE:
    from .check import assert_grid_matches, grid_matches
    from .gather import gather_rows_triton, gather_ste_backward_triton
    from .topk import segmented_topk_mask_triton
    from .video import (
        frame_pair_similarity_triton,
        frame_saliency_triton,
        video_scores_triton,
    )

    __all__ += [
        "assert_grid_matches",
        "grid_matches",
        "frame_pair_similarity_triton",
        "frame_saliency_triton",
        "gather_rows_triton",
        "gather_ste_backward_triton",
        "segmented_topk_mask_triton",
        "video_scores_triton",
    ]
