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

Supported transformers: **5.0 <= version < 6.0** (:data:`SUPPORTED_TRANSFORMERS`); tested with 5.0.0,
5.15.1, 5.17.0, 5.22.0, 5.23.0, 5.24.0 and 5.25.0 (the real-processor tests with all but 5.15.1). 4.x is
refused. What differs between 5.x releases is in :mod:`.qwen2_5_omni_compat`; the token layout and its
warnings in :mod:`.qwen2_5_omni_layout`; loading and batching in :mod:`.qwen2_5_omni_checkpoint` (its
public names are importable from here). Test fixtures: :mod:`omnisift_kernels.testing.qwen2_5_omni`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import OmniSIFTCompressor
from ..presets import get_preset
from ..result import CompressionResult
from ..selector import VisionGuidedAudioSelector
from . import qwen2_5_omni_compat as _compat
from . import qwen2_5_omni_layout as _layout

# Re-exported: the names users call are importable from here.
from .qwen2_5_omni_checkpoint import (  # noqa: F401
    COMPRESSOR_PREFIXES, collate_inputs, load_compressor_from_checkpoint, load_compressor_weights, load_thinker,
)
from .qwen2_5_omni_compat import (  # noqa: F401
    SUPPORTED_TRANSFORMERS, TESTED_TRANSFORMERS, _rope_holder, check_transformers_version,
    generate_honors_position_ids, text_model,
)

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
        return _layout.detect_audio_in_video(self.thinker.config, input_ids)

    def audio_in_video_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, L]``: the audio tokens that are a video's own sound track.

        Those lie inside ``<|vision_bos|><|audio_bos|> ... <|audio_eos|><|vision_eos|>`` (the layout of
        ``use_audio_in_video=True``), with the config's ids. Audio in its own ``<|audio_bos|> ...
        <|audio_eos|>`` block (``use_audio_in_video=False``, or an audio-only clip) is not.
        """
        return _layout.audio_in_video_mask(self.thinker.config, input_ids)

    def check_layout(self, input_ids: torch.Tensor, use_audio_in_video: bool | None) -> None:
        """Warns when the ids and the config (or the ``use_audio_in_video`` flag) disagree
        (:func:`.qwen2_5_omni_layout.check_layout`); the warning points at the caller of
        :meth:`merge_modalities`."""
        _layout.check_layout(self.thinker.config, input_ids, use_audio_in_video, stacklevel=4)

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
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = _compat.embed_inputs(
            thinker, input_ids, input_features=input_features, feature_attention_mask=feature_attention_mask,
            audio_feature_lengths=audio_feature_lengths, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
        )
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
        _layout.warn_uncompressible(cfg, input_ids, in_video, rv, ra, stacklevel=3)
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
            pos, pos4, kwargs = _layout.packed_thinker_inputs(self.thinker.config, res)
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
            past_key_values=_compat._output_cache(out) if use_cache else None,
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
        return _compat.generate_with_prefill_positions(self.thinker, prompt, **kwargs)


def wrap_omni_model(model: nn.Module, compressor: nn.Module | None = None, **kwargs: Any) -> OmniSIFTThinker:
    """Wraps the thinker of a full ``Qwen2_5OmniForConditionalGeneration`` (or a bare thinker).

    The selector lands at ``model.thinker.compressor``, so ``model.state_dict()`` carries the release's
    ``thinker.compressor.*`` keys. ``kwargs`` go to :class:`OmniSIFTThinker`.
    """
    thinker = getattr(model, "thinker", model)
    return OmniSIFTThinker(thinker, compressor, **kwargs)
