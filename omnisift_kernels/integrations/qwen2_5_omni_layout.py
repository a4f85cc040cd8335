"""The Qwen2.5-Omni token layout: read from the ids, warned about, and packed.

Functions of the thinker config (its special ids) and the batch, called by
:class:`~omnisift_kernels.integrations.qwen2_5_omni.OmniSIFTThinker`:

- :func:`detect_audio_in_video`: whether the ids hold ``<|vision_bos|><|audio_bos|>`` (a video with its
  sound track, ``use_audio_in_video=True``);
- :func:`audio_in_video_mask`: which audio tokens are a video's own sound track (the only audio OmniSIFT
  selects; audio in its own block is kept whole **[ours]**);
- :func:`check_layout`: warns when the config's ids or the ``use_audio_in_video`` flag do not match the ids;
- :func:`warn_uncompressible`: warns when part or all of the batch cannot be compressed;
- :func:`packed_thinker_inputs`: the position ids of the packed layout (``forward(layout="packed")``).

``stacklevel`` is that of ``warnings.warn`` as seen from these functions (2: their caller).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


def detect_audio_in_video(config: Any, input_ids: torch.Tensor) -> bool:
    """True when some row holds the pair ``<|vision_bos|><|audio_bos|>`` (the config's ids)."""
    if input_ids.shape[1] < 2:
        return False
    pair = (input_ids[:, :-1] == config.vision_start_token_id) & (input_ids[:, 1:] == config.audio_start_token_id)
    return bool(pair.any())


def audio_in_video_mask(config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, L]``: the audio tokens that are a video's own sound track.

    Those lie inside ``<|vision_bos|><|audio_bos|> ... <|audio_eos|><|vision_eos|>`` (the layout of
    ``use_audio_in_video=True``), with the config's ids. Audio in its own ``<|audio_bos|> ...
    <|audio_eos|>`` block (``use_audio_in_video=False``, or an audio-only clip) is not.
    """
    cfg = config
    ids = input_ids
    opens = torch.zeros_like(ids, dtype=torch.int32)
    closes = torch.zeros_like(ids, dtype=torch.int32)
    if ids.shape[1] >= 2:
        opens[:, 1:] = ((ids[:, :-1] == cfg.vision_start_token_id) & (ids[:, 1:] == cfg.audio_start_token_id)).int()
        closes[:, :-1] = ((ids[:, :-1] == cfg.audio_end_token_id) & (ids[:, 1:] == cfg.vision_end_token_id)).int()
    depth = opens.cumsum(-1) - closes.cumsum(-1) + closes  # the closing token still counts as inside
    return (ids == cfg.audio_token_id) & (depth > 0)


def check_layout(config: Any, input_ids: torch.Tensor, use_audio_in_video: bool | None, *,
                 stacklevel: int = 2) -> None:
    """Warns when the ids and the config (or the ``use_audio_in_video`` flag) disagree.

    Audio-in-video detection, TMRoPE positions and OmniSIFT's chunks all rely on the config's special
    ids matching the tokenizer's. A mismatch does not fail: transformers builds wrong positions and
    video pruning silently finds nothing to prune, so it is reported here.
    """
    cfg = config
    ids = input_ids
    n_video = int((ids == cfg.video_token_id).sum())
    n_image = int((ids == cfg.image_token_id).sum())
    n_audio = int((ids == cfg.audio_token_id).sum())
    n_vbos = int((ids == cfg.vision_start_token_id).sum())
    if (n_video or n_image) and n_vbos == 0:
        warnings.warn(
            f"OmniSIFTThinker: input_ids hold {n_video} video and {n_image} image placeholder tokens but "
            f"never the config's vision_start_token_id={cfg.vision_start_token_id}: the config's special ids "
            "do not match the tokenizer's. Positions, audio-in-video detection and video pruning are then "
            "wrong (pruning may silently keep everything). Build the config with the tokenizer's ids "
            "(vision_start/end, audio_start/end, audio/image/video token ids).",
            stacklevel=stacklevel,
        )
        return
    detected = detect_audio_in_video(cfg, ids)
    interleaved = False
    if n_video and n_audio:
        # An audio token between two video tokens of the same row: the audio-in-video layout.
        is_v = ids == cfg.video_token_id
        before = is_v.int().cumsum(-1) > 0
        after = is_v.flip(-1).int().cumsum(-1).flip(-1) > 0
        interleaved = bool(((ids == cfg.audio_token_id) & before & after).any())
    if interleaved and not detected:
        warnings.warn(
            "OmniSIFTThinker: audio tokens are interleaved with video tokens (a video with its sound track) "
            f"but the config's pair vision_start_token_id={cfg.vision_start_token_id}, "
            f"audio_start_token_id={cfg.audio_start_token_id} never occurs: the config's special ids do not "
            "match the tokenizer's, so audio-in-video detection, positions and chunking are wrong.",
            stacklevel=stacklevel,
        )
    elif use_audio_in_video is not None and bool(use_audio_in_video) != detected and (n_video or n_audio):
        warnings.warn(
            f"OmniSIFTThinker: use_audio_in_video={bool(use_audio_in_video)} but the ids "
            f"{'contain' if detected else 'do not contain'} a video with its sound track "
            "(<|vision_bos|><|audio_bos|>); transformers' positions follow the flag and will not match the "
            "layout. Pass the flag the processor was called with, or leave it None (detected from the ids).",
            stacklevel=stacklevel,
        )


def warn_uncompressible(config: Any, input_ids: torch.Tensor, in_video: torch.Tensor,
                        rho_video: float, rho_audio: float, *, stacklevel: int = 2) -> None:
    """Warns about audio that is kept whole (not a video's sound track; ``in_video`` from
    :func:`audio_in_video_mask`) and about a batch without video (nothing to compress)."""
    cfg = config
    has_video = bool((input_ids == cfg.video_token_id).any())
    standalone = bool(((input_ids == cfg.audio_token_id) & ~in_video).any())
    if standalone and rho_audio > 0:
        warnings.warn(
            "OmniSIFTThinker: audio that is not a video's own sound track (use_audio_in_video=False, or an "
            "audio-only clip) is never compressed: vision-guided selection scores audio against the video "
            "frames of the same time span, which such audio does not have. All of it is kept "
            "(rho_audio applies only to the sound track of a video given with use_audio_in_video=True).",
            stacklevel=stacklevel,
        )
    if not has_video and (rho_video > 0 or rho_audio > 0):
        warnings.warn(
            "OmniSIFTThinker: the batch has no video, so OmniSIFT compresses nothing (images are never "
            "pruned; audio needs video frames as anchors): the sequence is passed on unchanged.",
            stacklevel=stacklevel,
        )


def packed_thinker_inputs(config: Any, res: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The position ids and attention arguments of the packed layout (one varlen row, no mask).

    Args:
        config: the thinker config (its ``_attn_implementation``).
        res: the packed :class:`~omnisift_kernels.result.CompressionResult`.

    Returns:
        The kept TMRoPE ids ``[3, 1, T]``, the thinker's ``position_ids [4, 1, T]`` (row 0 the text
        positions, restarting at 0 per sequence) and, for FlashAttention-2, ``cu_seq_lens_q/k`` and
        ``max_length_q/k`` (else no arguments).
    """
    T = res.inputs_embeds.shape[0]
    dev = res.inputs_embeds.device
    cu = res.cu_seqlens.to(dev, torch.int64)
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=dev), cu[1:] - cu[:-1])
    text_pos = torch.arange(T, device=dev) - cu[seg]
    pos = res.position_ids[:, None, :]  # [3, 1, T]
    pos4 = torch.cat([text_pos.view(1, 1, T), pos], dim=0)
    kwargs = {}
    if "flash" in str(getattr(config, "_attn_implementation", "")):
        cu32 = res.cu_seqlens.to(dev, torch.int32)
        kwargs = dict(cu_seq_lens_q=cu32, cu_seq_lens_k=cu32,
                      max_length_q=res.max_seqlen, max_length_k=res.max_seqlen)
    return pos, pos4, kwargs
