"""The arguments of one compression call, validated once by :func:`omnisift_kernels.compress` and
handed as one object to the backend that runs it (``reference.compress.reference_compress`` or
``pipeline.fast_compress``), so the call's signature is written in one place."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class CompressRequest:
    """A validated ``compress`` call (see :func:`omnisift_kernels.compress` for each argument).

    Attributes:
        inputs_embeds: ``[B, L, D]`` merged embeddings.
        input_ids: int32/int64 ``[B, L]``.
        position_ids: int32/int64 ``[3, B, L]`` TMRoPE ids (row 0: time ids).
        video_token_id, audio_token_id: the placeholder ids.
        rho_video, rho_audio: fractions removed, in ``[0, 1)``.
        selector: the ``VisionGuidedAudioSelector`` or None (all audio kept).
        attention_mask: ``[B, L]`` (0 at padding) or None.
        labels: int ``[B, L]`` or None.
        output: ``"packed"``, ``"right"`` or ``"left"``.
        grid: per-row layout items (structure checked), or None.
        validate: check the embeddings for NaN/Inf.
    """

    inputs_embeds: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    video_token_id: int
    audio_token_id: int
    rho_video: float
    rho_audio: float
    selector: Any = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    output: str = "packed"
    grid: list | None = None
    validate: bool = False
