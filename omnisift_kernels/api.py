"""``omnisift_kernels.compress``: the public entry point of the compression."""

from __future__ import annotations

import os

import torch

from . import _validation as V
from .plan import check_grid
from .reference import reference_compress
from .request import CompressRequest
from .result import CompressionResult
from .selector import VisionGuidedAudioSelector

BACKENDS = ("auto", "reference", "cpu", "triton")
BACKEND_ENV = "OMNISIFT_BACKEND"


def compress(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    video_token_id: int,
    audio_token_id: int,
    rho_video: float,
    rho_audio: float,
    selector: VisionGuidedAudioSelector | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    output: str = "packed",
    backend: str = "auto",
    grid=None,
    validate: bool | None = None,
) -> CompressionResult:
    """Compresses the audio and video tokens of a merged omni-modal batch (OmniSIFT).

    Args:
        inputs_embeds: ``[B, L, D]`` embeddings after the modalities were merged (fp32/bf16/fp16).
        input_ids: int ``[B, L]`` token ids (placeholders mark audio and video positions).
        position_ids: int ``[3, B, L]`` TMRoPE ids; row 0 is the time id.
        video_token_id: id of the video placeholder token.
        audio_token_id: id of the audio placeholder token.
        rho_video: fraction of every video frame's tokens removed, ``0 <= rho_video < 1``.
        rho_audio: fraction of every scored audio chunk's tokens removed, ``0 <= rho_audio < 1``.
        selector: the trained :class:`VisionGuidedAudioSelector`; None keeps all audio.
        attention_mask: ``[B, L]`` with 0 at padding (padding never survives), or None.
        labels: int ``[B, L]`` labels gathered with the same mask, or None.
        output: ``"packed"`` (flash-attn varlen), ``"right"`` or ``"left"`` padded.
        backend: ``"auto"`` (from the device; the ``OMNISIFT_BACKEND`` environment variable overrides),
            ``"reference"``, ``"cpu"`` or ``"triton"``. An explicitly requested backend that cannot
            run raises.
        grid: optional host-side layout: per row, its items (:mod:`omnisift_kernels.layout`) in sequence
            order. Makes the fast path free of device-to-host synchronisation. It must describe the
            batch: on CPU tensors a mismatch raises a ValueError; on CUDA it fails a device-side
            assertion (``torch._assert_async``) and no kernel reads or writes out of bounds.
        validate: check the embeddings for NaN/Inf. None: check when the call synchronises anyway
            (the reference, or the fast path without ``grid``, where the check rides on the one sizes
            read); True with ``grid`` costs one device read.

    Returns:
        A :class:`CompressionResult`.

    Raises:
        TypeError: an argument of the wrong type or dtype (``input_ids``/``position_ids`` must be int32
            or int64).
        ValueError: wrong shapes or devices, ratios outside ``[0, 1)``, equal video and audio token ids,
            NaN/Inf embeddings (when validated), time ids that break the layout (below), a ``grid`` that
            does not describe the batch.

    Input contract (every backend alike; **[ours]** where the spec is silent):

    * Time ids (``position_ids[0]``) of video and audio tokens lie in ``[0, 2**40)``, and along a row
      a video token's time id never decreases (every frame's tokens share one time id, frames in time
      order; a frame's tokens may be split by other tokens). Anything else is a ValueError. Audio time
      ids may come in any order: each audio token joins the window its own time id falls in. Padding
      positions are never read.
    * ``B = 0`` or ``L = 0``: an empty result, nothing raised.
    * Negative token ids match no token (``SpatioTemporalVideoPruner`` uses -1 for "no audio").
    """
    op = "omnisift_kernels.compress"
    V.check_compress_inputs(op, inputs_embeds, input_ids, position_ids, attention_mask, labels)
    rho_video = V.check_ratio(op, "rho_video", rho_video)
    rho_audio = V.check_ratio(op, "rho_audio", rho_audio)
    video_token_id = V.check_token_id(op, "video_token_id", video_token_id)
    audio_token_id = V.check_token_id(op, "audio_token_id", audio_token_id)
    V.check_token_ids_differ(op, video_token_id, audio_token_id)
    output = V.check_output(op, output)
    validate = V.check_optional_bool(op, "validate", validate)
    if selector is not None and not isinstance(selector, VisionGuidedAudioSelector):
        raise TypeError(f"{op}: selector must be a VisionGuidedAudioSelector or None, got {type(selector).__name__}")
    if selector is not None and selector.d_model != inputs_embeds.shape[-1]:
        raise ValueError(
            f"{op}: selector.d_model={selector.d_model} does not match inputs_embeds' D={inputs_embeds.shape[-1]}"
        )
    if selector is not None:
        where = {p.device for p in selector.parameters()}
        if where != {inputs_embeds.device}:
            raise ValueError(f"{op}: selector's parameters must be on {inputs_embeds.device} (the device of "
                             f"inputs_embeds), got {sorted(str(d) for d in where)}")
    backend = resolve_backend(op, backend, inputs_embeds.device)
    if validate is None:
        validate = backend == "reference" or grid is None
    if backend == "reference" and grid is not None:
        grid = check_grid(op, grid, inputs_embeds.shape[0])
    request = CompressRequest(
        inputs_embeds, input_ids, position_ids, video_token_id=video_token_id, audio_token_id=audio_token_id,
        rho_video=rho_video, rho_audio=rho_audio, selector=selector, attention_mask=attention_mask,
        labels=labels, output=output, grid=grid, validate=validate,
    )
    if backend == "reference":
        if validate:
            V.check_finite(op, inputs_embeds)
        return reference_compress(request)
    from .pipeline import fast_compress

    return fast_compress(request, backend)


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Picks the backend: explicit argument, else ``OMNISIFT_BACKEND``, else from the device."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "auto")
        if env not in BACKENDS:
            raise ValueError(f"{op}: environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {env!r}")
        backend = env
        if backend == "auto":
            return "triton" if device.type == "cuda" and _triton_importable() else "cpu"
    if backend == "triton":
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if not _triton_importable():
            raise RuntimeError(f"{op}: backend='triton' was requested but Triton is not importable")
        if device.type != "cuda" and not interpreting:
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}"
            )
    return backend


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
