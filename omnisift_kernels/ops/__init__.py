"""Public functional ops: registered ``omnisift::<name>`` custom ops (``docs/architecture.md`` lists
each op's kernels, reference, CPU path, test and benchmark)."""

from __future__ import annotations

from .gather import gather_ste  # noqa: F401
from .topk import segmented_topk_mask  # noqa: F401
from .video import frame_pair_similarity, frame_saliency, video_scores  # noqa: F401
from .varlen import PackedBatch, PaddedBatch, varlen_compact, varlen_gather, varlen_pad, varlen_scatter  # noqa: F401
