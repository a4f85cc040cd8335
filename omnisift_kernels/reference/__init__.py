"""Readable pure-PyTorch OmniSIFT: the oracle of every fast path (no Triton, no extension).

``compress`` and ``plan``: the whole method, chunk by chunk (``reference_compress``, the
``backend="reference"`` of :func:`omnisift_kernels.compress`). One module per op family, each the
oracle of that op's tests: ``video`` (frame_saliency, frame_pair_similarity, video_scores), ``topk``
(segmented_topk_mask), ``gather`` (gather_ste), ``varlen`` (varlen_compact/pad/scatter/gather),
``chunk_attention`` (the selector's attention).
"""

from .compress import (
    first_k_by_score,
    num_removed,
    prune_chunk_video,
    reference_compress,
    spatial_scores,
    temporal_scores,
)
from .plan import ChunkPlan, RowPlan, plan_row

__all__ = [
    "ChunkPlan",
    "RowPlan",
    "first_k_by_score",
    "num_removed",
    "plan_row",
    "prune_chunk_video",
    "reference_compress",
    "spatial_scores",
    "temporal_scores",
]
