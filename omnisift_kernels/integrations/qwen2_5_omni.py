"""OmniSIFT for transformers' Qwen2.5-Omni: training and generation on the compressed sequence.

:class:`OmniSIFTThinker` wraps a ``Qwen2_5OmniThinkerForConditionalGeneration`` (``wrap_omni_model``
takes the full ``Qwen2_5OmniForConditionalGeneration``). It merges the modalities with the thinker's
public methods (``get_audio_features``, ``get_image_features``, ``get_video_features``, the input
embeddings, ``masked_scatter``), builds TMRoPE ids with ``get_rope_index``, compresses (spec §3-§6)
and runs the thinker on the shortened sequence:

- ``forward(**processor_outputs, labels=...)``: loss and logits of the compressed sequence. Labels are
  shifted **before** compaction (``pad(labels, (0, 1), -100)[:, 1:]``) and gathered with the keep mask;
  the loss is ``thinker.loss_function(..., shift_labels=...)``. Right padding (default) or one packed
  varlen row (``layout="packed"``).
- ``generate(**processor_outputs, max_new_tokens=...)``: the new tokens. The compressed prompt is
  left-padded and passed as ``inputs_embeds`` with ``position_ids [4, B, K]`` (row 0 the text positions
  ``attention_mask.cumsum(-1) - 1``, rows 1-3 the kept TMRoPE ids), so every row decodes from
  ``max(kept position) + 1``; mask and cache lengths follow the compressed length.

The selector is attached as ``thinker.compressor`` so the state dict holds its parameters exactly as
the authors' release does (``thinker.compressor.v_proj.weight``, ...); the compressor module that
calls it is kept outside the module tree (no duplicate keys).

What is compressed (spec §9, and **[ours]** where the release has no rule): a video's frames are pruned
in every layout; audio is selected only when it is a video's own sound track interleaved with its frames
(``use_audio_in_video=True``: ``<|vision_bos|><|audio_bos|> [V][A]... <|audio_eos|><|vision_eos|>``).
Audio in its own block (``use_audio_in_video=False``, an audio-only clip) is kept whole **[ours]** and a
warning says so; images and text are never pruned. A warning also reports config ids that do not match
the ids in the batch (``check_layout``). Processor outputs, ``mm_token_type_ids`` included, are accepted
as they come; :mod:`.qwen2_5_omni_inputs` turns media files into them on every 5.x processor.

Supported transformers versions: **5.0 <= version < 6.0** (:data:`SUPPORTED_TRANSFORMERS`); the test
suite was run with 5.0.0, 5.15.1, 5.17.0, 5.22.0, 5.23.0, 5.24.0 and 5.25.0 (the real-processor tests
with 5.0.0, 5.17.0, 5.22.0, 5.23.0, 5.24.0 and 5.25.0). From 5.16 ``generate`` keeps the passed 4-row position ids;
5.0-5.15 drop them in the thinker's ``prepare_inputs_for_generation``, so there the prefill gets them
through a per-call override and decoding follows ``rope_deltas`` (same positions, checked by the tests).
4.x is refused (its thinker and generate internals differ; the spec's facts are for 5.x).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import OmniSIFTCompressor
from ..presets import get_preset
from ..result import CompressionResult
from ..selector import VisionGuidedAudioSelector
from .. import synthetic as syn

SUPPORTED_TRANSFORMERS = ("5.0", "6.0")  # [min, max)
TESTED_TRANSFORMERS = ("5.0.0", "5.15.1", "5.17.0", "5.22.0", "5.23.0", "5.24.0", "5.25.0")

_MEDIA_KEYS = (
    "input_features",
    "feature_attention_mask",
    "audio_feature_lengths",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "video_second_per_grid",
    "use_audio_in_video",
    # The processor's ``return_mm_token_type_ids=True`` output: which placeholder kind each token is.
    # The ids already say that; accepted and not needed.
    "mm_token_type_ids",
)
_IGNORED_KEYS = ("mm_token_type_ids",)
COMPRESSOR_PREFIXES = ("module.thinker.compressor.", "thinker.compressor.", "module.compressor.", "compressor.")


# ----------------------------------------------------------------------------------------------
# Version check
# ----------------------------------------------------------------------------------------------
def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit()) if not part.isdigit() else part
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():
            break
    return tuple(out)


def check_transformers_version(version: str | None = None) -> str:
    """Raises ``RuntimeError`` unless transformers is in :data:`SUPPORTED_TRANSFORMERS` (5.0 <= v < 6.0).

    Args:
        version: the version string to check; None reads ``transformers.__version__``.

    Returns:
        The checked version string.
    """
    if version is None:
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - transformers is a test dependency
            raise RuntimeError(
                "omnisift_kernels.integrations.qwen2_5_omni needs transformers "
                f">={SUPPORTED_TRANSFORMERS[0]},<{SUPPORTED_TRANSFORMERS[1]} (pip install 'transformers>=5,<6')"
            ) from e
        version = transformers.__version__
    v = _version_tuple(version)
    lo, hi = _version_tuple(SUPPORTED_TRANSFORMERS[0]), _version_tuple(SUPPORTED_TRANSFORMERS[1])
    if not v or v < lo or v >= hi:
        raise RuntimeError(
            f"OmniSIFT's Qwen2.5-Omni integration supports transformers >={SUPPORTED_TRANSFORMERS[0]},"
            f"<{SUPPORTED_TRANSFORMERS[1]} (tested: {', '.join(TESTED_TRANSFORMERS)}); found {version}. "
            "transformers 4.x recomputes decoding positions inside generate and cannot decode a compressed "
            "prompt correctly; install 'transformers>=5,<6'."
        )
    return version


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class OmniSIFTOutput:
    """What :meth:`OmniSIFTThinker.forward` returns.

    Attributes:
        loss: the mean cross entropy on the compressed sequence (None without labels).
        logits: ``[B, K, V]`` (right padding) or ``[1, T, V]`` (packed).
        attention_mask: ``[B, K]`` of the compressed batch (None when packed).
        position_ids: ``[3, B, K]`` or ``[3, 1, T]`` kept TMRoPE ids (original values).
        shift_labels: the gathered, pre-shifted labels (``[B, K]`` / ``[1, T]``), or None.
        keep_mask: bool ``[B, L]`` of the uncompressed batch.
        cu_seqlens: int32 ``[B + 1]`` kept lengths (packed layout boundaries).
        past_key_values: the cache when ``use_cache=True`` was asked for (the thinker output's
            ``past_key_values``, named ``cache`` from transformers 5.24).
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    shift_labels: torch.Tensor | None
    keep_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    past_key_values: Any = None

    def __getitem__(self, key: str):
        return getattr(self, key)


