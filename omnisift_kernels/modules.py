"""Drop-in ``nn.Module`` s: the full compressor and the parameter-free video pruner."""

from __future__ import annotations

import torch
from torch import nn

from . import _validation as V
from .api import BACKENDS, compress
from .presets import get_preset
from .result import CompressionResult
from .selector import VisionGuidedAudioSelector


class OmniSIFTCompressor(nn.Module):
    """OmniSIFT as a module: spatio-temporal video pruning, then vision-guided audio selection.

    Holds the trainable :class:`VisionGuidedAudioSelector` (attribute ``selector``) and the default
    ratios; calls :func:`omnisift_kernels.compress` (the batched fast path unless
    ``backend="reference"``).

    Args:
        d_model: embedding width D of the LLM.
        rho_video: default fraction of video tokens removed per frame.
        rho_audio: default fraction of audio tokens removed per scored chunk.
        preset: a name of :data:`omnisift_kernels.PRESETS`, overriding ``rho_video``/``rho_audio``.
        num_heads: selector attention heads.
        hidden_dim: selector width.
        selector: an existing selector to hold (its ``d_model`` must match), else a new one.
        backend: default backend (see :func:`omnisift_kernels.compress`).
    """

    def __init__(
        self,
        d_model: int,
        *,
        rho_video: float = 0.67,
        rho_audio: float = 0.4,
        preset: str | None = None,
        num_heads: int = 8,
        hidden_dim: int = 512,
        selector: VisionGuidedAudioSelector | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        op = "OmniSIFTCompressor"
        if preset is not None:
            p = get_preset(preset)
            rho_video, rho_audio = p.rho_video, p.rho_audio
        self.rho_video = V.check_ratio(op, "rho_video", rho_video)
        self.rho_audio = V.check_ratio(op, "rho_audio", rho_audio)
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if selector is None:
            selector = VisionGuidedAudioSelector(d_model, num_heads=num_heads, hidden_dim=hidden_dim)
        elif not isinstance(selector, VisionGuidedAudioSelector):
            raise TypeError(f"{op}: selector must be a VisionGuidedAudioSelector, got {type(selector).__name__}")
        elif selector.d_model != d_model:
            raise ValueError(f"{op}: selector.d_model={selector.d_model} does not match d_model={d_model}")
        self.selector = selector

    def extra_repr(self) -> str:
        return f"rho_video={self.rho_video}, rho_audio={self.rho_audio}, backend={self.backend!r}"

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        video_token_id: int,
        audio_token_id: int,
        rho_video: float | None = None,
        rho_audio: float | None = None,
        output: str = "packed",
        grid=None,
    ) -> CompressionResult:
        """Compresses a batch; ratios given here override the module's.

        Args:
            inputs_embeds: ``[B, L, D]`` merged embeddings.
            input_ids: int ``[B, L]``.
            position_ids: int ``[3, B, L]`` TMRoPE ids.
            attention_mask: ``[B, L]`` or None.
            labels: int ``[B, L]`` or None.
            video_token_id: id of video placeholders.
            audio_token_id: id of audio placeholders.
            rho_video: per-call video ratio (None: the module's).
            rho_audio: per-call audio ratio (None: the module's).
            output: ``"packed"``, ``"right"`` or ``"left"``.
            grid: per-row layout items (:mod:`omnisift_kernels.layout`) for a sync-free call.

        Returns:
            A :class:`~omnisift_kernels.CompressionResult`.
        """
        return compress(
            inputs_embeds, input_ids, position_ids,
            video_token_id=video_token_id, audio_token_id=audio_token_id,
            rho_video=self.rho_video if rho_video is None else rho_video,
            rho_audio=self.rho_audio if rho_audio is None else rho_audio,
            selector=self.selector, attention_mask=attention_mask, labels=labels,
            output=output, backend=self.backend, grid=grid,
        )


class SpatioTemporalVideoPruner(nn.Module):
    """The parameter-free video half of OmniSIFT (spec §3), for video-only use.

    Audio, text and image tokens are kept; every video frame keeps ``n - floor(n * rho_video)``
    tokens (the second frame of a chunk only when it matches the first's size).

    Args:
        rho_video: default fraction of video tokens removed per frame.
        backend: default backend (see :func:`omnisift_kernels.compress`).
    """

    def __init__(self, rho_video: float = 0.67, *, backend: str = "auto") -> None:
        super().__init__()
        self.rho_video = V.check_ratio("SpatioTemporalVideoPruner", "rho_video", rho_video)
        if backend not in BACKENDS:
            raise ValueError(f"SpatioTemporalVideoPruner: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def extra_repr(self) -> str:
        return f"rho_video={self.rho_video}, backend={self.backend!r}"

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        video_token_id: int,
        audio_token_id: int = -1,
        rho_video: float | None = None,
        output: str = "packed",
        grid=None,
    ) -> CompressionResult:
        """Prunes the video tokens of a batch (arguments as :meth:`OmniSIFTCompressor.forward`).

        ``audio_token_id`` only matters for the per-row audio counts; audio is always kept.
        """
        return compress(
            inputs_embeds, input_ids, position_ids,
            video_token_id=video_token_id, audio_token_id=audio_token_id,
            rho_video=self.rho_video if rho_video is None else rho_video, rho_audio=0.0,
            selector=None, attention_mask=attention_mask, labels=labels,
            output=output, backend=self.backend, grid=grid,
        )
