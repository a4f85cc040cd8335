"""TMRoPE position ids of a compressed prompt, exactly as transformers computes them.

OmniSIFT keeps every surviving token's **original** position ids (spec §6). Which video and audio
tokens survive is known only after the encoders run, while vLLM computes a request's position ids
when it arrives. The positions are therefore split in two:

- :func:`compressed_positions` (at arrival, host side): the uncompressed prompt is rebuilt from the
  compressed one, transformers' own ``get_rope_index`` runs on it, and every token that is not a
  compressed video span's embedding keeps its original ids; the embedding tokens of a compressed span
  get the span's *base* (one more than the position of the token before the span, where transformers
  starts the media block);
- the encoder (:func:`item_relative_positions`, then :func:`encode_positions`) appends each kept
  token's position **relative to that base** to its embedding as exact integer channels; the model
  adds them to the base before the decoder runs (see ``model.py``).

Relative positions do not depend on where the item sits in the prompt, so an encoder output cached
by hash stays right for every request that reuses it. They are written as base-256 digits, exact in
bf16/fp16/fp32 (bf16 holds integers exactly only up to 256; Omni time ids reach 1,500 at 60 s).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

DIGITS = 3  # base-256 digits per position id: relative positions below 2**24
POSITION_CHANNELS = 3 * DIGITS


class _RopeIndex:
    """Calls transformers' ``get_rope_index`` of Qwen2.5-Omni with a config and no model.

    The method reads only ``self.config``, ``self.spatial_merge_size`` and two helper methods of the same
    class, so it is borrowed as is: the positions are those transformers (and ``OmniSIFTThinker``) use.
    """

    def __init__(self, thinker_config: Any) -> None:
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

        cls = hf.Qwen2_5OmniPreTrainedModelForConditionalGeneration
        self._get_rope_index = cls.get_rope_index
        self.get_llm_pos_ids_for_vision = cls.get_llm_pos_ids_for_vision.__get__(self)
        self.get_chunked_index = cls.get_chunked_index.__get__(self)
        self.config = thinker_config
        self.spatial_merge_size = thinker_config.vision_config.spatial_merge_size

    def __call__(self, ids: Sequence[int], *, image_grid_thw: list, video_grid_thw: list,
                 audio_seqlens: list, second_per_grids: list, use_audio_in_video: bool) -> torch.Tensor:
        """``[3, len(ids)]`` int64 positions of one uncompressed prompt."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long)
        pos, _ = self._get_rope_index(
            self, input_ids,
            torch.tensor(image_grid_thw, dtype=torch.long).view(-1, 3) if image_grid_thw else None,
            torch.tensor(video_grid_thw, dtype=torch.long).view(-1, 3) if video_grid_thw else None,
            torch.ones_like(input_ids),
            use_audio_in_video,
            torch.tensor(audio_seqlens, dtype=torch.long) if audio_seqlens else None,
            torch.tensor(second_per_grids, dtype=torch.float32) if second_per_grids else None,
        )
        return pos[:, 0].to(torch.long)


def item_relative_positions(rope: _RopeIndex, inner_ids: list[int], *, grid_thw: list[int],
                            second_per_grid: float, audio_seqlen: int | None) -> torch.Tensor:
    """``[3, len(inner_ids)]`` positions of one video's span tokens relative to the span's base.

    Args:
        rope: the position function.
        inner_ids: the uncompressed span's embedding tokens (video, and audio for a video with its
            sound track) in prompt order.
        grid_thw: the video's ``(t, h, w)`` patch grid.
        second_per_grid: seconds per temporal grid.
        audio_seqlen: mel frames of the video's sound track (None: no track).
    """
    cfg = rope.config
    with_audio = audio_seqlen is not None
    head = [cfg.vision_start_token_id] + ([cfg.audio_start_token_id] if with_audio else [])
    tail = ([cfg.audio_end_token_id] if with_audio else []) + [cfg.vision_end_token_id]
    pos = rope(head + list(inner_ids) + tail, image_grid_thw=[], video_grid_thw=[list(grid_thw)],
               audio_seqlens=[audio_seqlen] if with_audio else [], second_per_grids=[second_per_grid],
               use_audio_in_video=with_audio)
    rel = pos[:, len(head): len(head) + len(inner_ids)] - (pos[:, :1] + 1)
    if rel.numel() and (int(rel.min()) < 0 or int(rel.max()) >= 256 ** DIGITS):
        raise ValueError(f"omnisift vLLM plugin: a video's relative positions must lie in [0, {256 ** DIGITS}), "
                         f"got [{int(rel.min())}, {int(rel.max())}] (grid_thw={list(grid_thw)})")
    return rel


