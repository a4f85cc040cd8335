"""Readable pure-PyTorch OmniSIFT: the oracle of every fast path (no Triton, no extension)."""

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