# ----------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------
def _as_tensor(out: Any, attr: str) -> torch.Tensor:
    """Feature tensor from a ``get_*_features`` result (ModelOutput, tensor or per-item tuple)."""
    if torch.is_tensor(out):
        return out
    value = getattr(out, attr, None) if not isinstance(out, (tuple, list)) else None
    if value is None and not isinstance(out, (tuple, list)):
        value = out[0]
    if value is None:
        value = out
    if isinstance(value, (tuple, list)):
        return torch.cat(list(value), dim=0)
    return value


def _output_cache(out: Any) -> Any:
    """The KV cache of a transformers output: ``past_key_values`` before 5.24, ``cache`` from 5.24."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


def text_model(thinker: nn.Module) -> nn.Module:
    """The thinker's text decoder: ``thinker.model.language_model`` (transformers >= ~5.20, where
    ``thinker.model`` is the multimodal ``Qwen2_5OmniThinkerModel``) or ``thinker.model`` (5.0-5.1x)."""
    return getattr(thinker.model, "language_model", thinker.model)


def generate_honors_position_ids(thinker: nn.Module) -> bool:
    """True when ``thinker.generate`` keeps passed ``position_ids`` and extends them by last + 1 per step
    (transformers >= 5.16, where the thinker no longer overrides ``prepare_inputs_for_generation``)."""
    from transformers.generation.utils import GenerationMixin

    method = type(thinker).prepare_inputs_for_generation
    return getattr(method, "__func__", method) is GenerationMixin.prepare_inputs_for_generation


def _rope_holder(thinker: nn.Module) -> nn.Module:
    """The module whose ``rope_deltas`` the thinker reads (``thinker.model`` or, before ~5.20, ``thinker``)."""
    return thinker.model if hasattr(thinker.model, "language_model") else thinker


class OmniSIFTThinker(nn.Module):
    """A Qwen2.5-Omni thinker that trains and generates on the OmniSIFT-compressed sequence.

    Args:
        thinker: a ``Qwen2_5OmniThinkerForConditionalGeneration``.
        compressor: an :class:`~omnisift_kernels.OmniSIFTCompressor` (or any module with a ``selector``
            attribute and its call signature), a :class:`VisionGuidedAudioSelector` (wrapped in an
            ``OmniSIFTCompressor``), or None (a new selector of width D in the thinker's dtype and device).
        preset: a ratio preset of :data:`omnisift_kernels.PRESETS` (``"paper-35"``, ``"paper-25"``,
            ``"release-default"``); it overrides ``rho_video`` and ``rho_audio``, as the compressor's does.
        rho_video: default fraction of each video frame's tokens removed (per call override; 0.7 when
            neither it nor a preset is given).
        rho_audio: default fraction of each scored audio chunk removed (per call override; 0.3 default).
        use_audio_in_video: None detects it from the ids (``<|vision_bos|><|audio_bos|>`` with the config's
            ``vision_start_token_id`` and ``audio_start_token_id``).
        backend: backend of the ``OmniSIFTCompressor`` built here (``"auto"``, ``"reference"``, ``"cpu"``,
            ``"triton"``); ignored when a compressor module is given.

    Attributes:
        thinker: the wrapped thinker; ``thinker.compressor`` is the selector.
        last_stats: per-row kept/total video and audio counts of the last call, the kept and
            original lengths and the retention (audio+video kept / total).
        last_keep_mask: bool ``[B, L]`` of the last call.

    Supported transformers: 5.0 <= version < 6.0 (tested: :data:`TESTED_TRANSFORMERS`); others raise.
    """

    def __init__(
        self,
        thinker: nn.Module,
        compressor: nn.Module | None = None,
        *,
        preset: str | None = None,
        rho_video: float | None = None,
        rho_audio: float | None = None,
        use_audio_in_video: bool | None = None,
        backend: str = "auto",
    ) -> None:
        check_transformers_version()
        super().__init__()
        if preset is not None:
            if not isinstance(preset, str):
                raise TypeError(f"OmniSIFTThinker: preset must be a str, got {type(preset).__name__}")
            chosen = get_preset(preset)
            rho_video, rho_audio = chosen.rho_video, chosen.rho_audio
        rho_video = 0.7 if rho_video is None else rho_video
        rho_audio = 0.3 if rho_audio is None else rho_audio
        for name in ("get_rope_index", "get_audio_features", "get_video_features", "get_input_embeddings"):
            if not hasattr(thinker, name):
                raise TypeError(
                    f"OmniSIFTThinker: expected a Qwen2_5OmniThinkerForConditionalGeneration (missing {name}); "
                    f"got {type(thinker).__name__}. Use wrap_omni_model() for the full Qwen2_5OmniForConditionalGeneration."
                )
        d_model = thinker.config.get_text_config().hidden_size
        emb = thinker.get_input_embeddings().weight
        if compressor is None:
            compressor = VisionGuidedAudioSelector(d_model).to(device=emb.device, dtype=emb.dtype)
        if isinstance(compressor, VisionGuidedAudioSelector):
            if compressor.d_model != d_model:
                raise ValueError(
                    f"OmniSIFTThinker: the selector's d_model={compressor.d_model} does not match the thinker's "
                    f"hidden size {d_model}"
                )
            compressor = OmniSIFTCompressor(d_model, rho_video=rho_video, rho_audio=rho_audio,
                                            selector=compressor, backend=backend)
        selector = getattr(compressor, "selector", None)
        if not isinstance(selector, VisionGuidedAudioSelector):
            raise TypeError("OmniSIFTThinker: compressor must hold a VisionGuidedAudioSelector at .selector")
        if selector.d_model != d_model:
            raise ValueError(
                f"OmniSIFTThinker: the selector's d_model={selector.d_model} does not match the thinker's "
                f"hidden size {d_model}"
            )
        self.thinker = thinker
        # The release's layout: the selector's parameters directly under thinker.compressor.*
        thinker.compressor = selector
        # The compressor module itself stays outside the module tree (no duplicate state-dict keys).
        object.__setattr__(self, "_compressor", compressor)
        self.rho_video = rho_video
        self.rho_audio = rho_audio
        self.preset = preset
        self.use_audio_in_video = use_audio_in_video
        self.last_stats: dict[str, Any] | None = None
        self.last_keep_mask: torch.Tensor | None = None

    # -------------------------------------------------------------------------------------------
    @property
    def selector(self) -> VisionGuidedAudioSelector:
        return self.thinker.compressor

    @property
    def compressor(self) -> nn.Module:
        return self._compressor

    @property
    def config(self):
        return self.thinker.config

    @property
    def language_model(self) -> nn.Module:
        """The text decoder (``thinker.model.language_model`` from 5.2x, ``thinker.model`` before)."""
        return text_model(self.thinker)

    def train(self, mode: bool = True):
        super().train(mode)
        self._compressor.train(mode)
        return self

    # -------------------------------------------------------------------------------------------
    def _detect_audio_in_video(self, input_ids: torch.Tensor) -> bool:
        cfg = self.thinker.config
        if input_ids.shape[1] < 2:
            return False
        pair = (input_ids[:, :-1] == cfg.vision_start_token_id) & (input_ids[:, 1:] == cfg.audio_start_token_id)
        return bool(pair.any())

    def audio_in_video_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, L]``: the audio tokens that are a video's own sound track.

        Those lie inside ``<|vision_bos|><|audio_bos|> ... <|audio_eos|><|vision_eos|>`` (the layout of
        ``use_audio_in_video=True``), with the config's ids. Audio in its own ``<|audio_bos|> ...
        <|audio_eos|>`` block (``use_audio_in_video=False``, or an audio-only clip) is not.
        """
        cfg = self.thinker.config
        ids = input_ids
        opens = torch.zeros_like(ids, dtype=torch.int32)
        closes = torch.zeros_like(ids, dtype=torch.int32)
        if ids.shape[1] >= 2:
            opens[:, 1:] = ((ids[:, :-1] == cfg.vision_start_token_id) & (ids[:, 1:] == cfg.audio_start_token_id)).int()
            closes[:, :-1] = ((ids[:, :-1] == cfg.audio_end_token_id) & (ids[:, 1:] == cfg.vision_end_token_id)).int()
        depth = opens.cumsum(-1) - closes.cumsum(-1) + closes  # the closing token still counts as inside
        return (ids == cfg.audio_token_id) & (depth > 0)

    def check_layout(self, input_ids: torch.Tensor, use_audio_in_video: bool | None) -> None:
        """Warns when the ids and the config (or the ``use_audio_in_video`` flag) disagree.

        Audio-in-video detection, TMRoPE positions and OmniSIFT's chunks all rely on the config's special
        ids matching the tokenizer's. A mismatch does not fail: transformers builds wrong positions and
        video pruning silently finds nothing to prune, so it is reported here.
        """
        cfg = self.thinker.config
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
                stacklevel=3,
            )
            return
        detected = self._detect_audio_in_video(ids)
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
                stacklevel=3,
            )
        elif use_audio_in_video is not None and bool(use_audio_in_video) != detected and (n_video or n_audio):
            warnings.warn(
                f"OmniSIFTThinker: use_audio_in_video={bool(use_audio_in_video)} but the ids "
                f"{'contain' if detected else 'do not contain'} a video with its sound track "
                "(<|vision_bos|><|audio_bos|>); transformers' positions follow the flag and will not match the "
                "layout. Pass the flag the processor was called with, or leave it None (detected from the ids).",
                stacklevel=3,
            )

    def _warn_uncompressible(self, input_ids: torch.Tensor, in_video: torch.Tensor,
                             rho_video: float, rho_audio: float) -> None:
        cfg = self.thinker.config
        has_video = bool((input_ids == cfg.video_token_id).any())
        standalone = bool(((input_ids == cfg.audio_token_id) & ~in_video).any())
        if standalone and rho_audio > 0:
            warnings.warn(
                "OmniSIFTThinker: audio that is not a video's own sound track (use_audio_in_video=False, or an "
                "audio-only clip) is never compressed: vision-guided selection scores audio against the video "
                "frames of the same time span, which such audio does not have. All of it is kept "
                "(rho_audio applies only to the sound track of a video given with use_audio_in_video=True).",
                stacklevel=3,
            )
        if not has_video and (rho_video > 0 or rho_audio > 0):
            warnings.warn(
                "OmniSIFTThinker: the batch has no video, so OmniSIFT compresses nothing (images are never "
                "pruned; audio needs video frames as anchors): the sequence is passed on unchanged.",
                stacklevel=3,
            )

    def merge_modalities(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        audio_feature_lengths: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_second_per_grid: torch.Tensor | None = None,
        use_audio_in_video: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The thinker's merge step through its public methods.

        Returns:
            ``inputs_embeds [B, L, D]``, TMRoPE ``position_ids [3, B, L]`` and ``attention_mask [B, L]``.
        """
        thinker = self.thinker
        cfg = thinker.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = thinker.get_input_embeddings()(input_ids)

        def scatter(embeds, token_id, feats):
            mask = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)
            n = int((input_ids == token_id).sum())
            if n * embeds.shape[-1] != feats.numel():
                raise ValueError(
                    f"OmniSIFTThinker: {n} placeholder tokens (id {token_id}) but features of shape {tuple(feats.shape)}"
                )
            return embeds.masked_scatter(mask, feats.to(embeds.device, embeds.dtype))

        if input_features is not None:
            out = thinker.get_audio_features(input_features, feature_attention_mask, audio_feature_lengths)
            embeds = scatter(embeds, cfg.audio_token_id, _as_tensor(out, "last_hidden_state"))
        if pixel_values is not None:
            out = thinker.get_image_features(pixel_values, image_grid_thw)
            embeds = scatter(embeds, cfg.image_token_id, _as_tensor(out, "pooler_output"))
        if pixel_values_videos is not None:
            out = thinker.get_video_features(pixel_values_videos, video_grid_thw)
            embeds = scatter(embeds, cfg.video_token_id, _as_tensor(out, "pooler_output"))

        if use_audio_in_video is None:
            use_audio_in_video = self.use_audio_in_video
        self.check_layout(input_ids, use_audio_in_video)
        if use_audio_in_video is None:
            use_audio_in_video = self._detect_audio_in_video(input_ids)
        if feature_attention_mask is not None:
            audio_seqlens = feature_attention_mask.sum(-1)
        else:
            audio_seqlens = audio_feature_lengths
        position_ids, _ = thinker.get_rope_index(
            input_ids, image_grid_thw, video_grid_thw, attention_mask,
            use_audio_in_video, audio_seqlens, video_second_per_grid,
        )
        return embeds, position_ids.to(embeds.device), attention_mask

    def compress(
        self,
        inputs_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        rho_video: float | None = None,
        rho_audio: float | None = None,
        output: str = "right",
    ) -> CompressionResult:
        """Runs the compressor with the thinker's token ids and records :attr:`last_stats`.

        Audio that is not a video's own sound track (see :meth:`audio_in_video_mask`) is shown to the
        compressor as text, so it is always kept **[ours]**: OmniSIFT's audio selection is guided by the
        video frames of the same 2-second chunk, which separate audio does not have. (Passed through as
        is, its TMRoPE time ids would put all of it in the last chunk's window when it follows the video
        and in no window when it precedes it, so how much is dropped would depend on the order.)
        In :attr:`last_stats` such audio counts as audio (kept), and ``audio_separate`` gives its count
        per row.
        """
        cfg = self.thinker.config
        rv = self.rho_video if rho_video is None else rho_video
        ra = self.rho_audio if rho_audio is None else rho_audio
        in_video = self.audio_in_video_mask(input_ids)
        self._warn_uncompressible(input_ids, in_video, rv, ra)
        standalone = (input_ids == cfg.audio_token_id) & ~in_video
        if bool(standalone.any()):
            input_ids = input_ids.masked_fill(standalone, cfg.audio_start_token_id)
        res = self._compressor(
            inputs_embeds, input_ids, position_ids, attention_mask, labels,
            video_token_id=cfg.video_token_id, audio_token_id=cfg.audio_token_id,
            rho_video=rv,
            rho_audio=ra,
            output=output,
        )
        stats = res.stats()
        valid = torch.ones_like(res.keep_mask) if attention_mask is None else attention_mask.bool()
        if attention_mask is not None:
            standalone = standalone & attention_mask.bool()
        separate = standalone.sum(-1).tolist()
        stats["audio_kept"] = [k + n for k, n in zip(stats["audio_kept"], separate)]
        stats["audio_total"] = [t + n for t, n in zip(stats["audio_total"], separate)]
        stats["audio_separate"] = separate
        stats["kept_length"] = res.keep_mask.sum(-1).tolist()
        stats["original_length"] = valid.sum(-1).tolist()
        total = sum(stats["video_total"]) + sum(stats["audio_total"])
        stats["retention"] = (sum(stats["video_kept"]) + sum(stats["audio_kept"])) / total if total else 1.0
        self.last_stats = stats
        self.last_keep_mask = res.keep_mask.detach()
        return res

    def _prepare(self, input_ids, attention_mask, labels, media, rho_video, rho_audio, output):
        unknown = set(media) - set(_MEDIA_KEYS)
        if unknown:
            raise TypeError(f"OmniSIFTThinker: unexpected inputs {sorted(unknown)}; expected processor outputs "
                            f"among {sorted(_MEDIA_KEYS)}")
        media = {k: v for k, v in media.items() if v is not None and k not in _IGNORED_KEYS}
        embeds, pos, mask = self.merge_modalities(input_ids, attention_mask, **media)
        shift_labels = None
        if labels is not None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        return self.compress(
            embeds, input_ids, pos, mask, shift_labels,
            rho_video=rho_video, rho_audio=rho_audio, output=output,
        )

    # -------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        rho_video: float | None = None,
        rho_audio: float | None = None,
        layout: str = "right",
        use_cache: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
        **inputs: Any,
    ) -> OmniSIFTOutput:
        """Loss and logits on the compressed sequence.

        Args:
            input_ids, attention_mask: the processor's token ids and mask (either padding side).
            labels: ``[B, L]`` labels of the uncompressed sequence (-100 = ignored); they are shifted
                before compaction, so every kept token predicts its original successor.
            rho_video, rho_audio: per-call ratios (default: the wrapper's).
            layout: ``"right"`` (right-padded batch) or ``"packed"`` (one varlen row; 4-row position ids
                whose row 0 restarts per sequence, no attention mask; FlashAttention-2 gets cu_seqlens).
            use_cache: passed to the thinker (False for training).
            num_items_in_batch: forwarded to the loss (gradient accumulation).
            **inputs: the other processor outputs (``input_features``, ``feature_attention_mask``,
                ``pixel_values(_videos)``, ``image_grid_thw``, ``video_grid_thw``,
                ``video_second_per_grid``, ``use_audio_in_video``).
        """
        if layout not in ("right", "packed"):
            raise ValueError(f"OmniSIFTThinker.forward: layout must be 'right' or 'packed', got {layout!r}")
        res = self._prepare(input_ids, attention_mask, labels, inputs, rho_video, rho_audio,
                            "right" if layout == "right" else "packed")
        if layout == "right":
            embeds, pos, mask, shift = res.inputs_embeds, res.position_ids, res.attention_mask, res.labels
            out = self.thinker(inputs_embeds=embeds, position_ids=pos, attention_mask=mask, use_cache=use_cache)
        else:
            T = res.inputs_embeds.shape[0]
            dev = res.inputs_embeds.device
            cu = res.cu_seqlens.to(dev, torch.int64)
            seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=dev), cu[1:] - cu[:-1])
            text_pos = torch.arange(T, device=dev) - cu[seg]
            pos = res.position_ids[:, None, :]  # [3, 1, T]
            pos4 = torch.cat([text_pos.view(1, 1, T), pos], dim=0)
            kwargs = {}
            if "flash" in str(getattr(self.thinker.config, "_attn_implementation", "")):
                cu32 = res.cu_seqlens.to(dev, torch.int32)
                kwargs = dict(cu_seq_lens_q=cu32, cu_seq_lens_k=cu32,
                              max_length_q=res.max_seqlen, max_length_k=res.max_seqlen)
            embeds, mask = res.inputs_embeds[None], None
            shift = res.labels[None] if res.labels is not None else None
            out = self.thinker(inputs_embeds=embeds, position_ids=pos4, attention_mask=None,
                               use_cache=use_cache, **kwargs)
        logits = out.logits
        loss = None
        if shift is not None:
            loss = self.thinker.loss_function(
                logits=logits, labels=None, vocab_size=self.thinker.config.get_text_config().vocab_size,
                shift_labels=shift, num_items_in_batch=num_items_in_batch,
            )
        return OmniSIFTOutput(
            loss=loss, logits=logits, attention_mask=mask, position_ids=pos, shift_labels=shift,
            keep_mask=res.keep_mask, cu_seqlens=res.cu_seqlens,
            past_key_values=_output_cache(out) if use_cache else None,
        )

    @torch.no_grad()
    def prepare_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        rho_video: float | None = None,
        rho_audio: float | None = None,
        **inputs: Any,
    ) -> dict[str, torch.Tensor]:
        """The compressed, left-padded prompt as ``thinker.generate`` keyword arguments.

        Returns:
            ``inputs_embeds [B, K, D]``, ``attention_mask [B, K]`` and ``position_ids [4, B, K]`` (row 0:
            ``attention_mask.cumsum(-1) - 1``, 1 at padding; rows 1-3: kept TMRoPE ids). Also sets
            ``rope_deltas`` (``thinker.model.rope_deltas``; ``thinker.rope_deltas`` before ~5.20) to
            ``max(kept) + 1 - kept length`` per row, as ``get_rope_index`` does for an uncompressed prompt.
        """
        res = self._prepare(input_ids, attention_mask, None, inputs, rho_video, rho_audio, "left")
        mask = res.attention_mask
        text_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        pos4 = torch.cat([text_pos[None], res.position_ids.to(text_pos.dtype)], dim=0)
        _rope_holder(self.thinker).rope_deltas = res.rope_deltas.view(-1, 1).to(mask.device)
        return {"inputs_embeds": res.inputs_embeds, "attention_mask": mask, "position_ids": pos4}

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        rho_video: float | None = None,
        rho_audio: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Generates after a compressed prefill; returns only the new tokens ``[B, N]``.

        ``kwargs`` holds the processor's media outputs (see :meth:`forward`) and any
        ``GenerationMixin.generate`` argument (``max_new_tokens``, ``do_sample``, ``temperature``, ...).
        Batches may keep different lengths per row (left padding).
        """
        media = {k: kwargs.pop(k) for k in list(kwargs) if k in _MEDIA_KEYS}
        prompt = self.prepare_generation(input_ids, attention_mask, rho_video=rho_video, rho_audio=rho_audio, **media)
        if generate_honors_position_ids(self.thinker):
            return self.thinker.generate(**prompt, **kwargs)
        return self._generate_legacy(prompt, **kwargs)

    def _generate_legacy(self, prompt: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """transformers 5.0-5.15: the thinker's ``prepare_inputs_for_generation`` drops passed position
        ids and decodes at ``arange + past length + rope_deltas``. The prefill gets the kept ids through a
        per-call override; ``rope_deltas = max(kept) + 1 - K`` (K the padded compressed length) then puts
        decode step s at ``max(kept) + 1 + s``."""
        thinker = self.thinker
        pos4 = prompt["position_ids"]
        K = pos4.shape[-1]
        _rope_holder(thinker).rope_deltas = (pos4[1:].amax(dim=(0, 2)) + 1 - K).view(-1, 1)
        original = thinker.prepare_inputs_for_generation

        @functools.wraps(original)  # generate validates kwargs against this signature
        def prepare(*args, **kw):
            out = original(*args, **kw)
            embeds = out.get("inputs_embeds")
            if embeds is not None and embeds.shape[1] == K:  # the prefill
                out["position_ids"] = pos4
            return out

        thinker.prepare_inputs_for_generation = prepare
        try:
            return thinker.generate(inputs_embeds=prompt["inputs_embeds"], attention_mask=prompt["attention_mask"],
                                    **kwargs)
        finally:
            del thinker.prepare_inputs_for_generation


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def wrap_omni_model(model: nn.Module, compressor: nn.Module | None = None, **kwargs: Any) -> OmniSIFTThinker:
    """Wraps the thinker of a full ``Qwen2_5OmniForConditionalGeneration`` (or a bare thinker).

    The selector lands at ``model.thinker.compressor``, so ``model.state_dict()`` carries the release's
    ``thinker.compressor.*`` keys. ``kwargs`` go to :class:`OmniSIFTThinker`.
    """
    thinker = getattr(model, "thinker", model)
    return OmniSIFTThinker(thinker, compressor, **kwargs)


def _strip_compressor_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in COMPRESSOR_PREFIXES:
        picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if picked:
            return picked
    # A bare selector state dict (keys like "v_proj.weight"), possibly inside a bigger one.
    return dict(state_dict)


def load_compressor_weights(wrapper: OmniSIFTThinker, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Loads selector weights given with ``thinker.compressor.``, ``compressor.`` or no prefix.

    Returns:
        ``load_state_dict``'s result (missing/unexpected keys).
    """
    sd = _strip_compressor_prefix(state_dict)
    sel = wrapper.selector
    p = next(sel.parameters())
    sd = {k: v.to(device=p.device, dtype=p.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
          for k, v in sd.items()}
    return sel.load_state_dict(sd, strict=strict)


def load_compressor_from_checkpoint(wrapper: OmniSIFTThinker, path: str, strict: bool = True):
    """Loads ``*compressor.*`` tensors from a checkpoint directory (``*.safetensors``), a safetensors
    file or a ``torch.save`` file (a state dict, or a dict with a ``"compressor"`` entry)."""
    files = []
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"load_compressor_from_checkpoint: no *.safetensors in {path}")
    else:
        files = [path]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    if "compressor." in k or len(files) == 1:
                        sd[k] = h.get_tensor(k)
        else:
            obj = torch.load(f, map_location="cpu", weights_only=True)
            sd.update(obj.get("compressor", obj))
    if len(files) > 1 or any("compressor." in k for k in sd):
        sd = {k: v for k, v in sd.items() if "compressor." in k}
    return load_compressor_weights(wrapper, sd, strict=strict)


def collate_inputs(samples: list[dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Batches per-sample processor outputs (each with batch dimension 1 or without one).

    Token tensors (``input_ids``, ``attention_mask``, ``labels``) are padded to the longest row on
    ``padding_side``; audio features are padded along frames and stacked; pixel values, grids and
    ``video_second_per_grid`` are concatenated in sample order (the order the thinker consumes them).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"collate_inputs: padding_side must be 'right' or 'left', got {padding_side!r}")
    rows = []
    for s in samples:
        s = dict(s)
        for k in ("input_ids", "attention_mask", "labels"):
            if k in s and torch.is_tensor(s[k]) and s[k].dim() == 1:
                s[k] = s[k][None]
        if "attention_mask" not in s:
            s["attention_mask"] = torch.ones_like(s["input_ids"])
        rows.append(s)
    L = max(s["input_ids"].shape[1] for s in rows)

    def pad_tokens(key, fill):
        out = []
        for s in rows:
            t = s.get(key)
            if t is None:
                t = torch.full_like(s["input_ids"], fill)
            gap = L - t.shape[1]
            out.append(F.pad(t, (gap, 0) if padding_side == "left" else (0, gap), value=fill))
        return torch.cat(out)

    batch: dict[str, Any] = {"input_ids": pad_tokens("input_ids", pad_token_id),
                             "attention_mask": pad_tokens("attention_mask", 0)}
    if any("labels" in s for s in rows):
        batch["labels"] = pad_tokens("labels", -100)
    feats = [s for s in rows if s.get("input_features") is not None]
    if feats:
        n = max(s["input_features"].shape[-1] for s in feats)
        batch["input_features"] = torch.cat([F.pad(s["input_features"], (0, n - s["input_features"].shape[-1]))
                                             for s in feats])
        batch["feature_attention_mask"] = torch.cat([F.pad(s["feature_attention_mask"],
                                                           (0, n - s["feature_attention_mask"].shape[-1]))
                                                     for s in feats])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        parts = [torch.as_tensor(s[key]).reshape(-1) if key == "video_second_per_grid" else s[key]
                 for s in rows if s.get(key) is not None]
        if parts:
            batch[key] = torch.cat(parts)
    flags = {bool(s["use_audio_in_video"]) for s in rows if s.get("use_audio_in_video") is not None}
    if len(flags) > 1:
        raise ValueError(
            "collate_inputs: samples disagree on use_audio_in_video (transformers' get_rope_index takes one flag "
            "per batch): batch videos with their sound track apart from videos without it"
        )
    if flags:
        batch["use_audio_in_video"] = flags.pop()
    return batch


# ----------------------------------------------------------------------------------------------
# Tiny random model and hand-built inputs (tests, --tiny-random)
# ----------------------------------------------------------------------------------------------
TINY_IDS = dict(
    audio_token_index=120, image_token_index=121, video_token_index=122,
    audio_start_token_id=123, audio_end_token_id=124, vision_start_token_id=125, vision_end_token_id=126,
)
TINY_PAD_ID = 127
TINY_TEXT_VOCAB = 100  # plain text ids are drawn from [1, 100)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_thinker(
    model: str | None,
    *,
    device: torch.device,
    dtype: str | None = None,
    tiny_random: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, torch.dtype]:
    """The thinker the programs run: a tiny random one, or ``from_pretrained(model)``.

    Args:
        model: a local path or hub id of a Qwen2.5-Omni thinker (or full model) checkpoint.
        device: where the thinker goes.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; None or ``"auto"``: bf16 for a real
            model on CUDA, else fp32.
        tiny_random: build :func:`tiny_random_thinker` instead (no weights needed).
        seed: seed of the tiny random thinker.
        attn_implementation: passed to ``from_pretrained`` when given.

    Returns:
        ``(thinker, torch dtype)``.
    """
    auto = dtype in (None, "auto")
    torch_dtype = None if auto else DTYPES.get(dtype)
    if not auto and torch_dtype is None:
        raise ValueError(f"load_thinker: dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.type == "cuda" and model else torch.float32
    if tiny_random:
        return tiny_random_thinker(seed=seed).to(device=device, dtype=torch_dtype), torch_dtype
    check_transformers_version()
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    kw: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model, **kw).to(device)
    return thinker, torch_dtype


def tiny_thinker_config(
    hidden_size: int = 32,
    num_layers: int = 2,
    vocab_size: int = 128,
    *,
    pad_token_id: int | None = None,
    token_ids: dict[str, int] | None = None,
):
    """A tiny random ``Qwen2_5OmniThinkerConfig``.

    Text: ``hidden_size``, ``num_layers`` layers, 4 heads (2 KV), mrope section [2, 1, 1]. Vision: depth 1,
    width 32, patch 14, temporal patch 2, spatial merge 2. Audio: 1 layer, width 32, 128 mel bins.

    Args:
        hidden_size, num_layers: the text model's width and depth.
        vocab_size: the text vocabulary (at least the tokenizer's length when one is used).
        pad_token_id: the text config's pad id (default :data:`TINY_PAD_ID`).
        token_ids: the special ids, keyed as :data:`TINY_IDS` (``audio_token_index``, ``image_token_index``,
            ``video_token_index``, ``audio_start_token_id``, ``audio_end_token_id``,
            ``vision_start_token_id``, ``vision_end_token_id``); missing keys take :data:`TINY_IDS`' values.
            Give a real tokenizer's ids here so the config matches it.
    """
    check_transformers_version()
    from transformers import Qwen2_5OmniThinkerConfig

    ids = dict(TINY_IDS)
    if token_ids:
        unknown = set(token_ids) - set(TINY_IDS)
        if unknown:
            raise ValueError(f"tiny_thinker_config: token_ids keys must be among {sorted(TINY_IDS)}; "
                             f"got unknown {sorted(unknown)}")
        ids.update({k: int(v) for k, v in token_ids.items()})
    pad = TINY_PAD_ID if pad_token_id is None else int(pad_token_id)
    too_big = {k: v for k, v in dict(ids, pad_token_id=pad).items() if not 0 <= v < vocab_size}
    if too_big:
        raise ValueError(f"tiny_thinker_config: ids must be in [0, vocab_size={vocab_size}); got {too_big}")

    heads = 4
    head_dim = hidden_size // heads
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=4096, pad_token_id=pad,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=hidden_size,
            fullatt_block_indexes=[0], patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
        ),
        audio_config=dict(
            encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32, output_dim=hidden_size,
            num_mel_bins=128, n_window=100, max_source_positions=1500,
        ),
        **ids,
    )


def tiny_random_thinker(seed: int = 0, **config_kwargs: Any):
    """A tiny random ``Qwen2_5OmniThinkerForConditionalGeneration`` (fp32, eval mode, eager-free sdpa)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_thinker_config(**config_kwargs))
    model.generation_config.pad_token_id = model.config.get_text_config().pad_token_id
    return model.eval()


def _audio_frames(tokens: int) -> int:
    """Mel frames that give exactly ``tokens`` audio tokens (``((n-1)//2 + 1 - 2)//2 + 1``)."""
    return 4 * tokens


def build_inputs(
    config,
    rows: list[list[Any]],
    *,
    padding_side: str = "right",
    seed: int = 0,
    answer: int = 0,
) -> dict[str, Any]:
    """Processor-like inputs built by hand from the token counting rules (spec facts).

    Args:
        config: the thinker config (ids, patch and merge sizes).
        rows: per row a list of ``synthetic.Text(n)``, ``synthetic.Video(seconds, frame_h, frame_w,
            audio_tokens)`` (grid ``(seconds, 2 frame_h, 2 frame_w)`` at 2 fps, ``second_per_grid`` 1;
            ``audio_tokens`` None = 25/s, 0 = video without audio), ``synthetic.Audio(tokens)`` and
            ``synthetic.Image(h, w)`` (LLM tokens; grid ``(1, 2h, 2w)``).
        padding_side: ``"right"`` or ``"left"``.
        seed: makes ids, pixels and mel features reproducible.
        answer: when > 0, that many text tokens are appended to every row and ``labels`` marks them.

    Returns:
        ``input_ids``, ``attention_mask``, (``labels``), and the media tensors present:
        ``input_features [n_audio, 128, frames]``, ``feature_attention_mask``, ``pixel_values_videos``,
        ``video_grid_thw``, ``video_second_per_grid``, ``pixel_values``, ``image_grid_thw``.
    """
    gen = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    merge = vc.spatial_merge_size
    per_sec = config.position_id_per_seconds
    per_chunk = per_sec * config.seconds_per_chunk
    a_id, v_id, i_id = config.audio_token_id, config.video_token_id, config.image_token_id
    a_bos, a_eos = config.audio_start_token_id, config.audio_end_token_id
    v_bos, v_eos = config.vision_start_token_id, config.vision_end_token_id
    pad_id = config.get_text_config().pad_token_id
    pad_id = TINY_PAD_ID if pad_id is None else pad_id

    with_audio = {it.num_audio > 0 for r in rows for it in r if isinstance(it, syn.Video)}
    if len(with_audio) > 1:
        raise ValueError("build_inputs: a batch mixes videos with and without audio (use_audio_in_video is per batch)")
    ids_rows, label_rows = [], []
    audio_frames, videos, images = [], [], []
    for items in rows:
        ids: list[int] = []
        for it in items:
            if isinstance(it, syn.Text):
                ids += torch.randint(1, TINY_TEXT_VOCAB, (it.tokens,), generator=gen).tolist()
            elif isinstance(it, syn.Video):
                n_frame = it.tokens_per_frame
                videos.append((it.seconds, merge * it.frame_h, merge * it.frame_w))
                if it.num_audio == 0:
                    ids += [v_bos] + [v_id] * (it.seconds * n_frame) + [v_eos]
                    continue
                audio_frames.append(_audio_frames(it.num_audio))
                ids += [v_bos, a_bos]
                frames_per_chunk = per_chunk // per_sec  # one frame (temporal grid) per second
                n_chunks = max(-(-it.seconds // frames_per_chunk), -(-it.num_audio // per_chunk))
                for c in range(n_chunks):
                    f0, f1 = c * frames_per_chunk, min((c + 1) * frames_per_chunk, it.seconds)
                    ids += [v_id] * (max(f1 - f0, 0) * n_frame)
                    a0, a1 = c * per_chunk, min((c + 1) * per_chunk, it.num_audio)
                    ids += [a_id] * max(a1 - a0, 0)
                ids += [a_eos, v_eos]
            elif isinstance(it, syn.Audio):
                audio_frames.append(_audio_frames(it.tokens))
                ids += [a_bos] + [a_id] * it.tokens + [a_eos]
            elif isinstance(it, syn.Image):
                images.append((1, merge * it.h, merge * it.w))
                ids += [v_bos] + [i_id] * (it.h * it.w) + [v_eos]
            else:
                raise TypeError(f"build_inputs: unknown item {it!r}")
        labels = [-100] * len(ids)
        if answer:
            ans = torch.randint(1, TINY_TEXT_VOCAB, (answer,), generator=gen).tolist()
            ids += ans
            labels += ans
        ids_rows.append(ids)
        label_rows.append(labels)

    B, L = len(rows), max(len(r) for r in ids_rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(ids_rows, label_rows)):
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(L - n, L)
        input_ids[b, sl] = torch.tensor(ids)
        attention_mask[b, sl] = 1
        labels[b, sl] = torch.tensor(lab)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if answer:
        out["labels"] = labels
    if audio_frames:
        n_mel = config.audio_config.num_mel_bins
        T = max(audio_frames)
        feats = torch.randn(len(audio_frames), n_mel, T, generator=gen)
        fmask = torch.zeros(len(audio_frames), T, dtype=torch.long)
        for i, n in enumerate(audio_frames):
            fmask[i, :n] = 1
            feats[i, :, n:] = 0
        out["input_features"] = feats
        out["feature_attention_mask"] = fmask
    if videos:
        grid = torch.tensor(videos, dtype=torch.long)
        out["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
        out["video_grid_thw"] = grid
        out["video_second_per_grid"] = torch.ones(len(videos))
    if images:
        grid = torch.tensor(images, dtype=torch.long)
        out["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=gen)
        out["image_grid_thw"] = grid
    return out
