"""vLLM's Qwen2.5-Omni thinker processor, emitting OmniSIFT's compressed placeholder counts.

vLLM fixes how many placeholder tokens a media item takes before its encoder runs. OmniSIFT's keep
counts depend only on the layout, so they are known then: each video's span is laid out from
:func:`omnisift_kernels.plan.chunk_keep_counts`, the same per-chunk rule as
:func:`~omnisift_kernels.plan.sizes_from_grid` and the compressor (they cannot drift apart).

A video with its sound track (``use_audio_in_video=True``) is compressed as one item, since the audio
selector needs the chunk's surviving video: the video item carries its track's features
(``omnisift_track_features``/``omnisift_track_lengths``) and its encoder output holds the whole
span's kept tokens (video and audio, in prompt order); the paired audio item gets no embeddings
(``omnisift_paired``). The hashes that key vLLM's encoder, processor and prefix caches fold in the
pairing and the ratios (:meth:`OmniSIFTQwen2_5OmniProcessor._get_mm_hashes`), and such requests skip
the processor cache (whose per-item reuse could process a video without its track).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_omni_thinker import (
    Qwen2_5OmniThinkerMultiModalProcessor,
    create_qwen2_5_omni_thinker_field_factory,
)
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing.processor import PlaceholderFeaturesInfo, PromptUpdateDetails

from ...layout import Video
from ...plan import chunk_keep_counts
from .config import ServingConfig, serving_config

TRACK_FEATURES = "omnisift_track_features"
TRACK_LENGTHS = "omnisift_track_lengths"
PAIRED = "omnisift_paired"


def audio_tokens_from_mel(mel_frames: int) -> int:
    """Audio tokens of ``mel_frames`` mel frames (the Omni audio tower's two stride-2 stages)."""
    return ((int(mel_frames) - 1) // 2 + 1 - 2) // 2 + 1


def track_runs(thinker_config: Any, grid_thw: list[int], second_per_grid: float,
               audio_tokens: int) -> list[tuple[str, int, int]]:
    """The uncompressed span of a video with its sound track, as transformers' processor lays it out.

    ``Qwen2_5OmniProcessor`` gives every video token its frame's time value (``g * second_per_grid * 25``,
    float64) and audio token ``k`` the value ``k``, cuts each list with its ``get_chunked_index`` (walking
    the tokens, a new chunk starts at a token whose value reaches the next multiple of
    ``position_id_per_seconds * seconds_per_chunk``, one multiple per token), then emits video chunk j,
    audio chunk j for every j. vLLM 0.32's own layout (``omni_get_updates_use_audio_in_video``) buckets
    whole frames by window and differs from it when a window holds no frame (under 1 fps); the plugin
    follows transformers, as ``OmniSIFTThinker`` does.

    Args:
        thinker_config: the thinker config (``position_id_per_seconds``, ``seconds_per_chunk``, the
            spatial merge size).
        grid_thw: the video's ``(t, h, w)`` patch grid.
        second_per_grid: seconds per temporal grid.
        audio_tokens: tokens of the sound track.

    Returns:
        Runs in order (bos/eos tokens excluded): ``("video", first, stop)`` over the video's tokens in
        frame-major order and ``("audio", first, stop)`` over the track's tokens.
    """
    t = int(grid_thw[0])
    merge = thinker_config.vision_config.spatial_merge_size
    per_frame = int(grid_thw[1]) * int(grid_thw[2]) // merge ** 2
    per_second = int(getattr(thinker_config, "position_id_per_seconds", 25))
    per_chunk = int(per_second * float(getattr(thinker_config, "seconds_per_chunk", 2)))

    def chunked(groups) -> list[tuple[int, int]]:
        # groups: (value, tokens) in order; at most one cut per token, at the group's first tokens.
        cuts, boundary, index = [], 1, 0
        for value, count in groups:
            k = 0
            while k < count and value >= boundary * per_chunk:
                cuts.append(index + k)
                boundary, k = boundary + 1, k + 1
            index += count
        edges = [0] + cuts + [index]
        return list(zip(edges[:-1], edges[1:]))

    video = chunked((g * float(second_per_grid) * per_second, per_frame) for g in range(t))
    audio = chunked(((k, 1) for k in range(int(audio_tokens))))
    runs: list[tuple[str, int, int]] = []
    for j in range(max(len(video), len(audio))):
        if j < len(video) and video[j][1] > video[j][0]:
            runs.append(("video", *video[j]))
        if j < len(audio) and audio[j][1] > audio[j][0]:
            runs.append(("audio", *audio[j]))
    return runs


def track_span_ids(thinker_config: Any, grid_thw: list[int], second_per_grid: float, audio_tokens: int) -> list[int]:
    """``<|audio_bos|>`` + the uncompressed interleaved span (:func:`track_runs`) + ``<|audio_eos|>``."""
    ids = [thinker_config.audio_start_token_id]
    for kind, first, stop in track_runs(thinker_config, grid_thw, second_per_grid, audio_tokens):
        token = thinker_config.video_token_index if kind == "video" else thinker_config.audio_token_index
        ids += [token] * (stop - first)
    return ids + [thinker_config.audio_end_token_id]


def compressed_video_ids(thinker_config: Any, cfg: ServingConfig, grid_thw: list[int], second_per_grid: float,
                         audio_tokens: int | None) -> list[int]:
    """The compressed span of one video: the uncompressed span with each frame's and each chunk's
    dropped tokens taken out (counts from :func:`omnisift_kernels.plan.chunk_keep_counts`).

    Which tokens go is known only after the encoders, but where each kind sits is known before: a frame's
    kept tokens stay in its place, and so do a chunk's kept audio tokens, as long as the frame (the
    chunk's audio) is one run of the span. That holds up to 1 second per temporal grid (2 fps, the
    default, and faster). Slower, a chunk's two frames fall in two of transformers' windows, so its audio
    is two runs (above 2 seconds per grid a frame can be cut too), and how the kept tokens split between
    the runs depends on the selector's (or the frame's) scores: this layout then places them all at the
    first run. The counts stay exact, and so do the embeddings and position ids the model writes there
    (in transformers' order): only the ids of such placeholders can differ from transformers' kept ids.

    Args:
        thinker_config: the thinker config (its special ids and spatial merge size).
        cfg: the ratios.
        grid_thw: the video's ``(t, h, w)`` patch grid.
        second_per_grid: seconds per temporal grid.
        audio_tokens: tokens of its sound track (None: a video given without ``use_audio_in_video``).

    Returns:
        ``[<|audio_bos|>] + kept span + [<|audio_eos|>]`` with a sound track, else the kept video
        placeholders.
    """
    merge = thinker_config.vision_config.spatial_merge_size
    t, h, w = (int(x) for x in grid_thw)
    per_frame = (h // merge) * (w // merge)
    item = Video(t, h // merge, w // merge, audio_tokens=audio_tokens or 0, second_per_grid=float(second_per_grid))
    chunks = chunk_keep_counts([item], rho_video=cfg.rho_video, rho_audio=cfg.rho_audio, score_audio=True)
    v_id, a_id = thinker_config.video_token_index, thinker_config.audio_token_index
    frame_kept = [0] * t
    for ch in chunks:
        first, stop = ch.frames
        for g in range(first, stop):
            frame_kept[g] = ch.video_kept // (stop - first)  # the frames of one video are of one size
    if audio_tokens is None:
        return [v_id] * sum(frame_kept)
    # Per unit (frame or chunk): its token range, its kept count, whether it was placed yet.
    frames = [(g * per_frame, (g + 1) * per_frame, frame_kept[g]) for g in range(t)]
    windows = [(ch.window[0], ch.window[1] if c + 1 < len(chunks) else audio_tokens, ch.audio_kept)
               for c, ch in enumerate(chunks)]
    placed = {"video": [False] * len(frames), "audio": [False] * len(windows)}
    ids: list[int] = []
    for kind, first, stop in track_runs(thinker_config, grid_thw, second_per_grid, audio_tokens):
        units, token = (frames, v_id) if kind == "video" else (windows, a_id)
        for u, (lo, hi, kept) in enumerate(units):
            overlap = min(stop, hi) - max(first, lo)
            if overlap <= 0:
                continue
            if kept == hi - lo:
                ids += [token] * overlap
            elif not placed[kind][u]:
                ids += [token] * kept
            placed[kind][u] = True
    return [thinker_config.audio_start_token_id] + ids + [thinker_config.audio_end_token_id]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class OmniSIFTQwen2_5OmniProcessor(Qwen2_5OmniThinkerMultiModalProcessor):
    """The stock thinker processor with compressed video spans (see the module docstring)."""

    def _serving(self) -> ServingConfig:
        model_config = self.info.ctx.model_config
        return serving_config(model_config.hf_config, model_config.model)

    # --- item data ------------------------------------------------------------------------------
    def _postprocess_hf_mm_data(self, hf_data, hf_kwargs, processed_data):
        out = super()._postprocess_hf_mm_data(hf_data, hf_kwargs, processed_data)
        if not (self._serving().enabled and hf_kwargs.get("use_audio_in_video")):
            return out
        lengths = out.get("audio_feature_lengths")
        if lengths is not None and out.get("video_grid_thw") is not None and "input_audio_features" in out:
            # vLLM pairs video i with audio i and requires as many audios as videos here.
            out[PAIRED] = torch.ones(len(lengths), dtype=torch.bool)
            out[TRACK_FEATURES] = out["input_audio_features"]
            out[TRACK_LENGTHS] = lengths.clone()
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(create_qwen2_5_omni_thinker_field_factory(
            self.info.get_hf_config().vision_config.spatial_merge_size)(hf_inputs))
        if PAIRED in hf_inputs:
            fields[PAIRED] = MultiModalFieldConfig.batched("audio", keep_on_cpu=True)
        if TRACK_LENGTHS in hf_inputs:
            lengths = hf_inputs[TRACK_LENGTHS].flatten()
            fields[TRACK_FEATURES] = MultiModalFieldConfig.flat_from_sizes("video", lengths, dim=1)
            fields[TRACK_LENGTHS] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    # --- caches ---------------------------------------------------------------------------------
    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        cfg = self._serving()
        if not cfg.enabled:
            return hashes
        tag = cfg.cache_tag()
        videos = list(hashes.get("video", []))
        audios = list(hashes.get("audio", []))
        out = {k: list(v) for k, v in hashes.items()}
        if inputs.hf_processor_mm_kwargs.get("use_audio_in_video") and videos:
            # Video i carries audio i (vLLM pairs them by order); each hash covers both and the ratios.
            for i, v in enumerate(videos):
                a = audios[i] if i < len(audios) else ""
                out["video"][i] = _digest(tag, "video+track", v, a)
                if i < len(audios):
                    out["audio"][i] = _digest(tag, "track-of", a, v)
        elif videos:
            out["video"] = [_digest(tag, "video", v) for v in videos]
        return out

    def _cached_apply_hf_processor(self, inputs, timing_ctx):
        if self._serving().enabled and inputs.hf_processor_mm_kwargs.get("use_audio_in_video"):
            return self._apply_hf_processor(inputs, timing_ctx)
        return super()._cached_apply_hf_processor(inputs, timing_ctx)

    # --- placeholders ---------------------------------------------------------------------------
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        cfg = self._serving()
        if not cfg.enabled:
            return updates
        thinker_config = self.info.get_hf_config()
        data = out_mm_kwargs.get_data()
        use_audio_in_video = bool(hf_processor_mm_kwargs.get("use_audio_in_video", False))
        lengths = data.get("audio_feature_lengths")
        v_id, a_id = thinker_config.video_token_index, thinker_config.audio_token_index
        grids = data.get("video_grid_thw")
        if grids is not None and len(grids) > 1:
            odd = [i for i, g in enumerate(grids[:-1]) if int(g[0]) % 2]
            if odd:
                raise ValueError(
                    f"omnisift vLLM plugin: a prompt with {len(grids)} videos where video {odd[0]} (not the last) "
                    f"has an odd number of temporal grids ({int(grids[odd[0]][0])}); OmniSIFT pairs frames across "
                    "videos (spec §2) but the plugin compresses each video on its own. Send such videos in "
                    "separate prompts or give every video but the last an even number of frame pairs.")

        def video_span(item_idx: int):
            grid = [int(x) for x in data["video_grid_thw"][item_idx].tolist()]
            spg = data.get("second_per_grid_ts")
            second_per_grid = float(spg[item_idx]) if spg is not None else 1.0
            if not use_audio_in_video:
                return compressed_video_ids(thinker_config, cfg, grid, second_per_grid, None)
            audio_tokens = audio_tokens_from_mel(int(lengths[item_idx]))
            ids = compressed_video_ids(thinker_config, cfg, grid, second_per_grid, audio_tokens)
            return PromptUpdateDetails.select_token_ids(ids, [v_id, a_id])

        for k, update in enumerate(updates):
            if update.modality == "video":
                updates[k] = type(update)(modality="video", target=update.target, replacement=video_span)
        return updates

    def _derive_audio_from_video_placeholders(self, placeholders, mm_prompt_updates):
        if not self._serving().enabled:
            return super()._derive_audio_from_video_placeholders(placeholders, mm_prompt_updates)
        derived = dict(super()._derive_audio_from_video_placeholders(placeholders, mm_prompt_updates))
        cfg = self.info.get_hf_config()
        embed_ids = torch.tensor([cfg.video_token_index, cfg.audio_token_index])
        videos, audios = [], []
        for p in derived.get("video", []):
            is_embed = torch.isin(torch.tensor(p.tokens), embed_ids)
            videos.append(PlaceholderFeaturesInfo(modality="video", item_idx=p.item_idx, start_idx=p.start_idx,
                                                  tokens=p.tokens, is_embed=is_embed))
        for p in derived.get("audio", []):
            audios.append(PlaceholderFeaturesInfo(modality="audio", item_idx=p.item_idx, start_idx=p.start_idx,
                                                  tokens=p.tokens, is_embed=torch.zeros(len(p.tokens), dtype=torch.bool)))
        derived["video"], derived["audio"] = videos, audios
        return derived