def encode_positions(rel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, 9]`` channels of ``dtype``: each of the 3 relative ids of ``rel [3, n]`` as base-256 digits."""
    r = rel.to(torch.long).t()  # [n, 3]; the range is checked on the host (item_relative_positions)
    digits = [(r // (256 ** k)) % 256 for k in range(DIGITS)]
    return torch.stack(digits, dim=-1).reshape(r.shape[0], POSITION_CHANNELS).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """``[3, n]`` int64 relative ids from the ``[n, 9]`` channels of :func:`encode_positions`."""
    d = channels.to(torch.float32).round().to(torch.long).view(-1, 3, DIGITS)
    scale = torch.tensor([256 ** k for k in range(DIGITS)], device=d.device, dtype=torch.long)
    return (d * scale).sum(-1).t()


def compressed_positions(
    rope: _RopeIndex,
    prompt: Sequence[int],
    spans: list[dict[str, Any]],
) -> tuple[torch.Tensor, int]:
    """Position ids ``[3, len(prompt)]`` of a compressed prompt and its decode delta.

    Args:
        rope: the position function.
        prompt: the compressed prompt's token ids.
        spans: the prompt's media items sorted by offset, each a dict with ``modality`` (``"image"``,
            ``"video"`` or ``"audio"``), ``offset`` and ``length`` (in the compressed prompt),
            ``original`` (the uncompressed span's token ids; equal to the compressed span's when the
            item is not compressed), ``embed`` (bool ``[length]``: which compressed tokens carry
            encoder embeddings whose positions the encoder supplies; None: none), and the grid inputs
            ``grid_thw``, ``second_per_grid``, ``audio_seqlen`` (mel frames, for audio and for a video's
            sound track).

    Returns:
        ``(positions, delta)``: ``delta = max(position) + 1 - len(prompt)`` (the next decode position
        minus the prompt length; kept tokens keep original ids, so the maximum is the uncompressed one).
    """
    prompt = list(prompt)
    original: list[int] = []
    mapping: list[int] = []  # compressed index -> original index (-1: embedding of a compressed span)
    bases: list[tuple[int, int]] = []  # (compressed index, original index of the token before the span)
    image_grid, video_grid, audio_seqlens, spgs = [], [], [], []
    use_audio_in_video = False
    cursor = 0
    for span in spans:
        off, length = span["offset"], span["length"]
        for i in range(cursor, off):
            mapping.append(len(original))
            original.append(prompt[i])
        if span["modality"] == "image":
            image_grid.append(list(span["grid_thw"]))
        elif span["modality"] == "video":
            video_grid.append(list(span["grid_thw"]))
            spgs.append(float(span["second_per_grid"]))
            if span.get("audio_seqlen") is not None:
                use_audio_in_video = True
                audio_seqlens.append(int(span["audio_seqlen"]))
        else:
            audio_seqlens.append(int(span["audio_seqlen"]))
        start = len(original)
        original.extend(span["original"])
        embed = span.get("embed")
        if embed is None:
            mapping.extend(range(start, start + length))
        else:
            # Non-embedding tokens of a compressed span (<|audio_bos|>, <|audio_eos|>) sit at its ends.
            lead = int(embed.long().argmax()) if bool(embed.any()) else length
            trail = length - lead - int(embed.sum())
            mapping.extend(range(start, start + lead))
            for j in range(lead, length - trail):
                mapping.append(-1)
                bases.append((off + j, start - 1))
            n_orig = len(span["original"])
            mapping.extend(range(start + n_orig - trail, start + n_orig))
        cursor = off + length
    for i in range(cursor, len(prompt)):
        mapping.append(len(original))
        original.append(prompt[i])
    if spgs and len(spgs) != len(video_grid):
        raise ValueError("omnisift vLLM plugin: every video needs its second_per_grid")
    pos_orig = rope(original, image_grid_thw=image_grid, video_grid_thw=video_grid, audio_seqlens=audio_seqlens,
                    second_per_grids=spgs, use_audio_in_video=use_audio_in_video)
    idx = torch.tensor(mapping, dtype=torch.long)
    out = pos_orig[:, idx.clamp(min=0)].clone()
    if bases:
        dst = torch.tensor([b[0] for b in bases], dtype=torch.long)
        src = torch.tensor([b[1] for b in bases], dtype=torch.long)
        out[:, dst] = pos_orig[:, src] + 1
    delta = int(pos_orig.max()) + 1 - len(prompt) if pos_orig.numel() else 0
    return out, delta
