"""The result object returned by ``omnisift_kernels.compress`` and ``OmniSIFTCompressor``."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class CompressionResult:
    """What survives compression, in the layout asked for.

    ``T`` is the total kept length over the batch, ``L'`` the longest kept row, ``B`` the batch.

    Attributes:
        keep_mask: bool ``[B, L]``, True where a token survives (padding, ``attention_mask == 0``,
            never survives).
        output: ``"packed"``, ``"right"`` or ``"left"``.
        inputs_embeds: packed ``[T, D]`` or padded ``[B, L', D]`` embeddings; kept audio rows carry the
            straight-through estimator (value exactly the input row, gradient into the selector).
        position_ids: ``[3, T]`` or ``[3, B, L']``: the kept tokens' **original** TMRoPE ids (gaps stay);
            padding gets 0.
        attention_mask: None when packed; int64 ``[B, L']`` (1 = token, 0 = padding) when padded.
        labels: the gathered labels (``[T]`` or ``[B, L']``, padding -100), or None when none given.
        indices: int64 ``[T]``: flat indices ``b * L + l`` of the kept tokens in row-major order
            (flash-attn ``unpad_input``).
        cu_seqlens: int32 ``[B + 1]``: cumulative kept lengths.
        max_seqlen: the longest kept row (a Python int).
        rope_deltas: int64 ``[B]``: ``max(kept position id) + 1 - kept length`` per row, so the next
            decoded token lands at ``max(kept position id) + 1`` (spec §6).
        video_kept, video_total, audio_kept, audio_total: int64 ``[B]`` per-row token counts.
        audio_scores: fp32 ``[B, L]``: the selector's score of every scored audio token, 0 elsewhere;
            None when no selector ran.
    """

    keep_mask: torch.Tensor
    output: str
    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    rope_deltas: torch.Tensor
    video_kept: torch.Tensor
    video_total: torch.Tensor
    audio_kept: torch.Tensor
    audio_total: torch.Tensor
    audio_scores: torch.Tensor | None = None

    def retention(self) -> float:
        """Kept audio+video tokens over all audio+video tokens of the batch (reads the device)."""
        kept = int((self.video_kept + self.audio_kept).sum())
        total = int((self.video_total + self.audio_total).sum())
        return kept / total if total else 1.0

    def stats(self) -> dict[str, list[int]]:
        """Per-row counts as Python lists (reads the device)."""
        return {
            "video_kept": self.video_kept.tolist(),
            "video_total": self.video_total.tolist(),
            "audio_kept": self.audio_kept.tolist(),
            "audio_total": self.audio_total.tolist(),
        }
